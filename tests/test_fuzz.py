"""Corrupt disks and filesystems (issue 7 item 4): a short seeded fuzz run of the VMDK, ext4
and tar readers, and the bugs it found, each as a crafted input that must give a clear error:
one line and exit 1 through the CLI, EIO and one log line through the mount while the rest is
served. The long campaign is ``python -m fuzz.run`` (docs/reliability.md)."""
import errno
import os
import shutil
import struct
import subprocess
import sys

import pytest

from fuse_fixtures import mounted, wait_for

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from fuzz.mutate import SECTOR, vmdk_regions  # noqa: E402
from fuzz.seeds import BASE, CHILD, STORE, seeds  # noqa: E402
from fuzz.targets import RawChain, sparse_vmdk  # noqa: E402
from imagefs import ext4  # noqa: E402
from imagefs.tree import ImageTree  # noqa: E402

CACHE = os.environ.get("IMAGEFS_FUZZ_CACHE", "/var/tmp/imagefs-fuzz")
IMAGEFS = [sys.executable, "-m", "imagefs"]


def test_a_short_fuzz_run_finds_nothing(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fuzz.run", "all", "--runs", "30", "--seed", "7",
                           "--crashes", str(tmp_path / "crashes"), "--timeout", "60"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if " executions, " in ln]
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [ln.split(":")[0] for ln in lines] == ["ext4", "tar", "vmdk"]
    for ln in lines:
        assert "30 executions" in ln and " 0 failures" in ln
        assert int(ln.split(", ")[1].split()[0]) > 0, ln      # the mutations do reach the readers


# --- crafted inputs: the bugs the campaign found ----------------------------------------------
@pytest.fixture(scope="module")
def seed_dir():
    return seeds(CACHE)


def disk(ds, image):
    return os.path.join(ds, "VIC", STORE, "images", image, f"{image}.vmdk")


def copy_seed(seed_dir, where):
    ds = os.path.join(where, "ds")
    shutil.copytree(os.path.join(seed_dir, "ds"), ds)
    return ds


def patch_vmdk(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def descriptor(path):
    with open(path, "rb") as f:
        data = f.read(1 << 20)
    (start, length), = vmdk_regions(data)["descriptor"]
    return start, data[start:start + length].split(b"\0", 1)[0].decode()


def with_base_ext4(seed_dir, ds, change):
    """Rewrite the base layer with ``change(raw bytearray, tree of the seed)`` applied to its ext4."""
    with open(os.path.join(seed_dir, "base.raw"), "rb") as f:
        raw = bytearray(f.read())
    change(raw, ImageTree(RawChain(bytes(raw)), name="seed"))
    cid = descriptor(disk(ds, BASE))[1].split("CID=", 1)[1][:8]
    with open(disk(ds, BASE), "wb") as f:
        f.write(sparse_vmdk(bytes(raw), cid))


def inode_offset(tree, ino):
    geo = tree.geo
    group, index = divmod(ino - 1, geo.inodes_per_group)
    return geo.inode_tables[group] * geo.block_size + index * geo.inode_size


def dir_loop(raw, tree):
    """An entry of /many names the root directory: the walk would never end."""
    geo = tree.geo
    runs, _ = ext4.extent_map(geo, geo.record(tree.resolve("many")))
    block = runs[0][1] * geo.block_size
    name = raw.index(b"file-with-a-longish-name-0000", block)
    struct.pack_into("<I", raw, name - 8, 2)
    raw[name - 1] = 2                                          # file type: directory


def huge_symlink(raw, tree):
    """The slow symlink claims 1 GiB of target."""
    struct.pack_into("<I", raw, inode_offset(tree, tree.resolve("slow-link")) + 4, 1 << 30)


def bad_block_size(raw, tree):
    struct.pack_into("<I", raw, 1024 + 24, 30)                  # s_log_block_size


def self_parent(ds):
    """The child's descriptor names itself as its parent, with a matching parentCID."""
    start, text = descriptor(disk(ds, CHILD))
    cid = text.split("\nCID=", 1)[1][:8]
    lines = [f"parentCID={cid}" if ln.startswith("parentCID=") else
             'parentFileNameHint="child.vmdk"' if ln.startswith("parentFileNameHint=") else ln
             for ln in text.split("\n")]
    new = "\n".join(lines).encode()
    patch_vmdk(disk(ds, CHILD), start, new + bytes(max(0, len(text) - len(new))))


def huge_gd_offset(ds):
    patch_vmdk(disk(ds, CHILD), 56, struct.pack("<Q", 1 << 60))


CASES = {
    "grain directory far beyond the file": (lambda seed, ds: huge_gd_offset(ds), "grain directory offset"),
    "a disk that is its own parent": (lambda seed, ds: self_parent(ds), "loop"),
    "a directory loop": (lambda seed, ds: with_base_ext4(seed, ds, dir_loop), "reached twice"),
    "a 1 GiB symlink": (lambda seed, ds: with_base_ext4(seed, ds, huge_symlink), "symlink inode"),
    "an impossible block size": (lambda seed, ds: with_base_ext4(seed, ds, bad_block_size), "block size"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_corrupt_disk_is_one_line_and_exit_1_through_the_cli(seed_dir, tmp_path, case):
    corrupt, reason = CASES[case]
    ds = copy_seed(seed_dir, tmp_path)
    corrupt(seed_dir, ds)
    outs = [subprocess.run(IMAGEFS + ["--datastore", ds, *args], capture_output=True, text=True, timeout=120)
            for args in (["image", "info", STORE, CHILD], ["export", STORE, CHILD, "-o", str(tmp_path / "x.tar")],
                         ["export", STORE, CHILD, "--ancestor", BASE, "-o", str(tmp_path / "y.tar")],
                         ["export", STORE, BASE, "-o", str(tmp_path / "z.tar")])]
    failed = [p for p in outs if p.returncode != 0]
    assert failed, f"{case}: nothing noticed"
    for p in outs:
        assert p.returncode in (0, 1) and len(p.stderr.splitlines()) <= 1, p.stderr
        assert "Traceback" not in p.stderr
    assert any(reason in p.stderr for p in failed), [p.stderr for p in failed]
    assert not os.path.exists(tmp_path / "x.tar.part")


def test_a_corrupt_file_is_eio_and_one_log_line_while_the_rest_is_served(seed_dir, tmp_path):
    ds = copy_seed(seed_dir, tmp_path)
    with_base_ext4(seed_dir, ds, huge_symlink)
    log = tmp_path / "imagefs.log"
    with mounted(ds, tmp_path / "mnt", options=("allow_other", f"log={log}")) as m:
        base = os.path.join(m, STORE, "images", BASE, "rootfs")
        root = os.path.join(m, STORE, "images", CHILD, "rootfs")
        for _ in range(3):
            with pytest.raises(OSError) as e:
                os.readlink(os.path.join(base, "slow-link"))
            assert e.value.errno == errno.EIO
        with open(os.path.join(root, "data", "hardlink"), "rb") as f:
            assert f.read() == bytes(range(256)) * 800
        with open(os.path.join(root, "new", "file"), "rb") as f:
            assert f.read() == b"n" * 70000
        assert os.readlink(os.path.join(root, "fast-link")) == "../data/medium"
        with pytest.raises(OSError) as e:
            with open(os.path.join(m, STORE, "images", BASE, "rootfs.tar"), "rb") as f:
                f.read()
        assert e.value.errno == errno.EIO
        assert len(os.listdir(os.path.join(root, "many"))) == 300
        assert wait_for(lambda: "slow-link" in log.read_text() or "symlink inode" in log.read_text())
        lines = [ln for ln in log.read_text().splitlines() if "symlink inode" in ln and "readlink" in ln]
        assert len(lines) == 1, lines


@pytest.mark.parametrize("field", ["uid", "gid"])
def test_a_negative_owner_in_a_tar_is_one_line(tmp_path, field):
    """Found by the campaign: a base-256 negative uid reached chown and raised OverflowError."""
    import io
    import tarfile
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        ti = tarfile.TarInfo("f")
        setattr(ti, field, -5)
        tf.addfile(ti, io.BytesIO(b""))
    tar = tmp_path / "neg.tar"
    tar.write_bytes(buf.getvalue())
    ds = str(tmp_path / "ds")
    assert subprocess.run(IMAGEFS + ["--datastore", ds, "store", "create", "s", "--capacity", "64MiB"]).returncode == 0
    proc = subprocess.run(IMAGEFS + ["--datastore", ds, "image", "write", "s", "scratch", "x", str(tar)],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and proc.stderr.splitlines() == [f"imagefs: f: {field} -5 is out of range"]
