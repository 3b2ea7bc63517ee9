"""Access control on an allow_other mount (issue 7 item 7), as uid 1000 through setpriv.

A user reads in rootfs/ what the modes allow and nothing else, changes nothing
(stores, imports, deletes) unless the mount names an admin_group it belongs to, and
gains nothing from setuid files or device nodes in images."""
import os
import subprocess

import pytest

from access_fixtures import (ADMIN_GID, STORE, USER, access_datastore, as_user, path,  # noqa: F401
                             public_module_dir, try_as_user)
from fuse_fixtures import mounted
from helpers import make_tar

FORCE = "user.imagefs.force-delete"


@pytest.fixture(scope="module")
def mnt(access_datastore, public_module_dir):  # noqa: F811
    with mounted(access_datastore, os.path.join(public_module_dir, "plain"), options=("allow_other",)) as m:
        yield m


@pytest.fixture(scope="module")
def admin_mnt(access_datastore, public_module_dir):  # noqa: F811
    with mounted(access_datastore, os.path.join(public_module_dir, "admin"),
                 options=("allow_other", f"admin_group={ADMIN_GID}", "scratch_size=64MiB")) as m:
        yield m


@pytest.fixture(scope="module")
def layer_tar(public_module_dir):
    tar = os.path.join(public_module_dir, "layer.tar")
    with open(tar, "wb") as f:
        f.write(make_tar([("hello", "file", {"data": b"hello from 1000\n"})]))
    os.chmod(tar, 0o644)
    return tar


def test_a_user_reads_what_the_modes_allow(mnt):
    root = path(mnt, "sec", "rootfs")
    res = try_as_user([("read", f"{root}/pub"), ("read", f"{root}/mine"), ("listdir", root),
                       ("read", f"{root}/secret"), ("listdir", f"{root}/closed"),
                       ("read", f"{root}/closed/inside"), ("stat", f"{root}/closed/inside")])
    assert res[0] == ["ok", "public\n"] and res[1] == ["ok", "for 1000\n"]
    assert "secret" in res[2][1]
    assert [r[0] for r in res[3:]] == ["EACCES"] * 4


def test_a_user_changes_nothing_without_the_admin_group(mnt, layer_tar):
    store, images = os.path.join(mnt, STORE), os.path.join(mnt, STORE, "images")
    res = try_as_user([("mkdir", os.path.join(mnt, "newstore")),
                       ("rmdir", store),
                       ("setxattr", store, FORCE, "1"),
                       ("write", path(mnt, "sec", "import", "mine")),
                       ("rmdir", os.path.join(images, "nonutf8")),
                       ("open", path(mnt, "sec", "export", "scratch.tar"), os.O_RDONLY),
                       ("read", path(mnt, "sec", "meta", "config"))])
    assert [r[0] for r in res] == ["EACCES"] * 7
    assert sorted(os.listdir(images)) == ["nonutf8", "scratch", "sec", "sparse", "strip"]
    assert os.listdir(path(mnt, "sec", "import")) == []
    assert FORCE not in os.listxattr(store)


def test_setuid_files_and_device_nodes_give_nothing(mnt):
    rc, out, err = as_user("import os, sys; os.execv(sys.argv[1], [sys.argv[1], '-u'])",
                           path(mnt, "sec", "rootfs", "bin", "id"))
    assert rc == 0 and out.strip() == str(USER)           # not 0: nosuid
    res = try_as_user([("open", path(mnt, "sec", "rootfs", "dev", "null"), os.O_RDONLY)])
    assert res == [["EACCES"]]                             # a 0666 device node: nodev
    assert os.stat(path(mnt, "sec", "rootfs", "bin", "id")).st_mode & 0o4000   # the bit is shown


def test_the_admin_group_may_manage_and_export(admin_mnt, layer_tar):
    images = os.path.join(admin_mnt, STORE, "images")
    target = path(admin_mnt, "sec", "import", "from1000")
    calls = [("mkdir", os.path.join(admin_mnt, "grp")),
             ("write", target, open(layer_tar, "rb").read().decode("latin-1")),
             ("read", os.path.join(images, "from1000", "rootfs", "hello")),
             ("peek", os.path.join(images, "from1000", "export", "scratch.tar")),
             ("read", path(admin_mnt, "sec", "meta", "config")),
             ("rmdir", os.path.join(images, "from1000")),
             ("rmdir", os.path.join(admin_mnt, "grp"))]
    res = try_as_user(calls, groups=[ADMIN_GID])
    assert [r[0] for r in res] == ["ok"] * 7, res
    assert res[2] == ["ok", "hello from 1000\n"]
    assert "grp" not in os.listdir(admin_mnt) and "from1000" not in os.listdir(images)
    # a user outside the group still may not
    res = try_as_user([("mkdir", os.path.join(admin_mnt, "grp2")),
                       ("read", path(admin_mnt, "sec", "meta", "config"))])
    assert [r[0] for r in res] == ["EACCES"] * 2


def test_modes_of_the_mounts_own_files(mnt, admin_mnt):
    def mode(m, *parts):
        return oct(os.stat(os.path.join(m, *parts)).st_mode & 0o7777)
    assert mode(mnt) == "0o755" and mode(admin_mnt) == "0o775"
    assert mode(mnt, STORE, "images", "sec", "export", "scratch.tar") == "0o440"
    assert mode(mnt, STORE, "images", "sec", "meta", "config") == "0o440"
    assert os.stat(path(admin_mnt, "sec", "info.json")).st_gid == ADMIN_GID


def test_the_writing_user_sees_a_failed_import(admin_mnt):
    rc, out, err = as_user("import sys\nwith open(sys.argv[1], 'wb') as f: f.write(b'not a tar' * 100)",
                           path(admin_mnt, "sec", "import", "bad"), groups=[ADMIN_GID])
    assert rc != 0 and "Invalid argument" in err
    subprocess.run(["rm", "-f", path(admin_mnt, "sec", "import", "bad.error")], check=True)
