"""The commit's write and fsync order, seen in a traced run (strace), as docs/design.md promises.

A power cut cannot be staged here, but what survives one follows from the order of
fsyncs and renames: the disk file, then each metadata file and its directory, then the
image directory, then the manifest (its file, its rename, its directory), then images/.
"""
import os
import re
import shutil
import subprocess
import sys

import pytest

from helpers import make_tar

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("strace"), reason="needs root and strace")

_CALL = re.compile(r'^(?:\[pid\s+\d+\] |\d+\s+)?(\w+)\((.*)\)\s+=\s+(-?\d+)')
_FD_PATH = re.compile(r'^\d+<(.*)>$')
_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')


def _events(log, image_dir):
    """(call, path) of every fsync, rename (its target) and unlink that touches the image or images/."""
    images = os.path.dirname(image_dir)
    out = []
    for line in log.splitlines():
        m = _CALL.match(line)
        if not m or int(m.group(3)) < 0:
            continue
        call, args = m.group(1), m.group(2)
        if call in ("fsync", "fdatasync"):
            fd = _FD_PATH.match(args.split(",")[0])
            paths = [fd.group(1)] if fd else []
        else:
            call = {"renameat": "rename", "renameat2": "rename", "unlinkat": "unlink"}.get(call, call)
            paths = [p for p in _QUOTED.findall(args) if p.startswith(images)][-1:]   # a rename's target
        for path in paths:
            if path == images or path.startswith(images + "/"):
                out.append((call, os.path.relpath(path, images)))
    return out


def test_commit_order(tmp_path):
    ds, work = tmp_path / "ds", tmp_path / "work"
    work.mkdir()
    env = dict(os.environ, IMAGEFS_WORKDIR=str(work))
    base = [sys.executable, "-m", "imagefs", "--datastore", str(ds)]
    subprocess.run(base + ["store", "create", "s", "--capacity", "256MiB"], check=True, env=env)
    tar = tmp_path / "l.tar"
    tar.write_bytes(make_tar([("f", "file", {"data": b"data"})]))
    trace = tmp_path / "trace"
    subprocess.run(["strace", "-f", "-qq", "-y", "-o", str(trace), "-e",
                    "trace=fsync,fdatasync,rename,renameat,renameat2,unlink,unlinkat",
                    *base, "image", "write", "s", "scratch", "x", str(tar), "--meta", "a=1", "--meta", "b=2"],
                   check=True, env=env, capture_output=True)
    image_dir = str(ds / "VIC" / "s" / "images" / "x")
    events = _events(trace.read_text(errors="replace"), image_dir)

    def first(call, path):
        return events.index((call, path))

    def last(call, path):
        return len(events) - 1 - events[::-1].index((call, path))

    disk = first("fsync", "x/x.vmdk")
    metas = [last("rename", f"x/imageMetadata/{k}") for k in ("a", "b")]
    meta_dir = last("fsync", "x/imageMetadata")
    manifest = first("rename", "x/manifest")
    # the disk, then the metadata (each file fsynced before its rename, then its directory)
    for k, renamed in zip("ab", metas):
        tmp = next(p for c, p in events[:renamed] if c == "fsync" and p.startswith(f"x/imageMetadata/{k}.tmp-"))
        assert first("fsync", tmp) < renamed
    assert disk < min(metas) and max(metas) < meta_dir
    # the image directory (the disk's and imageMetadata's entries), then the manifest
    image_dir_synced = [i for i, e in enumerate(events) if e == ("fsync", "x")]
    assert any(meta_dir < i < manifest for i in image_dir_synced)
    manifest_tmp = events[manifest - 1]
    assert manifest_tmp[0] == "fsync" and manifest_tmp[1].startswith("x/manifest.tmp-")
    # after the manifest: its directory, then images/ itself; nothing else is written into the image
    assert any(i > manifest for i in image_dir_synced)
    assert last("fsync", ".") > max(i for i in image_dir_synced)
    after = [e for e in events[manifest + 1:] if e[0] in ("rename", "unlink")]
    assert after == [("unlink", "x/.writing")]                 # the claim goes last
