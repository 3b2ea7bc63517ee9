"""`docker save` archives: ``manifest.json`` naming each image's config and layer tars.

    [{"Config": "<hex>.json", "RepoTags": ["debian:bookworm"], "Layers": ["<id>/layer.tar", ...]}]

A config named by its digest (``<hex>.json``, ``blobs/sha256/<hex>``) is checked
against it; layer files named by a digest (``blobs/sha256/<hex>``, docker 25 and
later) are checked as blobs; every layer's uncompressed bytes are checked against
the config's diffIDs by the loader. Writing puts the layers under ``<diffID hex>.tar``
and the config under ``<hex>.json``, as skopeo does.
"""
import re

from ..errors import InvalidInput
from .digests import verify
from .layout import diff_ids_of
from .source import SourceImage, SourceLayer

_DIGEST_NAME = re.compile(r"(?:blobs/sha256/|)([0-9a-f]{64})(?:\.json)?\Z")
_BLOB_NAME = re.compile(r"blobs/sha256/([0-9a-f]{64})\Z")


class DockerArchiveSource:
    def __init__(self, files):
        self.files = files

    def close(self):
        self.files.close()

    def images(self, platform=None):
        """Every image of the archive (one platform each: ``load`` checks it against its config)."""
        manifest = self.files.read_json("manifest.json")
        if not isinstance(manifest, list) or not manifest:
            raise InvalidInput("manifest.json: expected a non-empty list of images")
        return [self._image(i, entry) for i, entry in enumerate(manifest)]

    def _image(self, i, entry):
        if not isinstance(entry, dict) or not isinstance(entry.get("Config"), str):
            raise InvalidInput(f"manifest.json entry {i}: no Config")
        name = self.files.clean(entry["Config"])
        config = self.files.read(name)
        named = _DIGEST_NAME.match(name)
        if named:
            verify(config, f"sha256:{named.group(1)}", f"config {name}")
        diff_ids = diff_ids_of(config, f"config {name}")
        layers = entry.get("Layers")
        if not isinstance(layers, list) or len(layers) != len(diff_ids):
            raise InvalidInput(f"manifest.json entry {i}: {len(layers or [])} layers, its config "
                               f"{len(diff_ids)} diffIDs")
        tags = entry.get("RepoTags") or []
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise InvalidInput(f"manifest.json entry {i}: RepoTags must be a list of names")
        out = SourceImage(list(tags), config, None)
        for path, diff_id in zip(layers, diff_ids):
            path = self.files.clean(str(path))
            blob = _BLOB_NAME.match(path)
            out.layers.append(SourceLayer(diff_id, f"sha256:{blob.group(1)}" if blob else None,
                                          self.files.size(path), lambda p=path: self.files.open(p),
                                          f"layer {path}"))
        return out


def manifest_entry(config_digest, layer_diff_ids, names):
    """The manifest.json entry of a saved image (with its file names)."""
    return {"Config": f"{config_digest.split(':', 1)[1]}.json",
            "RepoTags": list(names),
            "Layers": [f"{d.split(':', 1)[1]}.tar" for d in layer_diff_ids]}
