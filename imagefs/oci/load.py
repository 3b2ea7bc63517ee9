"""``imagefs image load``: the images of a docker save archive or OCI layout into a store.

Each layer becomes an image named by the hex of its chain ID, a child of the layer
below it (the bottom one a child of scratch). A layer already in the store is
reused, so a base shared by many images is written once. A new layer's blob is read
once: its bytes are hashed against the blob digest (and size) as they stream, then
decompressed (gzip, zstd or plain) into the layer writer, which checks the sha256 of
the uncompressed tar against the config's diffID; a mismatch fails that layer
before it is sealed, leaving no image of it. The config and manifest are kept in the
store, and each name the source gives (or ``tags``) becomes a reference.

Loads run side by side: each layer is looked for and written under a lock of its
chain ID (``RefStore.layer_lock``), so when two loads meet the same new layer one
writes it and the other waits, then finds it and reuses it.

From a multi-platform index the host's platform is loaded, or ``platform``
(``OS/ARCH[/VARIANT]``); an explicit platform is also checked against the configs
of sources without an index (docker archives).
"""
import logging
import os
from dataclasses import dataclass

from ..errors import InvalidInput, NotFound
from ..ids import SCRATCH
from .compression import DecompressingReader
from .digests import VerifyingReader, chain_ids, layer_image_id
from .platform import Platform, parse_platform
from .refs import RefStore, normalize_ref
from .source import open_source, parse_json

log = logging.getLogger("imagefs.oci")
CHUNK = 1 << 20


@dataclass
class Loaded:
    image: str          # the top layer's image ID
    names: list         # the references made
    layers: list        # image IDs, bottom first
    written: int        # how many of them were new


def load(images, store, src, *, tags=(), name=None, platform=None, progress=None):
    """Load every image at ``src`` into ``store`` (an ImageStore and a store name).

    ``name`` completes references that are only a tag (OCI layouts often name an image
    ``latest``); it defaults to the source's file name. ``tags`` are extra references,
    for a source with a single image. ``platform`` (``OS/ARCH[/VARIANT]``) picks from
    multi-platform indexes (default: the host's). ``progress`` gets ``start(label, total)``,
    ``update(nbytes)`` and ``done()``.
    """
    wanted = platform if platform is None or isinstance(platform, Platform) else parse_platform(platform)
    refs = RefStore(images, store)
    source = open_source(src)
    try:
        found = source.images(wanted)
        if wanted is not None:
            found = _of_platform(found, wanted, src)
        if tags and len(found) != 1:
            raise InvalidInput(f"{src} holds {len(found)} images; --tag needs exactly one")
        default_name = name or _name_from_path(src)
        out = []
        for img in found:
            names = [_complete(n, default_name) for n in img.names] + [normalize_ref(t) for t in tags]
            out.append(_load_image(images, refs, store, img, names, progress))
        return out
    finally:
        source.close()


def _load_image(images, refs, store, img, names, progress):
    diff_ids = [layer.diff_id for layer in img.layers]
    ids = [layer_image_id(c) for c in chain_ids(diff_ids)]
    parent, written = SCRATCH, 0
    for n, (layer, image_id) in enumerate(zip(img.layers, ids), 1):
        label = f"layer {n}/{len(ids)} {image_id[:12]}"
        with refs.layer_lock(image_id):
            if _present(images, store, image_id, parent):
                log.info("%s: already in store %s", label, store)
            else:
                _write_layer(images, store, parent, image_id, layer, label, progress)
                written += 1
        parent = image_id
    top = ids[-1] if ids else SCRATCH
    config = refs.put_blob(img.config)
    manifest = refs.put_blob(img.manifest) if img.manifest is not None else None
    made = [refs.tag(top, n, config=config, manifest=manifest).name for n in dict.fromkeys(names)]
    return Loaded(top, made, ids, written)


def _of_platform(found, wanted, src):
    """The images that are for ``wanted`` (an explicit ``--platform``): picked by it from an
    index, or (sources without one) saying so in their config."""
    def config_platform(img):
        config = parse_json(img.config, "config")
        return {k: config.get(k) for k in ("os", "architecture", "variant")} if isinstance(config, dict) else {}

    kept = [img for img in found if img.platform is not None or wanted.matches(config_platform(img))]
    if not kept:
        have = ", ".join(dict.fromkeys("/".join(v for v in config_platform(img).values() if isinstance(v, str))
                                       or "(no platform)" for img in found))
        raise NotFound(f"{src}: no {wanted} image (it has {have})")
    return kept


def _present(images, store, image_id, parent):
    try:
        img = images.get_image(store, image_id)
    except NotFound:
        return False
    if img.parent != parent:
        raise InvalidInput(f"image {image_id} in store {store} has parent {img.parent}, not {parent}: "
                           "it is not the layer this chain ID names")
    return True


def _write_layer(images, store, parent, image_id, layer, label, progress):
    total = layer.size
    if progress is not None:
        progress.start(label, total)
    blob = layer.open()
    try:
        checked = VerifyingReader(blob, layer.digest, layer.what, size=layer.size,
                                  progress=progress.update if progress is not None else None)
        tar = DecompressingReader(checked, layer.what)
        try:
            images.write_image(store, parent, image_id, tar, expected_sum=layer.diff_id,
                               metadata={"diffID": layer.diff_id.encode()})
        except InvalidInput:
            # a damaged blob usually breaks the tar before its end: name the cause if it is that
            while checked.read(CHUNK):
                pass
            raise
    finally:
        blob.close()
        if progress is not None:
            progress.done()


def _name_from_path(path):
    base = os.path.basename(os.path.normpath(path))
    for ext in (".tar", ".oci", ".tgz"):
        if base.endswith(ext):
            base = base[: -len(ext)]
    return base.lower() or "image"


def _complete(text, default_name):
    """A source's name for an image as a reference: a bare tag gets ``default_name``."""
    if "/" not in text and ":" not in text and not text.startswith(("sha256", ".")):
        try:
            return normalize_ref(f"{default_name}:{text}")
        except InvalidInput:
            pass
    return normalize_ref(text)
