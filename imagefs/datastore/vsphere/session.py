"""One logged-in vSphere API session: TLS, login, calls with retries, tasks, faults.

Every API call goes through ``Session.call``: a transient failure (HTTP 503, a reset
connection, a session that expired) is retried with backoff when the caller says the
operation is safe to repeat, after logging in again where the session was lost; an
unsafe one fails with one clear line. vSphere faults become the local backend's errors
(``map_fault``).

Tasks are waited on by reading only ``info.state``, ``info.error`` and ``info.result``
through the PropertyCollector: the simulator (and pyvmomi's own WaitForTask with it)
chokes on the ``info.entity`` of file and disk tasks, and the three fields are all a
wait needs anyway.
"""
import http.client
import logging
import socket
import ssl
import threading
import time

from pyVim.connect import Disconnect, SmartConnect
from pyVmomi import vim, vmodl

from ...errors import Exists, ImageFSError, InUse, NotFound, PermissionDenied, Unavailable

log = logging.getLogger("imagefs.vsphere")

RETRIES = 5
BACKOFF = 0.2           # seconds, doubled each retry
TASK_TIMEOUT = 3600.0


def ssl_context(ca_file, insecure):
    """Verified TLS by default; ``ca_file`` adds a CA; ``insecure`` verifies nothing."""
    if insecure:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    ctx = ssl.create_default_context()
    if ca_file:
        try:
            ctx.load_verify_locations(cafile=ca_file)
        except (OSError, ssl.SSLError) as e:
            raise Unavailable(f"CA file {ca_file}: cannot load: {getattr(e, 'strerror', None) or e}") from None
    return ctx


def is_transient(err):
    """A failure worth another try: the server or the network hiccuped."""
    if isinstance(err, (ConnectionResetError, ConnectionAbortedError, BrokenPipeError,
                        http.client.RemoteDisconnected, http.client.IncompleteRead, socket.timeout)):
        return True
    if isinstance(err, http.client.HTTPException) and str(err).startswith(("502", "503", "504")):
        return True
    return isinstance(err, (vim.fault.NotAuthenticated, vmodl.fault.HostCommunication))


def connect_error(err, location):
    """One clear line for a failure to reach or log in to a vSphere endpoint."""
    where = f"{location.host}:{location.port}"
    if isinstance(err, ssl.SSLCertVerificationError):
        return Unavailable(f"{where}: TLS certificate not trusted ({err.verify_message}); give its CA with "
                           "--ca-file or IMAGEFS_VSPHERE_CA_FILE (or --insecure to skip the check)")
    if isinstance(err, ssl.SSLError):
        return Unavailable(f"{where}: TLS failed: {err.reason or err}")
    if isinstance(err, vim.fault.InvalidLogin):
        return PermissionDenied(f"{where}: login as {location.user} failed (wrong user name or password)")
    if isinstance(err, vim.fault.NoPermission):
        return PermissionDenied(f"{where}: {location.user} lacks the privilege {err.privilegeId}")
    if isinstance(err, socket.gaierror):
        return Unavailable(f"{where}: unknown host")
    if isinstance(err, OSError):
        return Unavailable(f"{where}: cannot connect: {err.strerror or err}")
    if isinstance(err, http.client.HTTPException):
        return Unavailable(f"{where}: not a vSphere endpoint ({err})")
    if isinstance(err, vmodl.MethodFault):
        return Unavailable(f"{where}: {fault_text(err)}")
    return None


def fault_text(fault):
    return getattr(fault, "msg", None) or type(fault).__name__.rpartition(".")[2]


def map_fault(fault, what):
    """The local backend's error for a vSphere fault about ``what`` (a datastore path)."""
    if isinstance(fault, (vim.fault.FileNotFound, vim.fault.NotFound)):
        return NotFound(f"{what}: no such file or directory")
    if isinstance(fault, vim.fault.FileAlreadyExists) or isinstance(fault, vim.fault.AlreadyExists):
        return Exists(f"{what}: already exists")
    if isinstance(fault, (vim.fault.FileLocked, vim.fault.ResourceInUse, vim.fault.TaskInProgress,
                          vim.fault.InvalidState)):
        return InUse(f"{what}: in use ({fault_text(fault)})")
    if isinstance(fault, (vim.fault.NoPermission, vmodl.fault.SecurityError, vim.fault.NoPermissionOnHost)):
        privilege = getattr(fault, "privilegeId", None)
        return PermissionDenied(f"{what}: permission denied" + (f" (needs {privilege})" if privilege else ""))
    if isinstance(fault, vim.fault.NoDiskSpace):
        from ...errors import NoSpace
        return NoSpace(f"{what}: the datastore is full")
    return ImageFSError(f"{what}: vSphere: {fault_text(fault)}")


class Session:
    """A pyvmomi ServiceInstance that logs in again when its session is lost."""

    def __init__(self, location, password, ctx):
        self.location = location
        self._password = password
        self.ctx = ctx
        self._lock = threading.Lock()
        self.generation = 0         # logins so far on this connection
        self.si = None
        self._login()

    def _login(self):
        loc = self.location
        try:
            si = SmartConnect(host=loc.host, port=loc.port, user=loc.user, pwd=self._password,
                              sslContext=self.ctx, connectionPoolTimeout=60)
        except Exception as e:          # noqa: BLE001 - every connect failure gets one line
            mapped = connect_error(e, loc)
            if mapped is None:
                raise
            raise mapped from None
        self.si = si
        log.debug("logged in to %s:%d as %s", loc.host, loc.port, loc.user)

    @property
    def content(self):
        return self.si.content

    @property
    def cookie(self):
        """The session cookie for datastore HTTP transfers (``name=value``)."""
        return self.si._stub.cookie.split(";", 1)[0]

    def relogin(self, seen):
        """Log in again on the same connection, so that every managed object already held
        (bound to it) keeps working. Skipped when another thread logged in since the
        caller saw generation ``seen``."""
        with self._lock:
            if self.generation != seen:
                return
            try:
                self.si.content.sessionManager.Login(self.location.user, self._password)
            except Exception as e:          # noqa: BLE001 - one line, whatever went wrong
                raise connect_error(e, self.location) or e from None
            self.generation += 1

    def call(self, fn, what, safe=True):
        """``fn(content)`` with retries: transient failures are retried with backoff when
        ``safe``; a lost session means a new login first. Faults are mapped for ``what``."""
        delay = BACKOFF
        for attempt in range(RETRIES + 1):
            seen = self.generation
            try:
                return fn(self.si.content)
            except vim.fault.NotAuthenticated:
                if attempt == RETRIES:
                    raise Unavailable(f"{what}: the vSphere session keeps expiring") from None
                log.info("vSphere session expired: logging in again")
                self.relogin(seen)
                # a call refused for want of a session did nothing: always safe to repeat
            except vmodl.MethodFault as fault:
                raise map_fault(fault, what) from None
            except (OSError, http.client.HTTPException) as err:
                if not is_transient(err):
                    raise connect_error(err, self.location) or err from None
                if not safe or attempt == RETRIES:
                    raise Unavailable(f"{what}: vSphere request failed ({err or type(err).__name__}) "
                                      f"{'and is not safe to repeat' if not safe else 'after retries'}") from None
                log.info("%s: transient failure (%s), retrying in %.1f s", what, err, delay)
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    def wait(self, task, what):
        """The result of ``task``; its fault mapped for ``what``."""
        pc = vmodl.query.PropertyCollector
        spec = pc.FilterSpec(objectSet=[pc.ObjectSpec(obj=task)],
                             propSet=[pc.PropertySpec(type=vim.Task,
                                                      pathSet=["info.state", "info.error", "info.result"])])
        deadline = time.monotonic() + TASK_TIMEOUT
        pause = 0.005
        while True:
            found = self.call(lambda c: c.propertyCollector.RetrieveContents([spec]), what)
            props = {p.name: p.val for p in found[0].propSet} if found else {}
            state = props.get("info.state")
            if state == "success":
                return props.get("info.result")
            if state == "error":
                raise map_fault(props["info.error"], what)
            if time.monotonic() > deadline:
                raise Unavailable(f"{what}: vSphere task did not finish within {TASK_TIMEOUT:.0f} s")
            time.sleep(pause)
            pause = min(pause * 2, 0.5)

    def run_task(self, start, what, safe=True):
        """Start a task with ``start(content)`` and wait for it."""
        return self.wait(self.call(start, what, safe=safe), what)

    def close(self):
        if self.si is not None:
            _quiet_disconnect(self.si)
            self.si = None


def _quiet_disconnect(si):
    try:
        Disconnect(si)
    except Exception:           # noqa: BLE001 - logging out of a dead session is not an error
        pass
