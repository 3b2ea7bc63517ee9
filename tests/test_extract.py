"""apply_layer straight into a directory (no disk): docker ApplyLayer semantics and bad input."""
import bz2
import gzip
import hashlib
import io
import lzma
import os
import stat
import struct
import subprocess
import tarfile

import pytest

from imagefs.errors import ImageFSError, InvalidInput
from imagefs.layer.deferred import DeferredOps
from imagefs.layer.extract import apply_layer

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (owners, device nodes, trusted.* xattrs)")

NS = 1_700_000_000_123_456_789
# security.capability v2: cap_net_bind_service=ep
CAP = struct.pack("<IIIII", 0x02000001, 1 << 10, 0, 0, 0)
BINARY = b"\x00\xff\xfe binary \x00"


# --- building tars ---

def member(name, kind="file", data=b"", mode=None, uid=0, gid=0, mtime_ns=NS, target="",
           major=0, minor=0, xattrs=None):
    ti = tarfile.TarInfo(name)
    ti.type = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE,
               "link": tarfile.LNKTYPE, "chr": tarfile.CHRTYPE, "blk": tarfile.BLKTYPE,
               "fifo": tarfile.FIFOTYPE}[kind]
    ti.mode = mode if mode is not None else (0o755 if kind in ("dir", "symlink") else 0o644)
    ti.uid, ti.gid, ti.linkname = uid, gid, target
    ti.devmajor, ti.devminor = major, minor
    ti.size = len(data) if kind == "file" else 0
    ti.mtime = mtime_ns // 10**9
    pax = {"mtime": f"{mtime_ns // 10**9}.{mtime_ns % 10**9:09d}"}
    for k, v in (xattrs or {}).items():
        pax[f"SCHILY.xattr.{k}"] = v.decode("utf-8", "surrogateescape")
    ti.pax_headers = pax
    return ti, data


def make_tar(*members, fmt=tarfile.PAX_FORMAT):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, encoding="utf-8", errors="surrogateescape") as tf:
        for ti, data in members:
            tf.addfile(ti, io.BytesIO(data) if ti.type == tarfile.REGTYPE else None)
    return buf.getvalue()


def apply(root, data, **kw):
    return apply_layer(str(root), io.BytesIO(data), **kw)


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "root"
    r.mkdir()
    return r


def lst(path):
    return os.lstat(path)


# --- every type and its metadata ---

def test_types_owners_modes_times_xattrs(root):
    stats = apply(root, make_tar(
        member("d/", "dir", mode=0o751, uid=7, gid=8, mtime_ns=NS + 1),
        member("d/suid", data=b"hello", mode=0o4755, uid=1000, gid=50,
               xattrs={"user.bin": BINARY, "security.capability": CAP, "trusted.t": b"t"}),
        member("d/sgid", data=b"x", mode=0o2711, uid=1, gid=2),
        member("d/none", data=b"", mode=0o000),
        member("tmp/", "dir", mode=0o1777),
        member("d/sym", "symlink", target="suid", uid=5, gid=6, mtime_ns=NS + 2, xattrs={"trusted.s": b"s"}),
        member("d/hard", "link", target="d/suid"),
        member("d/chr", "chr", major=300, minor=70000, mode=0o640, uid=3, gid=4),
        member("d/blk", "blk", major=8, minor=1, mode=0o600),
        member("d/fifo", "fifo", mode=0o620, uid=9, gid=9),
        member("d/dir2/", "dir", mode=0o700, xattrs={"user.d": b"dirval"}),
        member("d/dir2/inner", data=b"written after the dir entry"),
    ))
    assert stats.entries == 12
    assert stats.bytes == len(b"hello") + 1 + len(b"written after the dir entry")

    d = lst(root / "d")
    assert (stat.S_IMODE(d.st_mode), d.st_uid, d.st_gid, d.st_mtime_ns) == (0o751, 7, 8, NS + 1)
    s = lst(root / "d/suid")
    assert (stat.S_IMODE(s.st_mode), s.st_uid, s.st_gid, s.st_mtime_ns) == (0o4755, 1000, 50, NS)
    assert (root / "d/suid").read_bytes() == b"hello"
    assert os.getxattr(root / "d/suid", "user.bin") == BINARY
    assert os.getxattr(root / "d/suid", "security.capability") == CAP
    assert os.getxattr(root / "d/suid", "trusted.t") == b"t"
    assert stat.S_IMODE(lst(root / "d/sgid").st_mode) == 0o2711
    assert stat.S_IMODE(lst(root / "d/none").st_mode) == 0
    assert stat.S_IMODE(lst(root / "tmp").st_mode) == 0o1777
    sym = lst(root / "d/sym")
    assert stat.S_ISLNK(sym.st_mode) and os.readlink(root / "d/sym") == "suid"
    assert (sym.st_uid, sym.st_gid, sym.st_mtime_ns) == (5, 6, NS + 2)
    assert os.getxattr(root / "d/sym", "trusted.s", follow_symlinks=False) == b"s"
    assert lst(root / "d/hard").st_ino == s.st_ino and lst(root / "d/hard").st_nlink == 2
    c = lst(root / "d/chr")
    assert stat.S_ISCHR(c.st_mode) and (os.major(c.st_rdev), os.minor(c.st_rdev)) == (300, 70000)
    assert (stat.S_IMODE(c.st_mode), c.st_uid, c.st_gid) == (0o640, 3, 4)
    b = lst(root / "d/blk")
    assert stat.S_ISBLK(b.st_mode) and (os.major(b.st_rdev), os.minor(b.st_rdev)) == (8, 1)
    f = lst(root / "d/fifo")
    assert stat.S_ISFIFO(f.st_mode) and (stat.S_IMODE(f.st_mode), f.st_uid) == (0o620, 9)
    # directory times are set last, after their children were written
    d2 = lst(root / "d/dir2")
    assert (stat.S_IMODE(d2.st_mode), d2.st_mtime_ns) == (0o700, NS)
    assert os.getxattr(root / "d/dir2", "user.d") == b"dirval"


def test_modes_ignore_umask(root):
    old = os.umask(0o077)
    try:
        apply(root, make_tar(member("a/", "dir", mode=0o775), member("a/f", mode=0o666),
                             member("a/implicit/f", mode=0o644)))
    finally:
        os.umask(old)
    assert stat.S_IMODE(lst(root / "a").st_mode) == 0o775
    assert stat.S_IMODE(lst(root / "a/f").st_mode) == 0o666
    assert stat.S_IMODE(lst(root / "a/implicit").st_mode) == 0o755    # missing parents: 0755


def test_root_entry_sets_root_metadata(root):
    apply(root, make_tar(member("./", "dir", mode=0o711, uid=4, mtime_ns=NS), member("./x", data=b"1")))
    r = lst(root)
    assert (stat.S_IMODE(r.st_mode), r.st_uid, r.st_mtime_ns) == (0o711, 4, NS)
    assert (root / "x").read_bytes() == b"1"


def test_names_unicode_long_nonutf8_and_prefixes(root):
    long = "n" * 255
    apply(root, make_tar(member("/abs", data=b"a"), member("./dot", data=b"b"),
                         member("ünïcødé-名前", data=b"u"), member(long, data=b"l"),
                         member("raw-\udcff\udcfe", data=b"r"), fmt=tarfile.GNU_FORMAT))
    assert (root / "abs").read_bytes() == b"a" and (root / "dot").read_bytes() == b"b"
    assert (root / "ünïcødé-名前").read_bytes() == b"u"
    assert (root / long).read_bytes() == b"l"
    assert os.path.exists(os.path.join(os.fsencode(root), b"raw-\xff\xfe"))


def test_name_too_long_is_invalid(root):
    with pytest.raises(InvalidInput, match="File name too long"):
        apply(root, make_tar(member("n" * 256, data=b"x")))


@pytest.mark.parametrize("fmt", ["gnu", "posix"])
def test_sparse_stays_sparse(root, tmp_path, fmt):
    src = tmp_path / "src"
    src.mkdir()
    size = 64 << 20
    with open(src / "sparse", "wb") as f:
        f.write(b"head")
        f.seek(40 << 20)
        f.write(b"middle")
        f.truncate(size)                        # ends in a hole
    tarpath = tmp_path / "s.tar"
    subprocess.run(["tar", "-S", f"--format={fmt}", "-cf", tarpath, "-C", src, "sparse"], check=True)
    apply(root, tarpath.read_bytes())
    st = lst(root / "sparse")
    assert st.st_size == size
    assert st.st_blocks * 512 < (1 << 20)
    with open(root / "sparse", "rb") as f:
        assert f.read(4) == b"head"
        f.seek(40 << 20)
        assert f.read(6) == b"middle"
    assert _sha(root / "sparse") == _sha(src / "sparse")


def _sha(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --- whiteouts and opaque directories ---

def lower(root, *paths):
    for p in paths:
        full = root / p
        if p.endswith("/"):
            full.mkdir(parents=True, exist_ok=True)
        else:
            full.parent.mkdir(parents=True, exist_ok=True)
            full.write_bytes(b"lower")


def test_whiteouts_remove_lower_only(root):
    lower(root, "l/gone", "l/gonedir/deep/x", "l/keep")
    os.symlink("/l/keep", root / "l/gonelink")
    apply(root, make_tar(
        member("l/.wh.gone"), member("l/.wh.gonedir"), member("l/.wh.gonelink"),
        member("l/.wh.never-existed"), member("nodir/.wh.x"),
        member("l/new", data=b"this layer"), member("l/.wh.new"),     # same layer: not whited out
        member("l/.wh..wh.plnk"), member("l/.wh..wh.aufsmeta"),         # AUFS meta: ignored
    ))
    assert sorted(os.listdir(root / "l")) == ["keep", "new"]
    assert not os.path.exists(root / "nodir")
    assert (root / "l/keep").read_bytes() == b"lower"               # the symlink, not its target, went


def test_whiteout_of_parent_keeps_this_layers_children(root):
    lower(root, "p/old")
    apply(root, make_tar(member("p/new", data=b"n"), member(".wh.p")))
    assert os.listdir(root / "p") == ["new"]


@pytest.mark.parametrize("order", ["whiteout-first", "whiteout-last", "whiteout-between"])
def test_whiteout_and_dir_entry_in_one_layer(root, order):
    """OCI: a whiteout hides only lower content. With ``.wh.doc`` and this layer's own
    ``doc/`` entries (the directory entry included) in any order, exactly this layer's
    entries stay under doc."""
    lower(root, "usr/share/doc/old/README", "usr/share/doc/oldfile", "usr/share/keep")
    wh = member("usr/share/.wh.doc")
    own = [member("usr/share/doc/", "dir", mode=0o750), member("usr/share/doc/new", data=b"n"),
           member("usr/share/doc/old/", "dir"), member("usr/share/doc/old/NEW", data=b"m")]
    members = {"whiteout-first": [wh] + own, "whiteout-last": own + [wh],
               "whiteout-between": own[:1] + [wh] + own[1:]}[order]
    apply(root, make_tar(*members))
    assert sorted(os.listdir(root / "usr/share/doc")) == ["new", "old"]
    assert os.listdir(root / "usr/share/doc/old") == ["NEW"]
    assert stat.S_IMODE(lst(root / "usr/share/doc").st_mode) == 0o750
    assert sorted(os.listdir(root / "usr/share")) == ["doc", "keep"]


@pytest.mark.parametrize("order", ["opaque-first", "opaque-last"])
def test_opaque_dir(root, order):
    lower(root, "o/old", "o/olddir/x", "o/sub/oldinsub", "other/keep")
    opq = member("o/.wh..wh..opq")
    own = [member("o/", "dir", mode=0o750), member("o/new", data=b"n"), member("o/sub/newinsub", data=b"s")]
    apply(root, make_tar(*([opq] + own if order == "opaque-first" else own + [opq])))
    assert sorted(os.listdir(root / "o")) == ["new", "sub"]
    assert os.listdir(root / "o/sub") == ["newinsub"]               # merged subdir: lower part hidden
    assert stat.S_IMODE(lst(root / "o").st_mode) == 0o750
    assert os.listdir(root / "other") == ["keep"]


def test_opaque_without_dir_entry_creates_empty_dir(root):
    apply(root, make_tar(member("fresh/.wh..wh..opq")))
    assert os.listdir(root / "fresh") == []


def test_whiteouts_disabled_writes_plain_files(root):
    lower(root, "l/x")
    apply(root, make_tar(member("l/.wh.x"), member("l/.wh..wh..opq")), whiteouts=False)
    assert sorted(os.listdir(root / "l")) == [".wh..wh..opq", ".wh.x", "x"]


@pytest.mark.parametrize("name", [".wh.", "d/.wh..", "d/.wh..."])
def test_bad_whiteout_names(root, name):
    with pytest.raises(InvalidInput, match="invalid whiteout"):
        apply(root, make_tar(member(name)))


# --- replacing what is there ---

def test_replacements(root):
    lower(root, "f2d", "d2f/inner/x", "merge/keepme")
    os.symlink("/elsewhere", root / "l2d")
    os.chmod(root / "merge", 0o700)
    apply(root, make_tar(
        member("f2d/", "dir"), member("f2d/child", data=b"c"),
        member("d2f", data=b"now a file"),
        member("l2d/", "dir", mode=0o711),
        member("merge/", "dir", mode=0o755, uid=12, mtime_ns=NS),
        member("merge/added", data=b"a"),
        member("twice", data=b"first"), member("twice", data=b"second"),
    ))
    assert os.listdir(root / "f2d") == ["child"]
    assert (root / "d2f").read_bytes() == b"now a file"
    assert stat.S_ISDIR(lst(root / "l2d").st_mode) and not os.path.exists(root / "elsewhere")
    m = lst(root / "merge")
    assert (stat.S_IMODE(m.st_mode), m.st_uid, m.st_mtime_ns) == (0o755, 12, NS)
    assert sorted(os.listdir(root / "merge")) == ["added", "keepme"]
    assert (root / "twice").read_bytes() == b"second"


def test_replacing_a_file_breaks_its_lower_hardlink(root):
    lower(root, "a")
    os.link(root / "a", root / "b")
    apply(root, make_tar(member("a", data=b"new")))
    assert (root / "b").read_bytes() == b"lower" and (root / "a").read_bytes() == b"new"


# --- containment: chroot semantics for every path ---

def test_symlinked_parents_resolve_inside_root(root, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    lower(root, "usr/lib/", "outside/")
    os.symlink("/usr/lib", root / "lib")
    apply(root, make_tar(
        member("lib/x", data=b"through lib"),
        member("up", "symlink", target="../../.."),
        member("up/y", data=b"clamped"),
        member("esc", "symlink", target="../outside"),
        member("esc/z", data=b"stays in"),
        member("abs", "symlink", target="/"),
        member("abs/w", data=b"root"),
    ))
    assert (root / "usr/lib/x").read_bytes() == b"through lib"
    assert (root / "y").read_bytes() == b"clamped"
    assert (root / "outside/z").read_bytes() == b"stays in"
    assert (root / "w").read_bytes() == b"root"
    assert os.listdir(outside) == []
    assert os.readlink(root / "up") == "../../.."                   # the symlink itself is kept


def test_final_symlink_is_replaced_not_followed(root, tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"safe")
    os.symlink(str(victim), root / "f")
    apply(root, make_tar(member("f", data=b"new")))
    assert victim.read_bytes() == b"safe" and not os.path.islink(root / "f")


def test_hardlinks_resolve_inside_root(root, tmp_path):
    (tmp_path / "secret").write_bytes(b"host")
    lower(root, "lowerfile")
    apply(root, make_tar(
        member("sym", "symlink", target="lowerfile"),
        member("tosym", "link", target="sym"),          # links the symlink itself
        member("tolower", "link", target="/lowerfile"), # absolute: inside the root
    ))
    assert lst(root / "tosym").st_ino == lst(root / "sym").st_ino
    assert os.path.islink(root / "tosym")
    assert lst(root / "tolower").st_ino == lst(root / "lowerfile").st_ino


@pytest.mark.parametrize("members, match", [
    ([member("../x", data=b"x")], r"'\.\.'"),
    ([member("a/../../x", data=b"x")], r"'\.\.'"),
    ([member("h", "link", target="../../etc/shadow")], r"'\.\.'"),
    ([member("h", "link", target="/etc/shadow")], "does not exist"),
    ([member("esc", "symlink", target="../.."), member("h", "link", target="esc/secret")], "does not exist"),
    ([member("d/", "dir"), member("h", "link", target="d")], "is a directory"),
    ([member("f", data=b"x"), member("f/g", data=b"y")], "not a directory"),
    ([member("dangling", "symlink", target="/nowhere"), member("dangling/x", data=b"y")], "dangling"),
])
def test_unsafe_or_impossible_entries(root, tmp_path, members, match):
    (tmp_path / "secret").write_bytes(b"host")
    with pytest.raises(InvalidInput, match=match):
        apply(root, make_tar(*members))
    assert not os.path.exists(root / "h")
    assert lst(tmp_path / "secret").st_nlink == 1


# --- corrupt input and compression ---

def _big_tar():
    return make_tar(*[member(f"f{i}", data=os.urandom(20000)) for i in range(20)])


def test_truncated_tar(root):
    data = _big_tar()
    with pytest.raises(InvalidInput, match="bad layer archive"):
        apply(root, data[:len(data) // 2])


def test_corrupt_gzip(root):
    data = bytearray(gzip.compress(_big_tar()))
    data[len(data) // 2:len(data) // 2 + 64] = b"\x00" * 64
    with pytest.raises(InvalidInput):
        apply(root, bytes(data))


def test_not_a_tar(root):
    with pytest.raises(InvalidInput, match="bad layer archive"):
        apply(root, b"PK\x03\x04" + os.urandom(4096))


def test_empty_stream_is_an_empty_layer(root):
    assert apply(root, b"").entries == 0


def _zstd(data):
    return subprocess.run(["zstd", "-q", "-c"], input=data, capture_output=True, check=True).stdout


@pytest.mark.parametrize("compress", [gzip.compress, bz2.compress, lzma.compress, _zstd],
                         ids=["gzip", "bzip2", "xz", "zstd"])
def test_compressed_input(root, compress):
    stats = apply(root, compress(make_tar(member("d/", "dir"), member("d/f", data=b"z" * 100000))))
    assert stats.entries == 2 and (root / "d/f").read_bytes() == b"z" * 100000


class _FailingStream(io.RawIOBase):
    def __init__(self, data, exc):
        self._data, self._exc, self._sent = data, exc, 0

    def readable(self):
        return True

    def readinto(self, buf):
        if self._sent >= len(self._data) // 2:
            raise self._exc
        n = min(len(buf), 4096)
        buf[:n] = self._data[self._sent:self._sent + n]
        self._sent += n
        return n


def test_stream_interrupt_passes_through(root):
    with pytest.raises(KeyboardInterrupt):
        apply_layer(str(root), _FailingStream(_big_tar(), KeyboardInterrupt()))


def test_stream_oserror_is_one_line(root):
    with pytest.raises(ImageFSError, match="cannot read the layer stream: Connection reset"):
        apply_layer(str(root), _FailingStream(_big_tar(), ConnectionResetError(104, "Connection reset by peer")))


# --- path filter and deferred privileged operations ---

def test_path_filter(root):
    apply(root, make_tar(member("keep/a", data=b"a"), member("skip/b", data=b"b"),
                         member("keep/h", "link", target="keep/a")),
          path_filter=lambda n: None if n.startswith("skip") else "new/" + n)
    assert sorted(os.listdir(root)) == ["new"]
    assert lst(root / "new/keep/h").st_ino == lst(root / "new/keep/a").st_ino


def test_deferred_records_privileged_operations(root, tmp_path):
    stage = tmp_path / "stage"
    stage.mkdir()
    deferred = DeferredOps(str(stage))
    apply(root, make_tar(
        member("dev/null", "chr", major=1, minor=3, mode=0o666),
        member("bin/su", data=b"su", mode=0o4755, xattrs={"security.capability": CAP, "user.u": b"u"}),
        member("bin/su2", "link", target="bin/su"),
        member("bin/plain", data=b"p"), member("bin/plain2", "link", target="bin/plain"),
        member("gone", "blk", major=8, minor=0), member("gone", data=b"replaced by a file"),
    ), deferred=deferred)
    assert os.listdir(root / "dev") == []                       # device left to debugfs
    assert not os.path.exists(root / "bin/su2")                 # setuid hardlink left to debugfs
    assert lst(root / "bin/plain2").st_ino == lst(root / "bin/plain").st_ino
    assert os.getxattr(root / "bin/su", "user.u") == b"u"
    assert "security.capability" not in os.listxattr(root / "bin/su")
    assert (root / "gone").read_bytes() == b"replaced by a file"
    script = b"\n".join(deferred._script())
    assert b'mknod "null" c 0 0' in script and b'ln "/bin/su" "/bin/su2"' in script
    assert b'"security.capability"' in script and b'"/gone"' not in script


def test_deferred_link_whose_target_is_replaced_later(root, tmp_path):
    with pytest.raises(InvalidInput, match="replaced later in the same layer"):
        apply(root, make_tar(member("su", data=b"1", mode=0o4755), member("su2", "link", target="su"),
                             member("su", data=b"2")), deferred=DeferredOps(str(tmp_path)))
