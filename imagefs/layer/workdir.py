"""A layer writer's work directory: where its disk export, mount and logs live, and its proof of life.

``<base>/imagefs-layer-XXXXXXXX/`` (base: $IMAGEFS_WORKDIR or /var/tmp) holds the raw
export of the new disk (``disk.raw``), the ext4 mountpoint (``mnt``), qsd's QMP socket
and the tools' logs. Two things make a writer killed by SIGKILL recoverable by the next
start (``recover.py``):

- the owner lock: the writer holds an ``flock`` on the directory itself for its whole
  life (close-on-exec, so no tool inherits it). The kernel drops it when the writer dies,
  however it dies: a free lock means a dead owner.
- the record (``record``): one JSON object per line, appended as the writer starts each
  thing that outlives it if left alone: ``{"disk": vmdk}``, ``{"qemu-storage-daemon":
  pid, "start": ticks}``, ``{"fuse2fs": ...}``, ``{"mount": path, "method": ...}``,
  ``{"loop": "/dev/loopN"}``.
  The lock is taken before the record exists, so a directory with a record and a free
  lock belongs to a dead writer; one without a record is not ours to touch.
"""
import fcntl
import json
import os
import shutil
import tempfile

from ..errors import ImageFSError
from .tools import hold_interrupts, mounts_under

PREFIX = "imagefs-layer-"
RECORD = "record"
DEFAULT_BASE = "/var/tmp"


def work_base(base: str | None = None) -> str:
    return os.path.abspath(base or os.environ.get("IMAGEFS_WORKDIR") or DEFAULT_BASE)


def process_start(pid: int) -> int | None:
    """The start time of ``pid`` in clock ticks since boot (with the pid, a process's identity)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rpartition(b")")[2].split()[19])
    except (OSError, ValueError, IndexError):
        return None


class WorkDir:
    """``with WorkDir(base) as work:`` a fresh, locked work directory, removed on exit."""

    def __init__(self, base: str | None = None):
        base = work_base(base)
        try:
            self.path = tempfile.mkdtemp(prefix=PREFIX, dir=base)
        except OSError as err:
            raise ImageFSError(f"cannot create a work directory in {base}: {err.strerror}") from None
        self._fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        self._record = open(os.path.join(self.path, RECORD), "x", encoding="utf-8")

    def __enter__(self) -> "WorkDir":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def join(self, name: str) -> str:
        return os.path.join(self.path, name)

    def note(self, **fields) -> None:
        """Append one fact to the record (flushed: it must survive a SIGKILL of this process)."""
        self._record.write(json.dumps(fields) + "\n")
        self._record.flush()

    def note_process(self, kind: str, pid: int) -> None:
        self.note(**{kind: pid, "start": process_start(pid)})

    def close(self) -> None:
        """Remove the directory (never descending into a mount that failed to go away), then
        let go of the lock."""
        if self._fd < 0:
            return
        with hold_interrupts():
            self._record.close()
            if not mounts_under(self.path):
                shutil.rmtree(self.path, ignore_errors=True)
            os.close(self._fd)
            self._fd = -1


def read_record(path: str) -> list[dict]:
    """The facts a writer recorded in work directory ``path`` (a torn last line is skipped)."""
    facts = []
    try:
        with open(os.path.join(path, RECORD), encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    fact = json.loads(line)
                except ValueError:
                    continue
                if isinstance(fact, dict):
                    facts.append(fact)
    except OSError:
        pass
    return facts
