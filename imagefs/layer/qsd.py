"""A VMDK (with its read-only backing chain) exposed as a writable raw file by qemu-storage-daemon.

The export is a FUSE mount over an empty regular file. qsd is stopped over QMP
(``block-export-del`` then ``quit``): a signalled qsd exits but leaves the export
mounted and stale (docs/design.md, "Write path"). qsd runs in its own session so a
Ctrl-C at the terminal does not kill it before we have stopped it properly, and gets
SIGTERM if the thread that started it dies (``spawn``), so a killed writer leaves no
qsd running; ``recover.py`` then removes the stale export. Start and stop must happen
in one thread.

qemu's vmdk driver flushes (fdatasync) its file after every grain it allocates, to order
the grain before its table entry for a host crash: 3,200 fdatasyncs for 200 MB, most of
an import's time. A crash mid-write discards the layer whatever its disk holds (nothing
is committed before the writer's own fsync of the sealed disk), so the export runs with
``cache.no-flush=on`` and the writer makes the disk durable once, after qsd's exit
(``writer.fsync_file``); a write the datastore cannot take still fails at its write, or
at that fsync.

qsd's exit code alone says little: write errors of the export go to its client (the
loop device or fuse2fs, whose errors we check), and anything qsd logs is an error too.
"""
import json
import os
import re
import signal
import socket
import subprocess
import time

from ..crashpoints import crash_point
from ..errors import ToolFailed
from .tools import hold_interrupts, is_mounted, read_tail, spawn, wait_until

START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0


class StorageDaemon:
    """``with StorageDaemon(vmdk, workdir) as qsd:`` ... ``qsd.raw`` is the writable raw disk."""

    def __init__(self, vmdk: str, work):
        self.vmdk = os.path.abspath(vmdk)
        self.raw = work.join("disk.raw")
        self._work = work
        self._qmp_path = work.join("qmp.sock")
        self._log = work.join("qsd.log")
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> "StorageDaemon":
        try:
            self.start()
        except BaseException:
            with hold_interrupts():
                self.kill()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        with hold_interrupts():
            if exc_type is None:
                self.stop()
            else:
                self.kill()

    def start(self) -> None:
        open(self.raw, "wb").close()                    # the export's mountpoint
        cmd = ["qemu-storage-daemon",
               "--blockdev", f"driver=file,node-name=f0,filename={_opt(self.vmdk)},cache.no-flush=on",
               "--blockdev", "driver=vmdk,node-name=d0,file=f0",
               "--export", f"type=fuse,id=e0,node-name=d0,mountpoint={_opt(self.raw)},writable=on",
               "--chardev", f"socket,id=qmp0,path={_opt(self._qmp_path)},server=on,wait=off",
               "--monitor", "chardev=qmp0"]
        self._work.note(disk=self.vmdk)
        self._proc = spawn(cmd, self._log, "qemu-storage-daemon")
        self._work.note_process("qemu-storage-daemon", self._proc.pid)
        up = wait_until(lambda: self._proc.poll() is not None or
                        (is_mounted(self.raw) and os.path.exists(self._qmp_path)), START_TIMEOUT)
        if not up:
            raise ToolFailed(f"qemu-storage-daemon did not export {self.vmdk} within {START_TIMEOUT:.0f} s")
        if self._proc.poll() is not None:
            self._proc = None
            raise ToolFailed(f"qemu-storage-daemon could not export {self.vmdk}: {read_tail(self._log)}")

    def stop(self) -> None:
        """Clean stop: delete the export, quit, wait for the exit. Raises ToolFailed."""
        if self._proc is None:
            return
        try:
            crash_point("qsd-stop")
            with _QMP(self._qmp_path) as qmp:
                qmp.execute("block-export-del", {"id": "e0"})
                if not qmp.wait_event("BLOCK_EXPORT_DELETED", STOP_TIMEOUT):
                    raise ToolFailed("qemu-storage-daemon did not delete its export")
                crash_point("qsd-stop")
                qmp.execute("quit")
            self._proc.wait(STOP_TIMEOUT)
            crash_point("qsd-stop")
        except (OSError, ValueError, subprocess.TimeoutExpired, ToolFailed) as err:
            self._force()
            raise ToolFailed(f"qemu-storage-daemon did not stop cleanly: {err}") from None
        code, self._proc = self._proc.returncode, None
        if code != 0:
            raise ToolFailed(f"qemu-storage-daemon exited with {code}: {read_tail(self._log)}")
        complaint = _first_complaint(self._log)
        if complaint:
            raise ToolFailed(f"qemu-storage-daemon reported a problem: {complaint}")

    def kill(self) -> None:
        """Stop on an error path: cleanly if QMP answers, else by force; never raises ToolFailed."""
        try:
            self.stop()
        except ToolFailed:
            pass

    def _force(self) -> None:
        proc, self._proc = self._proc, None
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if proc.poll() is not None:
                break
            proc.send_signal(sig)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        if is_mounted(self.raw):                        # SIGTERM leaves the export mounted and stale
            subprocess.run(["fusermount3", "-u", "-z", self.raw], capture_output=True, start_new_session=True)


_COMPLAINT = re.compile(r"error|fail|no space|cannot|could not|abort", re.IGNORECASE)


def _first_complaint(log_path: str) -> str | None:
    try:
        with open(log_path, errors="replace") as f:
            for line in f:
                if _COMPLAINT.search(line):
                    return line.strip()
    except OSError:
        pass
    return None


def quit_over_qmp(qmp_path: str, timeout: float) -> None:
    """Ask the qsd listening on ``qmp_path`` to drop its export and quit (for recovery:
    an export already gone is fine). Raises OSError, ValueError or ToolFailed."""
    with _QMP(qmp_path, timeout) as qmp:
        try:
            qmp.execute("block-export-del", {"id": "e0"})
            qmp.wait_event("BLOCK_EXPORT_DELETED", timeout)
        except ToolFailed:
            pass
        qmp.execute("quit")


def _opt(value: str) -> str:
    """A value inside a qemu -blockdev/-export option string: commas are doubled."""
    return value.replace(",", ",,")


class _QMP:
    """Just enough of the QEMU Machine Protocol: one JSON object per line."""

    def __init__(self, path: str, timeout: float = STOP_TIMEOUT):
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        self._file = self._sock.makefile("rwb")
        self._events: list[str] = []
        try:
            self._sock.connect(path)
            self._read()                                # greeting
            self.execute("qmp_capabilities")
        except BaseException:
            self.__exit__()
            raise

    def __enter__(self) -> "_QMP":
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()
        self._sock.close()

    def _read(self) -> dict:
        line = self._file.readline()
        if not line:
            raise ToolFailed("qemu-storage-daemon closed its QMP socket")
        return json.loads(line)

    def execute(self, command: str, arguments: dict | None = None) -> dict:
        msg = {"execute": command, **({"arguments": arguments} if arguments else {})}
        self._file.write(json.dumps(msg).encode() + b"\n")
        self._file.flush()
        while True:
            reply = self._read()
            if "event" in reply:                        # events may come before the return
                self._events.append(reply["event"])
            elif "error" in reply:
                raise ToolFailed(f"QMP {command}: {reply['error'].get('desc', reply['error'])}")
            elif "return" in reply:
                return reply["return"]

    def wait_event(self, name: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while name not in self._events:
            if time.monotonic() >= deadline:
                return False
            reply = self._read()
            if "event" in reply:
                self._events.append(reply["event"])
        return True

