"""Crash points: named places on the write path where a test can have this process killed.

The kill campaign (reliability/kill_campaign.py, tests/test_kill.py) proves that a writer
killed anywhere leaves nothing wrong behind. Timed kills from outside land mostly in
the long phases; these points reach the short ones too (between the sum check and the
metadata, between the manifest and its directory's fsync):

- ``IMAGEFS_CRASH_AT=<name>:<n>``: SIGKILL this process the n-th time it passes <name>;
- ``IMAGEFS_CRASH_TALLY=<file>``: append the name of every point passed to <file>, so
  a clean run tells the harness which points exist and how often each is passed.

Both are read once, at import. Unset (always, outside tests), a point costs a call and
one comparison.
"""
import os
import signal
import threading

_AT = os.environ.get("IMAGEFS_CRASH_AT")
_TALLY = os.environ.get("IMAGEFS_CRASH_TALLY")
_ARMED = bool(_AT or _TALLY)
_counts: dict[str, int] = {}
_lock = threading.Lock()


def crash_point(name: str) -> None:
    if not _ARMED:
        return
    with _lock:
        n = _counts[name] = _counts.get(name, 0) + 1
        if _TALLY:
            with open(_TALLY, "a", encoding="utf-8") as f:
                f.write(name + "\n")
    if _AT == f"{name}:{n}":
        os.kill(os.getpid(), signal.SIGKILL)
