"""Real OCI images for the load/save tests, built once per session with Debian's tools.

The rootfs is real Debian package content: the files of installed packages (tzdata,
base-files, debianutils, sed, grep, gzip; ``dpkg -L``, copied with their modes,
owners, symlinks and hardlinks), no network needed. umoci makes the layers:

1. that tree;
2. deletions (a whole zoneinfo region, single files), changed and new files;
3. a hand-made layer added raw: an opaque directory (``.wh..wh..opq``) refilled, and
   ``usr/share/doc/`` entries of this layer followed by ``usr/share/.wh.doc``.

skopeo converts it: zstd layers, and a ``docker save`` archive.
"""
import io
import os
import subprocess
import sys
import tarfile

import pytest

PACKAGES = ("tzdata", "base-files", "debianutils", "sed", "grep", "gzip")
TAG = "t"


def imagefs(ds, *args, ok=True):
    """Run the CLI on datastore ``ds``; with ``ok``, it must succeed."""
    proc = subprocess.run([sys.executable, "-m", "imagefs", "--datastore", str(ds), *args],
                          capture_output=True, text=True)
    if ok:
        assert proc.returncode == 0, proc.stderr
    return proc


def run(*argv, **kw):
    proc = subprocess.run(argv, capture_output=True, text=True, **kw)
    assert proc.returncode == 0, f"{argv}: {proc.stderr}"
    return proc.stdout


def _package_tree(dest):
    paths = set()
    for pkg in PACKAGES:
        for line in run("dpkg", "-L", pkg).splitlines():
            parent = os.path.dirname(line)
            if line.startswith("/") and line != "/." and os.path.lexists(line) \
                    and os.path.realpath(parent) == parent:       # not through merged-/usr links
                paths.add(line.lstrip("/"))
    listing = os.path.join(os.path.dirname(dest), "paths")
    with open(listing, "w") as f:
        f.write("\n".join(sorted(paths)) + "\n")
    os.makedirs(dest)
    run("bash", "-c", f"tar -C / --no-recursion -cf - -T {listing} | tar -C {dest} -xpf -")


def _opaque_layer():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        def add(name, kind=tarfile.REGTYPE, data=b"", mode=0o644):
            ti = tarfile.TarInfo(name)
            ti.type, ti.mode, ti.mtime, ti.size = kind, mode, 1700000000, len(data)
            tf.addfile(ti, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
        add("usr/share/zoneinfo/America/", tarfile.DIRTYPE, mode=0o750)
        add("usr/share/zoneinfo/America/.wh..wh..opq")
        add("usr/share/zoneinfo/America/Only", data=b"the only zone left\n")
        add("usr/share/doc/", tarfile.DIRTYPE, mode=0o755)        # before the whiteout: still stays
        add("usr/share/doc/README.layer3", data=b"layer 3's own doc\n")
        add("usr/share/.wh.doc")
    return buf.getvalue()


def build_images(where):
    """{name: path}: 'oci' (gzip layers, ref TAG), 'zstd', 'docker' (archive), 'rootfs' (umoci unpack)."""
    tree = os.path.join(where, "tree")
    _package_tree(tree)
    oci = os.path.join(where, "oci")
    ref = f"{oci}:{TAG}"
    run("umoci", "init", "--layout", oci)
    run("umoci", "new", "--image", ref)
    bundle = os.path.join(where, "bundle")
    run("umoci", "unpack", "--image", ref, bundle)
    run("bash", "-c", f"cp -a {tree}/. {bundle}/rootfs/")
    run("umoci", "repack", "--image", ref, bundle)
    bundle = os.path.join(where, "bundle2")
    run("umoci", "unpack", "--image", ref, bundle)
    root = os.path.join(bundle, "rootfs")
    run("rm", "-rf", f"{root}/usr/share/zoneinfo/Europe", f"{root}/etc/debian_version")
    with open(f"{root}/etc/issue", "a") as f:
        f.write("changed by layer 2\n")
    os.makedirs(f"{root}/opt/app")
    with open(f"{root}/opt/app/run", "w") as f:
        f.write("#!/bin/sh\necho app\n")
    os.chmod(f"{root}/opt/app/run", 0o755)
    os.symlink("../../usr/bin/sed", f"{root}/opt/app/sed")
    run("umoci", "repack", "--image", ref, bundle)
    layer3 = os.path.join(where, "layer3.tar")
    with open(layer3, "wb") as f:
        f.write(_opaque_layer())
    run("umoci", "raw", "add-layer", "--image", ref, layer3)
    unpacked = os.path.join(where, "unpacked")
    run("umoci", "unpack", "--image", ref, unpacked)
    zstd = os.path.join(where, "oci-zstd")
    run("skopeo", "copy", "-q", "--dest-compress-format", "zstd", f"oci:{ref}", f"oci:{zstd}:{TAG}")
    docker = os.path.join(where, "image.tar")
    run("skopeo", "copy", "-q", f"oci:{ref}", f"docker-archive:{docker}:example/app:{TAG}")
    return {"oci": oci, "zstd": zstd, "docker": docker, "rootfs": os.path.join(unpacked, "rootfs")}


_BUILT = {}


@pytest.fixture(scope="session")
def oci_images(tmp_path_factory):
    if "images" not in _BUILT:
        _BUILT["images"] = build_images(str(tmp_path_factory.mktemp("oci-images")))
    return _BUILT["images"]
