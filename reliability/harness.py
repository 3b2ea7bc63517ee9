"""What the kill campaign checks after every kill, and the layers it writes.

- ``leftovers``: everything a writer could have left behind, found from the outside:
  files in the work directory base, mounts and loop devices inside it or inside the
  datastore, qemu-storage-daemon/fuse2fs/qemu-img/e2fsck/debugfs processes naming
  either, half-made image directories, claim files and temporary files in the stores.
- ``snapshot``: an image's tree as users read it (names, types, modes, owners, sizes,
  times, link targets, xattrs, data sha256, hardlink groups), through the same reader
  that serves them; two correct writes of one tar onto one parent give equal snapshots.
- ``campaign_layers``: a parent layer and a layer onto it that uses every feature the
  writer has (whiteouts, an opaque directory, hardlinks, symlinks, xattrs, a device,
  a fifo, a later entry replacing an earlier one), several MiB so that the stream passes several crash points.
"""
import glob
import hashlib
import io
import os
import stat
import tarfile

from imagefs.datastore import open_datastore
from imagefs.store import ImageStore
from imagefs.tree import ROOT_INO, ImageTree

HELPER_NAMES = ("qemu-storage-daemon", "fuse2fs", "qemu-img", "e2fsck", "debugfs")


# --- leftovers ---------------------------------------------------------------------------------
def leftovers(work_base, datastore):
    """Every trace of a writer under ``work_base`` or ``datastore`` (a list of lines; [] is clean)."""
    roots = [os.path.abspath(work_base), os.path.abspath(datastore)]
    out = [f"work file {os.path.join(work_base, n)}" for n in sorted(os.listdir(work_base))]
    with open("/proc/self/mountinfo", errors="surrogateescape") as f:
        for line in f:
            point = _unescape(line.split()[4])
            if any(_inside(point, r) for r in roots):
                out.append(f"mount {point}")
    for backing in glob.glob("/sys/block/loop*/loop/backing_file"):
        try:
            with open(backing, errors="surrogateescape") as f:
                target = f.read().strip()
        except OSError:
            continue
        if any(_inside(target.removesuffix(" (deleted)"), r) for r in roots):
            out.append(f"loop device /dev/{backing.split('/')[3]} on {target}")
    for pid in [p for p in os.listdir("/proc") if p.isdigit()]:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if argv and os.path.basename(argv[0]).decode(errors="replace") in HELPER_NAMES and \
                any(os.fsencode(r) in arg for r in roots for arg in argv[1:]):
            out.append(f"process {pid} {b' '.join(argv[:2]).decode(errors='replace')}")
    out += store_debris(datastore)
    return out


def store_debris(datastore):
    """Half-made images, claim files and temporary files in every store of ``datastore``."""
    out = []
    for images in sorted(glob.glob(os.path.join(glob.escape(datastore), "VIC", "*", "images"))):
        for image_id in sorted(os.listdir(images)):
            d = os.path.join(images, image_id)
            if not os.path.isdir(d):
                out.append(f"stray file {d}")
                continue
            if not os.path.exists(os.path.join(d, "manifest")):
                out.append(f"half-made image {d}")
            if os.path.exists(os.path.join(d, ".writing")):
                out.append(f"claim file {d}/.writing")
            for dirpath, _dirs, files in os.walk(d):
                out += [f"temporary file {os.path.join(dirpath, n)}" for n in files if ".tmp-" in n]
    return out


def _inside(path, root):
    return path == root or path.startswith(root.rstrip("/") + "/")


def _unescape(field):
    import re
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


# --- what an image holds ---------------------------------------------------------------------------
def snapshot(datastore, store, image_id):
    """``{path: description}`` of every entry of the image, read through DiskChain + ImageTree."""
    st = ImageStore(open_datastore(datastore))
    tree = st.tree(store, image_id)
    return tree_snapshot(tree)


def tree_snapshot(tree: ImageTree):
    out, first_path = {}, {}
    stack = [(ROOT_INO, b"")]
    while stack:                                    # iterative: a deep tree must not recurse
        ino, prefix = stack.pop()
        for name, child in sorted(tree.readdir(ino)):
            path = prefix + b"/" + name
            s = tree.stat(child)
            d = {"fmt": stat.S_IFMT(s.mode), "mode": stat.S_IMODE(s.mode), "uid": s.uid, "gid": s.gid,
                 "mtime": s.mtime_ns, "xattrs": dict(sorted(tree.xattrs(child).items()))}
            if s.is_dir:
                stack.append((child, path))
            else:
                d["nlink"] = s.nlink
                d["links"] = first_path.setdefault(child, path)
            if s.is_reg:
                d["size"] = s.size
                d["sha256"] = _data_sha256(tree, child, s.size)
            elif s.is_lnk:
                d["target"] = tree.readlink(child)
            elif stat.S_ISCHR(s.mode) or stat.S_ISBLK(s.mode):
                d["rdev"] = s.rdev
            out[path] = d
    return out


def _data_sha256(tree, ino, size):
    h = hashlib.sha256()
    offset = 0
    while offset < size:
        block = tree.read(ino, offset, min(1 << 20, size - offset))
        if not block:
            break
        h.update(block)
        offset += len(block)
    return h.hexdigest()


def differences(want, got, limit=5):
    """Lines naming how two snapshots differ (empty when equal)."""
    out = []
    for path in sorted(set(want) | set(got)):
        if want.get(path) != got.get(path):
            out.append(f"{path!r}: expected {want.get(path)}, found {got.get(path)}")
            if len(out) >= limit:
                break
    return out


# --- the layers written ---------------------------------------------------------------------------
def _tar(entries):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for ti, data in entries:
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _info(name, kind=tarfile.REGTYPE, mode=0o644, size=0, **extra):
    ti = tarfile.TarInfo(name)
    ti.type, ti.mode, ti.size, ti.mtime = kind, mode, size, 1_700_000_000
    for key, value in extra.items():
        setattr(ti, key, value)
    return ti


def campaign_layers(data_mib=9):
    """(parent tar, layer tar) bytes; the layer carries about ``data_mib`` MiB of data."""
    rnd = hashlib.sha256(b"imagefs kill campaign")
    def blob(n):
        out = bytearray()
        while len(out) < n:
            out += rnd.digest() * 64
            rnd.update(b".")
        return bytes(out[:n])

    parent = _tar([
        (_info("app", tarfile.DIRTYPE, 0o755), None),
        *[(_info(f"app/old{i}", size=1000), blob(1000)) for i in range(20)],
        (_info("app/lib", tarfile.DIRTYPE, 0o755), None),
        *[(_info(f"app/lib/l{i}", size=5000), blob(5000)) for i in range(10)],
        (_info("gone", tarfile.DIRTYPE, 0o755), None),
        (_info("gone/x", size=3), b"old"),
        (_info("replaced", size=4), b"file"),
    ])
    files = [(_info(f"data/f{i:03d}", size=len(b), uid=1000 + i, gid=50, mode=0o640), b)
             for i, b in enumerate(blob(data_mib * (1 << 20) // 60) for _ in range(60))]
    layer = _tar([
        (_info("data", tarfile.DIRTYPE, 0o750, uid=7, gid=8), None),
        *files,
        (_info("data/link-to-f001", tarfile.LNKTYPE, linkname="data/f001"), None),
        (_info("data/sym", tarfile.SYMTYPE, 0o777, linkname="f002"), None),
        (_info("data/dev", tarfile.CHRTYPE, 0o620, devmajor=4, devminor=1), None),
        (_info("data/fifo", tarfile.FIFOTYPE, 0o600), None),
        (_info("data/small", size=5), b"small"),
        (_info("data/xattr", size=1, pax_headers={"SCHILY.xattr.user.k": "v",
                                                    "SCHILY.xattr.trusted.t": "t"}), b"x"),
        (_info("app", tarfile.DIRTYPE, 0o755), None),         # (gives the dirs changed below an mtime)
        (_info("app/.wh.old3"), None),
        (_info("app/lib", tarfile.DIRTYPE, 0o755), None),
        (_info("app/lib/.wh..wh..opq"), None),
        (_info("app/lib/new", size=3), b"new"),
        (_info(".wh.gone"), None),
        (_info("replaced", tarfile.DIRTYPE, 0o700), None),
        (_info("replaced/inside", size=2), b"in"),
        (_info("data/f010", size=7, mode=0o600), b"replace"),     # a later entry replaces an earlier one
    ])
    return parent, layer
