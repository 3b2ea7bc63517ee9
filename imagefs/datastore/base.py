"""The datastore interface that the image store is written against.

A backend provides directories and files under one root. The local backend maps
them to a host directory; a vSphere backend maps them to a datastore through
pyvmomi. Tools that need real files (qemu-img, qemu-storage-daemon, mke2fs) get
them through ``local_path``.
"""
import os
import posixpath
from abc import ABC, abstractmethod
from contextlib import contextmanager
from typing import NamedTuple


class FileInfo(NamedTuple):
    size: int
    mtime_ns: int | None     # None where the backend cannot tell


class ReadHandle(ABC):
    """Positional reads of one file; safe to share between threads."""

    @abstractmethod
    def pread(self, offset, length): ...

    @abstractmethod
    def close(self): ...


class Datastore(ABC):
    url: str  # how users name this datastore (a path or ds://...)

    @abstractmethod
    def mkdir(self, path, parents=False):
        """Create a directory; Exists if it is there already (unless parents=True)."""

    @abstractmethod
    def listdir(self, path):
        """Names in a directory (sorted); NotFound if it is missing."""

    @abstractmethod
    def is_dir(self, path): ...

    @abstractmethod
    def exists(self, path): ...

    @abstractmethod
    def size(self, path):
        """Size of a file in bytes, as the datastore reports it (VIC sums these for usage)."""

    def walk(self, path):
        """Every file below directory ``path``, as {path relative to it: FileInfo}; NotFound if
        it is missing. One call, so a backend can answer it with one search of the subtree
        (the image store builds its catalogue of a store's images from one walk)."""
        out = {}
        for name in self.listdir(path):
            full = posixpath.join(path, name)
            if self.is_dir(full):
                out.update({posixpath.join(name, k): v for k, v in self.walk(full).items()})
            else:
                out[name] = FileInfo(self.size(full), None)
        return out

    @abstractmethod
    def read_file(self, path): ...

    @abstractmethod
    def write_file(self, path, data):
        """Write a whole small file atomically and durably."""

    def sync(self, path):
        """Make a file or directory (its entries) durable; a no-op where every change is
        durable once the call that made it returns."""

    @abstractmethod
    def remove(self, path, missing_ok=True): ...

    @abstractmethod
    def copy_file(self, src, dst):
        """Copy a file (dst is replaced)."""

    @abstractmethod
    def replace(self, src, dst):
        """Rename ``src`` over ``dst`` atomically."""

    @abstractmethod
    def rmtree(self, path, missing_ok=True): ...

    @abstractmethod
    def open_read(self, path) -> ReadHandle: ...

    @abstractmethod
    def local_path(self, path):
        """A host path for tools that need a real file."""

    @abstractmethod
    def statfs(self):
        """(total bytes, free bytes, available bytes) of the datastore."""

    @contextmanager
    def lock(self, path, exclusive=True, blocking=True):
        """A cross-process lock named by ``path`` (no-op where the backend has none)."""
        yield True


def default_datastore_path():
    env = os.environ.get("IMAGEFS_DATASTORE")
    if env:
        return env
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "imagefs")


def open_datastore(spec=None):
    """A datastore from a user's spec: a local directory path (default) or ds://... (vSphere)."""
    spec = spec or default_datastore_path()
    if spec.startswith("ds://") or spec.startswith("vsphere://"):
        from ..errors import InvalidInput
        raise InvalidInput(f"{spec}: the vSphere backend is not available in this build yet")
    from .local import LocalDatastore
    return LocalDatastore(spec)
