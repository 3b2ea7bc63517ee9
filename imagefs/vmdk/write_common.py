"""What the delta writers share: grain numbers of written ranges and copying their data."""
from ..errors import CorruptDisk

COPY_PIECE = 4 << 20


def grains_of(ranges, grain):
    """The grain numbers covered by byte ``ranges`` (each must start and end on a grain)."""
    out = []
    for lo, hi in ranges:
        if lo % grain or hi % grain:
            raise ValueError(f"range {lo}-{hi} is not aligned to {grain}-byte grains")
        out.extend(range(lo // grain, hi // grain))
    return out


def copy_ranges(out, ranges, source):
    """Append the data of ``ranges`` (read with ``source.pread``) to ``out`` in order."""
    for lo, hi in ranges:
        pos = lo
        while pos < hi:
            n = min(COPY_PIECE, hi - pos)
            data = source.pread(pos, n)
            if len(data) != n:
                raise CorruptDisk(f"short read at {pos} while copying a layer")
            out.write(data)
            pos += n
