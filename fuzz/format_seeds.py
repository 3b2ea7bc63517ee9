"""Seed stores in every VMDK format imagefs reads, for the ``formats`` fuzz target.

One datastore, one store per case, each image holding a real ext4 (so a mutated disk is
read the way users read it: the store's look-ups, the tree, the export):

| store       | chain (top first)                                                          | made by |
|-------------|----------------------------------------------------------------------------|---------|
| stream      | child (monolithicSparse) <- scratch (streamOptimized)                      | qemu-img convert, imagefs writer |
| flat        | child (monolithicSparse) <- scratch (monolithicFlat)                       | qemu-img convert |
| twogb       | child (monolithicSparse) <- scratch (twoGbMaxExtentSparse, 3 extents)      | qemu-img convert of a 4.5 GiB ext4, imagefs writer |
| twogbflat   | child <- scratch (twoGbMaxExtentFlat, 3 sparse flat extents)               | qemu-img convert |
| vmfssparse  | l1 (vmfsSparse) <- scratch (vmfsSparse) <- scratch-base (vmfs, flat)       | imagefs store create + writer |
| sesparse    | l1 (seSparse) <- scratch (seSparse) <- scratch-base (vmfs, flat)           | imagefs store create + writer |
| mixed       | l3 (seSparse, hint ``[ds1] ...``) <- l2 (monolithicSparse) <- l1 (vmfsSparse, hint ``/vmfs/volumes/ds1/...``) <- scratch (seSparse) <- scratch-base (vmfs, one ZERO extent) | imagefs writer, the store's format changed between layers |

Built once into the fuzz cache (about a minute: seven layer writes) and reused.
"""
import io
import os
import re
import shutil
import subprocess
import tarfile

from imagefs.datastore import open_datastore
from imagefs.store import ImageStore

from .seeds import BASE, CHILD, STORE, _stage, cached, seeds

VERSION = "1"
DS_NAME = "ds1"                 # the datastore name the hints of the mixed store use
BIG = 4608 << 20                # 4.5 GiB: twoGbMaxExtent* disks of three extents
SMALL = "128MiB"
CASES = ("stream", "flat", "twogb", "twogbflat", "vmfssparse", "sesparse", "mixed")


def _images(ds, store):
    return os.path.join(ds, "VIC", store, "images")


def _set_cid(path, cid):
    """Give the disk named by ``path`` the CID ``cid`` (its text or embedded descriptor)."""
    with open(path, "r+b") as f:
        head = f.read(1 << 16)
        start = head.index(b"# Disk DescriptorFile")
        end = head.find(b"\0", start)
        text = head[start:end if end >= 0 else len(head)]
        new = re.sub(rb"\nCID=[0-9a-fA-F]+\n", b"\nCID=" + cid.encode() + b"\n", text, count=1)
        f.seek(start)
        f.write(new)
        if end < 0:
            f.truncate()


def _cid(path):
    with open(path, "rb") as f:
        return re.search(rb"\nCID=([0-9a-fA-F]+)\n", f.read(1 << 16)).group(1).decode()


def _rewrite(path, pattern, replacement):
    with open(path) as f:
        text = f.read()
    text, n = re.subn(pattern, replacement, text, flags=re.M)
    assert n == 1, (path, pattern)
    with open(path, "w") as f:
        f.write(text)


def _qemu_base(store_dir, raw, fmt, cid):
    """images/scratch of a store: ``raw`` converted to ``fmt`` by qemu-img, with CID ``cid``."""
    d = os.path.join(store_dir, "images", BASE)
    os.makedirs(os.path.join(d, "imageMetadata"))
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "vmdk", "-o", f"subformat={fmt}",
                    raw, os.path.join(d, f"{BASE}.vmdk")], check=True)
    open(os.path.join(d, "manifest"), "wb").close()
    if cid:
        _set_cid(os.path.join(d, f"{BASE}.vmdk"), cid)


def _copy_image(src_store_dir, dst_store_dir, image_id):
    shutil.copytree(os.path.join(src_store_dir, "images", image_id),
                    os.path.join(dst_store_dir, "images", image_id))


def _stage_tar(where):
    """The seed stage (every kind of inode) as a layer tar, xattrs included."""
    stage = os.path.join(where, "stage")
    _stage(stage)
    out = os.path.join(where, "stage.tar")
    subprocess.run(["tar", "--format=posix", "--sparse", "--xattrs", "--xattrs-include=*",
                    "--xattrs-exclude=user.big", "-cf", out, "-C", stage, "."],
                   check=True, capture_output=True)
    shutil.rmtree(stage)
    return out


def _small_tar(name):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for rel, data in ((f"{name}/a", b"a" * 5000), (f"{name}/b", bytes(range(256)) * 300)):
            ti = tarfile.TarInfo(rel)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    buf.seek(0)
    return buf


def build(where, base_seeds):
    ds = os.path.join(where, "ds")
    work = os.path.join(where, "work")
    os.makedirs(work)
    f_dir = os.path.join(base_seeds, "ds", "VIC", STORE)
    raw = os.path.join(base_seeds, "base.raw")
    cid = _cid(os.path.join(f_dir, "images", BASE, f"{BASE}.vmdk"))
    st = ImageStore(open_datastore(ds), workdir=work)

    # qemu-img's formats under the small ext4 of the vmdk target, its child kept
    for store, fmt in (("stream", "streamOptimized"), ("flat", "monolithicFlat")):
        d = os.path.join(ds, "VIC", store)
        _qemu_base(d, raw, fmt, cid)
        _copy_image(f_dir, d, CHILD)

    # three extents each: an ext4 of 4.5 GiB holding the stage, a child written on it
    stage_tar = _stage_tar(work)
    big_stage = os.path.join(work, "big-stage")
    _stage(big_stage)
    big = os.path.join(work, "big.raw")
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-I", "256", "-N", "1024", "-O", "^inline_data",
                    "-E", "lazy_itable_init=0,lazy_journal_init=0,root_owner=0:0", "-d", big_stage, big,
                    str(BIG // 1024) + "K"], check=True)
    _qemu_base(os.path.join(ds, "VIC", "twogb"), big, "twoGbMaxExtentSparse", None)
    st.write_image("twogb", BASE, CHILD, _small_tar("twogb"))
    _qemu_base(os.path.join(ds, "VIC", "twogbflat"), big, "twoGbMaxExtentFlat",
               _cid(os.path.join(_images(ds, "twogb"), BASE, f"{BASE}.vmdk")))
    _copy_image(os.path.join(ds, "VIC", "twogb"), os.path.join(ds, "VIC", "twogbflat"), CHILD)

    # the ESXi formats, as imagefs's store and writer make them
    for store, fmt in (("vmfssparse", "vmfsSparse"), ("sesparse", "seSparse")):
        st.create_store(store, SMALL, disk_format=fmt)
        with open(stage_tar, "rb") as f:
            st.write_image(store, BASE, "l1", f)
    st.create_store("mixed", SMALL, disk_format="seSparse")
    fmt_file = os.path.join(ds, "VIC", "mixed", "diskFormat")
    parent = BASE
    for layer, fmt in (("l1", "vmfsSparse"), ("l2", "monolithicSparse"), ("l3", "seSparse")):
        with open(fmt_file, "w") as f:
            f.write(fmt + "\n")
        with (open(stage_tar, "rb") if layer == "l1" else _small_tar(layer)) as f:
            st.write_image("mixed", parent, layer, f)
        parent = layer
    images = _images(ds, "mixed")
    _rewrite(os.path.join(images, "l1", "l1.vmdk"), r"^parentFileNameHint=.*$",
             f'parentFileNameHint="/vmfs/volumes/{DS_NAME}/VIC/mixed/images/scratch/scratch.vmdk"')
    _rewrite(os.path.join(images, "l3", "l3.vmdk"), r"^parentFileNameHint=.*$",
             f'parentFileNameHint="[{DS_NAME}] VIC/mixed/images/l2/l2.vmdk"')
    base = os.path.join(images, BASE, "scratch-base.vmdk")
    _rewrite(base, r'^RW (\d+) VMFS ".*"$', r"RW \1 ZERO")
    os.unlink(os.path.join(images, BASE, "scratch-base-flat.vmdk"))
    for lock in _locks(ds):
        os.unlink(lock)
    shutil.rmtree(work)


def _locks(ds):
    return [os.path.join(d, n) for d, _, names in os.walk(ds) for n in names if n.endswith(".lock")]


def format_seeds(cache):
    """The seed directory (made if missing): ds/ with one store per case."""
    base_seeds = seeds(cache)
    return cached(cache, f"format-seeds-v{VERSION}", lambda where: build(where, base_seeds),
                  {"version": VERSION, "cases": CASES})
