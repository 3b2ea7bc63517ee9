"""Undoing what killed layer writers left behind: mounts, loop devices, qsd and fuse2fs, work files.

A writer killed by SIGKILL (or a mount daemon killed while importing) leaves its work
directory (``workdir.py``) with whatever it had started: qemu-storage-daemon with its
FUSE export on ``disk.raw``, a loop device on that export, the layer's ext4 mounted on
``mnt`` (kernel or fuse2fs). ``recover_work_dirs`` runs at every start (CLI command,
mount, ImageStore) and undoes all of it for every work directory whose owner is dead.

It touches only what provably belongs to a dead writer of ours, because other writers
(and other programs) run on the same machine:
- a work directory is recovered only if it carries a record and its owner lock is free
  (the lock is taken before the record is written, and held until the writer is gone);
  recovery holds that lock itself meanwhile, so two recoveries never race;
- mounts are those whose mount point lies inside that directory; loop devices those
  whose backing file does; processes are qemu-storage-daemon or fuse2fs whose command
  line names that directory (unique: mkdtemp), checked again right before each signal.

The order matters: the ext4 first (flushed through a still-running qsd), then the loop
device, then qsd (over QMP when it answers, else by signals), then qsd's export mount
(a signalled qsd leaves it mounted and stale), then the files.
"""
import fcntl
import glob
import logging
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field

from .qsd import quit_over_qmp
from .tools import mounts_under, wait_until
from .workdir import PREFIX, RECORD, process_start, read_record, work_base

log = logging.getLogger("imagefs.layer.recover")

HELPERS = ("qemu-storage-daemon", "fuse2fs")
STOP_WAIT = 5.0
EMPTY_DIR_AGE = 600.0       # an empty work dir this old was left by a writer killed at birth


@dataclass
class Recovered:
    """What one recovery found and undid (for logs and ``store check``)."""
    work_dir: str
    unmounted: list[str] = field(default_factory=list)
    loops: list[str] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)      # "qemu-storage-daemon 1234"
    removed: bool = False
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"unmounted {', '.join(self.unmounted)}" if self.unmounted else "",
                 f"detached {', '.join(self.loops)}" if self.loops else "",
                 f"stopped {', '.join(self.stopped)}" if self.stopped else "",
                 "removed the work files" if self.removed else "",
                 "; ".join(self.problems)]
        return f"{self.work_dir}: " + ("; ".join(p for p in parts if p) or "nothing to do")


def dead_work_dirs(base: str | None = None) -> list[str]:
    """Work directories under ``base`` whose writer is gone (a snapshot: recovery re-checks)."""
    out = []
    for path in _candidates(base):
        fd = _try_lock(path)
        if fd is not None:
            os.close(fd)
            if os.path.exists(os.path.join(path, RECORD)):
                out.append(path)
    return out


def recover_work_dirs(base: str | None = None, only=None) -> list[Recovered]:
    """Recover every work directory of a dead writer under ``base`` (with ``only``, those for
    which ``only(path)`` is true); what was done, per directory."""
    done = []
    for path in _candidates(base):
        if only is not None and not only(path):
            continue
        fd = _try_lock(path)
        if fd is None:
            continue                                    # a live writer (or a recovery) holds it
        try:
            if os.path.exists(os.path.join(path, RECORD)):
                result = recover_work_dir(path)
                log.warning("recovered after a killed layer writer: %s", result.summary())
                done.append(result)
            elif _is_old_and_empty(path):
                os.rmdir(path)
        except OSError as err:
            log.warning("cannot recover work directory %s: %s", path, err)
        finally:
            os.close(fd)
    return done


def disks_of(path: str) -> list[str]:
    """The disks the writer of work directory ``path`` was writing (from its record)."""
    return [f["disk"] for f in read_record(path) if isinstance(f.get("disk"), str)]


def recover_work_dir(path: str) -> Recovered:
    """Undo everything in ``path``, whose owner lock the caller holds."""
    result = Recovered(path)
    facts = read_record(path)
    _unmount_layer(path, result)
    _detach_loops(path, facts, result)
    for pid in _helpers_of(path, facts, "fuse2fs"):
        _stop_process(pid, path, result, grace=STOP_WAIT)     # it exits by itself once unmounted
    _stop_qsd(path, facts, result)
    for point, _fstype in mounts_under(path):          # qsd's export, stale once qsd is gone
        _unmount(point, ["fusermount3", "-u", "-z"], result)
    left = mounts_under(path)
    if left:
        result.problems.append(f"still mounted: {', '.join(p for p, _ in left)}")
    else:
        shutil.rmtree(path, ignore_errors=True)
        result.removed = not os.path.exists(path)
    return result


# --- finding work directories ----------------------------------------------------------------
def _candidates(base):
    try:
        names = sorted(os.listdir(work_base(base)))
    except OSError:
        return []
    return [os.path.join(work_base(base), n) for n in names if n.startswith(PREFIX)]


def _try_lock(path):
    """An fd holding the owner lock of ``path``, or None when someone holds it (or it is gone)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _is_old_and_empty(path):
    try:
        return not os.listdir(path) and time.time() - os.stat(path).st_mtime > EMPTY_DIR_AGE
    except OSError:
        return False


# --- the layer's filesystem, loop devices ----------------------------------------------------------
def _unmount_layer(path, result):
    """The ext4 on ``mnt`` (and anything else mounted inside, qsd's export aside)."""
    raw = os.path.join(path, "disk.raw")
    for point, fstype in mounts_under(path):
        if point == raw:
            continue
        if fstype.startswith("fuse"):
            _unmount(point, ["fusermount3", "-u"], result) or _unmount(point, ["fusermount3", "-u", "-z"], result)
        else:
            _unmount(point, ["umount"], result) or _unmount(point, ["umount", "-l"], result)


def _unmount(point, cmd, result):
    proc = subprocess.run(cmd + [point], stdin=subprocess.DEVNULL, capture_output=True, start_new_session=True)
    if proc.returncode == 0:
        result.unmounted.append(point)
        return True
    return False


def _detach_loops(path, facts, result):
    """The loop device the record names and any other backed by a file inside ``path`` (the
    kernel detaches an autoclear loop once unmounted; a stuck one is detached here)."""
    recorded = {f["loop"] for f in facts if isinstance(f.get("loop"), str) and f["loop"].startswith("/dev/loop")}
    candidates = set(_loops_backed_by(path))
    candidates |= {d for d in recorded if _inside(_loop_backing(os.path.basename(d)) or "", path)}
    for dev in sorted(candidates):
        subprocess.run(["losetup", "-d", dev], capture_output=True, start_new_session=True)
        name = os.path.basename(dev)
        if wait_until(lambda: _loop_backing(name) is None or not _inside(_loop_backing(name), path), STOP_WAIT):
            result.loops.append(dev)
        else:
            result.problems.append(f"loop device {dev} stays attached")


def _loops_backed_by(path):
    out = []
    for backing in glob.glob("/sys/block/loop*/loop/backing_file"):
        name = backing.split("/")[3]
        target = _loop_backing(name)
        if target is not None and _inside(target, path):
            out.append(f"/dev/{name}")
    return out


def _loop_backing(name):
    try:
        with open(f"/sys/block/{name}/loop/backing_file", errors="surrogateescape") as f:
            return f.read().rstrip("\n").removesuffix(" (deleted)")
    except OSError:
        return None


def _inside(target, path):
    return target == path or target.startswith(path + "/")


# --- helper processes ----------------------------------------------------------------------------
def _stop_qsd(path, facts, result):
    pids = _helpers_of(path, facts, "qemu-storage-daemon")
    if not pids:
        return
    grace = 0.0
    qmp = os.path.join(path, "qmp.sock")
    if os.path.exists(qmp):
        try:
            quit_over_qmp(qmp, timeout=STOP_WAIT)
            grace = STOP_WAIT
        except Exception as err:     # noqa: BLE001 - a dead or wedged qsd: signals follow
            log.debug("qsd in %s does not answer QMP: %s", path, err)
    for pid in pids:
        _stop_process(pid, path, result, grace)


def _helpers_of(path, facts, name):
    """Pids of live ``name`` processes of this work dir: recorded ones, and any other whose
    command line names the directory (started just before a record could be written)."""
    recorded = [f[name] for f in facts if isinstance(f.get(name), int) and
                process_start(f[name]) == f.get("start")]
    found = [pid for pid in _all_pids() if _is_helper_of(pid, path, name)]
    return sorted({pid for pid in recorded + found if _is_helper_of(pid, path, name)})


def _all_pids():
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _is_helper_of(pid, path, name):
    """Is ``pid`` a ``name`` process (zombies aside) whose command line names ``path``?"""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    if not argv or os.path.basename(argv[0]).decode(errors="replace") != name:
        return False
    needle = os.fsencode(path + "/")
    return any(needle in arg for arg in argv[1:])


def _stop_process(pid, path, result, grace):
    """Wait ``grace`` seconds, then TERM, then KILL, re-checking before each signal that the
    pid is still this work dir's helper (a pid can be reused)."""
    name = next((h for h in HELPERS if _is_helper_of(pid, path, h)), None)
    if name is None:
        return
    for sig, wait in ((None, grace), (signal.SIGTERM, STOP_WAIT), (signal.SIGKILL, STOP_WAIT)):
        if not _is_helper_of(pid, path, name):
            break
        if sig is not None:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                break
        wait_until(lambda: not _is_helper_of(pid, path, name), wait)
    if _is_helper_of(pid, path, name):
        result.problems.append(f"{name} {pid} does not exit")
    else:
        result.stopped.append(f"{name} {pid}")
