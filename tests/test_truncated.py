"""A truncated stream is not a layer, and the writing command sees a failed import whatever the shell.

A tar cut exactly between two members reads like a shorter, valid tar; only its
missing end-of-archive blocks tell. Through the mount, the commit happens at the close
of the descriptor that delivered those blocks, so ``sh -c "cat x.tar > import/y"``
exits non-zero under dash (which keeps its own descriptor until after cat exits) as
under bash.
"""
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile

import pytest

from fuse_fixtures import datastore, image_path, mounted_copy  # noqa: F401 - fixtures

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (FUSE, loop mounts)")
SHELLS = [s for s in ("dash", "bash") if shutil.which(s)]


def _tar(n=6, size=3000):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for i in range(n):
            ti = tarfile.TarInfo(f"t/f{i}")
            ti.size = size
            tf.addfile(ti, io.BytesIO(bytes([65 + i]) * size))
    return buf.getvalue()


def _cut_between_members(data, after):
    """The bytes up to the end of member number ``after`` (no end-of-archive blocks)."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        m = tf.getmembers()[after]
    return data[:m.offset_data + (m.size + 511) // 512 * 512]


@pytest.fixture(scope="module")
def tars(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trunc")
    full = _tar()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        ti = tarfile.TarInfo("../escape")
        ti.size = 1
        tf.addfile(ti, io.BytesIO(b"x"))
    out = {"full": full, "cut": _cut_between_members(full, 2), "empty": b"", "garbage": b"not a tar at all" * 100,
           "unsafe": buf.getvalue()}
    for name, data in out.items():
        (tmp / f"{name}.tar").write_bytes(data)
    return {name: str(tmp / f"{name}.tar") for name in out}


# --- through the command line ------------------------------------------------------------------------
@pytest.fixture
def cli(tmp_path):
    ds = str(tmp_path / "ds")

    def run(*args, ok=True):
        proc = subprocess.run([sys.executable, "-m", "imagefs", "--datastore", ds, *args], capture_output=True,
                              text=True, env=dict(os.environ, IMAGEFS_WORKDIR=str(tmp_path)))
        if ok:
            assert proc.returncode == 0, proc.stderr
        return proc
    run("store", "create", "s", "--capacity", "256MiB")
    return run


@pytest.mark.parametrize("case", ["cut", "empty"])
def test_cli_refuses_a_truncated_stream(cli, tars, case):
    proc = cli("image", "write", "s", "scratch", "x", tars[case], ok=False)
    assert proc.returncode == 2                       # invalid input
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("imagefs: the layer stream is truncated"), \
        proc.stderr
    assert "x" not in cli("image", "ls", "-q", "s").stdout.split()


def test_cli_takes_a_truncated_stream_with_its_sum(cli, tars, tmp_path):
    with open(tars["cut"], "rb") as f:
        digest = "sha256:" + hashlib.sha256(f.read()).hexdigest()
    cli("image", "write", "s", "scratch", "x", tars["cut"], "--sum", digest)
    cli("export", "s", "x", "--ancestor", "scratch", "-o", str(tmp_path / "x.tar"))
    with tarfile.open(tmp_path / "x.tar") as tf:
        assert sorted(n for n in tf.getnames() if n.startswith("t/")) == ["t/f0", "t/f1", "t/f2"]


def test_cli_whole_tar_passes(cli, tars):
    cli("image", "write", "s", "scratch", "x", tars["full"])
    assert "x" in cli("image", "ls", "-q", "s").stdout.split()


# --- through the mount, under dash and bash --------------------------------------------------------
@pytest.fixture(scope="module")
def mnt(datastore, tmp_path_factory):  # noqa: F811
    with mounted_copy(datastore, tmp_path_factory.mktemp("trunc-mnt")) as m:
        yield m


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("case", ["garbage", "wrong-sum", "unsafe"])
def test_failed_import_fails_the_writing_command(mnt, tars, shell, case):
    """Whatever fails once the writer has sent its tar reaches its exit status, under dash too."""
    target = image_path(mnt, "base", "import", f"{case}-{shell}")
    source, setup = tars["full"], ""
    if case == "garbage":
        source = tars["garbage"]
    elif case == "wrong-sum":
        setup = f'touch "{target}" && setfattr -n user.imagefs.sum -v sha256:{"0" * 64} "{target}" && '
    else:
        source = tars["unsafe"]
    proc = subprocess.run([shell, "-c", f'{setup}cat "{source}" > "{target}"'], capture_output=True, text=True)
    assert proc.returncode != 0, f"{shell}: the failed import did not reach the exit status"
    assert not os.path.exists(image_path(mnt, f"{case}-{shell}"))
    reason = open(f"{target}.error").read()
    assert {"garbage": "archive", "wrong-sum": "checksum", "unsafe": "'..'"}[case] in reason


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("case", ["cut", "empty"])
def test_truncated_import_is_refused(mnt, tars, shell, case):
    """A tar without its end is refused. Its failure can only show at the last close: cat's
    under bash; under dash the shell's own, whose status ignores it (the .error file says)."""
    target = image_path(mnt, "base", "import", f"{case}-{shell}")
    proc = subprocess.run([shell, "-c", f'cat "{tars[case]}" > "{target}"'], capture_output=True, text=True)
    if shell == "bash":
        assert proc.returncode != 0
    assert not os.path.exists(image_path(mnt, f"{case}-{shell}"))
    assert "truncated" in open(f"{target}.error").read()


@pytest.mark.parametrize("shell", SHELLS)
def test_whole_import_is_committed_when_cat_returns(mnt, tars, shell):
    """The commit happens at cat's close: the image is there as soon as the command ends."""
    target = image_path(mnt, "base", "import", f"whole-{shell}")
    proc = subprocess.run([shell, "-c", f'cat "{tars["full"]}" > "{target}" && ls "{image_path(mnt, f"whole-{shell}")}"'],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "rootfs" in proc.stdout.split()


def test_sum_accepts_a_truncated_import(mnt, tars):
    target = image_path(mnt, "base", "import", "cut-with-sum")
    with open(tars["cut"], "rb") as f:
        data = f.read()
    open(target, "a").close()
    os.setxattr(target, "user.imagefs.sum", b"sha256:" + hashlib.sha256(data).hexdigest().encode())
    with open(target, "wb") as f:
        f.write(data)
    assert sorted(os.listdir(image_path(mnt, "cut-with-sum", "rootfs", "t"))) == ["f0", "f1", "f2"]


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("after", ["padding", "garbage"])
def test_bytes_after_a_commit(mnt, tars, tmp_path, shell, after):
    """``{ head -c N; tail -c +N+1; } > import/x`` with the end-of-archive marker in the first
    part: head's close commits the layer, and the record padding that tail writes after it
    is accepted (tar -cf pads to 10 KiB); anything but zeros there fails tail, not the layer."""
    with open(tars["full"], "rb") as f:
        full = f.read()
    end = len(_cut_between_members(full, -1)) + 1024         # the last member, then the marker
    tail = bytes(10240) if after == "padding" else b"more data after the end" * 100
    source = tmp_path / "layer.tar"
    source.write_bytes(full[:end] + tail)
    name = f"after-{after}-{shell}"
    target = image_path(mnt, "base", "import", name)
    proc = subprocess.run([shell, "-c", f'{{ head -c {end} "{source}"; tail -c +{end + 1} "{source}"; }} > "{target}"'],
                          capture_output=True, text=True)
    assert (proc.returncode == 0) == (after == "padding"), proc.stderr
    assert sorted(os.listdir(image_path(mnt, name, "rootfs", "t"))) == [f"f{i}" for i in range(6)]
