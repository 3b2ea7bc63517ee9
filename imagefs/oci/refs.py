"""References (``name:tag``) of an image store, and the config and manifest blobs they keep.

Beside ``images/`` a store holds::

    VIC/<store>/refs/<name:tag, '/' as %2F>   JSON: {"image": <id>, "config": <digest>, "manifest": <digest>}
    VIC/<store>/blobs/sha256/<hex>            image configs and manifests, as loaded
    VIC/<store>/blobs/locks/<2 hex digits>    lock files of loads writing layers (see layer_lock)

A reference names an image (its top layer) plus, for loaded images, the config and
manifest they came with: two images with the same layers and different configs are
two references to one layer image. An image that references name cannot be deleted
until it is untagged.
"""
import json
import logging
import re
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import quote, unquote

from ..errors import InvalidInput, NotFound
from ..ids import check_id
from .digests import check_digest, digest_of, hex_of

log = logging.getLogger("imagefs.oci")

DEFAULT_TAG = "latest"
MAX_REF = 255
_COMPONENT = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9_])?(?::[0-9]+)?\Z")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}\Z")


@dataclass(frozen=True)
class Ref:
    name: str                   # name:tag
    image: str                  # the top layer's image ID
    config: str | None          # digest of the kept config, None for images never loaded
    manifest: str | None


def normalize_ref(text):
    """``name[:tag]`` with ``:latest`` added when no tag is given; InvalidInput if malformed.

    Names are '/'-separated components of letters, digits and ``. _ -`` (the first may
    carry a registry ``:port``); tags are docker's (1-128 of ``A-Z a-z 0-9 _ . -``).
    """
    if not isinstance(text, str) or not text or len(text) > MAX_REF:
        raise InvalidInput(f"invalid reference {text!r}: use NAME[:TAG], at most {MAX_REF} characters")
    head, slash, last = text.rpartition("/")
    name_last, colon, tag = last.partition(":")
    if not colon:
        tag = DEFAULT_TAG
    name = f"{head}{slash}{name_last}"
    parts = name.split("/")
    if not all(_COMPONENT.match(p) and (i == 0 or ":" not in p) for i, p in enumerate(parts)) \
            or not _TAG.match(tag):
        raise InvalidInput(f"invalid reference {text!r}: use NAME[:TAG] (NAME: '/'-separated parts of "
                           "letters, digits and . _ -; TAG: 1-128 of letters, digits and _ . -)")
    return f"{name}:{tag}"


def _refs_dir(store):
    return f"VIC/{store}/refs"


def _blob(store, digest):
    return f"VIC/{store}/blobs/sha256/{hex_of(digest)}"


class RefStore:
    """The references and kept blobs of one image store (through ``ImageStore``)."""

    def __init__(self, images, store):
        self.images = images
        self.ds = images.ds
        self.store = images.get_store(store)

    # --- blobs --------------------------------------------------------------------------------
    def put_blob(self, data):
        digest = digest_of(data)
        path = _blob(self.store, digest)
        if not self.ds.exists(path):
            self.ds.mkdir(f"VIC/{self.store}/blobs/sha256", parents=True)
            self.ds.write_file(path, data)
        return digest

    def blob(self, digest):
        check_digest(digest)
        try:
            return self.ds.read_file(_blob(self.store, digest))
        except NotFound:
            raise NotFound(f"blob {digest} is not kept in store {self.store}") from None

    @contextmanager
    def layer_lock(self, image_id):
        """Held by a load while it looks for layer ``image_id`` and writes it if missing, so a
        second load of the same layer waits and then reuses it. Layers share one of 256 lock
        files by their IDs' first two hex digits (a bounded set, nothing to clean up): two
        loads of unrelated layers wait for each other once in 256."""
        locks = f"VIC/{self.store}/blobs/locks"
        self.ds.mkdir(locks, parents=True)
        path = f"{locks}/{image_id[:2]}"
        with self.ds.lock(path, exclusive=True, blocking=False) as got:
            if got:
                yield
                return
        log.info("layer %s: waiting for another load writing a layer", image_id[:12])
        with self.ds.lock(path, exclusive=True):
            yield

    # --- references ---------------------------------------------------------------------------
    def list(self):
        try:
            names = self.ds.listdir(_refs_dir(self.store))
        except NotFound:
            return []
        out = []
        for fname in names:
            if fname.startswith(".") or ".tmp-" in fname:
                continue
            try:
                out.append(self._read(unquote(fname)))
            except (NotFound, InvalidInput):
                continue
        return sorted(out, key=lambda r: r.name)

    def _read(self, name):
        try:
            doc = json.loads(self.ds.read_file(f"{_refs_dir(self.store)}/{_file(name)}"))
        except NotFound:
            raise NotFound(f"reference {name} not found in store {self.store}") from None
        except ValueError:
            raise InvalidInput(f"reference {name} in store {self.store} is unreadable") from None
        return Ref(name, doc["image"], doc.get("config"), doc.get("manifest"))

    def get(self, text):
        return self._read(normalize_ref(text))

    def resolve(self, text):
        """A reference, or an image ID (as a Ref without config): what ``image save`` takes."""
        try:
            return self.get(text)
        except (NotFound, InvalidInput):
            pass
        try:
            self.images.get_image(self.store, check_id(text))
        except (NotFound, InvalidInput):
            raise NotFound(f"no image or reference {text} in store {self.store}") from None
        return Ref(text, text, None, None)

    def tag(self, image_id, text, *, config=None, manifest=None):
        """Point ``name:tag`` at an image (replacing what it named)."""
        name = normalize_ref(text)
        self.images.get_image(self.store, image_id)
        if config is None and manifest is None:   # retagging keeps what the image was loaded with
            same = [r for r in self.list() if r.image == image_id and r.config]
            if same:
                config, manifest = same[0].config, same[0].manifest
        doc = {"image": image_id, "config": config, "manifest": manifest}
        self.ds.mkdir(_refs_dir(self.store), parents=True)
        self.ds.write_file(f"{_refs_dir(self.store)}/{_file(name)}", json.dumps(doc, sort_keys=True).encode())
        return Ref(name, image_id, config, manifest)

    def untag(self, text):
        ref = self.get(text)
        self.ds.remove(f"{_refs_dir(self.store)}/{_file(ref.name)}")
        return ref

    def refs_of(self, image_id):
        return [r.name for r in self.list() if r.image == image_id]


def _file(name):
    return quote(name, safe=":@")
