"""Helpers for the export tests: images built from directories or layer tars, canonical tree dumps.

An image store here is a plain directory ``store/<name>/<name>.vmdk``; trees are read
back with imagefs's own DiskChain/ImageTree. ``dump_dir`` and ``dump_tree`` describe a
kernel directory tree and an image in the same canonical form, so any applier's result
can be compared with the image it should reproduce.
"""
import hashlib
import io
import os
import stat
import subprocess
import tarfile

from imagefs.datastore.local import LocalReadHandle
from imagefs.layer.writer import write_layer
from imagefs.tree import ROOT_INO, ImageTree
from imagefs.vmdk import DiskChain


class Store:
    """Disks under ``root``: ``<name>/<name>.vmdk``, opened as ImageTrees."""

    def __init__(self, root):
        self.root = str(root)

    def vmdk(self, name):
        return os.path.join(self.root, name, f"{name}.vmdk")

    def tree(self, name):
        chain = DiskChain(f"{name}/{name}.vmdk", lambda p: LocalReadHandle(os.path.join(self.root, p)))
        return ImageTree(chain)

    def base_from_dir(self, name, src, size="64M"):
        """A base disk holding the directory ``src`` (mke2fs -d; sub-second mtimes are lost)."""
        os.makedirs(os.path.join(self.root, name))
        raw = os.path.join(self.root, name, "base.raw")
        subprocess.run(["mke2fs", "-q", "-t", "ext4", "-I", "256", "-O", "^inline_data",
                        "-E", "lazy_itable_init=0,lazy_journal_init=0,root_owner=0:0", "-d", str(src), raw, size],
                       check=True)
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=monolithicSparse",
                        raw, self.vmdk(name)], check=True)
        os.unlink(raw)
        return self.tree(name)

    def layer(self, parent, name, tar_bytes):
        """A child disk of ``parent`` holding the layer tar ``tar_bytes`` (imagefs's layer writer)."""
        os.makedirs(os.path.join(self.root, name))
        write_layer(self.vmdk(parent), self.vmdk(name), io.BytesIO(tar_bytes))
        return self.tree(name)


def members(tar_bytes):
    """{name: (TarInfo, body bytes or None)} of a tar, in a dict that keeps the order."""
    out = {}
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tf:
        for info in tf:
            body = tf.extractfile(info).read() if info.isreg() else None
            out[info.name] = (info, body)
    return out


def _entry(kind, mode, uid, gid, rdev, size, mtime_ns, target, digest, xattrs):
    return {"type": kind, "mode": mode, "uid": uid, "gid": gid, "rdev": rdev, "size": size,
            "mtime_ns": mtime_ns, "target": target, "sha256": digest, "xattrs": xattrs}


def _link_groups(dump, inodes):
    """Replace inode numbers by the first path of each multiply-linked inode."""
    first = {}
    for path in sorted(inodes):
        first.setdefault(inodes[path], path)
    for path, ino in inodes.items():
        dump[path]["link"] = first[ino]


def dump_dir(root, *, skip_xattrs=()):
    """Canonical description of the tree under ``root`` (not the root itself), by relative path."""
    root = os.fsencode(root)
    dump, inodes = {}, {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            st = os.lstat(full)
            kind = stat.S_IFMT(st.st_mode)
            digest = target = None
            if stat.S_ISREG(st.st_mode):
                with open(full, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                target = os.readlink(full)
            xattrs = {os.fsencode(k): os.getxattr(full, k, follow_symlinks=False)
                      for k in os.listxattr(full, follow_symlinks=False) if k not in skip_xattrs}
            dump[rel] = _entry(kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                               st.st_rdev if kind in (stat.S_IFCHR, stat.S_IFBLK) else 0,
                               st.st_size if kind == stat.S_IFREG else None,
                               st.st_mtime_ns, target, digest, xattrs)
            if kind != stat.S_IFDIR and st.st_nlink > 1:
                inodes[rel] = st.st_ino
    _link_groups(dump, inodes)
    return dump


def dump_tree(tree, *, skip_xattrs=()):
    """The same description of an image, read through ImageTree."""
    dump, inodes = {}, {}
    for path, st in tree.walk(ROOT_INO):
        rel = path.lstrip(b"/")
        kind = stat.S_IFMT(st.mode)
        digest = target = None
        if st.is_reg:
            digest = hashlib.sha256(tree.read(st.ino, 0, st.size) if st.size else b"").hexdigest()
        elif st.is_lnk:
            target = tree.readlink(st.ino)
        xattrs = {k: v for k, v in tree.xattrs(st.ino).items() if k.decode() not in skip_xattrs}
        dump[rel] = _entry(kind, stat.S_IMODE(st.mode), st.uid, st.gid, st.rdev,
                           st.size if st.is_reg else None, st.mtime_ns, target, digest, xattrs)
        if not st.is_dir and st.nlink > 1:
            inodes[rel] = st.ino
    _link_groups(dump, inodes)
    return dump

