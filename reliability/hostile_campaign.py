#!/usr/bin/env python3
"""Hostile layers at full size: every breakout and every tar bomb, through the CLI and the mount.

usage: hostile_campaign.py [--dir DIR] [--only NAME-SUBSTRING]     (root; see docs/reliability.md)

Each case is streamed as it is generated (nothing on disk) into ``imagefs image write``
(peak RSS of the writer from wait4) and into ``import/<id>`` of a mount (peak RSS of the
daemon, VmHWM reset before each case). A case passes when it is refused with one line or
applied, memory stays under 200 MiB, nothing is left behind, and no file outside the
layer changed (the breakouts' victim directory, /victim, /victim-abs, /dev/null).
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from reliability import harness, hostile  # noqa: E402

RSS_LIMIT = 200 << 20


def _feed(path_or_pipe, stream):
    """Write the stream into a file (opened here) or a pipe; the error that stopped it, if any."""
    try:
        with (open(path_or_pipe, "wb") if isinstance(path_or_pipe, str) else path_or_pipe) as out:
            for chunk in stream:
                out.write(chunk)
    except OSError as err:
        return err
    return None


def run_cli(ds, work, name, make, image_id):
    env = dict(os.environ, IMAGEFS_WORKDIR=work)
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "imagefs", "--datastore", ds, "image", "write", "s", "scratch",
                             image_id, "-"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=env, cwd=ROOT)
    _feed(proc.stdin, make())
    err = proc.stderr.read().decode(errors="replace").strip()
    _, status, usage = os.wait4(proc.pid, 0)
    return {"how": "cli", "case": name, "exit": os.waitstatus_to_exitcode(status), "said": err,
            "rss": usage.ru_maxrss << 10, "seconds": time.monotonic() - start}


def run_mount(mnt, pid, name, make, image_id):
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")
    target = os.path.join(mnt, "s", "images", "scratch", "import", image_id)
    start = time.monotonic()
    error = _feed(target, make())
    said = open(target + ".error").read().strip() if os.path.exists(target + ".error") else ""
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) << 10 for line in f if line.startswith("VmHWM:"))
    return {"how": "mount", "case": name, "exit": 0 if error is None else error.errno, "said": said, "rss": rss,
            "seconds": time.monotonic() - start}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir")
    ap.add_argument("--only")
    args = ap.parse_args()
    base = args.dir or tempfile.mkdtemp(prefix="imagefs-hostile-", dir="/var/tmp")
    ds, work, mnt = (os.path.join(base, n) for n in ("ds", "work", "mnt"))
    for d in (work, mnt):
        os.makedirs(d, exist_ok=True)
    subprocess.run([sys.executable, "-m", "imagefs", "--datastore", ds, "store", "create", "s"], check=True,
                   env=dict(os.environ, IMAGEFS_WORKDIR=work), cwd=ROOT, capture_output=True)
    cases = {**{f"breakout: {k}": v for k, v in hostile.BREAKOUTS.items()},
             **{f"bomb: {k}": v for k, v in hostile.BOMBS.items()}}
    if args.only:
        cases = {k: v for k, v in cases.items() if args.only in k}
    host_null = os.stat("/dev/null")
    results, bad = [], 0
    subprocess.run([sys.executable, "-m", "imagefs", "mount", ds, mnt], check=True, cwd=ROOT,
                   env=dict(os.environ, IMAGEFS_WORKDIR=work))
    try:
        pid = int(os.getxattr(mnt, "user.imagefs.pid"))
        for n, (name, make) in enumerate(cases.items()):
            for how in ("cli", "mount"):
                image_id = f"c{n}-{how}"
                r = run_cli(ds, work, name, make, image_id) if how == "cli" else run_mount(mnt, pid, name, make,
                                                                                           image_id)
                problems = []
                if r["rss"] >= RSS_LIMIT:
                    problems.append(f"memory {r['rss'] >> 20} MiB")
                if r["exit"] and (r["said"].count("\n") or not r["said"]):
                    problems.append("not one line")
                left = [line for line in harness.leftovers(work, ds) if image_id in line or "work file" in line]
                problems += left
                if os.path.exists("/victim") or os.path.exists("/victim-abs") or \
                        os.stat("/dev/null").st_rdev != host_null.st_rdev:
                    problems.append("a file outside the layer changed")
                r["problems"] = problems
                bad += bool(problems)
                results.append(r)
                outcome = "applied" if not r["exit"] else f"refused: {r['said'][:110]}"
                print(f"{'ok ' if not problems else 'BAD'} {how:5} {name[:48]:48} {r['rss'] >> 20:4d} MiB "
                      f"{r['seconds']:6.1f} s  {outcome} {'; '.join(problems)}", flush=True)
    finally:
        subprocess.run([sys.executable, "-m", "imagefs", "umount", mnt], cwd=ROOT)
    print(f"cases: {len(results)}, refused: {sum(bool(r['exit']) for r in results)}, "
          f"applied: {sum(not r['exit'] for r in results)}, "
          f"peak RSS: {max(r['rss'] for r in results) >> 20} MiB, problems: {bad}")
    if not args.dir and not bad:
        shutil.rmtree(base, ignore_errors=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
