"""Writing a layer: a new delta VMDK of a parent, with a layer tar applied to its ext4.

Pipeline (design brief §3, toolchain-probe B1/B3):
qemu-img create child -> qemu-storage-daemon exports it as a raw file -> mount the ext4
(kernel loop or fuse2fs) -> apply the tar while hashing every byte received -> unmount
-> deferred debugfs pass (fuse2fs, unprivileged) -> e2fsck -fn must be clean -> stop qsd.
Any failure unwinds all of it and removes the child disk; the parent is only ever read.

Environment: IMAGEFS_WRITER (auto|kernel|fuse2fs) picks the default method;
IMAGEFS_WORKDIR is where work directories go (default /var/tmp);
IMAGEFS_DEFER_PRIVILEGED=1 makes fuse2fs use the debugfs pass even as root (for tests).
"""
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterator

from ..errors import Exists, ImageFSError, InvalidInput, NotFound, SumMismatch, ToolFailed
from .deferred import DeferredOps
from .extract import apply_layer
from .fsmount import Mount
from .qsd import StorageDaemon
from .tools import hold_interrupts, is_mounted, run, tail

METHODS = ("kernel", "fuse2fs")
DEFAULT_WORKDIR = "/var/tmp"
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
                progress: Callable[[int], None] | None = None) -> WriteResult:
    """Create ``child_vmdk`` as a delta of ``parent_vmdk`` holding the layer tar ``stream``.

    The stream (gzip, bzip2, xz, zstd or plain) is read to EOF and its raw bytes hashed;
    ``expected_sum`` ("sha256:<hex>") must then match exactly. On any failure the child
    disk is removed and the error re-raised.
    """
    if expected_sum is not None and not _SUM_RE.match(expected_sum):
        raise InvalidInput(f"invalid expected sum {expected_sum!r}: use sha256:<64 lowercase hex digits>")
    method = resolve_method(method)
    create_child_disk(parent_vmdk, child_vmdk)
    reader = _HashingReader(stream, progress)
    try:
        with writable_mount(child_vmdk, method=method, workdir=workdir) as layer:
            stats = apply_layer(layer.root, reader, deferred=layer.deferred)
            reader.drain()
            if expected_sum is not None and reader.digest != expected_sum:
                raise SumMismatch(f"Failed to validate image checksum. Expected {expected_sum}, "
                                  f"got {reader.digest}")
    except BaseException:
        with hold_interrupts():
            _remove_file(child_vmdk)
        raise
    reader.report()
    return WriteResult(reader.digest, reader.size, stats.entries)


@contextmanager
def writable_mount(vmdk: str, *, method: str | None = None,
                   workdir: str | None = None) -> Iterator[MountedLayer]:
    """Mount the ext4 of ``vmdk`` read-write; on a clean exit seal it (unmount, deferred
    operations, ``e2fsck -fn`` clean, qsd stopped). On an exception only unwind."""
    method = resolve_method(method)
    with _work_dir(workdir) as work, StorageDaemon(vmdk, work) as qsd:
        root = os.path.join(work, "mnt")
        os.mkdir(root)
        deferred = DeferredOps(work) if method == "fuse2fs" and _defer_privileged() else None
        with Mount(method, qsd.raw, root, os.path.join(work, "fuse2fs.log")):
            yield MountedLayer(root, deferred)
            if deferred is not None and not deferred.is_empty():
                deferred.count_links(root)
        if deferred is not None and not deferred.is_empty():
            deferred.apply(qsd.raw)
        _check_fs(qsd.raw)


def _defer_privileged() -> bool:
    return os.geteuid() != 0 or os.environ.get("IMAGEFS_DEFER_PRIVILEGED") == "1"


def _check_fs(raw: str) -> None:
    proc = subprocess.run(["e2fsck", "-fn", raw], stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, errors="replace", start_new_session=True)
    if proc.returncode != 0:
        raise ToolFailed(f"e2fsck -fn found the layer unclean (exit {proc.returncode}): "
                         f"{tail(proc.stdout + proc.stderr, 3)}")


@contextmanager
def _work_dir(base: str | None) -> Iterator[str]:
    base = base or os.environ.get("IMAGEFS_WORKDIR") or DEFAULT_WORKDIR
    try:
        work = tempfile.mkdtemp(prefix="imagefs-layer-", dir=base)
    except OSError as err:
        raise ImageFSError(f"cannot create a work directory in {base}: {err.strerror}") from None
    try:
        yield work
    finally:
        with hold_interrupts():
            # rmtree would descend into a mount that failed to go away: never do that
            if not any(is_mounted(os.path.join(work, n)) for n in ("mnt", "disk.raw")):
                shutil.rmtree(work, ignore_errors=True)


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
