#!/usr/bin/env python3
"""Read-API throughput against the kernel on the same image (not a test; run as root).

usage: bench_read_api.py [BENCH_DIR]   (default /var/tmp/imagefs-bench, made by
       ../shared/bench/make-bench-data.py)

Rows: a 200 MiB file read with 1 MiB and 128 KiB reads, and a stat walk of the
20,000-entry tree, each cold (page cache dropped) and warm. Peer: the kernel's ext4
on a read-only loop mount of base.raw. Our side reads base.vmdk (the same
filesystem converted to monolithicSparse) through DiskChain + ImageTree, plus a
one-layer child on top of it, so the chain logic is in the path.
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
from benchlib import drop_caches  # noqa: E402


def timed(fn):
    t = time.perf_counter()
    n = fn()
    return time.perf_counter() - t, n


def kernel_read(path, bs):
    def go():
        total = 0
        with open(path, "rb", buffering=0) as f:
            while chunk := f.read(bs):
                total += len(chunk)
        return total
    return go


def kernel_walk(root):
    def go():
        n, stack = 0, [root]
        while stack:
            for e in os.scandir(stack.pop()):
                st = e.stat(follow_symlinks=False)
                n += 1
                if e.is_dir(follow_symlinks=False):
                    stack.append(e.path)
                del st
        return n
    return go


def api_read(tree, ino, bs):
    def go():
        total, off = 0, 0
        size = tree.stat(ino).size
        while off < size:
            chunk = tree.read(ino, off, bs)
            off += len(chunk)
            total += len(chunk)
        return total
    return go


def api_walk(tree_factory):
    def go():
        tree = tree_factory()  # a fresh tree: no cached stat or directory answers
        n, stack = 0, [2]
        while stack:
            for _name, ino in tree.readdir(stack.pop()):
                st = tree.stat(ino)
                n += 1
                if st.is_dir:
                    stack.append(ino)
        return n
    return go


def main(bench_dir):
    raw = os.path.join(bench_dir, "base.raw")
    work = tempfile.mkdtemp(prefix="imagefs-bench-read-", dir="/var/tmp")
    vmdk = os.path.join(work, "base", "base.vmdk")
    os.makedirs(os.path.dirname(vmdk))
    subprocess.run(["qemu-img", "convert", "-O", "vmdk", "-o", "subformat=monolithicSparse", raw, vmdk], check=True)
    os.makedirs(os.path.join(work, "child"))
    subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", "-b", "../base/base.vmdk", "-F", "vmdk",
                    os.path.join(work, "child", "child.vmdk")], check=True)
    mnt = os.path.join(work, "mnt")
    os.mkdir(mnt)
    subprocess.run(["mount", "-o", "loop,ro,noload", "-t", "ext4", raw, mnt], check=True)

    def open_tree():
        return ImageTree(DiskChain("child/child.vmdk", lambda p: LocalReadHandle(os.path.join(work, p))))

    rows = []
    try:
        tree = open_tree()
        big = tree.resolve("/big.bin")
        cases = [
            ("read 200 MiB, 1 MiB reads", kernel_read(os.path.join(mnt, "big.bin"), 1 << 20),
             lambda: api_read(open_tree(), big, 1 << 20)(), "MB/s"),
            ("read 200 MiB, 128 KiB reads", kernel_read(os.path.join(mnt, "big.bin"), 128 << 10),
             lambda: api_read(open_tree(), big, 128 << 10)(), "MB/s"),
            ("stat walk of /tree", kernel_walk(os.path.join(mnt, "tree")),
             lambda: api_walk(lambda: _subtree(open_tree()))(), "entries/s"),
        ]
        for name, kfn, afn, unit in cases:
            for temp in ("cold", "warm"):
                if temp == "cold":
                    drop_caches()
                kt, kn = timed(kfn)
                if temp == "cold":
                    drop_caches()
                at, an = timed(afn)
                scale = 1e6 if unit == "MB/s" else 1
                rows.append((f"{name} ({temp})", kn / kt / scale, an / at / scale, unit))
    finally:
        subprocess.run(["umount", mnt], check=False)
        subprocess.run(["rm", "-rf", work], check=False)

    print(f"{'case':<40} {'kernel':>12} {'imagefs':>12}  ratio (imagefs/kernel)")
    for name, k, a, unit in rows:
        print(f"{name:<40} {k:>10.0f} {unit[:2]:<2}{a:>10.0f} {unit[:2]:<2}  {a / k:.2f}")


def _subtree(tree):
    """A tree whose walk starts at /tree (the 20,000 small files)."""
    ino = tree.resolve("/tree")
    orig = tree.readdir

    def readdir(i):
        return orig(ino if i == 2 else i)
    tree.readdir = readdir
    return tree


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/var/tmp/imagefs-bench")
