#!/usr/bin/env python3
"""The mount daemon's descriptors and memory as images are read (not a test; run as root).

usage: bench_memory.py [DATA_DIR] [--many N] [--keep]   (DATA_DIR default /var/tmp/imagefs-bench)

Two phases on one fresh mount of a datastore kept in /var/tmp/imagefs-bench-memory
(built once, reused; --keep is implied):

  walk   20 images as users have them: layer1.tar (5,000 files) imported on scratch,
         then 19 child layers on top of each other, each changing a few files, so each
         image shows about 5,000 inodes. ``find -ls`` of every image's rootfs, one after
         another: 100,000 inodes across 20 images. Issue 11's goal: daemon RSS < 150 MB.
  many   N more images (default 300), each an empty delta over the one before (chains
         up to N + 21 layers deep, as a store that grows by one layer a day). One file
         of each is stat'ed and read. Descriptors and RSS must stay flat: before the
         layer pool the daemon held one descriptor per layer of every chain it had read.

Samples of the daemon's open descriptors and RSS (VmRSS) after each image, printed
as a table and written as JSON beside the datastore.
"""
import io
import json
import os
import subprocess
import sys
import tarfile
import time

from benchlib import drop_caches, empty_delta_image

DATA = "/var/tmp/imagefs-bench"
WORK = "/var/tmp/imagefs-bench-memory"
PYTHON = sys.executable
STORE = "m"
CHILDREN = 19


def imagefs(*args):
    return subprocess.run([PYTHON, "-m", "imagefs", "--datastore", os.path.join(WORK, "ds"), "-q", *args],
                          check=True, capture_output=True, text=True)


def child_tar(i):
    """A small layer: a few new files and one changed file of layer1's tree."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        ti = tarfile.TarInfo(f"child{i}")
        ti.type, ti.mode = tarfile.DIRTYPE, 0o755
        tf.addfile(ti)
        for k in range(10):
            data = f"child {i} file {k}\n".encode() * 100
            ti = tarfile.TarInfo(f"child{i}/f{k}")
            ti.size, ti.mode = len(data), 0o644
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def images_dir():
    return os.path.join(WORK, "ds", "VIC", STORE, "images")


def ensure_walk_images(data):
    """layer1 on scratch and CHILDREN chained children: the 20 images of the walk phase."""
    ids = ["layer1"] + [f"child{i:02d}" for i in range(1, CHILDREN + 1)]
    if os.path.exists(os.path.join(images_dir(), ids[-1], "manifest")):
        return ids
    subprocess.run(["rm", "-rf", os.path.join(WORK, "ds")], check=True)
    imagefs("store", "create", STORE)
    imagefs("image", "write", STORE, "scratch", "layer1", os.path.join(data, "layer1.tar"))
    for i in range(1, CHILDREN + 1):
        tar = os.path.join(WORK, "child.tar")
        with open(tar, "wb") as f:
            f.write(child_tar(i))
        imagefs("image", "write", STORE, ids[i - 1], ids[i], tar)
        os.unlink(tar)
    return ids


def ensure_many_images(parent, n):
    """``n`` empty deltas, each over the one before (qemu-img, as a writer leaves them)."""
    ids = [f"many{i:04d}" for i in range(n)]
    for i, image_id in enumerate(ids):
        if not os.path.exists(os.path.join(images_dir(), image_id, "manifest")):
            empty_delta_image(images_dir(), image_id, ids[i - 1] if i else parent)
    return ids


class Daemon:
    def __init__(self, mnt):
        self.pid = int(os.getxattr(mnt, "user.imagefs.pid"))

    def sample(self):
        fds = len(os.listdir(f"/proc/{self.pid}/fd"))
        with open(f"/proc/{self.pid}/status") as f:
            rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        return fds, rss / 1024


def main(argv):
    data, many = DATA, 300
    if "--many" in argv:
        i = argv.index("--many")
        many = int(argv[i + 1])
        del argv[i:i + 2]
    argv = [a for a in argv if a != "--keep"]
    if argv:
        data = argv[0]
    os.makedirs(WORK, exist_ok=True)
    walk_ids = ensure_walk_images(data)
    many_ids = ensure_many_images(walk_ids[-1], many)
    mnt = os.path.join(WORK, "mnt")
    os.makedirs(mnt, exist_ok=True)
    drop_caches()
    imagefs("mount", mnt, "-o", f"log={os.path.join(WORK, 'daemon.log')}")
    samples = []
    try:
        daemon = Daemon(mnt)
        images = os.path.join(mnt, STORE, "images")
        samples.append(("mounted", 0, 0.0, *daemon.sample()))
        inodes, started = 0, time.perf_counter()
        for image_id in walk_ids:
            out = subprocess.run(["find", os.path.join(images, image_id, "rootfs"), "-ls"], check=True,
                                 capture_output=True).stdout
            inodes += out.count(b"\n")
            samples.append((f"walk {image_id}", inodes, time.perf_counter() - started, *daemon.sample()))
        for k, image_id in enumerate(many_ids, 1):
            root = os.path.join(images, image_id, "rootfs")
            try:
                with open(os.path.join(root, "child1", "f0"), "rb") as f:
                    f.read()
            except OSError as e:
                samples.append((f"many +{k}: {e.strerror}", inodes, time.perf_counter() - started,
                                *daemon.sample()))
                break
            if k % 25 == 0 or k == len(many_ids):
                samples.append((f"many +{k} (depth {k + len(walk_ids)})", inodes, time.perf_counter() - started,
                                *daemon.sample()))
    finally:
        subprocess.run(["umount", mnt], check=False)
    print("| after | inodes walked | s | daemon fds | daemon RSS MiB |")
    print("|---|---|---|---|---|")
    for what, n, t, fds, rss in samples:
        print(f"| {what} | {n:,} | {t:.1f} | {fds} | {rss:.0f} |")
    with open(os.path.join(WORK, "results.json"), "w") as f:
        json.dump(samples, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
