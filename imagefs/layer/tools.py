"""Helpers of the write path: running tools, asking what is mounted, guarded cleanup."""
import os
import re
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

from ..errors import ToolFailed


def run(cmd: list[str], what: str) -> subprocess.CompletedProcess:
    """Run ``cmd`` to completion; a non-zero exit becomes ToolFailed with the first line of its
    complaint (mount adds a "dmesg may have more" line after the cause)."""
    try:
        # own session: a terminal Ctrl-C must not kill an umount or debugfs halfway
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, errors="replace", start_new_session=True)
    except FileNotFoundError:
        raise ToolFailed(f"{what}: {cmd[0]} is not installed") from None
    if proc.returncode != 0:
        lines = [line.strip() for line in (proc.stderr or proc.stdout).splitlines() if line.strip()]
        raise ToolFailed(f"{what} failed (exit {proc.returncode}): {lines[0] if lines else '(no output)'}")
    return proc


def spawn(cmd: list[str], log_path: str, what: str) -> subprocess.Popen:
    """Start a long-running helper (qsd, fuse2fs), output to ``log_path``.

    Its own session keeps terminal signals away from it (we stop it properly), and
    ``setpriv --pdeathsig`` has the kernel send it SIGTERM when the *thread* that started
    it dies, so a writer killed outright leaves no helper running. Start it, and wait for
    it, from one thread.
    """
    with open(log_path, "wb") as log:
        try:
            return subprocess.Popen(["setpriv", "--pdeathsig", "TERM", "--", *cmd], stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=log, start_new_session=True)
        except FileNotFoundError:
            raise ToolFailed(f"{what}: setpriv (util-linux) is not installed") from None


def tail(text: str, lines: int = 1) -> str:
    """The last non-empty lines of a tool's output, joined into one line."""
    kept = [line.strip() for line in text.splitlines() if line.strip()]
    return " | ".join(kept[-lines:]) or "(no output)"


def read_tail(path: str, lines: int = 3) -> str:
    try:
        with open(path, errors="replace") as f:
            return tail(f.read()[-4096:], lines)
    except OSError:
        return "(no output)"


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _mountinfo() -> list[tuple[str, str, str]]:
    """(mount point, filesystem type, source) of every mount, in mount order."""
    out = []
    with open("/proc/self/mountinfo", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            out.append((_unescape(fields[4]), fields[sep + 1], _unescape(fields[sep + 2])))
    return out


def mount_source(path: str) -> str | None:
    """The source device of the mount at ``path`` (None if nothing is mounted there)."""
    path = os.path.abspath(path)
    found = None
    for point, _fstype, source in _mountinfo():
        if point == path:
            found = source                      # the last mount there wins
    return found


def mounts_under(path: str) -> list[tuple[str, str]]:
    """(mount point, filesystem type) of every mount at or below ``path``, the last mounted first."""
    path = os.path.abspath(path)
    return [(point, fstype) for point, fstype, _ in reversed(_mountinfo())
            if point == path or point.startswith(path + "/")]


def is_mounted(path: str) -> bool:
    return mount_source(path) is not None


def wait_until(predicate, timeout: float, interval: float = 0.01) -> bool:
    """Poll ``predicate`` with a gently growing interval; True once it holds."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
        interval = min(interval * 1.5, 0.2)


INTERRUPTS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextmanager
def hold_interrupts():
    """Hold Ctrl-C, SIGTERM and SIGHUP back while cleaning up, so the cleanup is not cut short.

    Only the main thread receives signals; elsewhere this does nothing. A signal held back
    is delivered again to the previous handler at the end, unless an exception is already
    on its way out (the caller is unwinding anyway).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = {sig: signal.signal(sig, lambda signum, _frame: caught.append(signum)) for sig in INTERRUPTS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        if caught and sys.exc_info()[0] is None:
            signal.raise_signal(caught[0])
