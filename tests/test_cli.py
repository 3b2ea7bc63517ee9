"""The imagefs command line, run as a user would: a subprocess, real files."""
import io
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
