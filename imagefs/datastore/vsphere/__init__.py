"""The vSphere backend: an image store in a folder of a vSphere datastore (pyvmomi).

Modules, each with one job: url (the vsphere:// URL, password, TLS settings), session
(login, calls with retries, tasks, faults), transfer (datastore HTTP bytes), cache (the
local block cache of sealed files), lock (a lock for all hosts made of directories),
datastore (the Datastore interface on top of them), inventory (VMs: owners and join).
"""
import hashlib
import logging
import os

from .url import parse_url, read_password, tls_settings

log = logging.getLogger("imagefs.vsphere")


def default_cache_dir():
    base = os.environ.get("IMAGEFS_CACHE_DIR")
    if base:
        return base
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "imagefs")


def open_vsphere(spec, options):
    """A VSphereDatastore for ``spec``; options: password_file, ca_file, insecure,
    cache_size (bytes or "4GiB"), cache_dir, create (make the URL's folder when missing;
    the default, as a local datastore directory is made)."""
    from ...scratch import parse_size
    from .cache import DEFAULT_LIMIT
    from .datastore import VSphereDatastore
    from .session import Session, ssl_context

    location = parse_url(spec)
    ca_file, insecure = tls_settings(options)
    if insecure:
        log.warning("%s: TLS certificate verification is off (--insecure): anyone on the path "
                    "can read the password and the data", location.host)
    ctx = ssl_context(ca_file, insecure)
    session = Session(location, read_password(location, options), ctx)
    size = options.get("cache_size") or os.environ.get("IMAGEFS_CACHE_SIZE") or DEFAULT_LIMIT
    key = hashlib.sha1(location.url.encode()).hexdigest()[:16]
    cache_dir = os.path.join(options.get("cache_dir") or default_cache_dir(), "vsphere", key)
    try:
        return VSphereDatastore(session, location, cache_dir, parse_size(size),
                                create=options.get("create", True))
    except BaseException:
        session.close()
        raise
