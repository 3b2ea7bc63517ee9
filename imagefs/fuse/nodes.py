"""The nodes of the mount: what each file and directory is and what it answers.

::

    /                                        Root: one directory per image store
    <store>/                                 Store
    <store>/images/                          ImagesDir: one directory per sealed image
    <store>/refs/<name>:<tag>                RefsDir, RefLink -> ../images/<id> (read-only)
    <store>/images/<id>/                     ImageDir
        rootfs/...                           TreeNode: the image's tree (made per request)
        import/<new-id>, <new-id>.error      ImportDir, ImportFile, ImportErrorFile
        export/<ancestor>[,opts].tar         ExportDir, ExportFile: the diff against an ancestor
        rootfs[,opts].tar                    WholeImageFile: the whole image as a tar
        meta/<key>                           MetaDir, MetaFile
        parent -> ../<parent-id>             ParentLink (not for scratch)
        info.json                            InfoFile

Every node answers the same questions (getattr, lookup, listdir, open, readlink,
xattrs and the changes), so the FUSE adapter (ops.py) only dispatches. Plain
synchronous code over the Namespace (namespace.py). Nodes with ``inline`` set
answer from memory and local preads and are called on the event loop; the others
touch the image store and are called from worker threads.
"""
import json
import os
import stat as S
from dataclasses import dataclass
from typing import NamedTuple

from ..errors import Exists, InUse, InvalidInput, NotFound, ReadOnly
from ..ext4 import Stat
from ..ids import check_id
from ..tree import ROOT_INO as EXT4_ROOT_INO
from .errors import IsADirectory, NotEmpty, NotSupported, PermissionDenied
from .files import BytesFile, TreeFile
from .imports import ImportHandle
from .inodes import tree_ino
from .names import WHOLE_IMAGE, ExportName, export_file_name, parse_export_name, parse_whole_image_name

LONG = 300.0      # sealed images never change
SHORT = 1.0       # stores, images and imports come and go (also from outside this mount)
NONE = 0.0        # changes with every byte written or every look

XATTR_PREFIX = b"user.imagefs."
FORCE_DELETE = b"user.imagefs.force-delete"
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND


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
    attr_ttl = LONG
    names_ttl = LONG          # for directories: how long names looked up in it stay valid
    negative_ttl = 0.0        # how long the kernel may remember that a name is absent
    listing_changes = False   # for directories: names come and go (see Namespace.note_listing)
    inline = False            # answers without the image store: call on the event loop
    settable = False          # accepts setattr (times, modes: ignored; size: truncate)
    writable = False          # changes go through it: the admin group may write it too

    def __init__(self, key):
        self.key = key

    @property
    def is_dir(self):
        return S.S_ISDIR(self.mode)

    def size(self, ns):
        return 0

    # --- what the adapter asks -----------------------------------------------------
    def getattr(self, ns):
        return Entry(ns.ino_of(self), ns.stat(self), 0, self.attr_ttl)

    def lookup(self, ns, name):
        """The Entry of ``name`` in this directory, or None."""
        if not self.is_dir:
            raise InvalidInput("not a directory")
        child = self.find(ns, name)
        return None if child is None else ns.entry(child, self.names_ttl)

    def listdir(self, ns):
        listing = [(name, ns.entry(child, self.names_ttl)) for name, child in self.list(ns)]
        if self.listing_changes:
            ns.note_listing(self, [name for name, _ in listing])    # what the kernel will keep
        return listing

    def open(self, ns, flags, uid=0):
        """A handle (files.py) for reading or writing this file (``uid``: the caller's)."""
        if self.is_dir:
            raise IsADirectory("is a directory")
        raise InvalidInput("not a file")

    def readlink(self, ns):
        raise InvalidInput("not a symlink")

    # --- how a directory is made up ----------------------------------------------------
    def list(self, ns):
        """[(name bytes, Node or tree inode)] of a directory."""
        raise InvalidInput("not a directory")

    def find(self, ns, name):
        """The child called ``name`` (Node or tree inode), or None."""
        return dict(self.list(ns)).get(name)

    def names(self, ns):
        """The names ``list`` gives, in its order."""
        return [name for name, _ in self.list(ns)]

    def xattrs(self, ns):
        return {}

    # Changes: everything is read-only unless a node says otherwise.
    def create(self, ns, name, flags):
        raise ReadOnly("read-only")

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

    def open(self, ns, flags, uid=0):
        if flags & _WRITE_FLAGS:
            raise ReadOnly("read-only")
        # a size that may change must not let the kernel clip reads to a stale one
        return BytesFile(self.content(ns), volatile=self.attr_ttl == NONE)


# --- an image's tree ------------------------------------------------------------------------
class TreeNode:
    """A file of an image tree, made per request (the tree holds everything about it)."""
    __slots__ = ("tree", "ino", "ext4_ino", "base", "idx")
    inline = True
    negative_ttl = LONG
    settable = False

    def __init__(self, tree, idx, ino, ext4_ino):
        self.tree = tree
        self.idx = idx
        self.ino = ino
        self.ext4_ino = ext4_ino
        self.base = ino - ext4_ino

    def getattr(self, ns):
        return Entry(self.ino, self.tree.stat(self.ext4_ino), LONG, LONG)

    def lookup(self, ns, name):
        child = self.tree.find(self.ext4_ino, name)
        if child is None:       # absent, cached LONG; a layer file replaced meanwhile raises instead
            return None
        return Entry(self.base | child, self.tree.stat(child), LONG, LONG)

    def listdir(self, ns):
        base = self.base
        return [(name, Entry(base | st.ino, st, LONG, LONG)) for name, st in self.tree.entries(self.ext4_ino)]

    def open(self, ns, flags, uid=0):
        if flags & _WRITE_FLAGS:
            raise ReadOnly("read-only")
        st = self.tree.stat(self.ext4_ino)
        if not st.is_reg:
            raise IsADirectory("is a directory") if st.is_dir else InvalidInput("not a regular file")
        return TreeFile(ns, self.idx, self.ino, self.tree, self.ext4_ino, st.size)

    def readlink(self, ns):
        return self.tree.readlink(self.ext4_ino)

    def xattrs(self, ns):
        return self.tree.xattrs(self.ext4_ino)

    def _read_only(self, ns, *_args):
        raise ReadOnly("read-only")

    create = mkdir = rmdir = unlink = setxattr = removexattr = _read_only


# --- the store level ------------------------------------------------------------------------
class Root(Node):
    mode = S.S_IFDIR | 0o755
    writable = True
    attr_ttl = SHORT
    names_ttl = SHORT
    listing_changes = True

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
        ns.store._changed(store)      # an image made a moment ago elsewhere must be seen
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
        return [(b"images", ns.node(ImagesDir, self.store)), (b"refs", ns.node(RefsDir, (self.store, "")))]

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
    listing_changes = True

    def __init__(self, key):
        super().__init__(key)
        self.store = key

    def list(self, ns):
        return [(img.id.encode(), ns.node(ImageDir, ns.image_ref(img)))
                for img in ns.store.list_images(self.store)]

    def names(self, ns):
        return [img.id.encode() for img in ns.store.list_images(self.store)]

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
    _NODES = {b"import": lambda ref: ImportDir, b"export": lambda ref: ExportDir,
              export_file_name(WHOLE_IMAGE).encode(): lambda ref: WholeImageFile,
              b"meta": lambda ref: MetaDir, b"info.json": lambda ref: InfoFile,
              b"parent": lambda ref: ParentLink if ref.parent else None}

    def list(self, ns):
        return [(b"rootfs", self.find(ns, b"rootfs"))] + [
            (name, self.find(ns, name)) for name in self._NODES if self.find(ns, name) is not None]

    def find(self, ns, name):
        if name == b"rootfs":
            ns.tree(self.ref)  # open the chain only now (in the caller's worker thread)
            return tree_ino(self.ref.idx, EXT4_ROOT_INO)
        if name.startswith(WHOLE_IMAGE.encode() + b","):
            text = name.decode("utf-8", "surrogateescape")
            return ns.node(WholeImageFile, (self.ref, text)) if parse_whole_image_name(text) else None
        cls = self._NODES.get(name, lambda ref: None)(self.ref)
        if cls is WholeImageFile:
            return ns.node(cls, (self.ref, name.decode()))
        return None if cls is None else ns.node(cls, self.ref)

    def xattrs(self, ns):
        return {XATTR_PREFIX + k.encode(): v.encode() for k, v in _image_info(ns, self.ref).items()
                if isinstance(v, str)} | {
            b"user.imagefs.usage": str(ns.store.layer_usage(self.ref.store, self.ref.id)).encode(),
            b"user.imagefs.children": ",".join(ns.store.children(self.ref.store, self.ref.id)).encode(),
            b"user.imagefs.owners": ",".join(ns.store.owners(self.ref.store, self.ref.id)).encode()}


class RefsDir(Node):
    """``<store>/refs/[<registry/path>/]<name>:<tag>`` -> the image directory (read-only).

    A reference's '/'-separated name becomes directories; its last part is a symlink."""
    mode = S.S_IFDIR | 0o555
    attr_ttl = SHORT
    names_ttl = SHORT
    listing_changes = True

    def list(self, ns):
        from ..oci.refs import RefStore
        store, prefix = self.key
        out = {}
        for ref in RefStore(ns.store, store).list():
            if not ref.name.startswith(prefix):
                continue
            head, slash, _ = ref.name[len(prefix):].partition("/")
            if slash:
                out[head] = ns.node(RefsDir, (store, f"{prefix}{head}/"))
            else:
                out[head] = ns.node(RefLink, (store, ref.name, ref.image))
        return sorted((name.encode(), node) for name, node in out.items())


class RefLink(Node):
    mode = S.S_IFLNK | 0o777
    attr_ttl = SHORT

    def readlink(self, ns):
        store, name, image = self.key
        return b"../" * (name.count("/") + 1) + b"images/" + image.encode()

    def size(self, ns):
        return len(self.readlink(ns))


class ParentLink(ImageNode):
    mode = S.S_IFLNK | 0o777

    def readlink(self, ns):
        return b"../" + self.ref.parent.encode()

    def size(self, ns):
        return len(self.readlink(ns))


class InfoFile(ImageNode, ContentFile):
    attr_ttl = NONE     # children, owners and usage change

    def content(self, ns):
        return (json.dumps(_image_info(ns, self.ref) | {
            "children": ns.store.children(self.ref.store, self.ref.id),
            "owners": ns.store.owners(self.ref.store, self.ref.id),
            "usage": ns.store.layer_usage(self.ref.store, self.ref.id),
            "ancestors": ns.store.ancestors(self.ref.store, self.ref.id),
            "metadata": list(self.ref.metadata_keys),
            "extents": list(ns.store.layer_disk(self.ref.store, self.ref.id).extent_files),
        }, indent=2) + "\n").encode()


class MetaDir(ImageNode):
    def list(self, ns):
        return [(key.encode(), ns.node(MetaFile, (self.ref, key))) for key in self.ref.metadata_keys]


class MetaFile(ImageNode, ContentFile):
    def content(self, ns):
        return ns.store.metadata(self.ref.store, self.ref.id)[self.key[1]]


class ExportDir(ImageNode):
    """The ancestors of an image, each as ``<ancestor>.tar`` (scratch has none); lookup also
    takes option-bearing names."""

    def list(self, ns):
        return [(export_file_name(a).encode(), ns.node(ExportFile, (self.ref, export_file_name(a))))
                for a in ns.store.ancestors(self.ref.store, self.ref.id)]

    def find(self, ns, name):
        text = name.decode("utf-8", "surrogateescape")
        wanted = parse_export_name(text)
        if wanted is None or wanted.ancestor not in ns.store.ancestors(self.ref.store, self.ref.id):
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

    def open(self, ns, flags, uid=0):
        """A stream of the diff, made while it is read (opening its trees reads VMDK headers)."""
        from ..export import export_diff

        if flags & _WRITE_FLAGS:
            raise ReadOnly("read-only")
        wanted, ref = self.export, self.ref
        new = ns.tree(ref)
        old_ref = None if wanted.ancestor is None else \
            ns.image_ref(ns.store.get_image(ref.store, wanted.ancestor))   # rootfs.tar: the whole image
        old = None if old_ref is None else ns.tree(old_ref)
        held = [r.idx for r in (ref, old_ref) if r is not None]          # rmdir of either is busy meanwhile
        handle = ns.exports.open(lambda: export_diff(new, old, spec=wanted.spec, data=wanted.data),
                                 f"{ref.store}/{ref.id}/export/{self.key[1]}", uid,
                                 on_close=lambda: [ns.release(idx) for idx in held])
        for idx in held:
            ns.hold(idx)
        return handle


class WholeImageFile(ExportFile):
    """``rootfs[,opts].tar``: the whole image, a diff against nothing."""

    @property
    def export(self) -> ExportName:
        return parse_whole_image_name(self.key[1])


class ImportDir(ImageNode):
    mode = S.S_IFDIR | 0o755
    writable = True
    attr_ttl = SHORT
    names_ttl = SHORT
    listing_changes = True

    def list(self, ns):
        out = []
        for new_id, session in ns.imports.sessions(self.ref.idx):
            out.append((new_id.encode(), ns.node(ImportFile, (self.ref, new_id, session.serial))))
        for new_id, failure in ns.imports.failures(self.ref.idx):
            out.append((new_id.encode() + ERROR_SUFFIX, ns.node(ImportErrorFile, (self.ref, new_id, failure.serial))))
        return sorted(out)

    def create(self, ns, name, flags):
        """A pending import for ``name``: (its handle, its Entry)."""
        child = self.new_import(ns, name)
        entry = ns.entry(child, self.names_ttl)
        return ImportHandle(child.session(ns), entry.ino, truncate=bool(flags & os.O_TRUNC)), entry

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
    settable = True     # cp -p, touch and tar set times and modes on what they write: accepted, ignored

    def open(self, ns, flags, uid=0):
        if flags & os.O_ACCMODE == os.O_RDONLY:
            raise PermissionDenied("write-only: the layer is read back from rootfs/")
        return ImportHandle(self.session(ns), ns.ino_of(self), truncate=bool(flags & os.O_TRUNC))

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
            "datastore-path": ns.store.datastore_path(ref.store, ref.id),
            "disk-format": ns.store.layer_disk(ref.store, ref.id).create_type}
    if ref.parent is not None:
        info["parent"] = ref.parent
    return info
