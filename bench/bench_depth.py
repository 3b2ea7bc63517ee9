#!/usr/bin/env python3
"""Read speed against chain depth: the same filesystem read at depth 1 and through 127
empty delta disks on top (not a test; run as root).

usage: bench_depth.py [BENCH_DIR] [--runs N]   (default /var/tmp/imagefs-bench, 5 runs)

A store whose scratch is base.raw (as a monolithicSparse VMDK) and images d1..d127,
each an empty delta (qemu-img) over the one before, kept in /var/tmp/imagefs-bench-depth.
Empty deltas are the worst case for a chain reader: every grain falls through all of
them to the base. Rows, depth 1 (scratch) against depth 128 (d127), interleaved,
medians of the runs:

  mount, cold    a fresh ``imagefs mount``, the page cache dropped: ``dd bs=1M`` of
                 big.bin (200 MiB) and ``find -ls`` of tree/ (20,000 files) through FUSE,
                 what a user's first read meets (the chain's headers read within it)
  API, cold      the read API in-process, a fresh store object (no disk parsed yet),
                 the page cache dropped: open the tree and read big.bin with 1 MiB reads,
                 or stat-walk tree/
  API, warm      the same with the files in the page cache: the reader's own cost
"""
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from benchlib import drop_caches, empty_delta_image, loadavg, timed  # noqa: E402
from imagefs.datastore import open_datastore  # noqa: E402
from imagefs.store import ImageStore  # noqa: E402

DATA = "/var/tmp/imagefs-bench"
WORK = "/var/tmp/imagefs-bench-depth"
DEPTH = 128
STORE = "bench"
PYTHON = sys.executable


def ensure_store(data):
    ds = os.path.join(WORK, "ds")
    images = os.path.join(ds, "VIC", STORE, "images")
    top = f"d{DEPTH - 1}"
    if os.path.exists(os.path.join(images, top, "manifest")):
        return ds
    subprocess.run(["rm", "-rf", ds], check=True)
    scratch = os.path.join(images, "scratch")
    os.makedirs(os.path.join(scratch, "imageMetadata"))
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=monolithicSparse",
                    os.path.join(data, "base.raw"), os.path.join(scratch, "scratch.vmdk")], check=True)
    open(os.path.join(scratch, "manifest"), "w").close()
    parent = "scratch"
    for i in range(1, DEPTH):
        empty_delta_image(images, f"d{i}", parent)
        parent = f"d{i}"
    return ds


# --- through the mount --------------------------------------------------------------------------
def mount_sample(ds, image, probe):
    mnt = os.path.join(WORK, "mnt")
    os.makedirs(mnt, exist_ok=True)
    subprocess.run([PYTHON, "-m", "imagefs", "--datastore", ds, "mount", mnt], check=True)
    try:
        root = os.path.join(mnt, STORE, "images", image, "rootfs")
        drop_caches()
        if probe == "dd":
            cmd = ["dd", f"if={root}/big.bin", "of=/dev/null", "bs=1M"]
        else:
            cmd = ["find", f"{root}/tree", "-ls"]
        return timed(lambda: subprocess.run(cmd, check=True, capture_output=True))
    finally:
        subprocess.run(["umount", mnt], check=True)
        time.sleep(0.2)


# --- the read API -----------------------------------------------------------------------------
def read_file(tree):
    ino = tree.resolve("/big.bin")
    size, off = tree.stat(ino).size, 0
    while off < size:
        off += len(tree.read(ino, off, 1 << 20))


def walk(tree):
    stack = [tree.resolve("/tree")]
    while stack:
        for _name, ino in tree.readdir(stack.pop()):
            if tree.stat(ino).is_dir:
                stack.append(ino)


def api_sample(ds, image, probe, cold):
    fn = read_file if probe == "dd" else walk
    if cold:
        drop_caches()
    else:
        fn(ImageStore(open_datastore(ds)).tree(STORE, image))    # fill the page cache
    st = ImageStore(open_datastore(ds))
    return timed(lambda: fn(st.tree(STORE, image)))


def main(argv):
    runs, data = 5, DATA
    if "--runs" in argv:
        i = argv.index("--runs")
        runs = int(argv[i + 1])
        del argv[i:i + 2]
    if argv:
        data = argv[0]
    os.makedirs(WORK, exist_ok=True)
    ds = ensure_store(data)
    images = ("scratch", f"d{DEPTH - 1}")
    rows = [("mount, cold: dd 200 MiB", lambda im: mount_sample(ds, im, "dd")),
            ("mount, cold: find -ls 20,000", lambda im: mount_sample(ds, im, "find")),
            ("API, cold: open + read 200 MiB", lambda im: api_sample(ds, im, "dd", True)),
            ("API, cold: open + stat walk", lambda im: api_sample(ds, im, "find", True)),
            ("API, warm: open + read 200 MiB", lambda im: api_sample(ds, im, "dd", False)),
            ("API, warm: open + stat walk", lambda im: api_sample(ds, im, "find", False))]
    print(f"load average before: {loadavg()}; medians of {runs} runs")
    print(f"| case | depth 1 s | depth {DEPTH} s | depth 1 / depth {DEPTH} |")
    print("|---|---|---|---|")
    for name, sample in rows:
        times = {im: [] for im in images}
        for _ in range(runs):
            for im in images:
                times[im].append(sample(im))
        one, deep = (statistics.median(times[im]) for im in images)
        print(f"| {name} | {one:.3f} | {deep:.3f} | {one / deep:.2f} |", flush=True)
    print(f"load average after: {loadavg()}")


if __name__ == "__main__":
    main(sys.argv[1:])
