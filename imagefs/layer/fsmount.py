"""Mounting, read-write, the ext4 held by an exported raw disk.

- ``kernel``: a loop mount, root only and fastest. ``noinit_itable`` keeps ext4's lazy
  inode-table init from writing zeroed tables into the child disk; ``nosuid,nodev``
  because nothing on a layer being written is meant to be run or opened as a device.
- ``fuse2fs``: ``fuse2fs -f -o fakeroot`` as our child process. ``fusermount3 -u``
  returns before fuse2fs has written the superblock "clean", so we wait for it to exit.
Both run in their own session so a terminal Ctrl-C reaches only us, and we unmount.

A write that fails below the filesystem (qsd cannot grow the disk: the datastore is
full) does not fail the write(2) of a kernel mount: the page is written back later and
the error only lands in the filesystem's error sequence. So before unmounting, a clean
stop calls ``syncfs`` on a descriptor opened right after mounting (it reports every
writeback error since that open) and compares ext4's own error count with its value
at mount time. Each start is written to the work directory's record for recovery.
"""
import ctypes
import os
import signal
import subprocess
import time

from ..crashpoints import crash_point
from ..errors import ImageFSError, ToolFailed
from .tools import hold_interrupts, is_mounted, mount_source, read_tail, run, spawn, wait_until

MOUNT_TIMEOUT = 30.0
EXIT_TIMEOUT = 120.0        # fuse2fs flushes its caches on exit
BUSY_RETRY_SECONDS = 10.0
KERNEL_OPTIONS = "loop,noinit_itable,noatime,nosuid,nodev"


_libc = ctypes.CDLL(None, use_errno=True)


class LayerWriteError(ImageFSError):
    """Writes to the layer's filesystem were lost below it (the disk export failed)."""


class Mount:
    """``with Mount(method, raw, work):`` the ext4 in ``raw`` is mounted at ``work/mnt``.

    A clean exit syncs (any lost write raises LayerWriteError), unmounts and waits until
    nothing holds ``raw`` any more (ToolFailed if that fails); an exception, or a failed
    start, unmounts by whatever means it takes.
    """

    def __init__(self, method: str, raw: str, work):
        self.method, self.raw, self._work = method, raw, work
        self.target = work.join("mnt")
        self._log = work.join("fuse2fs.log")
        self._proc: subprocess.Popen | None = None      # fuse2fs
        self._loop: str | None = None                   # the kernel mount's loop device
        self._root_fd = -1                              # opened at mount: syncfs sees errors since
        self._errors_at_mount = 0

    def __enter__(self) -> "Mount":
        try:
            self._start()
        except BaseException:
            with hold_interrupts():
                self._kill()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        with hold_interrupts():
            if exc_type is not None:
                self._kill()
                return
            try:
                self._stop()
            except BaseException:
                self._kill()
                raise

    def _start(self) -> None:
        os.mkdir(self.target)
        self._work.note(mount=self.target, method=self.method)
        if self.method == "kernel":
            run(["mount", "-t", "ext4", "-o", KERNEL_OPTIONS, self.raw, self.target], "mount")
            self._loop = mount_source(self.target)
            self._work.note(loop=self._loop)
            self._errors_at_mount = self._ext4_errors()
        else:
            self._proc = spawn(["fuse2fs", "-f", "-o", "fakeroot,big_writes", self.raw, self.target],
                               self._log, "fuse2fs")
            self._work.note_process("fuse2fs", self._proc.pid)
            if not wait_until(lambda: self._proc.poll() is not None or is_mounted(self.target), MOUNT_TIMEOUT):
                raise ToolFailed(f"fuse2fs did not mount the layer within {MOUNT_TIMEOUT:.0f} s")
            if self._proc.poll() is not None:
                raise ToolFailed(f"fuse2fs could not mount the layer: {read_tail(self._log)}")
        self._root_fd = os.open(self.target, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def _stop(self) -> None:
        crash_point("unmount")
        self._sync()
        self._close_root()
        crash_point("unmount")
        if self.method == "kernel":
            _unmount_retrying(["umount", self.target], "umount")
            crash_point("unmount")
            self._wait_loop_detached()
        else:
            _unmount_retrying(["fusermount3", "-u", self.target], "fusermount3 -u")
            crash_point("unmount")
            self._wait_fuse2fs(EXIT_TIMEOUT)

    def _sync(self) -> None:
        """Write everything back now, and fail if any write since the mount was lost."""
        if _libc.syncfs(self._root_fd) != 0:
            err = ctypes.get_errno()
            raise LayerWriteError(f"writing the layer's filesystem failed: {os.strerror(err)} "
                                  "(the disk below it lost writes)")
        if self.method == "kernel":
            errors = self._ext4_errors() - self._errors_at_mount
            if errors > 0:
                raise LayerWriteError(f"the layer's filesystem recorded {errors} error(s) while being written")

    def _ext4_errors(self) -> int:
        """ext4's error count of the mounted layer (0 where the kernel does not say)."""
        if not self._loop or not self._loop.startswith("/dev/"):
            return 0
        try:
            with open(f"/sys/fs/ext4/{os.path.basename(self._loop)}/errors_count") as f:
                return int(f.read())
        except (OSError, ValueError):
            return 0

    def _close_root(self) -> None:
        if self._root_fd >= 0:
            os.close(self._root_fd)
            self._root_fd = -1

    def _kill(self) -> None:
        """Undo whatever _start() got to; never raises ToolFailed."""
        self._close_root()
        if self.method == "kernel":
            self._loop = self._loop or mount_source(self.target)
        if is_mounted(self.target):
            try:
                run(["umount", self.target] if self.method == "kernel" else ["fusermount3", "-u", self.target],
                    "unmount")
            except ToolFailed:
                lazy = ["umount", "-l"] if self.method == "kernel" else ["fusermount3", "-u", "-z"]
                subprocess.run(lazy + [self.target], capture_output=True, start_new_session=True)
        elif self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()                      # fuse2fs that never got mounted
        try:
            if self.method == "kernel":
                self._wait_loop_detached()
            else:
                self._wait_fuse2fs(EXIT_TIMEOUT)
        except ToolFailed:
            pass

    def _wait_loop_detached(self) -> None:
        # The loop device drops its reference to the raw file asynchronously after umount.
        if not self._loop or not self._loop.startswith("/dev/loop"):
            return
        backing = f"/sys/block/{os.path.basename(self._loop)}/loop/backing_file"
        if not wait_until(lambda: not os.path.exists(backing), MOUNT_TIMEOUT):
            subprocess.run(["losetup", "-d", self._loop], capture_output=True, start_new_session=True)
            if not wait_until(lambda: not os.path.exists(backing), 5):
                raise ToolFailed(f"loop device {self._loop} stays attached to {self.raw}")

    def _wait_fuse2fs(self, timeout: float) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            raise ToolFailed(f"fuse2fs did not exit within {timeout:.0f} s of the unmount") from None
        if code != 0:
            raise ToolFailed(f"fuse2fs exited with {code}: {read_tail(self._log)}")


def _unmount_retrying(cmd: list[str], what: str) -> None:
    """Unmount; "busy" is retried for a while. Another thread's fork() briefly holds copies of
    every descriptor of this process, including one a concurrent write has open inside this
    mount, until the child execs and its close-on-exec descriptors go."""
    deadline = time.monotonic() + BUSY_RETRY_SECONDS
    while True:
        try:
            run(cmd, what)
            return
        except ToolFailed as err:
            if "busy" not in str(err) or time.monotonic() > deadline:
                raise
        time.sleep(0.05)
