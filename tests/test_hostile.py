"""Hostile layers: moby's archive breakouts, and tar bombs streamed into the mount with its memory watched.

Each case is refused with one clear line or applied safely inside the layer. The bombs
are generated as streams (reliability/hostile.py) and scaled down here; the full sizes
(a million entries...) run in reliability/hostile_campaign.py.
"""
import os
import stat

import pytest

from fuse_fixtures import datastore, image_path, mounted_copy  # noqa: F401 - fixtures

from imagefs.errors import InvalidInput
from imagefs.layer.extract import apply_layer
from imagefs.layer.writer import write_layer
from reliability import hostile

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (FUSE, loop mounts)")
RSS_LIMIT = 200 << 20


def _state(top):
    out = {}
    for d, dirs, files in os.walk(top):
        for n in dirs + files:
            st = os.lstat(os.path.join(d, n))
            out[os.path.relpath(os.path.join(d, n), top)] = (st.st_mode, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    return out


@pytest.mark.parametrize("case", sorted(hostile.BREAKOUTS))
def test_breakout(case, tmp_path):
    """As moby's testBreakout: a victim directory next to the layer root must not change."""
    root, victim = tmp_path / "root", tmp_path / "victim"
    root.mkdir()
    victim.mkdir()
    (victim / "hello").write_text("hello")
    before = _state(victim)
    try:
        apply_layer(str(root), hostile.reader(hostile.BREAKOUTS[case]()))
    except InvalidInput as err:
        assert "\n" not in str(err)
    assert _state(victim) == before
    assert sorted(os.listdir(tmp_path)) == ["root", "victim"]
    for d, dirs, files in os.walk(root):                     # what was made stays inside, none is a device
        for n in dirs + files:
            st = os.lstat(os.path.join(d, n))
            assert not (stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)) or (st.st_rdev == os.makedev(1, 3))


@pytest.mark.parametrize("case", ["symlink dir, write through", "absolute symlink dir, write through",
                                  "host /dev/null through symlink", "hardlink dir, write through"])
def test_breakout_through_the_writer(case, layer_base_disk, layer_flat_view, tmp_path):
    """The same through the whole writer: nothing appears on the host, the layer holds the rest."""
    (tmp_path / "c").mkdir()
    child = str(tmp_path / "c" / "c.vmdk")
    work = tmp_path / "work"
    work.mkdir()
    host_null = os.stat("/dev/null")
    try:
        write_layer(layer_base_disk.vmdk, child, hostile.reader(hostile.BREAKOUTS[case]()), workdir=str(work))
    except InvalidInput:
        assert not os.path.exists(child)
    else:
        with layer_flat_view(child) as root:
            if case == "absolute symlink dir, write through":
                assert open(os.path.join(root, "victim/hello"), "rb").read() == b"pwned"
            if case == "host /dev/null through symlink":
                assert os.path.isfile(os.path.join(root, "null")) and not os.path.islink(os.path.join(root, "null"))
    assert not os.path.exists("/victim") and not os.path.exists("/victim-abs")
    assert (os.stat("/dev/null").st_rdev, os.stat("/dev/null").st_mode) == (host_null.st_rdev, host_null.st_mode)
    assert os.listdir(work) == []


# --- tar bombs through the mount ---------------------------------------------------------------------
BOMBS = {       # name: (stream, what must be said, or None when the layer is applied)
    "50,000 entries": (lambda: hostile.many_entries(50_000), None),
    "100,000 whiteouts of nothing": (lambda: hostile.many_entries(100_000, "whiteouts"), None),
    "one name 50,000 times": (lambda: hostile.many_entries(50_000, "same"), None),
    "4096-deep directories": (lambda: hostile.deep_dirs(4096), "File name too long"),
    "names at the limits": (lambda: hostile.long_names(block_size=1024), None),   # the test store's blocks
    "a 256-byte name": (hostile.name_too_long, "File name too long"),
    "a 4096-byte symlink target": (hostile.target_too_long, "File name too long"),
    "a 5 KiB path": (hostile.path_too_long, "File name too long"),
    "a claimed 1 TiB sparse file": (hostile.sparse_claim, None),
    "a PAX record of 99,999,999,999 bytes": (hostile.pax_huge_record, "bad layer archive"),
    "a PAX header of 8 GiB": (hostile.pax_huge_header, "Special header too large"),
    "an 8 MiB PAX xattr value": (hostile.pax_huge_value, "Special header too large"),
    "a 64 KiB xattr value": (hostile.big_xattr, "does not fit an ext4 inode"),
    "a 1 GiB GNU long name": (hostile.gnu_huge_longname, "Special header too large"),
    "a file claiming 1 TiB, 1 MiB sent": (hostile.file_claiming_more, "Truncated tar archive"),
}


@pytest.fixture(scope="module")
def mnt(datastore, tmp_path_factory):  # noqa: F811
    with mounted_copy(datastore, tmp_path_factory.mktemp("hostile")) as m:
        yield m


def _peak_rss(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) << 10 for line in f if line.startswith("VmHWM:"))


@pytest.mark.parametrize("name", list(BOMBS))
def test_bomb_through_the_mount(mnt, name):
    make, refusal = BOMBS[name]
    pid = int(os.getxattr(mnt, "user.imagefs.pid"))
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")                                         # the peak RSS starts again from here
    new_id = "bomb-" + "".join(c if c.isalnum() else "-" for c in name)[:60]
    target = image_path(mnt, "base", "import", new_id)
    error = None
    try:
        with open(target, "wb") as f:
            for chunk in make():
                f.write(chunk)
    except OSError as err:
        error = err
    assert _peak_rss(pid) < RSS_LIMIT, f"the daemon's memory went to {_peak_rss(pid) >> 20} MiB"
    if refusal is None:
        assert error is None, open(f"{target}.error").read()
        assert os.path.isdir(image_path(mnt, new_id, "rootfs"))
    else:
        assert error is not None and error.errno in (22, 28, 5), error
        reason = open(f"{target}.error").read()
        assert reason.count("\n") == 1 and refusal in reason and len(reason) < 400, reason
        assert not os.path.exists(image_path(mnt, new_id))


def test_the_sparse_claim_is_a_sparse_file(mnt):
    path = image_path(mnt, "bomb-a-claimed-1-TiB-sparse-file", "rootfs", "huge-sparse")
    st = os.stat(path)
    assert st.st_size == 1 << 40 and st.st_blocks * 512 < 1 << 20
    with open(path, "rb") as f:
        f.seek((1 << 40) - 4096)
        assert f.read() == b"s" * 4096
