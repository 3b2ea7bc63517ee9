import contextlib
import hashlib
import os
import subprocess
import tempfile
from dataclasses import dataclass

import pytest


# --- layer writer fixtures ---
# A small base disk made the way scratch is (ext4 in a monolithicSparse VMDK, inode tables
# zeroed) holding the scratch skeleton plus a little "lower layer" content, and an
# independent second reader of written layers (qemu-img flattens, the kernel mounts).

LAYER_BASE_LOWER_FILES = ("lower/gone", "lower/gonedir/x", "lower/keep", "opq/old", "opq/sub/old",
                          "f2d", "d2f/x", "usr/lib/liba")


@dataclass
class LayerBaseDisk:
    vmdk: str           # <dir>/base/base.vmdk
    sha256: str         # of the vmdk file as made
    mtime_ns: int

    def assert_unchanged(self):
        assert os.stat(self.vmdk).st_mtime_ns == self.mtime_ns
        assert layer_file_sha256(self.vmdk) == self.sha256


def layer_file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _make_layer_base_disk(where, size):
    skel = os.path.join(where, "skel")
    for d, mode in (("etc", 0o755), ("lib/modules", 0o755), ("proc", 0o555), ("sys", 0o555),
                    ("run", 0o755), (".tether", 0o777), ("usr/lib", 0o755)):
        os.makedirs(os.path.join(skel, d), exist_ok=True)
        os.chmod(os.path.join(skel, d), mode)
    for f in ("etc/hostname", "etc/hosts", "etc/resolv.conf"):
        open(os.path.join(skel, f), "wb").close()
    os.symlink("/proc/mounts", os.path.join(skel, "etc/mtab"))
    os.symlink("/usr/lib", os.path.join(skel, "libx"))
    for f in LAYER_BASE_LOWER_FILES:
        path = os.path.join(skel, f)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as out:
            out.write(b"lower " + f.encode())
    raw = os.path.join(where, "base.raw")
    os.mkdir(os.path.join(where, "base"))
    vmdk = os.path.join(where, "base", "base.vmdk")
    subprocess.run(["mke2fs", "-q", "-t", "ext4", "-I", "256", "-O", "^inline_data", "-L", "containerfs",
                    "-E", "lazy_itable_init=0,lazy_journal_init=0,root_owner=0:0", "-d", skel, raw, size],
                   check=True)
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=monolithicSparse",
                    raw, vmdk], check=True)
    os.unlink(raw)
    return LayerBaseDisk(vmdk, layer_file_sha256(vmdk), os.stat(vmdk).st_mtime_ns)


@pytest.fixture(scope="session")
def layer_base_disk(tmp_path_factory):
    """A 256 MiB scratch-like base disk at <tmp>/base/base.vmdk; never to be written."""
    return _make_layer_base_disk(str(tmp_path_factory.mktemp("layer-base")), "256M")


@pytest.fixture
def layer_small_base_disk(tmp_path):
    """The same, 16 MiB: for running out of space."""
    return _make_layer_base_disk(str(tmp_path), "16M")


@contextlib.contextmanager
def _layer_flat_view(vmdk):
    subprocess.run(["qemu-img", "check", "-q", vmdk], check=True)
    with tempfile.TemporaryDirectory(prefix="imagefs-flat-", dir="/var/tmp") as tmp:
        raw, mnt = os.path.join(tmp, "flat.raw"), os.path.join(tmp, "mnt")
        os.mkdir(mnt)
        subprocess.run(["qemu-img", "convert", "-O", "raw", vmdk, raw], check=True)
        fsck = subprocess.run(["e2fsck", "-fn", raw], capture_output=True, text=True)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
        subprocess.run(["mount", "-o", "loop,ro", "-t", "ext4", raw, mnt], check=True)
        try:
            yield mnt
        finally:
            subprocess.run(["umount", mnt], check=True)


@pytest.fixture
def layer_flat_view():
    """``with layer_flat_view(vmdk) as root:`` the chain ending at vmdk, checked
    (qemu-img check, e2fsck -fn of the flattened raw) and kernel-mounted read-only."""
    return _layer_flat_view

# --- end of layer writer fixtures ---


# --- the vSphere simulator and the two backends ---
# One simulator per session (started on first use); every test that uses a vSphere
# datastore gets a folder of its own in the simulator's datastore.

@pytest.fixture(scope="session")
def vcsim(tmp_path_factory):
    import vsphere_sim
    sim = vsphere_sim.start(str(tmp_path_factory.mktemp("vcsim")))
    yield sim
    sim.stop()


@pytest.fixture
def vsphere_env(vcsim, monkeypatch, tmp_path):
    """The environment a user would set for the simulator: password, CA, a cache."""
    import vsphere_sim
    monkeypatch.setenv("IMAGEFS_VSPHERE_PASSWORD", vsphere_sim.PASSWORD)
    monkeypatch.setenv("IMAGEFS_VSPHERE_CA_FILE", vcsim.ca_file)
    monkeypatch.setenv("IMAGEFS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("IMAGEFS_VSPHERE_INSECURE", raising=False)
    return vcsim


@dataclass
class Backend:
    name: str           # "local" or "vsphere"
    spec: str           # what --datastore / open_datastore takes
    root: str           # the host directory holding the datastore's files (to poke at in tests)


@pytest.fixture(params=["local", "vsphere"])
def backend(request, tmp_path):
    """A fresh, empty datastore of each backend."""
    if request.param == "local":
        return Backend("local", str(tmp_path / "ds"), str(tmp_path / "ds"))
    sim = request.getfixturevalue("vsphere_env")
    folder = f"t-{os.path.basename(str(tmp_path))}-{os.getpid()}"
    return Backend("vsphere", sim.url(folder), os.path.join(sim.ds_dir, folder))
