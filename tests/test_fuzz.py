"""Corrupt disks and filesystems (issue 7 item 4): a short seeded fuzz run of the VMDK, ext4
and tar readers, and the bugs it found, each as a crafted input that must give a clear error:
one line and exit 1 through the CLI, EIO and one log line through the mount while the rest is
served. The long campaign is ``python -m fuzz.run`` (docs/reliability.md)."""
import errno
import gc
import os
import re
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
    assert [ln.split(":")[0] for ln in lines] == ["ext4", "formats", "tar", "vmdk"]
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


def _write_one_file_tar(tmp_path, **attrs):
    """``image write`` of a GNU tar holding one empty file "f" with ``attrs`` set; the
    process and the store's image IDs after it."""
    import io
    import tarfile
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        ti = tarfile.TarInfo("f")
        for k, v in attrs.items():
            setattr(ti, k, v)
        tf.addfile(ti, io.BytesIO(b""))
    tar = tmp_path / "one.tar"
    tar.write_bytes(buf.getvalue())
    ds = str(tmp_path / "ds")
    assert subprocess.run(IMAGEFS + ["--datastore", ds, "store", "create", "s", "--capacity", "64MiB"]).returncode == 0
    proc = subprocess.run(IMAGEFS + ["--datastore", ds, "image", "write", "s", "scratch", "x", str(tar)],
                          capture_output=True, text=True)
    listed = subprocess.run(IMAGEFS + ["--datastore", ds, "image", "ls", "-q", "s"], capture_output=True,
                            text=True, check=True).stdout
    return proc, listed.split()


@pytest.mark.parametrize("field", ["uid", "gid"])
def test_a_negative_owner_in_a_tar_is_one_line(tmp_path, field):
    """Found by the campaign: a base-256 negative uid reached chown and raised OverflowError."""
    proc, images = _write_one_file_tar(tmp_path, **{field: -5})
    assert proc.returncode != 0 and proc.stderr.splitlines() == [f"imagefs: layer entry 'f': {field} -5 is out of range"]
    assert images == ["scratch"]


@pytest.mark.parametrize("mtime", [1 << 40, (1 << 63) // 10**9 + 1, -(1 << 31) - 1])
def test_a_time_out_of_range_is_one_line(tmp_path, mtime):
    """Found by the campaign: a base-256 mtime or atime of 2**63 ns and more reached the layer
    model's SQLite table as OverflowError; times a layer cannot hold are refused in one line."""
    proc, images = _write_one_file_tar(tmp_path, mtime=mtime)
    assert proc.returncode == 2 and proc.stderr.splitlines() == [
        f"imagefs: layer entry 'f': mtime {mtime} is out of range (a layer holds 1901-12-13 to 2262-04-11)"]
    assert images == ["scratch"]


@pytest.mark.parametrize("mtime", [(1 << 63) // 10**9, -(1 << 31)])
def test_the_times_at_the_ends_of_the_range_are_kept(tmp_path, mtime):
    proc, images = _write_one_file_tar(tmp_path, mtime=mtime)
    assert proc.returncode == 0, proc.stderr
    assert images == ["scratch", "x"]


def test_ctrl_c_stops_a_campaign_started_in_the_background(tmp_path):
    """A shell starts a job put in the background with SIGINT ignored; `kill -INT` (or Ctrl-C
    after `fg`) must still stop the campaign, with its summary line and status 130."""
    import signal
    import time
    seeds(CACHE)
    proc = subprocess.Popen([sys.executable, "-m", "fuzz.run", "tar", "--seconds", "300",
                             "--crashes", str(tmp_path / "crashes")], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        time.sleep(5)
        assert proc.poll() is None, proc.stdout.read()
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, out
    summary = out.strip().splitlines()[-1]
    # what the inputs it reached in 5 s found is the short run's business (a fixed count), not this test's
    assert re.fullmatch(r"tar: \d+ executions, \d+ clear errors, \d+ failures \([\d.]+ s\)", summary), out


# --- crafted inputs of the formats target (fuzz/format_seeds.py) ------------------------------
@pytest.fixture(scope="module")
def format_ds(seed_dir):
    from fuzz.format_seeds import format_seeds
    return os.path.join(format_seeds(os.path.dirname(seed_dir)), "ds")


def copy_store(format_ds, where, store):
    ds = os.path.join(where, "ds")
    shutil.copytree(os.path.join(format_ds, "VIC", store), os.path.join(ds, "VIC", store))
    return ds


def read_everything(ds, store, image):
    """The image's tree walked and exported, as the CLI and the mount would."""
    from imagefs.datastore import open_datastore
    from imagefs.export import export_diff
    from imagefs.store import ImageStore
    tree = ImageStore(open_datastore(ds)).tree(store, image)
    try:
        for chunk in export_diff(tree, None):
            pass
    finally:
        tree.chain.close()


def sesparse_far_grain(path):
    """The first allocated grain-table entry points 2^59 grains away (past any file and
    past what pread takes: OverflowError)."""
    from fuzz.disk_mutate import SES_CONST, _ses_entry
    with open(path, "r+b") as f:
        fields = SES_CONST.unpack(f.read(SES_CONST.size))
        gts = fields[18] * SECTOR
        f.seek(gts)
        table = f.read(4096 * 8)
        first = next(i for i in range(4096) if struct.unpack_from("<Q", table, 8 * i)[0] >> 60 == 3)
        f.seek(gts + 8 * first)
        f.write(struct.pack("<Q", _ses_entry(1 << 59)))


def extent_is_a_directory(path):
    os.unlink(path)
    os.mkdir(path)


FORMAT_CASES = {
    "an SEsparse grain beyond any file": ("sesparse", "l1", "l1-sesparse.vmdk", sesparse_far_grain, "beyond any"),
    "a COWD extent that is a directory": ("vmfssparse", "l1", "l1-delta.vmdk", extent_is_a_directory,
                                          "Is a directory"),
}


@pytest.mark.parametrize("case", sorted(FORMAT_CASES))
def test_found_in_the_formats_campaign(format_ds, tmp_path, case):
    from imagefs.errors import CorruptDisk
    store, image, name, corrupt, reason = FORMAT_CASES[case]
    ds = copy_store(format_ds, tmp_path, store)
    corrupt(os.path.join(ds, "VIC", store, "images", image, name))
    with pytest.raises(CorruptDisk) as e:
        read_everything(ds, store, image)
    assert reason in str(e.value) and name in str(e.value), e.value
    proc = subprocess.run(IMAGEFS + ["--datastore", ds, "export", store, image, "-o", str(tmp_path / "x.tar")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and len(proc.stderr.splitlines()) == 1 and reason in proc.stderr, proc.stderr


def test_extent_lines_naming_one_file_share_one_descriptor(tmp_path):
    """Found checking the caps of the new formats: 60,000 extent lines fit in a descriptor's 1 MiB; each
    opened its file anew, so one disk took every descriptor the process may have (EMFILE
    for everything else the mount was serving) before failing."""
    from imagefs.datastore.local import LocalReadHandle
    from imagefs.vmdk import DiskChain
    data = os.urandom(8 * SECTOR)
    (tmp_path / "f").write_bytes(data)
    lines = ["# Disk DescriptorFile", "version=1", "CID=12345678", "parentCID=ffffffff",
             'createType="twoGbMaxExtentFlat"'] + ['RW 1 FLAT "f" %d' % (i % 8) for i in range(60000)]
    (tmp_path / "d.vmdk").write_text("\n".join(lines) + "\n")
    gc.collect()                # handles other tests left for the collector close now, not during this one
    before = len(os.listdir("/proc/self/fd"))
    chain = DiskChain("d.vmdk", lambda p: LocalReadHandle(os.path.join(tmp_path, p)))
    try:
        assert len(os.listdir("/proc/self/fd")) - before <= 1
        assert chain.size == 60000 * SECTOR
        assert chain.pread(9 * SECTOR + 100, 2 * SECTOR) == (data + data)[9 * SECTOR + 100 - 8 * SECTOR:][:2 * SECTOR]
    finally:
        chain.close()
    assert len(os.listdir("/proc/self/fd")) <= before


def test_extent_lines_naming_one_sparse_file_share_its_tables(format_ds, tmp_path):
    """Found checking the caps: each of 10,000 lines naming one SEsparse file parsed it anew
    with grain-table caches of its own, so reading 39 MiB of the disk kept 348 MiB (a full
    1 MiB descriptor: about 2 GiB) and took 25 s."""
    import tracemalloc
    from imagefs.datastore.local import LocalReadHandle
    from imagefs.vmdk import DiskChain
    shutil.copy(os.path.join(format_ds, "VIC", "sesparse", "images", "l1", "l1-sesparse.vmdk"), tmp_path / "s")
    lines = ["# Disk DescriptorFile", "version=1", "CID=12345678", "parentCID=ffffffff",
             'createType="seSparse"'] + ['RW 8 SESPARSE "s"'] * 10000
    (tmp_path / "d.vmdk").write_text("\n".join(lines) + "\n")
    tracemalloc.start()
    try:
        chain = DiskChain("d.vmdk", lambda p: LocalReadHandle(os.path.join(tmp_path, p)))
        try:
            first = chain.pread(0, 4096)
            for pos in range(0, chain.size, 1 << 20):
                assert chain.pread(pos, 4096) == first       # every line maps the file's first grain
            held = tracemalloc.get_traced_memory()[0]
        finally:
            chain.close()
    finally:
        tracemalloc.stop()
    assert held < 64 << 20, held


def test_a_corrupt_layer_of_one_format_is_eio_while_the_other_formats_are_served(format_ds, tmp_path):
    """Through the mount: an SEsparse layer whose grain lies past any file gives EIO and one
    log line; the vmfsSparse and mixed stores of the same datastore are served meanwhile."""
    ds = os.path.join(tmp_path, "ds")
    for store in ("sesparse", "vmfssparse", "mixed"):
        shutil.copytree(os.path.join(format_ds, "VIC", store), os.path.join(ds, "VIC", store))
    sesparse_far_grain(os.path.join(ds, "VIC", "sesparse", "images", "l1", "l1-sesparse.vmdk"))
    log = tmp_path / "imagefs.log"
    with mounted(ds, tmp_path / "mnt", options=(f"log={log}",)) as m:
        bad = os.path.join(m, "sesparse", "images", "l1", "rootfs")
        for _ in range(3):
            with pytest.raises(OSError) as e:
                os.listdir(bad)
            assert e.value.errno == errno.EIO
        for store, image in (("vmfssparse", "l1"), ("mixed", "l3")):
            root = os.path.join(m, store, "images", image, "rootfs")
            with open(os.path.join(root, "data", "hardlink"), "rb") as f:
                assert f.read() == bytes(range(256)) * 800
            assert len(os.listdir(os.path.join(root, "many"))) == 300
        assert sorted(os.listdir(os.path.join(m, "mixed", "images", "l3", "rootfs", "l3"))) == ["a", "b"]
        assert wait_for(lambda: "beyond any" in log.read_text())
        lines = [ln for ln in log.read_text().splitlines() if "beyond any" in ln]
        assert len(lines) == 1, lines
