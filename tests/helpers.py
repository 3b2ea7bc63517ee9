"""Small shared test helpers: building tars in memory, flattening chains, loop mounts."""
import contextlib
import hashlib
import io
import os
import subprocess
import tarfile
import tempfile

EMPTY_SUM = "sha256:" + hashlib.sha256(b"").hexdigest()


def make_tar(entries, fmt=tarfile.PAX_FORMAT):
    """Tar bytes from a list of (name, kind, options) tuples.

    kind: 'file' (data=bytes), 'dir', 'symlink' (target=), 'link' (target=), 'fifo',
    'chr'/'blk' (major=, minor=); options may set mode, uid, gid, mtime, xattrs.
    """
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for name, kind, opts in entries:
            ti = tarfile.TarInfo(name)
            ti.mtime = opts.get("mtime", 1700000000)
            ti.uid, ti.gid = opts.get("uid", 0), opts.get("gid", 0)
            data = None
            if kind == "file":
                data = opts.get("data", b"")
                ti.size = len(data)
                ti.mode = opts.get("mode", 0o644)
            elif kind == "dir":
                ti.type, ti.mode = tarfile.DIRTYPE, opts.get("mode", 0o755)
            elif kind == "symlink":
                ti.type, ti.linkname, ti.mode = tarfile.SYMTYPE, opts["target"], 0o777
            elif kind == "link":
                ti.type, ti.linkname, ti.mode = tarfile.LNKTYPE, opts["target"], opts.get("mode", 0o644)
            elif kind == "fifo":
                ti.type, ti.mode = tarfile.FIFOTYPE, opts.get("mode", 0o644)
            elif kind in ("chr", "blk"):
                ti.type = tarfile.CHRTYPE if kind == "chr" else tarfile.BLKTYPE
                ti.devmajor, ti.devminor, ti.mode = opts["major"], opts["minor"], opts.get("mode", 0o660)
            else:
                raise ValueError(kind)
            if "xattrs" in opts:
                ti.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in opts["xattrs"].items()}
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def one_line_error(proc):
    """The one ``imagefs: ...`` line a failed command printed (and no traceback)."""
    assert proc.returncode != 0
    lines = proc.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("imagefs: "), proc.stderr
    assert b"Traceback" not in proc.stderr
    return lines[0]


def sha256(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def run(argv, **kw):
    return subprocess.run(argv, check=True, capture_output=True, **kw)


@contextlib.contextmanager
def flattened_mount(vmdk_path):
    """The chain ending at ``vmdk_path`` flattened by qemu-img and loop-mounted read-only
    by the kernel: an independent second reader of a layer."""
    with tempfile.TemporaryDirectory(prefix="imagefs-oracle-", dir="/var/tmp") as tmp:
        raw = os.path.join(tmp, "flat.raw")
        mnt = os.path.join(tmp, "mnt")
        os.mkdir(mnt)
        run(["qemu-img", "convert", "-U", "-O", "raw", vmdk_path, raw])
        run(["mount", "-o", "loop,ro,noload", "-t", "ext4", raw, mnt])
        try:
            yield mnt
        finally:
            subprocess.run(["umount", mnt], check=False)
