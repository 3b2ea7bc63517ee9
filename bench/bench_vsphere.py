#!/usr/bin/env python3
"""The vSphere backend against the local one, side by side on the same data (not a test; root).

usage: bench_vsphere.py [BENCH_DIR] [--runs N]   (default /var/tmp/imagefs-bench)

Starts the vSphere simulator the tests use (tests/vsphere_sim.py), makes one store on
a local datastore and one on the simulator's datastore, and measures in one run:
- import: layer1.tar (about 200 MB, 5,000 files) written as a layer on each; for vSphere
  also the seconds spent uploading, so that the ratio can be read as "local + upload";
- a 200 MiB file (one random file in a layer of its own) read whole through the read
  API in 1 MiB reads: cold (nothing cached: the block cache emptied, the layer files'
  pages dropped on both sides) and warm (read again with the caches filled; the mean
  of 10 reads alternating between the backends, one read from the page cache taking
  only milliseconds; also in CPU time of the reading thread, which a busy machine
  disturbs far less than wall time).
Medians of N runs; ratios are vSphere time over local time (lower is better; the goals
are warm <= 1/0.9 = 1.11 and import <= 1.5 x (local + upload)).
"""
import argparse
import io
import os
import shutil
import statistics
import sys
import tarfile
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
import vsphere_sim  # noqa: E402

from imagefs.datastore import open_datastore  # noqa: E402
from imagefs.store import ImageStore  # noqa: E402

BIG = 200 << 20
CHUNK = 1 << 20
WARM_PASSES = 10


def drop_pages(root):
    """Drop the page cache of every file below ``root`` (this host only, only these files)."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            try:
                fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            except OSError:
                continue
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            except OSError:
                pass
            finally:
                os.close(fd)


def big_tar(path):
    with tarfile.open(path, "w") as tf:
        info = tarfile.TarInfo("big")
        info.size = BIG
        tf.addfile(info, io.BytesIO(os.urandom(BIG)))


def read_file(st, image, clock=time.perf_counter):
    """Seconds to read /big whole in 1 MiB reads (by ``clock``)."""
    tree = st.tree("bench", image)
    ino = tree.resolve("/big")
    t = clock()
    offset = 0
    while offset < BIG:
        n = len(tree.read(ino, offset, CHUNK))
        assert n, "short read"
        offset += n
    return clock() - t


class UploadClock:
    """Seconds the vSphere datastore spends in uploads, and the bytes it uploads."""

    def __init__(self, ds):
        self.seconds = 0.0
        self.bytes = 0
        inner = ds.transfer.upload

        def timed(host_path, path):
            t = time.perf_counter()
            try:
                return inner(host_path, path)
            finally:
                self.seconds += time.perf_counter() - t
                self.bytes += os.path.getsize(host_path)
        ds.transfer.upload = timed


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("bench_dir", nargs="?", default="/var/tmp/imagefs-bench")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    layer1 = os.path.join(args.bench_dir, "layer1.tar")
    work = tempfile.mkdtemp(prefix="imagefs-bench-vsphere-", dir="/var/tmp")
    sim = vsphere_sim.start(work)
    os.environ.update(IMAGEFS_VSPHERE_PASSWORD=vsphere_sim.PASSWORD, IMAGEFS_VSPHERE_CA_FILE=sim.ca_file)
    try:
        local_root = os.path.join(work, "local")
        spec = {"local": local_root, "vsphere": sim.url("bench")}
        roots = {"local": local_root, "vsphere": os.path.join(sim.ds_dir, "bench")}
        cache_dir = os.path.join(work, "cache")

        def open_store(name):
            return ImageStore(open_datastore(spec[name], {"cache_dir": cache_dir, "cache_size": "1GiB"}))

        stores = {n: open_store(n) for n in spec}
        scratch_upload = UploadClock(stores["vsphere"].ds)
        for st in stores.values():
            st.create_store("bench", capacity="8GB")
        scratch_bytes = scratch_upload.bytes
        tar = os.path.join(work, "big.tar")
        big_tar(tar)
        for st in stores.values():
            with open(tar, "rb") as f:
                st.write_image("bench", "scratch", "big", f)
        os.unlink(tar)

        rows = {k: [] for k in ("import local", "import vsphere", "upload", "cold local", "cold vsphere",
                                "warm local", "warm vsphere", "warm cpu local", "warm cpu vsphere")}
        for run in range(args.runs):
            clock = UploadClock(stores["vsphere"].ds)
            for name, st in stores.items():
                with open(layer1, "rb") as f:
                    before = clock.seconds
                    t = time.perf_counter()
                    st.write_image("bench", "scratch", f"l{run}", f)
                    rows[f"import {name}"].append(time.perf_counter() - t)
                    if name == "vsphere":
                        rows["upload"].append(clock.seconds - before)
                        layer_bytes = clock.bytes
            for name in stores:
                stores[name].ds.close()
                if name == "vsphere":                  # an empty block cache
                    shutil.rmtree(cache_dir, ignore_errors=True)
                drop_pages(roots[name])
                stores[name] = open_store(name)
                rows[f"cold {name}"].append(read_file(stores[name], "big"))
            # warm: one pass from the page cache takes milliseconds, so several, alternating
            # between the backends so that a busy moment of the machine hits both alike
            warm = {name: ImageStore(st.ds) for name, st in stores.items()}
            spent = {(name, c): 0.0 for name in warm for c in ("wall", "cpu")}
            for _ in range(WARM_PASSES):
                for name, st in warm.items():
                    spent[name, "wall"] += read_file(st, "big")
                    spent[name, "cpu"] += read_file(st, "big", clock=time.thread_time)
            for name in warm:
                rows[f"warm {name}"].append(spent[name, "wall"] / WARM_PASSES)
                rows[f"warm cpu {name}"].append(spent[name, "cpu"] / WARM_PASSES)
        med = {k: statistics.median(v) for k, v in rows.items()}
        print(f"{args.runs} runs; medians in seconds")
        for k in rows:
            print(f"  {k:<16} {med[k]:8.3f}   runs {' '.join(f'{x:.3f}' for x in rows[k])}")
        mb = BIG / 1e6
        print(f"200 MiB read cold: local {mb / med['cold local']:.0f} MB/s, vsphere {mb / med['cold vsphere']:.0f} MB/s,"
              f" vsphere/local time {med['cold vsphere'] / med['cold local']:.2f}")
        print(f"200 MiB read warm: local {mb / med['warm local']:.0f} MB/s, vsphere {mb / med['warm vsphere']:.0f} MB/s,"
              f" vsphere speed / local speed {med['warm local'] / med['warm vsphere']:.2f} (goal >= 0.9)")
        print(f"200 MiB read warm, CPU time of the reading thread (what the machine's other load does not"
              f" change): vsphere/local {med['warm cpu vsphere'] / med['warm cpu local']:.2f}")
        print(f"layer1 import: vsphere/local {med['import vsphere'] / med['import local']:.2f};"
              f" vsphere/(local + upload) {med['import vsphere'] / (med['import local'] + med['upload']):.2f}"
              f" (goal <= 1.5); upload {med['upload']:.2f} s")
        print(f"uploaded: store with an 8 GB scratch {scratch_bytes / 1e6:.1f} MB; "
              f"layer1 ({os.path.getsize(layer1) / 1e6:.0f} MB tar) {layer_bytes / 1e6:.1f} MB")
        for st in stores.values():
            st.ds.close()
    finally:
        sim.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
