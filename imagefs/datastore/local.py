"""The embedded default backend: a directory on this host.

Host files are the datastore's own files (no staging), the lock is flock(2) on a lock
file (it holds for every process of this host; a directory shared with other hosts
over a network filesystem needs that filesystem's flock), and ``walk`` is one scandir pass.

Everything that changes the datastore (make, write, replace, remove, lock) refuses
a path with a symbolic link anywhere below the root: a datastore where someone
replaced ``images/<id>`` or ``.lock`` by a link must not make imagefs delete or
create files elsewhere. Paths never leave the root ('..' cannot climb out).
"""
import errno
import fcntl
import fnmatch
import os
import shutil
import stat
from contextlib import contextmanager

from ..errors import Exists, ImageFSError, NotFound
from .base import Datastore, FileInfo, ReadHandle


class LocalReadHandle(ReadHandle):
    fd = -1

    def __init__(self, path):
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)

    def pread(self, offset, length):
        return os.pread(self.fd, length, offset)

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    __del__ = close

    def advise(self, offset, length):
        if self.fd >= 0:
            os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_WILLNEED)

    def identity(self):
        st = os.fstat(self.fd)
        return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


class LocalDatastore(Datastore):
    name = "local"
    # parent hints may name any datastore ("/vmfs/volumes/<name>/...", "[<name>] ..."):
    # a local directory is often a copy of a VMFS datastore whose name is not known here
    hint_names = None

    def __init__(self, root):
        self.root = os.path.abspath(root)
        self.url = self.root
        try:
            os.makedirs(self.root, exist_ok=True)
        except OSError as e:
            raise ImageFSError(f"{self.root}: cannot use as a datastore: {e.strerror}") from None

    @classmethod
    def open(cls, spec, options):
        """From a path or file:// URL; the remote backends' options mean nothing here."""
        return cls(spec[len("file://"):] if spec.startswith("file://") else spec)

    def local_path(self, path):
        rel = os.path.normpath(path.lstrip("/"))
        if rel == ".." or rel.startswith("../"):
            raise ImageFSError(f"{path}: lies outside the datastore")
        return os.path.join(self.root, rel) if rel != "." else self.root

    def _unlinked_path(self, path):
        """local_path, after checking that no component below the root is a symbolic link."""
        p = self.local_path(path)
        here = self.root
        for part in os.path.relpath(p, self.root).split(os.sep):
            if part == ".":
                continue
            here = os.path.join(here, part)
            try:
                if stat.S_ISLNK(os.lstat(here).st_mode):
                    raise ImageFSError(f"{path}: {os.path.relpath(here, self.root)} in the datastore is a "
                                       "symbolic link; imagefs does not follow links when changing it")
            except FileNotFoundError:
                break
        return p

    @contextmanager
    def host_files(self, paths, zero=()):
        hosts = [self.local_path(p) for p in paths]
        for path, host in zip(paths, hosts):
            if not os.path.isfile(host):
                raise NotFound(f"{path}: no such file")
        yield hosts

    @contextmanager
    def new_host_dir(self, path):
        host = self.local_path(path)
        if not os.path.isdir(host):
            raise NotFound(f"{path}: no such directory")
        yield host

    @contextmanager
    def edit_host_file(self, path):
        """In place, with a copy beside it to put back on failure."""
        host = self.local_path(path)
        backup = f"{host}.edit-backup"
        try:
            shutil.copyfile(host, backup)
        except FileNotFoundError:
            raise NotFound(f"{path}: no such file") from None
        try:
            yield host
        except BaseException:
            os.replace(backup, host)
            raise
        os.unlink(backup)

    def walk(self, path, pattern="*"):
        top = self.local_path(path)
        if not os.path.isdir(top):
            raise NotFound(f"{path}: no such directory")
        out, todo = {}, [""]
        while todo:
            rel = todo.pop()
            try:
                entries = list(os.scandir(os.path.join(top, rel)))
            except FileNotFoundError:
                continue        # removed while walked
            for e in entries:
                name = os.path.join(rel, e.name) if rel else e.name
                try:
                    is_dir = e.is_dir(follow_symlinks=False)
                    if is_dir:
                        todo.append(name)
                    if pattern != "*" and not fnmatch.fnmatchcase(e.name, pattern):
                        continue
                    st = e.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                out[name] = FileInfo(0 if is_dir else st.st_size, st.st_mtime_ns, is_dir)
        return out

    def is_link(self, path):
        """Is ``path`` a symbolic link (which imagefs never follows when changing the datastore)?"""
        return os.path.islink(self.local_path(path))

    def mkdir(self, path, parents=False):
        p = self._unlinked_path(path)
        try:
            if parents:
                os.makedirs(p, exist_ok=True)
            else:
                os.mkdir(p)
        except FileExistsError:
            raise Exists(f"{path}: already exists") from None
        except FileNotFoundError:
            raise NotFound(f"{os.path.dirname(path)}: no such directory") from None

    def listdir(self, path):
        try:
            return sorted(os.listdir(self.local_path(path)))
        except FileNotFoundError:
            raise NotFound(f"{path}: no such directory") from None

    def is_dir(self, path):
        return os.path.isdir(self.local_path(path))

    def exists(self, path):
        return os.path.lexists(self.local_path(path))

    def size(self, path):
        try:
            return os.stat(self.local_path(path)).st_size
        except FileNotFoundError:
            raise NotFound(f"{path}: no such file") from None

    def read_file(self, path):
        try:
            with open(self.local_path(path), "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise NotFound(f"{path}: no such file") from None

    def write_file(self, path, data):
        p = self._unlinked_path(path)
        tmp = f"{p}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
        dfd = os.open(os.path.dirname(p), os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def sync(self, path):
        fd = os.open(self.local_path(path), os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def remove(self, path, missing_ok=True):
        try:
            os.unlink(self._unlinked_path(path))
        except FileNotFoundError:
            if not missing_ok:
                raise NotFound(f"{path}: no such file") from None

    def copy_file(self, src, dst):
        try:
            shutil.copyfile(self.local_path(src), self._unlinked_path(dst))
        except FileNotFoundError:
            raise NotFound(f"{src}: no such file") from None

    def replace(self, src, dst):
        try:
            os.replace(self._unlinked_path(src), self._unlinked_path(dst))
        except FileNotFoundError:
            raise NotFound(f"{src}: no such file") from None

    def rmtree(self, path, missing_ok=True):
        p = self._unlinked_path(path)
        if not os.path.lexists(p):
            if missing_ok:
                return
            raise NotFound(f"{path}: no such directory")
        shutil.rmtree(p)

    def open_read(self, path, known=None):
        try:
            return LocalReadHandle(self.local_path(path))
        except FileNotFoundError:
            raise NotFound(f"{path}: no such file") from None

    def statfs(self):
        st = os.statvfs(self.root)
        return st.f_blocks * st.f_frsize, st.f_bfree * st.f_frsize, st.f_bavail * st.f_frsize

    @contextmanager
    def lock(self, path, exclusive=True, blocking=True):
        """flock on a lock file; yields False if non-blocking and someone else holds it."""
        flags = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | (0 if blocking else fcntl.LOCK_NB)
        while True:
            p = self._unlinked_path(path)
            try:
                fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
            except FileNotFoundError:       # its directory is gone (deleted, maybe while this waited)
                raise NotFound(f"{os.path.dirname(path)}: no such directory") from None
            except OSError as e:
                if e.errno != errno.ELOOP:
                    raise
                raise ImageFSError(f"{path}: is a symbolic link; imagefs does not follow links when locking") from None
            try:
                try:
                    fcntl.flock(fd, flags)
                except BlockingIOError:
                    yield False
                    return
                # While this waited, the holder may have removed the lock file (a deleted store)
                # and another process made it anew: a lock on the old file excludes nobody.
                if not _same_file(fd, p):
                    continue
                yield True
                return
            finally:
                os.close(fd)


def _same_file(fd, path):
    """Whether ``path`` still names the file open as ``fd``."""
    try:
        now = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    st = os.fstat(fd)
    return (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)
