#!/usr/bin/env python3
"""Export speed (not a test; run as root).

usage: bench_export.py [BENCH_DIR]   (default /var/tmp/imagefs-bench, made by
       ../shared/bench/make-bench-data.py; base.raw must be complete)

Rows:
* full export of a 200 MB / 5,000-file image (layer1.tar written on a fresh scratch)
  against GNU ``tar -c`` of the same tree on a kernel loop mount of the flattened chain;
* full export of the image (export_diff(base, None), about 317 MB in 20,203 entries)
  against GNU ``tar -c`` of the same tree on a read-only kernel loop mount of
  base.raw, cold (page cache dropped) and warm;
* a layer changing 10 paths of the 20,000-file tree (written by imagefs's layer
  writer): the diff and the whole export against its parent, with the one-chain
  fast path and with the full walk of both trees.
"""
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from imagefs.datastore.local import LocalReadHandle  # noqa: E402
from imagefs.export import diff_changes, export_diff  # noqa: E402
from imagefs.layer.writer import write_layer  # noqa: E402
from imagefs.scratch import make_scratch_disk  # noqa: E402
from imagefs.tree import ImageTree  # noqa: E402
from imagefs.vmdk import DiskChain  # noqa: E402


def drop_caches():
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as e:      # e.g. ECONNABORTED from someone's dead FUSE mount: the drop mostly happened
        print(f"(drop_caches: {e.strerror})", file=sys.stderr)


def best_of(n, fn, cold=False):
    times = []
    for _ in range(n):
        if cold:
            drop_caches()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def consume(chunks):
    return sum(len(c) for c in chunks)


def kernel_tar(mnt):
    # through a pipe: GNU tar skips reading file data when its output is /dev/null
    with subprocess.Popen(["tar", "-cf", "-", "-C", mnt, "."], stdout=subprocess.PIPE) as proc:
        size = consume(iter(lambda: proc.stdout.read(1 << 20), b""))
    assert proc.returncode == 0
    return size


def ten_changes_tar():
    """Ten changed paths: 7 rewritten files, 1 new file, 1 deleted file, 1 directory chmod."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        def add(name, data=None, kind=tarfile.REGTYPE, mode=0o644):
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.mtime = kind, mode, 1800000000
            info.size = len(data) if data is not None else 0
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
        for i in range(7):
            add(f"tree/d{i * 29:03d}/f{i * 13:03d}", b"rewritten %d\n" % i)
        add("tree/d150/new-file", b"new\n")
        add("tree/d151/.wh.f050", b"")
        add("tree/d199", kind=tarfile.DIRTYPE, mode=0o750)
    return buf.getvalue()


def main(bench_dir):
    raw = os.path.join(bench_dir, "base.raw")
    if os.path.getsize(raw) != 1 << 30 or subprocess.run(["e2fsck", "-fn", raw], capture_output=True).returncode:
        sys.exit(f"{raw} is not a complete 1 GiB clean ext4 (still being made?)")
    work = tempfile.mkdtemp(prefix="imagefs-bench-export-", dir="/var/tmp")
    for name in ("base", "layer", "mnt", "scratch", "l1", "mnt1"):
        os.mkdir(os.path.join(work, name))
    base_vmdk, layer_vmdk, mnt = (os.path.join(work, "base", "base.vmdk"),
                                  os.path.join(work, "layer", "layer.vmdk"), os.path.join(work, "mnt"))
    subprocess.run(["qemu-img", "convert", "-O", "vmdk", "-o", "subformat=monolithicSparse", raw, base_vmdk],
                   check=True)
    write_layer(base_vmdk, layer_vmdk, io.BytesIO(ten_changes_tar()))
    subprocess.run(["mount", "-o", "loop,ro,noload", "-t", "ext4", raw, mnt], check=True)
    # the 200 MB / 5,000-file image: layer1.tar on a fresh scratch, and its flattened kernel view
    make_scratch_disk(os.path.join(work, "scratch", "scratch.vmdk"), "1GiB")
    with open(os.path.join(bench_dir, "layer1.tar"), "rb") as f:
        write_layer(os.path.join(work, "scratch", "scratch.vmdk"), os.path.join(work, "l1", "l1.vmdk"), f)
    l1_raw, mnt1 = os.path.join(work, "l1.raw"), os.path.join(work, "mnt1")
    subprocess.run(["qemu-img", "convert", "-O", "raw", os.path.join(work, "l1", "l1.vmdk"), l1_raw], check=True)
    subprocess.run(["mount", "-o", "loop,ro,noload", "-t", "ext4", l1_raw, mnt1], check=True)

    def tree(name):
        return ImageTree(DiskChain(f"{name}/{name}.vmdk", lambda p: LocalReadHandle(os.path.join(work, p))))

    rows = []
    try:
        size = consume(export_diff(tree("l1"), None))
        for temp, cold in (("cold", True), ("warm", False)):
            k = best_of(3, lambda: kernel_tar(mnt1), cold)
            a = best_of(3, lambda: consume(export_diff(tree("l1"), None)), cold)
            rows.append((f"full export, layer1 image {size / 1e6:.0f} MB ({temp})", k, a))
        size = consume(export_diff(tree("base"), None))
        for temp, cold in (("cold", True), ("warm", False)):
            k = best_of(3, lambda: kernel_tar(mnt), cold)
            a = best_of(3, lambda: consume(export_diff(tree("base"), None)), cold)
            rows.append((f"full export, {size / 1e6:.0f} MB ({temp})", k, a))
        n = len(diff_changes(tree("layer"), tree("base")))
        for what, fast in (("fast path", True), ("full walk", False)):
            d = best_of(3, lambda: diff_changes(tree("layer"), tree("base"), fast=fast))
            rows.append((f"10 changes of 20,000: diff, {n} entries ({what})", None, d))
        e = best_of(3, lambda: consume(export_diff(tree("layer"), tree("base"))))
        rows.append(("10 changes of 20,000: export (fast path)", None, e))
    finally:
        subprocess.run(["umount", mnt], check=False)
        subprocess.run(["umount", mnt1], check=False)
        subprocess.run(["rm", "-rf", work], check=False)

    print(f"{'case':<56} {'tar -c':>8} {'imagefs':>8}  ratio (imagefs/tar)")
    for name, k, a in rows:
        kernel = f"{k:>7.2f}s" if k else f"{'-':>8}"
        print(f"{name:<56} {kernel} {a:>7.3f}s" + (f"  {a / k:.2f}" if k else ""))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/var/tmp/imagefs-bench")
