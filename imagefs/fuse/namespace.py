"""The mount's namespace: the one owner of inode numbers, image incarnations, their
trees and the cache behind them.

- Synthetic nodes (nodes.py) get numbers counting up (inodes.py) and keep them for
  the life of the mount, but for an image's own nodes (its directory, exports, import
  files), which go with their incarnation when it is forgotten.
- An image gets an ImageRef (an incarnation, with an index) the first time the mount
  sees it; its tree is opened on first use and shares the mount's one Cache
  (imagefs/cache.py) with every other tree, its entries keyed by the incarnation.
  At most MAX_TREES trees stay open (least recently used go; the chains' disks and
  descriptors are bounded by the store's DiskPool): a request for a closed one is
  answered after ``reopen`` in a worker thread, from the same cache entries.
- One invalidation rule: what is read from a sealed image is never invalidated,
  because it never changes. An image deleted (here or by another process, seen
  missing at a lookup) is forgotten, and one made again under the same ID is a new
  incarnation with new inode numbers and a new tree; the old one's cached entries
  age out. What does change (stores, images/, imports) is not kept here: the image
  store's catalogue answers for it (short-lived, see store.py), and the kernel keeps
  those names for at most SHORT.

Who may do what (docs/mount.md, "Who may read and change what"): the synthetic
nodes belong to the mount's owner; the ones that accept changes are writable by
the owner alone, or also by the mount's ``admin_group``. Files whose bytes bypass
the modes inside an image (exports, meta/, info.json, .error reports) are 0440
(nodes.py): owner and group only. The kernel enforces it (``default_permissions``).

Export names with options (any name makes a node) are forgotten when the kernel
forgets them, and the kernel is asked to drop the oldest beyond OPTION_EXPORTS_KEPT.

Plain synchronous code, safe to call from worker threads.
"""
import stat as S
import threading
import time
from collections import OrderedDict

from ..cache import Cache
from ..errors import ImageFSError, InUse, InvalidInput, NotFound
from ..ext4 import Stat
from ..ids import SCRATCH
from .files import Exports
from .inodes import MAX_SYNTHETIC, ROOT_INO, is_tree_ino, split_tree_ino
from .nodes import Entry, ExportFile, ImageNode, ImageRef, Root, TreeNode
from .prefetch import Prefetcher

CACHE_BUDGET = 64 << 20
MAX_TREES = 64              # image trees kept open


class TreeClosed(Exception):
    """An inode of an image whose tree was closed to bound memory: ``reopen(idx)`` first."""

    def __init__(self, idx):
        super().__init__(idx)
        self.idx = idx
OPTION_EXPORTS_KEPT = 1024


class Namespace:
    def __init__(self, store, imports, *, scratch_capacity, pid, uid, gid, cache_budget=CACHE_BUDGET,
                 admin_gid=None, export_limits=None):
        self.store = store
        self.imports = imports
        self.exports = Exports(export_limits)
        self.prefetcher = Prefetcher()
        self.cache = Cache(cache_budget)
        self.scratch_capacity = scratch_capacity
        self.pid = pid
        self.force_delete = {}        # store -> incarnation whose next rmdir deletes its images too
        self._uid, self._gid = uid, (gid if admin_gid is None else admin_gid)
        self._group_writes = admin_gid is not None
        self._option_exports = OrderedDict()   # ino -> (export dir ino, name): forgettable, oldest first
        self._lookups = {}            # ino -> the kernel's lookup count, for forgettable nodes
        self._time_ns = time.time_ns()
        self._listed = {}             # ino -> (digest of the names, mtime_ns), of directories that change
        self._lock = threading.Lock()
        self._nodes = {ROOT_INO: Root(None)}
        self._image_inos = {}         # idx -> inode numbers of its incarnation's synthetic nodes
        self._inos = {(Root, None): ROOT_INO}
        self._next_ino = ROOT_INO + 1
        self._refs = {}               # (store, id) -> ImageRef
        self._live = {}               # idx -> ImageRef, of incarnations not forgotten
        self._trees = OrderedDict()   # idx -> ImageTree, least recently used first
        self._cids = {}               # idx -> CID of the image's disk when its tree was first opened
        self._next_idx = 1
        self._open = {}               # idx -> open image files

    def close(self):
        self.exports.close_all()
        self.prefetcher.close()

    # --- what an inode number stands for ---------------------------------------------
    def resolve(self, ino):
        """The node behind ``ino``: a synthetic node, or a TreeNode of an image's file."""
        if is_tree_ino(ino):
            idx, ext4_ino = split_tree_ino(ino)
            try:
                tree = self._trees[idx]
                self._trees.move_to_end(idx)
            except KeyError:
                if idx in self._live:
                    raise TreeClosed(idx) from None
                raise NotFound(f"inode {ino}: its image is gone") from None
            return TreeNode(tree, idx, ino, ext4_ino)
        node = self._nodes.get(ino)
        if node is None:
            raise NotFound(f"inode {ino} is gone")
        return node

    def resolve_here(self, ino):
        """``resolve`` for worker threads: a closed tree is opened again here."""
        try:
            return self.resolve(ino)
        except TreeClosed as closed:
            self.reopen(closed.idx)
            return self.resolve(ino)

    def node(self, cls, key):
        """The node ``cls(key)``, registered under a stable inode number."""
        with self._lock:
            ino = self._inos.get((cls, key))
            if ino is None:
                ino = self._next_ino
                if ino > MAX_SYNTHETIC:
                    raise InvalidInput("out of synthetic inode numbers")
                self._next_ino += 1
                self._inos[(cls, key)] = ino
                node = self._nodes[ino] = cls(key)
                if isinstance(node, ImageNode):     # goes with its incarnation (forget_image)
                    self._image_inos.setdefault(node.ref.idx, []).append(ino)
            return self._nodes[ino]

    def ino_of(self, node):
        return self._inos[(type(node), node.key)]

    # --- image incarnations and their trees ----------------------------------------------
    def image_ref(self, img):
        """The mount's handle on a sealed image (``store.Image``), made on first sight."""
        with self._lock:
            ref = self._refs.get((img.store, img.id))
            if ref is None:
                ref = ImageRef(self._next_idx, img.store, img.id, img.parent, tuple(sorted(img.metadata_keys)))
                self._next_idx += 1
                self._refs[(img.store, img.id)] = ref
                self._live[ref.idx] = ref
            return ref

    def tree(self, ref):
        """The image's tree, opened on first use or again after it was closed (reads VMDK
        headers: call from a worker thread). NotFound once the incarnation is gone."""
        with self._lock:
            tree = self._trees.get(ref.idx)
            if tree is not None:
                self._trees.move_to_end(ref.idx)
                return tree
        if ref.idx not in self._live:
            raise NotFound(f"image {ref.id} in store {ref.store} is gone")
        tree = self.store.tree(ref.store, ref.id, cache=self.cache, token=("image", ref.idx))
        cid = tree.chain.layers[0].cid
        with self._lock:
            first = self._cids.setdefault(ref.idx, cid)
        if cid != first:    # deleted and made again under the same ID behind the mount's back
            self.forget_image(ref)
            raise NotFound(f"image {ref.id} in store {ref.store} was deleted")
        with self._lock:
            tree = self._trees.setdefault(ref.idx, tree)
            self._trees.move_to_end(ref.idx)
            while len(self._trees) > MAX_TREES:
                self._trees.popitem(last=False)
        return tree

    @property
    def open_trees(self):
        return len(self._trees)

    def reopen(self, idx):
        """Open again the tree of a live incarnation (after TreeClosed; in a worker thread)."""
        ref = self._live.get(idx)
        if ref is None:
            raise NotFound("its image is gone")
        self.tree(ref)

    def forget_image(self, ref):
        """After a delete: later lookups see a new incarnation, old inodes go stale, and the
        store lets go of the image's disk files."""
        with self._lock:
            if self._refs.get((ref.store, ref.id)) is ref:
                del self._refs[(ref.store, ref.id)]
            self._live.pop(ref.idx, None)
            self._trees.pop(ref.idx, None)
            self._cids.pop(ref.idx, None)
            for ino in self._image_inos.pop(ref.idx, ()):     # its directory, exports, imports...
                node = self._nodes.pop(ino, None)
                if node is not None:
                    self._inos.pop((type(node), node.key), None)
                self._lookups.pop(ino, None)
                self._option_exports.pop(ino, None)
        self.store.forget_image_files(ref.store, ref.id)

    def forget_missing(self, store, image_id):
        """An image deleted behind the mount's back (e.g. by the CLI) is forgotten once seen missing."""
        ref = self._refs.get((store, image_id))
        if ref is not None:
            self.forget_image(ref)

    def forget_store(self, store):
        with self._lock:
            refs = [r for (s, _), r in self._refs.items() if s == store]
        for ref in refs:
            self.forget_image(ref)

    # --- export names with options: any name makes a node, so they must go again ------
    def note_lookup(self, parent_ino, name, ino):
        """Count the kernel's reference to an export node named with options; returns
        (dir ino, name) entries the kernel should drop so that their nodes can go."""
        node = self._nodes.get(ino)
        if not isinstance(node, ExportFile) or not node.has_options:
            return []
        with self._lock:
            self._lookups[ino] = self._lookups.get(ino, 0) + 1
            self._option_exports[ino] = (parent_ino, name)
            self._option_exports.move_to_end(ino)
            excess = len(self._option_exports) - OPTION_EXPORTS_KEPT
            return [self._option_exports.popitem(last=False)[1] for _ in range(max(0, excess))]

    def forget(self, ino, nlookup):
        """The kernel dropped ``nlookup`` references to ``ino``: a counted node with none left goes."""
        with self._lock:
            left = self._lookups.get(ino)
            if left is None:
                return
            left -= nlookup
            if left > 0:
                self._lookups[ino] = left
                return
            del self._lookups[ino]
            self._option_exports.pop(ino, None)
            node = self._nodes.pop(ino, None)
            if node is not None:
                self._inos.pop((type(node), node.key), None)

    # --- stores: force-delete belongs to one incarnation; busy while anything of it is used
    def store_incarnation(self, store):
        """What tells this store from a later one of the same name: its scratch disk's CID."""
        chain = self.store.open_chain(self.store.get_image(store, SCRATCH).disk)
        try:
            return chain.layers[0].cid
        finally:
            chain.close()

    def force_delete_armed(self, store):
        armed = self.force_delete.get(store)
        if armed is None:
            return False
        try:
            if armed == self.store_incarnation(store):
                return True
        except ImageFSError:
            pass
        self.force_delete.pop(store, None)    # deleted (and maybe made again) behind the mount's back
        return False

    def check_store_unused(self, store):
        """InUse while a file of the store is open in the mount or an import into it is pending."""
        with self._lock:
            refs = [r for (s, _), r in self._refs.items() if s == store]
        for ref in refs:
            if self.open_files(ref.idx):
                raise InUse(f"image store {store} has files open in the mount (image {ref.id})")
            if self.imports.sessions(ref.idx):
                raise InUse(f"image store {store} has imports pending or running (on image {ref.id})")

    # --- open files of image trees (rmdir of an image is refused while any is open) ----
    def hold(self, idx):
        with self._lock:
            self._open[idx] = self._open.get(idx, 0) + 1

    def release(self, idx):
        with self._lock:
            self._open[idx] -= 1

    def open_files(self, idx):
        return self._open.get(idx, 0)

    # --- attributes of synthetic nodes ---------------------------------------------------
    def entry(self, child, names_ttl):
        """The Entry of a child (Node or tree inode) found in a directory with ``names_ttl``."""
        if isinstance(child, int):
            return self.resolve_here(child).getattr(self)   # a tree root: attributes of a sealed image
        return Entry(self.ino_of(child), self.stat(child), names_ttl, child.attr_ttl)

    def stat(self, node):
        mode = node.mode
        if self._group_writes and node.writable:
            mode |= 0o020
        size = node.size(self)
        mtime = self.note_listing(node, node.names(self)) if node.listing_changes else self._time_ns
        return Stat(ino=0, mode=mode, nlink=2 if S.S_ISDIR(mode) else 1, uid=self._uid, gid=self._gid, rdev=0,
                    size=size, blocks=(size + 511) // 512, atime_ns=self._time_ns, mtime_ns=mtime,
                    ctime_ns=mtime)

    def note_listing(self, node, names):
        """Note the names a changing directory holds (looked at, or listed for the kernel) and
        return its mtime, which moves on when they change.

        The kernel keeps every directory listing it has read (the mount answers opendir
        with ENOSYS: FUSE's no-opendir mode) and, when a reading starts, trusts it as long
        as the directory's mtime is the one it had when the listing was taken. It keeps
        these directories' attributes 1 s (SHORT; not less: with default_permissions every
        path walked through one asks for them), and every reply with their attributes
        (getattr, lookup, readdirplus of the parent) looks at their names now: a listing
        changed outside the mount is read again within a second. Changes through the mount
        show at once: the kernel drops the listing after its own mkdir/rmdir/create/unlink,
        and the end of an import drops the attributes (ops.py)."""
        ino = self.ino_of(node)
        digest = hash(tuple(names))
        with self._lock:
            seen = self._listed.get(ino)
            if seen is None or seen[0] != digest:
                seen = self._listed[ino] = (digest, max(time.time_ns(), seen[1] + 1) if seen else self._time_ns)
        return seen[1]
