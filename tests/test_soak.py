"""Concurrency soak (issue 7 item 6), the 60-second version of bench/soak.py: a mount and the
CLI on one datastore, 8 parallel imports, exports and readers of the same images, rmdir of
images being read or imported into, store creation and deletion, with a fixed seed. Only the
documented errors, every image verified against its tars, descriptors and RSS flat."""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
                        "ENOENT (not made yet)"}, outcomes
    assert summary["images_verified"] > 20
    # after the warm-up: threads flat, memory within a few MiB per 10 s, and descriptors grow
    # only with the images (each open tree holds one per layer of its chain; docs/reliability.md)
    fds, rss, images = summary["fds"], summary["rss_mb"], summary["images"]
    assert rss[1] - rss[0] < 32, summary["samples"]
    assert summary["threads"][1] <= summary["threads"][0] + 4
    assert fds[1] - fds[0] <= 8 * max(1, images[1] - images[0]) + 64, summary["samples"]


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
