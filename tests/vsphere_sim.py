"""The vSphere API simulator for the tests: built when missing, one per test session.

scripts/build-vcsim.sh builds tools/vcsim/main.go against Debian's govmomi; the
simulator serves https with a certificate the tests make (2048-bit RSA, SAN 127.0.0.1
and localhost), asks for a user and password, listens on a free port (read back from
its -E file) and keeps its datastore in a directory of ours. Stopped with SIGTERM by
the PID we started, which also removes its datastore directory.
"""
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BINARY = os.path.join(REPO, "build", "vcsim", "vcsim")
USER = "imagefs"
PASSWORD = "s3cret-Pa55"
DATACENTER = "DC0"
DATASTORE = "LocalDS_0"


@dataclass
class Simulator:
    proc: subprocess.Popen
    port: int
    ca_file: str            # the server's certificate, self-signed: its own CA
    ds_dir: str             # the host directory behind datastore LocalDS_0
    workdir: str

    def url(self, path="", user=USER, port=None):
        tail = f"/{path}" if path else ""
        return f"vsphere://{user}@127.0.0.1:{port or self.port}/{DATACENTER}/{DATASTORE}{tail}"

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def ensure_binary():
    if not os.access(BINARY, os.X_OK):
        subprocess.run([os.path.join(REPO, "scripts", "build-vcsim.sh"), BINARY], check=True,
                       stdout=subprocess.DEVNULL)
    return BINARY


def make_certificate(directory, name="vcsim"):
    """A self-signed 2048-bit certificate for 127.0.0.1 and localhost: (cert, key)."""
    cert, key = os.path.join(directory, f"{name}.crt"), os.path.join(directory, f"{name}.key")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "30", "-subj", f"/CN=imagefs test {name}",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True)
    return cert, key


def start(workdir):
    binary = ensure_binary()
    cert, key = make_certificate(workdir)
    env_file = os.path.join(workdir, "vcsim.env")
    ds_parent = os.path.join(workdir, "datastores")
    os.makedirs(ds_parent)
    log = open(os.path.join(workdir, "vcsim.log"), "wb")
    proc = subprocess.Popen([binary, "-l", "127.0.0.1:0", "-E", env_file, "-dsdir", ds_parent,
                             "-tlscert", cert, "-tlskey", key, "-username", USER, "-password", PASSWORD],
                            stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    log.close()
    deadline = time.monotonic() + 30
    while not os.path.exists(env_file):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            with open(os.path.join(workdir, "vcsim.log")) as f:
                raise RuntimeError(f"vcsim did not start: {f.read()[-2000:]}")
        time.sleep(0.02)
    with open(env_file) as f:
        port = int(re.search(r"127\.0\.0\.1:(\d+)", f.read()).group(1))
    dirs = [d for d in os.listdir(ds_parent) if d.startswith(f"govcsim-{DATACENTER}-{DATASTORE}-")]
    return Simulator(proc, port, cert, os.path.join(ds_parent, dirs[0]), workdir)
