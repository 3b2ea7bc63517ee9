"""VMDK fixtures for the format tests: disks made by qemu-img for the formats it writes,
deltas of the ESXi formats made by imagefs's writers (and checked by qemu-img, which
reads both), and helpers that read a chain through qemu and through imagefs."""
import os
import random
import re
import subprocess

from imagefs.datastore.local import LocalReadHandle
from imagefs.vmdk import DiskChain
from imagefs.vmdk.flat import write_vmfs_descriptor
from imagefs.vmdk.layer_format import seal_as

MiB = 1 << 20
QEMU_FORMATS = ("monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat",
                "streamOptimized")
BASE_FORMATS = QEMU_FORMATS + ("vmfs",)
DELTA_FORMATS = ("monolithicSparse", "vmfsSparse", "seSparse")


def run(argv):
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def make_raw(path, size, seed, regions):
    """A sparse raw disk of ``size`` with random bytes in ``regions`` [(offset, length)]."""
    rnd = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for off, length in regions:
            f.seek(off)
            f.write(rnd.randbytes(length))


def make_base(root, name, fmt, raw):
    """``root/name/name.vmdk`` in ``fmt`` holding the raw disk ``raw``; returns its rel path."""
    d = os.path.join(root, name)
    os.makedirs(d, exist_ok=True)
    top = os.path.join(d, f"{name}.vmdk")
    if fmt in ("vmfs", "vmfsThin"):
        flat = os.path.join(d, f"{name}-flat.vmdk")
        run(["cp", "--sparse=always", raw, flat])
        write_vmfs_descriptor(top, flat, os.path.getsize(raw))
        if fmt == "vmfsThin":
            set_value(top, "createType", '"vmfsThin"')
    else:
        run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "vmdk", "-o", f"subformat={fmt}", raw, top])
    return f"{name}/{name}.vmdk"


def make_child(root, parent_rel, name, fmt, writes, seed):
    """A delta ``name`` of ``parent_rel`` in ``fmt`` holding ``writes`` [(offset, length)]
    of random bytes (qemu-io writes a monolithicSparse delta; seal_as converts it)."""
    d = os.path.join(root, name)
    os.makedirs(d, exist_ok=True)
    top = os.path.join(d, f"{name}.vmdk")
    hint = os.path.relpath(os.path.join(root, parent_rel), d)
    run(["qemu-img", "create", "-q", "-f", "vmdk", "-b", hint, "-F", "vmdk", top])
    rnd = random.Random(seed)
    cmds = []
    for off, length in writes:
        cmds += ["-c", f"write -P {rnd.randrange(1, 255)} {off} {length}"]
    if cmds:
        run(["qemu-io", "-f", "vmdk", *cmds, top])
    seal_as(top, fmt, hint)
    return f"{name}/{name}.vmdk"


def set_value(path, key, value):
    """Rewrite ``key=`` in a text descriptor."""
    with open(path) as f:
        text = f.read()
    text, n = re.subn(rf"^{key}=.*$", f"{key}={value}", text, flags=re.M)
    if not n:
        text = text.replace("createType=", f"{key}={value}\ncreateType=", 1)
    with open(path, "w") as f:
        f.write(text)


def chain(root, rel, names=None):
    return DiskChain(rel, lambda p: LocalReadHandle(os.path.join(root, p)), names)


def qemu_raw(root, rel, out):
    run(["qemu-img", "convert", "-U", "-O", "raw", os.path.join(root, rel), out])
    return out


def assert_reads_equal(c, raw, windows=None, piece=3 * MiB + 512):
    """Our chain reads the same bytes as the raw file, whole or in ``windows``."""
    with open(raw, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        assert c.size == size
        for lo, hi in windows or [(0, size)]:
            pos = lo
            while pos < hi:
                n = min(piece, hi - pos)
                assert c.pread(pos, n) == os.pread(f.fileno(), n, pos), f"differs at {pos}"
                pos += n
