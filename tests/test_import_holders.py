"""An import commits at its writer's last close, not at the close of one of the shell's copies.

``( head -c N x.tar; tail -c +N+1 x.tar ) > import/y`` under dash closes descriptors of
the import four times (the redirection's original after dup2, head's exit, tail's
exit); only the last may commit. The daemon tells by looking for other descriptors of
the file in /proc (imagefs/fuse/holders.py). It once matched them by the path /proc
prints, and a ``stat`` racing the ``open(O_CREAT)`` made that path ``.../y (deleted)``
(the kernel drops the negative entry that FUSE then turns into the new file): the
first close committed nothing at all, a truncated failure. Here lookups race every
open, as the umount test's poll did when about one run in three lost its import.
"""
import io
import os
import signal
import subprocess
import sys
import tarfile
import time

import pytest

from fuse_fixtures import datastore, image_path, mounted_copy  # noqa: F401 - fixtures

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="needs root (FUSE, loop mounts)"),
              pytest.mark.skipif(not os.path.exists("/bin/dash"), reason="dash is the shell under test")]
ROUNDS = 30

# Each round: the subshell writes the tar in two halves while lookups of its name race
# the open; the writer's status is printed when it is not 0.
SUBSHELL_ROUNDS = r'''
imports=$1 tar=$2 rounds=$3 prefix=$4
half=$(( $(stat -c %s "$tar") / 2 ))
i=0
while [ $i -lt $rounds ]; do
    i=$((i + 1))
    ( head -c $half "$tar"; tail -c +$((half + 1)) "$tar" ) > "$imports/$prefix$i" & writer=$!
    for k in 1 2 3 4 5 6; do stat -c %s "$imports/$prefix$i" > /dev/null 2>&1; done
    wait $writer || echo "round $i: writer exit $?"
done
'''


def _tar(members):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in members.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture(scope="module")
def mnt(datastore, tmp_path_factory):  # noqa: F811
    with mounted_copy(datastore, tmp_path_factory.mktemp("holders-mnt")) as m:
        yield m


@pytest.fixture(scope="module")
def layer(tmp_path_factory):
    """A tar whose middle falls inside a member, and its files."""
    members = {f"h/f{i}": os.urandom(40_000 + i) for i in range(4)}
    path = tmp_path_factory.mktemp("holders") / "layer.tar"
    path.write_bytes(_tar(members))
    return str(path), members


def test_subshell_halves_commit_whole_under_dash(mnt, layer):
    tar, members = layer
    imports = image_path(mnt, "base", "import")
    proc = subprocess.run(["dash", "-c", SUBSHELL_ROUNDS, "sh", imports, tar, str(ROUNDS), "sub"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout == "", proc.stdout + proc.stderr
    reports = sorted(n for n in os.listdir(imports) if n.endswith(".error"))
    assert reports == [], {n: open(os.path.join(imports, n)).read() for n in reports}
    for i in range(1, ROUNDS + 1):
        root = image_path(mnt, f"sub{i}", "rootfs", "h")
        assert sorted(os.listdir(root)) == sorted(n.split("/")[1] for n in members), i
        _assert_holds(mnt, f"sub{i}", members)


def test_truncated_tar_in_halves_fails_the_subshell_under_dash(mnt, layer, tmp_path):
    """Cut between two members (no end-of-archive blocks): refused, and the subshell,
    whose last command's close is the last close, exits non-zero."""
    tar, members = layer
    with open(tar, "rb") as f:
        data = f.read()
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        second = tf.getmembers()[2]
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[:second.offset])              # two members, then nothing
    imports = image_path(mnt, "base", "import")
    proc = subprocess.run(["dash", "-c", SUBSHELL_ROUNDS, "sh", imports, str(cut), "3", "cut"],
                          capture_output=True, text=True, timeout=600)
    assert proc.stdout.splitlines() == [f"round {i}: writer exit 1" for i in (1, 2, 3)], proc.stderr
    assert proc.stderr.count("Invalid argument") == 3, proc.stderr
    for i in (1, 2, 3):
        assert not os.path.exists(image_path(mnt, f"cut{i}"))
        assert "truncated" in open(os.path.join(imports, f"cut{i}.error")).read()


def test_killed_subshell_ends_its_import(mnt, layer):
    """A writer killed while it and a child hold copies: the import ends (refused as
    truncated) once the last copy is gone, without anyone closing it cleanly."""
    tar, _ = layer
    imports = image_path(mnt, "base", "import")
    writer = subprocess.Popen(["dash", "-c", f'( head -c 30000 "{tar}"; sleep 600 ) > "{imports}/killed"'],
                              start_new_session=True)
    try:
        _wait_for(lambda: _size(os.path.join(imports, "killed")) == 30000)
        os.killpg(writer.pid, signal.SIGKILL)
        writer.wait()
        _wait_for(lambda: os.path.exists(os.path.join(imports, "killed.error")))
    finally:
        if writer.poll() is None:
            os.killpg(writer.pid, signal.SIGKILL)
    assert "truncated" in open(os.path.join(imports, "killed.error")).read().lower()
    assert not os.path.exists(image_path(mnt, "killed"))
    assert "killed" not in os.listdir(imports)


# The first thread exits (pthread_exit) and leaves /proc/PID/fd empty; the second keeps
# the process's descriptors, writes half through a copy, closes it, writes the rest.
LEADERLESS_WRITER = r'''
import ctypes, os, sys, threading, time
path, data = sys.argv[1], open(sys.argv[2], "rb").read()
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
def rest():
    while "State:\tZ" not in open(f"/proc/{os.getpid()}/status").read():
        time.sleep(0.01)
    assert os.listdir(f"/proc/{os.getpid()}/fd") == []
    copy = os.dup(fd)
    os.write(copy, data[: len(data) // 2])
    os.close(copy)                  # a flush while fd stays open, in a table only the thread shows
    os.write(fd, data[len(data) // 2:])
    os.close(fd)
def run():
    try:
        rest()
    except BaseException as e:
        print(f"writer: {e!r}", file=sys.stderr, flush=True)
        os._exit(1)
    os._exit(0)
threading.Thread(target=run).start()
ctypes.CDLL(None).pthread_exit(None)
'''


def test_a_writer_whose_first_thread_exited_commits_at_its_last_close(mnt, layer):
    tar, members = layer
    target = image_path(mnt, "base", "import", "leaderless")
    proc = subprocess.run([sys.executable, "-c", LEADERLESS_WRITER, target, tar], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    _assert_holds(mnt, "leaderless", members)


def test_a_writer_through_a_bind_mount_commits_at_its_last_close(mnt, layer, tmp_path):
    """The file's path in /proc is the bind mount's: the descriptor is still the file's."""
    tar, members = layer
    bound = tmp_path / "bound"
    bound.mkdir()
    subprocess.run(["mount", "--bind", image_path(mnt, "base", "import"), bound], check=True)
    try:
        half = os.path.getsize(tar) // 2
        proc = subprocess.run(["dash", "-c", f'( head -c {half} "{tar}"; tail -c +{half + 1} "{tar}" ) > {bound}/bound'],
                              capture_output=True, text=True, timeout=300)
    finally:
        subprocess.run(["umount", bound], check=True)
    assert proc.returncode == 0, proc.stderr
    _assert_holds(mnt, "bound", members)


def _assert_holds(mnt, image, members):
    for name, data in members.items():
        with open(image_path(mnt, image, "rootfs", name), "rb") as f:
            assert f.read() == data, (image, name)


def _size(path):
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return None


def _wait_for(condition, limit=120):
    """Poll until ``condition()`` (a bound against hanging, not a timing check)."""
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, "gave up waiting"
        time.sleep(0.05)
