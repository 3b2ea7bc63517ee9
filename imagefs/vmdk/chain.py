"""A layer's disk and all its ancestors, read as one virtual disk.

The chain is opened top (the layer) down to the base, following each disk's parent
hint (resolved inside the datastore, see hints.py). Every link is checked: the
child's parentCID must be the parent's CID (qemu changes a disk's CID when it is
written, so a child of a modified parent no longer shows what it was written
against) and both must have the same capacity.

Layers may use any format and grain size. Reads go through a merged map: for each
CHUNK of the virtual disk, the runs of the topmost layer that holds each byte
(data, zeros, or the base's nothing), built once by asking each layer only for what
the layers above left open, then cached; so a read costs the same whatever the
chain's depth. Reads are positional (``pread``) and as large as the map allows.
"""
import threading
from bisect import bisect_right

from ..errors import CorruptDisk, NotFound
from .disk import Disk
from .runs import DATA, DEFLATE, HOLE, ZERO

CHUNK = 16 << 20                # bytes of virtual disk per merged-map entry
MAX_DEPTH = 4096
MAX_CACHED_CHUNKS = 4096        # merged maps kept (a 64 GiB disk read end to end)


class DiskChain:
    """``DiskChain(top_path, opener, names=None, shared=None, zero=None)``: ``opener(path)``
    returns a handle with ``pread(offset, length)`` and ``close()`` for a datastore-relative
    path; ``names`` are the datastore's names a parent hint may use (hints.py).
    ``shared(path)``, if given, returns a Disk that other chains may hold too
    (imagefs.diskpool; its owner closes it), or None for a disk this chain opens and
    closes itself. ``zero(path)`` says whether a disk is known to hold only zeros (Disk's
    ``zero``: its extents are not read). The link check still applies to such a disk: a
    child whose parentCID is not the zero disk's CID was not written against it."""

    def __init__(self, top_path, opener, names=None, shared=None, zero=None):
        self.layers = []
        self._own = []
        path = top_path
        seen = {top_path}           # the paths of self.layers, for the loop check
        try:
            while True:
                is_zero = bool(zero and zero(path))
                disk = shared(path) if shared is not None and not is_zero else None
                if disk is None:
                    disk = Disk(path, opener, names, zero=is_zero)
                    self._own.append(disk)
                if self.layers:
                    self._check_link(self.layers[-1], disk)
                self.layers.append(disk)
                if not disk.info.has_parent:
                    break
                if len(self.layers) >= MAX_DEPTH:
                    raise CorruptDisk(f"{top_path}: disk chain deeper than {MAX_DEPTH} (a loop?)")
                path = disk.info.parent_path(names)
                if path in seen:           # a loop whose CIDs agree: stop at once, not at MAX_DEPTH
                    raise CorruptDisk(f"{top_path}: its disk chain loops (back to {path})")
                seen.add(path)
        except BaseException:
            self.close()
            raise
        self.size = self.layers[0].size
        self._merged = {}
        self._lock = threading.Lock()

    @staticmethod
    def _check_link(child, parent):
        if child.parent_cid != parent.cid:
            raise CorruptDisk(
                f"{child.path}: parentCID {child.parent_cid} does not match CID {parent.cid} "
                f"of its parent {parent.path} (the parent was modified after the child was made)")
        if parent.size != child.size:
            raise CorruptDisk(f"{child.path}: capacity {child.size} differs from {parent.size} "
                              f"of its parent {parent.path}")

    @property
    def paths(self):
        return [layer.path for layer in self.layers]

    def _map(self, chunk):
        """(starts, runs) of one chunk: runs of the topmost holder of each byte."""
        merged = self._merged.get(chunk)
        if merged is None:
            lo = chunk * CHUNK
            hi = min(self.size, lo + CHUNK)
            runs, open_ranges = [], [(lo, hi)]
            for layer in self.layers:
                still_open, changed = [], False
                for a, b in open_ranges:
                    held = layer.runs(a, b)
                    if len(held) == 1 and held[0][2] == HOLE:   # nothing of this range here
                        still_open.append((a, b))
                        continue
                    changed = True
                    for run in held:
                        (still_open if run[2] == HOLE else runs).append(run[:2] if run[2] == HOLE else run)
                open_ranges = _coalesce_ranges(still_open) if changed else still_open
                if not open_ranges:
                    break
            runs.extend((a, b, ZERO, None, 0) for a, b in open_ranges)
            runs = _coalesce_runs(sorted(runs, key=lambda r: r[0]))
            merged = ([r[0] for r in runs], runs)
            with self._lock:
                if len(self._merged) >= MAX_CACHED_CHUNKS:
                    self._merged.pop(next(iter(self._merged)))
                self._merged[chunk] = merged
        return merged

    def pread(self, offset, length):
        """Read ``length`` bytes at ``offset`` of the virtual disk (short at the end)."""
        if offset >= self.size or length <= 0 or offset < 0:
            return b""
        end = min(offset + length, self.size)
        out = []
        while offset < end:
            starts, runs = self._map(offset // CHUNK)
            i = bisect_right(starts, offset) - 1
            while offset < end and i < len(runs):
                start, stop, kind, src, where = runs[i]
                take = min(end, stop) - offset
                if kind == DATA:
                    try:
                        data = src.pread(where + (offset - start), take)
                    except NotFound:
                        raise               # its image was deleted while in use (diskpool.py)
                    except OSError as err:
                        raise CorruptDisk(f"{src.path}: read failed: {err.strerror or err}") from None
                    if len(data) != take:
                        raise CorruptDisk(f"{src.path}: grain data is truncated at offset "
                                          f"{where + (offset - start)}")
                    out.append(data)
                elif kind == ZERO:
                    out.append(bytes(take))
                else:  # DEFLATE
                    grain_at, within = where
                    skip = within + (offset - start)
                    out.append(src.read_grain(grain_at)[skip:skip + take])
                offset += take
                i += 1
        return out[0] if len(out) == 1 else b"".join(out)

    def advise(self, offset, length):
        """Tell the layer files holding ``[offset, offset + length)`` of the virtual disk that
        it will be read soon (the local datastore starts reading it in the background), so
        a reader's next preads find it in memory."""
        end = min(offset + length, self.size)
        while 0 <= offset < end:
            starts, runs = self._map(offset // CHUNK)
            stop = min(end, runs[-1][1])
            for start, run_end, kind, src, where in runs[bisect_right(starts, offset) - 1:]:
                if start >= stop:
                    break
                if kind == DATA:
                    a, b = max(start, offset), min(run_end, stop)
                    src.advise(where + (a - start), b - a)
            offset = stop

    def file(self):
        """A new seekable read-only file object over the chain (one per thread)."""
        return ChainFile(self)

    def close(self):
        for layer in self._own:
            layer.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _coalesce_ranges(ranges):
    ranges.sort()
    out = []
    for a, b in ranges:
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


def _coalesce_runs(runs):
    out = []
    for run in runs:
        if out:
            ps, pe, pk, psrc, pw = out[-1]
            s, e, k, src, w = run
            if pe == s and pk == k and psrc is src and (
                    k == ZERO or (k == DATA and pw + (pe - ps) == w)):
                out[-1] = (ps, e, pk, psrc, pw)
                continue
        out.append(run)
    return out


class ChainFile:
    """A file-like view (read/seek/tell) of a DiskChain with its own position."""

    def __init__(self, chain):
        self.chain = chain
        self.pos = 0
        self.size = chain.size

    def read(self, n=-1):
        if n is None or n < 0:
            n = self.chain.size - self.pos
        data = self.chain.pread(self.pos, n)
        self.pos += len(data)
        return data

    def readinto(self, buf):
        data = self.read(len(buf))
        buf[:len(data)] = data
        return len(data)

    def seek(self, offset, whence=0):
        if whence == 0:
            self.pos = offset
        elif whence == 1:
            self.pos += offset
        else:
            self.pos = self.chain.size + offset
        return self.pos

    def tell(self):
        return self.pos

    def seekable(self):
        return True

    def readable(self):
        return True
