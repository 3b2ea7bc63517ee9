"""VMs as the owners of layers, and joining a container disk to a VM.

Owners are read live, whoever attached the disk: one PropertyCollector query over a
ContainerView of every VirtualMachine fetches each VM's name, power state and
devices; a VM owns a layer when one of its virtual disks uses the layer's VMDK
directly or anywhere down its ``backing.parent`` chain.

Join adds to a VM a new child disk of an image's VMDK with ReconfigVM_Task
(``fileOperation=create``, ``backing.parent``), as VIC's Join did, and records the
layer ID, image ID and repository name in the VM's extraConfig (VIC kept them in the
container's ExecConfig) under ``imagefs.join.<container>.*``.
"""
import logging
from dataclasses import dataclass

from pyVmomi import vim, vmodl

from ...errors import InUse, NotFound

log = logging.getLogger("imagefs.vsphere")

_PC = vmodl.query.PropertyCollector


@dataclass(frozen=True)
class VMOwner:
    name: str
    power_state: str        # "poweredOn", "poweredOff", "suspended"
    disk: str               # the VM's disk (top of its chain) that reaches the layer


def _backing_chain(backing):
    while backing is not None:
        name = getattr(backing, "fileName", None)
        if name:
            yield name
        backing = getattr(backing, "parent", None)


def _norm(ds_path):
    """"[ds]  a/b.vmdk" -> ("ds", "a/b.vmdk")."""
    ds_path = ds_path.strip()
    if ds_path.startswith("[") and "]" in ds_path:
        name, rest = ds_path[1:].split("]", 1)
        return name, rest.strip().lstrip("/")
    return "", ds_path


class Inventory:
    def __init__(self, ds):
        self.ds = ds
        self.session = ds.session

    # --- reading ------------------------------------------------------------------------------
    def _vms(self, props):
        """[(vm, {prop: value})] of every VM, in one RetrievePropertiesEx (plus continuations)."""
        def query(content):
            view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine], True)
            try:
                spec = _PC.FilterSpec(
                    objectSet=[_PC.ObjectSpec(obj=view, skip=True, selectSet=[
                        _PC.TraversalSpec(name="view", path="view", skip=False, type=vim.view.ContainerView)])],
                    propSet=[_PC.PropertySpec(type=vim.VirtualMachine, pathSet=list(props))])
                pc = content.propertyCollector
                out = []
                result = pc.RetrievePropertiesEx([spec], _PC.RetrieveOptions())
                while result is not None:
                    out.extend((o.obj, {p.name: p.val for p in o.propSet}) for o in result.objects)
                    result = pc.ContinueRetrievePropertiesEx(result.token) if result.token else None
                return out
            finally:
                view.DestroyView()
        return self.session.call(query, "virtual machines")

    def _same_disk(self, a, b):
        (da, pa), (db, pb) = _norm(a), _norm(b)
        names = set(self.ds.names)
        return pa == pb and (da == db or (da in names and db in names))

    def owners(self, disk, filter=None):
        """VMs whose disks use ``disk`` (a datastore-relative path of this datastore) directly
        or through a parent; ``filter(VMOwner) -> bool`` keeps some (e.g. powered on)."""
        return self.owners_of([disk], filter)[disk]

    def owners_of(self, disks, filter=None):
        """``{disk: [VMOwner]}`` for several disks, from one query."""
        wanted = {d: self.ds.datastore_path(d) for d in disks}
        out = {d: [] for d in disks}
        for _, props in self._vms(("name", "runtime.powerState", "config.hardware.device")):
            for dev in props.get("config.hardware.device") or ():
                if not isinstance(dev, vim.vm.device.VirtualDisk):
                    continue
                chain = list(_backing_chain(dev.backing))
                for d, dspath in wanted.items():
                    if any(self._same_disk(f, dspath) for f in chain):
                        owner = VMOwner(props["name"], str(props.get("runtime.powerState")), chain[0])
                        if (filter is None or filter(owner)) and owner.name not in (o.name for o in out[d]):
                            out[d].append(owner)
        return out

    def find_vm(self, name):
        matches = [vm for vm, props in self._vms(("name",)) if props.get("name") == name]
        if not matches:
            raise NotFound(f"virtual machine {name} not found")
        if len(matches) > 1:
            raise InUse(f"virtual machine name {name} is ambiguous ({len(matches)} VMs)")
        return matches[0]

    # --- join and detach -------------------------------------------------------------------------
    def attach_child(self, vm_name, parent_disk, child_disk, record):
        """Add to VM ``vm_name`` a new disk ``child_disk`` (datastore-relative) created as a
        child of ``parent_disk``; ``record`` (key -> text) goes into the VM's extraConfig."""
        vm = self.find_vm(vm_name)
        devices = self.session.call(lambda c: vm.config.hardware.device, vm_name)
        controller = next((d for d in devices if isinstance(d, vim.vm.device.VirtualSCSIController)), None)
        if controller is None:
            raise NotFound(f"virtual machine {vm_name} has no SCSI controller to attach a disk to")
        used = {d.unitNumber for d in devices if getattr(d, "controllerKey", None) == controller.key}
        used.add(7)                                     # the controller's own unit
        unit = next((u for u in range(16) if u not in used), None)
        if unit is None:
            raise InUse(f"virtual machine {vm_name}: no free unit on its SCSI controller")
        backing = vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
            fileName=self.ds.datastore_path(child_disk), datastore=self.ds.mo, diskMode="persistent",
            thinProvisioned=True,
            parent=vim.vm.device.VirtualDisk.FlatVer2BackingInfo(fileName=self.ds.datastore_path(parent_disk),
                                                                 datastore=self.ds.mo))
        disk = vim.vm.device.VirtualDisk(key=-100, controllerKey=controller.key, unitNumber=unit, backing=backing)
        change = vim.vm.device.VirtualDeviceSpec(operation="add", fileOperation="create", device=disk)
        spec = vim.vm.ConfigSpec(deviceChange=[change],
                                 extraConfig=[vim.option.OptionValue(key=k, value=v) for k, v in record.items()])
        self.session.run_task(lambda c: vm.ReconfigVM_Task(spec), f"join {child_disk} to {vm_name}", safe=False)

    def detach(self, vm_name, child_disk, destroy, record_keys=()):
        """Remove the VM's disk ``child_disk``; ``destroy`` deletes its files too."""
        vm = self.find_vm(vm_name)
        target = self.ds.datastore_path(child_disk)
        devices = self.session.call(lambda c: vm.config.hardware.device, vm_name)
        disk = next((d for d in devices if isinstance(d, vim.vm.device.VirtualDisk)
                     and self._same_disk(getattr(d.backing, "fileName", ""), target)), None)
        if disk is None:
            raise NotFound(f"virtual machine {vm_name} has no disk {target}")
        change = vim.vm.device.VirtualDeviceSpec(operation="remove", device=disk)
        if destroy:
            change.fileOperation = "destroy"
        spec = vim.vm.ConfigSpec(deviceChange=[change],
                                 extraConfig=[vim.option.OptionValue(key=k, value="") for k in record_keys])
        self.session.run_task(lambda c: vm.ReconfigVM_Task(spec), f"detach {child_disk} from {vm_name}",
                              safe=False)

    def joined(self, vm_name, prefix):
        """The VM's extraConfig entries under ``prefix``."""
        vm = self.find_vm(vm_name)
        config = self.session.call(lambda c: vm.config.extraConfig, vm_name) or ()
        return {o.key: o.value for o in config if o.key.startswith(prefix)}

