"""A 128-layer chain reads and exports correctly (VIC failed past about 100 layers)."""
import io
import os
import re
import tarfile

import pytest

from imagefs.datastore import open_datastore
from imagefs.export import export_diff
from imagefs.store import ImageStore

from helpers import flattened_mount, make_tar

DEPTH = 128


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("deep") / "ds")
    st = ImageStore(open_datastore(root))
    st.create_store("s", capacity="256MiB")
    parent = "scratch"
    for i in range(1, DEPTH + 1):
        entries = [(f"l{i:03d}", "dir", {}), (f"l{i:03d}/f", "file", {"data": f"layer {i}\n".encode()}),
                   ("shared", "file", {"data": f"written by {i}\n".encode(), "mtime": 1700000000 + i})]
        if i > 2:
            entries.append((f".wh.l{i - 2:03d}", "file", {}))
        st.write_image("s", parent, f"L{i}", io.BytesIO(make_tar(entries)))
        parent = f"L{i}"
    return st


def test_chain_depth_and_content(deep):
    tree = deep.tree("s", f"L{DEPTH}")
    assert len(tree.chain.layers) == DEPTH + 1
    assert len(deep.ancestors("s", f"L{DEPTH}")) == DEPTH
    top = sorted(n.decode() for n, _ in tree.readdir(2) if re.fullmatch(rb"l\d{3}", n))
    assert top == [f"l{DEPTH - 1:03d}", f"l{DEPTH:03d}"]
    assert tree.read(tree.resolve("/shared"), 0, 100) == f"written by {DEPTH}\n".encode()
    assert tree.read(tree.resolve(f"/l{DEPTH:03d}/f"), 0, 100) == f"layer {DEPTH}\n".encode()


def test_deep_chain_matches_qemu(deep):
    """qemu reads the same 129-disk chain to the same tree."""
    tree = deep.tree("s", f"L{DEPTH}")
    with flattened_mount(deep.ds.local_path(f"VIC/s/images/L{DEPTH}/L{DEPTH}.vmdk")) as mnt:
        ours = {p.decode(): (s.mode, s.size if not s.is_dir else 0, s.mtime_ns) for p, s in tree.walk()}
        theirs = {}
        for dirpath, dirnames, filenames in os.walk(mnt):
            for name in dirnames + filenames:
                k = os.lstat(os.path.join(dirpath, name))
                size = 0 if name in dirnames else k.st_size
                theirs["/" + os.path.relpath(os.path.join(dirpath, name), mnt)] = (k.st_mode, size, k.st_mtime_ns)
        assert ours == theirs


def test_deep_chain_exports(deep):
    full = b"".join(export_diff(deep.tree("s", f"L{DEPTH}"), None))
    with tarfile.open(fileobj=io.BytesIO(full)) as tf:
        names = set(tf.getnames())
        assert tf.extractfile("shared").read() == f"written by {DEPTH}\n".encode()
    assert {f"l{DEPTH - 1:03d}/f", f"l{DEPTH:03d}/f"} <= names
    assert not any(n.startswith(f"l{DEPTH - 2:03d}") for n in names)
    last = b"".join(export_diff(deep.tree("s", f"L{DEPTH}"), deep.tree("s", f"L{DEPTH - 1}")))
    with tarfile.open(fileobj=io.BytesIO(last)) as tf:
        names = set(tf.getnames())
    assert {f"l{DEPTH:03d}/f", "shared", f".wh.l{DEPTH - 2:03d}"} <= names
    assert f"l{DEPTH - 1:03d}/f" not in names
