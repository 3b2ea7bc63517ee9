"""imagefs: layered container image stores on VMDK disks, as a library, a CLI and a FUSE mount.

``imagefs.ImageStore`` is the library API (imagefs/api.py, docs/api.md).
"""


def __getattr__(name):            # lazy: the CLI and the mount import only what they use
    if name in ("ImageStore", "Image", "DataSink", "DataSource", "TarStream"):
        from . import api
        return getattr(api, name)
    raise AttributeError(name)
