"""Applying a layer tar onto a directory tree, with docker ApplyLayer / OCI layer semantics.

- Names lose a leading "/" and "./"; a ".." component rejects the whole layer.
- Every path is resolved inside ``root`` as if it were "/" (confine.Root): symlinks met on
  the way are followed within the root, the last component is never followed.
- ``.wh.<name>`` removes a lower ``<name>``; ``.wh..wh..opq`` empties its directory of
  everything not unpacked by this layer (wherever it appears in the stream); other
  ``.wh..wh.*`` names are ignored; ``.wh.``, ``.wh..`` and ``.wh...`` are invalid.
- A directory onto a directory merges; anything else replaces what is there.
- Missing parent directories are created 0755 root-owned (docker uses 0600, which only
  makes sense for its chroot-as-root unpacker; 0755 matches what the layer implies).
- Owners are numeric (lchown before chmod, so setuid/setgid survive), modes exact (the
  umask is irrelevant), xattrs binary-safe, times to the nanosecond; directory times are
  set last, once nothing more will be written into them.
- A hardlink only adds a name: the shared inode keeps the metadata its own entry gave it
  (as GNU tar, bsdtar and umoci do; docker re-applies the link header's, which lets a later
  header silently change an earlier file). A hardlink never goes through a symlink at its
  last component.
- Sparse entries (GNU/PAX) stay sparse: data is written at libarchive's block offsets.
- POSIX ACLs come as xattrs or as SCHILY.acl.* records (tarread turns those into xattrs).
  A new node keeps exactly the ACLs its entry carries: the kernel would otherwise hand it
  its directory's default ACL, and fuse2fs would not, so both writers agree.
- Each request costs a fuse2fs writer several block reads and writes through the disk
  export (docs/performance.md, "Writing a layer"), so none is made that changes nothing:
  owner and mode are set only where the new node's differ, inherited ACLs are dropped only
  below a directory that has a default ACL (asked once per directory).
"""
import errno
import os
import stat
from dataclasses import dataclass
from typing import BinaryIO, Callable

from ..crashpoints import crash_point
from ..errors import ImageFSError, InvalidInput, NoSpace
from .confine import Root, join, remove_at, split
from .deferred import DeferredOps, NodeMeta, is_protected_link_source, needs_privilege
from .model import KIND_BLK, KIND_CHR, KIND_DIR, KIND_FIFO, KIND_LNK, KIND_REG, DataDigest, LayerModel
from .tarread import ACL_ACCESS_XATTR, ACL_DEFAULT_XATTR, Entry, TarStream, open_tar
from .tarread import show_name as _show

WHITEOUT = b".wh."
OPAQUE = b".wh..wh..opq"
WHITEOUT_META = b".wh..wh."

_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_INVALID_INPUT_ERRNOS = (errno.ENAMETOOLONG, errno.ENOTDIR, errno.ELOOP)


@dataclass
class ApplyStats:
    entries: int
    bytes: int
    complete: bool = False      # the tar's end-of-archive marker was read (not just the end of the stream)


def apply_layer(root: str, stream: BinaryIO, *,
                path_filter: Callable[[str], str | None] | None = None,
                whiteouts: bool = True, deferred: DeferredOps | None = None,
                model: LayerModel | None = None) -> ApplyStats:
    """Apply the (maybe compressed) tar ``stream`` onto the tree at ``root``.

    ``path_filter(name)`` returns the relative name to use, or None to skip the entry.
    With ``whiteouts=False`` whiteout files are written as plain files (container import).
    With ``deferred``, what needs privileges is recorded there instead of done.
    ``model`` receives what the layer holds where it touched the tree (for ``verify.py``);
    without one, an in-memory model keeps the bookkeeping.
    """
    own_model = model is None
    applier = _Applier(root, path_filter, whiteouts, deferred, model or LayerModel())
    try:
        with open_tar(stream) as tar:
            for entry in tar.entries():
                applier.apply(entry, tar)
                crash_point("extract")
            applier.stats.complete = tar.complete
        applier.set_dir_times()
    finally:
        applier.close()
        if own_model:
            applier.model.close()
    return applier.stats


def clean_name(raw: bytes) -> bytes:
    """A tar name as a relative path: no leading "/" or "./", no empty or "." components."""
    parts = [p for p in raw.split(b"/") if p and p != b"."]
    if b".." in parts:
        raise InvalidInput(f"layer entry {_show(raw)} has a '..' component")
    return b"/".join(parts)


class _Applier:
    def __init__(self, root, path_filter, whiteouts, deferred, model):
        try:
            self.root = Root(root)
        except OSError as err:
            raise ImageFSError(f"cannot open the layer root {root}: {err.strerror}") from None
        self.path_filter = path_filter
        self.whiteouts = whiteouts
        self.deferred = deferred
        self.model = model          # real paths this layer unpacked, and what each must hold
        self.stats = ApplyStats(0, 0)
        self._default_acl: dict[bytes, bool] = {}      # directory real path -> has a default ACL

    def close(self):
        self.root.close()

    # --- dispatch ---

    def apply(self, e: Entry, tar: TarStream) -> None:
        name = self._name(e.name)
        if name is None:
            return
        parent, base = split(name)
        try:
            if self.whiteouts and base.startswith(WHITEOUT):
                if base.startswith(WHITEOUT_META) and base != OPAQUE:
                    return                      # AUFS metadata (.wh..wh.plnk etc.): ignored
                self._whiteout(name, parent, base)
            elif e.hardlink is not None:
                self._hardlink(e, name, parent, base)
            else:
                self._node(e, name, parent, base, tar)
        except OSError as err:
            raise _translate(err, name) from None
        self.stats.entries += 1

    def _name(self, raw: bytes) -> bytes | None:
        name = clean_name(raw)
        if self.path_filter is None:
            return name
        mapped = self.path_filter(os.fsdecode(name))
        return None if mapped is None else clean_name(os.fsencode(mapped))

    def _parent(self, parent: bytes, name: bytes) -> int:
        try:
            return self.root.make_dirs(parent, self.model.implicit_dir)
        except NotADirectoryError:
            raise InvalidInput(f"cannot apply {_show(name)}: a parent is not a directory") from None

    # --- whiteouts ---

    def _whiteout(self, name: bytes, parent: bytes, base: bytes) -> None:
        if base == OPAQUE:
            pfd = self._parent(parent, name)
            try:
                self._clear(self.root.real(pfd))
            finally:
                os.close(pfd)
            return
        victim = base[len(WHITEOUT):]
        if victim in (b"", b".", b".."):
            raise InvalidInput(f"invalid whiteout {_show(name)}")
        try:
            pfd = self.root.open_dir(parent)
        except (FileNotFoundError, NotADirectoryError):
            return                              # nothing below to hide
        try:
            real = join(self.root.real(pfd), victim)
            st = _lstat(pfd, victim)
            if st is None:
                return
            mine = self.model.has(real) or self.model.has_below(real)
            if mine and stat.S_ISDIR(st.st_mode):
                # this layer's directory (its own entry, or a parent of its entries) may sit merged
                # on the lower one: the whiteout hides the lower part only, this layer's stays
                self._clear(real)
            elif not mine:                      # whiteouts only hide lower layers
                self._remove(pfd, victim, real, st)
        finally:
            os.close(pfd)

    def _clear(self, top: bytes) -> None:
        """Remove everything below directory ``top`` that this layer did not unpack (iteratively:
        trees may be deeper than Python's recursion)."""
        pending = [top]
        while pending:
            real = pending.pop()
            dfd = self.root.open_dir(real)
            try:
                for child, is_dir in _listdir(dfd):
                    path = join(real, child)
                    if is_dir and (self.model.has(path) or self.model.has_below(path)):
                        pending.append(path)
                    elif not self.model.has(path):
                        st = _lstat(dfd, child)
                        if st is not None:
                            self._remove(dfd, child, path, st)
            finally:
                os.close(dfd)
            self.model.emptied(real)

    def _remove(self, dfd: int, base: bytes, real: bytes, st: os.stat_result) -> None:
        remove_at(dfd, base, st)
        if stat.S_ISDIR(st.st_mode):
            self._default_acl.clear()           # rare: forget what was known below it
        self.model.removed(real, subtree=stat.S_ISDIR(st.st_mode))
        if self.deferred is not None:
            self.deferred.forget(real, subtree=stat.S_ISDIR(st.st_mode))

    # --- entries ---

    def _replace(self, pfd: int, base: bytes, real: bytes, create, merge_dir: bool = False) -> bool:
        """Run create(); if the path exists, remove it first (a directory onto a directory
        merges instead). True if a new node was made."""
        if self.deferred is not None:
            self.deferred.forget(real)
        created = True
        try:
            create()
        except FileExistsError:
            st = os.lstat(base, dir_fd=pfd)
            if merge_dir and stat.S_ISDIR(st.st_mode):
                created = False
            else:
                self._remove(pfd, base, real, st)
                create()
        return created

    def _node(self, e: Entry, name: bytes, parent: bytes, base: bytes, tar: TarStream) -> None:
        kind = e.filetype
        if not name:
            if kind != stat.S_IFDIR:
                raise InvalidInput("layer entry for the root directory is not a directory")
            parent, base = b"", b"."
        if kind not in (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO):
            raise InvalidInput(f"layer entry {_show(name)} has an unsupported type ({kind:o})")
        pfd = self._parent(parent, name)
        try:
            real = join(self.root.real(pfd), base) if name else b""
            if kind == stat.S_IFREG:
                self._regular(e, pfd, base, real, tar)
            elif kind == stat.S_IFDIR:
                created = self._replace(pfd, base, real, lambda: os.mkdir(base, e.perm & 0o777, dir_fd=pfd),
                                        merge_dir=True)
                if created and self._inherits_acls(pfd, real):
                    _drop_inherited_acls(b"/proc/self/fd/%d/%s" % (pfd, base), e, directory=True)
                self._default_acl.pop(real, None)      # its entry may set one
                xattrs = self._set_meta(e, pfd, base, real, times=False)
                self._record(real, KIND_DIR, e, xattrs, merged=not created)     # times: set_dir_times
            elif kind == stat.S_IFLNK:
                if not e.symlink:
                    raise InvalidInput(f"symlink {_show(name)} has no target")
                self._replace(pfd, base, real, lambda: os.symlink(e.symlink, base, dir_fd=pfd))
                xattrs = self._set_meta(e, pfd, base, real, symlink=True)
                self._record(real, KIND_LNK, e, xattrs, target=e.symlink)
            elif kind == stat.S_IFIFO:
                self._replace(pfd, base, real, lambda: os.mkfifo(base, 0o600, dir_fd=pfd))
                if self._inherits_acls(pfd, real):
                    _drop_inherited_acls(b"/proc/self/fd/%d/%s" % (pfd, base), e)
                self._record(real, KIND_FIFO, e, self._set_meta(e, pfd, base, real))
            elif self.deferred is not None:     # a device node, without the privilege to make it
                self._replace(pfd, base, real, lambda: _absent(pfd, base))
                self.deferred.node(real, kind, e.rdev_major, e.rdev_minor,
                                   NodeMeta(e.perm, e.uid, e.gid, e.atime_ns, e.mtime_ns))
                for xname, value in e.xattrs:
                    self.deferred.xattr(real, xname, value)
                self._record(real, _DEVICE_KINDS[kind], e, e.xattrs, rdev=os.makedev(e.rdev_major, e.rdev_minor))
            else:
                dev = os.makedev(e.rdev_major, e.rdev_minor)
                self._replace(pfd, base, real, lambda: os.mknod(base, kind | 0o600, dev, dir_fd=pfd))
                if self._inherits_acls(pfd, real):
                    _drop_inherited_acls(b"/proc/self/fd/%d/%s" % (pfd, base), e)
                self._record(real, _DEVICE_KINDS[kind], e, self._set_meta(e, pfd, base, real), rdev=dev)
        finally:
            os.close(pfd)

    def _record(self, real: bytes, kind: str, e: Entry, xattrs, **facts) -> None:
        self.model.node(real, kind, perm=e.perm, uid=e.uid, gid=e.gid, atime=e.atime_ns, mtime=e.mtime_ns,
                        xattrs=xattrs, **facts)

    def _regular(self, e: Entry, pfd: int, base: bytes, real: bytes, tar: TarStream) -> None:
        fds = []
        # made with its final permission bits (the umask allowing) so that fchmod is rarely needed
        self._replace(pfd, base, real, lambda: fds.append(os.open(base, _NEW_FILE, e.perm & 0o777, dir_fd=pfd)))
        fd = fds[0]
        digest = DataDigest()
        try:
            if self._inherits_acls(pfd, real):
                _drop_inherited_acls(fd, e)
            made = os.fstat(fd)                 # owner and mode as made
            end = 0
            for offset, block in tar.data_blocks():
                if offset < end:
                    raise InvalidInput(f"layer entry {_show(real)}: data blocks out of order (bad sparse map)")
                _pwrite_all(fd, block, offset)
                digest.update(offset, block)
                end = offset + len(block)
                self.stats.bytes += len(block)
            if end < e.size:                    # a trailing hole of a sparse file
                os.ftruncate(fd, e.size)
            chown, chmod = _owner_mode_changes(made, e)
            if chown:
                os.fchown(fd, e.uid, e.gid)
            if chmod:
                os.fchmod(fd, e.perm)
            xattrs = self._set_xattrs(fd, real, e.xattrs)
            os.utime(fd, ns=(e.atime_ns, e.mtime_ns))
        finally:
            os.close(fd)
        self._record(real, KIND_REG, e, xattrs, size=max(end, e.size), digest=digest.hexdigest())

    def _hardlink(self, e: Entry, name: bytes, parent: bytes, base: bytes) -> None:
        target = self._name(e.hardlink)
        if not target:
            raise InvalidInput(f"hardlink {_show(name)} has no usable target {_show(e.hardlink)}")
        tparent, tbase = split(target)
        try:
            tfd = self.root.open_dir(tparent)
        except (FileNotFoundError, NotADirectoryError):
            raise InvalidInput(f"hardlink {_show(name)}: target {_show(target)} does not exist") from None
        try:
            treal = join(self.root.real(tfd), tbase)
            tst = _lstat(tfd, tbase)
            pending = self.deferred is not None and self.deferred.pending(treal)
            if tst is None and not pending:
                raise InvalidInput(f"hardlink {_show(name)}: target {_show(target)} does not exist")
            if tst is not None and stat.S_ISDIR(tst.st_mode):
                raise InvalidInput(f"hardlink {_show(name)}: target {_show(target)} is a directory")
            pfd = self._parent(parent, name)
            try:
                real = join(self.root.real(pfd), base)
                kind = _KINDS[stat.S_IFMT(tst.st_mode) if tst is not None else self.deferred.kind(treal)]
                if real == treal:
                    self.model.link(real, treal, kind)
                    return
                if pending or (self.deferred is not None and is_protected_link_source(tst)):
                    self._defer_link(pfd, base, real, treal)
                else:
                    try:
                        self._replace(pfd, base, real, lambda: os.link(tbase, base, src_dir_fd=tfd, dst_dir_fd=pfd,
                                                                       follow_symlinks=False))
                    except PermissionError:
                        if self.deferred is None:
                            raise
                        self._defer_link(pfd, base, real, treal)    # fs.protected_hardlinks
                self.model.link(real, treal, kind)
            finally:
                os.close(pfd)
        finally:
            os.close(tfd)

    def _defer_link(self, pfd: int, base: bytes, real: bytes, treal: bytes) -> None:
        self._replace(pfd, base, real, lambda: _absent(pfd, base))
        self.deferred.link(treal, real)

    # --- metadata ---

    def _set_meta(self, e: Entry, pfd: int, base: bytes, real: bytes, *,
                  symlink: bool = False, times: bool = True) -> list[tuple[str, bytes]]:
        """Owner, mode, xattrs and times from the entry; the xattrs set (or deferred)."""
        chown, chmod = _owner_mode_changes(os.lstat(base, dir_fd=pfd), e)
        if chown:
            os.chown(base, e.uid, e.gid, dir_fd=pfd, follow_symlinks=False)
        if chmod and not symlink:
            os.chmod(base, e.perm, dir_fd=pfd)      # not a symlink: nothing to follow
        xattrs = []
        if e.xattrs:
            # lsetxattr through the parent's fd: the last component is not followed
            xattrs = self._set_xattrs(b"/proc/self/fd/%d/%s" % (pfd, base), real, e.xattrs)
        if times:
            os.utime(base, ns=(e.atime_ns, e.mtime_ns), dir_fd=pfd, follow_symlinks=False)
        return xattrs

    def _set_xattrs(self, target: int | bytes, real: bytes,
                    xattrs: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
        """Set ``xattrs``; those set or deferred (a namespace the filesystem lacks is skipped)."""
        done = []
        for xname, value in xattrs:
            if self.deferred is not None and needs_privilege(xname):
                self.deferred.xattr(real, xname, value)
                done.append((xname, value))
                continue
            try:
                os.setxattr(target, xname, value, follow_symlinks=isinstance(target, int))
            except OSError as err:
                if err.errno == errno.EOPNOTSUPP and not xname.startswith("user."):
                    continue                    # as docker: a namespace the fs lacks is skipped
                if err.errno in (errno.ENOSPC, errno.E2BIG, errno.ERANGE):    # ext4 says ENOSPC for a big value
                    raise InvalidInput(f"layer entry {_show(real)}: xattr {xname!r} of {len(value)} bytes "
                                       "does not fit an ext4 inode") from None
                raise
            done.append((xname, value))
        return done

    def _inherits_acls(self, pfd: int, real: bytes) -> bool:
        """Does a node made in ``real``'s parent (open at ``pfd``) inherit a default ACL?"""
        parent = split(real)[0] if real else b""
        known = self._default_acl.get(parent)
        if known is None:
            try:
                os.getxattr(b"/proc/self/fd/%d" % pfd, ACL_DEFAULT_XATTR)
                known = True
            except OSError as err:
                if err.errno not in (errno.ENODATA, errno.EOPNOTSUPP):
                    raise
                known = False
            self._default_acl[parent] = known
        return known

    def set_dir_times(self) -> None:
        for real, atime_ns, mtime_ns in self.model.dir_times():
            parent, base = split(real) if real else (b"", b".")
            try:
                pfd = self.root.open_dir(parent)
            except (FileNotFoundError, NotADirectoryError):
                continue                        # replaced later in the layer
            try:
                st = _lstat(pfd, base)
                if st is not None and stat.S_ISDIR(st.st_mode):
                    os.utime(base, ns=(atime_ns, mtime_ns), dir_fd=pfd, follow_symlinks=False)
            except OSError as err:
                raise _translate(err, real) from None
            finally:
                os.close(pfd)


def _owner_mode_changes(made: os.stat_result, e: Entry) -> tuple[bool, bool]:
    """(chown needed, chmod needed) for a node as ``made`` to get ``e``'s owner and mode;
    a chown clears setuid and setgid, so the mode is set again after one."""
    chown = (made.st_uid, made.st_gid) != (e.uid, e.gid)
    return chown, chown or stat.S_IMODE(made.st_mode) != e.perm


def _drop_inherited_acls(target: int | bytes, e: Entry, directory: bool = False) -> None:
    """A new node in a directory with a default ACL inherits it (kernel ext4; not fuse2fs).
    The layer says exactly which ACLs a node has, so drop those its entry does not carry."""
    carried = {name for name, _ in e.xattrs}
    for name in (ACL_ACCESS_XATTR, ACL_DEFAULT_XATTR) if directory else (ACL_ACCESS_XATTR,):
        if name not in carried:
            try:
                os.removexattr(target, name, follow_symlinks=isinstance(target, int))
            except OSError as err:
                if err.errno not in (errno.ENODATA, errno.EOPNOTSUPP):
                    raise


_DEVICE_KINDS = {stat.S_IFCHR: KIND_CHR, stat.S_IFBLK: KIND_BLK}
_KINDS = {stat.S_IFREG: KIND_REG, stat.S_IFLNK: KIND_LNK, stat.S_IFIFO: KIND_FIFO, **_DEVICE_KINDS}


def _listdir(dir_fd: int) -> list[tuple[bytes, bool]]:
    """(name, is a directory) of every entry of an (O_PATH) open directory."""
    fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        with os.scandir(fd) as entries:         # scandir works on a duplicate of fd
            return [(os.fsencode(e.name), e.is_dir(follow_symlinks=False)) for e in entries]
    finally:
        os.close(fd)


def _lstat(dir_fd: int, name: bytes) -> os.stat_result | None:
    try:
        return os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return None


def _absent(dir_fd: int, name: bytes) -> None:
    """A create() for _replace that makes nothing: only clears the way."""
    if _lstat(dir_fd, name) is not None:
        raise FileExistsError(errno.EEXIST, "exists", name)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


def _translate(err: OSError, name: bytes) -> ImageFSError:
    what = f"cannot apply layer entry {_show(name)}: {err.strerror or err}"
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return NoSpace(what)
    if err.errno in _INVALID_INPUT_ERRNOS:
        return InvalidInput(what)
    failure = ImageFSError(what)
    failure.errno = err.errno or errno.EIO
    return failure
