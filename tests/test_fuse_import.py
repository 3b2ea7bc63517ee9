"""Imports by writing into the mount, and the namespace changes: stores and images made and deleted."""
import errno
import hashlib
import os
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from helpers import make_tar

from fuse_fixtures import STORE, datastore, dump, image_path, mounted, wait_for  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def mnt(datastore, tmp_path_factory):  # noqa: F811
    """A copy of the shared datastore (imports change it), mounted."""
    tmp = tmp_path_factory.mktemp("import")
    subprocess.run(["cp", "-a", "--sparse=always", datastore, tmp / "ds"], check=True)
    with mounted(tmp / "ds", tmp / "mnt", options=["log=" + str(tmp / "log")]) as m:
        yield m


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A directory to import, and tars of it (posix format: ns mtimes)."""
    tmp = tmp_path_factory.mktemp("src")
    src = tmp / "src"
    (src / "app" / "sub").mkdir(parents=True)
    (src / "app" / "data.bin").write_bytes(os.urandom(3 << 20))
    (src / "app" / "sub" / "conf").write_text("key=value\n")
    os.chown(src / "app" / "sub" / "conf", 123, 456)
    os.chmod(src / "app" / "sub" / "conf", 0o600)
    os.symlink("sub/conf", src / "app" / "link")
    os.link(src / "app" / "sub" / "conf", src / "app" / "hard")
    subprocess.run(["touch", "-h", "-d", "2022-01-01 00:00:00.5", *[str(p) for p in (src / "app").rglob("*")]],
                   check=True)
    tar = tmp / "app.tar"
    subprocess.run(["tar", "--format=posix", "-cpf", tar, "-C", src, "app"], check=True)
    return src, tar


def sh(cmd, **kw):
    return subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, **kw)


def comparable(root):
    return dump(root, times=False, blocks=False, dir_sizes=False)


@pytest.mark.parametrize("how", ["cat", "cp", "dd", "tar -cf"])
def test_import_by_writing(mnt, source, how):
    src, tar = source
    new = "by-" + how.split()[0]
    target = image_path(mnt, "base", "import", new)
    cmd = {"cat": f"cat {tar} > {target}",
           "cp": f"cp {tar} {target}",
           "dd": f"dd if={tar} of={target} bs=64k status=none",
           "tar -cf": f"tar --format=posix -cpf {target} -C {src} app"}[how]
    proc = sh(cmd)
    assert proc.returncode == 0, proc.stderr
    assert os.path.isdir(image_path(mnt, new))             # visible at once (entry invalidated)
    assert os.readlink(image_path(mnt, new, "parent")) == "../base"
    assert comparable(image_path(mnt, new, "rootfs", "app")) == comparable(src / "app")
    assert os.path.exists(image_path(mnt, new, "rootfs", "files", "big"))   # a child of base
    assert new not in os.listdir(image_path(mnt, "base", "import"))


def test_metadata_and_sum_from_the_shell(mnt, source):
    _, tar = source
    digest = hashlib.sha256(tar.read_bytes()).hexdigest()
    target = image_path(mnt, "base", "import", "with-meta")
    proc = sh(f"touch {target} && setfattr -n user.imagefs.sum -v sha256:{digest} {target} && "
              f"setfattr -n user.imagefs.meta.config -v 0sAAEC {target} && "
              f"setfattr -n user.imagefs.meta.name -v app {target} && "
              f"getfattr -d -m - {target} && ls {image_path(mnt, 'base', 'import')} && cat {tar} > {target}")
    assert proc.returncode == 0, proc.stderr
    assert "with-meta" in proc.stdout and 'user.imagefs.meta.name="app"' in proc.stdout
    assert open(image_path(mnt, "with-meta", "meta", "config"), "rb").read() == b"\0\1\2"
    assert open(image_path(mnt, "with-meta", "meta", "name"), "rb").read() == b"app"


@pytest.mark.parametrize("case", ["bad tar", "wrong sum", "id taken"])
def test_failed_import_fails_close_leaves_no_image_and_a_reason(mnt, source, case):
    _, tar = source
    new = {"bad tar": "bad", "wrong sum": "wrongsum", "id taken": "child"}[case]
    target = image_path(mnt, "base", "import", new)
    bad = tar.parent / "bad.tar"
    bad.write_bytes(b"this is not a tar archive\n" * 1000)
    cmd = {"bad tar": f"cp {bad} {target}",
           "wrong sum": f"touch {target} && setfattr -n user.imagefs.sum -v sha256:{'0' * 64} {target} && "
                        f"cp {tar} {target}",
           "id taken": f"cat {tar} > {target}"}[case]
    images_before = sorted(os.listdir(os.path.join(mnt, STORE, "images")))
    proc = sh(cmd)
    assert proc.returncode != 0
    assert {"bad tar": "Invalid argument", "wrong sum": "Invalid argument",
            "id taken": "File exists"}[case] in proc.stderr
    assert sorted(os.listdir(os.path.join(mnt, STORE, "images"))) == images_before
    if case != "id taken":
        reason = open(f"{target}.error").read()
        assert reason.count("\n") == 1 and {"bad tar": "archive", "wrong sum": "checksum"}[case] in reason
        os.unlink(f"{target}.error")
        assert not os.path.exists(f"{target}.error")


def test_empty_layer_and_pending_imports(mnt):
    imports = image_path(mnt, "base", "import")
    assert sh(f"tar -cf {imports}/empty -T /dev/null").returncode == 0     # a tar of nothing: an empty layer
    assert os.path.isdir(image_path(mnt, "empty", "rootfs", "files"))
    sh(f": > {imports}/nothing")                                 # O_TRUNC and no byte: not a tar at all
    assert not os.path.exists(image_path(mnt, "nothing"))
    assert "truncated" in open(f"{imports}/nothing.error").read()
    assert sh(f"touch {imports}/pending").returncode == 0        # no O_TRUNC, no bytes: only pending
    assert "pending" in os.listdir(imports) and not os.path.exists(image_path(mnt, "pending"))
    with pytest.raises(PermissionError):
        open(f"{imports}/pending", "rb")                         # write-only
    os.setxattr(f"{imports}/pending", "user.imagefs.meta.k", b"v")
    os.removexattr(f"{imports}/pending", "user.imagefs.meta.k")
    assert os.listxattr(f"{imports}/pending") == []
    for name, value, err in (("user.imagefs.sum", b"md5:abc", errno.EINVAL),
                             ("user.imagefs.meta.-bad", b"v", errno.EINVAL),
                             ("user.other", b"v", errno.ENOTSUP)):
        with pytest.raises(OSError) as e:
            os.setxattr(f"{imports}/pending", name, value)
        assert e.value.errno == err, name
    os.unlink(f"{imports}/pending")                              # rm cancels it
    assert "pending" not in os.listdir(imports)
    with pytest.raises(OSError) as e:
        open(f"{imports}/bad,name", "wb")
    assert e.value.errno == errno.EINVAL


def test_commit_waits_for_the_last_descriptor(mnt, source):
    """{ a; b; } > f flushes after a: the import must take both halves."""
    _, tar = source
    size = tar.stat().st_size
    target = image_path(mnt, "base", "import", "two-halves")
    proc = sh(f"{{ head -c {size // 2} {tar}; tail -c +{size // 2 + 1} {tar}; }} > {target}")
    assert proc.returncode == 0, proc.stderr
    assert os.path.getsize(image_path(mnt, "two-halves", "rootfs", "app", "data.bin")) == 3 << 20


def test_writes_must_go_front_to_back(mnt, source):
    _, tar = source
    target = image_path(mnt, "base", "import", "seeky")
    with open(target, "wb", buffering=0) as f:
        f.write(tar.read_bytes()[:20480])
        f.seek(0)
        with pytest.raises(OSError) as e:
            f.write(b"x")
        assert e.value.errno == errno.ESPIPE
        f.seek(0, os.SEEK_END)
        f.write(tar.read_bytes()[20480:])
    assert os.path.isdir(image_path(mnt, "seeky", "rootfs", "app"))


def test_parallel_imports(mnt):
    def one(i):
        tar = make_tar([(f"p{i}", "dir", {}), (f"p{i}/data", "file", {"data": os.urandom(1 << 20) + bytes([i])})])
        with open(image_path(mnt, "base", "import", f"par{i}"), "wb") as f:
            f.write(tar)
        return i

    with ThreadPoolExecutor(4) as pool:
        assert sorted(pool.map(one, range(4))) == [0, 1, 2, 3]
    for i in range(4):
        with open(image_path(mnt, f"par{i}", "rootfs", f"p{i}", "data"), "rb") as f:
            assert f.read()[-1] == i


def test_reads_flow_while_an_import_is_running(mnt, source):
    _, tar = source
    data = tar.read_bytes()
    target = image_path(mnt, "base", "import", "slow")
    received = threading.Event()
    finished = threading.Event()

    def slow_writer():
        with open(target, "wb") as f:
            for i in range(0, len(data), 64 << 10):
                f.write(data[i: i + (64 << 10)])
                f.flush()
                received.set()
                time.sleep(0.05)
        finished.set()

    t = threading.Thread(target=slow_writer)
    t.start()
    try:
        assert received.wait(10)
        start = time.monotonic()
        walked = dump(image_path(mnt, "child", "rootfs"))
        assert len(walked) > 30 and time.monotonic() - start < 5
        assert not finished.is_set()               # the import was still running meanwhile
        assert os.path.getsize(target) > 0         # and shows its progress
    finally:
        t.join()
    assert os.path.isdir(image_path(mnt, "slow", "rootfs", "app"))


def test_stores_are_directories(mnt):
    store = os.path.join(mnt, "made")
    os.mkdir(store)
    assert "made" in os.listdir(mnt)
    assert sorted(os.listdir(os.path.join(store, "images", "scratch", "rootfs"))) == [
        ".tether", "etc", "lib", "lost+found", "proc", "run", "sys"]
    with pytest.raises(FileExistsError):
        os.mkdir(store)
    with pytest.raises(OSError) as e:
        os.mkdir(os.path.join(mnt, "-bad"))
    assert e.value.errno == errno.EINVAL
    with open(os.path.join(store, "images", "scratch", "import", "l1"), "wb") as f:
        f.write(make_tar([("x", "file", {"data": b"x"})]))
    with pytest.raises(OSError) as e:
        os.rmdir(store)                            # holds an image
    assert e.value.errno == errno.ENOTEMPTY
    os.setxattr(store, "user.imagefs.force-delete", b"1")
    assert os.getxattr(store, "user.imagefs.force-delete") == b"1"
    os.rmdir(store)
    assert "made" not in os.listdir(mnt)
    os.mkdir(store)                                # again, fresh
    assert os.listdir(os.path.join(store, "images")) == ["scratch"]
    os.rmdir(store)                                # only scratch: no force needed


def test_deleting_images(mnt):
    with open(image_path(mnt, "base", "import", "parent-of-one"), "wb") as f:
        f.write(make_tar([("a", "file", {"data": b"a"})]))
    with open(image_path(mnt, "parent-of-one", "import", "leaf"), "wb") as f:
        f.write(make_tar([("b", "file", {"data": b"b"})]))
    for busy in ("parent-of-one", "scratch"):
        with pytest.raises(OSError) as e:
            os.rmdir(image_path(mnt, busy))
        assert e.value.errno == errno.EBUSY
    os.close(os.open(image_path(mnt, "leaf", "import", "pending"), os.O_WRONLY | os.O_CREAT))   # no O_TRUNC
    with pytest.raises(OSError) as e:
        os.rmdir(image_path(mnt, "leaf"))          # an import of a child is pending
    assert e.value.errno == errno.EBUSY
    os.unlink(image_path(mnt, "leaf", "import", "pending"))
    old_ino = os.stat(image_path(mnt, "leaf", "rootfs", "b")).st_ino
    with open(image_path(mnt, "leaf", "rootfs", "b"), "rb") as f:
        with pytest.raises(OSError) as e:
            os.rmdir(image_path(mnt, "leaf"))      # a file of it is open
        assert e.value.errno == errno.EBUSY
        assert f.read() == b"b"
    os.rmdir(image_path(mnt, "leaf"))
    assert not os.path.exists(image_path(mnt, "leaf"))
    with open(image_path(mnt, "parent-of-one", "import", "leaf"), "wb") as f:   # same ID again
        f.write(make_tar([("b", "file", {"data": b"new b"})]))
    assert open(image_path(mnt, "leaf", "rootfs", "b"), "rb").read() == b"new b"
    assert os.stat(image_path(mnt, "leaf", "rootfs", "b")).st_ino != old_ino
    os.rmdir(image_path(mnt, "leaf"))
    os.rmdir(image_path(mnt, "parent-of-one"))
    assert wait_for(lambda: "parent-of-one" not in os.listdir(os.path.join(mnt, STORE, "images")))
