"""The embedded default backend: a directory on this host."""
import errno
import fcntl
import os
import shutil
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


class LocalDatastore(Datastore):
    def __init__(self, root):
        self.root = os.path.abspath(root)
        self.url = self.root
        try:
            os.makedirs(self.root, exist_ok=True)
        except OSError as e:
            raise ImageFSError(f"{self.root}: cannot use as a datastore: {e.strerror}") from None

    def local_path(self, path):
        return os.path.join(self.root, path.lstrip("/"))

    def mkdir(self, path, parents=False):
        p = self.local_path(path)
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

    def walk(self, path):
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
                    if e.is_dir(follow_symlinks=False):
                        todo.append(name)
                    else:
                        st = e.stat(follow_symlinks=False)
                        out[name] = FileInfo(st.st_size, st.st_mtime_ns)
                except FileNotFoundError:
                    continue
        return out

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
        p = self.local_path(path)
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
            os.unlink(self.local_path(path))
        except FileNotFoundError:
            if not missing_ok:
                raise NotFound(f"{path}: no such file") from None

    def copy_file(self, src, dst):
        shutil.copyfile(self.local_path(src), self.local_path(dst))

    def replace(self, src, dst):
        os.replace(self.local_path(src), self.local_path(dst))

    def rmtree(self, path, missing_ok=True):
        p = self.local_path(path)
        if not os.path.lexists(p):
            if missing_ok:
                return
            raise NotFound(f"{path}: no such directory")
        shutil.rmtree(p)

    def open_read(self, path):
        try:
            return LocalReadHandle(self.local_path(path))
        except FileNotFoundError:
            raise FileNotFoundError(errno.ENOENT, "no such file", path) from None

    def statfs(self):
        st = os.statvfs(self.root)
        return st.f_blocks * st.f_frsize, st.f_bfree * st.f_frsize, st.f_bavail * st.f_frsize

    @contextmanager
    def lock(self, path, exclusive=True, blocking=True):
        """flock on a lock file; yields False if non-blocking and someone else holds it."""
        fd = os.open(self.local_path(path), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            flags = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | (0 if blocking else fcntl.LOCK_NB)
            try:
                fcntl.flock(fd, flags)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)
