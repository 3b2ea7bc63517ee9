"""Item 11 of issue 7: what an attack pass on an allow_other mount, acting as uid 1000, found.

Each test failed before its fix."""
import errno
import io
import os
import subprocess
import sys
import tarfile
import time

import pytest

from access_fixtures import (ADMIN_GID, SECRET_META, SPARSE_SIZE, STORE, access_datastore,  # noqa: F401
                             path, public_dir, public_module_dir, try_as_user)
from fuse_fixtures import mount_cmd, mounted, unmount, wait_for
from helpers import make_tar

from imagefs.datastore import open_datastore
from imagefs.errors import ImageFSError, InvalidInput
from imagefs.export import export_diff
from imagefs.export.filterspec import FilterSpec, parse_filter_text
from imagefs.fuse.options import parse_options
from imagefs.store import ImageStore

IMAGEFS = [sys.executable, "-m", "imagefs"]


@pytest.fixture(scope="module")
def mnt(access_datastore, public_module_dir):  # noqa: F811
    with mounted(access_datastore, os.path.join(public_module_dir, "mnt"),
                 options=("allow_other", "max_exports=6", "max_exports_per_user=3")) as m:
        yield m


@pytest.fixture(scope="module")
def store(access_datastore):  # noqa: F811
    return ImageStore(open_datastore(access_datastore))


def daemon_status(mnt, field):
    pid = int(os.getxattr(mnt, "user.imagefs.pid"))
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def errno_of(fn, *args):
    try:
        fn(*args)
    except OSError as e:
        return e.errno
    return None


# --- skipping forward in an export ----------------------------------------------------------
def test_a_far_pread_of_an_export_does_not_buffer_what_it_skips(mnt):
    before = daemon_status(mnt, "VmHWM")           # kB: the daemon's peak resident size so far
    fd = os.open(path(mnt, "sparse", "export", "scratch.tar"), os.O_RDONLY)
    try:
        at = SPARSE_SIZE - (1 << 20)                # inside the sparse file's body, 3 GiB in
        assert os.pread(fd, 1, at) == b"\0"
        assert os.pread(fd, 16, at - 4096) == bytes(16)      # a short look back still works
    finally:
        os.close(fd)
    grown_mb = (daemon_status(mnt, "VmHWM") - before) / 1024
    assert grown_mb < 100, f"the daemon's peak grew by {grown_mb:.0f} MB"


# --- how many exports may be open -----------------------------------------------------------
def test_open_exports_are_bounded_per_user(mnt):
    name = path(mnt, "sec", "export", "scratch.tar")
    mine = [open(name, "rb") for _ in range(3)]     # max_exports_per_user=3
    try:
        assert errno_of(open, name, "rb") == errno.EMFILE
        mine[0].close()
        mine[0] = open(name, "rb")                  # a closed one makes room again
        assert mine[0].read(512)
    finally:
        for f in mine:
            f.close()


def test_the_mount_total_of_open_exports_holds_across_users(access_datastore, public_dir):  # noqa: F811
    with mounted(access_datastore, os.path.join(public_dir, "mnt"), options=(
            "allow_other", f"admin_group={ADMIN_GID}", "max_exports=4", "max_exports_per_user=3")) as m:
        name = path(m, "sec", "export", "scratch.tar")
        mine = [open(name, "rb") for _ in range(3)]
        try:
            res = try_as_user([("open", name, os.O_RDONLY)] * 2, groups=[ADMIN_GID])
            assert res[0][0] == "ok" and res[1] == ["EMFILE"]          # 3 + 1 = max_exports
        finally:
            for f in mine:
                f.close()


def test_exports_cost_a_few_mib_each(mnt):
    before = daemon_status(mnt, "VmRSS")
    files = [open(path(mnt, "sparse", "export", "scratch.tar"), "rb") for _ in range(3)]
    try:
        for f in files:
            f.read(4096)                             # producers start and fill their queues
        time.sleep(1)
        grown_mb = (daemon_status(mnt, "VmRSS") - before) / 1024
        assert grown_mb < 3 * 8, f"3 open exports grew the daemon by {grown_mb:.0f} MB"
    finally:
        for f in files:
            f.close()


# --- exports and other generated files do not bypass the modes of an image ----------------
def test_a_user_reads_in_rootfs_what_the_modes_allow_and_no_export(mnt, tmp_path):
    # a failed import leaves a .error report
    with pytest.raises(OSError):
        with open(path(mnt, "sec", "import", "broken"), "wb") as f:
            f.write(b"not a tar" * 100)
    assert os.path.exists(path(mnt, "sec", "import", "broken.error"))
    calls = [("read", path(mnt, "sec", "rootfs", "pub")),
             ("read", path(mnt, "sec", "rootfs", "mine")),
             ("read", path(mnt, "sec", "rootfs", "secret")),
             ("read", path(mnt, "sec", "rootfs", "closed", "inside")),
             ("read", path(mnt, "sec", "export", "scratch.tar")),
             ("read", path(mnt, "sec", "export", "scratch,include=secret.tar")),
             ("read", path(mnt, "sec", "meta", "config")),
             ("read", path(mnt, "sec", "info.json")),
             ("read", path(mnt, "sec", "import", "broken.error"))]
    res = try_as_user(calls)
    assert res[0] == ["ok", "public\n"] and res[1] == ["ok", "for 1000\n"]
    assert [r[0] for r in res[2:]] == ["EACCES"] * 7
    # the owner reads them all
    with open(path(mnt, "sec", "meta", "config"), "rb") as f:
        assert f.read() == SECRET_META
    os.unlink(path(mnt, "sec", "import", "broken.error"))


def test_listxattr_shows_only_names_the_caller_could_read(mnt):
    pub, secret = path(mnt, "sec", "rootfs", "pub"), path(mnt, "sec", "rootfs", "secret")
    res = try_as_user([("listxattr", pub), ("listxattr", secret), ("getxattr", pub, "trusted.t")])
    assert res[0] == ["ok", ["user.pub"]]
    assert res[1] == ["ok", []]
    assert res[2] == ["ENODATA"]
    assert sorted(os.listxattr(pub)) == ["trusted.t", "user.pub"]       # root sees all
    assert os.listxattr(secret) == ["user.hidden"]


# --- names that escape on extraction --------------------------------------------------------
@pytest.mark.parametrize("option", ["rebase=..%00", "rebase=..%00%2Fx", "strip=a%00", "rebase=a%0Ab",
                                    "include=x%7F", "exclude=%1B"])
def test_control_characters_in_export_options_are_refused(mnt, option):
    assert errno_of(os.stat, path(mnt, "sec", "export", f"scratch,{option}.tar")) == errno.EINVAL
    with pytest.raises(InvalidInput, match="control character"):
        parse_filter_text(option)


def test_a_strip_collision_fails_the_export_instead_of_writing_through_a_symlink(mnt, store):
    # a/x is a symlink out; strip=a makes it x, and x/pwned (its directory left out) would follow it
    spec = FilterSpec(strip="a", exclusions={"x"}, inclusions={"x/pwned"})
    with pytest.raises(InvalidInput, match="below the non-directory 'x'"):
        b"".join(export_diff(store.tree(STORE, "strip"), None, spec=spec))
    with pytest.raises(OSError) as e:
        with open(path(mnt, "strip", "export", "scratch,strip=a,exclude=x,include=x%2Fpwned.tar"), "rb") as f:
            f.read()
    assert e.value.errno == errno.EIO


def test_duplicate_names_from_a_strip_are_refused(mnt, store):
    with pytest.raises(InvalidInput, match="two entries 'x'"):
        b"".join(export_diff(store.tree(STORE, "strip"), None, spec=FilterSpec(strip="a")))
    assert errno_of(lambda: open(path(mnt, "strip", "export", "scratch,strip=a.tar"), "rb").read()) == errno.EIO


# --- background mounts and relative paths ---------------------------------------------------
def test_relative_paths_of_a_background_mount_are_the_callers(tmp_path):
    work = tmp_path / "cwd"
    (work / "mnt").mkdir(parents=True)
    (work / "rel-ds").mkdir()
    (work / "relwork").mkdir()
    assert not os.path.exists("/rel-ds")
    proc = subprocess.run(IMAGEFS + ["mount", "rel-ds", "mnt", "-o", "log=rel.log,workdir=relwork"],
                          cwd=work, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(__file__))})
    try:
        assert proc.returncode == 0, proc.stderr
        assert os.getxattr(work / "mnt", "user.imagefs.datastore") == str(work / "rel-ds").encode()
        assert (work / "rel-ds" / "VIC").is_dir()
        assert wait_for(lambda: (work / "rel.log").exists())
        assert not os.path.exists("/rel-ds") and not os.path.exists("/rel.log")
    finally:
        unmount(work / "mnt")
    before = os.getcwd()
    os.chdir(work)
    try:
        assert parse_options(["workdir=relwork"]).workdir == str(work / "relwork")
    finally:
        os.chdir(before)


# --- force-delete belongs to one store, and a used store is not deleted -------------------
def cli(ds, *args):
    return subprocess.run(IMAGEFS + ["--datastore", ds, *args], capture_output=True, text=True)


def test_force_delete_does_not_survive_the_store(tmp_path):
    ds = str(tmp_path / "ds")
    assert cli(ds, "store", "create", "fd", "--capacity", "64MiB").returncode == 0
    with mounted(ds, tmp_path / "mnt") as m:
        os.setxattr(os.path.join(m, "fd"), "user.imagefs.force-delete", b"1")
        assert cli(ds, "store", "rm", "fd").returncode == 0
        assert cli(ds, "store", "create", "fd", "--capacity", "64MiB").returncode == 0
        tar = tmp_path / "l.tar"
        tar.write_bytes(make_tar([("f", "file", {"data": b"new"})]))
        assert cli(ds, "image", "write", "fd", "scratch", "newimg", str(tar)).returncode == 0
        assert wait_for(lambda: "fd" in os.listdir(m))
        assert "user.imagefs.force-delete" not in os.listxattr(os.path.join(m, "fd"))
        assert errno_of(os.rmdir, os.path.join(m, "fd")) == errno.ENOTEMPTY
    assert cli(ds, "image", "ls", "fd", "-q").stdout.split() == ["newimg", "scratch"]


def store_with_image(tmp_path, store, image):
    """A datastore made by the CLI holding ``store`` with one image ``image`` (one file f)."""
    ds = str(tmp_path / "ds")
    assert cli(ds, "store", "create", store, "--capacity", "64MiB").returncode == 0
    tar = tmp_path / "l.tar"
    tar.write_bytes(make_tar([("f", "file", {"data": b"data"})]))
    assert cli(ds, "image", "write", store, "scratch", image, str(tar)).returncode == 0
    return ds, tar


def test_force_delete_waits_for_open_files_and_pending_imports(tmp_path):
    ds, _ = store_with_image(tmp_path, "busy", "img")
    with mounted(ds, tmp_path / "mnt") as m:
        store = os.path.join(m, "busy")
        os.setxattr(store, "user.imagefs.force-delete", b"1")
        with open(os.path.join(store, "images", "img", "rootfs", "f"), "rb"):
            assert errno_of(os.rmdir, store) == errno.EBUSY
        with open(os.path.join(store, "images", "img", "export", "scratch.tar"), "rb") as f:
            f.read(10)
            assert errno_of(os.rmdir, store) == errno.EBUSY
        pending = os.path.join(store, "images", "img", "import", "next")
        open(pending, "ab").close()
        assert errno_of(os.rmdir, store) == errno.EBUSY
        os.unlink(pending)
        os.rmdir(store)
        assert not os.path.exists(store)


# --- names looked up do not pile up ---------------------------------------------------------
def test_export_names_looked_up_do_not_grow_the_daemon_forever(mnt):
    export = path(mnt, "sec", "export")

    def stat_many(start, n):
        for i in range(start, start + n):
            os.stat(os.path.join(export, f"scratch,include=n{i}.tar"))

    stat_many(0, 3000)                                  # warm up: caches, thread pool, allocator
    before = daemon_status(mnt, "VmRSS")
    stat_many(3000, 12000)
    grown_kb = daemon_status(mnt, "VmRSS") - before
    assert grown_kb < 2048, f"12,000 export names grew the daemon by {grown_kb} kB"   # it kept them: ~4 MB


# --- xattr names that are not UTF-8 ---------------------------------------------------------
def test_an_xattr_name_that_is_not_utf8_exports_and_imports_again(mnt, store, tmp_path):
    assert store.tree(STORE, "nonutf8").xattrs(store.tree(STORE, "nonutf8").resolve("f")) == \
        {b"user.\xff\xfename": b"value"}
    with open(path(mnt, "nonutf8", "export", "scratch.tar"), "rb") as f:
        data = f.read()
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        assert tf.getmember("f").pax_headers["LIBARCHIVE.xattr.user.%FF%FEname"] == "dmFsdWU="
    st = ImageStore(open_datastore(str(tmp_path / "ds")))
    st.create_store("t", capacity="64MiB")
    st.write_image("t", "scratch", "again", io.BytesIO(data))
    tree = st.tree("t", "again")
    assert tree.xattrs(tree.resolve("f")) == {b"user.\xff\xfename": b"value"}


def test_the_fuse2fs_writer_takes_a_carriage_return_in_a_name(tmp_path, monkeypatch):
    monkeypatch.setenv("IMAGEFS_DEFER_PRIVILEGED", "1")   # the debugfs pass an unprivileged writer needs
    st = ImageStore(open_datastore(str(tmp_path / "ds")), writer_method="fuse2fs")
    st.create_store("t", capacity="64MiB")
    tar = make_tar([("d\r", "dir", {}), ("d\r/null\r", "chr", {"major": 1, "minor": 3, "mode": 0o666}),
                    ("t\rx", "file", {"data": b"x", "xattrs": {"trusted.a": "v"}}),
                    ("h\r", "link", {"target": "t\rx"})])
    st.write_image("t", "scratch", "cr", io.BytesIO(tar))
    tree = st.tree("t", "cr")
    dev = tree.stat(tree.resolve(b"d\r/null\r"))
    assert (dev.rdev, dev.mode & 0o7777) == (os.makedev(1, 3), 0o666)
    assert tree.xattrs(tree.resolve(b"t\rx")) == {b"trusted.a": b"v"}
    assert tree.resolve(b"h\r") == tree.resolve(b"t\rx") and tree.stat(tree.resolve(b"h\r")).nlink == 2
    assert b".imagefs-node-0" not in dict(tree.readdir(2))


# --- a datastore whose entries were replaced by symlinks ------------------------------------
def test_delete_and_lock_do_not_follow_symlinks_out_of_the_datastore(tmp_path):
    ds, tar = store_with_image(tmp_path, "s", "victim")
    outside = tmp_path / "outside"
    image_dir = os.path.join(ds, "VIC", "s", "images", "victim")
    os.rename(image_dir, outside)
    os.symlink(outside, image_dir)
    proc = cli(ds, "image", "rm", "s", "victim")
    *warnings, error = proc.stderr.splitlines()     # the store's clean-up warns that it leaves the link alone
    assert proc.returncode == 1 and "symbolic link" in error
    assert all("WARNING" in w and "left alone" in w for w in warnings)
    assert sorted(os.listdir(outside)) == ["imageMetadata", "manifest", "victim.vmdk"]

    lock = os.path.join(ds, "VIC", "s", ".lock")
    if os.path.lexists(lock):
        os.unlink(lock)
    os.symlink(tmp_path / "created-outside", lock)
    proc = cli(ds, "image", "write", "s", "scratch", "other", str(tar))
    assert proc.returncode == 1 and "symbolic link" in proc.stderr
    assert not os.path.lexists(tmp_path / "created-outside")


def test_local_paths_never_leave_the_datastore(tmp_path):
    ds = open_datastore(str(tmp_path / "ds"))
    with pytest.raises(ImageFSError, match="outside the datastore"):
        ds.local_path("VIC/../../etc/passwd")


# --- small ones -----------------------------------------------------------------------------
@pytest.mark.parametrize("size", ["nan", "inf", "-1", "1e30GB"])
def test_bad_capacities_are_one_line(tmp_path, size):
    proc = cli(str(tmp_path / "ds"), "store", "create", "x", "--capacity", size)
    assert proc.returncode != 0 and proc.stderr.startswith("imagefs: invalid size")
    assert len(proc.stderr.splitlines()) == 1
    with pytest.raises(InvalidInput):
        parse_options([f"scratch_size={size}"])


def test_suid_or_dev_with_allow_other_warns(tmp_path, access_datastore):  # noqa: F811
    assert parse_options(["allow_other", "suid"]).warnings
    assert parse_options(["allow_other", "dev"]).warnings
    assert not parse_options(["suid", "dev"]).warnings and not parse_options(["allow_other"]).warnings
    (tmp_path / "mnt").mkdir()
    proc = subprocess.run(mount_cmd(access_datastore, tmp_path / "mnt", ["allow_other", "suid"]),
                          capture_output=True, text=True)
    try:
        assert proc.returncode == 0 and "warning: suid with allow_other" in proc.stderr
    finally:
        unmount(tmp_path / "mnt")
