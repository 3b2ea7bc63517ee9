"""A directory tree treated as "/": every path is resolved inside it (chroot semantics).

Parent directories are opened with openat2(2) and RESOLVE_IN_ROOT, so a symlink met on
the way (``lib -> /usr/lib``, ``up -> ../../..``) is followed *inside* the root and can
never lead out of it. Callers then act on the last component with ``*at()`` calls on
the returned O_PATH fd, which never follow it.
"""
import ctypes
import errno
import os
import shutil
import stat

from ..errors import InvalidInput

_SYS_OPENAT2 = 437                  # the same number on every Linux architecture
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_IN_ROOT = 0x10
_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _openat2(dir_fd: int, path: bytes, flags: int, resolve: int) -> int:
    how = _OpenHow(flags, 0, resolve)
    while True:
        fd = _libc.syscall(ctypes.c_long(_SYS_OPENAT2), ctypes.c_long(dir_fd), ctypes.c_char_p(path),
                           ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)))
        if fd >= 0:
            return fd
        err = ctypes.get_errno()
        # EAGAIN: RESOLVE_IN_ROOT saw a concurrent rename and asks for a retry
        if err not in (errno.EINTR, errno.EAGAIN):
            raise OSError(err, os.strerror(err), os.fsdecode(path))


def split(path: bytes) -> tuple[bytes, bytes]:
    """``b"a/b/c"`` -> ``(b"a/b", b"c")``; ``b"c"`` -> ``(b"", b"c")``."""
    parent, _, base = path.rpartition(b"/")
    return parent, base


def join(parent: bytes, base: bytes) -> bytes:
    return parent + b"/" + base if parent else base


class Root:
    """An open directory that paths are resolved in, as if it were "/"."""

    def __init__(self, path: str):
        self.fd = os.open(path, _DIR_FLAGS)
        self._prefix = os.fsencode(os.readlink(f"/proc/self/fd/{self.fd}")).rstrip(b"/")

    def close(self) -> None:
        os.close(self.fd)

    def open_dir(self, rel: bytes) -> int:
        """O_PATH fd of directory ``rel`` (b"" is the root). Raises OSError (ENOENT, ENOTDIR...)."""
        return _openat2(self.fd, rel or b".", _DIR_FLAGS, _RESOLVE_IN_ROOT | _RESOLVE_NO_MAGICLINKS)

    def make_dirs(self, rel: bytes, on_create) -> int:
        """Like open_dir, but creates missing directories (0755, root-owned) and calls on_create(real_path)."""
        try:
            return self.open_dir(rel)
        except FileNotFoundError:
            pass
        fd = os.dup(self.fd)
        done = b""
        try:
            for part in rel.split(b"/"):
                done = join(done, part)
                try:
                    next_fd = self.open_dir(done)
                except FileNotFoundError:
                    try:
                        os.mkdir(part, 0o755, dir_fd=fd)
                    except FileExistsError:
                        raise InvalidInput(f"cannot create directory {os.fsdecode(done)!r}: "
                                           "a dangling symlink is in the way") from None
                    # root-owned 0755 whatever the umask or (fuse2fs unprivileged) the caller
                    os.chown(part, 0, 0, dir_fd=fd, follow_symlinks=False)
                    os.chmod(part, 0o755, dir_fd=fd)
                    on_create(join(self.real(fd), part))
                    next_fd = self.open_dir(done)
                os.close(fd)
                fd = next_fd
            return fd
        except BaseException:
            os.close(fd)
            raise

    def real(self, dir_fd: int) -> bytes:
        """The path of an open directory relative to the root, symlinks resolved (b"" = root)."""
        full = os.fsencode(os.readlink(f"/proc/self/fd/{dir_fd}"))
        return full[len(self._prefix):].lstrip(b"/")


def remove_at(dir_fd: int, name: bytes, st: os.stat_result) -> None:
    """Remove ``name`` (recursively when a directory) without following symlinks."""
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, dir_fd=dir_fd)
    else:
        os.unlink(name, dir_fd=dir_fd)
