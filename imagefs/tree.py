"""The read API of one sealed image: the ext4 inside its VMDK chain, as inodes.

``ImageTree`` answers lookup, stat, readdir, readlink, read and xattr questions by
ext4 inode number (the root is 2), in-process and unprivileged, over a
``DiskChain``: inodes and directories are parsed by ``imagefs.ext4`` (struct over
cached inode-table blocks), file data, symlinks and xattrs by dissect.extfs. Inode numbers are the ext4 ones, so they are
stable, and hardlinks share one.

Sealed images never change, so answers are cached freely. dissect's parser keeps
a file position, so each thread gets its own parser over the shared (pread-based)
chain; the caches hold plain immutable values and are shared.
"""
import os
import stat as statmod
import struct
import threading
from dataclasses import dataclass
from functools import lru_cache

from dissect.extfs import ExtFS
from dissect.extfs import exceptions as extfs_errors

from . import ext4
from .errors import CorruptDisk, InvalidInput, NotFound

ROOT_INO = 2
_EXT4_HUGE_FILE_FL = 0x40000
_EXT4_INLINE_DATA_FL = 0x10000000
# dissect's complaints about a broken (or unsupported: NotImplementedError) filesystem
_READ_ERRORS = (extfs_errors.Error, EOFError, ValueError, KeyError, IndexError, struct.error, NotImplementedError)


@dataclass(frozen=True, slots=True)
class Stat:
    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    size: int
    blocks: int        # 512-byte units, as st_blocks
    atime_ns: int
    mtime_ns: int
    ctime_ns: int

    @property
    def is_dir(self):
        return statmod.S_ISDIR(self.mode)

    @property
    def is_reg(self):
        return statmod.S_ISREG(self.mode)

    @property
    def is_lnk(self):
        return statmod.S_ISLNK(self.mode)


def _rdev(i_block):
    """Device number from i_block, old (16-bit) or new (32-bit) ext2 encoding, as os.makedev."""
    old, new = struct.unpack_from("<II", i_block)
    if old:
        return _makedev((old >> 8) & 0xFF, old & 0xFF)
    return _makedev((new & 0xFFF00) >> 8, (new & 0xFF) | ((new >> 12) & 0xFFF00))


_INODE_HEAD = struct.Struct("<HHIIIIIHHII")


def _ns(seconds, extra):
    """ext4 timestamp: 32-bit seconds, plus 2 epoch bits and 30 ns bits in the extra field."""
    if seconds & 0x80000000:
        seconds -= 1 << 32
    return (seconds + ((extra & 3) << 32)) * 1_000_000_000 + (extra >> 2)


def _makedev(major, minor):
    return os.makedev(major, minor)


class ImageTree:
    """Read-only inode-level access to the ext4 filesystem inside a disk chain."""

    def __init__(self, chain, name=None):
        self.chain = chain
        self.name = name or chain.layers[0].path
        self._local = threading.local()
        try:
            self.geo = ext4.Geometry(chain)
        except CorruptDisk as e:
            raise CorruptDisk(f"{self.name}: {e}") from None
        fs = self._fs()          # fail early on a disk dissect cannot read
        sb = fs.sb
        if self.geo.inode_size != 256:
            raise CorruptDisk(f"{self.name}: ext4 inode size {self.geo.inode_size} is not supported (need 256)")
        self.block_size = self.geo.block_size
        self.blocks_total = fs.block_count
        self.blocks_free = (sb.s_free_blocks_count_hi << 32) | sb.s_free_blocks_count_lo
        self.inodes_total = self.geo.inodes_count
        self.inodes_free = sb.s_free_inodes_count
        self.label = fs.volume_name
        self.stat = lru_cache(maxsize=65536)(self._stat)
        self.readdir = lru_cache(maxsize=4096)(self._readdir)
        self._index = lru_cache(maxsize=4096)(self._dir_index)
        self.xattrs = lru_cache(maxsize=16384)(self._xattrs)
        self.readlink = lru_cache(maxsize=16384)(self._readlink)
        self._file_map = lru_cache(maxsize=4096)(self._map_file)

    # --- parser per thread --------------------------------------------------------
    def _fs(self):
        fs = getattr(self._local, "fs", None)
        if fs is None:
            try:
                fs = ExtFS(self.chain.file())
            except _READ_ERRORS as e:
                raise CorruptDisk(f"{self.name}: no readable ext4 filesystem ({e})") from None
            self._local.fs = fs
        return fs

    def _inode(self, ino):
        try:
            node = self._fs().get_inode(ino)
            node.inode  # parse now, so errors surface here
        except _READ_ERRORS as e:
            raise CorruptDisk(f"{self.name}: cannot read inode {ino} ({e})") from None
        if node.inode.i_flags & _EXT4_INLINE_DATA_FL:
            raise CorruptDisk(f"{self.name}: inode {ino} uses inline_data, which is not supported")
        return node

    # --- the API ---------------------------------------------------------------------
    def _raw_inode(self, ino):
        """The 256-byte on-disk inode record."""
        if not self.geo.in_use(ino):
            raise CorruptDisk(f"{self.name}: inode number {ino} out of range")
        try:
            return self.geo.record(ino)
        except CorruptDisk as e:
            raise CorruptDisk(f"{self.name}: {e}") from None

    def _stat(self, ino):
        raw = self._raw_inode(ino)
        (mode, uid_lo, size_lo, atime, ctime, mtime, _dtime, gid_lo, nlink, blocks_lo,
         flags) = _INODE_HEAD.unpack_from(raw)
        size_hi, = struct.unpack_from("<I", raw, 108)
        blocks_hi, _acl_hi, uid_hi, gid_hi = struct.unpack_from("<HHHH", raw, 116)
        extra_isize, = struct.unpack_from("<H", raw, 128)
        ctime_x, mtime_x, atime_x = struct.unpack_from("<III", raw, 132) if extra_isize >= 16 else (0, 0, 0)
        if flags & _EXT4_INLINE_DATA_FL:
            raise CorruptDisk(f"{self.name}: inode {ino} uses inline_data, which is not supported")
        blocks = blocks_lo | (blocks_hi << 32)
        if flags & _EXT4_HUGE_FILE_FL:
            blocks *= self.block_size // 512
        rdev = _rdev(raw[40:100]) if statmod.S_ISCHR(mode) or statmod.S_ISBLK(mode) else 0
        return Stat(
            ino=ino, mode=mode, nlink=nlink, uid=uid_lo | (uid_hi << 16), gid=gid_lo | (gid_hi << 16),
            rdev=rdev, size=size_lo | (size_hi << 32), blocks=blocks,
            atime_ns=_ns(atime, atime_x), mtime_ns=_ns(mtime, mtime_x), ctime_ns=_ns(ctime, ctime_x))

    def _readdir(self, ino):
        """Entries of directory ``ino`` as a tuple of (name bytes, inode), without . and .."""
        if not self.stat(ino).is_dir:
            raise InvalidInput(f"inode {ino} is not a directory")
        rec = self._raw_inode(ino)
        try:
            mapped = ext4.extent_map(self.geo, rec)
            if mapped is not None:
                entries = ext4.read_dir(self.geo, rec, mapped[0])
            else:   # block-mapped (ext2/3 style) directory: let dissect find the blocks
                entries = []
                ext4.parse_dir_data(self._inode(ino).open().read(), self.block_size, entries)
        except CorruptDisk as e:
            raise CorruptDisk(f"{self.name}: directory inode {ino}: {e}") from None
        except _READ_ERRORS as e:
            raise CorruptDisk(f"{self.name}: cannot read directory inode {ino} ({e})") from None
        for _name, child in entries:
            if not self.geo.in_use(child):
                raise CorruptDisk(f"{self.name}: directory inode {ino} names inode {child} out of range")
        return tuple(entries)

    def _dir_index(self, ino):
        return dict(self.readdir(ino))

    def lookup(self, dir_ino, name):
        """Inode number of ``name`` (bytes) in directory ``dir_ino``; NotFound if absent."""
        if name == b".":
            return dir_ino
        found = self._index(dir_ino).get(name)
        if found is None:
            raise NotFound(f"{name.decode('utf-8', 'replace')}: no such entry")
        return found

    def resolve(self, path):
        """Inode of a path inside the image ('/' separated, symlinks not followed)."""
        if isinstance(path, str):
            path = path.encode("utf-8", "surrogateescape")
        ino = ROOT_INO
        for part in path.split(b"/"):
            if part:
                ino = self.lookup(ino, part)
        return ino

    def _readlink(self, ino):
        node = self._inode(ino)
        if not statmod.S_ISLNK(node.inode.i_mode):
            raise InvalidInput(f"inode {ino} is not a symlink")
        if self.stat(ino).size > ext4.MAX_SYMLINK:
            raise CorruptDisk(f"{self.name}: symlink inode {ino} claims {self.stat(ino).size} bytes")
        try:
            return node.open().read()
        except _READ_ERRORS as e:
            raise CorruptDisk(f"{self.name}: cannot read symlink inode {ino} ({e})") from None

    def _xattrs(self, ino):
        """All xattrs of ``ino`` as getxattr shows them: a dict of name bytes to value bytes."""
        rec = self._raw_inode(ino)
        if not ext4.has_xattrs(rec):
            return {}
        try:
            ext4.check_xattr_sizes(self.geo, rec)
        except CorruptDisk as e:
            raise CorruptDisk(f"{self.name}: inode {ino}: {e}") from None
        try:
            return {name: ext4.vfs_acl(value) if name in ext4.ACL_NAMES else value
                    for name, value in ((x.name.encode("utf-8", "surrogateescape"), bytes(x.value))
                                        for x in self._inode(ino).xattr)}
        except _READ_ERRORS as e:
            raise CorruptDisk(f"{self.name}: cannot read xattrs of inode {ino} ({e})") from None

    def read(self, ino, offset, size):
        """``size`` bytes of file ``ino`` from ``offset`` (short at end of file). Thread-safe."""
        fmap = self._file_map(ino)
        if fmap is not None:
            try:
                return fmap.read(offset, size)
            except CorruptDisk as e:
                raise CorruptDisk(f"{self.name}: inode {ino}: {e}") from None
        stream = self.open(ino)     # block-mapped (ext2/3 style) file: dissect maps it
        stream.seek(offset)
        try:
            return stream.read(size)
        except _READ_ERRORS as e:
            raise CorruptDisk(f"{self.name}: cannot read inode {ino} ({e})") from None

    def _map_file(self, ino):
        """The extent map of a regular file, or None when it is not extent-mapped."""
        st = self.stat(ino)
        if not st.is_reg:
            raise InvalidInput(f"inode {ino} is not a regular file")
        try:
            mapped = ext4.extent_map(self.geo, self._raw_inode(ino))
        except CorruptDisk as e:
            raise CorruptDisk(f"{self.name}: inode {ino}: {e}") from None
        return None if mapped is None else ext4.FileMap(self.geo, mapped[0], st.size)

    def open(self, ino):
        """A seekable stream of the file's content (use from one thread only)."""
        node = self._inode(ino)
        try:
            return node.open()
        except _READ_ERRORS as e:
            raise CorruptDisk(f"{self.name}: cannot map the data of inode {ino} ({e})") from None

    def data_ranges(self, ino):
        """(offset, length) byte ranges of a regular file that hold data; holes are left out."""
        node = self._inode(ino)
        size = node.size
        if node.inode.i_flags & _EXT4_INLINE_DATA_FL or size == 0:
            return [(0, size)] if size else []
        try:
            runs = node.dataruns()
        except _READ_ERRORS as e:
            raise CorruptDisk(f"{self.name}: cannot map the data of inode {ino} ({e})") from None
        ranges, pos = [], 0
        for block, count in runs:
            length = count * self.block_size
            if block is not None and pos < size:
                end = min(size, pos + length)
                if ranges and ranges[-1][0] + ranges[-1][1] == pos:
                    ranges[-1] = (ranges[-1][0], end - ranges[-1][0])
                else:
                    ranges.append((pos, end - pos))
            pos += length
        return ranges

    def walk(self, ino=ROOT_INO, prefix=b""):
        """Yield (path bytes, Stat) for every entry below ``ino``, parents first, sorted by name."""
        for name, child in sorted(self.readdir(ino)):
            path = prefix + b"/" + name
            st = self.stat(child)
            yield path, st
            if st.is_dir:
                yield from self.walk(child, path)
