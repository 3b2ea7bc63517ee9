"""Concurrency soak (issue 7 item 6), the 60-second version of bench/soak.py: a mount and the
CLI on one datastore, 8 parallel imports, exports and readers of the same images, rmdir of
images being read or imported into, store creation and deletion, with a fixed seed. Only the
documented errors, every image verified against its tars, descriptors and RSS within fixed
bounds however many images the mount opened."""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "bench"))
from soak import MADE_AGAIN, Image, Soak, resource_problems  # noqa: E402


def test_sixty_seconds_of_everything_at_once(tmp_path):
    out = tmp_path / "soak.json"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "bench", "soak.py"), "--seconds", "60", "--seed", "1",
                           "--json", str(out), "--work", str(tmp_path / "work")],
                          capture_output=True, text=True, timeout=900)
    summary = json.loads(out.read_text())
    assert summary["failures"] == [], summary["failures"]
    assert proc.returncode == 0, proc.stderr[-2000:]
    ops = summary["ops"]
    # everything ran, and the busy cases were refused as documented
    assert ops["import (mount)"]["ok"] > 0 and ops["import (CLI)"]["ok"] > 0
    assert ops["read"]["ok"] > 0 and ops["export"]["ok"] > 0
    assert ops["delete while busy"] == {"EBUSY": ops["delete while busy"]["EBUSY"]}
    assert ops["import (mount)"].get("EEXIST", 0) + ops["import (CLI)"].get("EEXIST", 0) > 0
    outcomes = {o for kind in ops.values() for o in kind}
    assert outcomes <= {"ok", "EBUSY", "EEXIST", "ENOTEMPTY", "ENOENT (deleted meanwhile)",
                        "ENOENT (not made yet)", MADE_AGAIN}, outcomes
    assert summary["images_verified"] > 20
    # descriptors, memory and threads stayed within fixed margins over the idle daemon, however
    # many images it opened (bench/soak.py resource_problems: the disk pool's MAX_OPEN layer files,
    # the read cache's budget; a problem there is one of the failures above). Before the shared
    # disk pool, this run's descriptors grew by about 6 per image opened (190 -> 746).
    idle, images = summary["idle"], summary["images"]
    assert images[1] - images[0] > 50, summary["samples"]       # enough new images to show a leak
    assert summary["max"]["fds"] > idle["fds"], summary         # the images' layers were opened


def test_a_read_of_an_image_the_soak_deleted_is_judged_by_the_incarnation_it_read(tmp_path):
    """The soak's own race (a 60-s run failed with "read c2: ENOENT"): a reader picked c2, the
    soak deleted c2, and an import reusing the ID on purpose (expecting EEXIST) then made a new
    c2, replacing c2's entry in the soak's books before the reader judged its ENOENT. The reader
    looked at the new, committed entry and called the ENOENT a failure; it must look at the
    incarnation it read. A read of the new c2 that fails is still one."""
    import argparse
    import errno
    soak = Soak(argparse.Namespace(work=str(tmp_path), imports=1, seed=1, seconds=1))
    rng = __import__("random").Random(1)
    soak.images["c2"] = Image("c2", "scratch", {"d/c2/f0": b"old"})
    picked = soak.pick_image(rng, not_scratch=True)
    assert picked is soak.images["c2"]
    picked.state = "deleted"                                         # the soak's rmdir of c2
    soak.images["c2"] = Image("c2", "scratch", {"d/c2/f0": b"new"})  # the reuse import made it again
    enoent = FileNotFoundError(errno.ENOENT, "No such file or directory")
    soak.outcome("read", enoent, "c2", img=picked)
    soak.wrong("read", "c2/d/c2/f0: wrong content", picked)         # it read the new c2's file
    assert soak.stats.failures == []
    assert soak.stats.ops["read"] == {"ENOENT (deleted meanwhile)": 1, MADE_AGAIN: 1}
    assert soak.expected_files("c2", picked) == {"d/c2/f0": b"old"}
    soak.outcome("read", enoent, "c2", img=soak.images["c2"])      # the new c2, not deleted
    assert len(soak.stats.failures) == 1 and "read c2" in soak.stats.failures[0]


def test_the_resource_check_tells_bounded_from_growing_with_the_images():
    """The check behind the soak's verdict, on the shape of real runs: descriptors and RSS that
    level off at the pool and the cache (10 min after the disk pool) pass; ones that grow with
    the images (10 min before it: about 6 descriptors and 0.14 MB per image) do not."""
    idle = {"fds": 20, "rss_kb": 45 << 10, "threads": 9}

    def run(fds, rss_mb):
        return [{"t": 20 + 10 * i, "images": 80 + 28 * i, "fds": fds(i), "rss_kb": int(rss_mb(i) * 1024),
                 "threads": 12} for i in range(60)]

    bounded = run(lambda i: min(100 + 20 * i, 270) + i % 3 * 10, lambda i: min(75 + 10 * i, 185) + i % 4 * 5)
    assert resource_problems(idle, bounded, 600) == []
    growing = run(lambda i: 370 + 6 * 28 * i, lambda i: 57 + 0.14 * 28 * i)
    problems = resource_problems(idle, growing, 600)
    assert [p.split(":")[0] for p in problems] == ["descriptors", "RSS", "descriptors", "RSS"], problems
    assert "grew by" in problems[2] and "over the bound" in problems[0]
    # a short run is judged by the bounds alone (its caches are not full yet)
    assert [p for p in resource_problems(idle, growing[:6], 60) if "grew by" in p] == []


def test_an_image_with_a_child_made_a_moment_ago_elsewhere_is_not_deleted(tmp_path):
    """Found by the 10-minute soak: the mount's catalogue (kept for a second) did not yet know a
    child the CLI had just sealed, so rmdir deleted its parent and left the child's chain broken."""
    import errno
    import io
    import tarfile
    from fuse_fixtures import mounted

    def layer(name):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tf:
            ti = tarfile.TarInfo(name)
            tf.addfile(ti, io.BytesIO(b""))
        path = tmp_path / f"{name}.tar"
        path.write_bytes(buf.getvalue())
        return str(path)

    ds = str(tmp_path / "ds")
    cli = [sys.executable, "-m", "imagefs", "--datastore", ds]
    subprocess.run(cli + ["store", "create", "s", "--capacity", "64MiB"], check=True, capture_output=True)
    subprocess.run(cli + ["image", "write", "s", "scratch", "parent", layer("p")], check=True, capture_output=True)
    with mounted(ds, tmp_path / "mnt") as m:
        images = os.path.join(m, "s", "images")
        assert sorted(os.listdir(images)) == ["parent", "scratch"]        # the mount's catalogue is built
        subprocess.run(cli + ["image", "write", "s", "parent", "child", layer("c")], check=True, capture_output=True)
        try:
            os.rmdir(os.path.join(images, "parent"))
        except OSError as e:
            assert e.errno == errno.EBUSY
        else:
            raise AssertionError("the parent of a sealed child was deleted")
        with open(os.path.join(images, "child", "rootfs", "c"), "rb") as f:
            assert f.read() == b""


def test_a_clean_up_racing_a_writer_that_just_finished_keeps_its_image(tmp_path):
    """Found by the 60-second soak: `image write` exited 0, then the image was gone. Another
    process's clean-up saw its directory without a manifest, the writer then wrote the
    manifest and removed its claim file, and the clean-up's lock on the claim path (a new
    file by then, so free) let it remove the complete image. Here the clean-up's first look
    is made to come before the manifest, as it did then."""
    import io
    from helpers import make_tar
    from imagefs.datastore import open_datastore
    from imagefs.store import ImageStore, _claim_path

    ds = str(tmp_path / "ds")
    writer, cleaner = ImageStore(open_datastore(ds)), ImageStore(open_datastore(ds))
    writer.create_store("s", capacity=64 << 20)
    writer.write_image("s", "scratch", "x", io.BytesIO(make_tar([("f", "file", {"data": b"kept"})])))
    real_exists, looks = cleaner.ds.exists, []

    def exists(path):                   # the first look at the manifest: before it was written
        if path.endswith("/x/manifest") and not looks:
            looks.append(path)
            return False
        return real_exists(path)

    cleaner.ds.exists = exists
    assert not cleaner._remove_if_debris("s", "x")
    assert looks and [i.id for i in writer.list_images("s")] == ["scratch", "x"]
    tree = writer.tree("s", "x")
    assert tree.read(tree.resolve("f"), 0, 10) == b"kept"
    assert not real_exists(_claim_path("s", "x"))      # the lock file the clean-up made is gone too
