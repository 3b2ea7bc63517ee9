#!/usr/bin/env python3
"""Layer write speed against plain tar on the same input (not a test; run as root).

usage: bench_write.py [BENCH_DIR] [--runs N]   (default /var/tmp/imagefs-bench)

Writes layer1.tar (about 200 MB in 5,000 files) as a new layer on scratch through
the image-store API with each writer (kernel loop mount, fuse2fs), and times
`tar --xattrs -xpf layer1.tar` into an empty directory on local disk plus `sync`
in the same run. Prints seconds per run and the ratio to tar (lower is better).
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from imagefs.datastore import open_datastore  # noqa: E402
from imagefs.store import ImageStore  # noqa: E402


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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("bench_dir", nargs="?", default="/var/tmp/imagefs-bench")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    tar = os.path.join(args.bench_dir, "layer1.tar")
    work = tempfile.mkdtemp(prefix="imagefs-bench-write-", dir="/var/tmp")
    try:
        stores = {m: ImageStore(open_datastore(os.path.join(work, f"ds-{m}")), writer_method=m)
                  for m in ("kernel", "fuse2fs")}
        for st in stores.values():
            st.create_store("bench")
        rows = {"tar -xpf + sync": [], "imagefs kernel": [], "imagefs fuse2fs": []}
        for run in range(args.runs):
            rows["tar -xpf + sync"].append(time_tar(tar, work))
            for m, st in stores.items():
                rows[f"imagefs {m}"].append(time_write(st, tar, f"run{run}"))
        base = min(rows["tar -xpf + sync"])
        print(f"layer1.tar: {os.path.getsize(tar) / 1e6:.0f} MB; {args.runs} runs each")
        print(f"{'method':<18} {'runs (s)':<28} {'best':>6}  ratio to tar")
        for name, times in rows.items():
            print(f"{name:<18} {' '.join(f'{t:.2f}' for t in times):<28} {min(times):>6.2f}  {min(times) / base:.1f}x")
        sizes = {m: st.layer_usage("bench", "run0") for m, st in stores.items()}
        print("layer disk size:", ", ".join(f"{m} {s / 1e6:.1f} MB" for m, s in sizes.items()))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
