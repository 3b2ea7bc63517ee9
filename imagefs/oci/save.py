"""``imagefs image save``: an image of a store as an OCI layout, OCI archive or docker archive.

Each layer is exported as its diff against its parent (the bottom one against
scratch: what the image changed over the store's empty base, so scratch's skeleton
is not part of the saved image), uncompressed. The config the image was loaded with
is kept, with ``rootfs.diff_ids`` set to the new layers' digests; an image that was
never loaded gets a minimal linux config. Everything written is deterministic: the
layer tars are (sorted, fixed whiteout times), the JSON is canonical (sorted keys,
no spaces) and the archive's own headers have fixed owners, modes and times, so the
same image saved twice gives the same bytes and digests.

Output: ``--format oci`` writes a layout directory, or an OCI archive when PATH
ends in ``.tar``; ``--format docker-archive`` writes what ``docker save`` does. A
layout directory that exists gets the image added (its entry with the same name is
replaced); archives are written beside PATH and renamed into place when complete.
"""
import hashlib
import json
import os
import shutil
import tarfile
import tempfile

from ..errors import InvalidInput
from ..ids import SCRATCH
from .dockerarchive import manifest_entry
from .layout import (ANNOTATION_CONTAINERD_NAME, ANNOTATION_REF, MT_CONFIG, MT_INDEX, MT_LAYER, MT_MANIFEST,
                     LAYOUT_VERSION, blob_path, canonical_json)
from .platform import host_platform
from .refs import RefStore
from .source import parse_json

FORMATS = ("oci", "docker-archive")
CHUNK = 1 << 20


def save(images, store, ref_text, output, *, fmt="oci", progress=None):
    """Write image ``ref_text`` (a reference or an image ID) of ``store`` to ``output``.
    Returns the manifest's digest."""
    if fmt not in FORMATS:
        raise InvalidInput(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
    refs = RefStore(images, store)
    ref = refs.resolve(ref_text)
    chain = list(reversed(images.ancestors(store, ref.image))) + [ref.image]
    chain = [i for i in chain if i != SCRATCH]
    by_id = ref.name == ref.image           # saved by image ID: under every name it has
    names = refs.refs_of(ref.image) if by_id else [ref.name]
    if by_id and names:
        ref = refs.get(names[0])
    config = json.loads(refs.blob(ref.config)) if ref.config else _minimal_config()

    sink = TarSink(output) if fmt == "docker-archive" or output.endswith(".tar") else DirSink(output)
    try:
        if fmt == "oci":
            sink.put_bytes("oci-layout", canonical_json(LAYOUT_VERSION))
        layers = []
        for n, image_id in enumerate(chain, 1):
            parent = images.get_image(store, image_id).parent
            label = f"layer {n}/{len(chain)} {image_id[:12]}"
            layers.append(_export_layer(images, store, image_id, parent, sink, fmt, label, progress))
        diff_ids = [d for d, _ in layers]
        config = dict(config)
        config["rootfs"] = {"type": "layers", "diff_ids": diff_ids}
        config_bytes = canonical_json(config)
        config_digest = _digest(config_bytes)
        if fmt == "docker-archive":
            sink.put_bytes(f"{config_digest.split(':', 1)[1]}.json", config_bytes)
            sink.put_bytes("manifest.json", canonical_json([manifest_entry(config_digest, diff_ids, names)]))
            sink.put_bytes("repositories", canonical_json(_repositories(names, diff_ids)))
            manifest_digest = config_digest
        else:
            sink.put_bytes(blob_path(config_digest), config_bytes)
            manifest = {"schemaVersion": 2, "mediaType": MT_MANIFEST,
                        "config": {"mediaType": MT_CONFIG, "digest": config_digest, "size": len(config_bytes)},
                        "layers": [{"mediaType": MT_LAYER, "digest": d, "size": size} for d, size in layers]}
            manifest_bytes = canonical_json(manifest)
            manifest_digest = _digest(manifest_bytes)
            sink.put_bytes(blob_path(manifest_digest), manifest_bytes)
            descriptor = {"mediaType": MT_MANIFEST, "digest": manifest_digest, "size": len(manifest_bytes)}
            if names:
                name = names[0]
                descriptor["annotations"] = {ANNOTATION_CONTAINERD_NAME: name,
                                             ANNOTATION_REF: name.rpartition(":")[2]}
            sink.put_bytes("index.json", canonical_json(_index(sink, descriptor)))
        sink.commit()
    except BaseException:
        sink.abort()
        raise
    return manifest_digest


def _export_layer(images, store, image_id, parent, sink, fmt, label, progress):
    """Export one layer's diff into the sink; (diffID, size)."""
    from ..export import export_diff

    new = images.tree(store, image_id)
    old = images.tree(store, parent) if parent is not None else None
    if progress is not None:
        progress.start(label, None)
    h, size = hashlib.sha256(), 0
    tmp = sink.temp_file()
    try:
        with open(tmp, "wb") as f:
            for chunk in export_diff(new, old):
                f.write(chunk)
                h.update(chunk)
                size += len(chunk)
                if progress is not None:
                    progress.update(len(chunk))
        digest = f"sha256:{h.hexdigest()}"
        name = f"{digest.split(':', 1)[1]}.tar" if fmt == "docker-archive" else blob_path(digest)
        sink.put_file(name, tmp)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if progress is not None:
            progress.done()
    return digest, size


def _digest(data):
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def _minimal_config():
    host = host_platform()
    return {"architecture": host.architecture, "os": host.os, "config": {}}


def _repositories(names, diff_ids):
    out = {}
    for name in names:
        repo, _, tag = name.rpartition(":")
        out.setdefault(repo, {})[tag] = diff_ids[-1].split(":", 1)[1] if diff_ids else ""
    return out


def _index(sink, descriptor):
    """index.json: the existing layout's entries (another name kept, the same name replaced) plus ours."""
    manifests = []
    existing = sink.existing_index()
    if existing is not None:
        mine = (descriptor.get("annotations") or {}).get(ANNOTATION_CONTAINERD_NAME)
        for m in existing.get("manifests", []):
            theirs = (m.get("annotations") or {}).get(ANNOTATION_CONTAINERD_NAME)
            if m.get("digest") == descriptor["digest"] or (mine is not None and theirs == mine):
                continue
            manifests.append(m)
    manifests.append(descriptor)
    return {"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": manifests}


# --- where the files go ---------------------------------------------------------------------
class DirSink:
    """An OCI layout directory (new, or an existing layout that gets the image added)."""

    def __init__(self, root):
        self.root = root
        if os.path.exists(root):
            if not os.path.isdir(root):
                raise InvalidInput(f"{root}: exists and is not a directory")
            if os.listdir(root) and not os.path.exists(os.path.join(root, "oci-layout")):
                raise InvalidInput(f"{root}: exists and is not an OCI image layout")
        os.makedirs(os.path.join(root, "blobs", "sha256"), exist_ok=True)

    def temp_file(self):
        fd, path = tempfile.mkstemp(prefix=".imagefs-layer-", dir=self.root)
        os.close(fd)
        return path

    def put_file(self, name, tmp):
        os.replace(tmp, os.path.join(self.root, name))

    def put_bytes(self, name, data):
        path = os.path.join(self.root, name)
        with open(path + ".part", "wb") as f:
            f.write(data)
        os.replace(path + ".part", path)

    def existing_index(self):
        path = os.path.join(self.root, "index.json")
        if not os.path.exists(path):
            return None
        with open(path, "rb") as f:
            return parse_json(f.read(), path)

    def commit(self):
        pass

    def abort(self):
        pass


class TarSink:
    """An archive: entries appended in the order written, with fixed headers; written to
    ``PATH.part`` and renamed to PATH once complete."""

    def __init__(self, path):
        self.path = path
        self.part = f"{path}.part"
        if os.path.isdir(path):
            raise InvalidInput(f"{path}: is a directory; an archive is written to a file")
        self.tmpdir = tempfile.mkdtemp(prefix=".imagefs-save-", dir=os.path.dirname(os.path.abspath(path)))
        self.tar = tarfile.open(self.part, "w", format=tarfile.PAX_FORMAT)
        self.dirs = set()

    def temp_file(self):
        fd, path = tempfile.mkstemp(dir=self.tmpdir)
        os.close(fd)
        return path

    def _info(self, name, size):
        for i in range(1, name.count("/") + 1):
            d = "/".join(name.split("/")[:i])
            if d not in self.dirs:
                self.dirs.add(d)
                self.tar.addfile(_header(d + "/", 0, tarfile.DIRTYPE, 0o755))
        return _header(name, size, tarfile.REGTYPE, 0o644)

    def put_file(self, name, tmp):
        with open(tmp, "rb") as f:
            self.tar.addfile(self._info(name, os.fstat(f.fileno()).st_size), f)
        os.unlink(tmp)

    def put_bytes(self, name, data):
        import io
        self.tar.addfile(self._info(name, len(data)), io.BytesIO(data))

    def existing_index(self):
        return None

    def commit(self):
        self.tar.close()
        os.replace(self.part, self.path)
        shutil.rmtree(self.tmpdir, ignore_errors=True)

    def abort(self):
        self.tar.close()
        if os.path.exists(self.part):
            os.unlink(self.part)
        shutil.rmtree(self.tmpdir, ignore_errors=True)


def _header(name, size, kind, mode):
    info = tarfile.TarInfo(name)
    info.size, info.type, info.mode = size, kind, mode
    info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
    return info
