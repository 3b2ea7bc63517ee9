"""The imagefs command line, run as a user would: a subprocess, real files."""
import io
import json
import os
import subprocess
import sys
import tarfile

import pytest

from helpers import make_tar, one_line_error, sha256


@pytest.fixture
def cli(backend):
    ds = backend.spec

    def run(*args, input=None, ok=True):
        proc = subprocess.run([sys.executable, "-m", "imagefs", "--datastore", ds, *args],
                              input=input, capture_output=True)
        if ok:
            assert proc.returncode == 0, proc.stderr.decode()
        return proc
    return run


def test_store_commands(cli):
    assert cli("store", "create", "s", "--capacity", "256MiB").stdout == b"s\n"
    assert cli("store", "ls").stdout == b"s\n"
    assert "already exists" in one_line_error(cli("store", "create", "s", ok=False))
    assert cli("store", "usage", "s").stdout == b"0\n"
    cli("store", "rm", "s")
    assert cli("store", "ls").stdout == b""
    assert "not found" in one_line_error(cli("store", "rm", "s", ok=False))


def test_image_write_info_meta_rm(cli, tmp_path, backend):
    cli("store", "create", "s", "--capacity", "256MiB")
    data = make_tar([("hello.txt", "file", {"data": b"hello\n"})])
    tar = tmp_path / "l.tar"
    tar.write_bytes(data)
    (tmp_path / "cfg.json").write_bytes(b'{"a": 1}')
    out = cli("image", "write", "s", "scratch", "l1", str(tar), "--sum", sha256(data),
              "--meta", "author=me", "--meta", f"metaData=@{tmp_path / 'cfg.json'}")
    assert out.stdout.decode() == f"l1 {sha256(data)}\n"
    assert out.stderr == b""          # no progress output when stderr is not a terminal
    # stdin input
    out = cli("image", "write", "s", "l1", "l2", input=make_tar([("b", "file", {"data": b"b"})]))
    assert out.stdout.startswith(b"l2 sha256:")
    assert cli("image", "ls", "s", "-q").stdout == b"l1\nl2\nscratch\n"
    info = cli("image", "info", "s", "l2").stdout.decode()
    assert "parent:     l1" in info and "ancestors:  l1 scratch" in info
    folder = backend.spec.rpartition("/")[2]
    ds_path = "%5Blocal%5D%20" if backend.name == "local" else f"%5BLocalDS_0%5D%20{folder}/"
    assert f"url:        ds://{ds_path}VIC/s/images/l2/l2.vmdk" in info
    assert cli("image", "meta", "s", "l1").stdout == b"author\nmetaData\n"
    assert cli("image", "meta", "s", "l1", "metaData").stdout == b'{"a": 1}'
    assert "in use by child images: l2" in one_line_error(cli("image", "rm", "s", "l1", ok=False))
    assert cli("image", "rm", "s", "l2", "--branch").stdout == b"l2\nl1\n"
    assert cli("image", "ls", "s", "-q").stdout == b"scratch\n"


def test_write_errors_are_one_line(cli, tmp_path):
    cli("store", "create", "s", "--capacity", "256MiB")
    data = make_tar([("x", "file", {"data": b"x"})])
    line = one_line_error(cli("image", "write", "s", "scratch", "bad", "-", "--sum", sha256(b"nope"), input=data,
                              ok=False))
    assert "sha256" in line
    assert "invalid image ID" in one_line_error(cli("image", "write", "s", "scratch", "a/b", "-", input=data,
                                                    ok=False))
    assert "parent image zz not found" in one_line_error(cli("image", "write", "s", "zz", "c", "-", input=data,
                                                             ok=False))
    one_line_error(cli("image", "write", "s", "scratch", "trunc", "-", input=data[:600], ok=False))
    one_line_error(cli("image", "write", "s", "scratch", "m", str(tmp_path / "missing.tar"), ok=False))
    one_line_error(cli("image", "info", "nostore", "x", ok=False))
    assert "import failure reports" in one_line_error(cli("image", "write", "s", "scratch", "x.error", "-",
                                                          input=data, ok=False))
    assert one_line_error(cli("store", "create", "s", ok=False)) == "imagefs: image store s already exists"


def test_exit_codes_json_version_and_status(cli, backend):
    assert cli("store", "ls", ok=False).returncode == 3                      # no datastore yet: not created
    assert not os.path.exists(backend.root)
    cli("store", "create", "s", "--capacity", "256MiB")
    assert cli("image", "info", "s", "nope", ok=False).returncode == 3      # not found
    assert cli("image", "rm", "s", "scratch", ok=False).returncode == 4     # in use
    assert cli("image", "write", "s", "scratch", "a/b", "-", input=b"", ok=False).returncode == 2   # invalid
    assert cli("store", "create", "s", ok=False).returncode == 5            # exists
    assert cli("export", "s", "scratch", "--rebase", "a", "--rebase", "b", ok=False).returncode == 2
    assert json.loads(cli("store", "ls", "--json").stdout) == ["s"]
    assert json.loads(cli("image", "ls", "s", "--json").stdout)[0]["id"] == "scratch"
    assert json.loads(cli("image", "info", "s", "scratch", "--json").stdout)["parent"] is None
    assert json.loads(cli("container", "ls", "--json").stdout) == []
    assert json.loads(cli("store", "usage", "s", "--json").stdout) == {"store": "s", "usage": 0}
    assert isinstance(json.loads(cli("status", "--json").stdout), list)
    version = cli("--version").stdout.decode()
    for name in ("imagefs", "libfuse", "pyfuse3", "trio", "pyvmomi"):
        assert f"\n{name} " in "\n" + version
    assert cli("image", "ls", "s", "-q").stdout == b"scratch\n"


def test_export_whole_image_and_diff(cli, tmp_path):
    cli("store", "create", "s", "--capacity", "256MiB")
    cli("image", "write", "s", "scratch", "a", input=make_tar([("d", "dir", {}), ("d/f", "file", {"data": b"1"})]))
    cli("image", "write", "s", "a", "b", input=make_tar([("d/g", "file", {"data": b"22"}), (".wh.x", "file", {}),
                                                          ("d/.wh.f", "file", {})]))
    out = tmp_path / "b.tar"
    cli("export", "s", "b", "--ancestor", "a", "-o", str(out))
    with tarfile.open(out) as tf:
        names = tf.getnames()
    assert "d/g" in names and "d/.wh.f" in names
    full = cli("export", "s", "b").stdout
    with tarfile.open(fileobj=io.BytesIO(full)) as tf:
        names = tf.getnames()
    assert "d/g" in names and "etc/hostname" in names and not any(".wh." in n for n in names)
    assert not os.path.exists(str(out) + ".part")


def test_progress_on_a_terminal_and_no_tar_to_a_terminal(cli, tmp_path, backend):
    import pty
    cli("store", "create", "s", "--capacity", "256MiB")
    tar = tmp_path / "big.tar"
    tar.write_bytes(make_tar([("big", "file", {"data": os.urandom(64 << 20)})]))
    ds = backend.spec

    def on_tty(*args, stdout_tty=False):
        master, slave = pty.openpty()
        proc = subprocess.run([sys.executable, "-m", "imagefs", "--datastore", ds, *args],
                              stdout=slave if stdout_tty else subprocess.PIPE, stderr=slave)
        os.close(slave)
        seen = b""
        try:
            while chunk := os.read(master, 65536):
                seen += chunk
        except OSError:
            pass
        os.close(master)
        return proc, seen.decode(errors="replace")

    proc, seen = on_tty("image", "write", "s", "scratch", "big", str(tar))
    assert proc.returncode == 0 and "%" in seen and "/ 64.0 MiB" in seen   # a bar with the known total
    assert proc.stdout.startswith(b"big sha256:")                          # stdout carries only the result
    proc, seen = on_tty("-q", "image", "write", "s", "scratch", "quiet", str(tar))
    assert proc.returncode == 0 and "%" not in seen
    proc, seen = on_tty("export", "s", "big", stdout_tty=True)
    assert proc.returncode == 2 and "refusing to write a tar to a terminal" in seen
