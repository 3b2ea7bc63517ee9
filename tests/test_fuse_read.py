"""Reading images through the mount, against the kernel's own ext4 driver as the oracle.

The oracle is the same chain flattened by qemu-img and loop-mounted read-only by the
kernel. Everything lstat, readlink and the xattr calls show must be identical, and so
must ``ls -lR``, ``find -printf`` and ``getfattr`` output, and a ``cp -a`` copied out.
"""
import errno
import json
import os
import stat
import subprocess

import pytest

from helpers import flattened_mount

from fuse_fixtures import datastore, dump, image_path, mounted, vmdk_path  # noqa: F401 (fixture)

IMAGES = ["scratch", "base", "child", "idl"]


@pytest.fixture(scope="module")
def mnt(datastore, tmp_path_factory):  # noqa: F811
    with mounted(datastore, tmp_path_factory.mktemp("read") / "mnt") as m:
        yield m


@pytest.fixture(scope="module")
def oracles(datastore):  # noqa: F811
    """image -> the kernel's read-only mount of its flattened chain."""
    stack, out = [], {}
    try:
        for image in IMAGES:
            cm = flattened_mount(vmdk_path(datastore, image))
            out[image] = cm.__enter__()
            stack.append(cm)
        yield out
    finally:
        for cm in reversed(stack):
            cm.__exit__(None, None, None)


def sh(cmd, cwd=None):
    return subprocess.run(["bash", "-c", cmd], cwd=cwd, check=True, capture_output=True).stdout


@pytest.mark.parametrize("image", IMAGES)
def test_tree_matches_kernel_ext4(mnt, oracles, image):
    ours = dump(image_path(mnt, image, "rootfs"))
    theirs = dump(oracles[image])
    assert ours.keys() == theirs.keys()
    assert [p for p in ours if ours[p] != theirs[p]] == []


@pytest.mark.parametrize("image", ["base", "child"])
def test_ls_find_getfattr_output_match_kernel(mnt, oracles, image):
    ours, theirs = image_path(mnt, image, "rootfs"), oracles[image]
    for cmd in ("ls -lRAn --time-style=full-iso .",
                "find . -printf '%p %M %n %U %G %s %b %A@ %T@ %C@ %l\\n' | sort",
                "getfattr -R -h -d -m - -e hex . | awk 'BEGIN{RS=\"\"} {print}' | sort"):
        assert sh(cmd, cwd=ours) == sh(cmd, cwd=theirs), cmd


def test_cp_a_copies_out_what_the_kernel_copies(mnt, oracles, tmp_path):
    subprocess.run(["cp", "-a", image_path(mnt, "child", "rootfs"), tmp_path / "ours"], check=True)
    subprocess.run(["cp", "-a", oracles["child"], tmp_path / "theirs"], check=True)
    # cp cannot find the holes through FUSE (no SEEK_HOLE), so block counts may differ
    assert dump(tmp_path / "ours", times=False, blocks=False) == dump(tmp_path / "theirs", times=False, blocks=False)


def test_file_kinds(mnt):
    root = image_path(mnt, "base", "rootfs")
    assert os.stat(f"{root}/files/small").st_mtime_ns % 10**9 == 123456789
    assert os.stat(f"{root}/files/small").st_ino == os.stat(f"{root}/files/hardlink").st_ino
    assert os.stat(f"{root}/files/small").st_nlink == 2
    assert os.readlink(f"{root}/links/rel") == "../files/small"
    assert open(f"{root}/links/rel", "rb").read() == b"hello\n"
    assert os.readlink(f"{root}/links/slow") == "x" * 200
    st = os.lstat(f"{root}/dev/big")
    assert stat.S_ISCHR(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == (300, 70000)
    assert stat.S_ISBLK(os.lstat(f"{root}/dev/sda").st_mode)
    assert stat.S_ISFIFO(os.lstat(f"{root}/fifo").st_mode)
    sparse = os.stat(f"{root}/files/sparse")
    assert sparse.st_size == 50 << 20 and sparse.st_blocks * 512 < 1 << 20
    with open(f"{root}/files/sparse", "rb") as f:
        assert f.read(4) == b"head"
        f.seek(10 << 20)
        assert f.read(6) == b"middle"
        f.seek(30 << 20)
        assert f.read(4096) == bytes(4096)
    assert os.getxattr(f"{root}/xattrs/file", "user.binary") == bytes(range(0, 256, 7))
    assert stat.S_IMODE(os.stat(f"{root}/modes/tmp").st_mode) == 0o1777
    assert stat.S_IMODE(os.stat(f"{root}/bin/id").st_mode) == 0o4755


def test_inode_numbers_stable_and_per_image(mnt):
    base = image_path(mnt, "base", "rootfs", "files", "big")
    child = image_path(mnt, "child", "rootfs", "files", "big")
    before = os.stat(base).st_ino, os.stat(child).st_ino
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")     # the kernel forgets the inodes and looks them up again
    assert (os.stat(base).st_ino, os.stat(child).st_ino) == before
    assert before[0] != before[1]                     # same ext4 inode, different images
    assert before[0] & 0xFFFFFFFF == before[1] & 0xFFFFFFFF
    assert os.stat(mnt).st_ino == 1


def test_missing_names(mnt):
    root = image_path(mnt, "base", "rootfs")
    for _ in range(2):   # the second time from the kernel's negative entry cache
        with pytest.raises(FileNotFoundError):
            os.stat(f"{root}/files/nope")
    with pytest.raises(FileNotFoundError):
        os.stat(image_path(mnt, "nope"))
    with pytest.raises(FileNotFoundError):
        os.stat(os.path.join(mnt, "nostore"))


CHANGES = {
    "open for writing": lambda p: os.open(f"{p}/files/small", os.O_WRONLY),
    "open for appending": lambda p: os.open(f"{p}/files/small", os.O_RDWR | os.O_APPEND),
    "open with O_TRUNC": lambda p: os.open(f"{p}/files/small", os.O_RDONLY | os.O_TRUNC),
    "create": lambda p: os.open(f"{p}/files/new", os.O_WRONLY | os.O_CREAT, 0o644),
    "unlink": lambda p: os.unlink(f"{p}/files/small"),
    "rename": lambda p: os.rename(f"{p}/files/small", f"{p}/files/other"),
    "chmod": lambda p: os.chmod(f"{p}/files/small", 0o777),
    "chown": lambda p: os.chown(f"{p}/files/small", 1, 1),
    "setxattr": lambda p: os.setxattr(f"{p}/files/small", "user.x", b"1"),
    "removexattr": lambda p: os.removexattr(f"{p}/xattrs/file", "user.plain"),
    "utimens": lambda p: os.utime(f"{p}/files/small", (0, 0)),
    "truncate": lambda p: os.truncate(f"{p}/files/small", 0),
    "mkdir": lambda p: os.mkdir(f"{p}/newdir"),
    "rmdir": lambda p: os.rmdir(f"{p}/modes/tmp"),
    "symlink": lambda p: os.symlink("x", f"{p}/newlink"),
    "link": lambda p: os.link(f"{p}/files/small", f"{p}/files/newhard"),
    "mknod": lambda p: os.mknod(f"{p}/newfifo", 0o644 | stat.S_IFIFO),
    "chmod of the root": lambda p: os.chmod(p, 0o700),
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_every_change_in_an_image_is_erofs(mnt, change):
    with pytest.raises(OSError) as e:
        fd = CHANGES[change](image_path(mnt, "base", "rootfs"))
        if isinstance(fd, int):
            os.close(fd)
    assert e.value.errno == errno.EROFS


def test_setuid_binary_gains_nothing(mnt):
    """nosuid is the default: a setuid-root id(1) run as nobody stays nobody."""
    out = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                          image_path(mnt, "idl", "rootfs", "bin", "id"), "-u"],
                         check=True, capture_output=True, text=True).stdout
    assert out.strip() == "65534"


def test_device_nodes_do_not_open(mnt):
    """nodev is the default."""
    with pytest.raises(PermissionError):
        open(image_path(mnt, "base", "rootfs", "dev", "null"), "rb")


def test_mount_options_are_safe_by_default(mnt, datastore):  # noqa: F811
    with open("/proc/self/mountinfo") as f:
        line = next(line for line in f if line.split()[4] == mnt)
    opts, fstype, source = line.split()[5].split(","), line.split(" - ")[1].split()[0], line.split(" - ")[1].split()[1]
    assert {"nosuid", "nodev"} <= set(opts)
    assert "default_permissions" in line and fstype == "fuse.imagefs" and source == os.path.abspath(datastore)   # mount(8) matches fstab by it


def test_image_facts(mnt, datastore):  # noqa: F811
    assert sorted(os.listdir(os.path.join(mnt, "s", "images"))) == sorted(IMAGES)
    assert sorted(os.listdir(image_path(mnt, "child"))) == ["export", "import", "info.json", "meta", "parent", "rootfs",
                                                            "rootfs.tar"]
    assert "parent" not in os.listdir(image_path(mnt, "scratch"))
    assert os.readlink(image_path(mnt, "child", "parent")) == "../base"
    assert os.path.samefile(image_path(mnt, "child", "parent"), image_path(mnt, "base"))
    assert sorted(os.listdir(image_path(mnt, "base", "meta"))) == ["bin", "name"]
    assert open(image_path(mnt, "base", "meta", "bin"), "rb").read() == bytes(range(8))
    info = json.load(open(image_path(mnt, "base", "info.json")))
    assert info["parent"] == "scratch" and info["children"] == ["child"] and info["ancestors"] == ["scratch"]
    assert info["usage"] == os.path.getsize(vmdk_path(datastore, "base"))
    assert info["url"] == "ds://%5Blocal%5D%20VIC/s/images/base/base.vmdk"
    assert os.getxattr(image_path(mnt, "child"), "user.imagefs.parent") == b"base"
    assert os.getxattr(image_path(mnt, "base"), "user.imagefs.children") == b"child"
    assert int(os.getxattr(os.path.join(mnt, "s"), "user.imagefs.usage")) > 0
    out = subprocess.run(["getfattr", "-d", image_path(mnt, "base")], capture_output=True, text=True).stdout
    assert 'user.imagefs.url="ds://' in out


def test_df_shows_the_datastore(mnt, datastore):  # noqa: F811
    ours, theirs = os.statvfs(mnt), os.statvfs(datastore)
    assert ours.f_blocks * ours.f_frsize == theirs.f_blocks * theirs.f_frsize
    assert abs(ours.f_bavail * ours.f_frsize - theirs.f_bavail * theirs.f_frsize) < 256 << 20
    assert subprocess.run(["df", mnt], check=True, capture_output=True).returncode == 0


def test_many_parallel_readers(mnt, oracles):
    from concurrent.futures import ThreadPoolExecutor
    root = image_path(mnt, "base", "rootfs", "files")
    names = ["big", "small", "sparse", "hardlink", "empty"] * 8

    def read(name):
        with open(os.path.join(root, name), "rb") as f:
            return name, f.read()

    with ThreadPoolExecutor(16) as pool:
        for name, data in pool.map(read, names):
            with open(os.path.join(oracles["base"], "files", name), "rb") as f:
                assert data == f.read()
