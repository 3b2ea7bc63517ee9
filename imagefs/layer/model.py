"""What a layer tar says the new layer holds, recorded while it is applied.

The extractor tells the model every node it makes (type, mode, owner, time, size,
link target, device number, xattrs, a digest of the data as it went by), every hard
link, every removal and every directory it emptied; the model keeps the state the tar
leads to, with later entries replacing earlier ones, whiteouts and opaque directories
applied. ``verify.py`` then reads the sealed disk and compares.

The extractor also asks the model what this layer has unpacked so far (whiteouts hide
only lower layers' content), so the model is the one record of that.

The model lives in SQLite in the work directory: a layer of a million entries costs
disk there, not memory (the mount daemon imports with bounded memory whatever the tar).
"""
import hashlib
import sqlite3
import struct
import zlib

KIND_DIR, KIND_REG, KIND_LNK, KIND_CHR, KIND_BLK, KIND_FIFO = "dir", "reg", "lnk", "chr", "blk", "fifo"
_SCHEMA = """
CREATE TABLE node (
    path BLOB PRIMARY KEY,   -- relative to the layer root, symlinks resolved; b'' is the root
    kind TEXT NOT NULL,
    inode INTEGER,           -- hardlink group (regular files and other non-directories)
    own INTEGER NOT NULL,    -- 1: an entry made or set it (attributes known); 0: this layer made it
                             -- (a parent made for an entry, a hard link); -1: a lower layer's name
                             -- of an inode this layer links to
    merged INTEGER NOT NULL, -- a directory entry merged onto a directory that was there
    perm INTEGER, uid INTEGER, gid INTEGER, atime INTEGER, mtime INTEGER,
    size INTEGER, target BLOB, rdev INTEGER, digest TEXT, xattrs BLOB
) WITHOUT ROWID;
CREATE TABLE inode (id INTEGER PRIMARY KEY, new INTEGER NOT NULL);   -- new: made by this layer
CREATE TABLE absent (path BLOB PRIMARY KEY) WITHOUT ROWID;            -- removed from below
CREATE TABLE exclusive (path BLOB PRIMARY KEY) WITHOUT ROWID;         -- emptied of lower content
"""


def _below(path: bytes) -> tuple[str, tuple]:
    """An SQL condition (and its parameters) for the paths strictly below ``path``: the keys
    from ``path/`` up to ``path0`` ("0" follows "/")."""
    if not path:
        return "path > ?", (b"",)
    return "path >= ? AND path < ?", (path + b"/", path + b"0")


def encode_xattrs(xattrs) -> bytes:
    out = []
    for name, value in sorted(xattrs):
        raw = name.encode("utf-8", "surrogateescape")
        out.append(struct.pack("<HI", len(raw), len(value)) + raw + bytes(value))
    return b"".join(out)


def decode_xattrs(blob: bytes) -> dict[bytes, bytes]:
    out, pos = {}, 0
    while pos < len(blob):
        n, m = struct.unpack_from("<HI", blob, pos)
        pos += 6
        out[blob[pos:pos + n]] = blob[pos + n:pos + n + m]
        pos += n + m
    return out


class DataDigest:
    """A digest of a file's data that skips zeros: for each 64 KiB-aligned chunk holding a
    non-zero byte, its index and CRC-32 go into a sha256. Holes and written zeros count
    alike, so a sparse file costs what it stores, not its size; CRC-32 (several GB/s)
    keeps the cost of proving a layer small and catches any lost or misplaced chunk.
    Fed ``(offset, bytes)`` in ascending, non-overlapping order."""

    CHUNK = 1 << 16
    _ZERO = bytes(CHUNK)
    _ZERO_CRC = zlib.crc32(_ZERO)

    def __init__(self):
        self._hash = hashlib.sha256()
        self._buf = bytearray(self.CHUNK)
        self._index = -1                     # the chunk in _buf (-1: none)
        self._end = 0

    def update(self, offset: int, data) -> None:
        if offset < self._end:
            raise ValueError(f"data at offset {offset} goes back before {self._end}")
        data = memoryview(data).cast("B")
        self._end = offset + len(data)
        while data:
            index, pos = divmod(offset, self.CHUNK)
            n = min(len(data), self.CHUNK - pos)
            if index != self._index:
                self._flush()
                if n == self.CHUNK:          # a whole chunk: take it where it is
                    self._take(index, data[:n])
                    data, offset = data[n:], offset + n
                    continue
                self._index = index
            self._buf[pos:pos + n] = data[:n]
            data, offset = data[n:], offset + n

    def _flush(self) -> None:
        if self._index >= 0:
            self._take(self._index, self._buf)
            self._buf[:] = self._ZERO
            self._index = -1

    def _take(self, index: int, chunk) -> None:
        crc = zlib.crc32(chunk)
        if crc == self._ZERO_CRC and bytes(chunk) == self._ZERO:
            return
        self._hash.update(struct.pack("<QI", index, crc))

    def hexdigest(self) -> str:
        self._flush()
        return self._hash.hexdigest()


class LayerModel:
    """The expected state of the paths a layer touches (see the module docstring)."""

    def __init__(self, path: str = ":memory:"):
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        for pragma in ("journal_mode=OFF", "synchronous=OFF", "temp_store=FILE", "cache_size=-1024"):
            self.db.execute(f"PRAGMA {pragma}")
        self.db.executescript(_SCHEMA)
        self.db.execute("BEGIN")
        self._next_inode = 1

    def close(self) -> None:
        self.db.close()

    # --- what the extractor asks ----------------------------------------------------------------
    def has(self, path: bytes) -> bool:
        """Did this layer unpack ``path`` (an entry, or a parent made for one)?"""
        return self.db.execute("SELECT 1 FROM node WHERE path = ? AND own >= 0", (path,)).fetchone() is not None

    def has_below(self, path: bytes) -> bool:
        """Did this layer unpack anything below ``path``?"""
        cond, args = _below(path)
        return self.db.execute(f"SELECT 1 FROM node WHERE {cond} AND own >= 0 LIMIT 1", args).fetchone() \
            is not None

    # --- what the extractor did ---------------------------------------------------------------------
    def implicit_dir(self, path: bytes) -> None:
        """A directory this layer has without an entry for it: a parent made for an entry, or a
        lower one an opaque whiteout emptied (its attributes are not the tar's to say)."""
        self._put(path, KIND_DIR, None, own=0, merged=0)

    def node(self, path: bytes, kind: str, *, perm: int, uid: int, gid: int, atime: int, mtime: int,
             size: int | None = None, target: bytes | None = None, rdev: int | None = None,
             digest: str | None = None, xattrs=(), merged: bool = False) -> None:
        """An entry made (or, a directory onto a directory, set) ``path``."""
        inode = None
        if kind != KIND_DIR:
            inode = self._new_inode(new=True)
        self._put(path, kind, inode, own=1, merged=int(merged), perm=perm, uid=uid, gid=gid, atime=atime,
                  mtime=mtime, size=size, target=target, rdev=rdev, digest=digest,
                  xattrs=encode_xattrs(xattrs))

    def link(self, path: bytes, target: bytes, kind: str) -> None:
        """``path`` is a new name of the inode at ``target`` (this layer's, or a lower one)."""
        row = self.db.execute("SELECT inode FROM node WHERE path = ?", (target,)).fetchone()
        if row is not None and row[0] is not None:
            inode = row[0]
        else:                                   # a lower layer's inode: it keeps its own metadata
            inode = self._new_inode(new=False)
            self._put(target, kind, inode, own=-1, merged=0)
        self._put(path, kind, inode, own=0, merged=0)

    def add_xattrs(self, path: bytes, xattrs) -> None:
        """Xattrs set on ``path`` after its node was recorded (the debugfs pass)."""
        row = self.db.execute("SELECT xattrs FROM node WHERE path = ?", (path,)).fetchone()
        if row is not None:
            merged = decode_xattrs(row[0] or b"")
            merged.update((n.encode("utf-8", "surrogateescape"), bytes(v)) for n, v in xattrs)
            blob = encode_xattrs((n.decode("utf-8", "surrogateescape"), v) for n, v in merged.items())
            self.db.execute("UPDATE node SET xattrs = ? WHERE path = ?", (blob, path))

    def removed(self, path: bytes, subtree: bool) -> None:
        """``path`` (and with ``subtree`` everything below) is gone from the layer's tree."""
        self.db.execute("DELETE FROM node WHERE path = ?", (path,))
        self.db.execute("DELETE FROM exclusive WHERE path = ?", (path,))
        if subtree:
            cond, args = _below(path)
            for table in ("node", "exclusive", "absent"):
                self.db.execute(f"DELETE FROM {table} WHERE {cond}", args)
        self.db.execute("INSERT OR IGNORE INTO absent VALUES (?)", (path,))

    def emptied(self, path: bytes) -> None:
        """Directory ``path`` was emptied of everything this layer did not put there."""
        if not self.has(path):
            self.implicit_dir(path)
        self.db.execute("INSERT OR IGNORE INTO exclusive VALUES (?)", (path,))

    def dir_times(self):
        """(path, atime, mtime) of every directory an entry set, for setting them last."""
        return self.db.execute("SELECT path, atime, mtime FROM node WHERE kind = ? AND own = 1",
                               (KIND_DIR,)).fetchall()

    # --- what the verifier reads ------------------------------------------------------------------------
    def nodes(self):
        cols = ("path", "kind", "inode", "own", "merged", "perm", "uid", "gid", "atime", "mtime", "size",
                "target", "rdev", "digest", "xattrs")
        cur = self.db.execute(f"SELECT {', '.join(cols)} FROM node ORDER BY path")
        for row in cur:
            yield dict(zip(cols, row))

    def inode_groups(self):
        """(new, [paths]) of every inode with more than one name, or made by this layer."""
        cur = self.db.execute("SELECT n.inode, i.new, n.path FROM node n JOIN inode i ON i.id = n.inode "
                              "ORDER BY n.inode")
        group, current, new = [], None, False
        for inode, is_new, path in cur:
            if inode != current and group:
                yield new, group
                group = []
            current, new = inode, bool(is_new)
            group.append(path)
        if group:
            yield new, group

    def absent(self):
        return (row[0] for row in self.db.execute(
            "SELECT a.path FROM absent a LEFT JOIN node n ON n.path = a.path WHERE n.path IS NULL"))

    def exclusive_dirs(self):
        return (row[0] for row in self.db.execute("SELECT path FROM exclusive ORDER BY path"))

    def children(self, path: bytes) -> set[bytes]:
        """Names directly inside ``path`` that this layer has."""
        cond, args = _below(path)
        skip = len(path) + 1 if path else 0
        out = set()
        for (child,) in self.db.execute(f"SELECT path FROM node WHERE {cond} AND own >= 0", args):
            rest = child[skip:]
            if b"/" not in rest:
                out.add(rest)
        return out

    def count(self) -> int:
        return self.db.execute("SELECT count(*) FROM node").fetchone()[0]

    # --- storage ---------------------------------------------------------------------------------------
    def _new_inode(self, new: bool) -> int:
        inode, self._next_inode = self._next_inode, self._next_inode + 1
        self.db.execute("INSERT INTO inode VALUES (?, ?)", (inode, int(new)))
        return inode

    def _put(self, path, kind, inode, *, own, merged, perm=None, uid=None, gid=None, atime=None, mtime=None,
             size=None, target=None, rdev=None, digest=None, xattrs=None):
        self.db.execute("DELETE FROM absent WHERE path = ?", (path,))
        self.db.execute("INSERT OR REPLACE INTO node VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                        (path, kind, inode, own, merged, perm, uid, gid, atime, mtime, size, target, rdev,
                         digest, xattrs))
