"""Datastores: where image stores live. The image store talks only to this interface.

Paths are datastore-relative POSIX strings ("VIC/<store>/images/<id>/<id>.vmdk").
"""
from .base import Datastore, FileInfo, ReadHandle, open_datastore  # noqa: F401
