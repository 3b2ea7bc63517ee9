"""``imagefs store check [--repair] [--json]``: every image verified, leftovers listed, only debris repaired."""
import json
import os
import re
import signal
import subprocess
import sys

import pytest

from fuse_fixtures import wait_for
from helpers import make_tar

from imagefs.layer.recover import recover_work_dirs
from reliability.harness import leftovers

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (FUSE, loop mounts)")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Store:
    def __init__(self, tmp):
        self.ds, self.work = str(tmp / "ds"), str(tmp / "work")
        os.mkdir(self.work)
        self.images = os.path.join(self.ds, "VIC", "s", "images")
        self.tar = str(tmp / "l.tar")
        with open(self.tar, "wb") as f:
            f.write(make_tar([("d", "dir", {}), *[(f"d/f{i}", "file", {"data": os.urandom(30000)})
                                                  for i in range(40)]]))

    def env(self, **extra):
        return dict(os.environ, IMAGEFS_WORKDIR=self.work, **extra)

    def run(self, *args, ok=True, env=None):
        proc = subprocess.run([sys.executable, "-m", "imagefs", "--datastore", self.ds, *args], capture_output=True,
                              text=True, env=env or self.env(), cwd=ROOT)
        if ok:
            assert proc.returncode == 0, proc.stderr
        return proc

    def check(self, *flags):
        return self.run("store", "check", "s", *flags, ok=False)


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path)
    s.run("store", "create", "s", "--capacity", "256MiB")
    s.run("image", "write", "s", "scratch", "base", s.tar)
    s.run("image", "write", "s", "base", "top", s.tar)
    yield s
    recover_work_dirs(s.work)                   # a failed test must not leave a killed writer's mounts


def test_healthy_store(store):
    proc = store.check()
    assert proc.returncode == 0
    assert proc.stdout.splitlines() == ["store s: 3 images checked, 0 problems"]
    report = json.loads(store.check("--json").stdout)
    assert report == {"store": "s", "images_checked": 3, "in_progress": [], "ok": True, "problems": []}


def test_killed_writer_is_listed_then_repaired(store):
    proc = subprocess.run([sys.executable, "-m", "imagefs", "--datastore", store.ds, "image", "write", "s", "base",
                           "dead", store.tar], env=store.env(IMAGEFS_CRASH_AT="extract:20"), cwd=ROOT)
    assert proc.returncode == -signal.SIGKILL
    # qsd follows its parent (SIGTERM); the mounts stay
    assert wait_for(lambda: not any(line.startswith("process") for line in leftovers(store.work, store.ds)))
    before = leftovers(store.work, store.ds)
    assert any(line.startswith("mount") for line in before)
    proc = store.check()
    assert proc.returncode == 1
    lines = proc.stdout.splitlines()
    assert any(re.match(r".*/imagefs-layer-\w+: dead-writer: .*\(debris: --repair removes it\)$", line)
               for line in lines), lines
    assert "s/dead: half-made: no manifest and no live writer: a killed or failed write " \
           "(debris: --repair removes it)" in lines
    assert lines[-1] == "store s: 3 images checked, 2 problems"
    assert leftovers(store.work, store.ds) == before            # a check alone changes nothing
    proc = store.check("--repair")
    assert proc.returncode == 0, proc.stdout
    assert all(line.endswith("(repaired)") for line in proc.stdout.splitlines()[:-1])
    assert leftovers(store.work, store.ds) == []
    assert store.check().returncode == 0


def test_small_debris(store):
    top = os.path.join(store.images, "top")
    for name in ("manifest.tmp-999999999", "imageMetadata/k.tmp-999999999", ".writing"):
        open(os.path.join(top, name), "w").close()
    report = json.loads(store.check("--json").stdout)
    assert sorted((p["where"], p["kind"], p["repairable"]) for p in report["problems"]) == [
        ("s/top", "stale-claim", True),
        ("s/top/imageMetadata/k.tmp-999999999", "temporary-file", True),
        ("s/top/manifest.tmp-999999999", "temporary-file", True)]
    assert not report["ok"]
    assert store.check("--repair").returncode == 0
    assert sorted(os.listdir(top)) == ["imageMetadata", "manifest", "top.vmdk"]


def test_a_live_writer_is_not_a_problem(store):
    writer = subprocess.Popen([sys.executable, "-m", "imagefs", "--datastore", store.ds, "image", "write", "s",
                               "base", "live", "-"], stdin=subprocess.PIPE, env=store.env(), cwd=ROOT,
                              stdout=subprocess.DEVNULL)
    try:
        with open(store.tar, "rb") as f:
            data = f.read()
        writer.stdin.write(data[:100000])
        writer.stdin.flush()
        assert wait_for(lambda: os.path.exists(os.path.join(store.images, "live", ".writing")))
        for flags in ((), ("--repair",)):
            report = json.loads(store.check("--json", *flags).stdout)
            assert (report["ok"], report["in_progress"], report["problems"]) == (True, ["live"], [])
        writer.stdin.write(data[100000:])
        writer.stdin.close()
        assert writer.wait(60) == 0
    finally:
        writer.kill()
    assert store.check().returncode == 0


def _problems(store):
    proc = store.check("--no-data")
    assert proc.returncode == 1
    return proc.stdout.splitlines()[:-1]


def test_truncated_disk_is_corrupt(store):
    disk = os.path.join(store.images, "top", "top.vmdk")
    os.truncate(disk, os.path.getsize(disk) - 200000)
    [line] = _problems(store)
    assert line.startswith("s/top: corrupt-disk: ") and "beyond the end of the file" in line


def test_changed_parent_breaks_the_chain(store):
    disk = os.path.join(store.images, "base", "base.vmdk")
    with open(disk, "r+b") as f:
        head = f.read(1 << 16)
        m = re.search(rb"(?m)^CID=([0-9a-fA-F]{1,8})$", head)   # qemu writes it unpadded: 1 to 8 digits
        cid = m.group(1)
        f.seek(m.start(1))
        f.write(cid[:-1] + (b"0" if cid[-1:] != b"0" else b"1"))     # same length: another CID
    [line] = _problems(store)
    assert line.startswith("s/top: broken-chain: ") and "parentCID" in line


def test_missing_pieces(store):
    os.rmdir(os.path.join(store.images, "base", "imageMetadata"))
    os.unlink(os.path.join(store.images, "top", "manifest"))
    lines = _problems(store)
    assert "s/base: missing-metadata: imageMetadata/ is missing" in lines
    assert any(line.startswith("s/top: half-made:") for line in lines)


def test_unreadable_tree(store):
    """The block of directory d that the top layer holds itself, overwritten with garbage."""
    from imagefs import ext4
    from imagefs.datastore import open_datastore
    from imagefs.store import ImageStore
    tree = ImageStore(open_datastore(store.ds), recover=False).tree("s", "top")
    rec = tree.geo.record(tree.resolve("d"))
    [(_lblk, pblk, _count)] = ext4.extent_map(tree.geo, rec)[0][:1]
    offset = pblk * tree.block_size
    top = tree.chain.layers[0].extents[0]                    # the layer's own sparse extent
    grain, within = divmod(offset, top.grain_size)
    sector = top.table(grain // top.entries)[grain % top.entries]
    assert sector > 0                                        # the top layer rewrote d's block
    with open(os.path.join(store.images, "top", "top.vmdk"), "r+b") as f:
        f.seek(sector * 512 + within)
        f.write(b"\xff" * tree.block_size)
    [line] = _problems(store)
    assert line.startswith("s/top: unreadable-tree: ") and "directory" in line
