"""Reading an image source: a directory or a tar file, and the images it holds.

``open_source(path)`` tells a docker save archive (``manifest.json``), an OCI image
layout directory and an OCI archive (a tar of a layout) apart, and returns a Source
whose ``images()`` are SourceImages: their names, verified config and manifest
bytes, and layers to open one at a time. Names inside a source are confined to it
(no absolute paths, no ``..``).
"""
import json
import os
import posixpath
import tarfile
from dataclasses import dataclass, field
from typing import Callable

from ..errors import InvalidInput, NotFound


@dataclass
class SourceLayer:
    diff_id: str                   # from the config: what the uncompressed tar must hash to
    digest: str | None             # the blob's digest, where the source names one
    size: int | None               # the blob's size, where the source says it
    open: Callable                 # () -> binary file object of the blob
    what: str                      # for messages: where the blob is


@dataclass
class SourceImage:
    names: list                    # references the source gives it (name:tag)
    config: bytes                  # verified
    manifest: bytes | None         # verified OCI manifest, None for plain docker archives
    layers: list = field(default_factory=list)
    platform: dict | None = None   # the index entry's platform it was picked by, if any


class Files:
    """Named files of a source, a directory or a tar."""

    def __init__(self, path):
        self.path = path

    @staticmethod
    def clean(name):
        parts = [p for p in name.split("/") if p not in ("", ".")]
        if not parts or ".." in parts or name.startswith("/"):
            raise InvalidInput(f"unsafe path {name!r} in the image source")
        return "/".join(parts)

    def read(self, name, limit=64 << 20):
        with self.open(name) as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise InvalidInput(f"{name}: too large for a metadata file")
        return data

    def read_json(self, name):
        return parse_json(self.read(name), name)


def parse_json(data, what):
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidInput(f"{what}: not valid JSON: {e}") from None


class DirFiles(Files):
    def exists(self, name):
        return os.path.isfile(os.path.join(self.path, self.clean(name)))

    def size(self, name):
        return os.path.getsize(os.path.join(self.path, self.clean(name)))

    def open(self, name):
        try:
            return open(os.path.join(self.path, self.clean(name)), "rb")
        except FileNotFoundError:
            raise InvalidInput(f"{name}: missing from {self.path}") from None

    def close(self):
        pass


class TarFiles(Files):
    def __init__(self, path):
        super().__init__(path)
        try:
            self._tar = tarfile.open(path, "r:*")
            self._members = {}
            for m in self._tar:
                if m.isfile():
                    self._members[self.clean(m.name)] = m
                elif m.issym() or m.islnk():   # docker save links identical layers
                    self._members[self.clean(m.name)] = m
        except (tarfile.TarError, EOFError) as e:
            raise InvalidInput(f"{path}: not a readable tar: {e}") from None

    def _member(self, name):
        m = self._members.get(self.clean(name))
        for _ in range(8):
            if m is None or not (m.issym() or m.islnk()):
                break
            target = m.linkname if m.islnk() else posixpath.join(posixpath.dirname(m.name), m.linkname)
            m = self._members.get(self.clean(posixpath.normpath(target)))
        if m is None or not m.isfile():
            raise InvalidInput(f"{name}: missing from {self.path}")
        return m

    def exists(self, name):
        try:
            self._member(name)
            return True
        except InvalidInput:
            return False

    def size(self, name):
        return self._member(name).size

    def open(self, name):
        return self._tar.extractfile(self._member(name))

    def close(self):
        self._tar.close()


def open_source(path):
    """The images at ``path``: a docker save archive, an OCI layout directory or an OCI archive."""
    from .dockerarchive import DockerArchiveSource
    from .layout import OCILayoutSource

    if os.path.isdir(path):
        files = DirFiles(path)
    elif os.path.exists(path):
        files = TarFiles(path)
    else:
        raise NotFound(f"{path}: no such file or directory")
    if files.exists("manifest.json"):
        return DockerArchiveSource(files)
    if files.exists("oci-layout") and files.exists("index.json"):
        return OCILayoutSource(files)
    files.close()
    raise InvalidInput(f"{path}: neither a docker save archive (manifest.json) nor an OCI image layout "
                       "(oci-layout, index.json)")
