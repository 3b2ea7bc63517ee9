"""The library API (imagefs.ImageStore): the original's operations under Python names."""
import io
import tarfile

import pytest

import imagefs
from imagefs.errors import InUse, NotFound
from imagefs.export import FilterSpec

from helpers import make_tar, sha256


@pytest.fixture
def st(tmp_path):
    return imagefs.ImageStore(str(tmp_path / "ds"))


def test_the_original_operations(st, tmp_path):
    assert st.create_image_store("web", capacity="256MiB") == "web"
    assert st.list_image_stores() == ["web"] and st.get_image_store("web") == "web"
    with pytest.raises(NotFound):
        st.get_image_store("nope")
    scratch = st.get_image("web", "scratch")
    assert scratch.parent is None
    data = make_tar([("etc/app.conf", "file", {"data": b"a=1\n"})])
    a = st.write_image(scratch, "a", {"metaData": b"{}"}, sha256(data), io.BytesIO(data))
    assert (a.id, a.parent, a.metadata) == ("a", "scratch", {"metaData": b"{}"})
    b = st.write_image(a, "b", None, None, io.BytesIO(make_tar([("etc/.wh.app.conf", "file", {})])))
    assert [i.id for i in st.list_images("web")] == ["a", "b"]
    assert [i.id for i in st.list_images("web", ids=["b", "gone"])] == ["b"]
    assert st.image_layer_storage_usage("web", "a") > 0
    assert st.image_storage_usage("web") >= st.image_layer_storage_usage("web", "a")
    assert st.url("web", "b") == "ds://%5Blocal%5D%20VIC/web/images/b/b.vmdk"

    with st.export("web", "b", ancestor="a") as tar, tarfile.open(fileobj=tar, mode="r|") as tf:
        assert [m.name for m in tf] == ["etc", "etc/.wh.app.conf"]
    spec = FilterSpec(inclusions={"etc"}, exclusions={""}, rebase="", strip="")
    with st.export("web", "a", spec=spec) as tar, tarfile.open(fileobj=tar, mode="r|") as tf:
        assert [m.name for m in tf] == ["etc", "etc/app.conf", "etc/hostname", "etc/hosts", "etc/mtab",
                                        "etc/resolv.conf"]
    with st.new_data_source("web", "a") as source:
        assert source.stat("etc/app.conf").size == 4

    c = st.join("web", "a", "c1")
    assert [o.id for o in st.owners(st.url("web", "a"))] == ["c1"]
    assert st.owners(st.url("web", "a"), filter=lambda c: c.id != "c1") == []
    with st.new_data_sink("c1") as sink:
        sink.import_archive(None, io.BytesIO(make_tar([("srv/x", "file", {"data": b"x"})])))
    st.import_archive("c1", FilterSpec(set(), set(), rebase="srv", strip=""),
                      io.BytesIO(make_tar([("y", "file", {"data": b"y"})])))
    with pytest.raises(InUse):
        st.delete_image(a)                                  # children and a container
    st.remove_container(c.id)
    assert st.delete_image(scratch) is None                 # scratch: a no-op, as the original
    assert st.delete_branch(b) == ["b", "a"]
    assert st.list_images("web") == []
    st.delete_image_store("web")
    assert st.list_image_stores() == []
