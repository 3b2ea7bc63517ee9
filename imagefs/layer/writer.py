"""Writing a layer: a new delta VMDK of a parent, with a layer tar applied to its ext4.

Stages (docs/design.md, "Write path"): qemu-img create child -> qemu-storage-daemon
exports it as a raw file -> mount the ext4 (kernel loop or fuse2fs) -> apply the tar
while hashing every byte received and recording what it makes -> seal (syncfs, unmount,
deferred debugfs pass, e2fsck -fn clean, qsd stopped) -> verify the sealed disk against
the record. Any failure unwinds all of it and removes the child disk; the parent is only
ever read.

Environment: IMAGEFS_WRITER (auto|kernel|fuse2fs) picks the default method;
IMAGEFS_WORKDIR is where work directories go (default /var/tmp);
IMAGEFS_DEFER_PRIVILEGED=1 makes fuse2fs use the debugfs pass even as root (for tests).
"""
import errno
import hashlib
import logging
import os
import re
import subprocess
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterator

from ..crashpoints import crash_point
from ..errors import Exists, ImageFSError, InvalidInput, NoSpace, NotFound, SumMismatch, ToolFailed
from .deferred import DeferredOps
from .extract import apply_layer
from .fsmount import Mount
from .model import LayerModel
from .qsd import StorageDaemon
from .tools import hold_interrupts, run, tail
from .verify import verify_layer
from .workdir import WorkDir

log = logging.getLogger("imagefs.layer.writer")

METHODS = ("kernel", "fuse2fs")
ROOM_PROBE = 1 << 20        # a datastore that cannot give this much is full (a disk grows by 64 KiB grains)
PROGRESS_STEP = 4 << 20
_SUM_RE = re.compile(r"sha256:[0-9a-f]{64}\Z")


@dataclass
class WriteResult:
    digest: str         # "sha256:<hex>" of the raw bytes received
    size: int           # raw bytes received
    entries: int        # tar entries applied


@dataclass
class MountedLayer:
    root: str                       # the mounted filesystem's root
    deferred: DeferredOps | None    # where privileged operations go (fuse2fs unprivileged)


def resolve_method(method: str | None) -> str:
    """``method``, else $IMAGEFS_WRITER, else "auto": kernel as root, fuse2fs otherwise."""
    chosen = method or os.environ.get("IMAGEFS_WRITER") or "auto"
    if chosen == "auto":
        return "kernel" if os.geteuid() == 0 else "fuse2fs"
    if chosen not in METHODS:
        raise InvalidInput(f"unknown layer writer {chosen!r}: use auto, kernel or fuse2fs")
    if chosen == "kernel" and os.geteuid() != 0:
        raise InvalidInput("the kernel layer writer needs root; use fuse2fs")
    return chosen


def create_child_disk(parent_vmdk: str, child_vmdk: str) -> None:
    """A monolithicSparse delta of ``parent_vmdk``, naming it relative to the child's directory."""
    parent, child = os.path.abspath(parent_vmdk), os.path.abspath(child_vmdk)
    if not os.path.isfile(parent):
        raise NotFound(f"parent disk {parent_vmdk} does not exist")
    if os.path.lexists(child):
        raise Exists(f"disk {child_vmdk} already exists")
    backing = os.path.relpath(parent, os.path.dirname(child))
    try:
        run(["qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat=monolithicSparse",
             "-b", backing, "-F", "vmdk", child], "qemu-img create")
    except BaseException:
        _remove_file(child)
        raise


def write_layer(parent_vmdk: str, child_vmdk: str, stream: BinaryIO, *,
                expected_sum: str | None = None, method: str | None = None,
                workdir: str | None = None,
                progress: Callable[[int], None] | None = None,
                on_archive_end: Callable[[], None] | None = None) -> WriteResult:
    """Create ``child_vmdk`` as a delta of ``parent_vmdk`` holding the layer tar ``stream``.

    The stream (gzip, bzip2, xz, zstd or plain) is read to EOF and its raw bytes hashed;
    ``expected_sum`` ("sha256:<hex>") must then match exactly. Without a sum, the tar must
    end with its end-of-archive marker: a stream cut between two members is refused.
    ``on_archive_end()`` is called once the marker has been read (before the rest of the
    stream is). On any failure the child disk is removed and the error re-raised; a
    failure while the datastore is full is NoSpace.

    Stages, each done before the next starts: create the child disk; export and mount it
    (``writable_mount``); apply the tar, recording what it makes (``model.py``); seal (sync,
    unmount, fsck, stop qsd: the exit of ``writable_mount``); make the disk file durable;
    verify the sealed disk against the record (``verify.py``). A step that converts the
    sealed disk slots in between the seal and the verification.
    """
    if expected_sum is not None and not _SUM_RE.match(expected_sum):
        raise InvalidInput(f"invalid expected sum {expected_sum!r}: use sha256:<64 lowercase hex digits>")
    method = resolve_method(method)
    reader = _HashingReader(stream, progress)
    try:
        _check_space(child_vmdk)
        create_child_disk(parent_vmdk, child_vmdk)
        with WorkDir(workdir) as work:
            model = LayerModel(work.join("layer.db"))
            try:
                with writable_mount(child_vmdk, method=method, work=work) as layer:
                    stats = apply_layer(layer.root, reader, deferred=layer.deferred, model=model)
                    if stats.complete and on_archive_end is not None:
                        on_archive_end()
                    reader.drain()
                    _check_stream(stats, reader, expected_sum)
                crash_point("sealed")                 # sealed and durable (writable_mount)
                verify_layer(child_vmdk, model)
                crash_point("verified")
            finally:
                model.close()
    except BaseException as err:
        with hold_interrupts():
            failure = _space_failure(err, child_vmdk)
            _remove_file(child_vmdk)
        if failure is not None:
            raise failure from err
        raise
    reader.report()
    return WriteResult(reader.digest, reader.size, stats.entries)


def _check_stream(stats, reader, expected_sum: str | None) -> None:
    """The sum, when given, decides; without one the tar must have ended properly."""
    crash_point("sum")
    if expected_sum is not None:
        if reader.digest != expected_sum:
            raise SumMismatch(f"Failed to validate image checksum. Expected {expected_sum}, got {reader.digest}")
    elif not stats.complete:
        raise InvalidInput(f"the layer stream is truncated: it ends after {stats.entries} entries "
                           f"({reader.size} bytes) without the tar end-of-archive marker "
                           "(give its sha256 to accept it as it is)")


def _check_space(child_vmdk: str) -> None:
    """A datastore already full gives a clear NoSpace, not a qemu-img assertion."""
    if not _has_room(child_vmdk):
        raise NoSpace(f"the datastore is full: no room for layer disk {os.path.basename(child_vmdk)}")


def _space_failure(err: BaseException, child_vmdk: str) -> NoSpace | None:
    """A write failure (a tool's, a lost write, a read-back mismatch) while the datastore is
    full is the datastore's fullness, said plainly. Bad input stays bad input."""
    if not isinstance(err, (ImageFSError, OSError)) or isinstance(err, (InvalidInput, NoSpace)):
        return None
    if _has_room(child_vmdk):
        return None
    log.info("layer %s failed on a full datastore: %s", child_vmdk, err)
    return NoSpace(f"the datastore is full: layer {os.path.basename(child_vmdk)} could not be written")


def _has_room(child_vmdk: str) -> bool:
    """Can the datastore still give the writer (and qsd, which runs as we do) ROOM_PROBE bytes?
    Asked by allocating them, since statfs cannot say what is reserved even from root."""
    probe = os.path.join(os.path.dirname(os.path.abspath(child_vmdk)), f".space-probe-{os.getpid()}")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as err:
        return err.errno not in (errno.ENOSPC, errno.EDQUOT)
    try:
        os.posix_fallocate(fd, 0, ROOM_PROBE)
    except OSError as err:
        return err.errno not in (errno.ENOSPC, errno.EDQUOT)
    finally:
        os.close(fd)
        os.unlink(probe)
    return True


@contextmanager
def writable_mount(vmdk: str, *, method: str | None = None, workdir: str | None = None,
                   work: WorkDir | None = None) -> Iterator[MountedLayer]:
    """Mount the ext4 of ``vmdk`` read-write; on a clean exit seal it (sync and unmount,
    deferred operations, ``e2fsck -fn`` clean, qsd stopped) and make ``vmdk`` durable
    (qsd never flushes it: see qsd.py). On an exception only unwind.
    ``work`` is the work directory to use (else a new one in ``workdir``).

    Each resource is started right where its stop is registered, so whatever a failure
    (or a signal) interrupts, exactly what was started is stopped, in reverse order.
    """
    method = resolve_method(method)
    with ExitStack() as stack:
        if work is None:
            work = stack.enter_context(WorkDir(workdir))
        stack.push(_on_success(lambda: fsync_file(vmdk)))         # runs once qsd has exited
        qsd = stack.enter_context(StorageDaemon(vmdk, work))
        stack.push(_on_success(lambda: _check_fs(qsd.raw)))
        deferred = DeferredOps(work.path) if method == "fuse2fs" and _defer_privileged() else None
        if deferred is not None:
            stack.push(_on_success(lambda: deferred.is_empty() or deferred.apply(qsd.raw)))
        mount = stack.enter_context(Mount(method, qsd.raw, work))
        if deferred is not None:
            stack.push(_on_success(lambda: deferred.is_empty() or deferred.count_links(mount.target)))
        yield MountedLayer(mount.target, deferred)


def _on_success(step: Callable[[], object]):
    """An ExitStack exit callback that runs ``step`` only when nothing failed before it."""
    def exit_callback(exc_type, exc, tb):
        if exc_type is None:
            step()
        return False
    return exit_callback


def _defer_privileged() -> bool:
    return os.geteuid() != 0 or os.environ.get("IMAGEFS_DEFER_PRIVILEGED") == "1"


def _check_fs(raw: str) -> None:
    crash_point("fsck")
    proc = subprocess.run(["e2fsck", "-fn", raw], stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, errors="replace", start_new_session=True)
    if proc.returncode != 0:
        raise ToolFailed(f"e2fsck -fn found the layer unclean (exit {proc.returncode}): "
                         f"{tail(proc.stdout + proc.stderr, 3)}")


def fsync_file(path: str) -> None:
    """Make a file written by a tool durable, with its directory entry."""
    for target, flags in ((path, 0), (os.path.dirname(os.path.abspath(path)), os.O_DIRECTORY)):
        try:
            fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC | flags)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as err:
            raise ImageFSError(f"cannot make {target} durable: {err.strerror}") from None


def _remove_file(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class _HashingReader:
    """The layer stream as received: every byte read is hashed and counted."""

    def __init__(self, stream: BinaryIO, progress: Callable[[int], None] | None):
        self._stream = stream
        self._readinto = getattr(stream, "readinto", None)
        self._hash = hashlib.sha256()
        self._progress = progress
        self._reported = 0
        self.size = 0

    def readinto(self, buf) -> int:
        try:
            if self._readinto is not None:
                n = self._readinto(buf) or 0
            else:
                chunk = self._stream.read(len(buf))
                n = len(chunk)
                buf[:n] = chunk
        except OSError as err:
            raise ImageFSError(f"cannot read the layer stream: {err.strerror or err}") from err
        self._hash.update(buf[:n])
        if self.size // PROGRESS_STEP != (self.size + n) // PROGRESS_STEP:
            crash_point("stream")
        self.size += n
        if self._progress is not None and self.size - self._reported >= PROGRESS_STEP:
            self.report()
        return n

    def drain(self) -> None:
        """Read (and hash) whatever follows the tar's end-of-archive marker."""
        buf = memoryview(bytearray(1 << 20))
        while self.readinto(buf):
            pass

    def report(self) -> None:
        if self._progress is not None:
            self._reported = self.size
            self._progress(self.size)

    @property
    def digest(self) -> str:
        return "sha256:" + self._hash.hexdigest()
