"""File bytes through the datastore HTTP endpoint: ``/folder/<path>?dcPath=&dsName=``.

Reads are Range GETs (the block cache asks for the ranges it lacks); writes are PUTs
streamed from a host file (never a whole layer in memory). Every request carries the
API session's cookie. GETs and PUTs of a whole file are safe to repeat, so transient
failures (503, a reset connection) are retried with backoff; a 401/403 means the
session expired: log in again and retry.

urllib3 is used with our own SSLContext and no environment: requests would let
$REQUESTS_CA_BUNDLE replace the CA choice made on the command line.
"""
import logging
import os
import ssl
import time
from urllib.parse import quote, urlencode

import urllib3

from ...errors import Exists, ImageFSError, NotFound, PermissionDenied, Unavailable
from .session import BACKOFF, RETRIES

log = logging.getLogger("imagefs.vsphere")

CHUNK = 1 << 20
_TRANSIENT_STATUS = {502, 503, 504}


class Transfer:
    def __init__(self, session, datacenter, datastore):
        self.session = session
        loc = session.location
        host = f"[{loc.host}]" if ":" in loc.host else loc.host
        self._base = f"https://{host}:{loc.port}/folder/"
        self._query = "?" + urlencode({"dcPath": datacenter, "dsName": datastore})
        if session.ctx.verify_mode == ssl.CERT_NONE:     # --insecure: said once already, not per request
            urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
        self._pool = urllib3.PoolManager(num_pools=2, maxsize=8, ssl_context=session.ctx,
                                         timeout=urllib3.Timeout(connect=30, read=300), retries=False)

    def _url(self, path):
        return self._base + quote(path, safe="/") + self._query

    def _request(self, method, path, what, *, headers=None, body_factory=None, ok=(200, 201, 204),
                 preload=True):
        """One request with retries; the response (preloaded unless told otherwise)."""
        delay = BACKOFF
        for attempt in range(RETRIES + 1):
            seen = self.session.generation
            hdrs = {"Cookie": self.session.cookie, **(headers or {})}
            body = body_factory() if body_factory else None
            try:
                resp = self._pool.request(method, self._url(path), headers=hdrs, body=body,
                                          preload_content=preload, redirect=False)
            except urllib3.exceptions.SSLError as e:
                raise Unavailable(f"{what}: TLS failed: {e}") from None
            except (urllib3.exceptions.HTTPError, OSError) as e:
                err = f"{type(e).__name__}"
                status = None
            else:
                status = resp.status
                if status in ok:
                    return resp
                if not preload:
                    resp.drain_conn()
                err = f"HTTP {status}"
            finally:
                if body is not None and hasattr(body, "close"):
                    body.close()
            if status == 404:
                raise NotFound(f"{what}: no such file")
            if status == 409:
                raise Exists(f"{what}: already exists")
            if status in (401, 403) and attempt < RETRIES:
                log.info("%s: HTTP %s: logging in again", what, status)
                self.session.relogin(seen)
                continue
            if status in (401, 403):
                raise PermissionDenied(f"{what}: permission denied (HTTP {status})")
            if status is not None and status not in _TRANSIENT_STATUS:
                raise ImageFSError(f"{what}: datastore HTTP {method} failed: HTTP {status}")
            if attempt == RETRIES:
                raise Unavailable(f"{what}: datastore HTTP {method} failed after retries ({err})")
            log.info("%s: %s, retrying in %.1f s", what, err, delay)
            time.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")

    def read_range(self, path, offset, length):
        """``length`` bytes at ``offset`` (fewer at the end of the file)."""
        if length <= 0:
            return b""
        resp = self._request("GET", path, path, headers={"Range": f"bytes={offset}-{offset + length - 1}"},
                             ok=(200, 206, 416))
        if resp.status == 416:
            return b""
        data = resp.data
        if resp.status == 200:              # a server that ignores Range sends everything
            data = data[offset:offset + length]
        return data

    def read_all(self, path):
        return self._request("GET", path, path).data

    def download(self, path, host_path):
        """Stream a whole file to ``host_path``."""
        resp = self._request("GET", path, path, preload=False)
        try:
            with open(host_path, "wb") as out:
                for chunk in resp.stream(CHUNK):
                    out.write(chunk)
        finally:
            resp.release_conn()

    def upload(self, host_path, path):
        """PUT a host file, streamed (the datastore creates missing parent folders)."""
        size = os.path.getsize(host_path)
        self._request("PUT", path, path, headers={"Content-Length": str(size),
                                                  "Content-Type": "application/octet-stream"},
                      body_factory=lambda: open(host_path, "rb"))
        log.info("uploaded %s (%d bytes)", path, size)

    def put_bytes(self, path, data):
        self._request("PUT", path, path, headers={"Content-Length": str(len(data)),
                                                  "Content-Type": "application/octet-stream"},
                      body_factory=lambda: data)

    def close(self):
        self._pool.clear()
