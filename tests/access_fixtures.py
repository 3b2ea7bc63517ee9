"""A datastore for the access and attack tests: private files, a sparse 3 GiB file, a strip
collision, a non-UTF-8 xattr name; and running code as another user through setpriv."""
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

import pytest

from helpers import make_tar

from imagefs.datastore import open_datastore
from imagefs.store import ImageStore

STORE = "a"
USER = 1000                 # an unprivileged user
ADMIN_GID = 4242            # the group given as admin_group in some tests
SPARSE_SIZE = 3 << 30
SECRET_META = b'{"Env": ["TOKEN=s3cr3t"]}'


def sec_tar():
    with open(shutil.which("id"), "rb") as f:
        id_binary = f.read()
    return make_tar([
        ("bin", "dir", {}),
        ("bin/id", "file", {"data": id_binary, "mode": 0o4755}),          # setuid root
        ("pub", "file", {"data": b"public\n", "mode": 0o644, "xattrs": {"user.pub": "1", "trusted.t": "tv"}}),
        ("secret", "file", {"data": b"top secret\n", "mode": 0o600, "xattrs": {"user.hidden": "h"}}),
        ("closed", "dir", {"mode": 0o700}),
        ("closed/inside", "file", {"data": b"inside text\n", "mode": 0o644}),
        ("mine", "file", {"data": b"for 1000\n", "mode": 0o600, "uid": USER, "gid": USER}),
        ("dev", "dir", {}),
        ("dev/null", "chr", {"major": 1, "minor": 3, "mode": 0o666}),
    ])


def sparse_tar(tmp):
    src = os.path.join(tmp, "sparse-src")
    os.makedirs(src, exist_ok=True)
    with open(os.path.join(src, "big"), "wb") as f:
        f.truncate(SPARSE_SIZE)
        f.seek(SPARSE_SIZE)
        f.write(b"end\n")
    out = os.path.join(tmp, "sparse.tar")
    subprocess.run(["tar", "--sparse", "--format=posix", "-cf", out, "-C", src, "big"], check=True)
    with open(out, "rb") as f:
        return f.read()


def strip_tar():
    """strip=a turns a/x (a symlink out) into x, then x/pwned would go through it."""
    return make_tar([("a", "dir", {}), ("a/x", "symlink", {"target": "/tmp/imagefs-outside"}),
                     ("x", "dir", {}), ("x/pwned", "file", {"data": b"pwned\n"})])


def nonutf8_xattr_tar():
    """An xattr name that is not UTF-8, as libarchive (bsdtar) writes one."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        ti = tarfile.TarInfo("f")
        ti.size = 1
        ti.pax_headers = {"LIBARCHIVE.xattr.user.%FF%FEname": "dmFsdWU="}      # base64("value")
        tf.addfile(ti, io.BytesIO(b"f"))
    return buf.getvalue()


def build(ds, tmp):
    st = ImageStore(open_datastore(str(ds)))
    st.create_store(STORE, capacity="256MiB")
    st.write_image(STORE, "scratch", "sec", io.BytesIO(sec_tar()), metadata={"config": SECRET_META})
    st.write_image(STORE, "scratch", "sparse", io.BytesIO(sparse_tar(tmp)))
    st.write_image(STORE, "scratch", "strip", io.BytesIO(strip_tar()))
    st.write_image(STORE, "scratch", "nonutf8", io.BytesIO(nonutf8_xattr_tar()))
    return st


@pytest.fixture(scope="session")
def access_datastore(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("access-ds")
    build(tmp / "ds", str(tmp))
    return str(tmp / "ds")


@pytest.fixture
def public_dir():
    """A directory other users can traverse (pytest's tmp_path is root's alone), for mountpoints."""
    d = tempfile.mkdtemp(prefix="imagefs-access-", dir="/var/tmp")
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def public_module_dir():
    d = tempfile.mkdtemp(prefix="imagefs-access-", dir="/var/tmp")
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def path(mnt, image, *parts):
    return os.path.join(mnt, STORE, "images", image, *parts)


def as_user(code, *args, uid=USER, groups=()):
    """Run Python ``code`` (argv[1:] = args) as ``uid`` (gid ``uid``, supplementary ``groups``).
    Returns (exit code, stdout, stderr); the code prints JSON on stdout."""
    group_arg = ["--groups=" + ",".join(map(str, groups))] if groups else ["--clear-groups"]
    proc = subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", *group_arg,
                           sys.executable, "-c", code, *map(str, args)],
                          capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stdout, proc.stderr


TRY = """
import errno, json, os, sys
def attempt(fn, *a):
    try:
        out = fn(*a)
        return ["ok", out if isinstance(out, (str, int, list, type(None))) else repr(out)]
    except OSError as e:
        return [errno.errorcode.get(e.errno, str(e.errno))]
def read(p):
    with open(p, "rb") as f:
        return f.read().decode("utf-8", "replace")
def write(p, data=""):
    with open(p, "wb") as f:
        f.write(data.encode("latin-1"))
def peek(p):
    with open(p, "rb") as f:
        return len(f.read(512))
def setxattr(p, name, value):
    os.setxattr(p, name, value.encode())
"""


def try_as_user(calls, uid=USER, groups=()):
    """``calls``: [(fn name, path, ...)] run in order as ``uid``; returns their results
    (["ok", value] or [errno name])."""
    code = TRY + "print(json.dumps([attempt(globals().get(c[0]) or getattr(os, c[0]), *c[1:]) " \
                 "for c in json.loads(sys.argv[1])]))"
    rc, out, err = as_user(code, json.dumps(calls), uid=uid, groups=groups)
    assert rc == 0, err
    return json.loads(out)
