"""Making the ``scratch`` base disk of a new image store.

scratch is an ext4 labelled ``containerfs`` holding the minimal OS skeleton that
VIC's createBaseStructure made (exact modes, whatever the umask). The filesystem
is made on a sparse raw file with inode tables zeroed up front (so later kernel
mounts of children have no lazy-init writes to copy into every layer), 256-byte
inodes and no inline_data (what the read path supports), then converted to a
monolithicSparse VMDK (qemu-img skips zero grains).
"""
import math
import os
import shutil
import subprocess
import tempfile

from .errors import InvalidInput, ToolFailed

LABEL = "containerfs"
DEFAULT_CAPACITY = 8_000_000_000  # "8GB" as VIC's --base-image-size default
MIN_CAPACITY = 64 * 1024 * 1024

SKELETON_DIRS = [("etc", 0o755), ("lib", 0o755), ("lib/modules", 0o755), ("proc", 0o555),
                 ("sys", 0o555), ("run", 0o755), (".tether", 0o777)]
SKELETON_FILES = [("etc/hostname", 0o644), ("etc/hosts", 0o644), ("etc/resolv.conf", 0o644)]
SKELETON_SYMLINKS = [("etc/mtab", "/proc/mounts")]

_UNITS = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9,
          "T": 10**12, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text):
    """Bytes from '8GB', '512MiB', '1073741824' (decimal units like docker's FromHumanSize)."""
    if isinstance(text, int):
        return text
    s = str(text).strip().upper().replace(" ", "")
    num = s.rstrip("KMGTIB")
    unit = s[len(num):]
    try:
        value = float(num)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0 or value * _UNITS.get(unit, 1) >= 2 ** 63:
        raise InvalidInput(f"invalid size {text!r}: use e.g. 8GB, 512MiB or a byte count")
    if unit not in _UNITS:
        raise InvalidInput(f"invalid size unit in {text!r}")
    return int(value * _UNITS[unit])


def make_scratch_disk(vmdk_path, capacity=DEFAULT_CAPACITY, workdir=None):
    """Create the scratch VMDK at ``vmdk_path`` (a host path)."""
    capacity = parse_size(capacity)
    if capacity < MIN_CAPACITY:
        raise InvalidInput(f"scratch capacity {capacity} is too small (minimum {MIN_CAPACITY} bytes)")
    capacity -= capacity % (1024 * 1024)  # whole MiB: a clean multiple of sectors and ext4 blocks
    work = tempfile.mkdtemp(prefix="imagefs-scratch-", dir=workdir or os.environ.get("IMAGEFS_WORKDIR"))
    try:
        skel = os.path.join(work, "skel")
        _build_skeleton(skel)
        raw = os.path.join(work, "scratch.raw")
        with open(raw, "wb") as f:
            f.truncate(capacity)
        _run(["mke2fs", "-q", "-F", "-t", "ext4", "-I", "256", "-O", "^inline_data", "-L", LABEL,
              "-E", "lazy_itable_init=0,lazy_journal_init=0,root_owner=0:0", "-d", skel, raw])
        _run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "vmdk", "-o", "subformat=monolithicSparse",
              raw, vmdk_path])
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _build_skeleton(skel):
    os.mkdir(skel)
    os.chmod(skel, 0o755)
    for rel, mode in SKELETON_DIRS:
        p = os.path.join(skel, rel)
        os.makedirs(p, exist_ok=True)
        os.chmod(p, mode)
    for rel, mode in SKELETON_FILES:
        p = os.path.join(skel, rel)
        open(p, "wb").close()
        os.chmod(p, mode)
    for rel, target in SKELETON_SYMLINKS:
        os.symlink(target, os.path.join(skel, rel))
    if os.geteuid() == 0:
        for dirpath, dirnames, filenames in os.walk(skel):
            for name in [*dirnames, *filenames]:
                os.lchown(os.path.join(dirpath, name), 0, 0)


def _run(argv):
    try:
        proc = subprocess.run(argv, capture_output=True, text=True)
    except FileNotFoundError:
        raise ToolFailed(f"{argv[0]} is not installed") from None
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
        raise ToolFailed(f"{argv[0]} failed (exit {proc.returncode}): {tail[0]}")
