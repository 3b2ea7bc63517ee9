"""image load / save with real images: umoci and skopeo as independent tools on Debian package content."""
import json
import os
import shutil
import subprocess

import pytest

from fuse_fixtures import dump, mounted
from oci_fixtures import TAG, imagefs, oci_images  # noqa: F401

from imagefs.scratch import SKELETON_DIRS, SKELETON_FILES, SKELETON_SYMLINKS

NAME = "example/app"
# umoci applies a whiteout that comes after its directory's entry by emptying the directory
# in place, leaving the directory's mtime at the time of unpacking, not the layer's
UMOCI_TOUCHED = {"usr/share/doc"}
SKELETON = {"lost+found"} | {p for p, _ in SKELETON_DIRS + SKELETON_FILES + SKELETON_SYMLINKS}


def tree(root):
    return dump(root, times=False, blocks=False, dir_sizes=False)


def assert_same_tree_but_scratch(mounted_tree, other):
    """``other`` (an image unpacked elsewhere) is the mounted image without scratch's own skeleton."""
    extra = set(mounted_tree) - set(other)
    assert extra <= SKELETON, sorted(extra - SKELETON)[:10]
    assert set(other) <= set(mounted_tree), sorted(set(other) - set(mounted_tree))[:10]
    for path, entry in other.items():
        mine = dict(mounted_tree[path])
        theirs = dict(entry)
        if path in SKELETON:        # directories shared with scratch: their entry counts differ
            mine.pop("nlink"), theirs.pop("nlink")
        if path in UMOCI_TOUCHED:
            mine.pop("mtime"), theirs.pop("mtime")
        assert mine == theirs, path


@pytest.fixture(scope="module")
def ds(tmp_path_factory, oci_images):  # noqa: F811
    ds = tmp_path_factory.mktemp("oci-ds") / "ds"
    imagefs(ds, "store", "create", "s", "--capacity", "256MiB")
    out = imagefs(ds, "image", "load", "s", oci_images["oci"], "--name", NAME, "--json")
    (loaded,) = json.loads(out.stdout)
    assert loaded["refs"] == [f"{NAME}:{TAG}"] and loaded["written"] == 3
    return ds


@pytest.fixture(scope="module")
def top(ds):
    return json.loads(imagefs(ds, "image", "info", "s", f"{NAME}:{TAG}", "--json").stdout)["id"]


@pytest.fixture(scope="module")
def mnt(ds, tmp_path_factory):
    with mounted(ds, tmp_path_factory.mktemp("oci-mnt") / "mnt") as m:
        yield m


def rootfs(mnt, image, store="s"):
    return os.path.join(mnt, store, "images", image, "rootfs")


def test_loaded_image_is_what_umoci_unpacks(mnt, top, oci_images):  # noqa: F811
    ours = tree(rootfs(mnt, top))
    assert_same_tree_but_scratch(ours, tree(oci_images["rootfs"]))
    assert os.listdir(os.path.join(rootfs(mnt, top), "usr/share/doc")) == ["README.layer3"]
    assert os.listdir(os.path.join(rootfs(mnt, top), "usr/share/zoneinfo/America")) == ["Only"]
    assert not os.path.exists(os.path.join(rootfs(mnt, top), "usr/share/zoneinfo/Europe"))


def test_layers_are_chain_ids_and_reused_across_formats(ds, top, oci_images):  # noqa: F811
    info = json.loads(imagefs(ds, "image", "info", "s", top, "--json").stdout)
    assert len(info["ancestors"]) == 3 and info["ancestors"][-1] == "scratch"
    out = json.loads(imagefs(ds, "image", "load", "s", oci_images["docker"], "--json").stdout)
    assert out == [{"image": top, "refs": [f"docker.io/{NAME}:{TAG}"], "layers": [*reversed(info["ancestors"][:-1]), top],
                    "written": 0}]
    assert json.loads(imagefs(ds, "image", "load", "s", oci_images["zstd"], "--name", NAME,
                              "--json").stdout)[0]["written"] == 0


def test_zstd_layers_load_to_the_same_image(tmp_path, top, oci_images):  # noqa: F811
    imagefs(tmp_path, "store", "create", "z", "--capacity", "256MiB")
    (out,) = json.loads(imagefs(tmp_path, "image", "load", "z", oci_images["zstd"], "--json").stdout)
    assert out["image"] == top and out["written"] == 3 and out["refs"] == [f"oci-zstd:{TAG}"]


def test_a_corrupt_layer_is_refused_and_leaves_nothing(tmp_path, oci_images):  # noqa: F811
    bad = tmp_path / "bad"
    shutil.copytree(oci_images["oci"], bad)
    blobs = sorted((bad / "blobs" / "sha256").iterdir(), key=lambda p: p.stat().st_size)
    layer = blobs[-1]                                  # the biggest blob: layer 1
    data = bytearray(layer.read_bytes())
    data[len(data) // 2] ^= 0xFF
    layer.write_bytes(bytes(data))
    ds = tmp_path / "ds"
    imagefs(ds, "store", "create", "s", "--capacity", "256MiB")
    proc = imagefs(ds, "image", "load", "s", str(bad), ok=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "digest mismatch" in proc.stderr
    assert imagefs(ds, "image", "ls", "s", "-q").stdout == "scratch\n"


def test_save_oci_is_deterministic_and_skopeo_and_umoci_take_it(ds, mnt, top, tmp_path):
    a, b = tmp_path / "a.tar", tmp_path / "b.tar"
    digest = imagefs(ds, "image", "save", "s", f"{NAME}:{TAG}", "-o", str(a)).stdout.strip()
    assert imagefs(ds, "image", "save", "s", f"{NAME}:{TAG}", "-o", str(b)).stdout.strip() == digest
    assert a.read_bytes() == b.read_bytes()
    layout = tmp_path / "layout"
    assert imagefs(ds, "image", "save", "s", top, "-o", str(layout)).stdout.strip() == digest
    inspect = json.loads(subprocess.run(["skopeo", "inspect", f"oci:{layout}:{TAG}"], check=True,
                                        capture_output=True, text=True).stdout)
    assert inspect["Digest"] == digest and len(inspect["Layers"]) == 3
    subprocess.run(["skopeo", "copy", "-q", f"oci-archive:{a}:{TAG}", f"dir:{tmp_path / 'copy'}"], check=True)
    subprocess.run(["umoci", "unpack", "--image", f"{layout}:{TAG}", tmp_path / "bundle"], check=True,
                   capture_output=True)
    assert_same_tree_but_scratch(tree(rootfs(mnt, top)), tree(tmp_path / "bundle" / "rootfs"))


def test_docker_archive_round_trip(ds, mnt, top, tmp_path):
    archive = tmp_path / "app.tar"
    imagefs(ds, "image", "save", "s", f"{NAME}:{TAG}", "-o", str(archive), "--format", "docker-archive")
    inspect = json.loads(subprocess.run(["skopeo", "inspect", f"docker-archive:{archive}"], check=True,
                                        capture_output=True, text=True).stdout)
    assert len(inspect["Layers"]) == 3 and inspect["Os"] == "linux"
    imagefs(ds, "store", "create", "back", "--capacity", "256MiB")
    (out,) = json.loads(imagefs(ds, "image", "load", "back", str(archive), "--json").stdout)
    assert out["refs"] == [f"{NAME}:{TAG}"] and out["written"] == 3
    back, original = tree(rootfs(mnt, out["image"], "back")), tree(rootfs(mnt, top))
    for t in (back, original):          # each store's scratch was made at its own time
        for path in SKELETON & set(t):
            t[path].pop("mtime")
    assert back == original


def test_tags_in_the_cli_and_the_mount(ds, mnt, top):
    imagefs(ds, "image", "tag", "s", f"{NAME}:{TAG}", "plain")            # :latest added
    imagefs(ds, "image", "tag", "s", top, "localhost:5000/team/app:v1")
    rows = {r["id"]: r["refs"] for r in json.loads(imagefs(ds, "image", "ls", "s", "--json").stdout)}
    assert {f"{NAME}:{TAG}", "localhost:5000/team/app:v1", "plain:latest"} <= set(rows[top])
    assert "plain:latest" in imagefs(ds, "image", "ls", "s").stdout
    refs = os.path.join(mnt, "s", "refs")
    assert {"example", "localhost:5000", "plain:latest"} <= set(os.listdir(refs))
    link = os.path.join(refs, "localhost:5000", "team", "app:v1")
    assert os.readlink(link) == f"../../../images/{top}"
    assert os.path.samefile(link, os.path.join(mnt, "s", "images", top))
    assert os.path.isdir(os.path.join(refs, "plain:latest", "rootfs", "usr"))
    with pytest.raises(OSError):
        os.symlink("x", os.path.join(refs, "new:tag"))                   # read-only
    proc = imagefs(ds, "image", "rm", "s", top, ok=False)
    assert proc.returncode == 4 and "untag it first" in proc.stderr
    imagefs(ds, "image", "untag", "s", "plain")
    imagefs(ds, "image", "untag", "s", "localhost:5000/team/app:v1")
    assert imagefs(ds, "image", "untag", "s", "plain", ok=False).returncode == 3
    assert "invalid reference" in imagefs(ds, "image", "tag", "s", top, "Bad Name", ok=False).stderr
    assert wait_gone(os.path.join(refs, "plain:latest"))


def wait_gone(path):
    import time
    for _ in range(40):
        if not os.path.lexists(path):
            return True
        time.sleep(0.1)
    return False
