"""A shared/exclusive lock for every host of a datastore, made of directories.

``FileManager.MakeDirectory`` without parents is atomic on a datastore: of several
callers, on any hosts, exactly one creates a name and the others get FileAlreadyExists.
A lock named P is two things beside P:

    P.x/              the exclusive holder (made without parents: only one wins)
    P.s/<token>/      one per shared holder

Each side first announces itself, then looks for the other (two flags, as in Dekker's
protocol): an exclusive taker that finds a live shared holder, or a shared taker that
finds a live exclusive one, withdraws. Since the server orders the directory
operations, at least one of two racing takers sees the other, so they are never both in.

Holders refresh a ``beat`` file in their directory every LEASE/4 seconds; a holder
whose newest time is older than LEASE by the server's clock (a crashed process, a lost
host) is stale and is removed by the next taker.
"""
import logging
import secrets
import socket
import threading
import time
from contextlib import contextmanager

from ...errors import Exists, NotFound

log = logging.getLogger("imagefs.vsphere")

LEASE = 120.0
WAIT_STEP = 0.5


class LockSpace:
    def __init__(self, ds):
        self.ds = ds                                    # VSphereDatastore

    @contextmanager
    def lock(self, path, exclusive=True, blocking=True):
        mine = f"{path}.x" if exclusive else f"{path}.s/{socket.gethostname()}-{secrets.token_hex(6)}"
        while True:
            if self._try(path, mine, exclusive):
                break
            if not blocking:
                yield False
                return
            time.sleep(WAIT_STEP)
        beat = _Heartbeat(self.ds, mine)
        try:
            yield True
        finally:
            beat.stop()
            try:
                self.ds.rmtree(mine)
            except NotFound:
                pass

    def _try(self, path, mine, exclusive):
        if exclusive:
            try:
                self.ds.mkdir(mine)
            except Exists:
                if not self._remove_if_stale(mine):
                    return False
                try:
                    self.ds.mkdir(mine)
                except Exists:
                    return False
            rivals = self._live_holders(f"{path}.s")
        else:
            self.ds.mkdir(f"{path}.s", parents=True)
            self.ds.mkdir(mine)
            rivals = [f"{path}.x"] if self._is_live(f"{path}.x") else []
        if rivals:
            self.ds.rmtree(mine, missing_ok=True)
            return False
        self.ds.write_file(f"{mine}/beat", b"")
        return True

    def _newest(self, entries, prefix=""):
        times = [e.mtime_ns for name, e in entries.items()
                 if (not prefix or name == prefix or name.startswith(prefix + "/")) and e.mtime_ns is not None]
        return max(times) / 1e9 if times else None

    def _stale(self, newest):
        return newest is not None and self.ds.server_time() - newest > LEASE

    def _live_holders(self, shared_dir):
        """Shared holders that are alive; stale ones are removed on the way (one walk)."""
        try:
            entries = self.ds.walk(shared_dir)
        except NotFound:
            return []
        live = []
        for name in {n.split("/", 1)[0] for n in entries}:
            if self._stale(self._newest(entries, name)):
                log.warning("removing stale lock holder %s/%s", shared_dir, name)
                self.ds.rmtree(f"{shared_dir}/{name}", missing_ok=True)
            else:
                live.append(name)
        return live

    def _is_live(self, holder):
        """Whether ``holder`` exists and beats; a stale one is removed."""
        try:
            entries = self.ds.walk(holder)
            newest = self._newest(entries) or _seconds(self.ds.stat(holder).mtime_ns)
        except NotFound:
            return False
        if self._stale(newest):
            log.warning("removing stale lock %s", holder)
            self.ds.rmtree(holder, missing_ok=True)
            return False
        return True

    def _remove_if_stale(self, holder):
        return not self._is_live(holder)


class _Heartbeat:
    """Refresh ``<holder>/beat`` every LEASE/4 so that others see the holder alive."""

    def __init__(self, ds, holder):
        self.ds, self.holder = ds, holder
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="imagefs-lock-beat", daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(LEASE / 4):
            try:
                self.ds.write_file(f"{self.holder}/beat", b"")
            except Exception as e:          # noqa: BLE001 - a missed beat is retried next time
                log.warning("lock %s: heartbeat failed: %s", self.holder, e)

    def stop(self):
        self._stop.set()
        self._thread.join()


def _seconds(ns):
    return None if ns is None else ns / 1e9
