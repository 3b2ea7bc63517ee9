"""Layer tars made by independent tools (GNU tar pax and gnu formats, bsdtar, Python's
tarfile), plain and gzip'd, imported with ImageStore.write_image and compared with the
tree they were made from, as the kernel reads the flattened chain.

Each tool carries a different subset of the metadata; TOOLS says what each is expected to
carry and test_tar_carries_what_the_tool_promises checks the tars really do, so that the
import tests compare exactly what the format can transport (mtime precision, xattrs,
POSIX ACLs, sparseness).
"""
import hashlib
import os
import stat
import struct
import subprocess
import tarfile

import pytest
from helpers import flattened_mount, sha256

from imagefs.datastore import open_datastore
from imagefs.layer import writer as layer_writer
from imagefs.layer.deferred import DeferredOps
from imagefs.store import ImageStore

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (owners, device nodes, loop mounts)")

NS = 1_700_000_000_123_456_789
CAP = struct.pack("<IIIII", 0x02000001, 1 << 10, 0, 0, 0)       # cap_net_bind_service=ep
SPARSE_SIZE = 50_000_000
SPARSE_AT = 25_000_000
SPARSE_DATA = b"a few bytes in the middle of nowhere"
ODD_NAME = "odd name  with spaces !#$%&'()+,;=@[]^`{}~\\\"-end"
CAP_NAME = 'cap tool "quoted"'
ACL_XATTRS = ("system.posix_acl_access", "system.posix_acl_default")
TREE = "tree"
LOCALE_ENV = {**os.environ, "LC_ALL": "C.UTF-8"}

# What each tool puts in its tar: ns mtimes, xattrs (SCHILY.xattr.*), POSIX ACLs (as
# SCHILY.acl.* text and/or system.posix_acl_* xattrs), sparse files as sparse entries.
TOOLS = {
    "gnutar-pax": {"ns": True, "xattrs": True, "acls": True, "sparse": True},
    "gnutar-gnu": {"ns": False, "xattrs": False, "acls": False, "sparse": True},
    "bsdtar-pax": {"ns": True, "xattrs": True, "acls": True, "sparse": True},
    "pytarfile-pax": {"ns": True, "xattrs": True, "acls": True, "sparse": False},
}
# (tool, gzip'd, writer): every tool and its gzip'd tar with the kernel writer; the GNU pax
# tar (the richest) also through fuse2fs, and through fuse2fs + the deferred debugfs pass
# (which bsdtar's and tarfile's tars also take: other names and xattr encodings for debugfs).
CASES = [(tool, gz, "kernel") for tool in TOOLS for gz in (False, True)] + [
    ("gnutar-pax", False, "fuse2fs"),
    ("gnutar-pax", False, "fuse2fs-deferred"),
    ("bsdtar-pax", True, "fuse2fs-deferred"),
    ("pytarfile-pax", False, "fuse2fs-deferred"),
]
CASE_IDS = [f"{t}{'.gz' if gz else ''}-{w}" for t, gz, w in CASES]


# --- the source tree ---------------------------------------------------------------------------

def _stage(top):
    """Every feature under ``top`` (which is <src>/tree)."""
    def p(rel):
        return os.path.join(top, rel)

    def mkdir(rel, mode=0o755, uid=0, gid=0):
        os.makedirs(p(rel), exist_ok=True)
        os.chown(p(rel), uid, gid)
        os.chmod(p(rel), mode)

    def file(rel, data=b"", mode=0o644, uid=0, gid=0, xattrs=None):
        with open(p(rel), "wb") as f:
            f.write(data)
        os.chown(p(rel), uid, gid)          # chown before chmod: it would clear setuid/setgid
        os.chmod(p(rel), mode)
        for k, v in (xattrs or {}).items():  # after chown: it would clear security.capability
            os.setxattr(p(rel), k, v)

    def node(rel, kind, major, minor, mode, uid=0, gid=0):
        os.mknod(p(rel), kind | mode, os.makedev(major, minor))
        os.chown(p(rel), uid, gid)
        os.chmod(p(rel), mode)

    os.makedirs(top)
    os.chmod(top, 0o755)
    for d in ("bin", "dev", "links", "names", "xattrs", "acl", "empty"):
        mkdir(d)
    mkdir("private", 0o700, 1000, 50)
    file("private/secret", b"only for 1000", 0o600, 1000, 50)
    mkdir("owners", 0o750, 4242, 4343)
    file("owners/user1000", b"1000:50", 0o640, 1000, 50)
    file("owners/user4242", b"4242:4343", 0o604, 4242, 4343)
    file("owners/nobody", b"65534:65534", 0o644, 65534, 65534)
    mkdir("tmp", 0o1777)
    file("tmp/scratchfile", b"in a sticky dir", 0o666, 65534, 65534)
    os.makedirs(p("ro"))
    file("ro/readonly", b"read only", 0o444)
    os.chmod(p("ro"), 0o555)                    # after its child is in it
    file("bin/setuid", b"#!/bin/sh\necho setuid\n", 0o4755)
    file("bin/setgid", b"#!/bin/sh\necho setgid\n", 0o2755, 1000, 50)
    file(f"bin/{CAP_NAME}", b"binds low ports", 0o755, xattrs={"security.capability": CAP,
                                                               "user.note": b"capable"})
    file("zero-mode", b"nobody may read or write this", 0o000)
    file("random", os.urandom(1 << 20), 0o644, 4242, 4343)
    with open(p("sparse"), "wb") as f:
        f.truncate(SPARSE_SIZE)
        f.seek(SPARSE_AT)
        f.write(SPARSE_DATA)
    os.symlink("../bin/setuid", p("links/relative"))
    os.symlink("/etc/hostname", p("links/absolute"))
    os.symlink("../no/such/target", p("links/dangling"))
    os.lchown(p("links/dangling"), 1000, 50)
    file("links/hard-a", b"two names, one inode", 0o640, 4242, 4343, xattrs={"user.shared": b"by both"})
    os.link(p("links/hard-a"), p("links/hard-b"))
    node("dev/null", stat.S_IFCHR, 1, 3, 0o666)
    node("dev/big", stat.S_IFCHR, 300, 70000, 0o600, 0, 6)
    node("dev/sda1", stat.S_IFBLK, 8, 1, 0o660, 0, 6)
    os.mkfifo(p("dev/fifo"))
    os.chmod(p("dev/fifo"), 0o620)
    file("xattrs/file", b"with xattrs", xattrs={"user.text": b"plain text", "user.empty": b"",
                                                 "user.binary": b"\x00\xff\xfe\x01 binary \x00"})
    os.setxattr(p("xattrs"), "user.dir", b"on a directory")
    file("names/ünïcødé-名前-🙂", "unicode ✓".encode())
    file("names/" + "n" * 255, b"a 255-byte name")
    file("names/" + "é" * 127 + "x", b"a 255-byte name of 2-byte characters")
    file("names/" + ODD_NAME, b"odd", xattrs={"user.odd": b"odd"})
    # POSIX ACLs: an access ACL on a file; a default ACL on a directory, with a file and a
    # directory created before it (no ACL) and after it (inherited).
    file("acl/file", b"acl", 0o640)
    subprocess.run(["setfacl", "-m", "u:1234:rwx,g:4343:r", p("acl/file")], check=True)
    mkdir("acl/dflt")
    file("acl/dflt/before", b"made before the default ACL")
    mkdir("acl/dflt/before-dir")
    subprocess.run(["setfacl", "-d", "-m", "u:1234:rx,g:50:rwx", p("acl/dflt")], check=True)
    with open(p("acl/dflt/inherited"), "wb") as f:
        f.write(b"inherits the default ACL")
    os.mkdir(p("acl/dflt/inherited-dir"))
    # distinct ns mtimes (with sub-second parts) everywhere; directories last
    paths = sorted(os.path.relpath(os.path.join(d, n), top)
                   for d, dirs, files in os.walk(top) for n in dirs + files)
    nondirs = [r for r in paths if os.path.islink(p(r)) or not os.path.isdir(p(r))]
    dirs = [r for r in paths if r not in nondirs] + ["."]
    for i, rel in enumerate(nondirs + dirs):
        mtime = NS + i * 1_000_003_001            # the ns part differs for every path
        os.utime(p(rel), ns=(mtime - 10**9 + 7, mtime), follow_symlinks=False)


def _rel_paths(top):
    out = [""]
    for d, dirs, files in os.walk(top):
        out += [os.path.relpath(os.path.join(d, n), top) for n in dirs + files]
    return sorted(out)


def _xattrs(path):
    return {n: os.getxattr(path, n, follow_symlinks=False) for n in os.listxattr(path, follow_symlinks=False)}


def _file_sha(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _getfacl(parent, skip_base=False):
    """getfacl of the TREE below ``parent``, per file (the walk order is the fs's readdir's)."""
    argv = ["getfacl", "-R", "-P", "-n"] + (["-s"] if skip_base else []) + [TREE]
    out = subprocess.run(argv, cwd=parent, capture_output=True, text=True, check=True).stdout
    blocks = {}
    for block in out.split("\n\n"):
        lines = block.strip("\n").splitlines()
        if lines:
            assert lines[0].startswith("# file: "), block
            blocks[lines[0]] = "\n".join(lines[1:])
    return blocks


def snapshot(parent):
    """What the tests compare, read from <parent>/tree."""
    top = os.path.join(parent, TREE)
    shape, times, xattrs, inodes, blocks = {}, {}, {}, {}, {}
    for rel in _rel_paths(top):
        path = os.path.join(top, rel) if rel else top
        st = os.lstat(path)
        d = {"type": stat.S_IFMT(st.st_mode), "mode": oct(stat.S_IMODE(st.st_mode)), "uid": st.st_uid,
             "gid": st.st_gid}
        if not stat.S_ISDIR(st.st_mode):
            d["size"] = st.st_size
        if stat.S_ISREG(st.st_mode):
            d["sha256"] = _file_sha(path)
        elif stat.S_ISLNK(st.st_mode):
            d["target"] = os.readlink(path)
        elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            d["rdev"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
        shape[rel] = d
        times[rel] = st.st_mtime_ns
        xattrs[rel] = {k: v for k, v in _xattrs(path).items() if k not in ACL_XATTRS}
        inodes[rel] = (st.st_ino, st.st_nlink)
        blocks[rel] = st.st_blocks
    return {"shape": shape, "times": times, "xattrs": xattrs, "inodes": inodes, "blocks": blocks,
            "acls": _getfacl(parent), "extended_acls": _getfacl(parent, skip_base=True)}


def _show_diff(want, got):
    return {k: (want.get(k), got.get(k)) for k in sorted(set(want) | set(got)) if want.get(k) != got.get(k)}


# --- the tars ------------------------------------------------------------------------------------

def _pytarfile(src, out, gz):
    """PAX via tarfile, walking the tree ourselves: exact ns mtimes as pax records (tarfile
    itself would write a float) and every xattr, ACLs included, as SCHILY.xattr.*."""
    with tarfile.open(out, "w:gz" if gz else "w", format=tarfile.PAX_FORMAT, encoding="utf-8",
                      errors="surrogateescape") as tf:
        for rel in _rel_paths(os.path.join(src, TREE)):
            arc = os.path.join(TREE, rel) if rel else TREE
            path = os.path.join(src, arc)
            ti = tf.gettarinfo(path, arc)
            ns = os.lstat(path).st_mtime_ns
            ti.mtime = ns // 10**9
            ti.uname = ti.gname = ""
            pax = {"mtime": f"{ns // 10**9}.{ns % 10**9:09d}"}
            for k, v in _xattrs(path).items():
                pax[f"SCHILY.xattr.{k}"] = v.decode("utf-8", "surrogateescape")
            ti.pax_headers = pax
            if ti.isreg():
                with open(path, "rb") as f:
                    tf.addfile(ti, f)
            else:
                tf.addfile(ti)


def _make_tar(tool, src, out, gz):
    z = ["-z"] if gz else []
    if tool == "gnutar-pax":
        argv = ["tar", "--format=pax", "--xattrs", "--xattrs-include=*", "--acls", "--numeric-owner", "-S",
                *z, "-cf", out, "-C", src, TREE]
    elif tool == "gnutar-gnu":
        argv = ["tar", "--format=gnu", "--numeric-owner", "-S", *z, "-cf", out, "-C", src, TREE]
    elif tool == "bsdtar-pax":
        argv = ["bsdtar", "--format=pax", "--xattrs", "--acls", "--numeric-owner", *z, "-cf", out, "-C", src,
                TREE]
    else:
        return _pytarfile(src, out, gz)
    proc = subprocess.run(argv, check=False, capture_output=True, env=LOCALE_ENV)
    assert proc.returncode == 0 and not proc.stderr, (argv, proc.stderr)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    where = tmp_path_factory.mktemp("interop")
    src = str(where / "src")
    _stage(os.path.join(src, TREE))
    tars = {}
    for tool in TOOLS:
        for gz in (False, True):
            out = str(where / f"{tool}.tar{'.gz' if gz else ''}")
            _make_tar(tool, src, out, gz)
            tars[tool, gz] = out
    return {"dir": src, "snap": snapshot(src), "tars": tars, "where": where}


def test_source_tree_has_every_feature(source):
    """The staging itself: otherwise the comparisons below could pass vacuously."""
    snap = source["snap"]
    shape, x = snap["shape"], snap["xattrs"]
    assert {shape[r]["mode"] for r in ("private", "ro", "tmp", "bin/setuid", "bin/setgid", "zero-mode")} == \
           {oct(m) for m in (0o700, 0o555, 0o1777, 0o4755, 0o2755, 0o000)}
    assert {(shape[r]["uid"], shape[r]["gid"]) for r in shape} >= {(1000, 50), (4242, 4343), (65534, 65534)}
    assert all(t % 10**9 for t in snap["times"].values())
    assert len(set(snap["times"].values())) == len(snap["times"]) - 1      # the hardlink pair shares one
    assert shape["dev/big"]["rdev"] == (300, 70000) and shape["dev/sda1"]["type"] == stat.S_IFBLK
    assert snap["inodes"]["links/hard-a"] == snap["inodes"]["links/hard-b"]
    assert x[f"bin/{CAP_NAME}"]["security.capability"] == CAP and x["xattrs/file"]["user.empty"] == b""
    assert snap["blocks"]["sparse"] * 512 < 1 << 20
    assert "user:1234:rwx" in snap["acls"]["# file: tree/acl/file"]
    assert "default:user:1234:r-x" in snap["acls"]["# file: tree/acl/dflt"]
    assert "user:1234:r-x" in snap["acls"]["# file: tree/acl/dflt/inherited"]
    assert "user:1234" not in snap["acls"]["# file: tree/acl/dflt/before"]
    assert max(len(os.fsencode(os.path.basename(r))) for r in shape) == 255


# --- what the tools wrote ------------------------------------------------------------------------

def _tar_members(path):
    with tarfile.open(path, "r:*") as tf:
        return {m.name.rstrip("/"): m for m in tf.getmembers()}


@pytest.mark.parametrize("tool", TOOLS)
def test_tar_carries_what_the_tool_promises(source, tool):
    """Which metadata each format transports, checked in the raw tar (read by Python's
    tarfile, a third reader): this fixes the precision the import tests expect."""
    want = TOOLS[tool]
    members = _tar_members(source["tars"][tool, False])
    assert len(members) == len(source["snap"]["shape"])
    pax = {name: m.pax_headers for name, m in members.items()}
    f = f"{TREE}/xattrs/file"
    if want["ns"]:
        for name in members:
            frac = pax[name]["mtime"].partition(".")[2]
            want_ns = source["snap"]["times"][os.path.relpath(name, TREE) if name != TREE else ""]
            assert int(frac.ljust(9, "0")) == want_ns % 10**9, name
    else:
        assert all(not h for h in pax.values())      # no pax headers at all: whole seconds only
    if want["xattrs"]:
        assert pax[f]["SCHILY.xattr.user.empty"] == ""
        assert "SCHILY.xattr.security.capability" in pax[f"{TREE}/bin/{CAP_NAME}"]
    else:
        assert not any(k.startswith("SCHILY.xattr") for h in pax.values() for k in h)
    acl_keys = {k for h in pax.values() for k in h if "acl" in k}
    if want["acls"]:
        assert acl_keys
    else:
        assert not acl_keys
    assert (members[f"{TREE}/sparse"].sparse is not None) == want["sparse"]
    assert (os.path.getsize(source["tars"][tool, False]) < SPARSE_SIZE) == want["sparse"]


REFERENCE_EXTRACT = {
    "gnutar-pax": ["tar", "-x", "-p", "--xattrs", "--xattrs-include=*", "--acls", "--numeric-owner", "-f"],
    "bsdtar-pax": ["bsdtar", "-x", "-p", "--xattrs", "--acls", "--numeric-owner", "-f"],
}


@pytest.mark.parametrize("tool", REFERENCE_EXTRACT)
def test_reference_extractor_reproduces_the_source(source, tool, tmp_path):
    """The tool's own extractor gets the source back from its tar, ACLs and the modes they
    imply included: what the imports below must match is in the tar, not only on the disk."""
    proc = subprocess.run([*REFERENCE_EXTRACT[tool], source["tars"][tool, False], "-C", str(tmp_path)],
                          check=False, capture_output=True, env=LOCALE_ENV)
    assert proc.returncode == 0, proc.stderr
    got, want = snapshot(str(tmp_path)), source["snap"]
    for part in ("shape", "times", "xattrs", "acls"):
        assert got[part] == want[part], (part, _show_diff(want[part], got[part]))
    assert got["inodes"]["links/hard-a"] == got["inodes"]["links/hard-b"]


# --- importing ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def datastore(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ds"))
    ImageStore(open_datastore(root)).create_store("s", capacity="256MiB")
    return root


@pytest.fixture(scope="module")
def imports():
    return {}


class _Spy:
    """Records which mount method and whether the deferred debugfs pass ran."""

    def __init__(self, monkeypatch):
        self.methods, self.deferred_applied = [], 0
        real_mount, real_apply = layer_writer.Mount, DeferredOps.apply

        def mount(method, *a, **kw):
            self.methods.append(method)
            return real_mount(method, *a, **kw)

        def apply(ops, raw):
            self.deferred_applied += 1
            return real_apply(ops, raw)

        monkeypatch.setattr(layer_writer, "Mount", mount)
        monkeypatch.setattr(DeferredOps, "apply", apply)


@pytest.fixture(params=CASES, ids=CASE_IDS)
def imported(request, source, datastore, imports, monkeypatch):
    """The case's tar written onto scratch, then snapshotted through flattened_mount (once per case)."""
    key = tool, gz, writer = request.param
    if key not in imports:
        if writer == "fuse2fs-deferred":
            monkeypatch.setenv("IMAGEFS_DEFER_PRIVILEGED", "1")
        else:
            monkeypatch.delenv("IMAGEFS_DEFER_PRIVILEGED", raising=False)
        spy = _Spy(monkeypatch)
        st = ImageStore(open_datastore(datastore), writer_method=writer.split("-")[0])
        image_id = "-".join(["img", tool, "gz" if gz else "plain", writer])
        tar = source["tars"][tool, gz]
        with open(tar, "rb") as f:
            data_sum = sha256(f.read())
        with open(tar, "rb") as f:
            img, result = st.write_image("s", "scratch", image_id, f, expected_sum=data_sum)
        assert result.digest == data_sum and result.entries == len(source["snap"]["shape"])
        with flattened_mount(st.ds.local_path(img.disk)) as mnt:
            imports[key] = {"snap": snapshot(mnt), "spy": spy, "tool": tool}
        monkeypatch.undo()
    return imports[key]


def test_writer_used(imported, request):
    """The case really went through the writer it names (and the debugfs pass when deferred)."""
    writer = request.node.callspec.params["imported"][2]
    spy = imported["spy"]
    assert spy.methods == [writer.split("-")[0]]
    assert spy.deferred_applied == (1 if writer == "fuse2fs-deferred" else 0)


def test_paths_types_modes_owners_content(imported, source):
    """Every path, nothing more: type, mode incl. setuid/setgid/sticky, uid/gid, size,
    content sha256, symlink target, device numbers."""
    want, got = source["snap"]["shape"], imported["snap"]["shape"]
    assert sorted(got) == sorted(want)
    assert got == want, _show_diff(want, got)


def test_hardlinks_share_an_inode(imported):
    inodes = imported["snap"]["inodes"]
    assert inodes["links/hard-a"] == inodes["links/hard-b"]
    assert inodes["links/hard-a"][1] == 2
    others = {ino for rel, (ino, _) in inodes.items() if rel not in ("links/hard-a", "links/hard-b")}
    assert inodes["links/hard-a"][0] not in others
    assert all(nlink == 1 for rel, (_, nlink) in inodes.items()
               if imported["snap"]["shape"][rel]["type"] != stat.S_IFDIR and not rel.startswith("links/hard-"))


def test_mtimes(imported, source):
    """Files, symlinks, devices and directories (whose times are set last): to the ns where
    the format stores ns, else the whole seconds the format keeps (truncated)."""
    want, got = source["snap"]["times"], imported["snap"]["times"]
    if TOOLS[imported["tool"]]["ns"]:
        assert got == want, _show_diff(want, got)
    else:
        truncated = {rel: ns - ns % 10**9 for rel, ns in want.items()}
        assert got == truncated, _show_diff(truncated, got)
        assert all(ns % 10**9 == 0 for ns in got.values())


def test_xattrs(imported, source):
    """user.* (binary and empty values included) and security.capability, exact bytes;
    nothing where the format has no xattrs."""
    got = imported["snap"]["xattrs"]
    if TOOLS[imported["tool"]]["xattrs"]:
        want = source["snap"]["xattrs"]
        assert got == want, _show_diff(want, got)
    else:
        assert {rel: x for rel, x in got.items() if x} == {}


def test_acls(imported, source):
    """getfacl of every path equals the source's; without ACLs in the format, none at all."""
    if TOOLS[imported["tool"]]["acls"]:
        want, got = source["snap"]["acls"], imported["snap"]["acls"]
        assert got == want, _show_diff(want, got)
    else:
        assert imported["snap"]["extended_acls"] == {}


def test_sparse_file(imported, source):
    """Same size and content always; still sparse when the tar stored it sparse."""
    shape, blocks = imported["snap"]["shape"], imported["snap"]["blocks"]
    assert shape["sparse"] == source["snap"]["shape"]["sparse"]
    assert shape["sparse"]["size"] == SPARSE_SIZE
    if TOOLS[imported["tool"]]["sparse"]:
        assert blocks["sparse"] * 512 < 1 << 20
