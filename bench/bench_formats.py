#!/usr/bin/env python3
"""Reading through chains of every VMDK format, as ratios to monolithicSparse (run as root).

usage: bench_formats.py [BENCH_DIR] [RUNS]   (default /var/tmp/imagefs-bench, 5 runs;
       BENCH_DIR made by ../shared/bench/make-bench-data.py)

1. Delta formats, as users meet them: a store per format (monolithicSparse, vmfsSparse,
   seSparse), one layer imported from a tar of the 200 MiB big.bin; read big.bin through
   the read API (1 MiB reads) of a freshly opened chain, cold (page cache dropped) and
   warm (wall and CPU time), and through a chain already open ("open": maps built).
2. Base formats: base.raw (1 GiB ext4 holding big.bin) converted by qemu-img to each
   format it writes, and as ESXi's vmfs (descriptor + flat), with an empty child on top;
   big.bin read the same way. streamOptimized also shows the time zlib alone needs to
   inflate the grains of big.bin (its decompression cost).
3. The same disks read by dissect.hypervisor's VMDK (dissect.extfs on top of both, so
   only the disk layer differs): bytes must be equal; times side by side.
Each figure is the median of RUNS runs; runs of all variants are interleaved.
"""
import hashlib
import io
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import zlib

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from dissect.extfs import ExtFS  # noqa: E402
from dissect.hypervisor.disk.vmdk import VMDK  # noqa: E402

from imagefs.datastore import open_datastore  # noqa: E402
from imagefs.datastore.local import LocalReadHandle  # noqa: E402
from imagefs.store import ImageStore  # noqa: E402
from imagefs.tree import ImageTree  # noqa: E402
from imagefs.vmdk import DiskChain  # noqa: E402
from imagefs.vmdk.flat import write_vmfs_descriptor  # noqa: E402
from imagefs.vmdk.runs import DEFLATE  # noqa: E402

BS = 1 << 20
QEMU_BASES = ("monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat",
              "streamOptimized")


def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def read_api(open_tree, path, digest=False):
    """Read a file through a fresh tree; its sha256 when ``digest`` (not while timed)."""
    return read_tree(open_tree(), path, digest)


def read_tree(tree, path, digest=False):
    ino = tree.resolve(path)
    size, off, h = tree.stat(ino).size, 0, hashlib.sha256()
    while off < size:
        chunk = tree.read(ino, off, BS)
        if digest:
            h.update(chunk)
        off += len(chunk)
    return h.hexdigest()


def read_dissect(fileobj, path, digest=False):
    fs = ExtFS(fileobj)
    f = fs.get(path).open()
    h = hashlib.sha256()
    while chunk := f.read(BS):
        if digest:
            h.update(chunk)
    return h.hexdigest()


def chain_opener(root, top):
    return lambda: ImageTree(DiskChain(top, lambda p: LocalReadHandle(os.path.join(root, p))))


def delta_stores(work, bench_dir):
    tar = os.path.join(work, "big.tar")
    with tarfile.open(tar, "w") as tf:
        tf.add(os.path.join(bench_dir, "tree", "big.bin"), "big.bin")
    cases = {}
    for fmt in ("monolithicSparse", "vmfsSparse", "seSparse"):
        root = os.path.join(work, f"ds-{fmt}")
        st = ImageStore(open_datastore(root))
        st.create_store("s", capacity="1GiB", disk_format=fmt)
        with open(tar, "rb") as f:
            st.write_image("s", "scratch", "big", f)
        cases[fmt] = (root, "VIC/s/images/big/big.vmdk")
    return cases


def base_chains(work, bench_dir):
    raw = os.path.join(bench_dir, "base.raw")
    cases = {}
    for fmt in QEMU_BASES + ("vmfs",):
        root = os.path.join(work, f"base-{fmt}")
        os.makedirs(os.path.join(root, "base"))
        os.makedirs(os.path.join(root, "child"))
        top = os.path.join(root, "base", "base.vmdk")
        if fmt == "vmfs":
            subprocess.run(["cp", "--sparse=always", raw, os.path.join(root, "base", "base-flat.vmdk")], check=True)
            write_vmfs_descriptor(top, os.path.join(root, "base", "base-flat.vmdk"), os.path.getsize(raw))
        else:
            subprocess.run(["qemu-img", "convert", "-O", "vmdk", "-o", f"subformat={fmt}", raw, top], check=True)
        subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", "-b", "../base/base.vmdk", "-F", "vmdk",
                        os.path.join(root, "child", "child.vmdk")], check=True)
        cases[fmt] = (root, "child/child.vmdk")
    return cases


def inflate_cost(root, top, path):
    """Seconds zlib needs to inflate the compressed grains holding ``path`` (read beforehand)."""
    tree = chain_opener(root, top)()
    chain = tree.chain
    ino = tree.resolve(path)
    blobs = []
    for lo, length in _disk_ranges(tree, ino):
        for s, e, kind, src, (at, _) in (r for r in chain.layers[1].runs(lo, lo + length) if r[2] == DEFLATE):
            head = src.handle.pread(at, 12)
            size = int.from_bytes(head[8:12], "little")
            blobs.append(src.handle.pread(at + 12, size))
    t = time.perf_counter()
    for b in blobs:
        zlib.decompress(b)
    return time.perf_counter() - t


def _disk_ranges(tree, ino):
    """Byte ranges of the virtual disk holding a file's blocks."""
    from imagefs import ext4
    geo = ext4.Geometry(tree.chain)
    runs, _ = ext4.extent_map(geo, geo.record(ino))
    return [(b * geo.block_size, n * geo.block_size) for _, b, n in runs if b is not None]


def measure(cases, runs, label, warm_reads=5):
    """Median seconds per (case, cold|warm|cpu): cold is one read after dropping the page
    cache; warm the wall time, cpu the process CPU time of one read averaged over
    ``warm_reads`` reads in a row (a warm 200 MiB read takes milliseconds, so single
    samples mostly measure the other tenants of a shared machine). Every case must read
    the same bytes."""
    digests = {name: fn(digest=True) for name, fn in cases.items()}
    assert len(set(digests.values())) == 1, f"{label}: readers disagree: {digests}"
    times = {(name, kind): [] for name in cases for kind in ("cold", "warm", "cpu", "open")}
    open_trees = {name: getattr(fn, "open_tree", None) for name, fn in cases.items()}
    open_trees = {name: t() for name, t in open_trees.items() if t is not None}
    for _ in range(runs):
        for name, fn in cases.items():
            drop_caches()
            t = time.perf_counter()
            fn()
            times[(name, "cold")].append(time.perf_counter() - t)
        for name, fn in cases.items():
            fn()
            t, c = time.perf_counter(), time.process_time()
            for _ in range(warm_reads):
                fn()
            times[(name, "warm")].append((time.perf_counter() - t) / warm_reads)
            times[(name, "cpu")].append((time.process_time() - c) / warm_reads)
            if name in open_trees:          # through a chain already open (its maps built)
                read_tree(open_trees[name], "/big.bin")
                t = time.perf_counter()
                for _ in range(warm_reads):
                    read_tree(open_trees[name], "/big.bin")
                times[(name, "open")].append((time.perf_counter() - t) / warm_reads)
    return {k: statistics.median(v) for k, v in times.items() if v}


def report(title, med, ref, names):
    if title:
        print(f"\n{title}")
    print(f"{'chain':<30} {'cold s':>7} {'ratio':>6} {'warm s':>7} {'ratio':>6} {'cpu s':>7} {'ratio':>6} "
          f"{'open s':>7} {'ratio':>6}")
    for name in names:
        cells = [f"{med[(name, k)]:>7.3f} {med[(name, k)] / med[(ref, k)]:>6.2f}"
                 for k in ("cold", "warm", "cpu", "open")]
        print(f"{name:<30} {' '.join(cells)}")


def main(bench_dir, runs):
    work = tempfile.mkdtemp(prefix="imagefs-bench-formats-", dir="/var/tmp")
    try:
        deltas = delta_stores(work, bench_dir)
        bases = base_chains(work, bench_dir)
        ours = {}
        for kind, chains in (("delta", deltas), ("base", bases)):
            for k, (r, t) in chains.items():
                fn = ours[f"{kind} {k}"] = (lambda r=r, t=t, digest=False:
                                            read_api(chain_opener(r, t), "/big.bin", digest))
                fn.open_tree = chain_opener(r, t)
        med = measure(ours, runs, "imagefs")
        report("imagefs read API, 200 MiB big.bin, 1 MiB reads (median s of one read; ratio to the "
               "monolithicSparse chain)", med, "delta monolithicSparse", [k for k in ours if k.startswith("delta")])
        report("", med, "base monolithicSparse", [k for k in ours if k.startswith("base")])
        inflate = statistics.median(inflate_cost(*bases["streamOptimized"], "/big.bin") for _ in range(runs))
        extra = med[("base streamOptimized", "warm")] - med[("base monolithicSparse", "warm")]
        print(f"\nstreamOptimized: warm read costs {extra:.3f} s more than monolithicSparse; "
              f"zlib alone inflates its grains in {inflate:.3f} s")

        disks = {**{f"delta {k}": v for k, v in deltas.items()}, **{f"base {k}": v for k, v in bases.items()}}
        pair = {}
        for name, (root, top) in disks.items():
            pair[f"{name} [imagefs]"] = (lambda r=root, t=top, digest=False: read_dissect(
                DiskChain(t, lambda p: LocalReadHandle(os.path.join(r, p))).file(), "/big.bin", digest))
            pair[f"{name} [dissect]"] = (lambda r=root, t=top, digest=False: read_dissect(
                VMDK(os.path.join(r, t)), "/big.bin", digest))
        med2 = measure(pair, runs, "dissect", warm_reads=1)
        print("\ndissect.extfs over each disk reader, same bytes (median s; ratio dissect / imagefs)")
        print(f"{'chain':<30} {'cold: imagefs':>13} {'dissect':>8} {'ratio':>6} {'warm: imagefs':>13} "
              f"{'dissect':>8} {'ratio':>6}")
        for name in disks:
            row = []
            for temp in ("cold", "warm"):
                a, b = med2[(f"{name} [imagefs]", temp)], med2[(f"{name} [dissect]", temp)]
                row.append(f"{a:>13.3f} {b:>8.3f} {b / a:>6.2f}")
            print(f"{name:<30} {' '.join(row)}")
    finally:
        subprocess.run(["rm", "-rf", work], check=False)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/var/tmp/imagefs-bench", int(sys.argv[2]) if len(sys.argv) > 2 else 5)
