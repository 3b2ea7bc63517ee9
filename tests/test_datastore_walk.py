"""Datastore.walk: every file of a subtree with its size, in one call."""
import os

import pytest

from imagefs.datastore.base import Datastore
from imagefs.datastore.local import LocalDatastore
from imagefs.errors import NotFound


def test_walk_lists_every_file_below_with_sizes(tmp_path):
    ds = LocalDatastore(str(tmp_path))
    ds.mkdir("VIC/s/images/a/imageMetadata", parents=True)
    ds.mkdir("VIC/s/images/empty", parents=True)
    ds.write_file("VIC/s/images/a/a.vmdk", b"x" * 1000)
    ds.write_file("VIC/s/images/a/manifest", b"")
    ds.write_file("VIC/s/images/a/imageMetadata/k", b"value")
    found = ds.walk("VIC/s/images")
    assert {k: v.size for k, v in found.items()} == {"a/a.vmdk": 1000, "a/manifest": 0, "a/imageMetadata/k": 5}
    assert found["a/a.vmdk"].mtime_ns == os.stat(tmp_path / "VIC/s/images/a/a.vmdk").st_mtime_ns
    # the interface's own walk (for backends without one) answers the same sizes
    generic = Datastore.walk(ds, "VIC/s/images")
    assert {k: v.size for k, v in generic.items()} == {k: v.size for k, v in found.items()}
    with pytest.raises(NotFound):
        ds.walk("VIC/nope")
