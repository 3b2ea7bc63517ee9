"""Streaming tar reading with libarchive (through libarchive-c's ffi), bounded memory.

Only the tar format (ustar, PAX, GNU incl. sparse) and an empty stream are accepted,
compressed with gzip, bzip2, xz or zstd or not at all. Exceptions raised by the input
stream are carried through libarchive and re-raised (KeyboardInterrupt as is, OSError as
ImageFSError); libarchive's own errors become InvalidInput.
"""
import ctypes
import logging
import os
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO, Iterator

from libarchive import ffi
from libarchive.exception import ArchiveError

from ..errors import ImageFSError, InvalidInput

_FILTERS = ("gzip", "bzip2", "xz", "zstd")
_FORMATS = ("tar", "empty")
_READ_BLOCK = 1 << 20
TAR_BLOCK = 512

_lib = ffi.libarchive
# libarchive-c logs every ARCHIVE_WARN; TarStream decides about each one itself.
logging.getLogger("libarchive").setLevel(logging.ERROR)


def _bind(name, argtypes, restype):
    func = getattr(_lib, name)
    func.argtypes, func.restype = argtypes, restype
    return func


# Not exposed by libarchive-c 5.3.
_xattr_reset = _bind("archive_entry_xattr_reset", [ctypes.c_void_p], ctypes.c_int)
_xattr_next = _bind("archive_entry_xattr_next",
                    [ctypes.c_void_p, ctypes.POINTER(ctypes.c_char_p),
                     ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_size_t)], ctypes.c_int)
_acl_reset = _bind("archive_entry_acl_reset", [ctypes.c_void_p, ctypes.c_int], ctypes.c_int)
_acl_next = _bind("archive_entry_acl_next",
                  [ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int),
                   ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_char_p)],
                  ctypes.c_int)
# Where the stream stands: consumed (decompressed) bytes, and where the last header read began.
_filter_bytes = _bind("archive_filter_bytes", [ctypes.c_void_p, ctypes.c_int], ctypes.c_longlong)
_header_position = _bind("archive_read_header_position", [ctypes.c_void_p], ctypes.c_longlong)
# Fallbacks when a PAX UTF-8 name cannot be converted to the locale's charset.
_pathname_utf8 = _bind("archive_entry_pathname_utf8", [ctypes.c_void_p], ctypes.c_char_p)
_hardlink_utf8 = _bind("archive_entry_hardlink_utf8", [ctypes.c_void_p], ctypes.c_char_p)
_symlink_utf8 = _bind("archive_entry_symlink_utf8", [ctypes.c_void_p], ctypes.c_char_p)

AE_IFMT = 0o170000

# POSIX ACLs: libarchive's entry types and tags -> the Linux xattr form (version 2 records)
ACL_ACCESS_XATTR = "system.posix_acl_access"
ACL_DEFAULT_XATTR = "system.posix_acl_default"
_ACL_TYPES = ((0x100, ACL_ACCESS_XATTR), (0x200, ACL_DEFAULT_XATTR))
_ACL_TAGS = {10002: 0x01, 10001: 0x02, 10004: 0x04, 10003: 0x08, 10005: 0x10, 10006: 0x20}
_ACL_NO_ID = 0xFFFFFFFF
_ACL_MASK_TAG = 0x10


@dataclass
class Entry:
    """One tar header, decoded. Names are raw bytes, as stored."""
    name: bytes
    filetype: int                 # S_IFREG, S_IFDIR... (0 for unknown)
    perm: int                     # 07777 bits
    uid: int
    gid: int
    atime_ns: int
    mtime_ns: int
    size: int
    hardlink: bytes | None
    symlink: bytes | None
    rdev_major: int
    rdev_minor: int
    xattrs: list[tuple[str, bytes]]


class TarStream:
    """Entries of a tar stream; ``data_blocks()`` yields the current entry's (offset, memoryview).

    ``complete`` tells, once ``entries()`` is exhausted, whether the archive ended with its
    end-of-archive marker (zero blocks). libarchive also ends quietly when the input stops
    right between two members, as a ``cat`` or ``tar`` interrupted there leaves it: then
    nothing was consumed past the position where it looked for the next header.
    """

    def __init__(self, archive_p):
        self._a = archive_p
        self.complete = False

    def entries(self) -> Iterator[Entry]:
        entry_p = ffi.entry_new()
        try:
            while True:
                r = _call(ffi.read_next_header2, self._a, entry_p)
                if r == ffi.ARCHIVE_EOF:
                    self.complete = _filter_bytes(self._a, 0) - _header_position(self._a) >= TAR_BLOCK
                    return
                if r == ffi.ARCHIVE_WARN:
                    self._warned()
                yield _decode(entry_p)
        finally:
            ffi.entry_free(entry_p)

    def data_blocks(self) -> Iterator[tuple[int, memoryview]]:
        buf, size, offset = ctypes.c_void_p(), ctypes.c_size_t(), ctypes.c_longlong()
        while True:
            r = _call(ffi.read_data_block, self._a, ctypes.byref(buf), ctypes.byref(size), ctypes.byref(offset))
            if r == ffi.ARCHIVE_EOF:
                return
            if r == ffi.ARCHIVE_WARN:
                self._warned()
            if size.value:
                yield offset.value, memoryview((ctypes.c_char * size.value).from_address(buf.value)).cast("B")


    def _warned(self) -> None:
        """libarchive read the member but complained: a damaged or malformed archive (a PAX
        record it dropped, garbage it skipped) is refused, a name in a foreign charset is not."""
        msg = (ffi.error_string(self._a) or b"").decode("utf-8", "replace")
        if "can't be converted" not in msg:
            raise InvalidInput(f"bad layer archive: {msg or 'libarchive warned'}")


def _call(func, *args):
    try:
        return func(*args)
    except ArchiveError as e:
        raise InvalidInput(f"bad layer archive: {e.msg or e}") from None


@contextmanager
def open_tar(stream: BinaryIO) -> Iterator[TarStream]:
    buf = ctypes.create_string_buffer(_READ_BLOCK)
    buf_addr = ctypes.addressof(buf)
    view = memoryview(buf).cast("B")
    failure: list[BaseException] = []
    readinto = getattr(stream, "readinto", None)

    def read_cb(_archive, _context, ptrptr):
        try:
            if readinto is not None:
                n = readinto(view) or 0
            else:
                chunk = stream.read(_READ_BLOCK)
                n = len(chunk)
                view[:n] = chunk
        except BaseException as e:      # noqa: B902 - must not unwind through C
            failure.append(e)
            return -1
        ptrptr[0] = buf_addr
        return n

    callback = ffi.READ_CALLBACK(read_cb)
    archive_p = ffi.read_new()
    try:
        for name in _FILTERS:
            ffi.get_read_filter_function(name)(archive_p)
        for name in _FORMATS:
            ffi.get_read_format_function(name)(archive_p)
        try:
            _call(ffi.read_open, archive_p, None, ffi.NO_OPEN_CB, callback, ffi.NO_CLOSE_CB)
            yield TarStream(archive_p)
        except InvalidInput:
            if not failure:
                raise
            if isinstance(failure[0], OSError):
                raise ImageFSError(f"cannot read the layer stream: {failure[0].strerror or failure[0]}") \
                    from failure[0]
            raise failure[0] from None
    finally:
        ffi.read_free(archive_p)


def show_name(path: bytes | None) -> str:
    """A layer entry's name for a one-line message: quoted with its control characters
    escaped, and a huge one (a tar bomb's) cut in the middle."""
    text = os.fsdecode(path or b"")
    if len(text) > 120:
        text = f"{text[:80]}...{text[-30:]} ({len(path)} bytes)"
    return repr(text)


# Times a layer may hold, in seconds: from ext4's earliest (1901-12-13) to the last whole
# second that nanoseconds in a signed 64-bit integer reach (2262-04-11: the layer model's
# SQLite columns; ext4 itself goes on to 2446). A tar's base-256 fields go much further.
TIME_MIN = -(1 << 31)
TIME_MAX = ((1 << 63) - 1) // 1_000_000_000
TIME_RANGE = "1901-12-13 to 2262-04-11"


def _decode(e) -> Entry:
    hardlink = ffi.entry_hardlink(e) or _hardlink_utf8(e)
    symlink = ffi.entry_symlink(e) or _symlink_utf8(e)
    mtime_ns = ffi.entry_mtime(e) * 1_000_000_000 + ffi.entry_mtime_nsec(e)
    atime_ns = (ffi.entry_atime(e) * 1_000_000_000 + ffi.entry_atime_nsec(e)
                if ffi.entry_atime_is_set(e) else mtime_ns)
    xattrs = _xattrs(e)
    xattrs += _acl_xattrs(e, {name for name, _ in xattrs})
    name = ffi.entry_pathname(e) or _pathname_utf8(e) or b""
    for what, value in (("uid", ffi.entry_uid(e)), ("gid", ffi.entry_gid(e))):
        if not 0 <= value < 0xFFFFFFFF:        # (uid_t)-1 means "no change" to chown
            raise InvalidInput(f"layer entry {show_name(name)}: {what} {value} is out of range")
    for what, value in (("mtime", mtime_ns), ("atime", atime_ns)):
        if not TIME_MIN <= value // 1_000_000_000 <= TIME_MAX:
            raise InvalidInput(f"layer entry {show_name(name)}: {what} {value // 1_000_000_000} is out of range "
                               f"(a layer holds {TIME_RANGE})")
    return Entry(
        name=name,
        filetype=ffi.entry_filetype(e) & AE_IFMT,
        perm=_perm_with_mask(ffi.entry_perm(e) & 0o7777, dict(xattrs).get(ACL_ACCESS_XATTR)),
        uid=ffi.entry_uid(e),
        gid=ffi.entry_gid(e),
        atime_ns=atime_ns,
        mtime_ns=mtime_ns,
        size=ffi.entry_size(e) if ffi.entry_size_is_set(e) else 0,
        hardlink=hardlink,
        symlink=symlink,
        rdev_major=ffi.entry_rdevmajor(e),
        rdev_minor=ffi.entry_rdevminor(e),
        xattrs=xattrs,
    )


def _acl_xattrs(e, present) -> list[tuple[str, bytes]]:
    """POSIX ACLs stored as SCHILY.acl.* (bsdtar, GNU tar --acls), as the xattrs Linux keeps
    them in, unless the entry already carries those xattrs (GNU tar --xattrs)."""
    out = []
    kind, perm, tag, qual, name = (ctypes.c_int(), ctypes.c_int(), ctypes.c_int(), ctypes.c_int(),
                                   ctypes.c_char_p())
    for acl_type, xattr in _ACL_TYPES:
        if xattr in present or not _acl_reset(e, acl_type):
            continue
        records = []
        while _acl_next(e, acl_type, ctypes.byref(kind), ctypes.byref(perm), ctypes.byref(tag),
                        ctypes.byref(qual), ctypes.byref(name)) == ffi.ARCHIVE_OK:
            linux_tag = _ACL_TAGS.get(tag.value)
            if linux_tag is None:
                raise InvalidInput(f"layer entry has an ACL entry of unknown kind {tag.value}")
            ident = qual.value if linux_tag in (0x02, 0x08) else _ACL_NO_ID
            records.append((linux_tag, ident, perm.value & 7))
        if records:
            out.append((xattr, struct.pack("<I", 2) + b"".join(
                struct.pack("<HHI", t, p, i) for t, i, p in sorted(records))))
    return out


def _perm_with_mask(perm, access_acl):
    """With an access ACL that has a mask, the mode's group bits are that mask (POSIX.1e).
    libarchive puts the ACL's group:: entry there instead, and bsdtar's header stores that."""
    if not access_acl:
        return perm
    for off in range(4, len(access_acl) - 7, 8):
        tag, mask = struct.unpack_from("<HH", access_acl, off)
        if tag == _ACL_MASK_TAG:
            return (perm & ~0o070) | ((mask & 7) << 3)
    return perm


def _xattrs(e) -> list[tuple[str, bytes]]:
    out = []
    if _xattr_reset(e):
        name, value, size = ctypes.c_char_p(), ctypes.c_void_p(), ctypes.c_size_t()
        while _xattr_next(e, ctypes.byref(name), ctypes.byref(value), ctypes.byref(size)) == ffi.ARCHIVE_OK:
            data = ctypes.string_at(value.value, size.value) if size.value else b""
            out.append((name.value.decode("utf-8", "surrogateescape"), data))
    return out
