#!/usr/bin/env python3
"""Read benchmarks of the imagefs mount against its peers on the same ext4 bytes.

usage: bench_fuse.py [DATA_DIR] [--runtime SECONDS] [--runs N] [--setup raw|layer|both]
       (root; DATA_DIR default /var/tmp/imagefs-bench)

DATA_DIR comes from /work/shared/bench/make-bench-data.py (tree/, layer1.tar, base.raw:
1 GiB ext4 of tree/). Two set-ups:
  raw    base.raw (256-byte inodes, no inline_data) converted to a monolithicSparse VMDK
         and made the scratch disk of a store ``bench``: the image ``scratch`` holds tree/.
  layer  what users have: tree/ written as a layer by ``imagefs image write`` on a fresh
         store, so the data sits in the delta grains the writer allocated.

Peers, on the same bytes (the chain flattened by qemu-img for ``layer``):
  kernel   ext4 loop mount, ro (the limit)
  fuse2fs  fuse2fs -o ro (a userspace ext4 through FUSE)
  bindfs   bindfs -o kernel_cache,entry_timeout=3600,attr_timeout=3600 over the kernel
           mount: a C FUSE filesystem, the FUSE path's own ceiling

Probes, each "cold" on a fresh mount (nothing read before) after
``echo 3 > /proc/sys/vm/drop_caches`` and "warm" right after; medians of --runs:
  seq read   dd of tree/big.bin (200 MiB), 1 MiB reads
  find -ls   over tree/tree (20,000 files in 200 dirs)
  4k rand    fio psync randread of big.bin, 1 and 4 jobs (fio drops the file's pages first)
and the imagefs daemon's RSS after the walks.
"""
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

from benchlib import drop_caches, loadavg, timed

DATA = "/var/tmp/imagefs-bench"
WORK = "/var/tmp/imagefs-bench-fuse"
MAKE_DATA = "/work/shared/bench/make-bench-data.py"
PYTHON = sys.executable
BIG = "big.bin"
TREE = "tree"


def sh(*argv, **kw):
    return subprocess.run(argv, check=True, capture_output=True, text=True, **kw)


def ensure_data(data):
    raw = os.path.join(data, "base.raw")
    complete = (os.path.exists(raw) and os.path.getsize(raw) == 1 << 30
                and os.path.exists(os.path.join(data, "layer1.tar"))
                and os.path.exists(os.path.join(data, "tree", BIG)))
    if not complete:
        print(f"making bench data in {data}", file=sys.stderr)
        sh(sys.executable, MAKE_DATA, data)
    info = sh("dumpe2fs", "-h", raw).stdout
    if "Inode size:\t          256" not in info or "inline_data" in info:
        sys.exit("base.raw needs 256-byte inodes and no inline_data: import a tar of tree/ instead")
    return raw


def ensure_layer_datastore(data):
    """A datastore whose store ``bench`` holds tree/ as the layer ``tree`` written by imagefs,
    and the chain flattened to a raw file for the peers."""
    ds = os.path.join(WORK, "ds-layer")
    flat = os.path.join(WORK, "layer-flat.raw")
    vmdk = os.path.join(ds, "VIC", "bench", "images", "tree", "tree.vmdk")
    if not os.path.exists(os.path.join(os.path.dirname(vmdk), "manifest")):
        tar = os.path.join(WORK, "tree.tar")
        sh("tar", "-C", os.path.join(data, "tree"), "-cf", tar, ".")
        imagefs = [PYTHON, "-m", "imagefs", "--datastore", ds]
        sh(*imagefs, "store", "create", "bench")
        sh(*imagefs, "image", "write", "bench", "scratch", "tree", tar)
        os.unlink(tar)
    if not os.path.exists(flat):
        sh("qemu-img", "convert", "-f", "vmdk", "-O", "raw", vmdk, flat)
    return ds, flat


def ensure_datastore(raw):
    """A datastore whose store ``bench`` has base.raw (as VMDK) for scratch."""
    ds = os.path.join(WORK, "ds")
    image = os.path.join(ds, "VIC", "bench", "images", "scratch")
    vmdk = os.path.join(image, "scratch.vmdk")
    if not os.path.exists(os.path.join(image, "manifest")):
        os.makedirs(os.path.join(image, "imageMetadata"), exist_ok=True)
        sh("qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=monolithicSparse", raw, vmdk)
        open(os.path.join(image, "manifest"), "wb").close()
    return ds


class Peer:
    def __init__(self, name, mount, root_in_mount, pid_of=None, under=None):
        self.name = name
        self._mount = mount
        self._under = under           # a peer this one is mounted over (bindfs)
        self.mnt = os.path.join(WORK, "mnt-" + name)
        self.root = os.path.join(self.mnt, root_in_mount)
        self._pid_of = pid_of
        os.makedirs(self.mnt, exist_ok=True)

    def __enter__(self):
        if self._under is not None:
            self._under.__enter__()
        self._mount(self.mnt)
        return self

    def __exit__(self, *exc):
        subprocess.run(["umount", self.mnt], check=True)
        time.sleep(0.2)
        if self._under is not None:
            self._under.__exit__(*exc)

    def rss_kib(self):
        if self._pid_of is None:
            return None
        with open(f"/proc/{self._pid_of(self.mnt)}/status") as f:
            return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))


def peers(raw, ds, image):
    mount_imagefs = ("import sys; from imagefs.fuse.mount import mount; "
                     "sys.exit(mount(sys.argv[1], sys.argv[2], options=[]))")
    kernel = Peer("kernel", lambda m: sh("mount", "-o", "loop,ro,noload", "-t", "ext4", raw, m), "")
    under = Peer("kernel-under-bindfs", lambda m: sh("mount", "-o", "loop,ro,noload", "-t", "ext4", raw, m), "")
    return [
        Peer("imagefs", lambda m: sh(PYTHON, "-c", mount_imagefs, ds, m), f"bench/images/{image}/rootfs",
             pid_of=lambda m: int(os.getxattr(m, "user.imagefs.pid"))),
        kernel,
        Peer("fuse2fs", lambda m: sh("fuse2fs", "-o", "ro", raw, m), ""),
        Peer("bindfs", lambda m: sh("bindfs", "-o", "ro,kernel_cache,entry_timeout=3600,attr_timeout=3600",
                                    under.mnt, m), "", under=under),
    ]


def seq_read(path):
    return lambda: sh("dd", f"if={path}", "of=/dev/null", "bs=1M")


def walk(path):
    return lambda: subprocess.run(["find", path, "-ls"], check=True, stdout=subprocess.DEVNULL)


def fio_iops(path, jobs, runtime):
    out = sh("fio", "--name=rand4k", f"--filename={path}", "--rw=randread", "--bs=4k", "--ioengine=psync",
             f"--numjobs={jobs}", "--group_reporting", "--time_based", f"--runtime={runtime}", "--readonly",
             "--invalidate=1", "--output-format=json").stdout
    return json.loads(out)["jobs"][0]["read"]["iops"]


def measure(peer, runtime):
    big = os.path.join(peer.root, BIG)
    size_mb = os.path.getsize(os.path.join(DATA, "tree", BIG)) / 1e6
    tree = os.path.join(peer.root, TREE)
    r = {}
    with peer:                        # fresh mount: nothing cached anywhere
        drop_caches()
        r["walk cold s"] = timed(walk(tree))
        r["walk warm s"] = timed(walk(tree))
        r["rss after walk MiB"] = (peer.rss_kib() or 0) / 1024 or None
    with peer:
        drop_caches()
        r["seq cold MB/s"] = size_mb / timed(seq_read(big))
        r["seq warm MB/s"] = size_mb / timed(seq_read(big))
        r["4k rand 1 job IOPS"] = fio_iops(big, 1, runtime)
        r["4k rand 4 jobs IOPS"] = fio_iops(big, 4, runtime)
    return r


def table(results):
    cols = list(next(iter(results.values())))
    lines = ["| peer | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in results.items():
        cells = ["-" if r[c] is None else f"{r[c]:.2f}" if r[c] < 100 else f"{r[c]:,.0f}" for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv):
    global DATA
    runtime = 10
    n_runs, which = 3, "both"
    for flag in ("--runs", "--setup"):
        if flag in argv:
            i = argv.index(flag)
            if flag == "--runs":
                n_runs = int(argv[i + 1])
            else:
                which = argv[i + 1]
            del argv[i:i + 2]
    if "--runtime" in argv:
        i = argv.index("--runtime")
        runtime = int(argv[i + 1])
        del argv[i:i + 2]
    if argv:
        DATA = argv[0]
    os.makedirs(WORK, exist_ok=True)
    raw = ensure_data(DATA)
    setups = {"raw": lambda: (ensure_datastore(raw), raw, "scratch"),
              "layer": lambda: (*ensure_layer_datastore(DATA), "tree")}
    results = {"load average before": loadavg()}
    print(f"load average before: {results['load average before']}")
    for setup in (["raw", "layer"] if which == "both" else [which]):
        ds, disk, image = setups[setup]()
        ps = peers(disk, ds, image)
        runs = {p.name: [] for p in ps}
        for _ in range(n_runs):                  # peers interleaved, so load hits them alike
            for p in ps:
                runs[p.name].append(measure(p, runtime))
        results[setup] = {name: {k: statistics.median(r[k] or 0 for r in rs) for k in rs[0]}
                          for name, rs in runs.items()}
        results[setup + " runs"] = runs          # every run, for the spread
        print(f"\n{setup}: medians of {n_runs} runs")
        print(table(results[setup]))
    results["load average after"] = loadavg()
    print(f"load average after: {results['load average after']}")
    with tempfile.NamedTemporaryFile("w", dir=WORK, prefix="results-", suffix=".json", delete=False) as f:
        json.dump(results, f, indent=2)
    print(f"(medians and every run in {f.name})")


if __name__ == "__main__":
    main(sys.argv[1:])
