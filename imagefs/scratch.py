"""Making the ``scratch`` base disk of a new image store.

scratch is an ext4 labelled ``containerfs`` holding the minimal OS skeleton that
VIC's createBaseStructure made (exact modes, whatever the umask). The filesystem
is made on a sparse raw file with inode tables zeroed up front (so later kernel
mounts of children have no lazy-init writes to copy into every layer), 256-byte
inodes and no inline_data (what the read path supports), then converted to a
monolithicSparse VMDK (qemu-img skips zero grains).

A store whose layers ESXi must accept (vmdk/layer_format.py) gets a scratch made of
VMFS-native disks instead: an empty thin ``vmfs`` base (``scratch-base.vmdk``) and
``scratch.vmdk``, a delta of it in the store's format holding the ext4's written
grains, so that nothing of the mostly-zero capacity is stored or uploaded but the
base's descriptor (see make_scratch_disk's ``base``).
"""
import math
import os
import secrets
import shutil
import subprocess
import tempfile

from .errors import InvalidInput, ToolFailed
from .vmdk.flat import write_vmfs_descriptor
from .vmdk.layer_format import DEFAULT_FORMAT, write_delta

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


BASE_NAME = "scratch-base.vmdk"
_ALIGN = 64 * 1024              # data ranges of the raw ext4 are rounded out to this


def make_scratch_disk(vmdk_path, capacity=DEFAULT_CAPACITY, workdir=None, disk_format=DEFAULT_FORMAT,
                      base="flat"):
    """Create the scratch VMDK at ``vmdk_path`` (a host path) in ``disk_format``.

    For an ESXi delta format, ``base`` says what the delta's parent is: "flat" writes
    ``scratch-base.vmdk`` beside it as a thin vmfs disk over a sparse ``-flat.vmdk`` of
    the full capacity; "empty" makes that flat file 0 bytes (for datastores where a
    sparse file would be uploaded whole: the missing tail reads as zeros, for imagefs
    and for qemu); a CID string means the datastore made the thin base itself."""
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
        if disk_format == DEFAULT_FORMAT:
            _run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "vmdk", "-o", "subformat=monolithicSparse",
                  raw, vmdk_path])
        else:
            base_cid = base if base not in ("flat", "empty") else \
                _write_base(os.path.join(os.path.dirname(vmdk_path), BASE_NAME), capacity, base)
            with open(raw, "rb") as f:
                write_delta(vmdk_path, disk_format, capacity, _data_ranges(f.fileno(), capacity), [],
                            _FileReader(f.fileno()), cid=secrets.token_hex(4), parent_cid=base_cid,
                            parent_hint=BASE_NAME)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _write_base(path, capacity, kind):
    """The all-zero base: a thin vmfs disk over a sparse or an empty flat file. Its CID."""
    flat = path.removesuffix(".vmdk") + "-flat.vmdk"
    with open(flat, "wb") as f:
        f.truncate(capacity if kind == "flat" else 0)
    return write_vmfs_descriptor(path, flat, capacity)


def _data_ranges(fd, size):
    """Byte ranges of a sparse file that hold data, rounded out to _ALIGN."""
    ranges, pos = [], 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:                 # ENXIO: no data after pos
            break
        end = os.lseek(fd, start, os.SEEK_HOLE)
        lo, hi = start - start % _ALIGN, min(size, -(-end // _ALIGN) * _ALIGN)
        if ranges and lo <= ranges[-1][1]:
            ranges[-1] = (ranges[-1][0], max(ranges[-1][1], hi))
        else:
            ranges.append((lo, hi))
        pos = end
    return ranges


class _FileReader:
    def __init__(self, fd):
        self.fd = fd

    def pread(self, offset, length):
        return os.pread(self.fd, length, offset)


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
