"""Errors only the mount has, each with the errno a file operation should fail with."""
import errno

from ..errors import ImageFSError, InUse, InvalidInput


class NotEmpty(InUse):
    """rmdir of a store that still holds images."""
    errno = errno.ENOTEMPTY


class IsADirectory(InvalidInput):
    errno = errno.EISDIR


class PermissionDenied(InvalidInput):
    """Opening an import file for reading: imports are write-only."""
    errno = errno.EACCES


class NotSupported(InvalidInput):
    """An xattr name imagefs does not keep on that node."""
    errno = errno.ENOTSUP


class NoAttr(ImageFSError):
    errno = errno.ENODATA


class Unseekable(InvalidInput):
    """Imports are written and exports read front to back."""
    errno = errno.ESPIPE


class Canceled(ImageFSError):
    """An import or export cut short because the mount is going away."""
    errno = errno.ECANCELED


class TooManyOpen(ImageFSError):
    """A limit on open exports was reached."""
    errno = errno.EMFILE
