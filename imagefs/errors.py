"""The error types of imagefs.

Every error a user can cause or meet carries one clear line of text; the CLI prints
``str(err)`` and the FUSE adapter maps each type to an errno (``errno`` attribute).
"""
import errno as _errno


class ImageFSError(Exception):
    """Base class: a user-facing failure with a one-line message."""
    errno = _errno.EIO


class NotFound(ImageFSError, FileNotFoundError):
    """A missing path, store, image or container. Also a FileNotFoundError, so code
    written against host files (the VMDK reader's opener) catches it as such."""
    errno = _errno.ENOENT


class Exists(ImageFSError):
    errno = _errno.EEXIST


class InUse(ImageFSError):
    errno = _errno.EBUSY


class InvalidInput(ImageFSError):
    """Bad arguments or a bad archive: nothing was changed."""
    errno = _errno.EINVAL


class SumMismatch(InvalidInput):
    """The bytes received do not hash to the expected sha256."""


class CorruptDisk(ImageFSError):
    """A VMDK or the ext4 inside it cannot be trusted (bad header, broken chain)."""
    errno = _errno.EIO


class ReadOnly(ImageFSError):
    """A sealed image was asked to change."""
    errno = _errno.EROFS


class ToolFailed(ImageFSError):
    """An external tool (qemu-img, qemu-storage-daemon, mount, e2fsck...) failed."""
    errno = _errno.EIO


class NoSpace(ImageFSError):
    errno = _errno.ENOSPC


class PermissionDenied(ImageFSError):
    errno = _errno.EACCES


class Unavailable(ImageFSError):
    """A remote datastore cannot be reached or refused us (network, TLS, login)."""
    errno = _errno.EIO
