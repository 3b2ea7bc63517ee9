"""The read API of one sealed image: the ext4 inside its VMDK chain, as inodes.

``ImageTree`` answers lookup, stat, readdir, readlink, read and xattr questions by
ext4 inode number (the root is 2), in-process and unprivileged, over a
``DiskChain``. Inodes, directories, symlinks and file data are read by
``imagefs.ext4`` (struct over inode-table blocks, extent maps, preads of the
chain); xattrs and the rare block-mapped (ext2/3 style) files by dissect.extfs.
Inode numbers are the ext4 ones, so they are stable, and hardlinks share one.

Sealed images never change, so every answer is kept in a ``Cache`` (shared by all
the trees of a mount, see imagefs/cache.py). dissect's parser keeps a file
position, so each thread gets its own parser over the shared (pread-based) chain.
"""
import itertools
import struct
import threading

from dissect.extfs import ExtFS
from dissect.extfs import exceptions as extfs_errors

from . import ext4
from .cache import Cache
from .errors import CorruptDisk, InvalidInput, NotFound
from .ext4 import Stat  # noqa: F401 - the read API's stat type

ROOT_INO = 2
# dissect's complaints about a broken (or unsupported: NotImplementedError) filesystem
_READ_ERRORS = (extfs_errors.Error, EOFError, ValueError, KeyError, IndexError, struct.error, NotImplementedError)
_tokens = itertools.count(1)

# what one cached answer costs, roughly in bytes of memory
_STAT_COST = 400
_ENTRY_COST = 200


class ImageTree:
    """Read-only inode-level access to the ext4 filesystem inside a disk chain."""

    def __init__(self, chain, name=None, cache=None, token=None):
        """``token`` keys this tree's entries in ``cache``: one per image incarnation (a tree of
        the same sealed image opened again may use the same), a new one by default."""
        self.chain = chain
        self.name = name or chain.layers[0].path
        self.cache = cache if cache is not None else Cache(8 << 20)
        self._token = next(_tokens) if token is None else token
        self._local = threading.local()
        try:
            self.geo = ext4.Geometry(chain, self.cache, self._token)
        except CorruptDisk as e:
            raise CorruptDisk(f"{self.name}: {e}") from None
        if self.geo.inode_size != 256:
            raise CorruptDisk(f"{self.name}: ext4 inode size {self.geo.inode_size} is not supported (need 256)")
        self.block_size = self.geo.block_size
        self.inodes_total = self.geo.inodes_count
        self.label = self.geo.label

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
        if node.inode.i_flags & ext4.INLINE_DATA_FL:
            raise CorruptDisk(f"{self.name}: inode {ino} uses inline_data, which is not supported")
        return node

    # --- the API (each answer cached) --------------------------------------------------
    def _cached(self, kind, ino, make, cost):
        return self.cache.get((self._token, kind, ino), make, cost)

    def _raw_inode(self, ino):
        """The 256-byte on-disk inode record."""
        if not self.geo.in_use(ino):
            raise CorruptDisk(f"{self.name}: inode number {ino} out of range")
        try:
            return self.geo.record(ino)
        except CorruptDisk as e:
            raise CorruptDisk(f"{self.name}: {e}") from None

    def stat(self, ino):
        return self._cached("stat", ino, lambda: self._stat(ino), _const(_STAT_COST))

    def _stat(self, ino):
        try:
            return ext4.decode_stat(self._raw_inode(ino), ino, self.block_size)
        except CorruptDisk as e:
            raise CorruptDisk(f"{self.name}: {e}") from None

    def readdir(self, ino):
        """Entries of directory ``ino`` as a tuple of (name bytes, inode), without . and .."""
        return self._cached("dir", ino, lambda: self._readdir(ino), _per_entry)

    def entries(self, ino):
        """Entries of directory ``ino`` as a tuple of (name bytes, Stat)."""
        return self._cached("entries", ino, lambda: self._entries(ino), _per_entry)

    def _entries(self, ino):
        # the children's records straight from the inode table (readdir checked their numbers),
        # not one cache entry per child: a listing is what a walk asks for, once
        children, bs = self.readdir(ino), self.block_size
        try:
            records = self.geo.records([child for _, child in children])
            out = tuple((name, ext4.decode_stat(rec, child, bs)) for (name, child), rec in zip(children, records))
            for (_, st), rec in zip(out, records):
                if st.is_dir:
                    ext4.advise_dir_blocks(self.geo, rec)   # the walk lists the subdirectories next
            return out
        except CorruptDisk as e:
            raise CorruptDisk(f"{self.name}: directory inode {ino}: {e}") from None

    def _readdir(self, ino):
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

    def _index(self, ino):
        return self._cached("index", ino, lambda: dict(self.readdir(ino)), _per_entry)

    def lookup(self, dir_ino, name):
        """Inode number of ``name`` (bytes) in directory ``dir_ino``; NotFound if absent."""
        found = self.find(dir_ino, name)
        if found is None:
            raise NotFound(f"{name.decode('utf-8', 'replace')}: no such entry")
        return found

    def find(self, dir_ino, name):
        """Inode number of ``name`` in directory ``dir_ino``, None if absent. A directory that
        cannot be read raises (NotFound too, when a layer file was deleted or replaced)."""
        if name == b".":
            return dir_ino
        return self._index(dir_ino).get(name)

    def resolve(self, path):
        """Inode of a path inside the image ('/' separated, symlinks not followed)."""
        if isinstance(path, str):
            path = path.encode("utf-8", "surrogateescape")
        ino = ROOT_INO
        for part in path.split(b"/"):
            if part:
                ino = self.lookup(ino, part)
        return ino

    def readlink(self, ino):
        return self._cached("link", ino, lambda: self._readlink(ino), lambda v: 100 + len(v))

    def _readlink(self, ino):
        st = self.stat(ino)
        if not st.is_lnk:
            raise InvalidInput(f"inode {ino} is not a symlink")
        if st.size > ext4.MAX_SYMLINK:
            raise CorruptDisk(f"{self.name}: symlink inode {ino} claims {st.size} bytes")
        rec = self._raw_inode(ino)
        if st.size < 60 and not ext4.flags_of(rec) & ext4.EXTENTS_FL:
            return rec[0x28:0x28 + st.size]             # a fast symlink: the target is in i_block
        return self.read(ino, 0, st.size)

    def xattrs(self, ino):
        """All xattrs of ``ino`` as getxattr shows them: a dict of name bytes to value bytes."""
        return self._cached("xattrs", ino, lambda: self._xattrs(ino),
                            lambda v: 100 + sum(len(k) + len(x) + 100 for k, x in v.items()))

    def _xattrs(self, ino):
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
        """``size`` bytes of file (or symlink) ``ino`` from ``offset`` (short at end of file). Thread-safe."""
        fmap = self.file_map(ino)
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

    def advise(self, ino, offset, size):
        """Hint that ``size`` bytes of file ``ino`` from ``offset`` will be read soon (read-ahead
        of the layer files; nothing for block-mapped files)."""
        fmap = self.file_map(ino)
        if fmap is not None:
            fmap.advise(offset, size)

    def file_map(self, ino):
        """The extent map of a regular file or symlink, or None when it is not extent-mapped."""
        return self._cached("map", ino, lambda: self._map_file(ino),
                            lambda v: 200 + (0 if v is None else 60 * len(v.runs)))

    def _map_file(self, ino):
        st = self.stat(ino)
        if not (st.is_reg or st.is_lnk):
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
        if size == 0:
            return []
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


def _const(n):
    return lambda _value: n


def _per_entry(value):
    return 100 + _ENTRY_COST * len(value)
