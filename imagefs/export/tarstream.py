"""A list of changes written out as a PAX layer tar, streamed in chunks.

Entries follow the layer conventions (peers-and-anchors.md §5): relative names,
directories ending in '/', numeric owners only, nanosecond mtimes as PAX ``mtime``
records, every xattr as a binary-safe ``SCHILY.xattr.<name>`` record (Python's
tarfile switches the header to ``hdrcharset=BINARY`` when a value is not UTF-8),
devices with major/minor, FIFOs, symlinks. Deletions are ``.wh.<name>`` entries
and a replaced directory is followed by ``.wh..wh..opq``: empty regular files,
mode 0, owner 0:0, mtime SOURCE_DATE_EPOCH or 0, so the same diff always gives the
same bytes. The first exported name of a multiply-linked inode carries the data,
later ones are hardlinks to it. Sparse files are written out whole (holes as
zeros): every reader understands that, and PAX sparse formats are not portable.
Sockets cannot be put in a tar and are left out, as GNU tar does.

With ``data=False`` (VIC's headers-only mode, for ``docker diff``) every entry has
size 0 and no body, and carries ``SCHILY.xattr.change_type`` = A, C or D.

A FilterSpec decides on the path as it is in the image (before strip/rebase; for
a deletion, the deleted path) and renames entries, link targets of hardlinks and
whiteouts alike. An entry whose new name is the root is written as ``./`` when it
is a directory and left out otherwise.

No name may escape on extraction: every name is checked (no empty, '.' or '..'
component, no NUL, never absolute), and when a strip path can make two paths
collide, the export fails rather than write a name twice or a name below one
that was written as a non-directory (``x -> /abs`` then ``x/pwned``). An xattr
name that is not UTF-8 cannot be a ``SCHILY.xattr`` keyword; it travels as
libarchive's ``LIBARCHIVE.xattr.<%-encoded name>=<base64 value>``, which our
importer and bsdtar read (GNU tar skips it with a warning).
"""
import base64
import os
import stat as statmod
import tarfile
import urllib.parse

from ..errors import InvalidInput
from .. import ext4
from .filterspec import OPAQUE_MARKER, WHITEOUT_PREFIX, FilterSpec

_BLOCK = tarfile.BLOCKSIZE
_RECORD = tarfile.RECORDSIZE
_CHUNK = 1 << 20
_NS = 1_000_000_000
_TYPES = {statmod.S_IFREG: tarfile.REGTYPE, statmod.S_IFDIR: tarfile.DIRTYPE, statmod.S_IFLNK: tarfile.SYMTYPE,
          statmod.S_IFCHR: tarfile.CHRTYPE, statmod.S_IFBLK: tarfile.BLKTYPE, statmod.S_IFIFO: tarfile.FIFOTYPE}


def tar_stream(tree, changes, *, spec=None, data=True):
    """Yield the tar of ``changes`` (from diff_changes) over ``tree`` (the new image) as bytes chunks."""
    writer = _Writer(tree, spec or FilterSpec(), data)
    out = bytearray()
    for change in changes:
        for piece in writer.entry(change):
            out += piece
            if len(out) >= _CHUNK:
                yield bytes(out)
                out.clear()
    yield bytes(out) + writer.end()


class _Writer:
    def __init__(self, tree, spec, data):
        self.tree = tree
        self.spec = spec
        self.data = data
        self.geo = tree.geo
        self.xattrs = tree.xattrs
        self.whiteout_mtime = int(os.environ.get("SOURCE_DATE_EPOCH", "0") or 0)
        self.first_name = {}        # inode -> name of its first exported entry (hardlink target)
        self.size = 0               # bytes produced so far
        self.names = _Collisions() if spec.strip.strip("/.") else None  # only a strip can collide

    def entry(self, change):
        """The header (and body) pieces for one change."""
        path = change.path.lstrip(b"/").decode("utf-8", "surrogateescape")
        if self.spec.excludes(path):
            return
        if change.kind == "D":
            if self.spec.rename(path):      # else the deleted path is the strip root: nothing to name
                head, _, base = path.rpartition("/")
                yield self._whiteout(f"{head}/{WHITEOUT_PREFIX}{base}" if head else WHITEOUT_PREFIX + base)
            return
        st = self.tree.stat(change.ino)
        name = self.spec.rename(path)
        if not name and not st.is_dir:
            return
        kind = statmod.S_IFMT(st.mode)
        if kind not in _TYPES:          # a socket
            return
        info = tarfile.TarInfo(name or ".")
        info.mode = statmod.S_IMODE(st.mode)
        info.uid, info.gid = st.uid, st.gid
        info.uname = info.gname = ""
        info.mtime, frac = divmod(st.mtime_ns, _NS)
        if frac:
            info.pax_headers["mtime"] = _pax_time(st.mtime_ns)
        for key, value in sorted(self.xattrs(change.ino).items()):
            info.pax_headers.update(_xattr_record(key, value))
        if not self.data:
            info.pax_headers["SCHILY.xattr.change_type"] = change.kind
        body = None
        info.type = _TYPES[kind]
        # Any non-directory can have several names, not only a regular file: a FIFO, device
        # or symlink written once per name would come out of the tar as separate inodes
        # (GNU tar and bsdtar hardlink every multiply-linked non-directory the same way).
        linked = kind != statmod.S_IFDIR and st.nlink > 1
        if linked and change.ino in self.first_name:
            info.type, info.linkname = tarfile.LNKTYPE, self.first_name[change.ino]
        else:
            if linked:
                self.first_name[change.ino] = info.name
            if kind == statmod.S_IFREG and self.data:
                info.size = st.size
                body = change.ino
            elif kind == statmod.S_IFLNK:
                info.linkname = self.tree.readlink(change.ino).decode("utf-8", "surrogateescape")
            elif kind in (statmod.S_IFCHR, statmod.S_IFBLK):
                info.devmajor, info.devminor = os.major(st.rdev), os.minor(st.rdev)
        yield self._header(info)
        if body is not None:
            yield from self._body(body, st.size)
        marker = f"{path}/{OPAQUE_MARKER}"
        if change.opaque and not self.spec.excludes(marker):
            yield self._whiteout(marker)

    def _whiteout(self, marker):
        """A whiteout entry (``.wh.<name>`` or the opaque marker) at ``marker``, renamed."""
        info = tarfile.TarInfo(self.spec.rename(marker))
        info.mode, info.mtime = 0, self.whiteout_mtime
        info.uname = info.gname = ""
        if not self.data:
            info.pax_headers["SCHILY.xattr.change_type"] = "D"
        return self._header(info)

    def _header(self, info):
        _check_name(info.name)
        if self.names is not None:
            self.names.add(info.name.rstrip("/"), info.isdir())
        buf = info.tobuf(format=tarfile.PAX_FORMAT, encoding="utf-8", errors="surrogateescape")
        self.size += len(buf)
        return buf

    def _body(self, ino, size):
        for chunk in ext4.file_content(self.tree, self.geo, ino, size, _CHUNK):
            self.size += len(chunk)
            yield chunk
        pad = -size % _BLOCK
        self.size += pad
        yield bytes(pad)

    def end(self):
        """End-of-archive: two zero blocks, then zeros up to a whole record, as tarfile writes."""
        size = self.size + 2 * _BLOCK
        return bytes(2 * _BLOCK + (-size % _RECORD))


def _pax_time(ns):
    sign = "-" if ns < 0 else ""
    sec, frac = divmod(abs(ns), _NS)
    return f"{sign}{sec}.{frac:09d}".rstrip("0")


def _xattr_record(key, value):
    """The PAX record of one xattr: SCHILY.xattr when the name is UTF-8, else LIBARCHIVE.xattr."""
    try:
        return {"SCHILY.xattr." + key.decode("utf-8"): value.decode("utf-8", "surrogateescape")}
    except UnicodeDecodeError:
        return {"LIBARCHIVE.xattr." + urllib.parse.quote(key, safe=""): base64.b64encode(value).decode("ascii")}


def _check_name(name):
    """A tar name that extraction would put outside the target directory is a bug or an attack."""
    if name in (".", "./"):
        return          # the root
    parts = name.rstrip("/").split("/")
    if "\0" in name or name.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise InvalidInput(f"export refuses the entry name {name!r}: it would not stay inside on extraction")


class _Collisions:
    """Names written so far, when a strip path may make two paths one."""

    def __init__(self):
        self.kind = {}          # name -> True for a directory
        self.parents = set()    # every proper prefix of a written name

    def add(self, name, is_dir):
        if name in self.kind:
            raise InvalidInput(f"export: the strip path makes two entries {name!r}")
        parts = name.split("/")
        for i in range(1, len(parts)):
            prefix = "/".join(parts[:i])
            if self.kind.get(prefix) is False:
                raise InvalidInput(f"export: the strip path puts {name!r} below the non-directory {prefix!r}")
            self.parents.add(prefix)
        if not is_dir and name in self.parents:
            raise InvalidInput(f"export: the strip path makes {name!r} a non-directory with entries below it")
        self.kind[name] = is_dir
