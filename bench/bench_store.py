#!/usr/bin/env python3
"""Cost per image as a store grows: 10, 100 and 1,000 images (not a test; run as root).

usage: bench_store.py [--sizes 10,100,1000] [--runs 3]

Images are tiny layers as the writer leaves them on disk (a delta VMDK made by
qemu-img over its parent, a metadata value, the manifest), half of them chained on
the previous one, half on scratch. For each size, on a fresh mount each run:
  mount       `imagefs mount` until it returns
  ls fresh    `ls -l MOUNT/s/images` right after mounting
  ls warm     the same again
  info.json   `cat` of every image's info.json, per image (warm)
  image ls    the CLI's `imagefs image ls` (a new process)
Medians of the runs; the per-image columns must stay flat as the store grows.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

PYTHON = sys.executable


def imagefs(*args, ds):
    return subprocess.run([PYTHON, "-m", "imagefs", "--datastore", ds, *args], check=True,
                          capture_output=True, text=True)


def grow(ds, n, have):
    """Add tiny images until the store holds ``n`` besides scratch."""
    images = os.path.join(ds, "VIC", "s", "images")
    for i in range(have, n):
        image_id = f"img{i:05d}"
        parent = f"img{i - 1:05d}" if i % 2 and i else "scratch"
        d = os.path.join(images, image_id)
        os.makedirs(os.path.join(d, "imageMetadata"))
        subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", "-b", f"../{parent}/{parent}.vmdk", "-F", "vmdk",
                        os.path.join(d, f"{image_id}.vmdk")], check=True)
        with open(os.path.join(d, "imageMetadata", "name"), "w") as f:
            f.write(image_id)
        open(os.path.join(d, "manifest"), "w").close()
    return n


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def one_run(ds, mnt, n):
    r = {"mount s": timed(lambda: imagefs("mount", mnt, ds=ds))}
    try:
        images = os.path.join(mnt, "s", "images")
        ls = lambda: subprocess.run(["ls", "-l", images], check=True, stdout=subprocess.DEVNULL)  # noqa: E731
        r["ls -l fresh s"] = timed(ls)
        r["ls -l warm s"] = timed(ls)
        infos = [os.path.join(images, name, "info.json") for name in os.listdir(images)]
        r["info.json ms/image"] = timed(lambda: subprocess.run(["cat", *infos], check=True,
                                                               stdout=subprocess.DEVNULL)) / len(infos) * 1e3
    finally:
        subprocess.run(["umount", mnt], check=True)
        time.sleep(0.2)
    r["image ls s"] = timed(lambda: imagefs("image", "ls", "s", ds=ds))
    return r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10,100,1000")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="imagefs-bench-store-", dir="/var/tmp")
    ds, mnt = os.path.join(work, "ds"), os.path.join(work, "mnt")
    os.makedirs(mnt)
    try:
        imagefs("store", "create", "s", "--capacity", "64MiB", ds=ds)
        have = 0
        rows = []
        for n in (int(x) for x in args.sizes.split(",")):
            have = grow(ds, n, have)
            runs = [one_run(ds, mnt, n) for _ in range(args.runs)]
            rows.append((n, {k: statistics.median(r[k] for r in runs) for k in runs[0]}))
        cols = list(rows[0][1])
        print("| images | " + " | ".join(cols) + " |")
        print("|---" * (len(cols) + 1) + "|")
        for n, r in rows:
            print(f"| {n:,} | " + " | ".join(f"{r[c]:.3f}" for c in cols) + " |")
    finally:
        subprocess.run(["umount", mnt], capture_output=True)
        subprocess.run(["rm", "-rf", work])


if __name__ == "__main__":
    main()
