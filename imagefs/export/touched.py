"""What the layers between two trees of one disk chain can have changed.

When one tree is a layer below the other (same disk files, same CIDs), the only
bytes that can differ are in the grains the layers between them allocated. This
module turns those grains into inode numbers (``touched``) and into the set of
directories the diff must descend into (``needed``); diff.py explains why that is
enough. Everything is read raw (imagefs.ext4) from ``new``'s chain, plus the touched
parts of ``old``'s inode tables.
"""
import bisect
from collections import defaultdict
from dataclasses import dataclass

from ..errors import CorruptDisk
from ..tree import ROOT_INO
from .. import ext4


@dataclass
class Pruning:
    touched: set          # inodes whose record or compared blocks may differ from old
    needed: set           # directories of new that are touched or hold a touched inode below them
    listings: dict        # every directory of new reachable from the root: [(name, ino)]
    link_paths: dict      # every multiply-linked non-directory of new: all its paths


def layers_apart(a, b):
    """The disks between two trees of one chain (either may be the lower one), or None if
    they are not in one chain."""
    above = _layers_above(a, b)
    return above if above is not None else _layers_above(b, a)


def _layers_above(top, low):
    """The disks ``top``'s chain has on top of ``low``'s, or None if low's chain is not a tail of top's."""
    top_layers, low_layers = top.chain.layers, low.chain.layers
    k = len(top_layers) - len(low_layers)
    if k < 0:
        return None
    for a, b in zip(top_layers[k:], low_layers):
        if a.path != b.path or a.cid != b.cid:
            return None
    return top_layers[:k]


def compute(new, layers, geo_new, geo_old):
    """A Pruning for tree ``new`` against the other tree, ``layers`` apart in one chain
    (Geometry of each), or None when their inode tables do not line up."""
    if not geo_new.same_layout(geo_old):
        return None
    grains = _Grains(layers, geo_new.block_size)
    touched = _changed_records(geo_new, geo_old, grains)
    dirs, multi = {}, set()
    for ino, rec in geo_new.used_records():
        if grains.hit_block(ext4.xattr_block(rec)):
            touched.add(ino)
        runs = None
        if ext4.uses_blocks(rec):
            mapped = ext4.extent_map(geo_new, rec)
            if mapped is None:
                touched.add(ino)        # not extent-mapped: cannot tell, so compare it
            else:
                runs, tree_blocks = mapped
                if any(grains.hit_run(b, n) for _, b, n in runs if b is not None) or \
                        any(grains.hit_block(b) for b in tree_blocks):
                    touched.add(ino)
        if ext4.is_dir(rec):
            dirs[ino] = (rec, runs)
        elif ext4.links_of(rec) > 1:
            multi.add(ino)
    if ROOT_INO not in dirs:
        raise CorruptDisk(f"{new.name}: the root directory is not in use")
    return _skeleton(new, geo_new, dirs, touched, multi)


def _skeleton(new, geo_new, dirs, touched, multi):
    """List every directory of new once; locate touched and multiply-linked inodes."""
    listings, dir_path, parent = {}, {ROOT_INO: b""}, {ROOT_INO: None}
    found = defaultdict(list)       # non-dir inode -> [(dir, name)]
    stack = [ROOT_INO]
    while stack:
        d = stack.pop()
        rec, runs = dirs[d]
        entries = ext4.read_dir(geo_new, rec, runs) if runs is not None else list(new.readdir(d))
        listings[d] = entries
        for name, child in entries:
            if child in dirs:
                if child not in dir_path:       # a directory has one name; ignore corrupt repeats
                    dir_path[child] = dir_path[d] + b"/" + name
                    parent[child] = d
                    stack.append(child)
            elif child in touched or child in multi:
                found[child].append((d, name))
    needed = set()

    def mark(d):
        while d is not None and d not in needed:
            needed.add(d)
            d = parent[d]

    for ino in touched:
        if ino in dir_path:
            mark(ino)
        for d, _ in found.get(ino, ()):
            mark(d)
    link_paths = {ino: [dir_path[d] + b"/" + name for d, name in found[ino]] for ino in multi if ino in found}
    return Pruning(touched, needed, listings, link_paths)


def _changed_records(geo_new, geo_old, grains):
    """Inodes whose on-disk record lies in a written grain and differs from old's."""
    isz = geo_new.inode_size
    changed = set()
    for first_ino, start, length in geo_new.inode_table_ranges():
        for lo, hi in grains.spans(start, start + length):
            i0, i1 = (lo - start) // isz, -(-(hi - start) // isz)
            a = geo_new.chain.pread(start + i0 * isz, (i1 - i0) * isz)
            b = geo_old.chain.pread(start + i0 * isz, (i1 - i0) * isz)
            if a == b:
                continue
            for i in range(i1 - i0):
                if a[i * isz:(i + 1) * isz] != b[i * isz:(i + 1) * isz]:
                    changed.add(first_ino + i0 + i)
    return changed


class _Grains:
    """The byte ranges some layers wrote (whole grains), merged and sorted for range queries."""

    def __init__(self, layers, block_size):
        merged = []
        for a, b in sorted(r for layer in layers for r in layer.allocated()):
            if merged and a <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], b))
            else:
                merged.append((a, b))
        self.ranges = merged
        self.starts = [a for a, _ in merged]
        self.block_size = block_size

    def hit_run(self, block, count):
        start = block * self.block_size
        return next(self.spans(start, start + count * self.block_size), None) is not None

    def hit_block(self, block):
        return bool(block) and self.hit_run(block, 1)

    def spans(self, start, end):
        """(lo, hi) byte ranges of [start, end) that lie in written grains."""
        i = max(0, bisect.bisect_right(self.starts, start) - 1)
        while i < len(self.ranges) and self.ranges[i][0] < end:
            a, b = self.ranges[i]
            if b > start:
                yield max(start, a), min(end, b)
            i += 1
