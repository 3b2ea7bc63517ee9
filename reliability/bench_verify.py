#!/usr/bin/env python3
"""What proving a layer costs: the read-back verification's share of a layer write.

usage: bench_verify.py [BENCH_DIR] [--runs N] [--writers kernel,fuse2fs]   (root)

Writes BENCH_DIR/layer1.tar (200 MB, 5,000 files; make it with
``python3 ../shared/bench/make-bench-data.py BENCH_DIR``) as a new layer on scratch N
times with each writer, timing the whole ``write_image`` and, inside it, the
verification stage (``layer.verify.verify_layer``: the sealed disk read back through
DiskChain + ImageTree and compared with the layer model). Prints the medians and the
verification's share.
"""
import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import imagefs.layer.writer as writer  # noqa: E402
from imagefs.datastore import open_datastore  # noqa: E402
from imagefs.store import ImageStore  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bench_dir", nargs="?", default="/var/tmp/imagefs-bench")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--writers", default="kernel,fuse2fs")
    args = ap.parse_args()
    tar = os.path.join(args.bench_dir, "layer1.tar")
    verify_times = []
    verify = writer.verify_layer

    def timed_verify(*a, **kw):
        start = time.perf_counter()
        try:
            return verify(*a, **kw)
        finally:
            verify_times.append(time.perf_counter() - start)
    writer.verify_layer = timed_verify

    for method in args.writers.split(","):
        base = tempfile.mkdtemp(prefix="imagefs-bench-verify-", dir="/var/tmp")
        try:
            work = os.path.join(base, "work")
            os.mkdir(work)
            st = ImageStore(open_datastore(os.path.join(base, "ds")), writer_method=method, workdir=work)
            st.create_store("bench")
            totals, verify_times[:] = [], []
            for i in range(args.runs):
                with open(tar, "rb") as f:
                    start = time.perf_counter()
                    st.write_image("bench", "scratch", f"l{i}", f)
                    totals.append(time.perf_counter() - start)
                st.delete_image("bench", f"l{i}")
            total, check = statistics.median(totals), statistics.median(verify_times)
            print(f"{method}: write {total:.2f} s, of which verification {check:.2f} s ({check / total:.0%}); "
                  f"runs: {', '.join(f'{t:.2f}' for t in totals)}; verification: "
                  f"{', '.join(f'{t:.2f}' for t in verify_times)}", flush=True)
        finally:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
