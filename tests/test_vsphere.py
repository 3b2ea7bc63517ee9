"""The vSphere backend against the simulator: VMs as owners, join, TLS and login
failures, retries, several writers, the block cache, disks read back by qemu-img, a mount.

The store and CLI suites run on this backend too (their [vsphere] cases); this file
holds what only vSphere has.
"""
import io
import os
import ssl
import subprocess
import sys
import tarfile
import threading

import pytest
from pyVim.connect import Disconnect, SmartConnect
from pyVmomi import vim

import vsphere_sim
from fault_proxy import FaultProxy
from fuse_fixtures import mounted
from helpers import make_tar, one_line_error

from imagefs.datastore import open_datastore
from imagefs.datastore.vsphere import cache as block_cache
from imagefs.errors import Exists, InUse, PermissionDenied, Unavailable
from imagefs.store import ImageStore
from imagefs.vmdk import DiskChain

SMALL = "128MiB"


@pytest.fixture
def folder(vsphere_env, tmp_path):
    return f"v-{os.path.basename(str(tmp_path))}-{os.getpid()}"


@pytest.fixture
def made_folder(vsphere_env, folder):
    """The URL's folder, made (as `store create` or the library would)."""
    open_datastore(vsphere_env.url(folder)).close()
    return folder


@pytest.fixture
def st(vsphere_env, folder):
    st = ImageStore(open_datastore(vsphere_env.url(folder)))
    st.create_store("s", capacity=SMALL)
    yield st
    st.ds.close()


@pytest.fixture
def api(vsphere_env):
    """A plain pyvmomi session, as another vSphere client would have."""
    si = SmartConnect(host="127.0.0.1", port=vsphere_env.port, user=vsphere_sim.USER, pwd=vsphere_sim.PASSWORD,
                      sslContext=ssl.create_default_context(cafile=vsphere_env.ca_file))
    yield si
    Disconnect(si)


def write(st, parent, image_id, entries):
    return st.write_image("s", parent, image_id, io.BytesIO(make_tar(entries)))[0]


def vm_named(si, name):
    view = si.content.viewManager.CreateContainerView(si.content.rootFolder, [vim.VirtualMachine], True)
    try:
        return next(vm for vm in view.view if vm.name == name)
    finally:
        view.DestroyView()


def attach_existing(si, vm, ds_path, host_path):
    """Attach a disk file as it is (another client doing so, not imagefs). The simulator
    insists on a "-flat.vmdk" extent beside any disk it attaches (it reads no descriptor):
    an empty one stands in for it."""
    flat = host_path[:-len(".vmdk")] + "-flat.vmdk"
    if not os.path.exists(flat):
        open(flat, "wb").close()
    devices = vm.config.hardware.device
    ctl = next(d for d in devices if isinstance(d, vim.vm.device.VirtualSCSIController))
    used = {d.unitNumber for d in devices if getattr(d, "controllerKey", None) == ctl.key} | {7}
    disk = vim.vm.device.VirtualDisk(key=-1, controllerKey=ctl.key, unitNumber=min(set(range(16)) - used),
                                     backing=vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
                                         fileName=ds_path, diskMode="persistent"))
    spec = vim.vm.ConfigSpec(deviceChange=[vim.vm.device.VirtualDeviceSpec(operation="add", device=disk)])
    _wait(si, vm.ReconfigVM_Task(spec))
    return disk


def detach_all(si, vm, ds_path):
    changes = [vim.vm.device.VirtualDeviceSpec(operation="remove", device=d) for d in vm.config.hardware.device
               if isinstance(d, vim.vm.device.VirtualDisk) and d.backing.fileName == ds_path]
    if changes:
        _wait(si, vm.ReconfigVM_Task(vim.vm.ConfigSpec(deviceChange=changes)))


def _wait(si, task):
    import time
    while task.info.state not in ("success", "error"):
        time.sleep(0.02)
    assert task.info.state == "success", task.info.error


def cli(spec, *args, input=None, env=None):
    return subprocess.run([sys.executable, "-m", "imagefs", "--datastore", spec, *args], input=input,
                          capture_output=True, env=env)


# --- owners and join --------------------------------------------------------------------------------
def test_vsphere_owners_one_and_two_vms_and_through_a_parent(st, api, vsphere_env, folder):
    write(st, "scratch", "base", [("a", "file", {"data": b"a"})])
    write(st, "base", "top", [("b", "file", {"data": b"b"})])
    vm0, vm1 = vm_named(api, "DC0_H0_VM0"), vm_named(api, "DC0_H0_VM1")
    top = st.datastore_path("s", "top")
    host = os.path.join(vsphere_env.ds_dir, folder, "VIC/s/images/top/top.vmdk")
    assert st.owners("s", "top") == [] and st.owners("s", "base") == []
    attach_existing(api, vm0, top, host)
    try:
        assert st.owners("s", "top") == ["DC0_H0_VM0"]
        attach_existing(api, vm1, top, host)
        assert st.owners("s", "top") == ["DC0_H0_VM0", "DC0_H0_VM1"]
        # the filter: the simulator's VMs run; a filter for powered-off ones keeps none
        assert st.owners("s", "top", vm_filter=lambda o: o.power_state == "poweredOff") == []
        with pytest.raises(InUse, match="DC0_H0_VM0"):
            st.delete_image("s", "top")
        info = cli(st.ds.url, "image", "info", "s", "top")
        assert b"owners:     DC0_H0_VM0 DC0_H0_VM1" in info.stdout, info.stderr
        assert "in use" in one_line_error(cli(st.ds.url, "image", "rm", "s", "top"))
    finally:
        detach_all(api, vm0, top)
        detach_all(api, vm1, top)
    assert st.owners("s", "top") == []
    # through a parent: a VM disk whose backing.parent chain reaches "base"
    st.join("s", "base", "c-parent", vm="DC0_H0_VM0")
    try:
        assert st.owners("s", "base") == ["DC0_H0_VM0"]
        assert st.owners("s", "top") == []
    finally:
        st.detach("c-parent", "DC0_H0_VM0", destroy=True)
    assert st.owners("s", "base") == []
    st.delete_image("s", "top")


def test_vsphere_join_and_detach(st, api, vsphere_env, folder):
    write(st, "scratch", "img", [("f", "file", {"data": b"x"})])
    c = st.join("s", "img", "c1", vm="DC0_H0_VM1", repo="library/busybox")
    assert c.disk == "c1/c1.vmdk" and (c.store, c.image) == ("s", "img")
    vm = vm_named(api, "DC0_H0_VM1")
    disks = [d for d in vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk)
             and d.backing.fileName == f"[LocalDS_0] {folder}/c1/c1.vmdk"]
    assert len(disks) == 1
    assert disks[0].backing.parent.fileName == f"[LocalDS_0] {folder}/VIC/s/images/img/img.vmdk"
    from imagefs.datastore.vsphere.join import joined_record
    assert joined_record(st, "c1", "DC0_H0_VM1") == {"layer_id": "img", "image_id": "img",
                                                     "repo_name": "library/busybox", "store": "s"}
    assert st.owners("s", "img") == ["DC0_H0_VM1"]
    import imagefs
    lib = imagefs.ImageStore(vsphere_env.url(folder))                # the library API, by URL
    assert [o.name for o in lib.owners(st.url("s", "img"))] == ["DC0_H0_VM1"]
    assert lib.owners(st.url("s", "img"), filter=lambda o: False) == []
    assert st.ds.relative_path(st.datastore_path("s", "img")) == "VIC/s/images/img/img.vmdk"
    assert st.ds.relative_path("[otherds] VIC/s/images/img/img.vmdk") is None
    with pytest.raises(Exists):
        st.join("s", "img", "c1", vm="DC0_H0_VM0")
    # detach, keeping the disk
    st.detach("c1", "DC0_H0_VM1")
    assert st.owners("s", "img") == []
    assert os.path.exists(os.path.join(vsphere_env.ds_dir, folder, "c1/c1.vmdk"))
    assert joined_record(st, "c1", "DC0_H0_VM1") == {}
    st.ds.rmtree("c1")
    # the CLI, then detach destroying the disk
    out = cli(st.ds.url, "container", "join", "s", "img", "c2", "--vm", "DC0_H0_VM0", "--repo", "r")
    assert out.returncode == 0 and out.stdout == b"c2/c2.vmdk\n", out.stderr
    assert st.owners("s", "img") == ["DC0_H0_VM0"]
    assert cli(st.ds.url, "container", "detach", "c2", "--vm", "DC0_H0_VM0", "--destroy").returncode == 0
    assert not os.path.exists(os.path.join(vsphere_env.ds_dir, folder, "c2"))
    assert "virtual machine nope not found" in one_line_error(
        cli(st.ds.url, "container", "join", "s", "img", "c3", "--vm", "nope"))
    st.delete_image("s", "img")


def test_vsphere_container_disk_join_import_export(st):
    """A container disk without a VM: made on the host, uploaded, changed in place."""
    write(st, "scratch", "img", [("etc/app", "file", {"data": b"v1"})])
    st.join("s", "img", "ctr")
    assert st.owners("s", "img") == ["ctr"]
    st.container_import("ctr", io.BytesIO(make_tar([("new", "file", {"data": b"new"})])))
    with tarfile.open(fileobj=io.BytesIO(b"".join(st.container_export("ctr", changes=True)))) as tf:
        assert "new" in tf.getnames() and "etc/app" not in tf.getnames()
    st.remove_container("ctr")
    assert st.owners("s", "img") == []


# --- usage, URLs -------------------------------------------------------------------------------------
def test_vsphere_usage_equals_the_bytes_in_the_datastore_folder(st, vsphere_env, folder):
    write(st, "scratch", "a", [("big", "file", {"data": os.urandom(3 << 20)})])
    write(st, "a", "b", [("small", "file", {"data": b"s"})])
    images = os.path.join(vsphere_env.ds_dir, folder, "VIC/s/images")
    on_disk = {i: sum(os.path.getsize(os.path.join(images, i, n)) for n in os.listdir(os.path.join(images, i))
                      if n.endswith(".vmdk")) for i in os.listdir(images)}
    assert st.layer_usage("s", "a") == on_disk["a"] > 3 << 20
    assert st.usage("s") == on_disk["a"] + on_disk["b"]
    assert st.url("s", "a") == f"ds://%5BLocalDS_0%5D%20{folder}/VIC/s/images/a/a.vmdk"
    assert st.ds.names[0] == "LocalDS_0"


def test_vsphere_listing_a_store_costs_the_same_for_any_number_of_images(st):
    """One datastore search per listing whatever the number of images; descriptors are
    read once and then come from the cache."""
    calls = {"search": 0, "read": 0}
    search, read = st.ds._search, st.ds.transfer.read_range

    def counted_search(*a, **kw):
        calls["search"] += 1
        return search(*a, **kw)

    def counted_read(*a, **kw):
        calls["read"] += 1
        return read(*a, **kw)
    st.ds._search, st.ds.transfer.read_range = counted_search, counted_read
    st.ds.cache._fetch = counted_read
    costs = []
    for n in range(1, 5):
        write(st, "scratch" if n == 1 else f"i{n - 1}", f"i{n}", [(f"f{n}", "file", {"data": b"x"})])
        if n in (1, 4):
            st.list_images("s")                         # fills the descriptor cache
            calls.update(search=0, read=0)
            assert len(st.list_images("s")) == n + 1
            costs.append(dict(calls))
    assert costs[0] == costs[1] and costs[0]["read"] == 0 and costs[0]["search"] <= 2, costs
    calls.update(search=0, read=0)
    assert st.usage("s") > 0 and calls["search"] <= 2


# --- TLS, login, reachability ---------------------------------------------------------------------------
def test_vsphere_tls_with_the_projects_test_certificate(vsphere_env, made_folder, monkeypatch, tmp_path):
    folder = made_folder
    # verified against our own 2048-bit certificate, given as a CA file on the command line
    monkeypatch.delenv("IMAGEFS_VSPHERE_CA_FILE")
    spec = vsphere_env.url(folder)
    out = cli(spec, "--ca-file", vsphere_env.ca_file, "store", "ls")
    assert out.returncode == 0 and out.stderr == b"", out.stderr
    # and through the environment (REQUESTS_CA_BUNDLE, set on these machines, plays no part)
    env = dict(os.environ, IMAGEFS_VSPHERE_CA_FILE=vsphere_env.ca_file,
               REQUESTS_CA_BUNDLE="/etc/ssl/certs/ca-certificates.crt")
    assert cli(spec, "store", "create", "t", "--capacity", "64MiB", env=env).returncode == 0
    # --insecure connects without the CA, and says so
    out = cli(spec, "--insecure", "store", "ls")
    assert out.returncode == 0 and out.stdout == b"t\n"
    assert b"verification is off" in out.stderr and len(out.stderr.splitlines()) == 1, out.stderr
    out = cli(spec, "--insecure", "image", "info", "t", "scratch")      # file reads too: one warning
    assert out.returncode == 0 and len(out.stderr.splitlines()) == 1, out.stderr


def test_vsphere_untrusted_certificate(vsphere_env, folder, monkeypatch):
    monkeypatch.delenv("IMAGEFS_VSPHERE_CA_FILE")
    line = one_line_error(cli(vsphere_env.url(folder), "store", "ls"))
    assert "certificate not trusted" in line
    with pytest.raises(Unavailable, match="not trusted"):
        open_datastore(vsphere_env.url(folder))


def test_vsphere_wrong_password(vsphere_env, made_folder, monkeypatch, tmp_path):
    folder = made_folder
    monkeypatch.setenv("IMAGEFS_VSPHERE_PASSWORD", "wrong")
    line = one_line_error(cli(vsphere_env.url(folder), "store", "ls"))
    assert "login as imagefs failed" in line and "wrong" not in line.replace("wrong user", "")
    # a password file is read whole (its newline dropped); the environment wins over it
    monkeypatch.delenv("IMAGEFS_VSPHERE_PASSWORD")
    pw = tmp_path / "pw"
    pw.write_text(vsphere_sim.PASSWORD + "\n")
    assert cli(vsphere_env.url(folder), "--password-file", str(pw), "store", "ls").returncode == 0
    pw.write_text("nope\n")
    assert "login as imagefs failed" in one_line_error(
        cli(vsphere_env.url(folder), "--password-file", str(pw), "store", "ls"))
    # no password at all, and no terminal to ask on
    assert "no password" in one_line_error(cli(vsphere_env.url(folder), "store", "ls"))
    with pytest.raises(PermissionDenied):
        open_datastore(vsphere_env.url(folder), {"password_file": str(pw)})


def test_vsphere_unreachable_host(vsphere_env, folder):
    import socket
    with socket.socket() as s:                      # a port that nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    line = one_line_error(cli(vsphere_env.url(folder, port=port), "store", "ls"))
    assert "cannot connect" in line and f"127.0.0.1:{port}" in line
    assert "unknown datastore scheme" in one_line_error(cli("ftp://x/y", "store", "ls"))
    assert "no datastore nods" in one_line_error(
        cli(f"vsphere://imagefs@127.0.0.1:{vsphere_env.port}/DC0/nods", "store", "ls"))
    assert "password does not belong" in one_line_error(
        cli(f"vsphere://imagefs:pw@127.0.0.1:{vsphere_env.port}/DC0/LocalDS_0", "store", "ls"))


# --- transient faults ---------------------------------------------------------------------------------
def test_vsphere_retry_after_an_injected_503(vsphere_env, folder):
    with FaultProxy(vsphere_env) as proxy:
        ds = open_datastore(vsphere_env.url(folder, port=proxy.port))
        st = ImageStore(ds)
        st.create_store("s", capacity="64MiB")
        # one 503 on the next API call and one on the next datastore read: both retried
        proxy.fail_next("POST", "/sdk", 503)
        proxy.fail_next("GET", "/folder/", 503)
        ds.cache.forget_tree(ds._rel("VIC"))          # reads must go to the server again
        tree = st.tree("s", "scratch")
        assert tree.resolve("/etc/hostname")
        assert proxy.injected == {("POST", "/sdk"): 1, ("GET", "/folder/"): 1}
        assert proxy.served[("POST", "/sdk")] > 0 and proxy.served[("GET", "/folder/")] > 0, proxy.served
        # a reset connection in the middle of a PUT of a whole file is retried too
        proxy.fail_next("PUT", "/folder/", "reset")
        st.write_image("s", "scratch", "l1", io.BytesIO(make_tar([("x", "file", {"data": b"x"})])))
        assert proxy.injected[("PUT", "/folder/")] == 1
        assert [i.id for i in st.list_images("s")] == ["l1", "scratch"]
        # claiming a name is not repeated blindly (a lost answer would make our own
        # directory look taken): one clear error instead, and nothing half made
        proxy.fail_next("POST", "/sdk", 503)
        with pytest.raises(Unavailable, match="not safe to repeat"):
            ds.mkdir("VIC/s/claimed")
        assert not ds.exists("VIC/s/claimed")
        ds.close()


def test_vsphere_faults_map_to_the_local_backends_errors():
    from pyVmomi import vmodl
    from imagefs.datastore.vsphere.session import map_fault
    from imagefs.errors import NoSpace, NotFound
    cases = [(vim.fault.FileNotFound(file="x"), NotFound), (vim.fault.FileAlreadyExists(file="x"), Exists),
             (vim.fault.FileLocked(file="x"), InUse), (vim.fault.ResourceInUse(), InUse),
             (vim.fault.NoPermission(privilegeId="Datastore.FileManagement"), PermissionDenied),
             (vim.fault.NoDiskSpace(), NoSpace)]
    for fault, error in cases:
        mapped = map_fault(fault, "VIC/s/x")
        assert type(mapped) is error and mapped.errno == error.errno and "VIC/s/x" in str(mapped)
    assert "Datastore.FileManagement" in str(map_fault(cases[4][0], "p"))
    other = map_fault(vmodl.fault.InvalidArgument(msg="odd"), "p")
    assert str(other) == "p: vSphere: odd"


def test_vsphere_expired_session_logs_in_again(st):
    st.ds.session.si.content.sessionManager.Logout()        # as if the session had timed out
    assert st.list_stores() == ["s"]
    assert st.tree("s", "scratch").resolve("/etc")


# --- several writers ----------------------------------------------------------------------------------------
def test_vsphere_two_concurrent_writers_of_one_id(st, vsphere_env, folder, tmp_path):
    tar = tmp_path / "l.tar"
    tar.write_bytes(make_tar([("f", "file", {"data": b"x" * 100000})]))
    spec = vsphere_env.url(folder)
    procs = [subprocess.Popen([sys.executable, "-m", "imagefs", "--datastore", spec, "image", "write", "s",
                               "scratch", "same", str(tar)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(2)]
    results = [(p.wait(), p.stdout.read(), p.stderr.read()) for p in procs]
    codes = sorted(r[0] for r in results)
    assert codes == [0, 5], results                 # 5: already exists
    loser = next(r for r in results if r[0] == 5)
    assert b"image same already exists in store s" in loser[2]
    assert [i.id for i in st.list_images("s")] == ["same", "scratch"]
    assert st.tree("s", "same").read(st.tree("s", "same").resolve("/f"), 0, 10) == b"x" * 10


def test_vsphere_lock_holds_across_datastore_objects(st, vsphere_env, folder):
    other = open_datastore(vsphere_env.url(folder))
    try:
        with st.ds.lock("VIC/s/.lock", exclusive=False) as got:
            assert got
            with other.lock("VIC/s/.lock", exclusive=True, blocking=False) as got2:
                assert got2 is False
            with other.lock("VIC/s/.lock", exclusive=False, blocking=False) as got3:
                assert got3 is True                 # shared with shared
        with other.lock("VIC/s/.lock", exclusive=True, blocking=False) as got4:
            assert got4 is True
            with st.ds.lock("VIC/s/.lock", exclusive=False, blocking=False) as got5:
                assert got5 is False
    finally:
        other.close()


def test_vsphere_lock_of_a_dead_holder_goes_stale(st, vsphere_env, folder):
    from imagefs.datastore.vsphere.lock import LEASE
    host = os.path.join(vsphere_env.ds_dir, folder, "VIC/s/.lock.x")
    os.mkdir(host)                                   # a holder that crashed...
    with st.ds.lock("VIC/s/.lock", exclusive=False, blocking=False) as got:
        assert got is False                         # ...counts while its lease runs
    old = os.stat(host).st_mtime - LEASE - 60
    os.utime(host, (old, old))                      # ...and no longer once it has expired
    with st.ds.lock("VIC/s/.lock", exclusive=True, blocking=False) as got:
        assert got is True
        assert os.path.exists(os.path.join(host, "beat"))   # ours now, beating
    assert not os.path.exists(host)


# --- what lands on the datastore ------------------------------------------------------------------------
def test_vsphere_uploaded_layer_reads_back_through_qemu_img(st, vsphere_env, folder, tmp_path):
    write(st, "scratch", "a", [("d/f", "file", {"data": os.urandom(200000)})])
    write(st, "a", "b", [("d/g", "file", {"data": b"g" * 5000}), ("d/.wh.f", "file", {})])
    root = os.path.join(vsphere_env.ds_dir, folder)
    for image in ("scratch", "a", "b"):
        disk = os.path.join(root, f"VIC/s/images/{image}/{image}.vmdk")
        subprocess.run(["qemu-img", "check", "-q", disk], check=True)
        raw = tmp_path / f"{image}.raw"
        subprocess.run(["qemu-img", "convert", "-O", "raw", disk, str(raw)], check=True)
        local = ImageStore(open_datastore(root))       # the same files through the local backend
        ours = [DiskChain(f"VIC/s/images/{image}/{image}.vmdk", local.ds.open_read),
                st.open_chain(f"VIC/s/images/{image}/{image}.vmdk")]
        with open(raw, "rb") as f:
            offset = 0
            while True:
                want = f.read(4 << 20)
                if not want:
                    break
                for chain in ours:
                    assert chain.pread(offset, len(want)) == want, (image, offset)
                offset += len(want)
        for chain in ours:
            chain.close()
        raw.unlink()


# --- the block cache --------------------------------------------------------------------------------------
def test_vsphere_cache_warm_reads_fetch_nothing_and_stay_bounded(vsphere_env, folder):
    st = ImageStore(open_datastore(vsphere_env.url(folder), {"cache_size": str(4 << 20)}))
    try:
        st.create_store("s", capacity="64MiB")
        st.write_image("s", "scratch", "big", io.BytesIO(make_tar([("big", "file", {"data": os.urandom(6 << 20)})])))
        disk = st.layer_disk("s", "big").extent_files[-1]     # the file holding the layer's grains
        with open(os.path.join(vsphere_env.ds_dir, folder, disk), "rb") as f:
            data = f.read()
        assert len(data) > 6 << 20
        cache = st.ds.cache
        cache.forget_tree(st.ds._rel("VIC"))
        handle = st.ds.open_read(disk)
        before = cache.fetched
        assert handle.pread(0, len(data)) == data                # cold, and bigger than the cache
        assert cache.fetched - before == len(data)
        assert cache.held <= cache.limit
        before = cache.fetched
        assert handle.pread(len(data) - 100000, 100000) == data[-100000:]   # recently read: warm
        assert cache.fetched == before
        assert handle.pread(0, 100000) == data[:100000]         # evicted long ago: fetched again
        assert cache.fetched > before
        # a fresh datastore object finds what the last one left (same cache directory)
        st.ds.close()
        again = open_datastore(vsphere_env.url(folder), {"cache_size": str(4 << 20)})
        try:
            before = again.cache.fetched
            assert again.open_read(disk).pread(0, 100000) == data[:100000]
            assert again.cache.fetched == before
        finally:
            again.close()
    finally:
        st.ds.close()


def test_vsphere_cache_key_follows_a_replaced_disk(st, vsphere_env, folder):
    write(st, "scratch", "x", [("one", "file", {"data": b"1"})])
    assert st.tree("s", "x").resolve("/one")
    other = ImageStore(open_datastore(vsphere_env.url(folder), {"cache_dir": vsphere_env.workdir + "/c2"}))
    other.delete_image("s", "x")
    other.write_image("s", "scratch", "x", io.BytesIO(make_tar([("two", "file", {"data": b"2"})])))
    other.ds.close()
    fresh = ImageStore(st.ds)                                    # same cache, new tree cache
    assert fresh.tree("s", "x").resolve("/two")


def test_vsphere_cache_is_private_while_another_process_holds_it(vsphere_env, tmp_path):
    root = str(tmp_path / "c")
    first = block_cache.BlockCache(root, 1 << 30, lambda *a: b"")
    second = block_cache.BlockCache(root, 1 << 30, lambda *a: b"")
    assert not first.private and second.private and second.root != root
    second.close()
    assert not os.path.exists(second.root)
    # a private cache whose process died (its lock is free) is swept; a live one is not
    dead = tmp_path / "private-dead"
    dead.mkdir()
    (dead / "lock").write_bytes(b"")
    third = block_cache.BlockCache(root, 1 << 30, lambda *a: b"")
    assert third.private and os.path.exists(third.root) and not dead.exists()
    fourth = block_cache.BlockCache(root, 1 << 30, lambda *a: b"")
    assert os.path.exists(third.root)
    for c in (fourth, third, first):
        c.close()
    assert sorted(os.listdir(tmp_path)) == ["c"]


# --- the mount ----------------------------------------------------------------------------------------------
def test_vsphere_mount_browse_import_export(vsphere_env, folder, tmp_path):
    spec = vsphere_env.url(folder)
    assert cli(spec, "store", "create", "s", "--capacity", "64MiB").returncode == 0
    tar = tmp_path / "l.tar"
    tar.write_bytes(make_tar([("hello", "dir", {}), ("hello/world", "file", {"data": b"hi\n"})]))
    with mounted(spec, tmp_path / "mnt", options=("allow_other", f"cache_size={64 << 20}")) as mnt:
        assert os.listdir(mnt) == ["s"]
        assert os.listdir(f"{mnt}/s/images") == ["scratch"]
        assert "hostname" in os.listdir(f"{mnt}/s/images/scratch/rootfs/etc")
        subprocess.run(f"cat {tar} > {mnt}/s/images/scratch/import/l1", shell=True, check=True)
        with open(f"{mnt}/s/images/l1/rootfs/hello/world", "rb") as f:
            assert f.read() == b"hi\n"
        names = subprocess.run(["tar", "-tf", f"{mnt}/s/images/l1/export/scratch.tar"], check=True,
                               capture_output=True, text=True).stdout.split()
        assert names == ["hello/", "hello/world"]              # the layer: its diff against scratch
        names = subprocess.run(["tar", "-tf", f"{mnt}/s/images/l1/rootfs.tar"], check=True,
                               capture_output=True, text=True).stdout.split()
        assert "hello/world" in names and "etc/hostname" in names   # the whole image
        # an image written elsewhere (the CLI, another host) shows up
        out = cli(spec, "image", "write", "s", "l1", "l2", str(tar))
        assert out.returncode == 0, out.stderr
        import time
        deadline = time.monotonic() + 10
        while "l2" not in os.listdir(f"{mnt}/s/images") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "l2" in os.listdir(f"{mnt}/s/images")
        os.rmdir(f"{mnt}/s/images/l2")
        # a VM using l1 (joined by another process) is an owner: in info.json, and rmdir is EBUSY
        out = cli(spec, "container", "join", "s", "l1", "cm", "--vm", "DC0_H0_VM0")
        assert out.returncode == 0, out.stderr
        try:
            import errno
            import json
            with open(f"{mnt}/s/images/l1/info.json") as f:
                assert json.load(f)["owners"] == ["DC0_H0_VM0"]
            assert os.getxattr(f"{mnt}/s/images/l1", "user.imagefs.owners") == b"DC0_H0_VM0"
            with pytest.raises(OSError) as err:
                os.rmdir(f"{mnt}/s/images/l1")
            assert err.value.errno == errno.EBUSY
        finally:
            assert cli(spec, "container", "detach", "cm", "--vm", "DC0_H0_VM0", "--destroy").returncode == 0
    assert [i.id for i in ImageStore(open_datastore(spec)).list_images("s")] == ["l1", "scratch"]


def test_vsphere_fstab_line_through_the_mount_helper(vsphere_env, folder, tmp_path, monkeypatch):
    """What an fstab line gives mount(8)'s helper: the URL, password and CA as options."""
    from fuse_fixtures import unmount
    spec = vsphere_env.url(folder)
    assert cli(spec, "store", "create", "s", "--capacity", "64MiB").returncode == 0
    pw = tmp_path / "pw"
    pw.write_text(vsphere_sim.PASSWORD + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEFS_VSPHERE")}
    env["IMAGEFS_DATASTORE"] = "/nonexistent"      # the URL on the line wins
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    helper = os.path.join(os.path.dirname(__file__), "..", "mount_helpers", "mount.imagefs")
    proc = subprocess.run([helper, spec, str(mnt), "-o",
                           f"password_file={pw},ca_file={vsphere_env.ca_file},_netdev,allow_other"],
                          env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    try:
        assert proc.returncode == 0, proc.stderr
        assert os.listdir(mnt) == ["s"]
        assert os.getxattr(str(mnt), "user.imagefs.datastore").decode() == spec
    finally:
        unmount(mnt)
    # the environment's datastore when none is named
    out = subprocess.run([sys.executable, "-m", "imagefs", "store", "ls"], capture_output=True,
                         env=dict(os.environ, IMAGEFS_DATASTORE=spec))
    assert out.returncode == 0 and out.stdout == b"s\n", out.stderr


def test_vsphere_mount_refuses_without_a_password(vsphere_env, folder, tmp_path, monkeypatch):
    from fuse_fixtures import mount_cmd
    monkeypatch.delenv("IMAGEFS_VSPHERE_PASSWORD")
    (tmp_path / "mnt").mkdir()
    proc = subprocess.run(mount_cmd(vsphere_env.url(folder), tmp_path / "mnt"), capture_output=True, text=True,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 1 and "no password" in proc.stderr and "Traceback" not in proc.stderr


def test_vsphere_image_ids_race_in_threads(st, vsphere_env, folder):
    """Two sessions claim the same IDs at once: each ID is made by exactly one."""
    other = ImageStore(open_datastore(vsphere_env.url(folder), {"cache_dir": vsphere_env.workdir + "/c3"}))
    results = {}

    def claim(name, store):
        for i in range(5):
            try:
                store.ds.mkdir(f"VIC/s/claim-{i}")
                results.setdefault(i, []).append(name)
            except Exists:
                pass
    threads = [threading.Thread(target=claim, args=(n, s)) for n, s in (("a", st), ("b", other))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    other.ds.close()
    assert sorted(results) == list(range(5)) and all(len(v) == 1 for v in results.values())
