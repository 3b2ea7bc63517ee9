#!/usr/bin/env python3
"""Container images in and out, against the ecosystem's tools (not a test; run as root).

usage: bench_oci.py [--dir DIR] [--runs N]     (default /var/tmp/imagefs-oci-bench, 3 runs)

The image is a real Debian system built the way a Dockerfile builds one, once, into
DIR (reused by later runs):

1. ``debootstrap --variant=minbase bookworm`` as the base layer;
2. ``apt-get install python3-minimal ca-certificates`` in it (a chroot in a private
   mount namespace, so its /proc goes away with it);
3. clean-up: apt lists, docs and man pages deleted (whiteouts), a config file added.

umoci builds the OCI layout from those trees (gzip layers). Rows, each the median of
N interleaved runs, cold page cache before each:

* ``imagefs image load`` of the layout into a fresh store, against ``umoci unpack``
  of the same image into a fresh bundle (both apply every layer: imagefs into VMDK
  layers holding ext4, umoci into a directory);
* ``imagefs image save`` of the loaded image to a fresh OCI layout (every layer
  exported from its disk as a diff against its parent, written uncompressed), against
  ``skopeo copy oci:... oci:...`` of the source image (its gzip blobs copied as they
  are; skopeo's ``--dest-decompress`` applies to ``dir:`` only, so there is no
  uncompressed oci: peer).
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGEFS = [sys.executable, "-m", "imagefs"]
MIRROR = "http://deb.debian.org/debian"
TAG = "bench"
STORE = "bench"


def run(*argv, **kw):
    subprocess.run(argv, check=True, **kw)


def build(where):
    """The OCI layout ``where/oci`` (tag ``bench``), made once."""
    oci = os.path.join(where, "oci")
    if os.path.exists(os.path.join(where, "oci.complete")):
        return oci
    shutil.rmtree(oci, ignore_errors=True)
    base = os.path.join(where, "debootstrap")
    if not os.path.exists(os.path.join(base, ".complete")):
        shutil.rmtree(base, ignore_errors=True)
        print("debootstrap --variant=minbase bookworm ...", file=sys.stderr)
        run("debootstrap", "--variant=minbase", "bookworm", base, MIRROR, stdout=subprocess.DEVNULL)
        open(os.path.join(base, ".complete"), "w").close()
    ref = f"{oci}:{TAG}"
    run("umoci", "init", "--layout", oci)
    run("umoci", "new", "--image", ref)

    def layer(step):
        bundle = tempfile.mkdtemp(prefix="bundle-", dir=where)
        try:
            run("umoci", "unpack", "--image", ref, bundle)
            step(os.path.join(bundle, "rootfs"))
            run("umoci", "repack", "--image", ref, bundle)
        finally:
            shutil.rmtree(bundle)

    def base_system(root):
        run("cp", "-a", f"{base}/.", root)
        os.remove(os.path.join(root, ".complete"))

    def install(root):
        shutil.copy("/etc/resolv.conf", os.path.join(root, "etc", "resolv.conf"))
        script = (f"mount -t proc proc {root}/proc && "
                  f"chroot {root} sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive "
                  "apt-get install -y -qq --no-install-recommends python3-minimal ca-certificates'")
        run("unshare", "--mount", "--propagation", "private", "sh", "-c", script, stdout=subprocess.DEVNULL)

    def clean_up(root):
        for sub in ("var/lib/apt/lists", "usr/share/doc", "usr/share/man", "var/cache/apt"):
            shutil.rmtree(os.path.join(root, sub))
        with open(os.path.join(root, "etc", "app.conf"), "w") as f:
            f.write("listen = 0.0.0.0:8080\n")

    for step in (base_system, install, clean_up):
        print(f"layer: {step.__name__}", file=sys.stderr)
        layer(step)
    run("umoci", "gc", "--layout", oci)
    open(os.path.join(where, "oci.complete"), "w").close()
    return oci


def drop_caches():
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as e:
        print(f"(drop_caches: {e.strerror})", file=sys.stderr)


def timed(argv, **kw):
    drop_caches()
    t = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, **kw)
    return time.perf_counter() - t


def du(path):
    return int(subprocess.run(["du", "-sb", path], check=True, capture_output=True, text=True).stdout.split()[0])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default="/var/tmp/imagefs-oci-bench")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    oci = build(args.dir)
    env = dict(os.environ, PYTHONPATH=REPO)
    rows = {k: [] for k in ("load", "unpack", "save", "skopeo")}
    with tempfile.TemporaryDirectory(prefix="run-", dir=args.dir) as work:
        for i in range(args.runs):
            ds = os.path.join(work, f"ds{i}")
            run(*IMAGEFS, "--datastore", ds, "store", "create", STORE, "--capacity", "4GiB", env=env,
                stdout=subprocess.DEVNULL)
            rows["load"].append(timed([*IMAGEFS, "-q", "--datastore", ds, "image", "load", STORE, oci, "--name", TAG],
                                      env=env))
            bundle = os.path.join(work, f"bundle{i}")
            rows["unpack"].append(timed(["umoci", "unpack", "--image", f"{oci}:{TAG}", bundle]))
            saved = os.path.join(work, f"saved{i}")
            rows["save"].append(timed([*IMAGEFS, "-q", "--datastore", ds, "image", "save", STORE,
                                       f"{TAG}:{TAG}", "-o", saved], env=env))
            rows["skopeo"].append(timed(["skopeo", "copy", "-q", f"oci:{oci}:{TAG}",
                                         f"oci:{work}/copy{i}:{TAG}"]))
            if i == 0:
                sizes = {"source layout": du(oci), "bundle": du(bundle), "saved layout": du(saved)}
            for path in (ds, bundle, saved, f"{work}/copy{i}"):
                shutil.rmtree(path)
    med = {k: statistics.median(v) for k, v in rows.items()}
    print(f"image: {oci}:{TAG}; " + ", ".join(f"{k} {v / 1e6:.0f} MB" for k, v in sizes.items()))
    print(f"medians of {args.runs} runs, seconds (all runs: {rows})")
    print("| | imagefs s | peer s | imagefs / peer |")
    print("|---|---|---|---|")
    print(f"| `image load` vs `umoci unpack` | {med['load']:.2f} | {med['unpack']:.2f} | "
          f"{med['load'] / med['unpack']:.2f} |")
    print(f"| `image save` vs `skopeo copy` | {med['save']:.2f} | {med['skopeo']:.2f} | "
          f"{med['save'] / med['skopeo']:.2f} |")


if __name__ == "__main__":
    main()
