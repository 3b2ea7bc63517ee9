"""Hostile layers: archive breakouts (moby pkg/archive's cases) and tar bombs, made as streams.

Every case is a function returning an iterator of byte chunks, so that even a bomb of a
million entries never exists as a file: it is written into the writer as generated.
``BREAKOUTS`` are applied next to a victim directory that must stay untouched;
``BOMBS`` must each be refused with one clear line or applied safely inside the layer,
with the writer's memory bounded.
"""
import io
import tarfile

BLOCK = 512


# --- building blocks ----------------------------------------------------------------------------------
def header(name, kind=tarfile.REGTYPE, size=0, mode=0o644, linkname="", pax=None, devmajor=0, devminor=0,
           fmt=tarfile.PAX_FORMAT):
    """The header block(s) of one member (data not included)."""
    ti = tarfile.TarInfo(name)
    ti.type, ti.size, ti.mode, ti.linkname, ti.mtime = kind, size, mode, linkname, 1_700_000_000
    ti.devmajor, ti.devminor = devmajor, devminor
    if pax:
        ti.pax_headers = dict(pax)
    return ti.tobuf(fmt, "utf-8", "surrogateescape")


def member(name, data=b"", **kw):
    return header(name, size=len(data), **kw) + data + bytes(-len(data) % BLOCK)


def end():
    return bytes(2 * BLOCK)


def tar_of(*members):
    return b"".join(members) + end()


def raw_header(name=b"x", typeflag=b"0", size=0, linkname=b""):
    """A ustar header built by hand, for fields tarfile would not write."""
    h = bytearray(BLOCK)
    h[0:len(name)] = name[:100]
    h[100:108] = b"0000644\0"
    h[108:116] = b"0000000\0"
    h[116:124] = b"0000000\0"
    h[124:136] = (b"%011o\0" % size) if size < 8 ** 11 else b"\x80" + size.to_bytes(11, "big")
    h[136:148] = b"%011o\0" % 1_700_000_000
    h[156:157] = typeflag
    h[157:157 + len(linkname)] = linkname[:100]
    h[257:265] = b"ustar\x0000"
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


# --- moby pkg/archive breakout cases (TestApplyLayerInvalid*, TestUntarInvalid*) -------------------------
def _breakouts():
    reg, lnk, sym = tarfile.REGTYPE, tarfile.LNKTYPE, tarfile.SYMTYPE
    loophole_sym = ("loophole-victim", sym, "../victim")
    loophole_lnk = ("loophole-victim", lnk, "../victim")
    cases = {
        "name ../": [("../victim/dotdot", reg, "")],
        "name /../": [("/../victim/slash-dotdot", reg, "")],
        "hardlink ../": [("dotdot", lnk, "../victim/hello")],
        "hardlink /../": [("slash-dotdot", lnk, "/../victim/hello")],
        "hardlink dir, write through": [loophole_lnk, ("loophole-victim/file", reg, "")],
        "hardlink dir, symlink through": [loophole_lnk, ("symlink", sym, "loophole-victim/hello")],
        "hardlink dir, hardlink through": [loophole_lnk, ("hardlink", lnk, "loophole-victim/hello")],
        "hardlink dir, replace": [loophole_lnk, ("loophole-victim", reg, "")],
        "symlink ../": [("dotdot", sym, "../victim/hello")],
        "symlink /../": [("slash-dotdot", sym, "/../victim/hello")],
        "symlink dir, write through": [loophole_sym, ("loophole-victim/file", reg, "")],
        "symlink dir, symlink through": [loophole_sym, ("symlink", sym, "loophole-victim/hello")],
        "symlink dir, hardlink through": [loophole_sym, ("hardlink", lnk, "loophole-victim/hello")],
        "symlink dir, replace": [loophole_sym, ("loophole-victim", reg, "")],
        "symlink in a parent, new dir": [("dir/loophole", sym, "../../victim"),
                                         ("dir/loophole/newdir/newfile", reg, "")],
        "absolute name": [("/victim-abs/file", reg, "")],
        "absolute symlink dir, write through": [("abs", sym, "/"), ("abs/victim/hello", reg, "")],
        "whiteout ../": [("../victim/.wh.hello", reg, "")],
        "whiteout through symlink": [loophole_sym, ("loophole-victim/.wh.hello", reg, "")],
        "opaque through symlink": [loophole_sym, ("loophole-victim/.wh..wh..opq", reg, "")],
        "hardlink to symlink to victim": [("sym", sym, "../victim/hello"), ("hard", lnk, "sym"),
                                          ("hard", reg, "")],
        "device where a dir was": [("victim-dev", tarfile.CHRTYPE, ""), ("victim-dev/file", reg, "")],
        "host /dev/null through symlink": [("null", sym, "/dev/null"), ("null", reg, "")],
        "host /dev through symlink": [("hostdev", sym, "/dev"), ("hostdev/null", reg, ""),
                                      ("hostdev/sda", tarfile.BLKTYPE, "")],
    }
    out = {}
    for name, entries in cases.items():
        def make(entries=entries):
            blobs = []
            for entry_name, kind, target in entries:
                data = b"pwned" if kind == reg else b""
                kw = {"devmajor": 1, "devminor": 3} if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE) else {}
                blobs.append(member(entry_name, data, kind=kind, linkname=target, **kw))
            yield tar_of(*blobs)
        out[name] = make
    return out


BREAKOUTS = _breakouts()


# --- tar bombs -------------------------------------------------------------------------------------------
def many_entries(n, kind="files", chunk=2048):
    """``n`` members: distinct empty files, whiteouts of nothing, or one name replaced n times."""
    def name(i):
        if kind == "same":
            return "same"
        if kind == "whiteouts":
            return f"w/.wh.gone{i}"
        return f"d{i // 10000}/f{i}"
    batch = []
    for i in range(n):
        batch.append(header(name(i), fmt=tarfile.GNU_FORMAT))
        if len(batch) == chunk:
            yield b"".join(batch)
            batch = []
    yield b"".join(batch) + end()


def deep_dirs(depth, name="d"):
    """Directories nested ``depth`` deep, each a member, and a file at the bottom."""
    path = ""
    for _ in range(depth):
        path = f"{path}{name}/"
        yield header(path, tarfile.DIRTYPE, mode=0o755)
    yield member(path + "bottom", b"deep") + end()


def long_names(block_size=4096):
    """Names, link targets and paths at the limits: a 255-byte name, the longest symlink
    target the filesystem holds (a block less one byte), a path of 3,841 bytes."""
    yield tar_of(member("n" * 255, b"max name"),
                 header("sym-max", tarfile.SYMTYPE, linkname="t" * (block_size - 1)),
                 member("/".join(["p" * 255] * 15) + "/f", b"deep path"))


def name_too_long():
    yield tar_of(member("n" * 256, b"one byte too many"))


def target_too_long():
    yield tar_of(header("sym", tarfile.SYMTYPE, linkname="t" * 4096))


def path_too_long():
    yield tar_of(member("/".join(["p" * 255] * 20) + "/f", b"5 KiB of path"))


def sparse_claim(size=1 << 40):
    """A PAX 1.0 sparse member claiming ``size`` bytes with 4 KiB of data at its end."""
    data = b"s" * 4096
    sparse_map = f"1\n{size - len(data)}\n{len(data)}\n".encode()
    body = sparse_map + bytes(-len(sparse_map) % BLOCK) + data
    pax = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": "huge-sparse",
           "GNU.sparse.realsize": str(size)}
    yield tar_of(member("GNUSparseFile.0/huge-sparse", body, pax=pax))


def pax_huge_record():
    """A PAX record whose length field claims 99,999,999,999 bytes."""
    record = b"99999999999 path=x\n"
    yield raw_header(b"PaxHeaders/x", b"x", len(record)) + record + bytes(-len(record) % BLOCK) + \
        member("x", b"x", fmt=tarfile.USTAR_FORMAT) + end()


def pax_huge_header(size=1 << 33):
    """A PAX extended header member claiming ``size`` bytes (8 GiB), followed by little."""
    yield raw_header(b"PaxHeaders/big", b"x", size) + b"20 path=after-huge\n" + bytes(1000)


def pax_huge_value(size=8 << 20):
    """A PAX record of ``size`` bytes (an 8 MiB xattr value)."""
    value = "v" * size
    record = f" SCHILY.xattr.user.big={value}\n"
    length = len(record) + len(str(len(record)))
    length += len(str(length)) - len(str(len(record)))
    body = f"{length}{record}".encode()
    yield raw_header(b"PaxHeaders/big", b"x", len(body)) + body + bytes(-len(body) % BLOCK) + \
        member("big", b"x", fmt=tarfile.USTAR_FORMAT) + end()


def big_xattr(size=64 << 10):
    """An xattr value of 64 KiB: more than an ext4 inode (and its xattr block) can hold."""
    yield tar_of(member("big-xattr", b"x", pax={"SCHILY.xattr.user.big": "v" * size}))


def gnu_huge_longname(size=1 << 30):
    """A GNU long-name member claiming 1 GiB of name."""
    yield raw_header(b"././@LongLink", b"L", size) + b"n" * 4096


def file_claiming_more(size=1 << 40):
    """A regular file whose header claims 1 TiB; 1 MiB of data follows, then the stream ends."""
    yield header("claims-a-tebibyte", size=size)
    yield bytes(1 << 20)


BOMBS = {
    "a million entries": lambda: many_entries(1_000_000),
    "a million whiteouts": lambda: many_entries(1_000_000, "whiteouts"),
    "one name a million times": lambda: many_entries(1_000_000, "same"),
    "4096-deep directories": lambda: deep_dirs(4096),
    "names at the limits": long_names,
    "a 256-byte name": name_too_long,
    "a 4096-byte symlink target": target_too_long,
    "a 5 KiB path": path_too_long,
    "a claimed 1 TiB sparse file": sparse_claim,
    "a PAX record of 99,999,999,999 bytes": pax_huge_record,
    "a PAX header of 8 GiB": pax_huge_header,
    "an 8 MiB PAX xattr value": pax_huge_value,
    "a 64 KiB xattr value": big_xattr,
    "a 1 GiB GNU long name": gnu_huge_longname,
    "a file claiming 1 TiB, 1 MiB sent": file_claiming_more,
}


def to_bytes(stream):
    return b"".join(stream)


def reader(stream):
    """A file-like object over a chunk iterator (for write_layer and the CLI's stdin)."""
    class _Reader(io.RawIOBase):
        def __init__(self):
            self._it, self._buf = iter(stream), b""

        def readable(self):
            return True

        def readinto(self, b):
            while not self._buf:
                try:
                    self._buf = next(self._it)
                except StopIteration:
                    return 0
            n = min(len(b), len(self._buf))
            b[:n], self._buf = self._buf[:n], self._buf[n:]
            return n
    return _Reader()
