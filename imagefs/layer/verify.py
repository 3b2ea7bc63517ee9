"""Proving a sealed layer: read it back through the reader that serves users, compare with the tar.

Every tool of the write chain can lose a write without saying so in its exit code: a
loop device whose backing export ran out of space, fuse2fs, qsd growing the disk on a
full datastore. So a layer is committed only once its disk, opened as users open it
(``DiskChain`` + ``ImageTree``, which also checks the chain's CIDs), holds what the
layer model (``model.py``) says the tar made: every path it touched with its type,
mode, owner, mtime, size, link target, device number, xattrs and data digest; hard
links sharing one inode with the right link count; whiteout victims gone; emptied
(opaque) directories holding only this layer's entries.

Only what the tar touched is read, so the cost follows the layer, not the image.
"""
import os
import stat
from collections import OrderedDict

from ..cache import Cache
from ..errors import CorruptDisk, ImageFSError, NotFound
from ..tree import ROOT_INO, ImageTree
from ..vmdk import DiskChain
from .model import KIND_BLK, KIND_CHR, KIND_DIR, KIND_FIFO, KIND_LNK, KIND_REG, DataDigest, LayerModel, \
    decode_xattrs

READ_SIZE = 1 << 20
VERIFY_CACHE = 1 << 20
DIRS_KEPT = 16
_UNKNOWN = object()
_FMT = {KIND_DIR: stat.S_IFDIR, KIND_REG: stat.S_IFREG, KIND_LNK: stat.S_IFLNK, KIND_CHR: stat.S_IFCHR,
        KIND_BLK: stat.S_IFBLK, KIND_FIFO: stat.S_IFIFO}
MAX_REPORTED = 3


class LayerMismatch(ImageFSError):
    """The sealed layer does not hold what its tar says (a write was lost below the filesystem)."""


def open_sealed(vmdk: str) -> ImageTree:
    """The tree of the chain ending at host file ``vmdk``. Chains resolve parent hints inside
    a datastore, so the host's "/" plays that part here."""
    def opener(path):
        from ..datastore.local import LocalReadHandle
        return LocalReadHandle("/" + path)
    # each inode is read about once: a small cache, as several imports may verify at once
    return ImageTree(DiskChain(os.path.abspath(vmdk).lstrip("/"), opener), name=os.path.basename(vmdk),
                     cache=Cache(VERIFY_CACHE))


def verify_layer(vmdk: str, model: LayerModel) -> int:
    """Raise LayerMismatch naming the first differences; the number of paths checked."""
    tree = open_sealed(vmdk)
    try:
        return _Verifier(tree, model).run()
    finally:
        tree.chain.close()


class _Verifier:
    def __init__(self, tree: ImageTree, model: LayerModel):
        self.tree, self.model = tree, model
        self.problems: list[str] = []
        self._dirs: OrderedDict[bytes, dict | None] = OrderedDict()   # recent directories' indexes

    def run(self) -> int:
        checked = 0
        try:
            for node in self.model.nodes():
                checked += 1
                self._node(node)
            for new, paths in self.model.inode_groups():
                self._group(new, paths)
            for path in self.model.absent():
                if self._lookup(path) is not None:
                    self._problem(path, "is still there (removed by a whiteout)")
            for path in self.model.exclusive_dirs():
                self._exclusive(path)
        except CorruptDisk as err:
            raise LayerMismatch(f"the written layer cannot be read back: {err}") from None
        if self.problems:
            more = len(self.problems) - MAX_REPORTED
            raise LayerMismatch("the written layer does not hold what its tar says: "
                                + "; ".join(self.problems[:MAX_REPORTED]) + (f" (and {more} more)" if more > 0 else ""))
        return checked

    def _problem(self, path: bytes, what: str) -> None:
        self.problems.append(f"/{os.fsdecode(path)} {what}")

    def _lookup(self, path: bytes) -> int | None:
        """The inode at ``path``, or None. The model's paths come sorted, so siblings come
        together: each directory is indexed once while its entries are checked, whatever
        its size and whatever the tree's cache keeps."""
        if not path:
            return ROOT_INO
        parent, _, name = path.rpartition(b"/")
        index = self._dirs.get(parent, _UNKNOWN)
        if index is _UNKNOWN:
            index = self._index(parent)
            self._dirs[parent] = index
            if len(self._dirs) > DIRS_KEPT:
                self._dirs.popitem(last=False)
        else:
            self._dirs.move_to_end(parent)
        return None if index is None else index.get(name)

    def _index(self, path: bytes) -> dict | None:
        try:
            ino = self.tree.resolve(path) if path else ROOT_INO
        except (NotFound, ImageFSError):
            return None
        if not self.tree.stat(ino).is_dir:
            return None
        return dict(self.tree.readdir(ino))

    def _node(self, n: dict) -> None:
        path = n["path"]
        ino = self._lookup(path)
        if ino is None:
            self._problem(path, "is missing")
            return
        st = self.tree.stat(ino)
        if stat.S_IFMT(st.mode) != _FMT[n["kind"]]:
            self._problem(path, f"is a {_kind_name(st.mode)}, not a {n['kind']}")
            return
        if n["own"] != 1:
            return                                  # made for an entry (a parent, a link): it only has to be there
        want = {"mode": n["perm"], "uid": n["uid"], "gid": n["gid"], "mtime": n["mtime"]}
        got = {"mode": stat.S_IMODE(st.mode), "uid": st.uid, "gid": st.gid, "mtime": st.mtime_ns}
        if n["kind"] == KIND_LNK:
            del want["mode"], got["mode"]
        for key in want:
            if want[key] != got[key]:
                self._problem(path, f"has {key} {_show(key, got[key])}, not {_show(key, want[key])}")
        if n["kind"] == KIND_REG:
            self._data(path, ino, st, n)
        elif n["kind"] == KIND_LNK and self.tree.readlink(ino) != n["target"]:
            self._problem(path, f"points to {self.tree.readlink(ino)!r}, not {n['target']!r}")
        elif n["kind"] in (KIND_CHR, KIND_BLK) and st.rdev != n["rdev"]:
            self._problem(path, f"is device {os.major(st.rdev)}:{os.minor(st.rdev)}, "
                                f"not {os.major(n['rdev'])}:{os.minor(n['rdev'])}")
        self._xattrs(path, ino, n)

    def _data(self, path, ino, st, n) -> None:
        if st.size != n["size"]:
            self._problem(path, f"has {st.size} bytes, not {n['size']}")
            return
        digest = DataDigest()
        if st.blocks * 512 >= st.size:              # not sparse: read it front to back
            ranges = [(0, st.size)]
        else:
            ranges = self.tree.data_ranges(ino)
        for start, length in ranges:
            offset, end = start, start + length
            while offset < end:
                block = self.tree.read(ino, offset, min(READ_SIZE, end - offset))
                if not block:
                    break
                digest.update(offset, block)
                offset += len(block)
        if digest.hexdigest() != n["digest"]:
            self._problem(path, "holds other data than the tar gave it")

    def _xattrs(self, path, ino, n) -> None:
        want = decode_xattrs(n["xattrs"] or b"")
        got = self.tree.xattrs(ino)
        if n["merged"]:                             # a directory merged onto a lower one keeps its xattrs
            got = {k: v for k, v in got.items() if k in want}
        if got != want:
            missing = sorted(set(want) - set(got)) or sorted(k for k in want if got.get(k) != want[k])
            extra = sorted(set(got) - set(want))
            what = f"lacks xattr {missing[0]!r}" if missing else f"has an extra xattr {extra[0]!r}"
            self._problem(path, what)

    def _group(self, new: bool, paths: list[bytes]) -> None:
        inos = {p: self._lookup(p) for p in paths}
        present = {p: i for p, i in inos.items() if i is not None}
        if len(set(present.values())) > 1:
            self._problem(paths[0], f"and {os.fsdecode(paths[1])!r} should be one inode (hard links)")
            return
        if new and present:
            ino = next(iter(present.values()))
            if self.tree.stat(ino).nlink != len(paths):
                self._problem(paths[0], f"has {self.tree.stat(ino).nlink} links, not {len(paths)}")

    def _exclusive(self, path: bytes) -> None:
        ino = self._lookup(path)
        if ino is None or not self.tree.stat(ino).is_dir:
            return                                  # reported as a node already
        names = {name for name, _ in self.tree.readdir(ino)}
        extra = names - self.model.children(path)
        if extra:
            self._problem(path, f"still holds {os.fsdecode(sorted(extra)[0])!r} of a lower layer "
                                "(emptied by an opaque whiteout)")


def _kind_name(mode: int) -> str:
    for kind, fmt in _FMT.items():
        if stat.S_IFMT(mode) == fmt:
            return kind
    return "socket"


def _show(key, value):
    return f"{value:o}" if key == "mode" and value is not None else value
