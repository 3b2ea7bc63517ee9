"""The original image store's operations as a Python library (docs/api.md maps each one).

    import imagefs
    st = imagefs.ImageStore("/var/lib/imagefs")        # a datastore: a local directory
    st.create_image_store("web")
    base = st.get_image("web", "scratch")
    app = st.write_image(base, "app", {"metaData": b"{}"}, None, open("app.tar", "rb"))
    with st.export("web", "app", ancestor="scratch") as tar:   # a readable stream
        ...

Errors are ``imagefs.errors`` types (NotFound, Exists, InUse, InvalidInput, ...).
Images are ``Image`` values: id, store, parent (None for scratch), disk, metadata (a dict).
"""
import io
from dataclasses import dataclass, field

from .errors import NotFound
from .ids import SCRATCH


@dataclass(frozen=True)
class Image:
    id: str
    store: str
    parent: str | None
    disk: str                               # datastore path of the layer's VMDK
    metadata: dict = field(default_factory=dict, compare=False)


class TarStream(io.RawIOBase):
    """A read-only stream over a tar being made (export); closing it stops the work."""

    def __init__(self, chunks):
        self._chunks = chunks
        self._pending = b""

    def readable(self):
        return True

    def readinto(self, buf):
        while not self._pending:
            try:
                self._pending = next(self._chunks)
            except StopIteration:
                return 0
        n = min(len(buf), len(self._pending))
        buf[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def close(self):
        if not self.closed and hasattr(self._chunks, "close"):
            self._chunks.close()
        super().close()


class _Closing:
    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class DataSink(_Closing):
    """Writes into a container's read-write disk (VIC's NewDataSink + Import)."""

    def __init__(self, store, container_id):
        self._store, self.id = store, container_id
        store.get_container(container_id)

    def import_archive(self, spec, reader):
        return self._store.container_import(self.id, reader, spec=spec)


class DataSource(_Closing):
    """Reads an image or a container (VIC's NewDataSource): its tree as a tar, or one path's stat."""

    def __init__(self, store, tree):
        self._store, self._tree = store, tree

    def export(self, spec=None, data=True):
        from .export import export_diff
        return TarStream(export_diff(self._tree, None, spec=spec, data=data))

    def stat(self, path):
        """The stat of ``path`` (relative to the root) in the image."""
        from .tree import ROOT_INO
        ino = ROOT_INO
        for part in [p for p in path.split("/") if p]:
            ino = self._tree.lookup(ino, part.encode())
        return self._tree.stat(ino)


class ImageStore:
    """All image stores of one datastore, with the operations of VIC's port-layer image store."""

    def __init__(self, datastore=None, *, writer=None, workdir=None, options=None):
        """``datastore``: a directory or a vsphere:// URL; ``options``: its settings
        (password_file, ca_file, insecure, cache_size: docs/vsphere.md)."""
        from .datastore import open_datastore
        from .store import ImageStore as _Store
        self._st = _Store(open_datastore(datastore, options), writer_method=writer, workdir=workdir)

    # --- image stores -------------------------------------------------------------------
    def create_image_store(self, name, capacity="8GB"):
        return self._st.create_store(name, capacity=capacity)

    def get_image_store(self, name):
        return self._st.get_store(name)

    def list_image_stores(self):
        return self._st.list_stores()

    def delete_image_store(self, name, force=False):
        self._st.delete_store(name, force=force)

    # --- images -------------------------------------------------------------------------
    def _image(self, img):
        return Image(img.id, img.store, img.parent, img.disk, self._st.metadata(img.store, img.id))

    def write_image(self, parent, image_id, meta, sum, reader):
        """A new layer ``image_id`` on ``parent`` (an Image) from a tar ``reader``, checked
        against ``sum`` ("sha256:<hex>" of the bytes read, or None)."""
        img, _ = self._st.write_image(parent.store, parent.id, image_id, reader, metadata=meta or {},
                                      expected_sum=sum)
        return self._image(img)

    def get_image(self, store, image_id):
        return self._image(self._st.get_image(store, image_id))

    def list_images(self, store, ids=None):
        """Every image but scratch; with ``ids``, those of them that exist."""
        if ids is None:
            return [self._image(i) for i in self._st.list_images(store, include_scratch=False)]
        out = []
        for image_id in ids:
            try:
                out.append(self.get_image(store, image_id))
            except NotFound:
                continue
        return out

    def delete_image(self, image):
        """Delete one image (InUse while it has children, containers or tags); scratch: nothing."""
        if image.id == SCRATCH:
            return None
        self._st.delete_image(image.store, image.id)
        return image

    def delete_branch(self, image, keep=()):
        return self._st.delete_branch(image.store, image.id, keep=set(keep))

    def image_storage_usage(self, store):
        return self._st.usage(store)

    def image_layer_storage_usage(self, store, image_id):
        return self._st.layer_usage(store, image_id)

    def url(self, store, image_id):
        return self._st.url(store, image_id)

    def owners(self, url, filter=None):
        """What uses the image at ``url``, those ``filter`` accepts: containers whose disk is
        a child of it, and on vSphere the VMs whose disks use it (VMOwner: name, power_state)."""
        from urllib.parse import unquote
        path = unquote(url.removeprefix("ds://"))
        out = []
        for c in self._st.list_containers():
            if self._st.datastore_path(c.store, c.image) == path and (filter is None or filter(c)):
                out.append(c)
        disk = self._st.ds.relative_path(path)
        if self._st.ds.vms is not None and disk is not None:
            out += self._st.ds.vms.owners(disk, filter)
        return out

    # --- moving data ----------------------------------------------------------------------
    def export(self, store, image_id, ancestor=None, spec=None, data=True):
        """The tar that turns ``ancestor`` (None: nothing) into the image, as a readable stream."""
        from .export import export_diff
        new = self._st.tree(store, image_id)
        old = self._st.tree(store, ancestor) if ancestor else None
        return TarStream(export_diff(new, old, spec=spec, data=data))

    def import_archive(self, container_id, spec, reader):
        """Copy a tar into a container's disk, like docker cp (VIC's Import); images are sealed."""
        return self._st.container_import(container_id, reader, spec=spec)

    def new_data_sink(self, container_id):
        return DataSink(self._st, container_id)

    def new_data_source(self, store, image_id):
        return DataSource(self._st, self._st.tree(store, image_id))

    def join(self, store, image_id, container_id, vm=None, repo=None):
        """A container's disk as a child of the image; with ``vm`` (vSphere) a disk of that VM."""
        return self._st.join(store, image_id, container_id, vm=vm, repo=repo)

    def detach(self, container_id, vm, destroy=False):
        """Take a joined container's disk off its VM (vSphere); ``destroy`` deletes it too."""
        return self._st.detach(container_id, vm, destroy=destroy)

    def containers(self):
        return self._st.list_containers()

    def remove_container(self, container_id):
        return self._st.remove_container(container_id)

    # --- container images in and out, references ----------------------------------------
    def load(self, store, src, tags=(), name=None, platform=None):
        from .oci.load import load
        return load(self._st, store, src, tags=tags, name=name, platform=platform)

    def save(self, store, ref, output, format="oci"):
        from .oci.save import save
        return save(self._st, store, ref, output, fmt=format)

    def tag(self, store, image_id, ref):
        from .oci.refs import RefStore
        return RefStore(self._st, store).tag(image_id, ref)

    def untag(self, store, ref):
        from .oci.refs import RefStore
        return RefStore(self._st, store).untag(ref)

    def refs(self, store):
        from .oci.refs import RefStore
        return RefStore(self._st, store).list()
