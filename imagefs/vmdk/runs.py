"""What every extent answers: which parts of a byte range it holds, and where.

An extent maps a range of its part of the virtual disk to *runs*
``(start, end, kind, source, where)``, positions relative to the extent's start:

- HOLE: not here, read the parent disk (zeros at the base of a chain);
- ZERO: reads as zeros, whatever the parent holds;
- DATA: ``source.pread(where + (pos - start), ...)`` reads it (``source`` has a ``path``);
- DEFLATE: a compressed grain; ``source`` is the extent, ``where`` is
  ``(grain file offset, offset of ``start`` inside the grain)``.

Sparse extents share one mapper: a grain directory points to grain tables, and a
grain table entry is decoded by the format into "hole", "zero" or a byte offset.
Long runs of contiguous grains are found with slice comparisons (C speed), so a
table of 4096 one-sector grains costs a handful of Python steps when its grains
were written in order.
"""
import struct
import threading
from array import array
from functools import lru_cache

from ..errors import CorruptDisk

SECTOR = 512
HOLE, ZERO, DATA, DEFLATE = 0, 1, 2, 3

GD_BLOCK = 1024                 # grain-directory entries read at a time
# what a header may make us read or allocate (its fields are untrusted): 64 TiB disks,
# grains up to 1 MiB, grain tables up to 4096 entries, directories up to 4 Mi entries
MAX_TABLE_ENTRIES = 4096        # entries of one grain table (the formats use 512 or 4096)
MAX_GRAIN = 1 << 20             # bytes of one grain (the formats use 512 B to 64 KiB)
MAX_CAPACITY = 1 << 46          # bytes
MAX_TABLES = 1 << 22
TABLE_CACHE = 64                # decoded grain tables kept per extent
PRIME_TABLES = TABLE_CACHE // 4 # decoded at most when tables come along with another read
TABLE_READ = 1 << 20            # bytes of adjacent grain tables read at once
TABLE_AHEAD = 64 << 10          # bytes of the tables after the ones asked for, read with them when
                                # they follow in the file: a reader (or a chain asking every layer,
                                # 16 MiB at a time) goes on to them, and qemu's 2 KiB tables would
                                # each cost a read (128 layers: 1,400 reads for a 200 MiB file)
MAX_SECTOR = 1 << 40            # 512 TiB: no VMDK structure lies beyond


def check_sector(path, sector, what):
    """Refuse a header's sector number that points beyond any real file."""
    if not 0 <= sector < MAX_SECTOR:
        raise CorruptDisk(f"{path}: {what} offset (sector {sector}) is out of range")
    return sector


def check_geometry(path, grain_size, entries, size):
    """Refuse header fields that would size allocations or loops beyond reason."""
    if not (SECTOR <= grain_size <= MAX_GRAIN) or grain_size & (grain_size - 1):
        raise CorruptDisk(f"{path}: invalid grain size {grain_size}")
    if not (1 <= entries <= MAX_TABLE_ENTRIES):
        raise CorruptDisk(f"{path}: invalid grain table size {entries}")
    if size <= 0 or size > MAX_CAPACITY:
        raise CorruptDisk(f"{path}: invalid capacity {size}")
    if -(-size // (grain_size * entries)) > MAX_TABLES:
        raise CorruptDisk(f"{path}: grain directory of more than {MAX_TABLES} entries")


class GrainMapped:
    """Base of the sparse extents: grain directory -> grain tables -> grains.

    Subclasses set ``path``, ``handle``, ``size`` (bytes), ``grain_size`` (bytes),
    ``entries`` (per table), ``n_tables``, ``gd_offset`` and ``gd_entry_size``
    (bytes), and implement ``_table_offset(gd_entry)`` (byte offset or None) and
    ``_decode(raw)`` (an array of per-grain values: 0 hole, 1 zero, else the file
    sector of the grain; sectors 0 and 1 never hold grains, headers come first).
    """
    compressed = False
    entry_size = 4
    _prime_at = None            # (offset, length): directory and tables to take in on first use

    def pread(self, offset, length):
        return self.handle.pread(offset, length)

    def advise(self, offset, length):
        _advise(self.handle, offset, length)

    def _init_maps(self):
        self._gd_blocks = {}
        self._tables = {}           # index -> decoded table, at most TABLE_CACHE
        # 1 for a table whose whole span is a hole (no table, or one of holes only), kept
        # for good (a byte a table): a deep chain of deltas asks every layer for every
        # range, and most layers hold nothing in most of them
        self._holes = bytearray(self.n_tables)
        self._zero_table = _zeros(self.entries * self.entry_size)
        self._lock = threading.Lock()

    def _prime(self, buf, at):
        """Take the grain directory and the tables that lie in ``buf`` (the file's bytes from
        offset ``at``, read with the header at open): a chain's first read then costs this
        layer no read of its own. Tables of holes only are marked; up to PRIME_TABLES others
        are decoded, the rest are read when asked for."""
        start = self.gd_offset - at
        if start < 0 or start + self.n_tables * self.gd_entry_size > len(buf):
            return
        entries = struct.unpack_from("<%d%s" % (self.n_tables, "I" if self.gd_entry_size == 4 else "Q"),
                                     buf, start)
        for block in range(0, self.n_tables, GD_BLOCK):
            self._gd_blocks[block // GD_BLOCK] = entries[block:block + GD_BLOCK]
        nbytes, decoded = len(self._zero_table), 0
        for index, entry in enumerate(entries):
            offset = self._table_offset(entry)
            if offset is None:
                self._holes[index] = 1
            elif 0 <= offset - at and offset - at + nbytes <= len(buf):
                raw = buf[offset - at:offset - at + nbytes]
                if raw == self._zero_table:
                    self._holes[index] = 1
                elif decoded < PRIME_TABLES:
                    decoded += 1
                    self._remember(index, self._table_from(raw))

    def prime_later(self, offset, length):
        """Take the directory and tables in [offset, offset + length) of the file on first
        use, with one read; the datastore is told now that it will be read (a chain opening
        128 layers has all their reads in flight while it opens the rest)."""
        self._prime_at = (offset, length)
        _advise(self.handle, offset, length)

    def _take_prime(self):
        where, self._prime_at = self._prime_at, None
        if where is not None:
            self._prime(self.handle.pread(*where), where[0])

    def _table_from(self, raw):
        """A table's raw bytes decoded, or None when it holds holes only (qemu allocates
        every table of a delta: a deep chain of such deltas then costs no memory)."""
        if raw == self._zero_table:
            return None
        table = self._decode(raw)
        return None if table.count(0) == len(table) else table

    def _gd_entry(self, index):
        block, i = divmod(index, GD_BLOCK)
        entries = self._gd_blocks.get(block)
        if entries is None:
            count = min(GD_BLOCK, self.n_tables - block * GD_BLOCK)
            fmt = "<%d%s" % (count, "I" if self.gd_entry_size == 4 else "Q")
            raw = self.handle.pread(self.gd_offset + block * GD_BLOCK * self.gd_entry_size,
                                    count * self.gd_entry_size)
            if len(raw) != count * self.gd_entry_size:
                raise CorruptDisk(f"{self.path}: grain directory is truncated")
            entries = struct.unpack(fmt, raw)
            with self._lock:
                self._gd_blocks[block] = entries
        return entries[i]

    def table(self, index):
        """Decoded grain table ``index`` (an array), or None when the whole span is a hole
        (no table, or one of holes only)."""
        if self._prime_at is not None:
            self._take_prime()
        if self._holes[index]:
            return None
        try:
            return self._tables[index]
        except KeyError:
            return self._load_tables(index, index + 1)[index]

    def _load_tables(self, first, last, ahead=0):
        """Read and decode tables [first, last) that are not cached; tables that follow
        each other in the file come in one read (writers lay them out in order). Up to
        ``ahead`` tables after ``last`` come along when they continue such a read."""
        nbytes = self.entries * self.entry_size
        wanted, loaded = [], {}
        stop = min(last, self.n_tables, first + TABLE_CACHE // 2)
        for index in range(first, stop):
            if not self._holes[index] and index not in self._tables:
                offset = self._table_offset(self._gd_entry(index))
                if offset is None:
                    loaded[index] = self._remember(index, None)
                else:
                    wanted.append((offset, index))
        following = {}      # file offset -> index of a table after ``last``, not cached
        for index in range(stop, min(stop + ahead, self.n_tables) if wanted else stop):
            if not self._holes[index] and index not in self._tables:
                offset = self._table_offset(self._gd_entry(index))
                if offset is not None:
                    following[offset] = index
        wanted.sort()
        while wanted:
            group = [wanted.pop(0)]
            while wanted and wanted[0][0] == group[-1][0] + nbytes and len(group) * nbytes < TABLE_READ:
                group.append(wanted.pop(0))
            while group[-1][0] + nbytes in following and len(group) * nbytes < TABLE_READ:
                offset = group[-1][0] + nbytes
                group.append((offset, following.pop(offset)))
            raw = self.handle.pread(group[0][0], len(group) * nbytes)
            for k, (_, index) in enumerate(group):
                part = raw[k * nbytes:(k + 1) * nbytes]
                if len(part) != nbytes:
                    raise CorruptDisk(f"{self.path}: grain table {index} is truncated")
                loaded[index] = self._remember(index, self._table_from(part))
        return loaded

    def _remember(self, index, table):
        if table is None:
            self._holes[index] = 1
            return None
        with self._lock:
            if len(self._tables) >= TABLE_CACHE:
                self._tables.pop(next(iter(self._tables)), None)
            self._tables[index] = table
        return table

    def runs(self, lo, hi):
        """Runs covering [lo, hi) of this extent (see the module docstring)."""
        out = []
        g, n = self.grain_size, self.entries
        span, step = g * n, g // SECTOR
        if self._prime_at is not None:
            self._take_prime()
        first, last = lo // span, -(-hi // span)
        if last <= self.n_tables and self._holes.find(0, first, last) < 0:
            return [(lo, hi, HOLE, None, 0)]            # nothing here (C speed: most layers of a deep chain)
        ahead = min(PRIME_TABLES, TABLE_AHEAD // (n * self.entry_size))
        self._load_tables(first, last, ahead)
        pos = lo
        while pos < hi:
            ti = pos // span
            if ti >= self.n_tables:
                raise CorruptDisk(f"{self.path}: read beyond the grain directory")
            tend = min(hi, (ti + 1) * span)
            table = self.table(ti)
            if table is None:
                _add(out, pos, tend, HOLE, None, 0)
                pos = tend
                continue
            base = ti * span
            i = (pos - base) // g
            while pos < tend:
                value = table[i]
                if self.compressed and value > 1:
                    j = i + 1       # compressed grains have sizes of their own: no runs
                else:
                    j = run_end(table, i, value, 0 if value in (0, 1) else step, n)
                end = min(tend, base + j * g)
                if value == 0:
                    _add(out, pos, end, HOLE, None, 0)
                elif value == 1:
                    _add(out, pos, end, ZERO, None, 0)
                elif self.compressed:
                    out.append((pos, end, DEFLATE, self, (value * SECTOR, pos - (base + i * g))))
                else:
                    _add(out, pos, end, DATA, self, value * SECTOR + (pos - (base + i * g)))
                pos = end
                i = j
        return out

    def allocated(self):
        """(start, end) byte ranges this extent holds itself: data or zero, not holes."""
        return held_ranges(self.runs(0, self.size))


def held_ranges(runs):
    """The (start, end) ranges of ``runs`` that are not holes, adjacent ones merged."""
    ranges = []
    for lo, hi, kind, _, _ in runs:
        if kind != HOLE:
            if ranges and ranges[-1][1] == lo:
                ranges[-1] = (ranges[-1][0], hi)
            else:
                ranges.append((lo, hi))
    return ranges


def run_end(table, i, value, step, limit):
    """The index after the run from ``i`` (below ``limit``) of entries ``value``,
    ``value + step``, ``value + 2 * step``... found by galloping slice comparisons
    (after one try of the whole rest: tables written in order are mostly one run)."""
    if i + 1 < limit and _continues(table, i + 1, limit, value + step, step):
        return limit
    good, probe = i + 1, 1
    while good < limit:
        end = min(limit, good + probe)
        if not _continues(table, good, end, value + (good - i) * step, step):
            break
        good = end
        probe *= 4
    else:
        return limit
    lo, hi = good, min(limit, good + probe)
    while lo < hi:          # first index in [good, hi) that breaks the run
        mid = (lo + hi) // 2
        if _continues(table, good, mid + 1, value + (good - i) * step, step):
            lo = mid + 1
        else:
            hi = mid
    return lo


def _continues(table, a, b, first, step):
    """table[a:b] == first, first + step, ... compared at C speed: equal entries as
    bytes, a progression as one little-endian integer (see progression())."""
    count, width = b - a, table.itemsize
    if step == 0:
        return table[a:b].tobytes() == first.to_bytes(width, "little") * count
    expected = progression(first, step, count, width)
    return expected is not None and int.from_bytes(table[a:b].tobytes(), "little") == expected


def progression(first, step, count, width):
    """first, first + step, ... (``count`` entries of ``width`` bytes) as one little-endian
    integer: first * (1 + X + X^2 ...) + step * (0 + X + 2X^2 ...) with X = 2^(8 width),
    exact (no carries) while every entry fits; None when one does not."""
    if first < 0 or first + (count - 1) * step >= 1 << (8 * width):
        return None
    ones, ramp = _patterns(width, count)
    return first * ones + step * ramp


@lru_cache(maxsize=16)
def _zeros(length):
    """One ``bytes`` of zeros per table size, shared by the extents (a table of holes only
    is compared with it; seSparse tables are 32 KiB)."""
    return bytes(length)


@lru_cache(maxsize=512)
def _patterns(width, count):
    ones = int.from_bytes((b"\1" + bytes(width - 1)) * count, "little")
    ramp = int.from_bytes(array("Q" if width == 8 else "I", range(count)).tobytes(), "little")
    return ones, ramp


def _advise(handle, offset, length):
    """Pass a read-soon hint to a handle that takes one (the datastore's do; others may not)."""
    advise = getattr(handle, "advise", None)
    if advise is not None:
        advise(offset, length)


def _add(out, start, end, kind, source, where):
    """Append a run, merging it into the previous one when it continues it."""
    if out:
        ps, pe, pk, psrc, pw = out[-1]
        if pe == start and pk == kind and psrc is source and (kind != DATA or pw + (pe - ps) == where):
            out[-1] = (ps, end, kind, psrc, pw)
            return
    out.append((start, end, kind, source, where))
