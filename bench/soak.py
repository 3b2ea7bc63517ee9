#!/usr/bin/env python3
"""Concurrency soak: one datastore, a mount and the CLI working on it at once.

usage: soak.py [--seconds 600] [--seed 1] [--imports 8] [--json FILE] [--work DIR]   (root)

For a bounded time, with a fixed seed, worker threads of this process (the mount's
client) and CLI processes (the second process on the datastore) run:

  import    a tar into images/<parent>/import/<id> (mount) or ``image write`` (CLI);
            some reuse a taken ID on purpose (EEXIST); up to --imports at once
  export    read images/<id>/rootfs.tar (the whole image) and check every file it should hold
  read      walk images/<id>/rootfs and check every file against the tars
  delete    rmdir images/<id> (mount) or ``image rm`` (CLI), also of images being read
            (a file held open: must be EBUSY) or imported into (a pending import: EBUSY)
  stores    mkdir/rmdir of other stores (mount) and ``store create/rm`` (CLI)

Allowed outcomes are success and the documented errors: EBUSY, EEXIST, ENOTEMPTY (rmdir
of a store with images), and ENOENT only for what this soak itself deleted meanwhile.
Anything else is a failure. At the end every image still there is checked against the
tars it was made of (through the store API, a third reader), and the daemon's open
descriptors, RSS and threads, sampled once mounted (idle) and every 10 s from the end of
a warm-up (the baseline), must stay within fixed bounds whatever the number of images
the mount opened (``resource_problems``).

Prints a JSON summary; exit 1 on any failure.
"""
import argparse
import contextlib
import errno
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from imagefs.datastore import open_datastore  # noqa: E402
from imagefs.errors import ImageFSError  # noqa: E402
from imagefs.store import ImageStore  # noqa: E402

STORE = "soak"
# What the daemon may hold beyond its idle state whatever the images it opened: the disk
# pool's layer files (imagefs.diskpool.MAX_OPEN) and OTHER_FDS (FUSE, log, 8 imports in
# flight, exports); the read cache's budget and RSS_ALLOWANCE_MB (up to 1,024 parsed disks
# of about 25 KB, 64 open trees with a parser per thread, the buffers of up to 6 exports at
# once of about 10 MiB, malloc's per-thread arenas); OTHER_THREADS (the FUSE workers,
# imports, exports). Over a run of LONG_RUN seconds (the pool and the cache are full well
# before), the last third of the samples may top the middle third by at most FLAT_*.
OTHER_FDS = 128
RSS_ALLOWANCE_MB = 160
OTHER_THREADS = 64
LONG_RUN = 300
FLAT_FDS, FLAT_RSS_MB = 32, 24
IMAGEFS = [sys.executable, "-m", "imagefs"]
ALLOWED = {"EBUSY", "EEXIST", "ENOTEMPTY"}
MADE_AGAIN = "deleted and made again meanwhile"


def layer_tar(rng, image_id):
    """A small layer: files of its own under d/<id>/, and a change to the shared file."""
    files = {f"d/{image_id}/f{i}": rng.randbytes(rng.randint(0, 40000)) for i in range(rng.randint(1, 6))}
    files["shared"] = f"written by {image_id}\n".encode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for d in ("d", f"d/{image_id}"):
            ti = tarfile.TarInfo(d)
            ti.type, ti.mode = tarfile.DIRTYPE, 0o755
            tf.addfile(ti)
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode = len(data), 0o644
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue(), files


class ForkGate:
    """Imports through the mount and process spawns exclude each other. A child forked while an
    import file is open inherits its descriptor for a moment; if the importer's close lands
    in that moment, imagefs (rightly) sees another holder and commits at the last close, so
    the importer's close() would return before the commit (docs/mount.md: the commit waits
    for the last close). Many imports may be open at once; a spawn waits for none to be."""

    def __init__(self):
        self._cond = threading.Condition()
        self._open = 0

    @contextlib.contextmanager
    def importing(self):
        with self._cond:
            self._open += 1
        try:
            yield
        finally:
            with self._cond:
                self._open -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def spawning(self):
        with self._cond:
            self._cond.wait_for(lambda: self._open == 0)
            yield


@dataclass
class Image:
    id: str
    parent: str | None
    files: dict                     # path -> bytes of this layer (parents' come from the chain)
    state: str = "committed"        # committed, deleting, deleted
    holders: int = 0


@dataclass
class Stats:
    ops: dict = field(default_factory=dict)        # kind -> {outcome: count}
    failures: list = field(default_factory=list)

    def count(self, kind, outcome):
        self.ops.setdefault(kind, {}).setdefault(outcome, 0)
        self.ops[kind][outcome] += 1


class Soak:
    def __init__(self, args):
        self.args = args
        self.work = args.work
        self.ds = os.path.join(self.work, "ds")
        self.mnt = os.path.join(self.work, "mnt")
        self.tars = os.path.join(self.work, "tars")
        self.lock = threading.Lock()
        self.images = {"scratch": Image("scratch", None, {})}
        self.stats = Stats()
        self.started = time.monotonic()
        self.serial = 0
        self.import_slots = threading.Semaphore(args.imports)
        self.gate = ForkGate()
        self.samples = []
        self.stop_at = None

    # --- bookkeeping --------------------------------------------------------------------------
    def new_id(self, prefix="i"):
        with self.lock:
            self.serial += 1
            return f"{prefix}{self.serial}"

    def pick(self, rng, **kw):
        img = self.pick_image(rng, **kw)
        return None if img is None else img.id

    def pick_image(self, rng, states=("committed",), leaf=False, not_scratch=False):
        """An image in one of ``states``: the Image that stands for this incarnation of its ID (once
        the soak deleted it, a reuse import may make the ID again, under a new Image)."""
        with self.lock:
            ids = sorted(i for i, img in self.images.items() if img.state in states
                         and not (not_scratch and i == "scratch")
                         and not (leaf and any(c.parent == i and c.state != "deleted" for c in self.images.values())))
            return self.images[rng.choice(ids)] if ids else None

    def expected_files(self, image_id, img=None):
        """Every file of an image (of incarnation ``img``, else the current one): its layer's over its parents'."""
        chain = []
        with self.lock:
            img = img or self.images.get(image_id)
            while img is not None:
                chain.append(img)
                img = self.images.get(img.parent) if img.parent else None
        out = {}
        for img in reversed(chain):
            out.update(img.files)
        return out

    def gone(self, image_id, img=None):
        """Is the image being deleted or deleted by the soak: the ID's current incarnation, or
        ``img``, the one an operation picked (which a reuse import may have replaced since)?"""
        with self.lock:
            return any(i is not None and i.state in ("deleting", "deleted") for i in (self.images.get(image_id), img))

    def outcome(self, kind, err, image_id=None, detail="", img=None):
        """Record an OSError outcome; a failure unless allowed (``img``: the incarnation picked)."""
        name = errno.errorcode.get(err.errno, str(err.errno)) if isinstance(err, OSError) else type(err).__name__
        if name in ALLOWED:
            self.stats.count(kind, name)
        elif name == "ENOENT" and image_id is not None and self.gone(image_id, img):
            self.stats.count(kind, "ENOENT (deleted meanwhile)")
        else:
            self.fail(kind, f"{image_id or ''} {detail}: {name}: {err}")

    def wrong(self, kind, what, img):
        """Content other than the tars said: a failure, unless the soak deleted the incarnation
        read meanwhile and a reuse import made its ID again (the path names another image now)."""
        if self.gone(img.id, img):
            self.stats.count(kind, MADE_AGAIN)
        else:
            self.fail(kind, what)

    def fail(self, kind, what):
        self.stats.count(kind, "FAILURE")
        now = time.time()       # also the wall clock, to find the moment in the daemon's log
        self.stats.failures.append(f"{time.monotonic() - self.started:.1f} s "
                                   f"({time.strftime('%H:%M:%S', time.localtime(now))},{int(now % 1 * 1000):03d}): "
                                   f"{kind} {what}")

    def cli(self, *args):
        with self.gate.spawning():
            proc = subprocess.Popen(IMAGEFS + ["--datastore", self.ds, *args], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
        out, err = proc.communicate(timeout=600)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def cli_outcome(self, kind, proc, image_id=None):
        if proc.returncode == 0:
            self.stats.count(kind, "ok")
            return True
        text = proc.stderr.strip()
        for needle, name in (("already exists", "EEXIST"), ("in use", "EBUSY"), ("in progress", "EBUSY"),
                             ("being written", "EBUSY"),
                             ("still holds", "ENOTEMPTY"), ("has files open", "EBUSY")):
            if needle in text:
                self.stats.count(kind, name)
                return False
        if "not found" in text and (image_id is None or self.gone(image_id)):
            self.stats.count(kind, "ENOENT (deleted meanwhile)")
            return False
        self.fail(kind, f"{image_id or ''} (CLI): {text}")
        return False

    # --- operations ---------------------------------------------------------------------------------
    def op_import(self, rng, via_cli):
        parent = self.pick(rng)
        if parent is None:
            return
        reuse = rng.random() < 0.1
        image_id = self.pick(rng, not_scratch=True) if reuse else None
        image_id = image_id or self.new_id("c" if via_cli else "m")
        data, files = layer_tar(rng, image_id)
        with self.import_slots:
            if via_cli:
                tar = os.path.join(self.tars, f"{image_id}-{rng.randrange(1 << 30)}.tar")
                with open(tar, "wb") as f:
                    f.write(data)
                ok = self.cli_outcome("import (CLI)", self.cli("image", "write", STORE, parent, image_id, tar), parent)
                os.unlink(tar)
            else:
                try:
                    with self.gate.importing(), \
                            open(os.path.join(self.mnt, STORE, "images", parent, "import", image_id), "wb") as f:
                        f.write(data)
                    ok = True
                    self.stats.count("import (mount)", "ok")
                except OSError as e:
                    ok = False
                    self.outcome("import (mount)", e, parent)
        if ok:
            with self.lock:
                if image_id in self.images and self.images[image_id].state != "deleted":
                    self.stats.failures.append(f"import {image_id}: committed twice")
                self.images[image_id] = Image(image_id, parent, files)

    def op_read(self, rng):
        picked = self.pick_image(rng)
        if picked is None:
            return
        image_id = picked.id
        want = self.expected_files(image_id, picked)
        root = os.path.join(self.mnt, STORE, "images", image_id, "rootfs")
        try:
            for name in sorted(want)[:8]:
                with open(os.path.join(root, name), "rb") as f:
                    if f.read() != want[name]:
                        self.wrong("read", f"{image_id}/{name}: wrong content", picked)
                        return
            self.stats.count("read", "ok")
        except OSError as e:
            self.outcome("read", e, image_id, img=picked)

    def op_export(self, rng):
        picked = self.pick_image(rng)
        if picked is None:
            return
        image_id = picked.id
        want = self.expected_files(image_id, picked)
        try:
            with open(os.path.join(self.mnt, STORE, "images", image_id, "rootfs.tar"), "rb") as f:
                data = f.read()
        except OSError as e:
            self.outcome("export", e, image_id, img=picked)
            return
        with tarfile.open(fileobj=io.BytesIO(data)) as tf:
            got = {m.name: tf.extractfile(m).read() for m in tf if m.isfile() and m.name in want}
        if got != want:
            self.wrong("export", f"{image_id}: {len(got)} of {len(want)} files right", picked)
        else:
            self.stats.count("export", "ok")

    def op_delete(self, rng, via_cli):
        image_id = self.pick(rng, not_scratch=True, leaf=rng.random() < 0.7)
        if image_id is None:
            return
        with self.lock:
            img = self.images[image_id]
            if img.state != "committed":
                return
            img.state = "deleting"
        if via_cli:
            ok = self.cli_outcome("delete (CLI)", self.cli("image", "rm", STORE, image_id), image_id)
        else:
            try:
                os.rmdir(os.path.join(self.mnt, STORE, "images", image_id))
                ok = True
                self.stats.count("delete (mount)", "ok")
            except OSError as e:
                ok = False
                self.outcome("delete (mount)", e, image_id)
        with self.lock:
            img.state = "deleted" if ok else "committed"

    def op_delete_while_busy(self, rng):
        """rmdir of an image with a file held open, then with an import pending into it: EBUSY."""
        image_id = self.pick(rng, not_scratch=True)
        if image_id is None:
            return
        base = os.path.join(self.mnt, STORE, "images", image_id)
        name = sorted(self.expected_files(image_id))[0]
        pending = os.path.join(base, "import", self.new_id("p"))
        try:
            with open(os.path.join(base, "rootfs", name), "rb"):
                self.expect_ebusy(base, image_id, "open file")
            open(pending, "ab").close()
            try:
                self.expect_ebusy(base, image_id, "pending import")
            finally:
                os.unlink(pending)
        except OSError as e:
            self.outcome("delete while busy", e, image_id)

    def expect_ebusy(self, path, image_id, why):
        try:
            os.rmdir(path)
        except OSError as e:
            if e.errno == errno.EBUSY:
                self.stats.count("delete while busy", "EBUSY")
            else:
                self.outcome("delete while busy", e, image_id, why)
            return
        with self.lock:
            self.images[image_id].state = "deleted"
        self.fail("delete while busy", f"rmdir of {image_id} with an {why} succeeded")

    def op_stores(self, rng, via_cli):
        name = f"tmp{rng.randint(0, 3)}"
        if via_cli:
            if rng.random() < 0.5:
                self.cli_outcome("store create (CLI)", self.cli("store", "create", name, "--capacity", "64MiB"))
            else:
                self.cli_outcome("store rm (CLI)", self.cli("store", "rm", name))
            return
        path = os.path.join(self.mnt, name)
        try:
            if rng.random() < 0.5:
                os.mkdir(path)
                self.stats.count("store mkdir (mount)", "ok")
            else:
                os.rmdir(path)
                self.stats.count("store rmdir (mount)", "ok")
        except OSError as e:
            if e.errno == errno.ENOENT:
                self.stats.count("store (mount)", "ENOENT (not made yet)")
            else:
                self.outcome("store (mount)", e)

    # --- running --------------------------------------------------------------------------------
    def worker(self, n, ops):
        rng = random.Random(f"{self.args.seed}:{n}")
        while time.monotonic() < self.stop_at:
            kind = rng.choice(ops)
            try:
                {"import-mount": lambda: self.op_import(rng, False),
                 "import-cli": lambda: self.op_import(rng, True),
                 "read": lambda: self.op_read(rng),
                 "export": lambda: self.op_export(rng),
                 "delete-mount": lambda: self.op_delete(rng, False),
                 "delete-cli": lambda: self.op_delete(rng, True),
                 "delete-busy": lambda: self.op_delete_while_busy(rng),
                 "stores-mount": lambda: self.op_stores(rng, False),
                 "stores-cli": lambda: self.op_stores(rng, True)}[kind]()
            except Exception as e:      # noqa: B902 - a soak failure, not a crash of the driver
                self.fail(kind, f"{type(e).__name__}: {e}")

    def sample(self, pid):
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        with open(f"/proc/{pid}/status") as f:
            rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        threads = len(os.listdir(f"/proc/{pid}/task"))
        with self.lock:
            images = sum(img.state != "deleted" for img in self.images.values())
        self.samples.append({"t": round(time.monotonic() - self.started, 1), "fds": fds, "rss_kb": rss,
                             "threads": threads, "images": images})

    def run(self):
        for d in (self.mnt, self.tars):
            os.makedirs(d, exist_ok=True)
        proc = self.cli("store", "create", STORE, "--capacity", "256MiB")
        assert proc.returncode == 0, proc.stderr
        proc = subprocess.run(IMAGEFS + ["mount", self.ds, self.mnt, "-o",
                                         f"allow_other,scratch_size=64MiB,log={self.work}/daemon.log"],
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        pid = int(os.getxattr(self.mnt, "user.imagefs.pid"))
        try:
            self.started = time.monotonic()
            self.sample(pid)
            self.idle = self.samples.pop()                 # before any image is read
            self.stop_at = self.started + self.args.seconds
            ops = {  # worker -> the operations it draws from
                "importer": ["import-mount", "import-mount", "import-cli"],
                "mixed": ["read", "read", "export", "delete-mount", "delete-cli", "delete-busy",
                          "import-mount", "stores-mount", "stores-cli"],
                "reader": ["read", "export"],
            }
            workers = [("importer", i) for i in range(self.args.imports)] + \
                      [("mixed", 100 + i) for i in range(3)] + [("reader", 200 + i) for i in range(3)]
            threads = [threading.Thread(target=self.worker, args=(n, ops[kind]), daemon=True)
                       for kind, n in workers]
            for t in threads:
                t.start()
            warm = self.started + min(20.0, self.args.seconds / 3)
            while any(t.is_alive() for t in threads):
                if time.monotonic() >= warm and not self.samples:
                    self.sample(pid)                       # the baseline, after a warm-up
                elif self.samples and time.monotonic() - self.started >= self.samples[-1]["t"] + 10:
                    self.sample(pid)
                time.sleep(0.5)
            for t in threads:
                t.join()
            self.sample(pid)
        finally:
            subprocess.run(IMAGEFS + ["umount", self.mnt], capture_output=True)
        return self.verify()

    def verify(self):
        """Every image still there holds exactly what its tars said (read through the store API)."""
        st = ImageStore(open_datastore(self.ds))
        on_disk = {img.id for img in st.list_images(STORE)}
        with self.lock:
            alive = {i for i, img in self.images.items() if img.state != "deleted"}
        if on_disk != alive:
            self.stats.failures.append(f"images on disk {sorted(on_disk - alive)} not committed here, "
                                       f"{sorted(alive - on_disk)} missing")
        verified = 0
        for image_id in sorted(on_disk & alive):
            try:
                tree = st.tree(STORE, image_id)
                for name, data in self.expected_files(image_id).items():
                    if tree.read(tree.resolve(name), 0, len(data) + 1) != data:
                        self.stats.failures.append(f"verify {image_id}/{name}: wrong content")
            except ImageFSError as e:
                self.stats.failures.append(f"verify {image_id}: {e}")
                continue
            if image_id != "scratch" and st.get_image(STORE, image_id).parent != self.images[image_id].parent:
                self.stats.failures.append(f"verify {image_id}: wrong parent")
            verified += 1
        self.stats.failures.extend(resource_problems(self.idle, self.samples, self.args.seconds))
        first, last = self.samples[0], self.samples[-1]
        return {"seconds": self.args.seconds, "seed": self.args.seed, "parallel_imports": self.args.imports,
                "ops": self.stats.ops, "failures": self.stats.failures, "images_verified": verified,
                "fds": [first["fds"], last["fds"]], "rss_mb": [round(first["rss_kb"] / 1024, 1),
                                                               round(last["rss_kb"] / 1024, 1)],
                "threads": [first["threads"], last["threads"]], "images": [first["images"], last["images"]],
                "idle": {"fds": self.idle["fds"], "rss_mb": round(self.idle["rss_kb"] / 1024, 1),
                         "threads": self.idle["threads"]},
                "max": {"fds": max(x["fds"] for x in self.samples),
                        "rss_mb": round(max(x["rss_kb"] for x in self.samples) / 1024, 1),
                        "threads": max(x["threads"] for x in self.samples)},
                "samples": self.samples}


def resource_problems(idle, samples, seconds):
    """Lines saying where the daemon's descriptors, memory or threads were not bounded (empty: they were).

    Bounded: every sample within the idle daemon's figures plus the fixed margins above,
    which do not depend on how many images were opened. Flat: in a run of LONG_RUN seconds
    or more, the highest sample of the last third at most FLAT_* above that of the middle third."""
    from imagefs.diskpool import MAX_OPEN
    from imagefs.fuse.namespace import CACHE_BUDGET
    bounds = {"fds": ("descriptors", idle["fds"] + MAX_OPEN + OTHER_FDS, 1, ""),
              "rss_kb": ("RSS", idle["rss_kb"] / 1024 + (CACHE_BUDGET >> 20) + RSS_ALLOWANCE_MB, 1024, " MB"),
              "threads": ("threads", idle["threads"] + OTHER_THREADS, 1, "")}
    problems = []
    for key, (what, bound, scale, unit) in bounds.items():
        worst = max(samples, key=lambda x: x[key])
        if worst[key] / scale > bound:
            problems.append(f"{what}: {worst[key] / scale:.0f}{unit} at {worst['t']} s ({worst['images']} images), "
                            f"over the bound {bound:.0f}{unit}")
    if seconds >= LONG_RUN and len(samples) >= 6:
        third = len(samples) // 3
        middle, last = samples[third:2 * third], samples[2 * third:]
        for key, what, allowed, scale, unit in (("fds", "descriptors", FLAT_FDS, 1, ""),
                                                ("rss_kb", "RSS", FLAT_RSS_MB, 1024, " MB")):
            grew = (max(x[key] for x in last) - max(x[key] for x in middle)) / scale
            if grew > allowed:
                problems.append(f"{what}: grew by {grew:.0f}{unit} in the last third of the run "
                                f"(allowed {allowed}{unit})")
    return problems


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=600)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--imports", type=int, default=8, help="import workers (parallel imports)")
    p.add_argument("--json", help="also write the summary here")
    p.add_argument("--work", help="work directory (default: a new one under /var/tmp, removed after)")
    args = p.parse_args(argv)
    keep = args.work is not None
    args.work = args.work or tempfile.mkdtemp(prefix="imagefs-soak-", dir="/var/tmp")
    try:
        summary = Soak(args).run()
    finally:
        if not keep:
            shutil.rmtree(args.work, ignore_errors=True)
    text = json.dumps(summary, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    return 1 if summary["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
