"""A small HTTPS proxy in front of the simulator that injects faults on request.

It terminates TLS with the simulator's own test certificate (valid for 127.0.0.1), so
the client verifies it as it would the server, and forwards each request to the
simulator. ``fail_next(method, path_prefix, what)`` makes the next matching request
fail once: with an HTTP status (503), or ``"reset"`` to drop the connection without
an answer. Bounded: it serves only 127.0.0.1 and stops with the test.
"""
import http.client
import http.server
import socket
import ssl
import threading
from collections import Counter

_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "proxy-connection"}


class FaultProxy:
    def __init__(self, sim):
        self.sim = sim
        self.injected = Counter()
        self.served = Counter()
        self._faults = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                fault = proxy._take(self.command, self.path)
                if fault == "reset":
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
                    self.close_connection = True
                    self.connection.close()
                    return
                if fault is not None:
                    self.send_response(fault)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                upstream = http.client.HTTPSConnection(
                    "127.0.0.1", proxy.sim.port, context=ssl.create_default_context(cafile=proxy.sim.ca_file))
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                    if body is not None:
                        headers["Content-Length"] = str(len(body))
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    resp = upstream.getresponse()
                    data = resp.read()
                    with proxy._lock:               # counted before the client can see the answer
                        proxy.served[proxy._key(self.command, self.path)] += 1
                    self.send_response(resp.status, resp.reason)
                    for k, v in resp.getheaders():
                        if k.lower() not in _HOP:
                            self.send_header(k, v)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    upstream.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(sim.ca_file, sim.ca_file[:-len(".crt")] + ".key")
        self._server.socket = ctx.wrap_socket(self._server.socket, server_side=True)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def _key(self, method, path):
        for m, prefix in (("POST", "/sdk"), ("GET", "/folder/"), ("PUT", "/folder/")):
            if method == m and path.startswith(prefix):
                return (m, prefix)
        return (method, path.split("?")[0])

    def fail_next(self, method, prefix, what):
        with self._lock:
            self._faults.append((method, prefix, what))

    def _take(self, method, path):
        with self._lock:
            for i, (m, prefix, what) in enumerate(self._faults):
                if m == method and path.startswith(prefix):
                    del self._faults[i]
                    self.injected[(m, prefix)] += 1
                    return what
        return None

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()
