"""write_layer / writable_mount on real VMDKs with real qemu and ext4, read back by the kernel."""
import bz2
import glob
import gzip
import hashlib
import io
import lzma
import os
import re
import signal
import stat
import struct
import subprocess
import sys
import tarfile
import threading
import time

import pytest

from imagefs.errors import Exists, InvalidInput, NoSpace, NotFound, SumMismatch, ToolFailed
from imagefs.layer import fsmount
from imagefs.layer.writer import create_child_disk, resolve_method, writable_mount, write_layer

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (FUSE, loop mounts)")

NS = 1_700_000_000_000_000_007
CAP = struct.pack("<IIIII", 0x02000001, 1 << 10, 0, 0, 0)       # cap_net_bind_service=ep
BINARY = b"\x00\xff binary \x00"
EMPTY_SUM = "sha256:" + hashlib.sha256(b"").hexdigest()


@pytest.fixture(params=["kernel", "fuse2fs", "fuse2fs-deferred"])
def method(request, monkeypatch):
    """Each writer; "fuse2fs-deferred" forces the unprivileged debugfs pass while root."""
    if request.param == "fuse2fs-deferred":
        monkeypatch.setenv("IMAGEFS_DEFER_PRIVILEGED", "1")
        return "fuse2fs"
    monkeypatch.delenv("IMAGEFS_DEFER_PRIVILEGED", raising=False)
    return request.param


@pytest.fixture
def work(tmp_path):
    w = tmp_path / "work"
    w.mkdir()
    return str(w)


def child_of(tmp_path, name="child"):
    d = tmp_path / name
    d.mkdir(exist_ok=True)
    return str(d / f"{name}.vmdk")


def parent_hint(vmdk):
    with open(vmdk, "rb") as f:
        head = f.read(64 << 10)
    return re.search(rb'parentFileNameHint="([^"]*)"', head).group(1).decode()


def sha256(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def assert_nothing_left(work):
    """No work files, no mount, no qsd/fuse2fs process, no loop device from this work dir."""
    assert os.listdir(work) == []
    with open("/proc/self/mountinfo") as f:
        assert work not in f.read()
    for cmdline in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            with open(cmdline, "rb") as f:
                assert work.encode() not in f.read(), cmdline
        except (FileNotFoundError, ProcessLookupError):
            pass
    for backing in glob.glob("/sys/block/loop*/loop/backing_file"):
        with open(backing) as f:
            assert work not in f.read()


# --- a layer with every feature, made by GNU tar from a staged tree ---

def _stage(root):
    """A tree using every feature; returns the paths of whiteouts it carries."""
    def file(path, data=b"", mode=0o644, uid=0, gid=0, xattrs=None):
        p = os.path.join(root, path)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(data)
        os.chown(p, uid, gid)
        os.chmod(p, mode)
        for k, v in (xattrs or {}).items():
            os.setxattr(p, k, v)

    def mkdir(path, mode=0o755, uid=0, gid=0, xattrs=None):
        p = os.path.join(root, path)
        os.makedirs(p, exist_ok=True)
        os.chown(p, uid, gid)
        os.chmod(p, mode)
        for k, v in (xattrs or {}).items():
            os.setxattr(p, k, v)

    def node(path, kind, major, minor, mode, uid=0, gid=0):
        p = os.path.join(root, path)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        os.mknod(p, kind | mode, os.makedev(major, minor))
        os.chown(p, uid, gid)
        os.chmod(p, mode)

    os.chmod(root, 0o755)
    mkdir("bin")
    file("bin/su", b"setuid binary", 0o4755, xattrs={"security.capability": CAP, "user.bin": BINARY})
    os.link(os.path.join(root, "bin/su"), os.path.join(root, "bin/su-link"))
    file("bin/tool", b"setgid", 0o2711, 1000, 50)
    mkdir("data", 0o750, 1234, 4321, xattrs={"trusted.overlay.opaque": b"y", "user.dir": b"d"})
    file("data/plain", b"plain data", 0o640, 1234, 4321, xattrs={"user.k": b"v", "trusted.t": b"tv"})
    os.link(os.path.join(root, "data/plain"), os.path.join(root, "data/plain-hl1"))
    os.link(os.path.join(root, "data/plain"), os.path.join(root, "data/plain-hl2"))
    file("data/zero", b"", 0o000)
    file("data/big", os.urandom(3 << 20))
    with open(os.path.join(root, "data/sparse"), "wb") as f:
        f.write(b"start")
        f.seek(40 << 20)
        f.write(b"middle")
        f.truncate(64 << 20)
    mkdir("tmp", 0o1777)
    mkdir("secret", 0o700, 1000, 1000)
    file("secret/inside", b"s", 0o600, 1000, 1000)
    mkdir("ro", 0o555)
    file("ro/inside", b"r", 0o444)
    node("dev/null", stat.S_IFCHR, 1, 3, 0o666)
    node("dev/big", stat.S_IFCHR, 300, 70000, 0o600, 0, 6)
    node("dev/sda", stat.S_IFBLK, 8, 0, 0o660, 0, 6)
    os.mkfifo(os.path.join(root, "dev/fifo"), 0o620)
    os.chmod(os.path.join(root, "dev/fifo"), 0o620)
    mkdir("links")
    os.symlink("../data/plain", os.path.join(root, "links/rel"))
    os.symlink("/etc/hostname", os.path.join(root, "links/abs"))
    os.symlink("/nowhere", os.path.join(root, "links/dangling"))
    os.lchown(os.path.join(root, "links/dangling"), 77, 88)
    os.setxattr(os.path.join(root, "links/rel"), "trusted.sym", b"on a symlink", follow_symlinks=False)
    file("names/ünïcødé-名前", b"unicode")
    file("names/" + "n" * 255, b"long")
    file("f2d/child", b"f2d is a dir now")          # base: f2d is a file
    file("d2f", b"d2f is a file now")               # base: d2f is a dir
    file("lower/.wh.gone")
    file("lower/.wh.gonedir")
    file("opq/.wh..wh..opq")
    file("opq/new", b"new in opaque")
    # distinct nanosecond mtimes everywhere, directories last
    paths = [os.path.relpath(os.path.join(d, n), root)
             for d, dirs, files in os.walk(root) for n in dirs + files]
    for i, rel in enumerate(sorted(paths, key=lambda p: os.path.isdir(os.path.join(root, p))
                                   and not os.path.islink(os.path.join(root, p)))):
        os.utime(os.path.join(root, rel), ns=(NS + i, NS + 1000 * i), follow_symlinks=False)
    os.utime(root, ns=(NS, NS - 5))


@pytest.fixture(scope="module")
def rich_layer(tmp_path_factory):
    where = tmp_path_factory.mktemp("rich")
    stage = str(where / "stage")
    os.mkdir(stage)
    _stage(stage)
    tar = str(where / "layer.tar")
    subprocess.run(["tar", "--xattrs", "--xattrs-include=*", "-S", "--format=posix", "--sort=name",
                    "--numeric-owner", "-cpf", tar, "-C", stage, "."], check=True)
    listing = subprocess.run(["bsdtar", "-tf", tar], capture_output=True, check=True, text=True).stdout
    return stage, tar, len(listing.splitlines())


def _describe(path):
    st = os.lstat(path)
    d = {"fmt": stat.S_IFMT(st.st_mode), "mode": stat.S_IMODE(st.st_mode), "uid": st.st_uid,
         "gid": st.st_gid, "mtime": st.st_mtime_ns,
         "xattrs": {n: os.getxattr(path, n, follow_symlinks=False)
                    for n in os.listxattr(path, follow_symlinks=False)}}
    if stat.S_ISREG(st.st_mode):
        d["size"] = st.st_size
        with open(path, "rb") as f:
            d["sha"] = hashlib.sha256(f.read()).hexdigest()
    elif stat.S_ISLNK(st.st_mode):
        d["target"] = os.readlink(path)
    elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        d["rdev"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
    return d, st


def assert_tree_matches(stage, mounted):
    """Every staged path (whiteouts aside) is in the layer with the same metadata and
    content, and hardlink groups are the same."""
    groups_stage, groups_mounted = {}, {}
    for d, dirs, files in os.walk(stage):
        for n in [""] + dirs + files if d == stage else dirs + files:
            rel = os.path.relpath(os.path.join(d, n), stage)
            if n.startswith(".wh."):
                continue
            want, st_want = _describe(os.path.join(stage, rel))
            got, st_got = _describe(os.path.join(mounted, rel))
            assert got == want, rel
            if not stat.S_ISDIR(st_want.st_mode):
                groups_stage.setdefault(st_want.st_ino, set()).add(rel)
                groups_mounted.setdefault(st_got.st_ino, set()).add(rel)
                assert st_got.st_nlink == st_want.st_nlink, rel
    assert sorted(map(sorted, groups_stage.values())) == sorted(map(sorted, groups_mounted.values()))


def test_rich_layer(method, layer_base_disk, rich_layer, layer_flat_view, tmp_path, work):
    stage, tar, n_entries = rich_layer
    child = child_of(tmp_path)
    with open(tar, "rb") as f:
        data = f.read()
    with open(tar, "rb") as f:
        result = write_layer(layer_base_disk.vmdk, child, f, expected_sum=sha256(data),
                             method=method, workdir=work)
    assert (result.digest, result.size, result.entries) == (sha256(data), len(data), n_entries)
    assert_nothing_left(work)
    layer_base_disk.assert_unchanged()
    assert parent_hint(child) == os.path.relpath(layer_base_disk.vmdk, os.path.dirname(child))
    assert os.path.getsize(child) < 16 << 20          # the sparse 64 MiB file took no space
    with layer_flat_view(child) as root:
        assert_tree_matches(stage, root)
        assert os.lstat(os.path.join(root, "data/sparse")).st_blocks * 512 < 1 << 20
        assert sorted(os.listdir(os.path.join(root, "lower"))) == ["keep"]
        assert os.listdir(os.path.join(root, "opq")) == ["new"]
        assert os.listdir(os.path.join(root, "f2d")) == ["child"]
        for kept in ("etc/hostname", "etc/mtab", "lost+found", "usr/lib/liba", ".tether"):
            assert os.path.lexists(os.path.join(root, kept)), kept


def _tar(*members):
    """Tar bytes from (name, kind, payload) with kind file/dir/symlink/link."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, kind, payload in members:
            ti = tarfile.TarInfo(name)
            ti.mtime, ti.mode = 1_600_000_000, 0o755 if kind == "dir" else 0o644
            if kind == "file":
                ti.size = len(payload)
            else:
                ti.type = {"dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE, "link": tarfile.LNKTYPE}[kind]
                ti.linkname = payload or ""
            tf.addfile(ti, io.BytesIO(payload) if kind == "file" else None)
    return buf.getvalue()


def test_stacked_layers(method, layer_base_disk, layer_flat_view, tmp_path, work):
    """layer2 on layer1 on base: a 3-deep chain, with layer2 undoing parts of layer1."""
    one, two = child_of(tmp_path, "one"), child_of(tmp_path, "two")
    write_layer(layer_base_disk.vmdk, one, io.BytesIO(_tar(
        ("app/", "dir", None), ("app/a", "file", b"a1"), ("app/b", "file", b"b1"),
        ("app/sub/", "dir", None), ("app/sub/c", "file", b"c1"), ("app/x", "file", b"x1"),
    )), method=method, workdir=work)
    write_layer(one, two, io.BytesIO(_tar(
        ("app/new", "file", b"new2"),
        ("app/.wh..wh..opq", "file", b""),          # after a sibling of this layer: keeps app/new
        ("app/x/", "dir", None), ("app/x/in", "file", b"x is a dir now"),
        ("libx/viasymlink", "file", b"lands in usr/lib"),
        ("up", "symlink", "../../../.."), ("up/escaped", "file", b"clamped to the root"),
        ("hl", "link", "app/new"),
    )), method=method, workdir=work)
    assert_nothing_left(work)
    with layer_flat_view(two) as root:
        assert sorted(os.listdir(os.path.join(root, "app"))) == ["new", "x"]
        assert os.listdir(os.path.join(root, "app/x")) == ["in"]
        with open(os.path.join(root, "usr/lib/viasymlink"), "rb") as f:
            assert f.read() == b"lands in usr/lib"
        assert os.path.islink(os.path.join(root, "libx"))
        assert os.path.isfile(os.path.join(root, "escaped"))
        assert os.lstat(os.path.join(root, "hl")).st_ino == os.lstat(os.path.join(root, "app/new")).st_ino
    with layer_flat_view(one) as root:                   # layer1 itself is untouched
        assert sorted(os.listdir(os.path.join(root, "app"))) == ["a", "b", "sub", "x"]
    layer_base_disk.assert_unchanged()


def test_hardlinks_to_devices_and_setuid_files(method, layer_base_disk, layer_flat_view, tmp_path, work):
    """GNU tar never writes these; in deferred mode they are debugfs `ln` + links_count."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        dev = tarfile.TarInfo("dev/console")
        dev.type, dev.devmajor, dev.devminor, dev.mode, dev.uid = tarfile.CHRTYPE, 5, 1, 0o620, 0
        tf.addfile(dev)
        suid = tarfile.TarInfo("bin/ping")
        suid.size, suid.mode = 4, 0o4755
        tf.addfile(suid, io.BytesIO(b"ping"))
        for name, target in (("dev/console2", "dev/console"), ("dev/console3", "dev/console2"),
                             ("bin/ping2", "bin/ping"), ("lib/ping3", "bin/ping2")):
            link = tarfile.TarInfo(name)
            link.type, link.linkname = tarfile.LNKTYPE, target
            tf.addfile(link)
    child = child_of(tmp_path)
    write_layer(layer_base_disk.vmdk, child, io.BytesIO(buf.getvalue()), method=method, workdir=work)
    with layer_flat_view(child) as root:
        for group in (("dev/console", "dev/console2", "dev/console3"), ("bin/ping", "bin/ping2", "lib/ping3")):
            stats = [os.lstat(os.path.join(root, p)) for p in group]
            assert {(s.st_ino, s.st_nlink) for s in stats} == {(stats[0].st_ino, 3)}, group
        st = os.lstat(os.path.join(root, "dev/console"))
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(5, 1) and stat.S_IMODE(st.st_mode) == 0o620
        assert stat.S_IMODE(os.lstat(os.path.join(root, "bin/ping")).st_mode) == 0o4755


# --- failures unwind everything ---

class _InterruptingStream(io.RawIOBase):
    def __init__(self, data):
        self._data, self._pos = data, 0

    def readable(self):
        return True

    def readinto(self, buf):
        if self._pos > len(self._data) // 2:
            raise KeyboardInterrupt
        n = min(len(buf), 8192)
        buf[:n] = self._data[self._pos:self._pos + n]
        self._pos += n
        return n


def _some_files():
    return _tar(*[(f"f{i}", "file", os.urandom(50000)) for i in range(40)])


@pytest.mark.parametrize("method", ["kernel", "fuse2fs"])
@pytest.mark.parametrize("failure", ["sum-mismatch", "truncated", "corrupt-gzip", "interrupt", "unsafe"])
def test_failure_leaves_nothing(method, failure, layer_base_disk, tmp_path, work):
    data = _some_files()
    stream, expected, error = io.BytesIO(data), None, InvalidInput
    if failure == "sum-mismatch":
        expected, error = "sha256:" + "0" * 64, SumMismatch
    elif failure == "truncated":
        stream = io.BytesIO(data[:len(data) // 2])
    elif failure == "corrupt-gzip":
        z = bytearray(gzip.compress(data))
        z[len(z) // 2:len(z) // 2 + 100] = bytes(100)
        stream = io.BytesIO(bytes(z))
    elif failure == "interrupt":
        stream, error = _InterruptingStream(data), KeyboardInterrupt
    elif failure == "unsafe":
        stream = io.BytesIO(_tar(("ok", "file", b"1"), ("../escape", "file", b"2")))
    child = child_of(tmp_path)
    with pytest.raises(error) as info:
        write_layer(layer_base_disk.vmdk, child, stream, expected_sum=expected, method=method, workdir=work)
    if failure == "sum-mismatch":
        assert str(info.value) == (f"Failed to validate image checksum. Expected {expected}, got {sha256(data)}")
    assert not os.path.exists(child)
    assert_nothing_left(work)
    layer_base_disk.assert_unchanged()


_INTERRUPTED_WRITER = """
import io, os, sys, time
from imagefs.layer import qsd
from imagefs.layer.writer import write_layer

stop = qsd.StorageDaemon.stop
def slow_stop(self):            # the unwinding waits until the test's second Ctrl-C has landed in it
    if not os.path.exists(sent):
        print("unwinding", flush=True)
        deadline = time.monotonic() + 30
        while not os.path.exists(sent) and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)         # the handler runs at the next bytecode after delivery
    stop(self)
qsd.StorageDaemon.stop = slow_stop

class Slow(io.RawIOBase):
    def __init__(self, data):
        self.data, self.pos = data, 0
    def readable(self):
        return True
    def readinto(self, buf):
        if self.pos == 0:
            print("started", flush=True)
        time.sleep(0.005)
        n = min(len(buf), 65536, len(self.data) - self.pos)
        buf[:n] = self.data[self.pos:self.pos + n]
        self.pos += n
        return n

parent, child, tar, method, work, sent = sys.argv[1:]
try:
    write_layer(parent, child, Slow(open(tar, "rb").read()), method=method, workdir=work)
except KeyboardInterrupt:
    print("interrupted", flush=True)
"""


@pytest.mark.parametrize("method", ["kernel", "fuse2fs"])
def test_ctrl_c_leaves_nothing(method, layer_base_disk, tmp_path, work):
    """SIGINT to the whole process group, twice: once while applying, once while unwinding
    (the second sent when the writer says it is stopping its disk tool, whatever the load)."""
    tar = tmp_path / "layer.tar"
    tar.write_bytes(_some_files())
    child = child_of(tmp_path)
    sent = tmp_path / "second-sigint-sent"
    proc = subprocess.Popen([sys.executable, "-c", _INTERRUPTED_WRITER, layer_base_disk.vmdk, child, str(tar),
                             method, work, str(sent)], stdout=subprocess.PIPE, text=True, start_new_session=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.stdout.readline().strip() == "started"
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.stdout.readline().strip() == "unwinding"
    os.killpg(proc.pid, signal.SIGINT)
    sent.touch()
    out, _ = proc.communicate(timeout=60)
    assert (proc.returncode, out.strip()) == (0, "interrupted")
    assert not os.path.exists(child)
    assert_nothing_left(work)


@pytest.mark.parametrize("method", ["kernel", "fuse2fs"])
def test_no_space(method, layer_small_base_disk, tmp_path, work):
    big = gzip.compress(_tar(("big", "file", bytes(40 << 20))))      # 40 MiB onto a 16 MiB disk
    child = child_of(tmp_path)
    with pytest.raises(NoSpace, match="'big'"):
        write_layer(layer_small_base_disk.vmdk, child, io.BytesIO(big), method=method, workdir=work)
    assert not os.path.exists(child)
    assert_nothing_left(work)


@pytest.mark.parametrize("bad", ["sha256:abc", "sha256:" + "A" * 64, "md5:" + "0" * 64, ""])
def test_bad_sum_format_creates_nothing(bad, layer_base_disk, tmp_path, work):
    child = child_of(tmp_path)
    with pytest.raises(InvalidInput, match="invalid expected sum"):
        write_layer(layer_base_disk.vmdk, child, io.BytesIO(b""), expected_sum=bad, workdir=work)
    assert not os.path.exists(child)


# --- inputs ---

def _zstd(data):
    return subprocess.run(["zstd", "-q", "-c"], input=data, capture_output=True, check=True).stdout


@pytest.mark.parametrize("compress", [gzip.compress, bz2.compress, lzma.compress, _zstd],
                         ids=["gzip", "bzip2", "xz", "zstd"])
def test_compressed_layers(compress, layer_base_disk, layer_flat_view, tmp_path, work):
    tar = _tar(("z/", "dir", None), ("z/data", "file", b"compressible " * 10000))
    blob = compress(tar)
    child = child_of(tmp_path)
    seen = []
    result = write_layer(layer_base_disk.vmdk, child, io.BytesIO(blob), expected_sum=sha256(blob),
                         workdir=work, progress=seen.append)
    assert (result.digest, result.size, result.entries) == (sha256(blob), len(blob), 2)
    assert seen and seen[-1] == len(blob)
    with layer_flat_view(child) as root:
        with open(os.path.join(root, "z/data"), "rb") as f:
            assert f.read() == b"compressible " * 10000


def test_bytes_after_the_tar_are_hashed(layer_base_disk, tmp_path, work):
    blob = _tar(("f", "file", b"x")) + b"\0" * 10240 + b"trailing garbage"
    result = write_layer(layer_base_disk.vmdk, child_of(tmp_path), io.BytesIO(blob),
                         expected_sum=sha256(blob), workdir=work)
    assert result.size == len(blob)


def test_empty_layer(layer_base_disk, layer_flat_view, tmp_path, work):
    child = child_of(tmp_path)
    result = write_layer(layer_base_disk.vmdk, child, io.BytesIO(b""), expected_sum=EMPTY_SUM, workdir=work)
    assert (result.digest, result.size, result.entries) == (EMPTY_SUM, 0, 0)
    with layer_flat_view(child) as root:
        assert os.path.isfile(os.path.join(root, "etc/hostname"))


def test_concurrent_writes_to_one_parent(layer_base_disk, layer_flat_view, tmp_path, work):
    jobs = [("k1", "kernel"), ("k2", "kernel"), ("f1", "fuse2fs"), ("f2", "fuse2fs")]
    errors, children = [], {}

    def job(name, method):
        try:
            children[name] = child_of(tmp_path, name)
            write_layer(layer_base_disk.vmdk, children[name],
                        io.BytesIO(_tar(("who", "file", name.encode()), *[(f"{name}/{i}", "file", os.urandom(30000))
                                                                           for i in range(50)])),
                        method=method, workdir=work)
        except BaseException as e:          # noqa: B902 - reported below
            errors.append(e)

    threads = [threading.Thread(target=job, args=j) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for name, child in children.items():
        with layer_flat_view(child) as root:
            with open(os.path.join(root, "who"), "rb") as f:
                assert f.read() == name.encode()
            assert len(os.listdir(os.path.join(root, name))) == 50
    assert_nothing_left(work)
    layer_base_disk.assert_unchanged()


# --- writable_mount, disks, methods ---

@pytest.mark.parametrize("method", ["kernel", "fuse2fs"])
def test_writable_mount(method, layer_base_disk, layer_flat_view, tmp_path, work):
    child = child_of(tmp_path)
    create_child_disk(layer_base_disk.vmdk, child)
    with writable_mount(child, method=method, workdir=work) as layer:
        with open(os.path.join(layer.root, "written"), "wb") as f:
            f.write(b"by hand")
        assert layer.deferred is None
    assert_nothing_left(work)
    with layer_flat_view(child) as root:
        with open(os.path.join(root, "written"), "rb") as f:
            assert f.read() == b"by hand"
    with pytest.raises(RuntimeError):
        with writable_mount(child, method=method, workdir=work):
            raise RuntimeError("boom")
    assert_nothing_left(work)
    assert os.path.exists(child)                        # writable_mount never deletes the disk


@pytest.mark.parametrize("method", ["kernel", "fuse2fs"])
def test_busy_mount_is_still_cleaned_up(method, layer_base_disk, tmp_path, work, monkeypatch):
    """Something else keeps the layer busy at unmount for longer than the retries: a clear
    error, and nothing left."""
    monkeypatch.setattr(fsmount, "BUSY_RETRY_SECONDS", 0.5)
    child = child_of(tmp_path)
    create_child_disk(layer_base_disk.vmdk, child)
    with pytest.raises(ToolFailed, match="busy"):
        with writable_mount(child, method=method, workdir=work) as layer:
            holder = subprocess.Popen(["sleep", "3"], cwd=layer.root)
    holder.wait()
    assert_nothing_left(work)


@pytest.mark.parametrize("method", ["kernel", "fuse2fs"])
def test_briefly_busy_mount_is_unmounted_after_a_retry(method, layer_base_disk, tmp_path, work):
    """A moment of "busy" (another thread's fork holding a descriptor) is waited out."""
    child = child_of(tmp_path)
    create_child_disk(layer_base_disk.vmdk, child)
    with writable_mount(child, method=method, workdir=work) as layer:
        holder = subprocess.Popen(["sleep", "0.5"], cwd=layer.root)
    holder.wait()
    assert_nothing_left(work)
    subprocess.run(["qemu-img", "check", "-q", child], check=True)


def test_not_a_vmdk_reports_qsd_error(tmp_path, work):
    bogus = tmp_path / "bogus.vmdk"
    bogus.write_bytes(b"not a vmdk at all\n" * 100)
    with pytest.raises(ToolFailed, match="qemu-storage-daemon could not export .*: .*vmdk"):
        with writable_mount(str(bogus), method="kernel", workdir=work):
            pass
    assert_nothing_left(work)


@pytest.mark.parametrize("method", ["kernel", "fuse2fs"])
def test_disk_without_ext4_fails_to_mount(method, tmp_path, work):
    blank = str(tmp_path / "blank.vmdk")
    subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", blank, "64M"], check=True)
    with pytest.raises(ToolFailed, match="mount|fuse2fs"):
        with writable_mount(blank, method=method, workdir=work):
            pass
    assert_nothing_left(work)


def test_create_child_disk(layer_base_disk, tmp_path):
    child = child_of(tmp_path)
    create_child_disk(layer_base_disk.vmdk, child)
    hint = parent_hint(child)
    assert not hint.startswith("/") and hint.endswith("/base/base.vmdk")
    assert os.path.samefile(os.path.join(os.path.dirname(child), hint), layer_base_disk.vmdk)
    with pytest.raises(Exists):
        create_child_disk(layer_base_disk.vmdk, child)
    with pytest.raises(NotFound):
        create_child_disk(str(tmp_path / "nope.vmdk"), child_of(tmp_path, "other"))


def test_resolve_method(monkeypatch):
    monkeypatch.delenv("IMAGEFS_WRITER", raising=False)
    assert resolve_method(None) == "kernel"             # root
    assert resolve_method("fuse2fs") == "fuse2fs"
    monkeypatch.setenv("IMAGEFS_WRITER", "fuse2fs")
    assert resolve_method(None) == "fuse2fs"
    assert resolve_method("auto") == "kernel"
    with pytest.raises(InvalidInput, match="unknown layer writer"):
        resolve_method("loop")
