"""Fixtures shared by the export tests: VIC's diff_test trees and a tree with every kind of entry."""
import os
import struct

import pytest

from export_helpers import Store
from helpers import make_tar

MTIME = 1_600_000_000
A = b"The mollusk lingers with its wandering eye\n"
B = b"The waking of all creatures that live on the land\n"

# VIC lib/archive diff_test.go fixture
DIRS = ["original", "add", "exclude", "include"]
ORIGINAL = ["file1", "file2", "file3", "file4", "original/file1", "original/file2", "original/remove",
            "exclude/excludeme", "exclude/includeme", "excludeme", "include/excludeme", "include/includeme"]
ADDED = ["added1", "added2", "add/file1", "add/file2"]
CHANGED = ["file1", "original/file2", "exclude/excludeme", "exclude/includeme", "include/excludeme",
           "include/includeme", "excludeme"]
REMOVED = ["file2", "original/file1", "original/remove"]
EXCLUDED_KEYS = ["/exclude", "/excludeme", "/include/excludeme"]      # filter keys, as VIC wrote them
INCLUDED_KEYS = ["/exclude/includeme", "/include/"]
VIC_CHANGES = {
    "/add": "C", "/add/file1": "A", "/add/file2": "A", "/added1": "A", "/added2": "A",
    "/exclude": "C", "/exclude/excludeme": "C", "/exclude/includeme": "C", "/excludeme": "C",
    "/file1": "C", "/file2": "D", "/include": "C", "/include/excludeme": "C", "/include/includeme": "C",
    "/original": "C", "/original/file1": "D", "/original/file2": "C", "/original/remove": "D",
}


def write_file(root, rel, data, mode=0o755, mtime=MTIME):
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, mode)
    os.utime(path, (mtime, mtime))


def vic_dir(root, new):
    for d in DIRS:
        os.makedirs(os.path.join(root, d))
    for f in ORIGINAL:
        if not (new and f in REMOVED):
            write_file(root, f, B if new and f in CHANGED else A)
    if new:
        for f in ADDED:
            write_file(root, f, B)
    return root


def vic_layer_tar():
    entries = [(f, "file", {"data": B, "mode": 0o755, "mtime": MTIME}) for f in ADDED + CHANGED]
    entries += [(os.path.join(os.path.dirname(f), ".wh." + os.path.basename(f)), "file", {}) for f in REMOVED]
    return make_tar(entries)


@pytest.fixture(scope="module", params=["unrelated", "chain"])
def vic(request, tmp_path_factory):
    """(new, old) trees of VIC's fixture: two separate images, or a base and a layer on it."""
    tmp = tmp_path_factory.mktemp(f"vic-{request.param}")
    store = Store(tmp / "store")
    old = store.base_from_dir("old", vic_dir(str(tmp / "old"), new=False))
    if request.param == "unrelated":
        new = store.base_from_dir("new", vic_dir(str(tmp / "new"), new=True))
    else:
        new = store.layer("old", "new", vic_layer_tar())
    return new, old


# --- a tree with every kind of entry -------------------------------------------------
CAP_NET_BIND = struct.pack("<5I", 0x02000001, 1 << 10, 0, 0, 0)     # vfs_cap_data v2, effective
BIG = bytes(range(256)) * (3 * 4096 + 7)        # > 3 MiB: several export chunks
NON_UTF8 = b"caf\xe9"
LONG = "n" * 200
DEEP = "/".join(["d" * 60] * 5)


def rich_dir(root):
    """A source tree with owners, modes, devices, links, xattrs, odd names, a sparse file and a socket."""
    import socket
    r = os.fsencode(root)

    def p(rel):
        return os.path.join(r, os.fsencode(rel))

    for d in ["files", "dirs/private", "dirs/ro", "dirs/sticky", "links", "special", "xattrs/dir",
              "names/" + DEEP]:
        os.makedirs(p(d))
    for rel, data, mode, owner in [("files/empty", b"", 0o644, (0, 0)), ("files/small", b"hello\n", 0o644, (0, 0)),
                                   ("files/big", BIG, 0o644, (0, 0)), ("files/setuid", b"#!/bin/sh\n", 0o4755, (0, 0)),
                                   ("files/owned", b"mine", 0o640, (1000, 50)),
                                   ("files/nobody", b"nobody", 0o600, (65534, 65534)),
                                   ("dirs/ro/inside", b"in", 0o444, (0, 0)), ("links/a", b"linked", 0o644, (7, 8)),
                                   ("xattrs/f", b"x", 0o644, (0, 0)), ("xattrs/empty", b"", 0o644, (0, 0)),
                                   ("names/caf\u00e9-\u00fc", b"utf8", 0o644, (0, 0)), ("names/" + LONG, b"l", 0o644, (0, 0)),
                                   ("names/" + DEEP + "/leaf", b"deep", 0o644, (0, 0))]:
        with open(p(rel), "wb") as f:
            f.write(data)
        os.chown(p(rel), *owner)
        os.chmod(p(rel), mode)
    with open(os.path.join(r, b"names", NON_UTF8), "wb") as f:
        f.write(b"latin-1 name")
    with open(p("files/sparse"), "wb") as f:
        f.truncate(8 << 20)
        f.seek(4 << 20)
        f.write(b"middle of nowhere")
    os.link(p("links/a"), p("links/b"))
    os.link(p("links/a"), p("links/c"))
    os.symlink("a", p("links/sym"))
    os.symlink("x" * 100, p("links/longsym"))
    os.symlink("/etc/passwd", p("links/abs"))
    os.mkfifo(p("special/fifo"))
    os.mknod(p("special/null"), 0o666 | 0o020000, os.makedev(1, 3))
    os.mknod(p("special/sda"), 0o660 | 0o060000, os.makedev(8, 0))
    os.mknod(p("special/big"), 0o600 | 0o020000, os.makedev(300, 70000))
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(p("special/sock"))
    sock.close()
    os.setxattr(p("xattrs/f"), "user.text", b"hello")
    os.setxattr(p("xattrs/f"), "user.bin", b"\xff\x00\x80bin")
    os.setxattr(p("xattrs/f"), "trusted.t", b"t")
    os.setxattr(p("xattrs/f"), "security.capability", CAP_NET_BIND)
    os.setxattr(p("xattrs/empty"), "user.empty", b"")
    os.setxattr(p("xattrs/dir"), "user.d", b"dir")
    os.chmod(p("dirs/private"), 0o700)
    os.chmod(p("dirs/ro"), 0o555)
    os.chmod(p("dirs/sticky"), 0o1777)
    for dirpath, dirnames, filenames in os.walk(r, topdown=False):
        for name in filenames + dirnames + [b""]:
            os.utime(os.path.join(dirpath, name), (MTIME, MTIME), follow_symlinks=False)
    return root


RICH_LAYER = [
    ("files/.wh.small", "file", {}),
    ("dirs/.wh.private", "file", {}),
    ("dirs/private/", "dir", {"mode": 0o750}),
    ("dirs/private/fresh", "file", {"data": b"fresh"}),
    ("dirs/sticky/", "dir", {"mode": 0o1777, "uid": 5}),
    ("links/d", "link", {"target": "links/a"}),
    ("xattrs/f", "file", {"data": b"x", "xattrs": {"user.bin": "\udcff\x00\udc80new", "user.text": "caf\u00e9"}}),
    ("files/ns", "file", {"data": b"ns", "mtime": 1700000000.5}),
    ("files/setuid", "symlink", {"target": "small"}),
    ("files/big", "file", {"data": BIG[::-1]}),
    ("special/new", "chr", {"major": 4, "minor": 5}),
    ("names/new-caf\udce9", "file", {"data": b"odd"}),
]


@pytest.fixture(scope="module")
def rich(tmp_path_factory):
    """(store, base tree of rich_dir, a layer of RICH_LAYER on it)."""
    tmp = tmp_path_factory.mktemp("rich")
    store = Store(tmp / "store")
    base = store.base_from_dir("base", rich_dir(str(tmp / "src")), size="128M")
    layer = store.layer("base", "layer", make_tar(RICH_LAYER))
    return store, base, layer
