"""image load: multi-platform indexes (--platform) and loads running side by side."""
import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import threading

import pytest

from oci_fixtures import imagefs

from imagefs.datastore.local import LocalDatastore
from imagefs.oci.platform import host_platform

HOST = str(host_platform())
PLATFORMS = sorted({HOST, "linux/amd64", "linux/arm64/v8", "linux/arm/v7"})
MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def sha(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def put_blob(root, data):
    os.makedirs(root / "blobs" / "sha256", exist_ok=True)
    (root / "blobs" / "sha256" / sha(data).split(":")[1]).write_bytes(data)
    return {"digest": sha(data), "size": len(data)}


def layer_tar(text):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo("etc/platform")
        info.size, info.mtime = len(text), 1700000000
        tf.addfile(info, io.BytesIO(text.encode()))
    return buf.getvalue()


def platform_image(root, plat):
    """A one-layer image whose /etc/platform names its platform: (manifest descriptor, diffID, blob digest)."""
    os_name, arch, *variant = plat.split("/")
    tar = layer_tar(plat + "\n")
    layer = put_blob(root, gzip.compress(tar, mtime=0))
    config = {"os": os_name, "architecture": arch, "rootfs": {"type": "layers", "diff_ids": [sha(tar)]}}
    platform = {"os": os_name, "architecture": arch}
    if variant:                 # in the index only: configs often leave it out, the index's counts
        platform["variant"] = variant[0]
    manifest = {"schemaVersion": 2, "mediaType": MT_MANIFEST,
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                           **put_blob(root, json.dumps(config).encode())},
                "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **layer}]}
    desc = {"mediaType": MT_MANIFEST, **put_blob(root, json.dumps(manifest).encode()), "platform": platform}
    return desc, sha(tar), layer["digest"]


def multi_platform_layout(root, nested):
    """An OCI layout with one image for each of PLATFORMS, tagged 1.0: in a nested index (as
    registries serve them and `skopeo copy --all` writes them) or each listed in index.json itself
    with its platform (which the image spec allows)."""
    root.mkdir()
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    built = {p: platform_image(root, p) for p in PLATFORMS}
    tag = {"annotations": {"org.opencontainers.image.ref.name": "1.0"}}
    entries = [desc for desc, _, _ in built.values()]
    if nested:
        index = json.dumps({"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": entries}).encode()
        top = [{"mediaType": MT_INDEX, **put_blob(root, index), **tag}]
    else:
        top = [{**desc, **tag} for desc in entries]
    (root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": top}))
    layer_ids = {p: diff_id.split(":")[1] for p, (_, diff_id, _) in built.items()}   # the layer image IDs
    return layer_ids, {p: blob for p, (_, _, blob) in built.items()}


@pytest.mark.parametrize("nested", [True, False], ids=["nested-index", "flat-index"])
def test_multi_platform_index_loads_the_hosts_or_the_chosen_platform(tmp_path, nested):
    ids, blobs = multi_platform_layout(tmp_path / "multi", nested)
    ds = tmp_path / "ds"
    imagefs(ds, "store", "create", "s", "--capacity", "256MiB")
    (out,) = json.loads(imagefs(ds, "image", "load", "s", str(tmp_path / "multi"), "--json").stdout)
    assert out["image"] == ids[HOST] and out["layers"] == [ids[HOST]] and out["refs"] == ["multi:1.0"]
    for plat in ("linux/arm64", "linux/arm64/v8", "linux/arm/v7"):
        (out,) = json.loads(imagefs(ds, "image", "load", "s", str(tmp_path / "multi"), "--platform", plat,
                                    "--name", plat.replace("/", "-"), "--json").stdout)
        want = plat if plat.count("/") == 2 else "linux/arm64/v8"
        assert out["image"] == ids[want]
        exported = imagefs(ds, "export", "s", out["image"], "-o", str(tmp_path / "x.tar")).returncode
        with tarfile.open(tmp_path / "x.tar") as tf:
            assert exported == 0 and tf.extractfile("etc/platform").read() == f"{want}\n".encode()
    if nested:      # skopeo, independently, picks the same manifest for a platform
        inspect = json.loads(subprocess.run(["skopeo", "inspect", "--override-arch", "arm", "--override-variant",
                                             "v7", f"oci:{tmp_path / 'multi'}:1.0"], check=True,
                                            capture_output=True, text=True).stdout)
        assert inspect["Architecture"] == "arm" and inspect["Layers"] == [blobs["linux/arm/v7"]]

    proc = imagefs(ds, "image", "load", "s", str(tmp_path / "multi"), "--platform", "linux/s390x", ok=False)
    assert proc.returncode == 3 and proc.stderr.count("\n") == 1, proc.stderr
    assert "no linux/s390x image" in proc.stderr and "linux/arm/v7" in proc.stderr and "--platform" in proc.stderr
    proc = imagefs(ds, "image", "load", "s", str(tmp_path / "multi"), "--platform", "linux/arm/v6", ok=False)
    assert proc.returncode == 3 and "no linux/arm/v6 image" in proc.stderr
    proc = imagefs(ds, "image", "load", "s", str(tmp_path / "multi"), "--platform", "linux", ok=False)
    assert proc.returncode == 2 and "OS/ARCH[/VARIANT]" in proc.stderr
    assert len(imagefs(ds, "image", "ls", "s", "-q").stdout.split()) == 1 + 3


def test_platform_of_an_archive_without_index_is_checked_against_its_config(tmp_path):
    ids, _ = multi_platform_layout(tmp_path / "multi", nested=True)
    archive = tmp_path / "arm.tar"
    subprocess.run(["skopeo", "copy", "-q", "--override-arch", "arm", "--override-variant", "v7",
                    f"oci:{tmp_path / 'multi'}:1.0", f"docker-archive:{archive}:example/arm:1"], check=True)
    ds = tmp_path / "ds"
    imagefs(ds, "store", "create", "s", "--capacity", "256MiB")
    proc = imagefs(ds, "image", "load", "s", str(archive), "--platform", "linux/amd64", ok=False)
    assert proc.returncode == 3 and "no linux/amd64 image (it has linux/arm)" in proc.stderr, proc.stderr
    (out,) = json.loads(imagefs(ds, "image", "load", "s", str(archive), "--platform", "linux/arm",
                                "--json").stdout)
    assert out["image"] == ids["linux/arm/v7"] and out["refs"] == ["docker.io/example/arm:1"]


def umoci(*args):
    subprocess.run(["umoci", *args], check=True, capture_output=True)


def two_images_sharing_a_base(where):
    """Two OCI layouts made with umoci, one image each: the same base layer, a different top."""
    a, b = where / "a", where / "b"
    umoci("init", "--layout", str(a))
    umoci("new", "--image", f"{a}:t")
    umoci("unpack", "--image", f"{a}:t", str(where / "base"))
    root = where / "base" / "rootfs"
    for i in range(200):
        (root / f"file{i:03d}").write_bytes(os.urandom(20000))
    umoci("repack", "--image", f"{a}:t", str(where / "base"))
    subprocess.run(["cp", "-a", str(a), str(b)], check=True)
    for layout in (a, b):
        bundle = where / f"top-{layout.name}"
        umoci("unpack", "--image", f"{layout}:t", str(bundle))
        (bundle / "rootfs" / "top").write_text(layout.name)
        umoci("repack", "--image", f"{layout}:t", str(bundle))
    index = json.loads((a / "index.json").read_text())
    manifest = json.loads((a / "blobs" / "sha256" / index["manifests"][0]["digest"][7:]).read_text())
    config = json.loads((a / "blobs" / "sha256" / manifest["config"]["digest"][7:]).read_text())
    return a, b, config["rootfs"]["diff_ids"][0][7:]


def test_two_loads_of_images_sharing_a_new_layer_both_succeed(tmp_path):
    a, b, base = two_images_sharing_a_base(tmp_path)
    ds = tmp_path / "ds"
    imagefs(ds, "store", "create", "s", "--capacity", "256MiB")
    store = LocalDatastore(str(ds))
    store.mkdir("VIC/s/blobs/locks", parents=True)
    # Hold the base layer's lock until both loads wait for it: then one writes the layer
    # while the other waits, and reuses it.
    with store.lock(f"VIC/s/blobs/locks/{base[:2]}"):
        procs = [subprocess.Popen([sys.executable, "-m", "imagefs", "-v", "--datastore", str(ds), "image", "load",
                                   "s", str(src), "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for src in (a, b)]
        waiting = [threading.Event() for _ in procs]
        logs = [[] for _ in procs]

        def read(i):
            for line in procs[i].stderr:
                logs[i].append(line)
                if "waiting for another load" in line:
                    waiting[i].set()

        readers = [threading.Thread(target=read, args=(i,)) for i in range(2)]
        for t in readers:
            t.start()
        assert all(w.wait(60) for w in waiting), logs
    outs = [json.loads(p.stdout.read()) for p in procs]
    for p, t in zip(procs, readers):
        assert p.wait(120) == 0
        t.join()
    assert all(out[0]["layers"][0] == base for out in outs), outs
    assert sorted(out[0]["written"] for out in outs) == [1, 2], outs
    assert sorted(imagefs(ds, "image", "ls", "s", "-q").stdout.split()) == sorted(
        ["scratch", base, outs[0][0]["image"], outs[1][0]["image"]])
