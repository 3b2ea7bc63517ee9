#!/usr/bin/env python3
"""Read speed against chain depth: the same filesystem read at depth 1 and through 127
empty delta disks on top (not a test).

usage: bench_depth.py [BENCH_DIR]   (default /var/tmp/imagefs-bench)

Empty deltas are the worst case for a chain reader: every grain falls through all of
them to the base. Rows: the 200 MiB file with 1 MiB reads, and a stat walk of the
20,000-entry tree, each on a freshly opened chain (first read pays for the grain
tables).
"""
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from imagefs.datastore.local import LocalReadHandle  # noqa: E402
from imagefs.tree import ImageTree  # noqa: E402
from imagefs.vmdk import DiskChain  # noqa: E402

DEPTH = 128


def open_tree(work, top):
    return ImageTree(DiskChain(top, lambda p: LocalReadHandle(os.path.join(work, p))))


def read_file(tree):
    ino = tree.resolve("/big.bin")
    size, off = tree.stat(ino).size, 0
    while off < size:
        off += len(tree.read(ino, off, 1 << 20))
    return size


def walk(tree):
    n, stack = 0, [tree.resolve("/tree")]
    while stack:
        for _name, ino in tree.readdir(stack.pop()):
            n += 1
            if tree.stat(ino).is_dir:
                stack.append(ino)
    return n


def main(bench_dir):
    work = tempfile.mkdtemp(prefix="imagefs-bench-depth-", dir="/var/tmp")
    try:
        os.mkdir(os.path.join(work, "d0"))
        subprocess.run(["qemu-img", "convert", "-O", "vmdk", "-o", "subformat=monolithicSparse",
                        os.path.join(bench_dir, "base.raw"), os.path.join(work, "d0", "d0.vmdk")], check=True)
        for i in range(1, DEPTH):
            os.mkdir(os.path.join(work, f"d{i}"))
            subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", "-b", f"../d{i - 1}/d{i - 1}.vmdk",
                            "-F", "vmdk", os.path.join(work, f"d{i}", f"d{i}.vmdk")], check=True)
        print(f"{'case':<28} {'depth 1':>12} {f'depth {DEPTH}':>12}  ratio")
        for name, fn, unit, scale in (("read 200 MiB, 1 MiB reads", read_file, "MB/s", 1e6),
                                      ("stat walk of /tree", walk, "entries/s", 1)):
            rates = []
            for top in ("d0/d0.vmdk", f"d{DEPTH - 1}/d{DEPTH - 1}.vmdk"):
                best = 0.0
                for _ in range(3):
                    tree = open_tree(work, top)
                    t = time.perf_counter()
                    n = fn(tree)
                    best = max(best, n / (time.perf_counter() - t) / scale)
                    tree.chain.close()
                rates.append(best)
            print(f"{name:<28} {rates[0]:>9.0f} {unit[:2]} {rates[1]:>9.0f} {unit[:2]}  {rates[1] / rates[0]:.2f}")
    finally:
        subprocess.run(["rm", "-rf", work], check=False)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/var/tmp/imagefs-bench")
