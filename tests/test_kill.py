"""Killed writers leave nothing behind: a short kill campaign, signals, and what recovery must not touch.

The full campaign (hundreds of kill points) is reliability/kill_campaign.py; this runs
a few points of each kind with real processes and real signals.
"""
import os
import signal
import subprocess
import time

import pytest

from fuse_fixtures import wait_for

from imagefs.layer.recover import recover_work_dirs
from reliability import harness
from reliability.kill_campaign import STORE, Lab, member_ends

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (FUSE, loop mounts)")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    lab = Lab(str(tmp_path_factory.mktemp("kill")), writer="kernel", data_mib=5)
    yield lab
    lab.umount()
    recover_work_dirs(lab.work)                 # a failed test must not leave a killed writer's mounts


def _assert_ok(outcome):
    assert outcome.died, f"{outcome.how}: the process was not killed there"
    assert outcome.ok, f"{outcome.how}: leftovers {outcome.leftovers}, wrong {outcome.wrong}, {outcome.retry}"


@pytest.mark.parametrize("point", ["stream:1", "extract:30", "unmount:3", "qsd-stop:2", "verified:1", "manifest:2"])
def test_cli_killed_at_a_crash_point(lab, point):
    outcome = lab.kill_cli(point)
    _assert_ok(outcome)
    if point != "manifest:2":                                # before the manifest: something to clean
        assert outcome.cleaned, "the kill left nothing for the next start to clean: it hit no live write"


def test_points_cover_every_phase(lab):
    points = lab.tally()
    assert {name for name, _ in points} >= {"stream", "extract", "unmount", "fsck", "qsd-stop", "sum", "sealed",
                                             "verified", "metadata", "manifest"}


def test_cli_killed_with_the_fuse2fs_writer(tmp_path):
    lab = Lab(str(tmp_path), writer="fuse2fs", data_mib=1)
    _assert_ok(lab.kill_cli("extract:20"))


@pytest.mark.parametrize("point", ["extract:40", "manifest:1"])
def test_mount_daemon_killed_at_a_crash_point(lab, point):
    """The next start is umount + mount: the mount start has cleaned before it serves."""
    _assert_ok(lab.kill_daemon(point))


def test_writing_process_killed(lab):
    between = member_ends(lab.layer_tar)[30]
    for nbytes in (0, between, lab.layer_size):           # nothing, between two members, all (but the close)
        outcome = lab.kill_client(nbytes)
        _assert_ok(outcome)


# --- SIGTERM and SIGHUP unwind like an error -------------------------------------------------------
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_signals_unwind_the_cli(lab, sig):
    """A writer fed slowly through a pipe is signalled mid-write: exit 128+n, one line, nothing left."""
    proc = subprocess.Popen(lab.write_cmd()[:-3] + ["-"], stdin=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, env=lab.env(), cwd=ROOT)
    with open(lab.layer_tar, "rb") as f:
        proc.stdin.write(f.read(1 << 20))
        proc.stdin.flush()
    assert wait_for(lambda: any(os.scandir(lab.work)))          # the write has started
    time.sleep(0.3)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig
    assert err.decode().strip() in (f"imagefs: stopped by {signal.Signals(sig).name}", "imagefs: interrupted")
    assert harness.leftovers(lab.work, lab.ds) == []
    assert "layer" not in lab.cli("image", "ls", "-q", STORE).stdout.split()


# --- recovery touches only what is provably a dead writer's ----------------------------------------
def test_recovery_leaves_live_writers_and_foreign_dirs_alone(lab):
    foreign = os.path.join(lab.work, "imagefs-layer-foreign")     # no record: not one of ours
    os.mkdir(foreign)
    open(os.path.join(foreign, "file"), "w").close()
    writer = subprocess.Popen(lab.write_cmd()[:-3] + ["-"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, env=lab.env(), cwd=ROOT)
    try:
        with open(lab.layer_tar, "rb") as f:
            data = f.read()
        writer.stdin.write(data[:1 << 20])
        writer.stdin.flush()
        assert wait_for(lambda: len(harness.leftovers(lab.work, lab.ds)) >= 5)   # mounted and exporting
        live = sorted(harness.leftovers(lab.work, lab.ds))
        for _ in range(2):                                   # other starts, while it writes
            lab.cli("image", "ls", STORE)
        assert sorted(harness.leftovers(lab.work, lab.ds)) == live
        writer.stdin.write(data[1 << 20:])
        writer.stdin.close()
        assert writer.wait(120) == 0, writer.stderr.read()
    finally:
        writer.kill()
    assert os.listdir(foreign) == ["file"]
    os.unlink(os.path.join(foreign, "file"))
    os.rmdir(foreign)
    assert harness.leftovers(lab.work, lab.ds) == []
    assert harness.differences(lab.reference, harness.snapshot(lab.ds, STORE, "layer")) == []
    lab.cli("image", "rm", STORE, "layer")
