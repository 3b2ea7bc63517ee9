"""The changes that turn tree ``old`` into tree ``new``: docker/VIC ChangesDirs, on sealed images.

What counts as a change
-----------------------
A path present in both trees is changed ("C") when its type, mode, uid, gid, rdev,
symlink target or any xattr differ, or, for non-directories, its size, nlink or
mtime (nanoseconds, second-tolerant like docker: equal, or the same second with
one side at 0 ns, which is what a tar round trip without sub-second times leaves).
A directory's mtime alone is not a change (moby, VIC: it moves whenever an entry is
added or removed, which the diff already says through the entries; PR #11422), nor
is its nlink or size (both follow from its entries). Regular-file content counts
too, but is read only when nothing else tells: block-level copy-on-write keeps an
unwritten file's inode number and ctime, so in one disk chain equal (ino, ctime)
plus equal metadata is proof of equal content; otherwise (another inode, another
ctime, or trees from unrelated chains) equal-looking files are compared byte by
byte. That catches same-size rewrites with a restored mtime, which docker misses.

Present only in new: added ("A"), with everything below it. Present only in old:
deleted ("D"), reported at the topmost deleted path only. A directory that was
replaced (in one chain: another inode number, or the same number handed out again,
which a new i_generation shows) is emitted with everything below it and marked
``opaque`` when the old directory had entries, so the tar carries ``.wh..wh..opq``
and nothing of the old one shows through. Across unrelated trees inode numbers mean
nothing, so directories there are always merged entry by entry, as docker does.
A directory with any change below it is itself emitted ("C") before those changes
(moby PR #13590), so modes and owners of parents travel with the layer; the root
is never emitted. Every name of a changed multiply-linked inode is emitted, so the
applier can rebuild the link instead of splitting it (moby#5632): a new link to a
lower-layer file changes that file's nlink, which pulls in its other names.
Output is sorted per path component (byte-wise), so parents precede children and
the order never depends on disk layout.

Fast path: trees of one disk chain
----------------------------------
When one tree is a layer below the other in the same chain (touched.layers_apart;
usually ``old`` is an ancestor, but the reverse diff works the same way), the only
bytes that can differ are in the grains the layers in between allocated.
Call an inode's *facts* everything the diff compares: its 256-byte record (type,
mode, owners, rdev, size, times, nlink, in-inode xattrs, fast symlink target), its
external xattr block, and for slow symlinks and directories their extent-tree and
data blocks (a directory's data is its list of (name, inode)). ``touched`` holds
every inode whose record lies in a written grain and differs from old's, every
inode of new whose fact blocks (located from new's record) lie in a written grain,
and every directory or symlink whose blocks cannot be located (not extent-mapped).

1. An inode outside ``touched`` has the same facts in both trees: its record is
   byte-identical, so its fact blocks sit at the same positions, outside every
   written grain, and read the same.
2. So a directory path with the same inode d in both trees and d untouched has the
   same listing in both: every child path has the same inode number on both sides.
3. Induction from the root (inode 2 in both): if every difference at or below a
   path P required some touched inode on a path at or below P in new, a walk may
   skip any directory that is untouched, has the same inode in both trees and
   holds no touched inode below it. It does: a path whose pair is (x, x) with x
   untouched is unchanged (1); a child can differ only if its own inode is touched,
   or its pair is not (x, x), which (2) rules out unless the parent's listing
   changed, making the parent touched. A deletion likewise changes the listing of
   a directory that still exists in new, which is then touched.

Finding where touched inodes live needs their paths in new, and ext4 keeps no
parent pointers for files, so the fast path lists every directory of new once from
raw directory blocks (no inode parsing; tens of milliseconds for 20,000 entries),
which also yields every name of multiply-linked inodes for the hardlink rule. It
then stats, reads xattrs of and compares only touched inodes and the directories
leading to them (``needed``). The only assumption beyond the chain's own
(a grain not written by a child reads from its parent; the CID check guards
that) is the brief's: a file whose inode number and ctime are unchanged has
unchanged content. That holds between a layer and its ancestors, which were
sealed long before (ctime has a coarse clock, ~4 ms); it would not between two
siblings written at the same moment, so siblings, unrelated trees and inode
tables that moved (resize) all take the full walk.
"""
import hashlib
from collections import defaultdict
from dataclasses import dataclass

from ..errors import CorruptDisk, InvalidInput, NotFound
from ..tree import ROOT_INO
from . import touched as touched_mod
from ..ext4 import file_content, generation_of

_NS = 1_000_000_000
_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class Change:
    path: bytes                 # absolute inside the image, b"/a/b"
    kind: str                   # "A" added, "C" changed, "D" deleted
    ino: int | None             # the inode in new (None for deletions)
    opaque: bool = False        # a replaced directory: hide everything the old one held


def diff_changes(new, old, *, fast=True):
    """The changes from ``old`` (None: an empty tree) to ``new``, in tar order.

    ``fast=False`` forbids the one-chain pruning (the result is the same; tests and
    benchmarks compare the two).
    """
    return _Differ(new, old, fast).run()


def same_mtime(a_ns, b_ns):
    """Equal, or the same second with one side lacking nanoseconds (a tar round trip)."""
    if a_ns == b_ns:
        return True
    return a_ns // _NS == b_ns // _NS and (a_ns % _NS == 0 or b_ns % _NS == 0)


def stat_differs(a, b):
    if (a.mode, a.uid, a.gid, a.rdev) != (b.mode, b.uid, b.gid, b.rdev):
        return True
    if a.is_dir:
        return False
    return a.size != b.size or a.nlink != b.nlink or not same_mtime(a.mtime_ns, b.mtime_ns)


class _Differ:
    """One diff. The walk runs from a work list, not by recursion, so depth is unbounded."""

    def __init__(self, new, old, fast):
        self.new, self.old = new, old
        self.changes = {}
        self.link_paths = defaultdict(list)     # filled by the walk unless the fast path knows them
        self.prune = None
        self.same_chain = False
        self.todo = []                          # (method, args) still to run
        self.dirs_seen = {ROOT_INO}             # directories of new queued so far
        if old is None:
            return
        self.geo_new, self.geo_old = new.geo, old.geo
        self.new_xattrs, self.old_xattrs = new.xattrs, old.xattrs
        layers = touched_mod.layers_apart(new, old)
        self.same_chain = layers is not None
        if self.same_chain and fast:
            self.prune = touched_mod.compute(new, layers, self.geo_new, self.geo_old)
            if self.prune is not None:
                self.link_paths = self.prune.link_paths

    def run(self):
        if self.old is None:
            self.todo.append((self._emit_children, b"", ROOT_INO, None))
        else:
            self.todo.append((self._walk, b"", ROOT_INO, ROOT_INO))
        while self.todo:
            method, *args = self.todo.pop()
            method(*args)
        if self.old is not None:
            self._complete_link_groups()
            self._add_parents()
        return sorted(self.changes.values(), key=lambda c: c.path.split(b"/"))

    # --- walking -------------------------------------------------------------------
    def _descend(self, method, q, n, o):
        """Queue the directory ``n`` of new at ``q``; a directory reached twice is a loop
        (or a hard-linked directory) of a corrupt filesystem, which would never end."""
        if n in self.dirs_seen:
            raise CorruptDisk(f"{self.new.name}: directory inode {n} is reached twice (at {q!r})")
        self.dirs_seen.add(n)
        self.todo.append((method, q, n, o))

    def _listing(self, ino):
        listing = self.prune.listings.get(ino) if self.prune is not None else None
        return listing if listing is not None else self.new.readdir(ino)   # (a corrupt tree may hide one)

    def _walk(self, path, n_dir, o_dir):
        """Compare the entries of directory ``n_dir`` (new) and ``o_dir`` (old) at ``path``."""
        prune = self.prune
        if prune is not None and n_dir == o_dir and n_dir not in prune.touched:
            # same listing on both sides (docstring, 2): visit only what leads to touched inodes
            for name, child in self._listing(n_dir):
                if child in prune.touched or child in prune.needed:
                    self._pair(path + b"/" + name, child, child)
            return
        new_entries = dict(self._listing(n_dir))
        old_entries = dict(self.old.readdir(o_dir))
        for name in new_entries.keys() | old_entries.keys():
            q = path + b"/" + name
            n, o = new_entries.get(name), old_entries.get(name)
            if n is None:
                self.changes[q] = Change(q, "D", None)
            elif o is None:
                self._emit_subtree(q, n, None)
            else:
                self._pair(q, n, o)

    def _pair(self, q, n, o):
        """Path ``q`` exists in both trees: inode ``n`` in new, ``o`` in old."""
        prune = self.prune
        if prune is not None and n == o and n not in prune.touched:
            if n in prune.needed:
                self._descend(self._walk, q, n, o)
            return
        nst, ost = self.new.stat(n), self.old.stat(o)
        self._note_link(q, n, nst)
        if nst.is_dir and ost.is_dir and self._recreated(n, o):
            self.changes[q] = Change(q, "C", n, opaque=bool(self.old.readdir(o)))
            self._descend(self._emit_children, q, n, o)
            return
        if self._changed(n, nst, o, ost):
            self.changes[q] = Change(q, "C", n)
        if nst.is_dir:
            if ost.is_dir:
                self._descend(self._walk, q, n, o)
            else:
                self._descend(self._emit_children, q, n, None)

    def _emit_subtree(self, q, n, o):
        """Emit ``q`` and everything below it: "C" where old has the path, else "A"."""
        st = self.new.stat(n)
        self._note_link(q, n, st)
        self.changes[q] = Change(q, "A" if o is None else "C", n)
        if st.is_dir:
            self._descend(self._emit_children, q, n, o if o is not None and self.old.stat(o).is_dir else None)

    def _emit_children(self, q, n, o):
        old_entries = dict(self.old.readdir(o)) if o is not None else {}
        for name, child in self._listing(n):
            self._emit_subtree(q + b"/" + name, child, old_entries.get(name))

    def _note_link(self, q, ino, st):
        if self.prune is None and not st.is_dir and st.nlink > 1:
            self.link_paths[ino].append(q)

    # --- deciding --------------------------------------------------------------------
    def _recreated(self, n, o):
        """Directory replaced between old and new (only knowable within one chain)."""
        if not self.same_chain:
            return False
        return n != o or generation_of(self.geo_new.record(n)) != generation_of(self.geo_old.record(o))

    def _changed(self, n, nst, o, ost):
        if stat_differs(nst, ost):
            return True
        if nst.is_lnk and self.new.readlink(n) != self.old.readlink(o):
            return True
        if self.new_xattrs(n) != self.old_xattrs(o):
            return True
        if nst.is_reg and nst.size and not (self.same_chain and n == o and nst.ctime_ns == ost.ctime_ns):
            return not self._same_content(n, o, nst.size)
        return False

    def _same_content(self, n, o, size):
        return _digest(self.new, self.geo_new, n, size) == _digest(self.old, self.geo_old, o, size)

    # --- completing ----------------------------------------------------------------
    def _complete_link_groups(self):
        """Every name of an emitted multiply-linked inode goes into the layer."""
        for change in list(self.changes.values()):
            if change.kind == "D":
                continue
            for q in self.link_paths.get(change.ino, ()):
                if q not in self.changes:
                    self.changes[q] = Change(q, "C" if self._in_old(q) else "A", change.ino)

    def _add_parents(self):
        """A directory with changes below it is emitted too (moby PR #13590); never the root."""
        for q in list(self.changes):
            parent = q.rpartition(b"/")[0]
            while parent and parent not in self.changes:
                self.changes[parent] = Change(parent, "C", self.new.resolve(parent))
                parent = parent.rpartition(b"/")[0]

    def _in_old(self, q):
        """Does old have path ``q``?"""
        try:
            self.old.resolve(q)
            return True
        except (NotFound, InvalidInput):
            return False


def _digest(tree, geo, ino, size):
    h = hashlib.sha256()
    for chunk in file_content(tree, geo, ino, size, _CHUNK):
        h.update(chunk)
    return h.digest()
