"""Does any process still hold a file of this mount open?

FUSE sends ``flush`` on every close() of a descriptor, also when the closed one is
only a copy (a shell's ``>`` redirection dup2()s and closes the original before
exec; ``{ a; b; } > f`` flushes after ``a``). An import must commit when the *last*
descriptor goes, yet the flush request does not say which one it is. The closing
descriptor has already left its process's table when flush arrives, so looking for
any other descriptor of the file in /proc answers it. Descriptors of processes this
daemon may not inspect are not seen (then the commit happens at this flush).
"""
import os


def held_elsewhere(path_suffix: str, ino: int) -> bool:
    """True if some process has a descriptor whose path ends with ``path_suffix`` on inode ``ino``."""
    me = str(os.getpid())
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or pid == me:
            continue
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"{fd_dir}/{fd}")
            except OSError:
                continue
            if target.endswith(path_suffix) and _fd_ino(pid, fd) == ino:
                return True
    return False


def _fd_ino(pid, fd):
    try:
        with open(f"/proc/{pid}/fdinfo/{fd}", "rb") as f:
            for line in f:
                if line.startswith(b"ino:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None
