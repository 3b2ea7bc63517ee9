"""The image-store API: stores, images as VMDK layer chains, and containers joined to them.

Layout on a datastore (compatible with VIC's port layer)::

    VIC/<store>/images/<id>/<id>.vmdk            the layer disk (scratch: base disk; others: delta child)
    VIC/<store>/images/<id>/imageMetadata/<key>  raw metadata values
    VIC/<store>/images/<id>/manifest             empty, written last: no manifest, no image
    VIC/<store>/diskFormat                       the createType new layers are written in (imagefs's own)
    <container-id>/<container-id>.vmdk           a container's read-write disk, a child of an image

Parentage comes from the disk chain (``parentFileNameHint``), never from metadata.
A layer is sealed before any child is made of it and never opened writable again.
"""
import errno
import logging
import posixpath
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

from . import scratch as scratch_disk
from .crashpoints import crash_point
from .errors import CorruptDisk, Exists, ImageFSError, InUse, InvalidInput, NoSpace, NotFound, ReadOnly
from .ids import SCRATCH, check_id
from .layer.recover import recover_work_dirs
from .layer.tools import hold_interrupts
from .tree import ImageTree
from .datastore.local import LocalDatastore
from .diskpool import DiskPool
from .vmdk import DiskChain, open_disk
from .vmdk.layer_format import DEFAULT_FORMAT, check_disk_format

log = logging.getLogger("imagefs.store")

ROOT_DIR = "VIC"
DISK_SUFFIX = ".vmdk"
CLAIM = ".writing"


@dataclass(frozen=True)
class Image:
    id: str
    store: str
    parent: str | None          # None for scratch
    disk: str                   # datastore-relative path of the layer's VMDK
    metadata_keys: tuple = field(default=())


@dataclass(frozen=True)
class Catalogue:
    """A store's sealed images with their parents, children and layer sizes, built from one
    walk of the store's images directory (plus each disk's descriptor, read once)."""
    images: dict            # id -> Image
    usage: dict             # id -> bytes of the layer's VMDK files
    children: dict          # id -> [child ids], sorted

    def ancestors(self, image_id):
        out, img = [], self.images[image_id]
        while img.parent is not None and img.parent in self.images:
            if img.parent == image_id or img.parent in out:
                raise CorruptDisk(f"image {image_id} in store {img.store}: its disk chain loops at {img.parent}")
            out.append(img.parent)
            img = self.images[img.parent]
        return out


@dataclass(frozen=True)
class Container:
    id: str
    store: str
    image: str
    disk: str
    vm: str | None = None       # the VM whose disk it is (joined with --vm), else None
    repo: str | None = None     # the repository name join recorded (VM-joined containers)


def _store_dir(store):
    return f"{ROOT_DIR}/{store}"


def _images_dir(store):
    return f"{ROOT_DIR}/{store}/images"


def _image_dir(store, image_id):
    return f"{_images_dir(store)}/{image_id}"


def _disk_path(store, image_id):
    return f"{_image_dir(store, image_id)}/{image_id}.vmdk"


def _store_lock(store):
    return f"{_store_dir(store)}/.lock"


def _claim_path(store, image_id):
    """Held (flock) by the writer of an image until the image is complete."""
    return f"{_image_dir(store, image_id)}/{CLAIM}"


def _format_file(store):
    return f"{_store_dir(store)}/diskFormat"


def _children_lock(store, image_id):
    """Held (shared) while a child of the image is written, so the image is not deleted under it."""
    return f"{_image_dir(store, image_id)}/.children.lock"


def is_zero_base(path):
    """Is ``path`` a store's empty scratch base (``images/scratch/scratch-base.vmdk``)?

    imagefs makes that disk empty (a thin disk the datastore creates, or a descriptor over
    a sparse or empty flat file) and never writes it; scratch, its only child, records its
    CID. So its extents are never read: it reads as zeros, and staging it for qemu fetches
    nothing but its descriptor. Anything that wrote to it would have given it a new CID
    (ESXi and qemu do on the first change), and the chain check then refuses scratch."""
    parts = path.split("/")
    return len(parts) == 5 and parts[0] == ROOT_DIR and parts[2:] == ["images", SCRATCH, scratch_disk.BASE_NAME]


def _container_disk(container_id):
    return f"{container_id}/{container_id}.vmdk"


class ImageStore:
    """All image stores of one datastore."""

    def __init__(self, datastore, *, writer_method=None, workdir=None, catalogue_ttl=0.0, recover=True):
        """``catalogue_ttl``: how long a store's catalogue may be reused (seconds); changes
        made through this object are seen at once, others' after at most that long.
        ``recover=False`` leaves what killed writers left alone (``store check`` reports it)."""
        self.ds = datastore
        self.writer_method = writer_method
        self.workdir = workdir
        self.catalogue_ttl = catalogue_ttl
        self._cleaned = set()
        self._catalogues = {}         # store -> (monotonic time built, Catalogue)
        self._generations = {}        # store -> how many changes this object made to it
        self._containers = None       # (monotonic time listed, [Container])
        self._parents = {}            # (disk, size, mtime) -> parent disk path or None
        self.disks = DiskPool(self.ds.open_read, self.ds.hint_names)   # the layer disks read, shared
        self._recover = recover
        self.ds.mkdir(ROOT_DIR, parents=True)
        if recover:
            recover_work_dirs(workdir)      # what killed writers of this machine left running

    # --- image stores -------------------------------------------------------------------
    def create_store(self, name, capacity=scratch_disk.DEFAULT_CAPACITY, disk_format=None):
        """Create store ``name`` with its scratch image; Exists if it is there already.

        ``disk_format`` (a createType of vmdk.layer_format.DELTA_FORMATS) is what its
        layers are written in; default: the datastore's ``default_disk_format``."""
        check_id(name, "store name")
        disk_format = check_disk_format(disk_format or self.default_disk_format)
        try:
            self.ds.mkdir(_store_dir(name))  # atomic: raises Exists for a taken name
        except Exists:
            raise Exists(f"image store {name} already exists") from None
        try:
            self.ds.write_file(_format_file(name), f"{disk_format}\n".encode())
            # held while scratch is made: a delete or clean-up by another process waits it out (EBUSY)
            with self.ds.lock(f"{_store_dir(name)}/.lock", exclusive=True):
                self.ds.mkdir(_images_dir(name))
                self.ds.mkdir(_image_dir(name, SCRATCH))
                self.ds.mkdir(f"{_image_dir(name, SCRATCH)}/imageMetadata")
                base = self._scratch_base(name, capacity, disk_format)
                with self.ds.new_host_dir(_image_dir(name, SCRATCH)) as host:
                    scratch_disk.make_scratch_disk(f"{host}/{SCRATCH}{DISK_SUFFIX}", capacity, workdir=self.workdir,
                                                   disk_format=disk_format, base=base)
                self.ds.write_file(f"{_image_dir(name, SCRATCH)}/manifest", b"")
        except BaseException:
            self.ds.rmtree(_store_dir(name))
            raise
        self._cleaned.add(name)
        log.info("created image store %s", name)
        return name

    def _scratch_base(self, store, capacity, disk_format):
        """What the scratch delta of an ESXi-format store stands on (scratch.make_scratch_disk):
        a thin base the datastore makes itself where it can (``create_thin_disk``, e.g. a
        host's CreateVirtualDisk), a sparse flat file on a local directory, else an empty
        flat file (a sparse one would be uploaded whole). Whichever it is, it is read as
        all zeros without reading its extents (open_chain)."""
        if disk_format == DEFAULT_FORMAT:
            return None
        create = getattr(self.ds, "create_thin_disk", None)
        if create is None:
            return "flat" if isinstance(self.ds, LocalDatastore) else "empty"
        path = f"{_image_dir(store, SCRATCH)}/{scratch_disk.BASE_NAME}"
        capacity = scratch_disk.scratch_capacity(capacity)
        create(path, capacity)
        info = self.disk_info(path)
        kinds = {line.type for line in info.descriptor.extents}
        if info.has_parent or info.embedded or not kinds <= {"VMFS", "FLAT"} or info.capacity != capacity:
            raise ImageFSError(f"{path}: the datastore made a {info.create_type} disk of {info.capacity} bytes "
                               f"with {'/'.join(sorted(kinds))} extents, not an empty thin base of {capacity}")
        return info.cid

    @property
    def default_disk_format(self):
        """The format of new stores' layers: the datastore's choice (a vSphere datastore
        wants one ESXi accepts as a disk parent), else monolithicSparse."""
        return getattr(self.ds, "default_disk_format", DEFAULT_FORMAT)

    def disk_format(self, store):
        """The createType this store writes its layers in (stores made before imagefs
        recorded it, or by VIC, use the datastore's default)."""
        try:
            return check_disk_format(self.ds.read_file(_format_file(store)).decode().strip())
        except NotFound:
            return self.default_disk_format

    def list_stores(self):
        return [n for n in self.ds.listdir(ROOT_DIR) if self.ds.is_dir(_images_dir(n))]

    def recover(self):
        """Clean every store now (the mount does this at start), rather than each at first use."""
        for name in self.list_stores():
            self.get_store(name)

    def get_store(self, name):
        """Check that store ``name`` exists; the first time, remove half-made images (no manifest)."""
        check_id(name, "store name")
        if not self.ds.is_dir(_images_dir(name)):
            raise NotFound(f"image store {name} not found")
        if self._recover and name not in self._cleaned:
            try:
                self._cleanup(name)
            except NotFound:            # deleted by another process since the check above
                raise NotFound(f"image store {name} not found") from None
            self._cleaned.add(name)
        return name

    def delete_store(self, name, force=False):
        """Delete a store. Refused (InUse) while it holds images other than scratch, unless force."""
        self.get_store(name)
        try:
            self._delete_store(name, force)
        except (NotFound, FileNotFoundError):
            if self.ds.is_dir(_images_dir(name)):
                raise
            # deleted by another process since the check above (found by the soak: two `store rm`)
            raise NotFound(f"image store {name} not found") from None
        self._cleaned.discard(name)
        self._changed(name)
        log.info("deleted image store %s", name)

    def _delete_store(self, name, force):
        images = [i for i in self._image_ids(name) if i != SCRATCH]
        containers = [c for c in self.list_containers() if c.store == name]
        if containers:
            raise InUse(f"image store {name} is in use by containers: {', '.join(c.id for c in containers)}")
        if images and not force:
            raise InUse(f"image store {name} still holds {len(images)} image(s); delete them first or force")
        with self.ds.lock(_store_lock(name), exclusive=True):
            writing = [i for i in self._incomplete_ids(name) if self._is_being_written(name, i)]
            if writing:
                raise InUse(f"image store {name} has a layer write in progress ({', '.join(writing)})")
            self.ds.rmtree(_store_dir(name))

    # --- half-made images ---------------------------------------------------------------------
    # A write claims images/<id> under the store lock: it creates the directory and takes
    # the claim lock (images/<id>/.writing), which it holds until the image is complete or
    # removed. The store lock is held only for the claim, so a long write never blocks the
    # clean-up of what a killed writer left: a directory without a manifest whose claim lock
    # is free is debris.
    def _cleanup(self, store):
        """Remove half-made images (no manifest) of dead writers; never scratch."""
        with self.ds.lock(_store_lock(store), exclusive=True):
            for image_id in self._incomplete_ids(store):
                if image_id == SCRATCH:
                    log.warning("store %s: scratch is incomplete; the store is probably unusable", store)
                elif self._remove_if_debris(store, image_id):
                    log.warning("store %s: removed incomplete image %s (its writer is gone)", store, image_id)
            for image_id in self._image_ids(store):
                self._drop_stale_claim(store, image_id)

    def _incomplete_ids(self, store):
        """Directories under images/ that are not complete images (no manifest or no disk)."""
        return [image_id for image_id, held in self._walk_images(store).items()
                if not ("manifest" in held and f"{image_id}{DISK_SUFFIX}" in held)
                and self.ds.is_dir(_image_dir(store, image_id))]

    def _is_being_written(self, store, image_id):
        with self.ds.lock(_claim_path(store, image_id), exclusive=True, blocking=False) as got:
            return not got

    def _remove_if_debris(self, store, image_id):
        """Remove images/<id> if it is incomplete and no live writer claims it (caller holds
        the store lock). True if removed."""
        d = _image_dir(store, image_id)
        if self._is_complete(store, image_id):
            return False
        if self.ds.is_link(d):          # not imagefs's: never followed, never removed
            log.warning("store %s: images/%s is a symbolic link; left alone", store, image_id)
            return False
        with self.ds.lock(_claim_path(store, image_id), exclusive=True, blocking=False) as got:
            if not got:
                return False
            # its writer may have finished since the look above: it writes the manifest, then
            # removes the claim file, whose lock (made anew here) is then free
            if self._is_complete(store, image_id):
                self.ds.remove(_claim_path(store, image_id))
                return False
            self.ds.rmtree(d)
        self._changed(store)
        return True

    def _is_complete(self, store, image_id):
        return self.ds.exists(f"{_image_dir(store, image_id)}/manifest") and \
            self.ds.exists(_disk_path(store, image_id))

    def _drop_stale_claim(self, store, image_id):
        """A complete image whose writer died between the manifest and dropping its claim."""
        claim = _claim_path(store, image_id)
        if self.ds.exists(claim):
            with self.ds.lock(claim, exclusive=True, blocking=False) as got:
                if got:
                    self.ds.remove(claim)

    @contextmanager
    def _claim(self, store, image_id):
        """``with self._claim(store, id) as d:`` images/<id> is ours to fill; a taken ID is an
        error, unless what holds it is debris of a dead writer. On an exception the directory
        goes; on a clean exit only the claim does (the image is complete by then)."""
        d = _image_dir(store, image_id)
        with ExitStack() as claim:
            with self.ds.lock(_store_lock(store), exclusive=True):
                try:
                    self._mkdir_image(d)
                except Exists:
                    if not self._remove_if_debris(store, image_id):
                        raise Exists(f"image {image_id} already exists in store {store}") from None
                    self._mkdir_image(d)
                claim.enter_context(self.ds.lock(_claim_path(store, image_id), exclusive=True))
            try:
                yield d
            except BaseException:
                with hold_interrupts():
                    self.ds.rmtree(d)
                raise
            self.ds.remove(_claim_path(store, image_id))

    # --- images -------------------------------------------------------------------------------
    def _image_ids(self, store):
        return sorted(i for i, held in self._walk_images(store).items() if "manifest" in held)

    def _walk_images(self, store):
        """``{image id: {path inside its directory: FileInfo}}`` from one walk."""
        names = {}
        for path, info in self.ds.walk(_images_dir(store)).items():
            image_id, _, rest = path.partition("/")
            held = names.setdefault(image_id, {})
            if rest:
                held[rest] = info
        return names

    def disk_info(self, disk, known=None):
        """A disk's descriptor facts (format, CIDs, parent, extent files); no grain tables
        read. ``known``: the disk's FileInfo, where the caller has it (saves a stat)."""
        def opener(path):
            return self.ds.open_read(path, known=known) if path == disk else self.ds.open_read(path)
        return open_disk(disk, opener, self.ds.hint_names)

    def layer_disk(self, store, image_id):
        """An image's own disk facts: createType, extent files, CIDs (a vmdk.DiskInfo)."""
        img = self.get_image(store, image_id)
        try:
            return self.disk_info(img.disk)
        except FileNotFoundError:       # deleted by another process a moment ago
            raise NotFound(f"image {image_id} in store {store} has no disk") from None

    def _parent_of_disk(self, disk, known=None):
        """(parent image id or None, parent disk path) from a disk's descriptor."""
        parent_disk = self.disk_info(disk, known).parent_path(self.ds.hint_names)
        if parent_disk is None:
            return None, None
        return posixpath.basename(parent_disk).removesuffix(".vmdk"), parent_disk

    def catalogue(self, store):
        """The store's Catalogue: one walk of its images directory, descriptors read once per disk."""
        self.get_store(store)
        cached = self._catalogues.get(store)
        now = time.monotonic()
        if cached is not None and now - cached[0] < self.catalogue_ttl:
            return cached[1]
        generation = self._generations.get(store, 0)
        names = self._walk_images(store)
        images, usage, children = {}, {}, {}
        for image_id, held in sorted(names.items()):
            disk_info = held.get(f"{image_id}.vmdk")
            if "manifest" not in held or disk_info is None:
                continue        # being written, or a crash's leftover (see _cleanup)
            disk = _disk_path(store, image_id)
            parent = None
            if image_id != SCRATCH:
                try:
                    parent_disk = self._parent_disk(disk, disk_info)
                except (NotFound, FileNotFoundError):
                    continue    # deleted (by another process) since the walk: not an image any more
                parent = None if parent_disk is None else posixpath.basename(parent_disk)[: -len(".vmdk")]
            keys = tuple(sorted(k.partition("/")[2] for k, info in held.items()
                                if k.startswith("imageMetadata/") and not info.is_dir))
            images[image_id] = Image(image_id, store, parent, disk, keys)
            usage[image_id] = _disk_bytes(held)
        for img in images.values():
            if img.parent is not None:
                children.setdefault(img.parent, []).append(img.id)
        catalogue = Catalogue(images, usage, children)
        if self._generations.get(store, 0) == generation:
            # kept only if this object changed nothing meanwhile (another thread's delete must
            # not be answered from a walk made before it)
            self._catalogues[store] = (now, catalogue)
        return catalogue

    def _parent_disk(self, disk, info):
        """The parent disk's path from a disk's descriptor, read once per (disk, size, mtime)."""
        key = (disk, info.size, info.mtime_ns)
        if key not in self._parents or info.mtime_ns is None:
            self._parents[key] = self._parent_of_disk(disk, info)[1]
        return self._parents[key]

    def _changed(self, store=None):
        """This object changed a store (or containers): its next catalogue is built anew."""
        if store is None:
            self._containers = None
        else:
            self._generations[store] = self._generations.get(store, 0) + 1
            self._catalogues.pop(store, None)

    def get_image(self, store, image_id):
        if self.catalogue_ttl:          # a mount: answered from the catalogue while it is fresh
            img = self.catalogue(store).images.get(image_id)
            if img is not None:
                return img
        self.get_store(store)
        check_id(image_id)
        try:
            held = self.ds.walk(_image_dir(store, image_id))       # one request, remote or not
        except NotFound:
            held = {}
        if "manifest" not in held:
            raise NotFound(f"image {image_id} not found in store {store}")
        disk = _disk_path(store, image_id)
        if f"{image_id}{DISK_SUFFIX}" not in held:
            raise NotFound(f"image {image_id} in store {store} has no disk")
        parent = None if image_id == SCRATCH else self._parent_of_disk(disk, held[f"{image_id}{DISK_SUFFIX}"])[0]
        keys = tuple(sorted(k.partition("/")[2] for k, info in held.items()
                            if k.startswith("imageMetadata/") and not info.is_dir))
        return Image(image_id, store, parent, disk, keys)

    def list_images(self, store, include_scratch=True):
        return [img for img in self.catalogue(store).images.values() if include_scratch or img.id != SCRATCH]

    def _catalogued(self, store, image_id):
        catalogue = self.catalogue(store)
        if image_id not in catalogue.images:
            self.get_image(store, image_id)       # NotFound, with the reason
            self._changed(store)                  # made since the catalogue was built
            catalogue = self.catalogue(store)
        return catalogue

    def children(self, store, image_id):
        return list(self._catalogued(store, image_id).children.get(image_id, ()))

    def ancestors(self, store, image_id):
        """The image's parents from the nearest up to scratch."""
        return self._catalogued(store, image_id).ancestors(image_id)

    def metadata(self, store, image_id):
        img = self.get_image(store, image_id)
        d = f"{_image_dir(store, image_id)}/imageMetadata"
        return {k: self.ds.read_file(f"{d}/{k}") for k in img.metadata_keys}

    def write_image(self, store, parent_id, image_id, stream, *, metadata=None, expected_sum=None,
                    progress=None, on_archive_end=None):
        """Write a new layer ``image_id`` from a tar stream as a child of ``parent_id``.

        Metadata is ``key -> bytes``. Any failure leaves no trace of the new image.
        ``on_archive_end()`` is called once the tar's end-of-archive marker has been read.
        """
        from .layer.writer import write_layer  # heavy imports only when writing
        from .vmdk.hints import relative_hint
        from .vmdk.layer_format import seal_as

        check_id(image_id)
        if image_id == SCRATCH:
            raise InvalidInput("scratch is made with the store; it cannot be written")
        metadata = dict(metadata or {})
        for key in metadata:
            check_id(key, "metadata key")
        try:
            parent = self.get_image(store, parent_id)
        except NotFound:
            raise NotFound(f"parent image {parent_id} not found in store {store}") from None
        with ExitStack() as parent_held:
            try:                                    # the parent stays while this is held
                parent_held.enter_context(self.ds.lock(_children_lock(store, parent_id), exclusive=False))
            except FileNotFoundError:               # deleted meanwhile, its directory and all
                raise NotFound(f"parent image {parent_id} not found in store {store}") from None
            if not self.ds.exists(f"{_image_dir(store, parent_id)}/manifest"):
                raise NotFound(f"parent image {parent_id} not found in store {store}")
            with self._claim(store, image_id) as d:
                self.ds.mkdir(f"{d}/imageMetadata")
                with self.host_chain(parent.disk) as parent_host, self.ds.new_host_dir(d) as host:
                    child = f"{host}/{image_id}{DISK_SUFFIX}"
                    result = write_layer(parent_host, child, stream, expected_sum=expected_sum,
                                         method=self.writer_method, workdir=self.workdir, progress=progress,
                                         on_archive_end=on_archive_end)
                    # post-seal: the store's disk format and the parent hint the layer keeps
                    seal_as(child, self.disk_format(store), relative_hint(_disk_path(store, image_id), parent.disk))
                self._commit(d, metadata)
        self._changed(store)
        log.info("wrote image %s/%s (parent %s, %s, %d bytes)", store, image_id, parent_id,
                 result.digest, result.size)
        return self.get_image(store, image_id), result

    def _mkdir_image(self, d):
        try:
            self.ds.mkdir(d)
        except OSError as err:
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                raise NoSpace(f"the datastore is full: no room for image {posixpath.basename(d)}") from None
            raise

    def _commit(self, d, metadata):
        """Make the written image visible, durably: metadata, then the manifest, each made
        durable before the next step (docs/design.md says what a power cut leaves)."""
        try:
            self._commit_steps(d, metadata)
        except OSError as err:
            failure = (NoSpace if err.errno in (errno.ENOSPC, errno.EDQUOT) else ImageFSError)(
                f"cannot commit image {posixpath.basename(d)}: {err.strerror or err}")
            raise failure from None

    def _commit_steps(self, d, metadata):
        for key, value in metadata.items():
            crash_point("metadata")
            self.ds.write_file(f"{d}/imageMetadata/{key}", bytes(value))   # file + imageMetadata/
        self.ds.sync(d)                                  # the disk's and imageMetadata's entries
        crash_point("manifest")
        self.ds.write_file(f"{d}/manifest", b"")         # from here on the image exists
        crash_point("manifest")
        self.ds.sync(posixpath.dirname(d))               # images/<id> itself
        crash_point("manifest")

    def delete_image(self, store, image_id):
        """Delete one image; InUse while it has children or containers; scratch is refused."""
        img = self.get_image(store, image_id)
        if image_id == SCRATCH:
            raise InUse(f"scratch is the base of store {store} and cannot be deleted (delete the store)")
        d = _image_dir(store, image_id)
        # Under the lock a child write waits for (or makes this fail), the children are looked
        # up afresh: a child sealed a moment ago (maybe by another process) must be seen. The
        # store's lock, shared as writers hold it, keeps another process's clean-up from
        # taking the half-deleted directory for a crashed write.
        with self.ds.lock(f"{_store_dir(store)}/.lock", exclusive=False), \
                self.ds.lock(_children_lock(store, image_id), exclusive=True, blocking=False) as got:
            if not got:
                raise InUse(f"image {image_id} has a child image being written")
            self._changed(store)
            self._changed()
            kids = self.children(store, image_id)
            if kids:
                raise InUse(f"image {image_id} is in use by child images: {', '.join(sorted(kids))}")
            owners = self.owners(store, image_id)
            if owners:
                raise InUse(f"image {image_id} is in use by containers: {', '.join(owners)}")
            from .oci.refs import RefStore
            refs = RefStore(self, store).refs_of(image_id)
            if refs:
                raise InUse(f"image {image_id} is tagged {', '.join(refs)}; untag it first")
            self.ds.remove(f"{d}/manifest")      # first: from here on the image does not exist
            self.ds.remove(img.disk)
            self.ds.rmtree(d)
        self._changed(store)
        log.info("deleted image %s/%s", store, image_id)

    def delete_branch(self, store, image_id, keep=()):
        """Delete a leaf and then each ancestor that became unused, stopping at scratch.

        Returns the deleted IDs in order. The first image must be deletable; an ancestor
        still in use (or listed in ``keep``) ends the walk quietly.
        """
        deleted = []
        current = image_id
        while current is not None and current != SCRATCH:
            if current in keep:
                if not deleted:
                    raise InUse(f"image {current} is kept and cannot be deleted")
                break
            parent = self.get_image(store, current).parent
            try:
                self.delete_image(store, current)
            except InUse:
                if not deleted:
                    raise
                break
            deleted.append(current)
            current = parent
        return deleted

    # --- reading --------------------------------------------------------------------------------
    def open_chain(self, disk, sealed=True):
        """The DiskChain of ``disk``; its layers are shared with every chain of this store
        object (imagefs/diskpool.py), but for a top disk that may still change (``sealed``
        False: a container's) and for a scratch base known to be zeros (not read)."""
        if sealed:
            shared = self.disks.disk
        else:
            shared = lambda path: None if path == disk else self.disks.disk(path)  # noqa: E731
        return DiskChain(disk, self.ds.open_read, self.ds.hint_names, shared=shared, zero=is_zero_base)

    @contextmanager
    def host_chain(self, disk):
        """``with st.host_chain(disk) as host:`` the host path of a disk that qemu tools
        open as ``disk`` with its whole chain: the disk itself, every file of its chain
        staged beside it, or a stand-in chain over those files where qemu cannot follow
        the real one (vmdk/qemu_view.py)."""
        from .vmdk.qemu_view import qemu_parent

        with self.open_chain(disk) as chain:
            files = list(dict.fromkeys(f for layer in chain.layers for f in (layer.path, *layer.info.extent_files)))
            zero = [f for layer in chain.layers if layer.zero for f in layer.info.extent_files]
            with self.ds.host_files(files, zero=zero) as hosts, \
                    qemu_parent(chain, dict(zip(files, hosts)).__getitem__, self.workdir) as host:
                yield host

    def tree(self, store, image_id, cache=None, token=None):
        """The read API of a sealed image, opened anew (a mount keeps its own, see fuse/namespace.py);
        ``cache`` is where it keeps what it reads (imagefs/cache.py; one of its own by default),
        under ``token`` (a tree opened again with the same token finds its entries)."""
        img = self.get_image(store, image_id)
        return ImageTree(self.open_chain(img.disk), name=f"{store}/{image_id}", cache=cache, token=token)

    def forget_image_files(self, store, image_id):
        """Let go of the disk files of an image deleted (maybe by another process)."""
        self.disks.forget(_image_dir(store, image_id))

    # --- usage, URLs ----------------------------------------------------------------------------
    def layer_usage(self, store, image_id):
        """Bytes of the VMDK files of one layer."""
        if self.catalogue_ttl:
            return self._catalogued(store, image_id).usage[image_id]
        self.get_image(store, image_id)
        return _disk_bytes(self.ds.walk(_image_dir(store, image_id)))

    def usage(self, store):
        """Bytes of all layer VMDKs of a store, scratch excluded (as VIC counts)."""
        return sum(n for i, n in self.catalogue(store).usage.items() if i != SCRATCH)

    def datastore_path(self, store, image_id):
        img = self.get_image(store, image_id)
        return self.ds.datastore_path(img.disk)

    def url(self, store, image_id):
        """The ``ds://`` URL of a layer's disk, escaped as VIC's url.URL.String() does."""
        from urllib.parse import quote
        return "ds://" + quote(self.datastore_path(store, image_id), safe="/")

    # --- containers -----------------------------------------------------------------------------
    def join(self, store, image_id, container_id, vm=None, repo=None):
        """Create a container's read-write disk as a child of an image; the image is then in use.

        With ``vm`` (vSphere) the disk is created by the host and added to that VM
        (datastore/vsphere/join.py); without, it is made here and stored as a file.
        """
        from .layer.writer import create_child_disk

        check_id(container_id, "container ID")
        img = self.get_image(store, image_id)
        if vm is not None:
            from .datastore.vsphere.join import join_vm
            return join_vm(self, img, container_id, vm, repo)
        try:
            self.ds.mkdir(container_id)
        except Exists:
            raise Exists(f"container {container_id} already exists") from None
        try:
            with self.host_chain(img.disk) as parent_host, self.ds.new_host_dir(container_id) as host:
                create_child_disk(parent_host, f"{host}/{container_id}{DISK_SUFFIX}")
        except BaseException:
            self.ds.rmtree(container_id)
            raise
        self._changed()
        return Container(container_id, store, image_id, _container_disk(container_id))

    def list_containers(self):
        """Containers with a read-write disk here: those made without a VM (their disks, from
        one walk of the datastore's top, kept for ``catalogue_ttl``) and, on a datastore
        with VMs, those joined to a VM (read live from the VMs' join records, one query)."""
        found = {c.id: c for c in self._disk_containers()}
        if self.ds.vms is not None:
            from .datastore.vsphere.join import vm_containers
            found.update((c.id, c) for c in vm_containers(self, self.ds.vms.scan()))
        return [found[k] for k in sorted(found)]

    def _disk_containers(self):
        cached = self._containers
        now = time.monotonic()
        if cached is not None and now - cached[0] < self.catalogue_ttl:
            return list(cached[1])
        out = self._list_disk_containers()
        self._containers = (now, out)
        return list(out)

    def _list_disk_containers(self):
        """Containers from their disks, ``<id>/<id>.vmdk`` at the datastore's top (one walk)."""
        out = []
        for rel, info in sorted(self.ds.walk("", pattern=f"*{DISK_SUFFIX}").items()):
            name, _, file = rel.partition("/")
            if name == ROOT_DIR or file != f"{name}{DISK_SUFFIX}" or info.is_dir or info.size == 0:
                continue            # (a VM's disk in the simulator is an empty placeholder)
            disk = _container_disk(name)
            try:
                parent_id, parent_disk = self._parent_of_disk(disk, info)
            except ImageFSError as e:
                log.warning("container %s: unreadable disk: %s", name, e)
                continue
            parts = (parent_disk or "").split("/")
            if len(parts) == 5 and parts[0] == ROOT_DIR and parts[2] == "images":
                out.append(Container(name, parts[1], parent_id, disk))
        return out

    def get_container(self, container_id):
        for c in self.list_containers():
            if c.id == container_id:
                return c
        raise NotFound(f"container {container_id} not found")

    def owners(self, store, image_id, vm_filter=None):
        """What uses this image: IDs of the containers whose read-write disk is a child of
        its disk, and, on a datastore with VMs, the names of the VMs whose disks use its
        disk directly or through a parent (read live, one query; ``vm_filter(VMOwner)``
        keeps some). A container joined to a VM is there as its VM."""
        out = {c.id for c in self._disk_containers() if c.store == store and c.image == image_id}
        if self.ds.vms is not None:
            out |= {o.name for o in self.ds.vms.owners(_disk_path(store, image_id), vm_filter)}
        return sorted(out)

    def _own_container(self, container_id):
        """A container whose disk imagefs may change or read: not one a VM has."""
        c = self.get_container(container_id)
        if c.vm is not None:
            raise InUse(f"container {c.id} is a disk of virtual machine {c.vm}; "
                        f"detach it first (container detach {c.id} --vm {c.vm})")
        return c

    def remove_container(self, container_id):
        c = self._own_container(container_id)
        self.ds.rmtree(container_id)
        self._changed()
        return c

    def detach(self, container_id, vm, destroy=False):
        """Take a joined container's disk off VM ``vm``: kept, or with ``destroy`` deleted."""
        from .datastore.vsphere.join import detach_vm
        check_id(container_id, "container ID")
        detach_vm(self, container_id, vm, destroy)
        self._changed()

    @contextmanager
    def container_root(self, container_id, method=None):
        """Mount a container's read-write disk; sealed images never come here."""
        from .layer.writer import writable_mount

        c = self._own_container(container_id)
        with self.host_chain(_disk_path(c.store, c.image)), self.ds.edit_host_file(c.disk) as host, \
                writable_mount(host, method=method or self.writer_method, workdir=self.workdir) as mounted:
            yield mounted

    def container_import(self, target, stream, *, spec=None, store=None):
        """Copy a tar into a container's read-write disk, like ``docker cp`` (VIC's data sink).

        Entries are filtered and renamed by ``spec`` (a FilterSpec); whiteout names are
        plain files here. All or nothing: on failure the disk is put back as it was.
        A sealed image is refused (ReadOnly): layers never change once written.
        """
        from .layer.extract import apply_layer

        try:
            c = self.get_container(target)
        except NotFound:
            sealed = [s for s in ([store] if store else self.list_stores())
                      if self.ds.exists(f"{_image_dir(s, target)}/manifest")]
            if sealed:
                raise ReadOnly(f"image {target} in store {sealed[0]} is sealed and cannot change; "
                               "copy into a container joined to it instead") from None
            raise
        with self.container_root(c.id) as mounted:     # stored only if all of it went in
            return apply_layer(mounted.root, stream, path_filter=spec.to_path_filter() if spec else None,
                               whiteouts=False, deferred=mounted.deferred)

    def container_export(self, container_id, *, changes=False, spec=None, data=True):
        """A tar stream of a container's tree (VIC's data source), or with ``changes`` only
        what it changed over its image."""
        from .export import export_diff

        c = self._own_container(container_id)
        old = self.tree(c.store, c.image) if changes else None
        return export_diff(self.container_tree(container_id), old, spec=spec, data=data)

    def container_tree(self, container_id):
        """A fresh read API of a container's disk (not cached: the disk can change)."""
        c = self._own_container(container_id)
        return ImageTree(self.open_chain(c.disk, sealed=False), name=f"container {container_id}")


def _disk_bytes(files):
    """Bytes of the disk files among one image directory's entries."""
    return sum(info.size for n, info in files.items() if "/" not in n and n.endswith(DISK_SUFFIX) and not info.is_dir)
