#!/usr/bin/env python3
"""Layer write speed against plain tar on the same input (not a test; run as root).

usage: bench_write.py [BENCH_DIR] [--runs N] [--rootfs] [--only layer1|rootfs] [--phases]

Writes each layer tar as a new layer on scratch through the image-store API with each
writer (kernel loop mount, fuse2fs), and times `tar --xattrs -xpf` of the same tar into
an empty directory on local disk plus `sync`, interleaved in the same runs. Prints
seconds per run, medians and the ratios (lower is better).

Tars: ``layer1`` is BENCH_DIR/layer1.tar (default /var/tmp/imagefs-bench: about 200 MB
in 5,000 files); with ``--rootfs``, also ``rootfs``: a Debian minbase tree
(``debootstrap --variant=minbase bookworm``, the base of bench_oci.py, built into
/var/tmp/imagefs-oci-bench/debootstrap when missing) tarred once into
/var/tmp/imagefs-bench-rootfs/rootfs.tar.

``--phases`` also times the writer's stages (monkeypatched timers around its functions,
for profiling only) and prints their medians.
"""
import argparse
import collections
import functools
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from imagefs.datastore import open_datastore  # noqa: E402
from imagefs.store import ImageStore  # noqa: E402

METHODS = ("kernel", "fuse2fs")
DEBOOTSTRAP = "/var/tmp/imagefs-oci-bench/debootstrap"
ROOTFS_TAR = "/var/tmp/imagefs-bench-rootfs/rootfs.tar"
MIRROR = "http://deb.debian.org/debian"


def rootfs_tar() -> str:
    """A tar of a Debian minbase tree, made once."""
    if os.path.exists(ROOTFS_TAR):
        return ROOTFS_TAR
    if not os.path.exists(os.path.join(DEBOOTSTRAP, "etc", "debian_version")):
        print("debootstrap --variant=minbase bookworm ...", file=sys.stderr)
        subprocess.run(["debootstrap", "--variant=minbase", "bookworm", DEBOOTSTRAP, MIRROR],
                       check=True, stdout=subprocess.DEVNULL)
    os.makedirs(os.path.dirname(ROOTFS_TAR), exist_ok=True)
    tmp = ROOTFS_TAR + ".tmp"
    subprocess.run(["tar", "--xattrs", "--numeric-owner", "--exclude=./.complete", "-cpf", tmp, "-C",
                    DEBOOTSTRAP, "."], check=True)
    os.replace(tmp, ROOTFS_TAR)
    return ROOTFS_TAR


def time_tar(tar, work):
    dest = tempfile.mkdtemp(dir=work)
    t = time.perf_counter()
    subprocess.run(["tar", "--xattrs", "-xpf", tar, "-C", dest], check=True)
    os.sync()
    elapsed = time.perf_counter() - t
    shutil.rmtree(dest)
    return elapsed


def time_write(st, tar, image_id):
    with open(tar, "rb") as f:
        t = time.perf_counter()
        st.write_image("bench", "scratch", image_id, f)
        return time.perf_counter() - t


class Phases:
    """Seconds spent in the writer's stages during one write (profiling only)."""

    def __init__(self):
        from imagefs.layer import fsmount, qsd, writer
        from imagefs.vmdk import layer_format
        self.now = collections.defaultdict(float)
        for owner, name, label in ((qsd.StorageDaemon, "start", "qsd start"),
                                   (fsmount.Mount, "_start", "mount"),
                                   (writer, "apply_layer", "extract"),
                                   (fsmount.Mount, "_stop", "sync+unmount"),
                                   (writer, "_check_fs", "e2fsck"),
                                   (qsd.StorageDaemon, "stop", "qsd stop"),
                                   (writer, "fsync_file", "fsync"),
                                   (writer, "verify_layer", "verify"),
                                   (layer_format, "seal_as", "seal/convert"),
                                   (ImageStore, "_commit", "commit")):
            setattr(owner, name, self._timed(getattr(owner, name), label))

    def _timed(self, func, label):
        @functools.wraps(func)
        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return func(*args, **kwargs)
            finally:
                self.now[label] += time.perf_counter() - t
        return timed

    def take(self) -> dict:
        out, self.now = dict(self.now), collections.defaultdict(float)
        return out


def bench(name, tar, runs, work, phases):
    stores = {}
    for m in METHODS:
        stores[m] = ImageStore(open_datastore(os.path.join(work, f"ds-{name}-{m}")), writer_method=m)
        stores[m].create_store("bench")
    rows = {"tar": [], **{m: [] for m in METHODS}}
    stages = {m: [] for m in METHODS}
    load_before = os.getloadavg()[0]
    for run in range(runs):
        rows["tar"].append(time_tar(tar, work))
        for m, st in stores.items():
            if phases:
                phases.take()
            rows[m].append(time_write(st, tar, f"run{run}"))
            if phases:
                stages[m].append(phases.take())
    med = {k: statistics.median(v) for k, v in rows.items()}
    print(f"{name}: {os.path.basename(tar)} {os.path.getsize(tar) / 1e6:.0f} MB; {runs} interleaved runs; "
          f"load {load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
    labels = {"tar": "tar -xpf + sync", "kernel": "imagefs kernel", "fuse2fs": "imagefs fuse2fs"}
    print(f"  {'method':<18} {'runs (s)':<34} {'median':>7}  ratio to tar")
    for key, times in rows.items():
        print(f"  {labels[key]:<18} {' '.join(f'{t:.2f}' for t in times):<34} {med[key]:>7.2f}  "
              f"{med[key] / med['tar']:.1f}x")
    print(f"  fuse2fs / kernel: {med['fuse2fs'] / med['kernel']:.1f}x")
    for m in METHODS if phases else ():
        keys = sorted({k for s in stages[m] for k in s}, key=lambda k: -statistics.median(s.get(k, 0) for s in stages[m]))
        print(f"  {m} stages (median s): " + ", ".join(
            f"{k} {statistics.median(s.get(k, 0.0) for s in stages[m]):.2f}" for k in keys))
    sizes = {m: st.layer_usage("bench", "run0") for m, st in stores.items()}
    print("  layer disk size:", ", ".join(f"{m} {s / 1e6:.1f} MB" for m, s in sizes.items()))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("bench_dir", nargs="?", default="/var/tmp/imagefs-bench")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rootfs", action="store_true", help="also a Debian minbase rootfs tar")
    ap.add_argument("--only", choices=("layer1", "rootfs"))
    ap.add_argument("--phases", action="store_true", help="time the writer's stages too")
    args = ap.parse_args()
    tars = {}
    if args.only != "rootfs":
        tars["layer1"] = os.path.join(args.bench_dir, "layer1.tar")
    if args.rootfs or args.only == "rootfs":
        tars["rootfs"] = rootfs_tar()
    phases = Phases() if args.phases else None
    work = tempfile.mkdtemp(prefix="imagefs-bench-write-", dir="/var/tmp")
    try:
        for name, tar in tars.items():
            bench(name, tar, args.runs, work, phases)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
