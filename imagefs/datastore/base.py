"""The datastore interface that the image store is written against.

A backend provides directories and files under one root: the local backend maps them
to a host directory, the vSphere backend to a folder of a vSphere datastore. Paths are
datastore-relative POSIX strings ("VIC/<store>/images/<id>/<id>.vmdk"; "" is the root).

Rules every backend keeps:
- A missing path raises ``NotFound`` (an ImageFSError that is also a FileNotFoundError);
  a taken one ``Exists``; a refused one ``PermissionDenied``.
- ``mkdir(path)`` without parents is atomic across processes and hosts: exactly one
  caller creates a name, every other gets Exists. Image IDs are claimed this way.
- ``lock()`` is a real lock for every process that shares the datastore, local or not.
- ``walk()`` lists a whole subtree with sizes in one request, so listing a store costs
  a bounded number of round trips whatever the number of images.
- Tools that need a host file (qemu-img, qemu-storage-daemon, mke2fs) get one through
  ``host_file()`` (read a sealed file) and ``new_host_file()`` (write a new one). Both
  keep the datastore's layout below one host directory, so relative parent hints
  between disks resolve on the host as they do on the datastore.
"""
from abc import ABC, abstractmethod
from contextlib import contextmanager
from typing import NamedTuple


class ReadHandle(ABC):
    """Positional reads of one file; safe to share between threads."""

    @abstractmethod
    def pread(self, offset, length): ...

    @abstractmethod
    def close(self): ...

    def advise(self, offset, length):
        """Say that ``[offset, offset + length)`` will be read soon (a hint; may do nothing)."""

    def identity(self):
        """What tells this file from another one later found under the same name (e.g. device,
        inode, size, mtime), or None where the backend cannot tell; imagefs.diskpool shares
        and reopens only files that say who they are."""
        return None


class FileInfo(NamedTuple):
    """One file or directory found by ``walk``."""
    size: int                   # bytes as the datastore reports them (0 for directories)
    mtime_ns: int | None        # None where the backend cannot tell
    is_dir: bool = False


class Datastore(ABC):
    url: str                    # how users name this datastore (a path or vsphere://...)
    name: str                   # the datastore's name in "[name] path" and ds:// URLs
    aliases: tuple = ()         # other names that mean this datastore (a VMFS uuid)
    vms = None                  # the VM inventory (owners, join) where the backend has one

    @property
    def names(self):
        """Every name under which "[name] path" and /vmfs/volumes/<name>/ mean this datastore."""
        return (self.name, *self.aliases)

    @property
    def hint_names(self):
        """The names a VMDK parent hint may give this datastore (vmdk/hints.py); None: any."""
        return self.names

    def datastore_path(self, path):
        """The "[name] path" form of a datastore-relative path."""
        return f"[{self.name}] {path}"

    def relative_path(self, ds_path):
        """The datastore-relative path of a "[name] path" on this datastore, else None."""
        name, sep, rest = ds_path.strip().removeprefix("[").partition("]")
        if not sep or name not in self.names:
            return None
        top = self.datastore_path("").partition("]")[2].strip().strip("/")
        rest = rest.strip().strip("/")
        if not top:
            return rest
        return rest[len(top) + 1:] if rest.startswith(top + "/") else None

    # --- directories and files --------------------------------------------------------------
    @abstractmethod
    def mkdir(self, path, parents=False):
        """Create a directory; Exists if it is there already (unless parents=True)."""

    @abstractmethod
    def listdir(self, path):
        """Names in a directory (sorted); NotFound if it is missing."""

    @abstractmethod
    def walk(self, path, pattern="*"):
        """Everything below directory ``path`` in one request: ``{relative path: FileInfo}``
        (relative to ``path``, directories included); NotFound if it is missing. With a
        ``pattern`` (fnmatch, on names) only the files and directories whose names match
        are listed, though every directory is searched. The image store builds its
        catalogue of a store's images from one walk."""

    @abstractmethod
    def is_dir(self, path): ...

    def is_link(self, path):
        """Is ``path`` a symbolic link? (Backends without links: never.)"""
        return False

    @abstractmethod
    def exists(self, path): ...

    @abstractmethod
    def size(self, path):
        """Size of a file in bytes, as the datastore reports it (VIC sums these for usage)."""

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
        """Rename ``src`` over ``dst`` (atomically where the backend can)."""

    @abstractmethod
    def rmtree(self, path, missing_ok=True): ...

    @abstractmethod
    def open_read(self, path, known=None) -> ReadHandle:
        """Positional reads of a file. ``known`` is the file's FileInfo from a recent walk,
        which spares a remote backend a look-up of its own."""

    @abstractmethod
    def statfs(self):
        """(total bytes, free bytes, available bytes) of the datastore."""

    # --- host files for tools ---------------------------------------------------------------
    @abstractmethod
    @contextmanager
    def host_files(self, paths, zero=()):
        """``with ds.host_files(paths) as hosts:`` host paths holding the bytes of
        ``paths``, files that no longer change (sealed layers' disks), for tools to read
        while the block lasts. Those of ``paths`` also in ``zero`` are known to hold only
        zeros (a store's empty base disk): a remote backend stages them without reading them."""

    @abstractmethod
    @contextmanager
    def new_host_dir(self, path):
        """``with ds.new_host_dir(path) as host:`` tools write new files into the host
        directory ``host``; on a clean exit every file in it is stored in the datastore
        directory ``path`` (which exists). On an exception nothing is stored."""

    @abstractmethod
    @contextmanager
    def edit_host_file(self, path):
        """``with ds.edit_host_file(path) as host:`` a tool changes an existing file in
        place (a container's read-write disk): stored on a clean exit; on an exception
        the datastore's file is left as it was."""

    # --- locking ----------------------------------------------------------------------------
    @abstractmethod
    @contextmanager
    def lock(self, path, exclusive=True, blocking=True):
        """A lock named by ``path`` that holds for every process sharing the datastore
        (other hosts included). Yields True when held; False when ``blocking`` is off
        and someone else holds it."""

    def close(self):
        """Let go of connections and caches."""


# --- the registry of URL schemes (containers/storage's driver registry in small) ---------------
_FACTORIES = {}


def register(scheme, factory):
    """Make ``scheme://...`` datastores: ``factory(spec, options) -> Datastore``.
    Scheme "" is for plain paths."""
    _FACTORIES[scheme] = factory


def schemes():
    return sorted(s for s in _FACTORIES if s)


def default_datastore_path():
    import os
    env = os.environ.get("IMAGEFS_DATASTORE")
    if env:
        return env
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "imagefs")


def open_datastore(spec=None, options=None):
    """A datastore from a user's spec: a local directory path (the default), or
    ``scheme://...`` for a registered scheme. ``options`` (a dict) are the backend's
    settings from the command line or mount options (password_file, ca_file, ...)."""
    from ..errors import InvalidInput

    spec = spec or default_datastore_path()
    scheme, sep, _ = spec.partition("://")
    if not sep or "/" in scheme:
        scheme = ""
    factory = _FACTORIES.get(scheme)
    if factory is None:
        known = ", ".join(f"{s}://" for s in schemes())
        raise InvalidInput(f"{spec}: unknown datastore scheme {scheme}:// (use a directory or {known})")
    return factory(spec, dict(options or {}))
