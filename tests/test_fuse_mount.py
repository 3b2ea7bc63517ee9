"""The mount's life: starting (ready or a reason), options, signals, killed daemons, broken disks
(mount(8), umount(8) and fstab: test_mount_helpers.py)."""
import errno
import os
import signal
import struct
import subprocess
import sys

import pytest

from helpers import make_tar

from fuse_fixtures import (STORE, daemon_pid, datastore, image_path, is_mounted, mount_cmd,  # noqa: F401
                           unmount, vmdk_path, wait_for)

from imagefs.fuse.mount import umount

@pytest.fixture
def ds(datastore, tmp_path):  # noqa: F811
    """A private copy of the shared datastore."""
    subprocess.run(["cp", "-a", "--sparse=always", datastore, tmp_path / "ds"], check=True)
    return tmp_path / "ds"


@pytest.fixture
def mnt(tmp_path):
    path = tmp_path / "mnt"
    path.mkdir()
    yield str(path)
    unmount(path)


def start(ds, mnt, *options):
    return subprocess.run(mount_cmd(ds, mnt, options), capture_output=True, text=True)


def test_mount_returns_when_ready(ds, mnt):
    proc = start(ds, mnt)
    assert proc.returncode == 0, proc.stderr
    assert os.listdir(mnt) == [STORE]       # no waiting: ready means ready
    pid = daemon_pid(mnt)
    assert umount(mnt) == 0
    assert not is_mounted(mnt) and not running(pid)


@pytest.mark.parametrize("case,reason", [
    ("no mountpoint", "not a directory"),
    ("unknown option", "unknown mount option 'colour=red'"),
    ("datastore is a file", "does not exist"),
    ("log in a missing directory", "log=/nonexistent/dir/log: No such file or directory"),
    ("unknown writer", "writer=nope: use one of kernel, fuse2fs"),
    ("missing workdir", "workdir=/nonexistent: no such directory"),
])
def test_failed_start_says_why(ds, mnt, tmp_path, case, reason):
    if case == "no mountpoint":
        proc = start(ds, tmp_path / "missing")
    elif case == "unknown option":
        proc = start(ds, mnt, "colour=red")
    elif case == "log in a missing directory":
        proc = start(ds, mnt, "log=/nonexistent/dir/log")
    elif case == "unknown writer":
        proc = start(ds, mnt, "writer=nope")
    elif case == "missing workdir":
        proc = start(ds, mnt, "workdir=/nonexistent")
    else:                                              # reported by the daemon, through the pipe
        (tmp_path / "file").write_text("x")
        proc = start(tmp_path / "file" / "sub", mnt)
    assert proc.returncode != 0
    assert reason in proc.stderr and "Traceback" not in proc.stderr
    assert not is_mounted(mnt)


def test_a_second_mount_on_one_mountpoint_is_refused(ds, mnt):
    assert start(ds, mnt).returncode == 0
    pid = daemon_pid(mnt)
    proc = start(ds, mnt)
    assert proc.returncode != 0 and f"already an imagefs mount of {os.path.realpath(ds)} (daemon {pid})" in proc.stderr
    with open("/proc/self/mountinfo") as f:
        assert sum(line.split()[4] == mnt for line in f) == 1


def test_sigterm_gives_writers_of_running_imports_ecanceled(ds, mnt, tmp_path):
    """As documented: the writer's next write fails with ECANCELED, not ECONNABORTED."""
    assert start(ds, mnt).returncode == 0
    pid = daemon_pid(mnt)
    target = image_path(mnt, "base", "import", "cut")
    ready = tmp_path / "ready"
    # the writer goes on writing a member's data (a write before the daemon's abort succeeds),
    # so its first write after the abort lands well within the daemon's grace, whatever the load
    code = (f"import os, tarfile, time\nfd = os.open({target!r}, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)\n"
            "big = tarfile.TarInfo('big')\nbig.size = 100 << 20\n"
            "os.write(fd, big.tobuf())\n"           # a member whose data goes on arriving
            f"open({str(ready)!r}, 'w').close()\n"
            "try:\n    for _ in range(400):\n        os.write(fd, bytes(512))\n        time.sleep(0.05)\n"
            "    print('ok')\nexcept OSError as e:\n    print(e.errno)\n")
    writer = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert wait_for(ready.exists)
    os.kill(pid, signal.SIGTERM)
    out, _ = writer.communicate(timeout=30)
    assert out.strip() == str(errno.ECANCELED)
    assert wait_for(lambda: not running(pid), timeout=30)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_foreground_mount_stops_cleanly_on_signals(ds, mnt, sig):
    daemon = subprocess.Popen(mount_cmd(ds, mnt, foreground=True), stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: is_mounted(mnt) and os.path.exists(os.path.join(mnt, STORE)))
        daemon.send_signal(sig)
        assert daemon.wait(timeout=20) == 0
        assert not is_mounted(mnt)
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()


def test_sigterm_undoes_an_import_in_flight(ds, mnt, tmp_path):
    assert start(ds, mnt).returncode == 0
    pid = daemon_pid(mnt)
    tar = tmp_path / "layer.tar"
    tar.write_bytes(make_tar([("big", "file", {"data": os.urandom(4 << 20)})]))
    target = image_path(mnt, "base", "import", "cut")
    writer = subprocess.Popen(["bash", "-c", f"head -c 1000000 {tar}; sleep 3; tail -c +1000001 {tar}"],
                              stdout=open(target, "wb"), stderr=subprocess.DEVNULL)
    assert wait_for(lambda: os.path.getsize(target) >= 1000000)
    os.kill(pid, signal.SIGTERM)
    assert wait_for(lambda: not running(pid), timeout=30)
    assert writer.wait(timeout=30) != 0
    assert not is_mounted(mnt)
    assert not os.path.exists(os.path.join(ds, "VIC", STORE, "images", "cut"))   # undone
    assert sorted(os.listdir(os.path.join(ds, "VIC", STORE, "images"))) == ["base", "child", "idl", "scratch"]


def test_killed_daemon_then_umount_frees_the_mountpoint(ds, mnt):
    assert start(ds, mnt).returncode == 0
    os.kill(daemon_pid(mnt), signal.SIGKILL)
    assert wait_for(lambda: _errno_of(lambda: os.listdir(mnt)) == errno.ENOTCONN)
    assert umount(mnt) == 0
    assert not is_mounted(mnt) and os.listdir(mnt) == []
    assert start(ds, mnt).returncode == 0       # and it can be mounted again


def test_killed_daemon_with_a_user_left_needs_lazy(ds, mnt):
    assert start(ds, mnt).returncode == 0
    holder = subprocess.Popen(["sleep", "30"], cwd=mnt)
    os.kill(daemon_pid(mnt), signal.SIGKILL)
    try:
        assert umount(mnt) == 0                  # stale and busy: detached
        assert not is_mounted(mnt)
    finally:
        holder.kill()
        holder.wait()


def test_busy_live_mount_is_not_unmounted_unless_lazy(ds, mnt, capsys):
    assert start(ds, mnt).returncode == 0
    holder = subprocess.Popen(["sleep", "30"], cwd=image_path(mnt, "base", "rootfs"))
    try:
        assert umount(mnt) == 1
        assert "cannot unmount" in capsys.readouterr().err
        assert is_mounted(mnt)
        assert umount(mnt, lazy=True) == 0
        assert not is_mounted(mnt)
    finally:
        holder.kill()
        holder.wait()


def test_read_only_mount(ds, mnt):
    assert start(ds, mnt, "ro").returncode == 0
    with pytest.raises(OSError) as e:
        open(image_path(mnt, "base", "import", "x"), "wb")
    assert e.value.errno == errno.EROFS
    with pytest.raises(OSError) as e:
        os.mkdir(os.path.join(mnt, "newstore"))
    assert e.value.errno == errno.EROFS
    assert os.listdir(image_path(mnt, "base", "rootfs", "bin")) == ["id"]


def test_suid_option_is_what_makes_setuid_work(ds, mnt):
    """The control for test_fuse_read's nosuid test: with -o suid the same binary runs as root."""
    assert start(ds, mnt, "suid", "allow_other").returncode == 0
    out = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                          image_path(mnt, "idl", "rootfs", "bin", "id"), "-u"], capture_output=True, text=True)
    assert out.stdout.strip() == "0"


def test_other_users_are_kept_out_unless_allow_other(ds, mnt):
    assert start(ds, mnt).returncode == 0
    proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "ls", mnt],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "Permission denied" in proc.stderr


def test_broken_disk_gives_eio_and_a_log_line(ds, mnt, tmp_path):
    """Cut off the grains of one layer: its reads fail with EIO, the rest keeps working."""
    vmdk = vmdk_path(ds, "child")
    with open(vmdk, "rb") as f:
        header = f.read(512)
    overhead = struct.unpack_from("<Q", header, 4 + 4 + 4 + 8 + 8 + 8 + 8 + 4 + 8 + 8)[0]
    os.truncate(vmdk, overhead * 512)
    log = tmp_path / "log"
    assert start(ds, mnt, f"log={log}").returncode == 0
    assert _errno_of(lambda: os.listdir(image_path(mnt, "child", "rootfs", "files"))) == errno.EIO
    assert _errno_of(lambda: open(image_path(mnt, "child", "rootfs", "files", "added"), "rb").read()) == errno.EIO
    assert os.listdir(image_path(mnt, "base", "rootfs", "bin")) == ["id"]   # the daemon lives on
    assert "truncated" in log.read_text()


def running(pid):
    """True while ``pid`` runs (a zombie waiting for its reaper has finished)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _errno_of(fn):
    try:
        fn()
    except OSError as e:
        return e.errno
    return None
