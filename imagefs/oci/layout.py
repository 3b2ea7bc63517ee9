"""OCI image layouts: ``oci-layout``, ``index.json`` and ``blobs/sha256/<hex>``.

Reading follows the index to image manifests (through nested indexes), taking from
the entries of a multi-platform index (at any level; at the top, per name) the
requested platform's (the host's by default). It checks every blob's digest and
size, and names each image from its annotations: ``io.containerd.image.name`` (a full
reference), else ``org.opencontainers.image.ref.name`` (often only a tag).
Writing makes a layout directory (or a tar of one) with sorted, fixed-order JSON so
that the same image gives the same bytes.
"""
import json
import os

from ..errors import InvalidInput, NotFound
from .digests import check_digest, hex_of, verify
from .platform import describe, host_platform
from .source import SourceImage, SourceLayer, parse_json

LAYOUT_VERSION = {"imageLayoutVersion": "1.0.0"}
MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER = "application/vnd.oci.image.layer.v1.tar"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
INDEXES = (MT_INDEX, DOCKER_MANIFEST_LIST)
MANIFESTS = (MT_MANIFEST, DOCKER_MANIFEST)
ANNOTATION_REF = "org.opencontainers.image.ref.name"
ANNOTATION_CONTAINERD_NAME = "io.containerd.image.name"


def blob_path(digest):
    return f"blobs/sha256/{hex_of(digest)}"


class OCILayoutSource:
    def __init__(self, files):
        self.files = files
        version = files.read_json("oci-layout")
        if not isinstance(version, dict) or version.get("imageLayoutVersion") != "1.0.0":
            raise InvalidInput(f"{files.path}: unsupported OCI layout version {version!r}")

    def close(self):
        self.files.close()

    def _blob(self, descriptor, what):
        if not isinstance(descriptor, dict):
            raise InvalidInput(f"{what}: not a descriptor")
        digest = check_digest(descriptor.get("digest"), f"{what} digest")
        data = self.files.read(blob_path(digest))
        if "size" in descriptor and descriptor["size"] != len(data):
            raise InvalidInput(f"{what} {digest}: size mismatch: expected {descriptor['size']}, got {len(data)}")
        return verify(data, digest, f"{what} {digest}")

    def images(self, platform=None):
        """The images of the layout; from a multi-platform index, ``platform``'s (the host's
        by default)."""
        platform = platform or host_platform()
        index = self.files.read_json("index.json")
        by_name = {}        # a layout's top index may hold several images, each for several platforms
        for desc in _manifests_of(index, "index.json"):
            by_name.setdefault(tuple(_names_of(desc)), []).append(desc)
        out = []
        for entries in by_name.values():
            for desc in _pick_platform(entries, platform, self.files.path):
                out.extend(self._images_of(desc, platform, depth=0))
        if not out:
            raise InvalidInput(f"{self.files.path}: the index holds no image")
        return out

    def _images_of(self, desc, platform, depth, names=None):
        names = list(names or _names_of(desc))
        media = desc.get("mediaType")
        data = self._blob(desc, "manifest")
        doc = parse_json(data, f"manifest {desc.get('digest')}")
        media = doc.get("mediaType", media)
        if media in INDEXES or "manifests" in doc:
            if depth > 4:
                raise InvalidInput("image indexes nested too deeply")
            chosen = _pick_platform(_manifests_of(doc, f"index {desc['digest']}"), platform, self.files.path)
            return [img for d in chosen for img in self._images_of(d, platform, depth + 1, names)]
        image = self._image(doc, data, names)
        image.platform = desc.get("platform") if isinstance(desc.get("platform"), dict) else None
        return [image]

    def _image(self, manifest, manifest_bytes, names):
        config = self._blob(manifest.get("config"), "config")
        diff_ids = diff_ids_of(config, "config")
        layers = manifest.get("layers")
        if not isinstance(layers, list) or len(layers) != len(diff_ids):
            raise InvalidInput(f"manifest has {len(layers or [])} layers, its config {len(diff_ids)} diffIDs")
        out = SourceImage(names, config, manifest_bytes)
        for i, (desc, diff_id) in enumerate(zip(layers, diff_ids)):
            digest = check_digest((desc or {}).get("digest"), f"layer {i} digest")
            path = blob_path(digest)
            out.layers.append(SourceLayer(diff_id, digest, desc.get("size"), lambda p=path: self.files.open(p),
                                          f"layer {digest}"))
        return out


def diff_ids_of(config_bytes, what):
    config = parse_json(config_bytes, what)
    rootfs = config.get("rootfs") if isinstance(config, dict) else None
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list):
        raise InvalidInput(f"{what}: no rootfs.diff_ids")
    return [check_digest(d, "diffID") for d in diff_ids]


def _manifests_of(index, what):
    manifests = index.get("manifests") if isinstance(index, dict) else None
    if not isinstance(manifests, list) or not all(isinstance(m, dict) for m in manifests):
        raise InvalidInput(f"{what}: no manifests list")
    return manifests


def _names_of(desc):
    ann = desc.get("annotations") or {}
    name = ann.get(ANNOTATION_CONTAINERD_NAME) or ann.get(ANNOTATION_REF)
    return [name] if name else []


def _pick_platform(manifests, wanted, where):
    """The entry of ``wanted`` from a multi-platform index (all entries of one without platforms)."""
    with_platform = [m for m in manifests if isinstance(m.get("platform"), dict)]
    if not with_platform:
        return manifests
    match = [m for m in with_platform if wanted.matches(m["platform"])]
    if not match:
        have = ", ".join(dict.fromkeys(describe(m) for m in with_platform))
        raise NotFound(f"{where}: no {wanted} image in its index (it has {have}); choose one with --platform")
    return match[:1]


# --- writing ------------------------------------------------------------------------------
def canonical_json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


class LayoutWriter:
    """Writes blobs and the index of an OCI layout into a directory."""

    def __init__(self, root):
        self.root = root
        os.makedirs(os.path.join(root, "blobs", "sha256"), exist_ok=True)

    def blob_file(self, digest):
        return os.path.join(self.root, blob_path(digest))

    def put(self, data, digest):
        path = self.blob_file(digest)
        if not os.path.exists(path):
            with open(path + ".part", "wb") as f:
                f.write(data)
            os.replace(path + ".part", path)

    def finish(self, manifests):
        """``manifests``: [(descriptor dict)] for index.json."""
        with open(os.path.join(self.root, "oci-layout"), "wb") as f:
            f.write(canonical_json(LAYOUT_VERSION))
        index = {"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": manifests}
        with open(os.path.join(self.root, "index.json"), "wb") as f:
            f.write(canonical_json(index))
