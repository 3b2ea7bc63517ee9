"""Raw ext4 structures read straight off a DiskChain.

ImageTree (stat, readdir, xattr presence) and the export build on these:
* The diff's fast path needs to know *where on the disk* an inode's record, its
  external xattr block and (for directories and symlinks) its extent tree and data
  blocks lie, to test them against the grains a child layer wrote; dissect hides
  block positions. Reading inode tables and directory blocks in bulk here is also
  much cheaper than parsing every inode through dissect.
* The tar writer reads file content straight from the extents (several times
  faster than opening each file through dissect when there are many small ones).
* ``has_xattrs`` lets readers skip dissect for the many inodes that have none, and
  ``vfs_acl`` gives POSIX ACLs in the form getxattr shows, not ext4's on-disk form.

Only what those need: superblock geometry, group descriptors, inode records
(``decode_stat`` is the one place an inode's fields are decoded), extent maps and
linear directory parsing (htree blocks read linearly, as every ext4 reader may),
and the codecs of device numbers and timestamps (the layer writer's debugfs pass
encodes with them). Anything unexpected raises CorruptDisk or is reported as
"unknown" (None) so the caller can fall back to the slower, general way.
"""
import bisect
import functools
import os
import stat as statmod
import struct
from typing import NamedTuple

from .errors import CorruptDisk

_SB_OFFSET = 1024
_EXT4_MAGIC = 0xEF53
_INCOMPAT_64BIT = 0x80
_RO_COMPAT_GDT_CSUM = 0x10
_RO_COMPAT_METADATA_CSUM = 0x400
_BG_INODE_UNINIT = 0x1
_HUGE_FILE_FL = 0x40000
EXTENTS_FL = 0x80000
INLINE_DATA_FL = 0x10000000
_EXTENT_MAGIC = 0xF30A
_XATTR_MAGIC = 0xEA020000
_S_IFMT = 0o170000
_S_IFDIR = 0o040000
_S_IFLNK = 0o120000
_DIRENT = struct.Struct("<IHBB")
_EXT_HEADER = struct.Struct("<HHHHI")
_EXT_ENTRY = struct.Struct("<IHHI")     # leaf: ee_block, ee_len, ee_start_hi, ee_start_lo
_EXT_INDEX = struct.Struct("<IIHH")     # index: ei_block, ei_leaf_lo, ei_leaf_hi, unused
# Bounds on what on-disk fields may make us read (they are untrusted): a group descriptor
# table up to 64 MiB, extent trees up to 65,536 blocks and 65,536 extents (a freshly
# written layer has a handful per file), directories up to 64 MiB, symlinks up to
# PATH_MAX, xattr values up to the VFS's 64 KiB.
MAX_GDT_BYTES = 64 << 20
ITABLE_READ = 64 << 10          # bytes of inode table read (and cached) at once, as ext4's own
                                # inode read-ahead: a directory's inodes mostly lie together
MAX_EXTENT_NODES = 65536
MAX_EXTENTS = 1 << 16
MAX_DIR_BYTES = 64 << 20
ADVISE_DIR_BYTES = 1 << 20      # what listing a directory announces of each subdirectory
MAX_SYMLINK = 4096
MAX_XATTR_VALUE = 65536


class Geometry:
    """Superblock and group-descriptor facts of the ext4 on a chain."""

    def __init__(self, chain, cache=None, token=None):
        self.chain = chain
        sb = chain.pread(_SB_OFFSET, 1024)
        if len(sb) < 1024 or struct.unpack_from("<H", sb, 0x38)[0] != _EXT4_MAGIC:
            raise CorruptDisk("no ext4 superblock")
        (self.inodes_count, blocks_lo, _r, _f, _fi, first_data_block, log_bs, _lc,
         blocks_per_group, _cpg, self.inodes_per_group) = struct.unpack_from("<11I", sb, 0)
        if log_bs > 6:
            raise CorruptDisk(f"superblock: block size 2**{10 + log_bs} is not an ext4 block size")
        self.block_size = 1024 << log_bs
        self.first_ino, self.inode_size = struct.unpack_from("<IH", sb, 0x54)
        self.label = sb[0x78:0x88].split(b"\0", 1)[0].decode("utf-8", "replace")
        incompat, ro_compat = struct.unpack_from("<II", sb, 0x60)
        desc_size = struct.unpack_from("<H", sb, 0xFE)[0] if incompat & _INCOMPAT_64BIT else 32
        blocks_hi = struct.unpack_from("<I", sb, 0x150)[0] if incompat & _INCOMPAT_64BIT else 0
        blocks = (blocks_hi << 32) | blocks_lo
        _check_superblock(self, blocks, first_data_block, blocks_per_group, desc_size, chain.size)
        n_groups = -(-(blocks - first_data_block) // blocks_per_group)
        if n_groups * desc_size > MAX_GDT_BYTES:
            raise CorruptDisk(f"superblock: {n_groups} block groups is more than imagefs reads")
        has_unused = bool(ro_compat & (_RO_COMPAT_GDT_CSUM | _RO_COMPAT_METADATA_CSUM))
        gdt = chain.pread((first_data_block + 1) * self.block_size, n_groups * desc_size)
        if len(gdt) != n_groups * desc_size:
            raise CorruptDisk("group descriptor table is truncated")
        self._span = max(ITABLE_READ, self.block_size)
        if cache is None:
            self._table_span = functools.lru_cache(maxsize=64)(self._read_span)
        else:       # inode-table pieces share the tree's cache (imagefs/cache.py)
            self._table_span = lambda span: cache.get((token, "itable", span), lambda: self._read_span(span),
                                                      _block_cost)
        self.inode_tables = []      # per group: first block of its inode table
        self.used_in_group = []     # per group: how many inodes from the start may be in use
        for g in range(n_groups):
            off = g * desc_size
            table = struct.unpack_from("<I", gdt, off + 8)[0]
            flags, unused = struct.unpack_from("<H", gdt, off + 0x12)[0], struct.unpack_from("<H", gdt, off + 0x1C)[0]
            if desc_size >= 64:
                table |= struct.unpack_from("<I", gdt, off + 0x28)[0] << 32
                unused |= struct.unpack_from("<H", gdt, off + 0x32)[0] << 16
            self.inode_tables.append(table)
            if has_unused and flags & _BG_INODE_UNINIT:
                self.used_in_group.append(0)
            else:
                self.used_in_group.append(self.inodes_per_group - unused if has_unused else self.inodes_per_group)

    def in_use(self, ino):
        """Could ``ino`` be an inode of this filesystem (a number within the tables)?"""
        return 1 <= ino <= min(self.inodes_count, len(self.inode_tables) * self.inodes_per_group)

    def same_layout(self, other):
        """True if inode numbers map to the same disk positions in both filesystems."""
        return (self.block_size, self.inode_size, self.inodes_per_group, self.inode_tables) == \
            (other.block_size, other.inode_size, other.inodes_per_group, other.inode_tables)

    def inode_table_ranges(self):
        """(first inode number, byte offset, byte length) of every group's whole inode table."""
        span = self.inodes_per_group * self.inode_size
        return [(g * self.inodes_per_group + 1, table * self.block_size, span)
                for g, table in enumerate(self.inode_tables)]

    def used_records(self):
        """Yield (ino, record bytes) for every inode in use (links > 0), in inode order."""
        isz = self.inode_size
        for g, count in enumerate(self.used_in_group):
            if not count:
                continue
            raw = self.chain.pread(self.inode_tables[g] * self.block_size, count * isz)
            base = g * self.inodes_per_group + 1
            for i in range(count):
                rec = raw[i * isz:(i + 1) * isz]
                ino = base + i
                if links_of(rec) and (ino == 2 or ino >= self.first_ino):
                    yield ino, rec

    def record(self, ino):
        """The raw inode record of ``ino`` (a number ``in_use`` says may exist)."""
        group, index = divmod(ino - 1, self.inodes_per_group)
        span, within = divmod(self.inode_tables[group] * self.block_size + index * self.inode_size, self._span)
        rec = self._table_span(span)[within:within + self.inode_size]
        if len(rec) != self.inode_size:
            raise CorruptDisk(f"the inode table of inode {ino} lies beyond the disk")
        return rec

    def records(self, inos):
        """The raw records of many inodes (``in_use`` numbers), each piece of table fetched once."""
        spans, isz, ipg, tables, size = {}, self.inode_size, self.inodes_per_group, self.inode_tables, self._span
        out = []
        for ino in inos:
            group, index = divmod(ino - 1, ipg)
            span, within = divmod(tables[group] * self.block_size + index * isz, size)
            data = spans.get(span)
            if data is None:
                data = spans[span] = self._table_span(span)
            rec = data[within:within + isz]
            if len(rec) != isz:
                raise CorruptDisk(f"the inode table of inode {ino} lies beyond the disk")
            out.append(rec)
        return out

    def _read_span(self, span):
        return self.chain.pread(span * self._span, self._span)     # short at the end of the disk


def _check_superblock(geo, blocks, first_data_block, blocks_per_group, desc_size, disk_size):
    """Superblock fields that size what we read must describe a filesystem that fits the disk."""
    bs = geo.block_size
    problems = [
        (not 0 < blocks_per_group <= 8 * bs, f"{blocks_per_group} blocks per group"),
        (not 0 < geo.inodes_per_group <= 8 * bs, f"{geo.inodes_per_group} inodes per group"),
        (geo.inode_size < 128 or geo.inode_size > bs or geo.inode_size & (geo.inode_size - 1),
         f"inode size {geo.inode_size}"),
        (desc_size < 32 or desc_size > 1024 or desc_size & (desc_size - 1), f"descriptor size {desc_size}"),
        (first_data_block >= blocks or blocks * bs > disk_size, f"{blocks} blocks on a disk of {disk_size} bytes"),
        (geo.inodes_count == 0, "no inodes"),
    ]
    for bad, what in problems:
        if bad:
            raise CorruptDisk(f"superblock: {what}")


class Stat(NamedTuple):
    """What stat(2) shows of an inode."""
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


# one unpack of what stat needs (offsets 0x00-0x8F): mode .. flags at 0x00-0x23, i_block and
# generation skipped, file_acl_lo and size_hi at 0x68, blocks_hi .. gid_hi at 0x74-0x7B, then
# extra_isize, checksum_hi, ctime_extra, mtime_extra, atime_extra at 0x80-0x8F
_INODE_STAT = struct.Struct("<HHIIIIIHHII68xII4xHHHH4xHHIII")


def decode_stat(rec, ino, block_size):
    """The Stat of a raw inode record; CorruptDisk for features imagefs does not read."""
    (mode, uid_lo, size_lo, atime, ctime, mtime, _dtime, gid_lo, nlink, blocks_lo, flags,
     _acl, size_hi, blocks_hi, _acl_hi, uid_hi, gid_hi,
     extra_isize, _csum, ctime_x, mtime_x, atime_x) = _INODE_STAT.unpack_from(rec)
    if flags & INLINE_DATA_FL:
        raise CorruptDisk(f"inode {ino} uses inline_data, which is not supported")
    if extra_isize < 16:
        ctime_x = mtime_x = atime_x = 0
    blocks = blocks_lo | (blocks_hi << 32)
    if flags & _HUGE_FILE_FL:
        blocks *= block_size // 512
    kind = mode & _S_IFMT
    rdev = decode_rdev(rec[0x28:0x30]) if kind in (statmod.S_IFCHR, statmod.S_IFBLK) else 0
    return Stat(ino, mode, nlink, uid_lo | (uid_hi << 16), gid_lo | (gid_hi << 16), rdev,
                size_lo | (size_hi << 32), blocks,
                decode_time(atime, atime_x), decode_time(mtime, mtime_x), decode_time(ctime, ctime_x))


def decode_rdev(i_block):
    """Device number from the start of i_block, old (16-bit) or new (32-bit) encoding, as os.makedev."""
    old, new = struct.unpack_from("<II", i_block)
    if old:
        return os.makedev((old >> 8) & 0xFF, old & 0xFF)
    return os.makedev((new & 0xFFF00) >> 8, (new & 0xFF) | ((new >> 12) & 0xFFF00))


def encode_rdev(major, minor):
    """i_block[0], i_block[1] as the kernel's ext4 stores a device number."""
    if major < 256 and minor < 256:
        return (major << 8) | minor, 0
    return 0, (minor & 0xff) | (major << 8) | ((minor & ~0xff) << 12)


def decode_time(seconds, extra):
    """Nanoseconds since the epoch: 32-bit signed seconds, plus 2 epoch bits and 30 ns bits in *_extra."""
    if seconds & 0x80000000:
        seconds -= 1 << 32
    return (seconds + ((extra & 3) << 32)) * 1_000_000_000 + (extra >> 2)


def time_extra(sec, nsec):
    """The *_extra field: nanoseconds << 2 plus the epoch bits beyond signed 32-bit seconds."""
    low = (sec + (1 << 31)) % (1 << 32) - (1 << 31)
    return (nsec << 2) | (((sec - low) >> 32) & 3)


def flags_of(rec):
    return struct.unpack_from("<I", rec, 0x20)[0]


def _block_cost(block):
    return 100 + len(block)


def mode_of(rec):
    return struct.unpack_from("<H", rec, 0)[0]


def is_dir(rec):
    return mode_of(rec) & _S_IFMT == _S_IFDIR


def size_of(rec):
    lo, = struct.unpack_from("<I", rec, 4)
    hi, = struct.unpack_from("<I", rec, 0x6C)
    return (hi << 32) | lo


def links_of(rec):
    return struct.unpack_from("<H", rec, 0x1A)[0]


def generation_of(rec):
    """i_generation: ext4 draws a new one each time an inode number is handed out."""
    return struct.unpack_from("<I", rec, 0x64)[0]


def has_xattrs(rec):
    """True if the inode has an external xattr block or an in-inode xattr area."""
    if xattr_block(rec):
        return True
    extra, = struct.unpack_from("<H", rec, 0x80)
    off = 128 + extra
    return off + 4 <= len(rec) and struct.unpack_from("<I", rec, off)[0] == _XATTR_MAGIC


ACL_NAMES = (b"system.posix_acl_access", b"system.posix_acl_default")
_ACL_SHORT_TAGS = (0x01, 0x04, 0x10, 0x20)      # USER_OBJ, GROUP_OBJ, MASK, OTHER: no id on disk


def vfs_acl(value):
    """An ACL in ext4's on-disk form (version 1, short entries) in the xattr form (version 2).

    Values already in the xattr form, or not parseable, are returned as they are.
    """
    if len(value) < 4 or struct.unpack_from("<I", value)[0] != 1:
        return value
    out, pos = [struct.pack("<I", 2)], 4
    while pos + 4 <= len(value):
        tag, perm = struct.unpack_from("<HH", value, pos)
        if tag in _ACL_SHORT_TAGS:
            ident, pos = 0xFFFFFFFF, pos + 4
        elif pos + 8 <= len(value):
            ident, = struct.unpack_from("<I", value, pos + 4)
            pos += 8
        else:
            return value
        out.append(struct.pack("<HHI", tag, perm, ident))
    return b"".join(out) if pos == len(value) else value


def check_xattr_sizes(geo, rec):
    """CorruptDisk if an xattr entry claims a value over 64 KiB (ea_inode values are read by
    their claimed size)."""
    extra, = struct.unpack_from("<H", rec, 0x80)
    areas = []
    off = 128 + extra
    if off + 4 <= len(rec) and struct.unpack_from("<I", rec, off)[0] == _XATTR_MAGIC:
        areas.append((rec, off + 4))
    block = xattr_block(rec)
    if block:
        data = geo.chain.pread(block * geo.block_size, geo.block_size)
        if len(data) == geo.block_size and struct.unpack_from("<I", data)[0] == _XATTR_MAGIC:
            areas.append((data, 32))
    for data, pos in areas:
        while pos + 16 <= len(data):
            name_len, index, value_offs, inum, value_size = struct.unpack_from("<BBHII", data, pos)
            if (name_len, index, value_offs) == (0, 0, 0):
                break
            if value_size > MAX_XATTR_VALUE:
                raise CorruptDisk(f"xattr value of {value_size} bytes")
            pos += (16 + name_len + 3) & ~3


def xattr_block(rec):
    """Block number of the inode's external xattr block, 0 if none."""
    lo, = struct.unpack_from("<I", rec, 0x68)
    hi, = struct.unpack_from("<H", rec, 0x76)
    return (hi << 32) | lo


def uses_blocks(rec):
    """True for inodes whose compared facts live in blocks: directories and slow symlinks."""
    kind = mode_of(rec) & _S_IFMT
    flags, = struct.unpack_from("<I", rec, 0x20)
    if kind == _S_IFDIR:
        return True
    return kind == _S_IFLNK and bool(flags & EXTENTS_FL or size_of(rec) >= 60)


def extent_map(geo, rec):
    """(data runs [(logical block, physical block, count)], extent-tree block numbers), or None.

    None means the inode is not extent-mapped (old block maps, inline data), which
    the caller treats as "cannot tell what changed".
    """
    flags, = struct.unpack_from("<I", rec, 0x20)
    if not flags & EXTENTS_FL or flags & INLINE_DATA_FL:
        return None
    runs, tree_blocks = [], []
    _walk_extents(geo, rec[0x28:0x28 + 60], runs, tree_blocks, depth_left=5)
    if len(set(tree_blocks)) != len(tree_blocks):
        raise CorruptDisk("extent tree uses a block twice")
    return runs, tree_blocks


def _walk_extents(geo, node, runs, tree_blocks, depth_left):
    magic, entries, _max, depth, _gen = _EXT_HEADER.unpack_from(node, 0)
    if magic != _EXTENT_MAGIC or depth_left < 0 or 12 + entries * 12 > len(node) or depth > depth_left:
        raise CorruptDisk("bad extent tree")
    if len(tree_blocks) > MAX_EXTENT_NODES or len(runs) > MAX_EXTENTS:
        raise CorruptDisk("extent tree larger than imagefs reads")
    for i in range(entries):
        off = 12 + i * 12
        if depth == 0:
            lblk, length, start_hi, start_lo = _EXT_ENTRY.unpack_from(node, off)
            if length > 32768:      # uninitialized extent: reads as zeros
                runs.append((lblk, None, length - 32768))
            else:
                runs.append((lblk, (start_hi << 32) | start_lo, length))
        else:
            _lblk, leaf_lo, leaf_hi, _ = _EXT_INDEX.unpack_from(node, off)
            block = (leaf_hi << 32) | leaf_lo
            tree_blocks.append(block)
            child = geo.chain.pread(block * geo.block_size, geo.block_size)
            if len(child) != geo.block_size or _EXT_HEADER.unpack_from(child, 0)[3] != depth - 1:
                raise CorruptDisk(f"bad extent tree block {block}")
            _walk_extents(geo, child, runs, tree_blocks, depth_left - 1)


def advise_dir_blocks(geo, rec):
    """Announce the blocks of a directory whose extents sit in its inode (the usual case):
    a walk lists it next, and by then they come from the page cache, not one cold read
    after another. A directory with an extent tree is left alone (its map needs reads),
    and so is a broken one (listing it will say so)."""
    if _EXT_HEADER.unpack_from(rec, 0x28)[3] != 0:
        return
    try:
        mapped = extent_map(geo, rec)
    except CorruptDisk:
        return
    if mapped is not None:
        bs = geo.block_size
        # at most ADVISE_DIR_BYTES each: a hostile directory size cannot flood the page cache
        for pblk, count in _dir_blocks(rec, mapped[0], bs, ADVISE_DIR_BYTES):
            geo.chain.advise(pblk * bs, count * bs)


def read_dir(geo, rec, runs):
    """Entries of a directory as [(name bytes, ino)], without '.' and '..'."""
    bs = geo.block_size
    if size_of(rec) > MAX_DIR_BYTES:
        raise CorruptDisk(f"directory of {size_of(rec)} bytes is larger than imagefs reads")
    entries = []
    for pblk, count in _dir_blocks(rec, runs, bs, MAX_DIR_BYTES):
        data = geo.chain.pread(pblk * bs, count * bs)
        for start in range(0, len(data), bs):
            _parse_dir_block(data, start, start + bs, entries)
    _check_unique(entries)
    return entries


def _dir_blocks(rec, runs, bs, max_bytes):
    """(physical block, count) of a directory's data: its extent runs cut at its size (or at
    ``max_bytes``), unwritten ones left out."""
    n_blocks = -(-min(size_of(rec), max_bytes) // bs)
    for lblk, pblk, count in runs:
        count = min(count, n_blocks - lblk)
        if count > 0 and pblk is not None:
            yield pblk, count


def parse_dir_data(data, block_size, entries):
    """Append the entries of a whole directory's data (any number of blocks) to ``entries``."""
    for start in range(0, len(data) - len(data) % block_size, block_size):
        _parse_dir_block(data, start, start + block_size, entries)
    _check_unique(entries)


def _check_unique(entries):
    """A name twice in one directory (only a corrupt one has it) would let an export write
    a symlink and then a directory of the same name that extraction follows."""
    if len({name for name, _ in entries}) != len(entries):
        raise CorruptDisk("a name appears twice in one directory")


def _parse_dir_block(data, pos, end, entries):
    big = end - pos >= 65536
    unpack, append = _DIRENT.unpack_from, entries.append     # (the walk's inner loop)
    while pos + 8 <= end:
        ino, rec_len, name_len, _ftype = unpack(data, pos)
        if big:     # ext4_rec_len_from_disk: 64 KiB blocks keep two more length bits
            rec_len = end - pos if rec_len in (0, 65535) else (rec_len & 65532) | ((rec_len & 3) << 16)
        if rec_len < 8 or pos + rec_len > end or 8 + name_len > rec_len:
            raise CorruptDisk("bad directory entry")
        if ino:
            name = data[pos + 8:pos + 8 + name_len]
            if name_len > 2 or (name != b"." and name != b".."):
                if not name_len or b"/" in name or b"\0" in name:
                    raise CorruptDisk(f"bad directory entry name {name!r}")
                append((name, ino))
        pos += rec_len


def file_content(tree, geo, ino, size, chunk):
    """Yield the ``size`` bytes of regular file ``ino``: straight from its extents when it has
    them (much faster than through dissect), else through the tree."""
    mapped = extent_map(geo, geo.record(ino))
    if mapped is not None:
        yield from read_extents(geo, mapped[0], size, chunk)
        return
    stream = tree.open(ino)
    left = size
    while left:
        data = stream.read(min(left, chunk))
        if not data:
            raise CorruptDisk(f"{tree.name}: inode {ino} ended {left} bytes before its size")
        left -= len(data)
        yield data


def read_extents(geo, runs, size, chunk):
    """Yield a file's ``size`` bytes from its extent runs, holes and unwritten extents as zeros."""
    bs = geo.block_size
    pos = 0
    for lblk, pblk, count in sorted(runs, key=lambda r: r[0]):
        start, end = lblk * bs, min(size, (lblk + count) * bs)
        if start > pos:
            yield from _zeros(min(start, size) - pos, chunk)
            pos = min(start, size)
        while pos < end:
            n = min(chunk, end - pos)
            if pblk is None:
                data = bytes(n)
            else:
                data = geo.chain.pread(pblk * bs + pos - start, n)
                if len(data) != n:
                    raise CorruptDisk(f"file data at block {pblk} lies beyond the disk")
            yield data
            pos += n
    yield from _zeros(size - pos, chunk)


class FileMap:
    """A regular file's extent runs, ready for random reads of any range."""

    def __init__(self, geo, runs, size):
        self.geo = geo
        self.size = size
        self.runs = sorted(runs, key=lambda r: r[0])
        self.starts = [r[0] for r in self.runs]

    def advise(self, offset, length):
        """Tell the disk that bytes ``[offset, offset + length)`` of the file will be read soon."""
        end = min(self.size, offset + length)
        bs = self.geo.block_size
        i = max(0, bisect.bisect_right(self.starts, offset // bs) - 1)
        for lblk, pblk, count in self.runs[i:]:
            start, stop = max(offset, lblk * bs), min(end, (lblk + count) * bs)
            if lblk * bs >= end:
                break
            if start < stop and pblk is not None:
                self.geo.chain.advise(pblk * bs + start - lblk * bs, stop - start)

    def read(self, offset, length):
        """``length`` bytes from ``offset`` (short at end of file); holes read as zeros."""
        end = min(self.size, offset + length)
        if offset >= end:
            return b""
        bs = self.geo.block_size
        out, pos = [], offset
        i = max(0, bisect.bisect_right(self.starts, offset // bs) - 1)
        while pos < end:
            if i < len(self.runs):
                lblk, pblk, count = self.runs[i]
                run_start, run_end = lblk * bs, (lblk + count) * bs
            else:
                run_start = run_end = end
            if pos < run_start:                 # a hole before the next run
                n = min(run_start, end) - pos
                out.append(bytes(n))
            elif pos >= run_end:                # this run lies before pos
                i += 1
                continue
            else:
                n = min(run_end, end) - pos
                if pblk is None:
                    out.append(bytes(n))
                else:
                    data = self.geo.chain.pread(pblk * bs + pos - run_start, n)
                    if len(data) != n:
                        raise CorruptDisk(f"file data at block {pblk} lies beyond the disk")
                    out.append(data)
                i += 1
            pos += n
        return out[0] if len(out) == 1 else b"".join(out)


def _zeros(n, chunk):
    while n > 0:
        yield bytes(min(n, chunk))
        n -= chunk
