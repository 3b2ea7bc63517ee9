"""Datastores: where image stores live. The image store talks only to this interface.

Backends register a URL scheme here: plain paths (and file://) are local directories,
vsphere://USER@HOST[:PORT]/DATACENTER/DATASTORE[/PATH] is a vSphere datastore (its
modules load only when such a URL is opened).
"""
from .base import Datastore, FileInfo, ReadHandle, open_datastore, register  # noqa: F401
from .local import LocalDatastore


def _open_vsphere(spec, options):
    from .vsphere import open_vsphere
    return open_vsphere(spec, options)


register("", LocalDatastore.open)
register("file", LocalDatastore.open)
register("vsphere", _open_vsphere)
