"""Join and detach with VMs: a container's disk made by vSphere as a child of an image.

Kept beside the backend rather than in the image store: the store knows images and
their disks, this knows VMs. ``join_vm`` claims the container's folder with an atomic
MakeDirectory (a second join of the same ID gets Exists), then has the VM create the
disk (ReconfigVM_Task, fileOperation=create, backing.parent = the image's VMDK) and
records the layer ID, image ID and repository name in the VM's extraConfig, as VIC's
Join did in the container's ExecConfig.
"""
from ...errors import Exists, InvalidInput, NotFound

RECORD = "imagefs.join.{container}.{field}"
FIELDS = ("layer_id", "image_id", "repo_name", "store")


def record_keys(container_id):
    return [RECORD.format(container=container_id, field=f) for f in FIELDS]


def join_vm(st, img, container_id, vm, repo=None):
    from ...store import Container, _container_disk

    inventory = st.ds.vms
    if inventory is None:
        raise InvalidInput(f"{st.ds.url}: a local datastore has no VMs to join (--vm needs vsphere://)")
    inventory.find_vm(vm)                       # a clear NotFound before anything is made
    if not st.ds.exists(img.disk):              # vSphere accepts a missing parent without a word
        raise NotFound(f"image {img.id}: disk {img.disk} is missing")
    try:
        st.ds.mkdir(container_id)
    except Exists:
        raise Exists(f"container {container_id} already exists") from None
    disk = _container_disk(container_id)
    record = dict(zip(record_keys(container_id), (img.id, img.id, repo or "", img.store)))
    try:
        inventory.attach_child(vm, img.disk, disk, record)
    except BaseException:
        st.ds.rmtree(container_id)
        raise
    return Container(container_id, img.store, img.id, disk)


def detach_vm(st, container_id, vm, destroy=False):
    """Remove the container's disk from the VM; ``destroy`` also deletes the disk."""
    from ...store import _container_disk

    inventory = st.ds.vms
    if inventory is None:
        raise InvalidInput(f"{st.ds.url}: a local datastore has no VMs (--vm needs vsphere://)")
    inventory.detach(vm, _container_disk(container_id), destroy, record_keys(container_id))
    if destroy:
        st.ds.rmtree(container_id)


def joined_record(st, container_id, vm):
    """What join recorded in the VM for this container: {field: value}."""
    found = st.ds.vms.joined(vm, RECORD.format(container=container_id, field=""))
    return {k.rpartition(".")[2]: v for k, v in found.items() if v}
