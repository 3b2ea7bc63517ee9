"""Mounting, read-write, the ext4 held by an exported raw disk.

- ``kernel``: a loop mount, root only and fastest. ``noinit_itable`` keeps ext4's lazy
  inode-table init from writing zeroed tables into the child disk; ``nosuid,nodev``
  because nothing on a layer being written is meant to be run or opened as a device.
- ``fuse2fs``: ``fuse2fs -f -o fakeroot`` as our child process. ``fusermount3 -u``
  returns before fuse2fs has written the superblock "clean", so we wait for it to exit.
Both run in their own session so a terminal Ctrl-C reaches only us, and we unmount.
"""
import os
import signal
import subprocess
import time

from ..errors import ToolFailed
from .tools import hold_interrupts, is_mounted, mount_source, read_tail, run, wait_until

MOUNT_TIMEOUT = 30.0
EXIT_TIMEOUT = 120.0        # fuse2fs flushes its caches on exit
BUSY_RETRY_SECONDS = 10.0
KERNEL_OPTIONS = "loop,noinit_itable,noatime,nosuid,nodev"


class Mount:
    """``with Mount(method, raw, target, log):`` the ext4 in ``raw`` is mounted at ``target``.

    A clean exit unmounts and waits until nothing holds ``raw`` any more (ToolFailed if
    that fails); an exception, or a failed start, unmounts by whatever means it takes.
    """

    def __init__(self, method: str, raw: str, target: str, log: str):
        self.method, self.raw, self.target, self._log = method, raw, target, log
        self._proc: subprocess.Popen | None = None      # fuse2fs
        self._loop: str | None = None                   # the kernel mount's loop device

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
        if self.method == "kernel":
            run(["mount", "-t", "ext4", "-o", KERNEL_OPTIONS, self.raw, self.target], "mount")
            self._loop = mount_source(self.target)
            return
        with open(self._log, "wb") as log:
            try:
                self._proc = subprocess.Popen(["fuse2fs", "-f", "-o", "fakeroot,big_writes", self.raw, self.target],
                                              stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                              start_new_session=True)
            except FileNotFoundError:
                raise ToolFailed("fuse2fs is not installed") from None
        if not wait_until(lambda: self._proc.poll() is not None or is_mounted(self.target), MOUNT_TIMEOUT):
            raise ToolFailed(f"fuse2fs did not mount the layer within {MOUNT_TIMEOUT:.0f} s")
        if self._proc.poll() is not None:
            raise ToolFailed(f"fuse2fs could not mount the layer: {read_tail(self._log)}")

    def _stop(self) -> None:
        if self.method == "kernel":
            _unmount_retrying(["umount", self.target], "umount")
            self._wait_loop_detached()
        else:
            _unmount_retrying(["fusermount3", "-u", self.target], "fusermount3 -u")
            self._wait_fuse2fs(EXIT_TIMEOUT)

    def _kill(self) -> None:
        """Undo whatever _start() got to; never raises ToolFailed."""
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
