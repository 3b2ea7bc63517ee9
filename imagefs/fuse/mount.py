"""Mount lifecycle: start (foreground or as a daemon), serve, stop on signals, unmount.

``mount()`` returns only once the mount is ready: in the background the daemon
reports through a pipe (its stderr until then, so libfuse's own complaints reach the
user too), and the parent exits non-zero with the reason if the start failed.

SIGTERM, SIGINT and SIGHUP unmount cleanly: imports still receiving bytes are
aborted (their half-made layers removed), imports already committing finish, exports
stop, then the filesystem is unmounted.
"""
import logging
import logging.handlers
import os
import signal
import subprocess
import sys
import time

import pyfuse3
import trio

from ..datastore import open_datastore
from ..errors import Exists, ImageFSError, InvalidInput, NotFound
from ..store import ImageStore
from .exports import ExportLimits
from .imports import ImportHandle, ImportRegistry
from .namespace import Namespace
from .nodes import SHORT
from .ops import Operations
from .options import parse_options

log = logging.getLogger("imagefs.fuse")

READY = b"\0imagefs-ready\n"
PID_XATTR = "user.imagefs.pid"
FUSERMOUNT = "fusermount3"


def mount(datastore: str, mountpoint: str, *, foreground=False, options=()) -> int:
    """Mount ``datastore`` on ``mountpoint``; the exit code (0 once the mount is ready)."""
    try:
        opts = parse_options(options)
        if "://" not in datastore:
            datastore = os.path.abspath(datastore)     # the background daemon runs in /
        mountpoint = _check_mountpoint(mountpoint)
        if opts.workdir and _is_inside(os.path.abspath(opts.workdir), mountpoint):
            raise InvalidInput("workdir must not be inside the mountpoint")
        if opts.datastore.get("cache_dir") and _is_inside(os.path.abspath(opts.datastore["cache_dir"]), mountpoint):
            raise InvalidInput("cache_dir must not be inside the mountpoint")
        _ask_password_now(datastore, opts)
        if "://" not in datastore:
            if not os.path.isdir(datastore):
                raise NotFound(f"datastore {datastore} does not exist")
            datastore = os.path.abspath(datastore)
        for m in active_mounts():
            if m["mountpoint"] == mountpoint:
                raise Exists(f"{mountpoint} is already an imagefs mount of {m['datastore']} "
                             f"({'daemon ' + str(m['pid']) if m['pid'] else 'stale: imagefs umount clears it'})")
        # the mount's source is the datastore, so mount(8) matches fstab lines (mount -a twice mounts once)
        opts.fuse = {o for o in opts.fuse if not o.startswith("fsname=")} | {"fsname=" + datastore.replace(",", "\\,")}
    except ImageFSError as e:
        print(f"imagefs: {e}", file=sys.stderr)
        return 1
    for warning in opts.warnings:
        print(f"imagefs: warning: {warning}", file=sys.stderr)
    if foreground or opts.debug:
        return _run(datastore, mountpoint, opts, ready=None)
    return _run_in_background(datastore, mountpoint, opts)


def umount(mountpoint: str, lazy=False) -> int:
    """Unmount cleanly and wait for the daemon to finish; a stale mount (daemon killed) too."""
    mp = os.path.abspath(mountpoint)
    fstype = _mounted_fstype(mp)
    if fstype is None:
        print(f"imagefs: {mp} is not mounted", file=sys.stderr)
        return 1
    if fstype != "fuse.imagefs":
        print(f"imagefs: {mp} is not an imagefs mount ({fstype})", file=sys.stderr)
        return 1
    pid = _daemon_pid(mp)
    proc = _fusermount("-u", "-z", mp) if lazy else _fusermount("-u", mp)
    if proc.returncode != 0 and pid is None and not lazy:
        proc = _fusermount("-u", "-z", mp)   # stale and still in use: detach it
    if proc.returncode != 0:
        reason = proc.stderr.strip() or f"{FUSERMOUNT} exit {proc.returncode}"
        hint = "" if lazy else " (in use? close what uses it, or unmount lazily)"
        print(f"imagefs: cannot unmount {mp}: {reason}{hint}", file=sys.stderr)
        return 1
    if pid is not None and not lazy and not _wait_exit(pid, timeout=120):
        print(f"imagefs: unmounted {mp}, but daemon {pid} is still running", file=sys.stderr)
        return 1
    return 0


# --- serving ---------------------------------------------------------------------------------
def _run(datastore, mountpoint, opts, ready):
    """Mount and serve until unmounted; ``ready()`` is called once requests are served."""
    _setup_logging(opts, background=ready is not None)
    try:
        # the catalogue of a store's images lives as long as the kernel keeps their names (SHORT)
        store = ImageStore(open_datastore(datastore, opts.datastore), writer_method=opts.writer,
                           workdir=opts.workdir, catalogue_ttl=SHORT)
        store.recover()                               # what killed writers left: before serving
        imports = ImportRegistry(store)
        ns = Namespace(store, imports, scratch_capacity=opts.scratch_capacity, pid=os.getpid(),
                       uid=os.getuid(), gid=os.getgid(), admin_gid=opts.admin_gid,
                       export_limits=ExportLimits(opts.max_exports, opts.max_exports_per_user))
        ops = Operations(ns, imports)
        try:
            pyfuse3.init(ops, mountpoint, opts.fuse)
        except RuntimeError as e:
            raise ImageFSError(f"cannot mount {datastore} on {mountpoint}: {e}") from None
    except ImageFSError as e:
        print(f"imagefs: {e}", file=sys.stderr)
        return 1
    log.info("mounted %s on %s (%s)", datastore, mountpoint, ",".join(sorted(opts.fuse)))
    for warning in opts.warnings:
        log.warning("%s", warning)
    try:
        trio.run(_serve, ops, mountpoint, ready)
    finally:
        pyfuse3.close(unmount=True)
        store.ds.close()          # the daemon leaves with os._exit: no atexit hooks run
    log.info("unmounted %s", mountpoint)
    return 0


async def _serve(ops, mountpoint, ready):
    async with trio.open_nursery() as jobs:          # import and export workers
        ops.start(jobs)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async with trio.open_nursery() as serving:
                serving.start_soon(_stop_on_signal, signals, ops)
                serving.start_soon(_serve_requests, serving.cancel_scope)
                # Ready means answering: the kernel's INIT and a first request went through.
                st = await trio.to_thread.run_sync(os.stat, mountpoint, abandon_on_cancel=True)
                ops.imports.device = st.st_dev          # how holders.py knows this mount's files
                _widen_readahead(st.st_dev)
                if ready is not None:
                    ready()
        await ops.shutdown()                          # unmounted from outside: abort what is left


async def _serve_requests(cancel_scope):
    await pyfuse3.main()                              # returns once unmounted or terminated
    cancel_scope.cancel()


CANCEL_GRACE = 3.0     # seconds writers of canceled imports get to hear ECANCELED before the unmount


async def _stop_on_signal(signals, ops):
    async for signum in signals:
        log.info("%s: unmounting", signal.Signals(signum).name)
        await ops.shutdown()
        # Keep answering for a moment: a writer's next write (or close) then fails with
        # ECANCELED, as documented, instead of ECONNABORTED from a connection already gone.
        with trio.move_on_after(CANCEL_GRACE):
            while any(isinstance(h, ImportHandle) for h in ops.handles.values()):
                await trio.sleep(0.05)
        pyfuse3.terminate()
        return


def _run_in_background(datastore, mountpoint, opts):
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_fd)
        report = _read_all(read_fd)
        os.waitpid(pid, 0)
        if report.endswith(READY):
            sys.stderr.write(report[: -len(READY)].decode(errors="replace"))
            return 0
        sys.stderr.write(report.decode(errors="replace")
                         or "imagefs: the mount daemon exited before the mount was ready\n")
        return 1
    os.close(read_fd)
    os.setsid()
    if os.fork():
        os._exit(0)                                   # the daemon is not a child of the caller
    os.chdir("/")
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.dup2(write_fd, 2)                              # until ready, complaints go to the waiting parent

    def ready():
        os.write(write_fd, READY)
        os.dup2(devnull, 2)
        os.close(write_fd)

    code = 1
    try:
        code = _run(datastore, mountpoint, opts, ready)
    except BaseException:                             # noqa: B902 - report, then exit the daemon
        log.exception("imagefs daemon failed")
    finally:
        logging.shutdown()
        os._exit(code)


def _setup_logging(opts, background):
    root = logging.getLogger()
    if background:
        for existing in root.handlers:     # stderr reaches the caller only until ready: problems only
            if type(existing) is logging.StreamHandler:
                existing.setLevel(max(existing.level, logging.WARNING))
        if opts.log_file:
            handler = logging.FileHandler(opts.log_file)
            handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
        elif os.path.exists("/dev/log"):
            handler = logging.handlers.SysLogHandler(address="/dev/log")
            handler.setFormatter(logging.Formatter(f"imagefs[{os.getpid()}]: %(levelname)s: %(message)s"))
        else:
            handler = None
        if handler is not None:
            root.addHandler(handler)
    elif not root.handlers:
        logging.basicConfig(format="imagefs: %(levelname)s: %(message)s")
    level = logging.DEBUG if opts.debug else logging.INFO
    if root.level > level or root.level == logging.NOTSET or background:
        root.setLevel(level)


READAHEAD_KB = 4096


def _widen_readahead(dev):
    """Let the kernel read ahead 4 MiB at a time (in 1 MiB requests) instead of FUSE's 128 KiB.

    A sequential reader then keeps several big reads in flight, which is what a cold
    read needs to reach the disk's speed. Only root may set it; others keep the default.
    """
    path = f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb"
    try:
        with open(path, "w") as f:
            f.write(str(READAHEAD_KB))
    except OSError as e:
        log.debug("cannot set %s: %s", path, e)


# --- helpers ---------------------------------------------------------------------------------
def _ask_password_now(datastore, opts):
    """A daemon has no terminal: a vSphere password to prompt for is asked before it starts
    (kept in memory, handed over by fork, never on a command line)."""
    if not str(datastore).startswith("vsphere://") or os.environ.get("IMAGEFS_VSPHERE_PASSWORD") \
            or opts.datastore.get("password_file"):
        return
    from ..datastore.vsphere.url import parse_url, read_password
    opts.datastore["password"] = read_password(parse_url(datastore), opts.datastore)


def _check_mountpoint(mountpoint):
    mp = os.path.abspath(mountpoint)
    if not os.path.isdir(mp):
        raise InvalidInput(f"mountpoint {mp} is not a directory")
    return mp


def _is_inside(path, directory):
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def _read_all(fd):
    chunks = []
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            os.close(fd)
            return b"".join(chunks)
        chunks.append(chunk)


def _mounted_fstype(mp):
    """The filesystem type mounted at ``mp`` (topmost), or None."""
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            if _unescape(fields[4]) == mp:
                found = fields[sep + 1]
    return found


def active_mounts():
    """Every imagefs mount this process can see: mountpoint, datastore, daemon pid, live or stale."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            if fields[sep + 1] != "fuse.imagefs":
                continue
            mp = _unescape(fields[4])
            pid = _daemon_pid(mp)
            out.append({"mountpoint": mp, "datastore": _unescape(fields[sep + 2]), "pid": pid,
                        "state": "live" if pid else "stale", "options": fields[5]})
    return out


def _unescape(field):
    return field.encode().decode("unicode_escape") if "\\" in field else field


def _daemon_pid(mp):
    """The serving daemon's pid, or None when the mount is stale (its daemon is gone)."""
    try:
        return int(os.getxattr(mp, PID_XATTR))
    except (OSError, ValueError):
        return None


def _fusermount(*args):
    return subprocess.run([FUSERMOUNT, *args], capture_output=True, text=True)


def _wait_exit(pid, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rpartition(")")[2].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False
