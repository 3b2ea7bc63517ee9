#!/usr/bin/env python3
"""The kill campaign: SIGKILL a layer import at many points, then check what is left.

usage: kill_campaign.py [--dir DIR] [--writers kernel,fuse2fs] [--timed N] [--daemon N] [--client N]
                        [--only cli|daemon|client] [--seed S]        (root; see docs/reliability.md)

Three ways to die, each of them many times:
- ``cli``: ``imagefs image write`` is killed at each crash point a clean write passes
  (``imagefs/crashpoints.py``: tar streaming, every entry extracted, sync and unmount,
  fsck, qsd shutdown, sum check, seal, metadata, manifest and its fsyncs), with both
  writers, and at timed moments spread over a clean write's duration (what the named
  points do not reach: qemu-img create, mount, e2fsck, debugfs running);
- ``daemon``: the mount daemon is killed at crash points of an import through the mount;
- ``client``: the process writing into ``import/<id>`` is killed after a number of bytes
  (inside a header, inside data, exactly between two members, just before and after the
  end-of-archive blocks, after the last byte but before close).

After each kill, the next start (an ``imagefs`` command, or umount and mount again) must
leave zero leftovers (``harness.leftovers``), every visible image must equal a clean
write of the same tar onto the same parent (``harness.snapshot``), and a retry of the same
ID must succeed. The summary line counts kill points, leftovers and wrong images.
"""
import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from reliability import harness  # noqa: E402

STORE, PARENT, TARGET = "s", "base", "layer"
IMPORT_TIMEOUT = 120.0


@dataclass
class Outcome:
    """One kill point and what checking after it found."""
    how: str                         # "cli kernel extract:12", "daemon manifest:1", "client 4096 B"...
    died: bool = False               # the process was killed (not finished before the kill)
    cleaned: list = field(default_factory=list)      # what the next start had to clean
    leftovers: list = field(default_factory=list)    # what was still there after it
    wrong: list = field(default_factory=list)        # visible images that are not right
    retry: str = ""                  # "" when the retry succeeded, else why not

    @property
    def ok(self):
        return not (self.leftovers or self.wrong or self.retry)


class Lab:
    """A datastore with store ``s`` holding image ``base``, a work base, the layer tar, and the
    snapshot a clean write of the layer onto ``base`` gives."""

    def __init__(self, root, writer="kernel", data_mib=9):
        self.root = os.path.abspath(root)
        self.ds, self.work, self.mnt = (os.path.join(self.root, n) for n in ("ds", "work", "mnt"))
        for d in (self.work, self.mnt):
            os.makedirs(d, exist_ok=True)
        self.writer = writer
        parent, layer = harness.campaign_layers(data_mib)
        self.parent_tar, self.layer_tar = os.path.join(self.root, "parent.tar"), os.path.join(self.root, "layer.tar")
        for path, data in ((self.parent_tar, parent), (self.layer_tar, layer)):
            with open(path, "wb") as f:
                f.write(data)
        self.layer_size = len(layer)
        self.cli("store", "create", STORE, "--capacity", "256MiB")
        self.cli("image", "write", STORE, "scratch", PARENT, self.parent_tar)
        self.cli("image", "write", STORE, PARENT, TARGET, self.layer_tar, "--meta", "k=v")
        self.reference = harness.snapshot(self.ds, STORE, TARGET)
        self.cli("image", "rm", STORE, TARGET)

    # --- running imagefs --------------------------------------------------------------------------
    def env(self, **extra):
        env = dict(os.environ, IMAGEFS_WORKDIR=self.work, IMAGEFS_WRITER=self.writer)
        for key in ("IMAGEFS_CRASH_AT", "IMAGEFS_CRASH_TALLY"):
            env.pop(key, None)
        env.update(extra)
        return env

    def cli(self, *args, env=None, check=True, timeout=IMPORT_TIMEOUT):
        proc = subprocess.run([sys.executable, "-m", "imagefs", "--datastore", self.ds, *args],
                              env=env or self.env(), capture_output=True, text=True, cwd=ROOT, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"imagefs {' '.join(args)}: {proc.stderr.strip()}")
        return proc

    def write_cmd(self, image_id=TARGET):
        return [sys.executable, "-m", "imagefs", "--datastore", self.ds, "image", "write", STORE, PARENT,
                image_id, self.layer_tar, "--meta", "k=v"]

    def mount(self, **env):
        proc = subprocess.run([sys.executable, "-m", "imagefs", "mount", self.ds, self.mnt],
                              env=self.env(**env), capture_output=True, text=True, cwd=ROOT, timeout=60)
        if proc.returncode != 0:
            raise RuntimeError(f"imagefs mount: {proc.stderr.strip()}")
        return int(os.getxattr(self.mnt, "user.imagefs.pid"))

    def umount(self):
        if _is_mounted(self.mnt):
            self.cli("umount", self.mnt, check=False)
        if _is_mounted(self.mnt):
            self.cli("umount", "-z", self.mnt, check=False)

    def import_path(self, image_id=TARGET):
        return os.path.join(self.mnt, STORE, "images", PARENT, "import", image_id)

    # --- the crash points a clean write passes ----------------------------------------------------------
    def tally(self, through_mount=False):
        """[(point, n)] in the order a clean write passes them."""
        tally = os.path.join(self.root, "tally")
        if os.path.exists(tally):
            os.unlink(tally)
        if through_mount:
            self.mount(IMAGEFS_CRASH_TALLY=tally)
            _write_through_shell(self.layer_tar, self.import_path())
            self.umount()
        else:
            subprocess.run(self.write_cmd(), env=self.env(IMAGEFS_CRASH_TALLY=tally), check=True,
                           capture_output=True, cwd=ROOT)
        self.cli("image", "rm", STORE, TARGET)
        seen, points = Counter(), []
        with open(tally) as f:
            for line in f:
                seen[line.strip()] += 1
                points.append((line.strip(), seen[line.strip()]))
        return points

    def write_window(self):
        """Seconds from the moment a clean write has its work directory to its exit (what a
        timed kill is spread over: Python's start-up is not the write)."""
        proc = subprocess.Popen(self.write_cmd(), env=self.env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, cwd=ROOT)
        _wait_for_work(self.work, proc)
        start = time.monotonic()
        proc.wait(IMPORT_TIMEOUT)
        window = time.monotonic() - start
        self.cli("image", "rm", STORE, TARGET)
        return window

    # --- the three ways to die --------------------------------------------------------------------------
    def kill_cli(self, point=None, after=None):
        """Kill ``imagefs image write`` at a crash point ("name:n"), or ``after`` seconds into
        its write (counted from its work directory's appearance)."""
        how = f"cli {self.writer} " + (point if point else f"+{after:.2f}s")
        env = self.env(IMAGEFS_CRASH_AT=point) if point else self.env()
        proc = subprocess.Popen(self.write_cmd(), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, cwd=ROOT)
        if after is not None:
            _wait_for_work(self.work, proc)
            try:
                proc.wait(after)
            except subprocess.TimeoutExpired:
                proc.kill()
        proc.wait(IMPORT_TIMEOUT)
        out = Outcome(how, died=proc.returncode == -signal.SIGKILL)
        out.cleaned = harness.leftovers(self.work, self.ds)
        self.cli("image", "ls", STORE)                      # the next start
        self._check(out, retry=self._retry_cli, remove=self._remove_cli)
        return out

    def kill_daemon(self, point):
        """Kill the mount daemon at a crash point of an import through the mount."""
        out = Outcome(f"daemon {self.writer} {point}")
        pid = self.mount(IMAGEFS_CRASH_AT=point)
        _write_through_shell(self.layer_tar, self.import_path())
        out.died = _wait_gone(pid, 30)
        out.cleaned = harness.leftovers(self.work, self.ds)
        self.umount()                                        # the next start: umount, mount again
        self.mount()
        try:
            self._check(out, retry=self._retry_mount, remove=self._remove_mount)
        finally:
            self.umount()
        return out

    def kill_client(self, nbytes):
        """Kill the process writing into import/<id> after ``nbytes`` bytes (before its close)."""
        out = Outcome(f"client {self.writer} {nbytes} B")
        self.mount()
        try:
            writer = subprocess.Popen([sys.executable, "-c", _CLIENT, self.layer_tar, self.import_path(), str(nbytes)])
            writer.wait(IMPORT_TIMEOUT)
            out.died = writer.returncode == -signal.SIGKILL
            _wait_import_done(self.mnt)
            out.cleaned = []                                 # the daemon lives on: it cleans up itself
            self._check(out, retry=self._retry_mount, remove=self._remove_mount)
        finally:
            self.umount()
        return out

    # --- after each kill ------------------------------------------------------------------------------
    def _check(self, out, retry, remove):
        out.leftovers = harness.leftovers(self.work, self.ds)
        ids = self.cli("image", "ls", "-q", STORE).stdout.split()
        for image_id in ids:
            if image_id not in ("scratch", PARENT, TARGET):
                out.wrong.append(f"unexpected image {image_id}")
        if TARGET in ids:
            out.wrong += self._compare()
            remove()
        out.retry = retry()
        if not out.retry:
            out.wrong += self._compare()
            remove()
        out.leftovers += [f"after the retry: {line}" for line in harness.leftovers(self.work, self.ds)]

    def _remove_cli(self):
        self.cli("image", "rm", STORE, TARGET)

    def _remove_mount(self):
        """Through the mount, which then knows at once (another process's change it sees within
        its catalogue's lifetime)."""
        os.rmdir(os.path.join(self.mnt, STORE, "images", TARGET))

    def _compare(self):
        try:
            got = harness.snapshot(self.ds, STORE, TARGET)
        except Exception as err:     # noqa: BLE001 - an unreadable image is a wrong image
            return [f"{TARGET} unreadable: {err}"]
        diff = harness.differences(self.reference, got)
        meta = self.cli("image", "meta", STORE, TARGET, "k", check=False).stdout
        return [f"{TARGET}: {line}" for line in diff] + ([] if meta == "v" else [f"{TARGET}: metadata k={meta!r}"])

    def _retry_cli(self):
        proc = subprocess.run(self.write_cmd(), env=self.env(), capture_output=True, text=True, cwd=ROOT)
        return "" if proc.returncode == 0 else f"retry failed: {proc.stderr.strip()}"

    def _retry_mount(self):
        proc = _write_through_shell(self.layer_tar, self.import_path())
        return "" if proc.returncode == 0 else f"retry through the mount failed: {proc.stderr.strip()}"


_CLIENT = """
import os, signal, sys
tar, target, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
with open(tar, "rb") as f:
    data = f.read(n)
fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
os.setxattr(target, "user.imagefs.meta.k", b"v")
view = memoryview(data)
while view:
    view = view[os.write(fd, view[:65536]):]
os.kill(os.getpid(), signal.SIGKILL)
"""


def _write_through_shell(tar, target):
    """What a user does: the shell opens the import file, cat writes into it; the metadata
    goes in as an xattr first (``touch`` + ``setfattr``)."""
    script = 'touch "$2" && setfattr -n user.imagefs.meta.k -v v "$2" && cat "$1" > "$2"'
    return subprocess.run(["sh", "-c", script, "sh", tar, target], capture_output=True, text=True,
                          timeout=IMPORT_TIMEOUT)


def _wait_for_work(work, proc, timeout=IMPORT_TIMEOUT):
    """Until a work directory appears in ``work`` (the write has begun) or ``proc`` ends."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None and not os.listdir(work):
        time.sleep(0.002)


def _wait_import_done(mnt, timeout=IMPORT_TIMEOUT):
    """Until no import of the mount is pending or running (its import/ dir lists none)."""
    listing = os.path.join(mnt, STORE, "images", PARENT, "import")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not [n for n in os.listdir(listing) if not n.endswith(".error")]:
            return True
        time.sleep(0.05)
    return False


def _wait_gone(pid, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def _is_mounted(path):
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


# --- choosing the points ----------------------------------------------------------------------------
def spread(points, budget):
    """At most ``budget`` of ``points`` ([(name, n)]): every name's first and last pass, the rest
    evenly over the whole run."""
    if len(points) <= budget:
        return list(points)
    keep = set()
    for name in {p for p, _ in points}:
        passes = [pt for pt in points if pt[0] == name]
        keep.update({passes[0], passes[-1]})
    rest = [pt for pt in points if pt not in keep]
    step = len(rest) / max(1, budget - len(keep))
    keep.update(rest[int(i * step)] for i in range(max(0, budget - len(keep))) if int(i * step) < len(rest))
    return [pt for pt in points if pt in keep]


def member_ends(tar_path):
    """Offsets where each member of a tar ends (the next header, or the end-of-archive marker, starts)."""
    import tarfile
    with tarfile.open(tar_path) as tf:
        return [m.offset_data + (m.size + 511) // 512 * 512 for m in tf.getmembers()]


def client_offsets(tar_path, count):
    """Byte counts at which to kill the client: inside headers and data, exactly between two
    members, around the end-of-archive blocks, and everything but the close."""
    size = os.path.getsize(tar_path)
    boundaries = member_ends(tar_path)
    end = boundaries[-1]
    special = [0, 1, 511, 512, boundaries[0], boundaries[len(boundaries) // 2], end, end + 512, end + 1024, size]
    rng = random.Random(7)
    special += sorted(rng.sample(range(1, size), max(0, count - len(special))))
    return sorted(set(o for o in special if o <= size))[:count]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=None, help="where to work (default: a new dir in /var/tmp)")
    ap.add_argument("--writers", default="kernel,fuse2fs")
    ap.add_argument("--points", type=int, default=80, help="crash points per writer (cli)")
    ap.add_argument("--timed", type=int, default=25, help="timed kills per writer (cli)")
    ap.add_argument("--daemon", type=int, default=30, help="daemon kill points (kernel writer)")
    ap.add_argument("--client", type=int, default=24, help="client kill points")
    ap.add_argument("--only", choices=["cli", "daemon", "client"])
    ap.add_argument("--json", help="write every outcome here")
    args = ap.parse_args()
    base = args.dir or tempfile.mkdtemp(prefix="imagefs-kill-", dir="/var/tmp")
    outcomes = []

    def record(out):
        outcomes.append(out)
        mark = "ok " if out.ok else "BAD"
        print(f"{mark} {out.how:<40} died={out.died} cleaned={len(out.cleaned)} "
              f"leftovers={len(out.leftovers)} wrong={len(out.wrong)} {out.retry}", flush=True)
        for line in out.leftovers + out.wrong:
            print(f"    {line}", flush=True)

    try:
        for writer in args.writers.split(","):
            lab = Lab(os.path.join(base, writer), writer)
            if args.only in (None, "cli"):
                for name, n in spread(lab.tally(), args.points):
                    record(lab.kill_cli(f"{name}:{n}"))
                window = lab.write_window()
                for i in range(args.timed):
                    record(lab.kill_cli(after=window * (i + 0.5) / args.timed))
            if writer == "kernel" and args.only in (None, "daemon"):
                points = lab.tally(through_mount=True)
                for name, n in spread(points, args.daemon):
                    record(lab.kill_daemon(f"{name}:{n}"))
            if writer == "kernel" and args.only in (None, "client"):
                for nbytes in client_offsets(lab.layer_tar, args.client):
                    record(lab.kill_client(nbytes))
    finally:
        if args.json:
            with open(args.json, "w") as f:
                json.dump([o.__dict__ for o in outcomes], f, indent=1)
    bad = [o for o in outcomes if not o.ok]
    print(f"kill points: {len(outcomes)} (died: {sum(o.died for o in outcomes)}), "
          f"cleaned by the next start: {sum(bool(o.cleaned) for o in outcomes)}, "
          f"leftovers after it: {sum(len(o.leftovers) for o in outcomes)}, "
          f"wrong images: {sum(len(o.wrong) for o in outcomes)}, failed retries: {sum(bool(o.retry) for o in outcomes)}")
    if not args.dir and not bad:
        shutil.rmtree(base, ignore_errors=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
