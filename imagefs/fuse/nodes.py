"""The mount's namespace and its inode table.

::

    /                                        Root: one directory per image store
    <store>/                                 Store
    <store>/images/                          ImagesDir: one directory per sealed image
    <store>/images/<id>/                     ImageDir
        rootfs/...                           the image's tree (ImageTree inodes, not nodes)
        import/<new-id>, <new-id>.error      ImportDir, ImportFile, ImportErrorFile
        export/<ancestor>[,opts].tar         ExportDir, ExportFile
        meta/<key>                           MetaDir, MetaFile
        parent -> ../<parent-id>             ParentLink (not for scratch)
        info.json                            InfoFile

Inode numbers: synthetic nodes count up from 2 (1 is the root) and stay below 2**32;
a file of an image tree is ``(image index << 32) | ext4 inode``. Each image gets its
index the first time the mount sees it, and an index is never reused, so numbers are
stable for the life of the mount and an image deleted and made again gets new ones
(the kernel may still hold pages of the old one).

Who may do what (docs/mount.md, "Who may read and change what"): the synthetic
nodes belong to the mount's owner; the ones that accept changes are writable by
the owner alone, or also by the mount's ``admin_group``. Files whose bytes bypass
the modes inside an image (exports, meta/, info.json, .error reports) are 0440:
owner and group only. The kernel enforces all of it (``default_permissions``).

Plain synchronous code, safe to call from worker threads: the adapter (ops.py) calls
the ``tree_*`` methods inline and everything else from a thread, because that touches
the image store.
"""
import json
import stat as S
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import NamedTuple

from ..errors import Exists, ImageFSError, InUse, InvalidInput, NotFound, ReadOnly
from ..ids import SCRATCH, check_id
from ..tree import ROOT_INO as EXT4_ROOT_INO
from ..tree import Stat
from .errors import NotEmpty, NotSupported
from .names import ExportName, export_file_name, parse_export_name

ROOT_INO = 1
TREE_SHIFT = 32
LOW_MASK = (1 << TREE_SHIFT) - 1

LONG = 300.0      # sealed images never change
SHORT = 1.0       # stores, images and imports come and go (also from outside this mount)
NONE = 0.0        # changes with every byte written or every look

XATTR_PREFIX = b"user.imagefs."
FORCE_DELETE = b"user.imagefs.force-delete"
OPTION_EXPORTS_KEPT = 1024   # export names with options the mount remembers before asking the kernel to drop some
TREES_KEPT = 64              # open image trees (each holds a descriptor per layer); others reopen on use


def tree_ino(idx, ext4_ino):
    return (idx << TREE_SHIFT) | ext4_ino


def is_tree_ino(ino):
    return ino > LOW_MASK


class Entry(NamedTuple):
    ino: int
    stat: Stat          # stat.ino is ignored: ``ino`` is the mount's number
    entry_ttl: float    # how long the kernel may keep the name -> inode binding
    attr_ttl: float     # how long it may keep the attributes


@dataclass(frozen=True)
class ImageRef:
    """One incarnation of an image as this mount knows it."""
    idx: int
    store: str
    id: str
    parent: str | None
    metadata_keys: tuple


class Node:
    """A synthetic file or directory. Subclasses say what they hold."""
    mode = S.S_IFDIR | 0o555
    writable = False          # changes go through it: the admin group may write it too
    attr_ttl = LONG
    names_ttl = LONG          # for directories: how long names looked up in it stay valid

    def __init__(self, key):
        self.key = key

    @property
    def is_dir(self):
        return S.S_ISDIR(self.mode)

    def size(self, ns):
        return 0

    def list(self, ns):
        """[(name bytes, Node or tree inode)] of a directory."""
        raise InvalidInput("not a directory")

    def find(self, ns, name):
        """The child called ``name`` (Node or tree inode), or None."""
        return dict(self.list(ns)).get(name)

    def xattrs(self, ns):
        return {}

    # Changes: everything is read-only unless a node says otherwise.
    def mkdir(self, ns, name):
        raise ReadOnly("read-only")

    def rmdir(self, ns, name):
        raise ReadOnly("read-only")

    def unlink(self, ns, name):
        raise ReadOnly("read-only")

    def setxattr(self, ns, name, value):
        raise ReadOnly("read-only")

    def removexattr(self, ns, name):
        raise ReadOnly("read-only")


class ContentFile(Node):
    """A small read-only file whose bytes are made on open (owner and admin group only)."""
    mode = S.S_IFREG | 0o440

    def content(self, ns):
        raise NotImplementedError

    def size(self, ns):
        return len(self.content(ns))


# --- the store level ------------------------------------------------------------------------
class Root(Node):
    mode = S.S_IFDIR | 0o755
    writable = True
    attr_ttl = SHORT
    names_ttl = SHORT

    def list(self, ns):
        return [(name.encode(), ns.node(Store, name)) for name in ns.store.list_stores()]

    def find(self, ns, name):
        store = _id_or_none(name, "store name")
        if store is None or store not in ns.store.list_stores():
            return None
        return ns.node(Store, store)

    def mkdir(self, ns, name):
        store = check_id(name.decode("utf-8", "surrogateescape"), "store name")
        ns.store.create_store(store, capacity=ns.scratch_capacity)
        return ns.node(Store, store)

    def rmdir(self, ns, name):
        store = name.decode("utf-8", "surrogateescape")
        force = ns.force_delete_armed(store)
        if not force and ns.store.list_images(store, include_scratch=False):
            raise NotEmpty(f"image store {store} still holds images; delete them first, or set "
                           f"{FORCE_DELETE.decode()} on it to delete them with it")
        ns.check_store_unused(store)
        ns.store.delete_store(store, force=force)
        ns.force_delete.pop(store, None)
        ns.forget_store(store)

    def xattrs(self, ns):
        return {b"user.imagefs.datastore": ns.store.ds.url.encode(),
                b"user.imagefs.pid": str(ns.pid).encode()}


class Store(Node):
    mode = S.S_IFDIR | 0o755
    writable = True
    attr_ttl = SHORT

    def __init__(self, key):
        super().__init__(key)
        self.store = key

    def list(self, ns):
        return [(b"images", ns.node(ImagesDir, self.store))]

    def xattrs(self, ns):
        out = {b"user.imagefs.usage": str(ns.store.usage(self.store)).encode(),
               b"user.imagefs.images": str(len(ns.store.list_images(self.store, include_scratch=False))).encode()}
        if ns.force_delete_armed(self.store):
            out[FORCE_DELETE] = b"1"
        return out

    def setxattr(self, ns, name, value):
        if name != FORCE_DELETE:
            raise _no_xattr_support(name)
        if value.strip() in (b"1", b"yes", b"true"):
            ns.force_delete[self.store] = ns.store_incarnation(self.store)
        elif value.strip() in (b"0", b"no", b"false", b""):
            ns.force_delete.pop(self.store, None)
        else:
            raise InvalidInput(f"{FORCE_DELETE.decode()}: use 1 or 0")

    def removexattr(self, ns, name):
        if name != FORCE_DELETE:
            raise _no_xattr_support(name)
        ns.force_delete.pop(self.store, None)


class ImagesDir(Node):
    mode = S.S_IFDIR | 0o755
    writable = True
    attr_ttl = SHORT
    names_ttl = SHORT

    def __init__(self, key):
        super().__init__(key)
        self.store = key

    def list(self, ns):
        return [(img.id.encode(), ns.node(ImageDir, ns.image_ref(img)))
                for img in ns.store.list_images(self.store)]

    def find(self, ns, name):
        image_id = _id_or_none(name)
        if image_id is None:
            return None
        try:
            img = ns.store.get_image(self.store, image_id)
        except NotFound:
            ns.forget_missing(self.store, image_id)
            return None
        return ns.node(ImageDir, ns.image_ref(img))

    def rmdir(self, ns, name):
        image_id = name.decode("utf-8", "surrogateescape")
        ref = ns.image_ref(ns.store.get_image(self.store, image_id))
        if ns.open_files(ref.idx):
            raise InUse(f"image {image_id} has files open in the mount")
        if ns.imports.sessions(ref.idx):
            raise InUse(f"image {image_id} has imports of children pending or running")
        ns.store.delete_image(self.store, image_id)
        ns.forget_image(ref)


# --- one image ------------------------------------------------------------------------------
class ImageNode(Node):
    """A node that belongs to one image (its key starts with the ImageRef)."""

    def __init__(self, key):
        super().__init__(key)
        self.ref = key if isinstance(key, ImageRef) else key[0]


class ImageDir(ImageNode):
    mode = S.S_IFDIR | 0o755

    def list(self, ns):
        ref = self.ref
        ns.tree(ref)  # open the chain now, in the caller's worker thread
        out = [(b"rootfs", tree_ino(ref.idx, EXT4_ROOT_INO)),
               (b"import", ns.node(ImportDir, ref)),
               (b"export", ns.node(ExportDir, ref)),
               (b"meta", ns.node(MetaDir, ref)),
               (b"info.json", ns.node(InfoFile, ref))]
        if ref.parent is not None:
            out.append((b"parent", ns.node(ParentLink, ref)))
        return out

    def find(self, ns, name):
        if name == b"rootfs":
            ns.tree(self.ref)  # open the chain now, in the caller's worker thread
        return super().find(ns, name)

    def xattrs(self, ns):
        return {XATTR_PREFIX + k.encode(): v.encode() for k, v in _image_info(ns, self.ref).items()
                if isinstance(v, str)} | {
            b"user.imagefs.usage": str(ns.store.layer_usage(self.ref.store, self.ref.id)).encode(),
            b"user.imagefs.children": ",".join(ns.store.children(self.ref.store, self.ref.id)).encode(),
            b"user.imagefs.owners": ",".join(ns.store.owners(self.ref.store, self.ref.id)).encode()}


class ParentLink(ImageNode):
    mode = S.S_IFLNK | 0o777

    def target(self):
        return b"../" + self.ref.parent.encode()

    def size(self, ns):
        return len(self.target())


class InfoFile(ImageNode, ContentFile):
    attr_ttl = NONE     # children, owners and usage change

    def content(self, ns):
        return (json.dumps(_image_info(ns, self.ref) | {
            "children": ns.store.children(self.ref.store, self.ref.id),
            "owners": ns.store.owners(self.ref.store, self.ref.id),
            "usage": ns.store.layer_usage(self.ref.store, self.ref.id),
            "ancestors": ns.store.ancestors(self.ref.store, self.ref.id),
            "metadata": list(self.ref.metadata_keys),
        }, indent=2) + "\n").encode()


class MetaDir(ImageNode):
    def list(self, ns):
        return [(key.encode(), ns.node(MetaFile, (self.ref, key))) for key in self.ref.metadata_keys]


class MetaFile(ImageNode, ContentFile):
    def content(self, ns):
        return ns.store.metadata(self.ref.store, self.ref.id)[self.key[1]]


class ExportDir(ImageNode):
    """The ancestors of an image, each as ``<ancestor>.tar``; lookup also takes option-bearing names."""

    def list(self, ns):
        ancestors = ns.store.ancestors(self.ref.store, self.ref.id) or [SCRATCH]
        return [(export_file_name(a).encode(), ns.node(ExportFile, (self.ref, export_file_name(a))))
                for a in ancestors]

    def find(self, ns, name):
        text = name.decode("utf-8", "surrogateescape")
        wanted = parse_export_name(text)
        if wanted is None or wanted.ancestor not in {SCRATCH, *ns.store.ancestors(self.ref.store, self.ref.id)}:
            return None
        return ns.node(ExportFile, (self.ref, text))


class ExportFile(ImageNode):
    """A tar made while it is read: its size is unknown, so it reads as 0 and is opened direct_io.
    It holds every file of the image whatever its mode: owner and admin group only."""
    mode = S.S_IFREG | 0o440

    @property
    def export(self) -> ExportName:
        return parse_export_name(self.key[1])

    @property
    def has_options(self):
        """Named with options (not one of the listed ``<ancestor>.tar``): any name makes one."""
        return "," in self.key[1]


class ImportDir(ImageNode):
    mode = S.S_IFDIR | 0o755
    writable = True
    attr_ttl = SHORT
    names_ttl = SHORT

    def list(self, ns):
        out = []
        for new_id, session in ns.imports.sessions(self.ref.idx):
            out.append((new_id.encode(), ns.node(ImportFile, (self.ref, new_id, session.serial))))
        for new_id, failure in ns.imports.failures(self.ref.idx):
            out.append((new_id.encode() + ERROR_SUFFIX, ns.node(ImportErrorFile, (self.ref, new_id, failure.serial))))
        return sorted(out)

    def new_import(self, ns, name):
        """A pending import for ``name`` (the ``create`` of import/<new-id>)."""
        new_id = name.decode("utf-8", "surrogateescape")
        if new_id.endswith(ERROR_SUFFIX.decode()):
            raise InvalidInput(f"{new_id}: names ending in .error are the failure reports of imports")
        check_id(new_id)
        try:
            ns.store.get_image(self.ref.store, new_id)
        except NotFound:
            pass
        else:
            raise Exists(f"image {new_id} already exists in store {self.ref.store}")
        session = ns.imports.begin(self.ref, new_id)
        return ns.node(ImportFile, (self.ref, new_id, session.serial))

    def unlink(self, ns, name):
        child = self.find(ns, name)
        if isinstance(child, ImportErrorFile):
            ns.imports.clear_failure(self.ref.idx, child.new_id)
        elif isinstance(child, ImportFile):
            ns.imports.cancel(self.ref.idx, child.new_id)
        else:
            raise NotFound(f"{name.decode('utf-8', 'replace')}: no such import")


ERROR_SUFFIX = b".error"


class ImportFile(ImageNode):
    """A pending or running import: write a tar into it. Its size is the bytes received so far."""
    mode = S.S_IFREG | 0o200
    writable = True
    attr_ttl = NONE

    @property
    def new_id(self):
        return self.key[1]

    def session(self, ns):
        session = ns.imports.get(self.ref.idx, self.new_id)
        if session is None or session.serial != self.key[2]:
            raise NotFound(f"import {self.new_id} is over")
        return session

    def size(self, ns):
        return self.session(ns).received

    def xattrs(self, ns):
        return self.session(ns).xattrs()

    def setxattr(self, ns, name, value):
        self.session(ns).setxattr(name, value)

    def removexattr(self, ns, name):
        self.session(ns).removexattr(name)


class ImportErrorFile(ImageNode, ContentFile):
    @property
    def new_id(self):
        return self.key[1]

    def content(self, ns):
        failure = ns.imports.failure(self.ref.idx, self.new_id)
        if failure is None or failure.serial != self.key[2]:
            raise NotFound(f"no failure report for import {self.new_id}")
        return failure.message.encode() + b"\n"


# --- the namespace -------------------------------------------------------------------------
class Namespace:
    """Nodes by inode number, and the image trees behind ``rootfs``."""

    def __init__(self, store, imports, *, scratch_capacity, pid, uid, gid, admin_gid=None):
        self.store = store
        self.imports = imports
        self.scratch_capacity = scratch_capacity
        self.pid = pid
        self.force_delete = {}        # store -> incarnation whose next rmdir deletes its images too
        self._uid, self._gid = uid, (gid if admin_gid is None else admin_gid)
        self._group_writes = admin_gid is not None
        self._option_exports = OrderedDict()   # ino -> (export dir ino, name): forgettable, oldest first
        self._lookups = {}            # ino -> the kernel's lookup count, for forgettable nodes
        self._time_ns = time.time_ns()
        self._lock = threading.Lock()
        self._nodes = {ROOT_INO: Root(None)}
        self._inos = {(Root, None): ROOT_INO}
        self._next_ino = ROOT_INO + 1
        self._refs = {}               # (store, id) -> ImageRef
        self._ref_of = {}             # idx -> ImageRef, while the image is known
        self._trees = OrderedDict()   # idx -> ImageTree, least recently opened first
        self._next_idx = 1
        self._open = {}               # idx -> open image files

    # --- inode table ------------------------------------------------------------------
    def node(self, cls, key):
        """The node ``cls(key)``, registered under a stable inode number."""
        with self._lock:
            ino = self._inos.get((cls, key))
            if ino is None:
                ino = self._next_ino
                if ino > LOW_MASK:
                    raise InvalidInput("out of synthetic inode numbers")
                self._next_ino += 1
                self._inos[(cls, key)] = ino
                self._nodes[ino] = cls(key)
            return self._nodes[ino]

    def ino_of(self, node):
        return self._inos[(type(node), node.key)]

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

    def node_at(self, ino):
        node = self._nodes.get(ino)
        if node is None:
            raise NotFound(f"inode {ino} is gone")
        return node

    def image_ref(self, img):
        """The mount's handle on a sealed image (``store.Image``), made on first sight."""
        with self._lock:
            ref = self._refs.get((img.store, img.id))
            if ref is None:
                ref = ImageRef(self._next_idx, img.store, img.id, img.parent, tuple(sorted(img.metadata_keys)))
                self._next_idx += 1
                self._refs[(img.store, img.id)] = ref
                self._ref_of[ref.idx] = ref
            return ref

    def tree(self, ref):
        tree = self._trees.get(ref.idx)
        if tree is None:
            tree = self.store.tree(ref.store, ref.id)
            with self._lock:
                tree = self._trees.setdefault(ref.idx, tree)
                while len(self._trees) > TREES_KEPT:     # its open handles keep it alive until closed
                    self._trees.popitem(last=False)
        return tree

    def forget_image(self, ref):
        """After a delete: later lookups see a new incarnation, old inodes go stale."""
        with self._lock:
            self._refs.pop((ref.store, ref.id), None)
            self._ref_of.pop(ref.idx, None)
            self._trees.pop(ref.idx, None)

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

    # --- open files of image trees (rmdir of an image is refused while any is open) ----
    def hold(self, idx):
        with self._lock:
            self._open[idx] = self._open.get(idx, 0) + 1

    def release(self, idx):
        with self._lock:
            self._open[idx] -= 1

    def open_files(self, idx):
        return self._open.get(idx, 0)

    # --- synthetic nodes --------------------------------------------------------------
    def entry(self, child, names_ttl):
        """The Entry of a child (Node or tree inode) found in a directory with ``names_ttl``."""
        if isinstance(child, int):
            return self.tree_entry(child)
        return Entry(self.ino_of(child), self.stat(child), names_ttl, child.attr_ttl)

    def stat(self, node):
        mode = node.mode
        if self._group_writes and node.writable:
            mode |= 0o020
        size = node.size(self)
        return Stat(ino=0, mode=mode, nlink=2 if S.S_ISDIR(mode) else 1, uid=self._uid, gid=self._gid, rdev=0,
                    size=size, blocks=(size + 511) // 512, atime_ns=self._time_ns, mtime_ns=self._time_ns,
                    ctime_ns=self._time_ns)

    def lookup(self, parent_ino, name):
        """Entry of ``name`` in a synthetic directory, or None."""
        parent = self.node_at(parent_ino)
        if not parent.is_dir:
            raise InvalidInput("not a directory")
        child = parent.find(self, name)
        return None if child is None else self.entry(child, parent.names_ttl)

    def getattr(self, ino):
        node = self.node_at(ino)
        return Entry(ino, self.stat(node), 0, node.attr_ttl)

    def listdir(self, ino):
        node = self.node_at(ino)
        return [(name, self.entry(child, node.names_ttl)) for name, child in node.list(self)]

    # --- image trees (hot path: called inline, no store access) ------------------------
    def _tree_of(self, ino):
        tree = self._trees.get(ino >> TREE_SHIFT)
        if tree is None:
            ref = self._ref_of.get(ino >> TREE_SHIFT)
            if ref is None:
                raise NotFound(f"inode {ino}: its image is gone")
            tree = self.tree(ref)       # dropped from the open trees: open it again (a few header reads)
        return tree

    def tree_entry(self, ino):
        return Entry(ino, self._tree_of(ino).stat(ino & LOW_MASK), LONG, LONG)

    def tree_lookup(self, parent_ino, name):
        """Entry of ``name`` in an image directory, or None (a cacheable negative answer)."""
        tree = self._tree_of(parent_ino)
        try:
            child = tree.lookup(parent_ino & LOW_MASK, name)
        except NotFound:
            return None
        ino = (parent_ino & ~LOW_MASK) | child
        return Entry(ino, tree.stat(child), LONG, LONG)

    def tree_listdir(self, ino):
        tree = self._tree_of(ino)
        base = ino & ~LOW_MASK
        stat = tree.stat
        return [(name, Entry(base | child, stat(child), LONG, LONG)) for name, child in tree.readdir(ino & LOW_MASK)]

    def tree_readlink(self, ino):
        return self._tree_of(ino).readlink(ino & LOW_MASK)

    def tree_xattrs(self, ino):
        return self._tree_of(ino).xattrs(ino & LOW_MASK)

    def tree_open(self, ino):
        """The tree that serves reads of file ``ino`` (which must be a regular file)."""
        tree = self._tree_of(ino)
        if not tree.stat(ino & LOW_MASK).is_reg:
            raise InvalidInput("not a regular file")
        return tree


def _id_or_none(name, what="image ID"):
    try:
        return check_id(name.decode("utf-8", "surrogateescape"), what)
    except InvalidInput:
        return None


def _no_xattr_support(name):
    return NotSupported(f"{name.decode('utf-8', 'replace')}: not an attribute imagefs keeps here")


def _image_info(ns, ref):
    """The string facts of an image (also its user.imagefs.* xattrs)."""
    info = {"id": ref.id, "store": ref.store, "url": ns.store.url(ref.store, ref.id),
            "datastore-path": ns.store.datastore_path(ref.store, ref.id)}
    if ref.parent is not None:
        info["parent"] = ref.parent
    return info
