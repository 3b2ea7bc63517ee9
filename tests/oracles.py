"""Independent tar readers and appliers to check exports against.

``umoci_apply`` stacks layer tars with umoci (Debian ``umoci``, Go, its own
whiteout/opaque/hardlink/xattr handling, nothing shared with imagefs): the tars are
wrapped in a hand-made OCI image layout (blobs, config with diff_ids, manifest,
index.json) and ``umoci raw unpack`` writes the resulting root filesystem.
``gnu_tar`` and ``bsdtar`` run the two common tar implementations.
"""
import hashlib
import json
import os
import subprocess

LAYER = "application/vnd.oci.image.layer.v1.tar"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"


def _blob(layout, data, media_type):
    digest = hashlib.sha256(data).hexdigest()
    with open(os.path.join(layout, "blobs", "sha256", digest), "wb") as f:
        f.write(data)
    return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data)}


def oci_layout(layout, layers):
    """An OCI image layout at ``layout`` whose image ``latest`` is the given layer tars, bottom first."""
    os.makedirs(os.path.join(layout, "blobs", "sha256"))
    with open(os.path.join(layout, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    descs = [_blob(layout, data, LAYER) for data in layers]
    config = {"architecture": "amd64", "os": "linux", "config": {},
              "rootfs": {"type": "layers", "diff_ids": [d["digest"] for d in descs]}}
    manifest = {"schemaVersion": 2, "mediaType": MANIFEST,
                "config": _blob(layout, json.dumps(config).encode(), CONFIG), "layers": descs}
    entry = _blob(layout, json.dumps(manifest).encode(), MANIFEST)
    entry["annotations"] = {"org.opencontainers.image.ref.name": "latest"}
    with open(os.path.join(layout, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "manifests": [entry]}, f)


def umoci_apply(workdir, layers):
    """The root filesystem umoci makes of ``layers`` (tar bytes, bottom first); returns its path."""
    layout, rootfs = os.path.join(workdir, "oci"), os.path.join(workdir, "rootfs")
    oci_layout(layout, layers)
    proc = subprocess.run(["umoci", "raw", "unpack", "--image", f"{layout}:latest", rootfs],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return rootfs


def gnu_tar(*args, tar_bytes=None):
    proc = subprocess.run(["tar", *args], input=tar_bytes, capture_output=True)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return proc.stdout.decode("utf-8", "surrogateescape")


def bsdtar(*args, tar_bytes=None):
    proc = subprocess.run(["bsdtar", *args], input=tar_bytes, capture_output=True)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return proc.stdout.decode("utf-8", "surrogateescape")
