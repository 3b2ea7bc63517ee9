"""Datastore.walk: every file and directory of a subtree with its size, in one call."""
import os

import pytest

from imagefs.datastore.local import LocalDatastore
from imagefs.errors import NotFound


def test_walk_lists_everything_below_with_sizes(tmp_path):
    ds = LocalDatastore(str(tmp_path))
    ds.mkdir("VIC/s/images/a/imageMetadata", parents=True)
    ds.mkdir("VIC/s/images/empty", parents=True)
    ds.write_file("VIC/s/images/a/a.vmdk", b"x" * 1000)
    ds.write_file("VIC/s/images/a/manifest", b"")
    ds.write_file("VIC/s/images/a/imageMetadata/k", b"value")
    found = ds.walk("VIC/s/images")
    assert {k: v.size for k, v in found.items() if not v.is_dir} == \
        {"a/a.vmdk": 1000, "a/manifest": 0, "a/imageMetadata/k": 5}
    assert sorted(k for k, v in found.items() if v.is_dir) == ["a", "a/imageMetadata", "empty"]
    assert found["a/a.vmdk"].mtime_ns == os.stat(tmp_path / "VIC/s/images/a/a.vmdk").st_mtime_ns
    # a name pattern keeps what matches, from every directory searched
    assert sorted(ds.walk("VIC", pattern="*.vmdk")) == ["s/images/a/a.vmdk"]
    with pytest.raises(NotFound):
        ds.walk("VIC/nope")
