"""Stores whose layers are ESXi delta formats, stores copied off VMFS datastores, and
parent hints that try to leave the datastore: through the store API, the CLI and a mount."""
import io
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from imagefs.datastore import open_datastore
from imagefs.errors import CorruptDisk
from imagefs.store import ImageStore
from imagefs.vmdk.hints import resolve_hint

from imagefs.export import export_diff

from export_helpers import dump_tree, members
from fuse_fixtures import dump, mounted
from helpers import make_tar
from vmdk_fixtures import qemu_raw, run, set_value, assert_reads_equal

SMALL = "96MiB"
BLOB = bytes(range(256)) * 4096 * 3           # 3 MiB, spans many grains


def tar1():
    return make_tar([("etc/app", "dir", {}), ("etc/app/blob", "file", {"data": BLOB}),
                     ("etc/app/conf", "file", {"data": b"one\n", "mode": 0o600}),
                     ("bin", "dir", {}), ("bin/tool", "symlink", {"target": "../etc/app/conf"})])


def tar2():
    return make_tar([("etc/app/conf", "file", {"data": b"two\n"}), ("etc/app/.wh.blob", "file", {}),
                     ("var", "dir", {}), ("var/log", "file", {"data": os.urandom(200_000)})])


TARS = {"l1": tar1(), "l2": tar2()}
_TAR_PATHS = {b"etc/app/blob", b"etc/app/conf", b"bin/tool", b"var/log"}


def tree_of(st, image):
    """dump_tree of an image, without the times that depend on when scratch or a layer was made."""
    out = {}
    for path, entry in dump_tree(st.tree("s", image)).items():
        entry = dict(entry)
        if path not in _TAR_PATHS:
            entry.pop("mtime_ns", None)
        out[path] = entry
    return out


def make_store(root, fmt, layers=("l1", "l2")):
    st = ImageStore(open_datastore(root))
    st.create_store("s", capacity=SMALL, disk_format=fmt)
    parent = "scratch"
    for name in layers:
        st.write_image("s", parent, name, io.BytesIO(TARS[name]))
        parent = name
    return st


@pytest.fixture(scope="module")
def mono(tmp_path_factory):
    """The reference: the same layers in monolithicSparse."""
    return make_store(str(tmp_path_factory.mktemp("mono") / "ds"), "monolithicSparse")


def disk(root, image):
    return os.path.join(root, "VIC", "s", "images", image, f"{image}.vmdk")


@pytest.mark.parametrize("fmt", ["vmfsSparse", "seSparse"])
def test_store_in_esxi_format_reads_as_monolithic_sparse(tmp_path, mono, fmt):
    root = str(tmp_path / "ds")
    st = make_store(root, fmt)
    assert st.disk_format("s") == fmt
    scratch = st.open_chain(st.get_image("s", "scratch").disk)
    assert [d.create_type for d in scratch.layers] == [fmt, "vmfs"]     # a delta of a thin base
    for image in ("l1", "l2"):
        info = st.disk_info(st.get_image("s", image).disk)
        assert info.create_type == fmt and info.parent_path() == f"VIC/s/images/{'scratch' if image == 'l1' else 'l1'}/" \
            f"{'scratch' if image == 'l1' else 'l1'}.vmdk"
        run(["qemu-img", "check", disk(root, image)])
        assert tree_of(st, image) == tree_of(mono, image)
    assert_reads_equal(st.tree("s", "l2").chain, qemu_raw(root, "VIC/s/images/l2/l2.vmdk", str(tmp_path / "q.raw")))
    assert st.get_image("s", "l2").parent == "l1"
    # the layer diff (same-chain fast path over written grains) is the same as in monolithicSparse
    assert _export(st, "l2", "l1") == _export(mono, "l2", "l1")


def _export(st, image, ancestor):
    data = b"".join(export_diff(st.tree("s", image), st.tree("s", ancestor)))
    return {name: (info.type, info.mode, info.size, body) for name, (info, body) in members(data).items()}


def _convert_base(root, fmt, tmp):
    """Replace scratch by the same disk in ``fmt`` (same CID, so its children stay valid)."""
    d = os.path.join(root, "VIC", "s", "images", "scratch")
    old = os.path.join(d, "scratch.vmdk")
    cid = re.search(rb"\nCID=([0-9a-f]+)", open(old, "rb").read(4096)).group(1).decode()
    conv = os.path.join(tmp, "conv")
    os.makedirs(conv)
    if fmt == "vmfsThin":
        run(["qemu-img", "convert", "-f", "vmdk", "-O", "raw", old, os.path.join(conv, "scratch-flat.vmdk")])
        shutil.copy(old, os.path.join(conv, "scratch.vmdk"))
        text = ('# Disk DescriptorFile\nversion=1\nCID=%s\nparentCID=ffffffff\ncreateType="vmfsThin"\n\n'
                'RW %d VMFS "scratch-flat.vmdk"\n' % (cid, os.path.getsize(os.path.join(conv, "scratch-flat.vmdk")) // 512))
        open(os.path.join(conv, "scratch.vmdk"), "w").write(text)
    else:
        run(["qemu-img", "convert", "-f", "vmdk", "-O", "vmdk", "-o", f"subformat={fmt}", old,
             os.path.join(conv, "scratch.vmdk")])
        new = os.path.join(conv, "scratch.vmdk")
        if fmt == "streamOptimized":        # embedded descriptor, NUL-padded: rewrite it in place
            with open(new, "r+b") as f:
                head = f.read(65536)
                start = head.index(b"# Disk DescriptorFile")
                end = head.index(b"\0", start)
                text = re.sub(rb"\nCID=[0-9a-f]+\n", b"\nCID=" + cid.encode() + b"\n", head[start:end])
                f.seek(start)
                f.write(text)
        else:
            set_value(new, "CID", cid)
    os.unlink(old)
    for name in os.listdir(conv):
        shutil.move(os.path.join(conv, name), os.path.join(d, name))


@pytest.mark.parametrize("base_fmt", ["streamOptimized", "monolithicFlat", "twoGbMaxExtentSparse", "vmfsThin"])
def test_any_readable_base_is_read_and_can_be_a_parent(tmp_path, mono, base_fmt):
    """scratch in another format under the same l1: l1 reads the same, and a vmfsSparse
    l2 written on it (through a stand-in chain where qemu cannot open vmfsThin) too."""
    root = str(tmp_path / "ds")
    st = make_store(root, "monolithicSparse", layers=("l1",))
    _convert_base(root, base_fmt, str(tmp_path))
    st = ImageStore(open_datastore(root))
    assert st.disk_info(st.get_image("s", "scratch").disk).create_type == base_fmt
    assert tree_of(st, "l1") == tree_of(mono, "l1")
    open(os.path.join(root, "VIC", "s", "diskFormat"), "w").write("vmfsSparse\n")
    st.write_image("s", "l1", "l2", io.BytesIO(TARS["l2"]))
    assert st.disk_info(st.get_image("s", "l2").disk).create_type == "vmfsSparse"
    assert tree_of(st, "l2") == tree_of(mono, "l2")


def _vmfs_hints(root):
    """Rewrite the store's hints as ESXi writes them on datastore "datastore1"."""
    set_value(disk(root, "l1"), "parentFileNameHint", '"[datastore1] VIC/s/images/scratch/scratch.vmdk"')
    set_value(disk(root, "l2"), "parentFileNameHint",
              '"/vmfs/volumes/5f3c1a2b-0e0d4c6a-8f1e-000c29aabbcc/VIC/s/images/l1/l1.vmdk"')


def test_store_copied_off_vmfs_mounts_unchanged(tmp_path, mono):
    root = str(tmp_path / "ds")
    make_store(root, "vmfsSparse")
    _vmfs_hints(root)
    st = ImageStore(open_datastore(root))
    assert [st.get_image("s", i).parent for i in ("l1", "l2")] == ["scratch", "l1"]
    assert tree_of(st, "l2") == tree_of(mono, "l2")
    # a new layer on it: qemu cannot follow these hints, the writer gets a stand-in chain
    st.write_image("s", "l2", "l3", io.BytesIO(TARS["l1"]))
    assert st.get_image("s", "l3").parent == "l2"
    assert tree_of(st, "l3")[b"etc/app/blob"] == tree_of(mono, "l1")[b"etc/app/blob"]
    # the same store read through a mount
    with mounted(root, str(tmp_path / "mnt")) as mnt:
        assert _mount_dump(mnt) == _mount_dump_of(mono.ds.root, tmp_path / "mnt-mono")
        info = json.load(open(os.path.join(mnt, "s", "images", "l2", "info.json")))
        assert info["disk-format"] == "vmfsSparse" and info["extents"] == ["VIC/s/images/l2/l2-delta.vmdk"]
        assert os.getxattr(os.path.join(mnt, "s", "images", "scratch"), "user.imagefs.disk-format") == b"vmfsSparse"


def _mount_dump_of(root, mnt):
    with mounted(root, str(mnt)) as mnt:
        return _mount_dump(mnt)


def _mount_dump(mnt):
    out = dump(os.path.join(mnt, "s", "images", "l2", "rootfs"), times=False, blocks=False)
    for path, entry in out.items():
        if path.encode() not in _TAR_PATHS:
            entry.pop("mtime")
    return out


def test_datastore_names_limit_absolute_hints(tmp_path):
    root = str(tmp_path / "ds")
    make_store(root, "seSparse")
    _vmfs_hints(root)
    ds = open_datastore(root)
    ds.hint_names = ("datastore1", "5f3c1a2b-0e0d4c6a-8f1e-000c29aabbcc")
    assert ImageStore(ds).get_image("s", "l2").parent == "l1"
    ds.hint_names = ("datastore2",)
    with pytest.raises(CorruptDisk, match=r"points to datastore '5f3c1a2b-.*', not to this one \(datastore2\); refused"):
        ImageStore(ds).tree("s", "l2")


def test_hint_escaping_the_datastore_is_refused(tmp_path):
    """A relative hint with enough ../ once read a disk outside the datastore into the export."""
    outside = make_store(str(tmp_path / "outside"), "monolithicSparse", layers=())
    outside.write_image("s", "scratch", "secret", io.BytesIO(make_tar([("secret.txt", "file",
                                                                          {"data": b"TOP SECRET\n"})])))
    root = str(tmp_path / "ds")
    st = make_store(root, "monolithicSparse", layers=())
    evil = os.path.join(root, "VIC", "s", "images", "evil")
    os.makedirs(os.path.join(evil, "imageMetadata"))
    hint = os.path.relpath(disk(str(tmp_path / "outside"), "secret"), evil)
    assert hint.startswith("../../../../../outside/")
    run(["qemu-img", "create", "-q", "-f", "vmdk", "-b", hint, "-F", "vmdk", os.path.join(evil, "evil.vmdk")])
    open(os.path.join(evil, "manifest"), "w").close()
    with pytest.raises(CorruptDisk, match=r"evil/evil.vmdk: parent hint '\.\./\.\./.*' points outside "
                                          r"the datastore; refused"):
        st.tree("s", "evil")
    proc = subprocess.run([sys.executable, "-m", "imagefs", "--datastore", root, "export", "s", "evil"],
                          capture_output=True)
    assert proc.returncode == 1 and b"TOP SECRET" not in proc.stdout and proc.stdout == b""
    assert len(proc.stderr.splitlines()) == 1 and b"points outside the datastore" in proc.stderr


@pytest.mark.parametrize("hint,expected", [
    ("base.vmdk", "d/c/base.vmdk"),
    ("../b/b.vmdk", "d/b/b.vmdk"),
    ("/vmfs/volumes/ds1/d/b/b.vmdk", "d/b/b.vmdk"),
    ("/vmfs/volumes/uuid-1/x.vmdk", "x.vmdk"),
    ("[ds1] d/b/b.vmdk", "d/b/b.vmdk"),
    ("[ds1]d/b/./b.vmdk", "d/b/b.vmdk"),
])
def test_hint_forms_resolve_inside(hint, expected):
    assert resolve_hint("d/c/c.vmdk", hint, None) == expected
    assert resolve_hint("d/c/c.vmdk", hint, ("ds1", "uuid-1")) == expected


@pytest.mark.parametrize("hint", ["../../../x.vmdk", "/etc/passwd", "/vmfs/volumes/ds1/../../x.vmdk",
                                  "/vmfs/volumes/../x.vmdk", "[ds1] ../x.vmdk", "[ds1] /etc/x.vmdk",
                                  "[other] d/x.vmdk", "/vmfs/volumes/other/x.vmdk", "C:\\x.vmdk", "", "../../..",
                                  "/vmfs/volumes/ds1", "[] x.vmdk"])
def test_hint_forms_refused(hint):
    with pytest.raises(CorruptDisk, match="refused"):
        resolve_hint("d/c/c.vmdk", hint, ("ds1",))


def test_cli_store_format_and_image_info(tmp_path):
    def cli(*args, ok=True):
        proc = subprocess.run([sys.executable, "-m", "imagefs", "--datastore", str(tmp_path / "ds"), *args],
                              capture_output=True, text=True)
        assert (proc.returncode == 0) == ok, proc.stderr
        return proc
    cli("store", "create", "s", "--capacity", SMALL, "--disk-format", "seSparse")
    tar = tmp_path / "l1.tar"
    tar.write_bytes(TARS["l1"])
    cli("image", "write", "s", "scratch", "l1", str(tar))
    info = cli("image", "info", "s", "l1").stdout
    assert "format:     seSparse\n" in info and "extents:    VIC/s/images/l1/l1-sesparse.vmdk\n" in info
    facts = json.loads(cli("image", "info", "s", "l1", "--json").stdout)
    assert facts["format"] == "seSparse" and facts["extents"] == ["VIC/s/images/l1/l1-sesparse.vmdk"]
    info = cli("image", "info", "s", "scratch").stdout
    assert "format:     seSparse\n" in info and "extents:    VIC/s/images/scratch/scratch-sesparse.vmdk\n" in info
    bad = cli("store", "create", "t", "--disk-format", "vmfsThin", ok=False)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def test_scratch_on_a_zero_extent_base(tmp_path, mono):
    """The base a remote datastore gets without a thin-disk call: one ZERO extent, no
    file. Reads as the flat base does, and takes layers (qemu through a stand-in)."""
    root = str(tmp_path / "ds")
    make_store(root, "vmfsSparse", layers=("l1",))
    d = os.path.join(root, "VIC", "s", "images", "scratch")
    base = os.path.join(d, "scratch-base.vmdk")
    text = open(base).read()
    sectors = re.search(r'RW (\d+) VMFS "scratch-base-flat.vmdk"', text).group(1)
    open(base, "w").write(text.replace(f'RW {sectors} VMFS "scratch-base-flat.vmdk"', f"RW {sectors} ZERO"))
    os.unlink(os.path.join(d, "scratch-base-flat.vmdk"))
    st = ImageStore(open_datastore(root))
    assert tree_of(st, "l1") == tree_of(mono, "l1")
    st.write_image("s", "l1", "l2", io.BytesIO(TARS["l2"]))
    assert tree_of(st, "l2") == tree_of(mono, "l2")
