"""Does any process still hold an import file of this mount open?

FUSE sends ``flush`` on every close() of a descriptor, also when the closed one is
only a copy (a shell's ``>`` redirection dup2()s and closes the original before
exec; ``{ a; b; } > f`` flushes after ``a``). The flush request does not say whether
it is the last. The closing descriptor has already left its process's table when
flush arrives, so any other descriptor of the file found in /proc says it is not.

A descriptor is recognised by what it is, never by the path /proc prints for it:
that path is the dentry's, and a dentry can be dropped while the file stays open (a
``stat`` racing the ``open(O_CREAT)`` invalidates the negative entry FUSE is about to
turn into the new file: the link then reads ``.../import/x (deleted)``), and a bind
mount or a chroot prints another path. The name only preselects candidates (renames
and links are refused here); the inode number and the filesystem in
``/proc/PID/fdinfo`` decide.

Where it cannot tell, the answer is "held", and the caller waits for FUSE
``release``, which the kernel sends once the last reference to the open file is gone.
A daemon not run as root cannot read other users' descriptors: such processes count
as holders. One run as root reads every process but those the kernel protects even
from root (a supervisor outside its container), which are not writers of ours and do
not count. A descriptor passed over a unix socket and still in flight, or held by a
process outside this daemon's PID namespace, is not seen.
"""
import errno
import os

_GONE = (errno.ENOENT, errno.ESRCH)    # the process or the descriptor went away meanwhile


def held_elsewhere(name: str, ino: int, dev: int | None) -> bool:
    """True unless no other process (than this daemon) may hold a descriptor of the file
    ``ino`` named ``name`` on the filesystem ``dev`` (``st_dev``; None: unknown)."""
    if dev is None:
        return True
    scan = _Scan(name, ino, dev, unreadable_holds=os.geteuid() != 0)
    scanned = {str(os.getpid())}
    # Listed again until no new process shows up: a child forked during the scan
    # inherits the descriptor, and its parent may close its own before we reach it.
    while True:
        pids = [p for p in os.listdir("/proc") if p.isdigit() and p not in scanned]
        if not pids:
            return False
        for pid in pids:
            scanned.add(pid)
            if scan.process_holds(pid):
                return True


class _Scan:
    def __init__(self, name, ino, dev, unreadable_holds):
        self.unreadable_holds = unreadable_holds
        self.names = (name, name + " (deleted)")
        self.ino = ino
        self.dev = f"{os.major(dev)}:{os.minor(dev)}"
        self._devs = {}                      # mount ID -> "major:minor" (mount IDs are system-wide)

    def process_holds(self, pid):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            if not fds:                      # a thread group whose first thread exited: its
                return any(self._table_holds(f"/proc/{pid}/task/{tid}")   # threads keep the table
                           for tid in os.listdir(f"/proc/{pid}/task") if tid != pid)
            return self._holds(f"/proc/{pid}", fds)
        except OSError as e:
            return self._unreadable(e)

    def _table_holds(self, task):
        try:
            return self._holds(task, os.listdir(f"{task}/fd"))
        except OSError as e:
            return self._unreadable(e)

    def _unreadable(self, e):
        """Whether a process whose descriptors could not be read counts as a holder."""
        return e.errno not in _GONE and (self.unreadable_holds or e.errno != errno.EACCES)

    def _holds(self, proc, fds):
        for fd in fds:
            try:
                target = os.readlink(f"{proc}/fd/{fd}")
            except OSError as e:
                if e.errno in _GONE:
                    continue
                raise
            if target.rpartition("/")[2] in self.names and self._is_ours(proc, fd):
                return True
        return False

    def _is_ours(self, proc, fd):
        """The descriptor's inode and filesystem are the file's (True also when they cannot be read)."""
        try:
            with open(f"{proc}/fdinfo/{fd}", "rb") as f:
                info = dict(line.split(b":", 1) for line in f.read().splitlines() if b":" in line)
        except OSError as e:
            return self._unreadable(e)
        try:
            ino, mnt_id = int(info[b"ino"]), int(info[b"mnt_id"])
        except (KeyError, ValueError):
            return True                      # an old kernel without them: cannot tell
        return ino == self.ino and self._dev_of(proc, mnt_id) in (self.dev, None)

    def _dev_of(self, proc, mnt_id):
        """The "major:minor" of mount ``mnt_id`` as the process sees it; None if not found."""
        if mnt_id not in self._devs:
            try:
                with open(f"{proc}/mountinfo") as f:
                    for line in f:
                        fields = line.split(maxsplit=3)
                        self._devs[int(fields[0])] = fields[2]
            except (OSError, ValueError, IndexError):
                pass
        return self._devs.get(mnt_id)
