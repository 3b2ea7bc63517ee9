"""The pyfuse3 adapter: FUSE requests in, namespace calls, attributes and errnos out.

Threading: requests run as trio tasks on one thread. Image-tree requests (lookup,
getattr, readdir, read, xattrs inside ``rootfs``) run inline: they hit caches and
local preads, cheaper than a thread hop (peers-and-anchors §3.6). Requests on the
synthetic namespace touch the image store (datastore listings, VMDK headers, maybe
a remote backend) and run in worker threads. Imports and exports have their own
worker threads (imports.py, exports.py), so no heavy work ever blocks the loop.

Errors: ImageFSError and OSError become their errno; anything else is logged and
becomes EIO. The daemon never dies of a request.
"""
import errno
import functools
import logging
import os

import pyfuse3
import trio

from ..errors import ImageFSError, ReadOnly
from ..export import export_diff
from ..ids import SCRATCH
from .access import visible_xattrs
from .exports import ExportLimits, ExportStream
from .files import BytesFile, DirHandle, ExportFileHandle, HandleTable, TreeFile
from .imports import ImportHandle
from .prefetch import Prefetcher
from .nodes import (LONG, NONE, ContentFile, ExportFile, ImagesDir, ImportDir, ImportFile, ParentLink, is_tree_ino)

log = logging.getLogger("imagefs.fuse")

BLKSIZE = 128 * 1024
_LISTINGS_KEPT = 4096
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND


def _errors_to_errno(handler):
    @functools.wraps(handler)
    async def wrapper(self, *args):
        try:
            return await handler(self, *args)
        except pyfuse3.FUSEError:
            raise
        except ImageFSError as e:
            if e.errno == errno.EIO:           # a broken disk or tool: worth a log line
                self._log_once(f"{handler.__name__}: {e}")
            else:
                log.debug("%s: %s", handler.__name__, e)
            raise pyfuse3.FUSEError(e.errno) from None
        except OSError as e:
            log.debug("%s: %s", handler.__name__, e)
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        except Exception:
            log.exception("%s%r failed", handler.__name__, args)
            raise pyfuse3.FUSEError(errno.EIO) from None
    return wrapper


def _attributes(entry):
    st = entry.stat
    a = pyfuse3.EntryAttributes()
    a.st_ino = entry.ino
    a.entry_timeout = entry.entry_ttl
    a.attr_timeout = entry.attr_ttl
    a.st_mode = st.mode
    a.st_nlink = st.nlink
    a.st_uid = st.uid
    a.st_gid = st.gid
    a.st_rdev = st.rdev
    a.st_size = st.size
    a.st_blocks = st.blocks
    a.st_blksize = BLKSIZE
    a.st_atime_ns = st.atime_ns
    a.st_mtime_ns = st.mtime_ns
    a.st_ctime_ns = st.ctime_ns
    return a


def _negative(ttl):
    """A cacheable "no such entry" (st_ino 0)."""
    a = pyfuse3.EntryAttributes()
    a.st_ino = 0
    a.entry_timeout = ttl
    return a


async def _in_thread(fn, *args):
    return await trio.to_thread.run_sync(fn, *args)


class Operations(pyfuse3.Operations):
    supports_dot_lookup = False       # no NFS export: no ".." lookups to answer

    def __init__(self, ns, imports, limits=None):
        super().__init__()
        self.ns = ns
        self.imports = imports
        self.handles = HandleTable()
        self.exports = set()
        self.export_limits = limits or ExportLimits(per_mount=32, per_user=8)
        self.nursery = None
        self._logged = set()
        self._listings = {}     # image directory inode -> [(name, EntryAttributes)]
        self.prefetcher = Prefetcher()
        imports.on_finished = self._import_finished

    def start(self, nursery):
        """Serve with ``nursery`` holding the import and export workers."""
        self.nursery = nursery
        self.imports.nursery = nursery

    async def shutdown(self):
        """Abort imports still receiving and stop exports; committing imports finish."""
        for stream in list(self.exports):
            stream.close()
        self.prefetcher.close()
        await self.imports.shutdown()

    def _log_once(self, message):
        if message not in self._logged:
            log.error("%s", message)
            if len(self._logged) < 10000:
                self._logged.add(message)

    # --- names and attributes ------------------------------------------------------------
    @_errors_to_errno
    async def lookup(self, parent_inode, name, ctx):
        if is_tree_ino(parent_inode):
            entry = self.ns.tree_lookup(parent_inode, name)
            return _negative(LONG) if entry is None else _attributes(entry)
        if name in (b".", b".."):
            raise pyfuse3.FUSEError(errno.ENOENT)
        entry = await _in_thread(self.ns.lookup, parent_inode, name)
        if entry is None:
            raise pyfuse3.FUSEError(errno.ENOENT)  # not cached: the namespace changes
        for directory, old_name in self.ns.note_lookup(parent_inode, name, entry.ino):
            pyfuse3.invalidate_entry_async(directory, old_name, ignore_enoent=True)
        return _attributes(entry)

    @_errors_to_errno
    async def getattr(self, inode, ctx):
        if is_tree_ino(inode):
            return _attributes(self.ns.tree_entry(inode))
        return _attributes(await _in_thread(self.ns.getattr, inode))

    @_errors_to_errno
    async def setattr(self, inode, attr, fields, fh, ctx):
        node = None if is_tree_ino(inode) else self.ns.node_at(inode)
        if not isinstance(node, ImportFile):
            raise ReadOnly("read-only")
        # cp -p, touch and tar set times and modes on what they write: accepted and ignored.
        if fields.update_size:
            handle = self.handles[fh] if fh is not None else None
            if not isinstance(handle, ImportHandle):
                raise pyfuse3.FUSEError(errno.EINVAL)
            await handle.truncate(attr.st_size)
        return _attributes(await _in_thread(self.ns.getattr, inode))

    @_errors_to_errno
    async def readlink(self, inode, ctx):
        if is_tree_ino(inode):
            return self.ns.tree_readlink(inode)
        node = self.ns.node_at(inode)
        if not isinstance(node, ParentLink):
            raise pyfuse3.FUSEError(errno.EINVAL)
        return node.target()

    async def forget(self, inode_list):
        # Inode numbers live as long as the mount, except export names with options (any name
        # makes one): those go when the kernel forgets them.
        for inode, nlookup in inode_list:
            self.ns.forget(inode, nlookup)

    # --- directories -------------------------------------------------------------------
    @_errors_to_errno
    async def opendir(self, inode, ctx):
        return self.handles.add(DirHandle(inode))

    @_errors_to_errno
    async def readdir(self, fh, start_id, token):
        handle = self.handles[fh]
        if handle.entries is None:
            if is_tree_ino(handle.ino):
                handle.entries = self._tree_listing(handle.ino)
            else:
                own = _attributes(await _in_thread(self.ns.getattr, handle.ino))
                handle.entries = [(b".", own), (b"..", own)] + [
                    (name, _attributes(entry)) for name, entry in await _in_thread(self.ns.listdir, handle.ino)]
        entries = handle.entries
        reply = pyfuse3.readdir_reply
        for i in range(start_id, len(entries)):
            name, attrs = entries[i]
            if not reply(token, name, attrs, i + 1):
                break

    def _tree_listing(self, ino):
        """(name, attributes) of an image directory; images never change, so this is kept."""
        listing = self._listings.get(ino)
        if listing is None:
            # "." and ".." for ls -a; the kernel resolves both itself and ignores their attributes
            own = _attributes(self.ns.tree_entry(ino))
            listing = [(b".", own), (b"..", own)] + [
                (name, _attributes(entry)) for name, entry in self.ns.tree_listdir(ino)]
            if len(self._listings) >= _LISTINGS_KEPT:
                self._listings.pop(next(iter(self._listings)))
            self._listings[ino] = listing
        return listing

    async def releasedir(self, fh):
        self.handles.pop(fh)

    @_errors_to_errno
    async def mkdir(self, parent_inode, name, mode, ctx):
        node = self._node(parent_inode)
        child = await _in_thread(node.mkdir, self.ns, name)
        return _attributes(await _in_thread(self.ns.entry, child, node.names_ttl))

    @_errors_to_errno
    async def rmdir(self, parent_inode, name, ctx):
        node = self._node(parent_inode)
        await _in_thread(node.rmdir, self.ns, name)

    @_errors_to_errno
    async def unlink(self, parent_inode, name, ctx):
        node = self._node(parent_inode)
        await _in_thread(node.unlink, self.ns, name)

    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        raise pyfuse3.FUSEError(errno.EROFS)

    async def symlink(self, parent_inode, name, target, ctx):
        raise pyfuse3.FUSEError(errno.EROFS)

    async def link(self, inode, new_parent_inode, new_name, ctx):
        raise pyfuse3.FUSEError(errno.EROFS)

    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        raise pyfuse3.FUSEError(errno.EROFS)

    def _node(self, inode):
        """The synthetic node ``inode``; image trees refuse every change."""
        if is_tree_ino(inode):
            raise pyfuse3.FUSEError(errno.EROFS)
        return self.ns.node_at(inode)

    # --- files ---------------------------------------------------------------------------
    @_errors_to_errno
    async def create(self, parent_inode, name, mode, flags, ctx):
        node = self._node(parent_inode)
        if not isinstance(node, ImportDir):
            raise pyfuse3.FUSEError(errno.EROFS)
        child = await _in_thread(node.new_import, self.ns, name)
        entry = await _in_thread(self.ns.entry, child, node.names_ttl)
        handle = ImportHandle(child.session(self.ns), entry.ino, truncate=bool(flags & os.O_TRUNC))
        return pyfuse3.FileInfo(fh=self.handles.add(handle), direct_io=True), _attributes(entry)

    @_errors_to_errno
    async def open(self, inode, flags, ctx):
        writing = flags & _WRITE_FLAGS
        if is_tree_ino(inode):
            if writing:
                raise pyfuse3.FUSEError(errno.EROFS)
            handle = TreeFile(self.ns, inode, self.ns.tree_open(inode), self.prefetcher)
            return pyfuse3.FileInfo(fh=self.handles.add(handle), keep_cache=True)
        node = self.ns.node_at(inode)
        if isinstance(node, ImportFile):
            if flags & os.O_ACCMODE == os.O_RDONLY:
                raise pyfuse3.FUSEError(errno.EACCES)   # write-only: the layer is read back from rootfs/
            handle = ImportHandle(node.session(self.ns), inode, truncate=bool(flags & os.O_TRUNC))
            return pyfuse3.FileInfo(fh=self.handles.add(handle), direct_io=True)
        if writing:
            raise pyfuse3.FUSEError(errno.EROFS)
        if isinstance(node, ExportFile):
            handle = await self._open_export(node, ctx.uid)
            return pyfuse3.FileInfo(fh=self.handles.add(handle), direct_io=True, keep_cache=False)
        if isinstance(node, ContentFile):
            handle = BytesFile(await _in_thread(node.content, self.ns))
            volatile = node.attr_ttl == NONE    # its size may change: do not let the kernel clip reads
            return pyfuse3.FileInfo(fh=self.handles.add(handle), direct_io=volatile, keep_cache=not volatile)
        raise pyfuse3.FUSEError(errno.EISDIR if node.is_dir else errno.EINVAL)

    async def _open_export(self, node, uid):
        wanted = node.export
        ref, ns = node.ref, self.ns

        def open_trees():     # in a thread: opening a chain reads VMDK headers
            new = ns.tree(ref)
            if wanted.ancestor == SCRATCH:
                return new, None, None     # scratch.tar: the whole image (every entry an add)
            old_ref = ns.image_ref(ns.store.get_image(ref.store, wanted.ancestor))
            return new, ns.tree(old_ref), old_ref

        self.export_limits.acquire(uid)
        try:
            new, old, old_ref = await _in_thread(open_trees)
        except BaseException:
            self.export_limits.release(uid)
            raise
        held = [r.idx for r in (ref, old_ref) if r is not None]   # rmdir of either is busy meanwhile
        for idx in held:
            ns.hold(idx)
        name = f"{ref.store}/{ref.id}/export/{node.key[1]}"
        stream = ExportStream(lambda: export_diff(new, old, spec=wanted.spec, data=wanted.data), self.nursery, name)
        self.exports.add(stream)

        def closed(stream):
            self.exports.discard(stream)
            self.export_limits.release(uid)
            for idx in held:
                ns.release(idx)
        return ExportFileHandle(stream, closed)

    @_errors_to_errno
    async def read(self, fh, off, size):
        return await self.handles[fh].read(off, size)

    @_errors_to_errno
    async def write(self, fh, off, buf):
        return await self.handles[fh].write(off, buf)

    @_errors_to_errno
    async def flush(self, fh):
        await self.handles[fh].flush()

    @_errors_to_errno
    async def release(self, fh):
        handle = self.handles.pop(fh)
        if handle is not None:
            handle.release()

    async def fsync(self, fh, datasync):
        pass    # nothing is durable before an import's commit, which close() waits for

    # --- xattrs ---------------------------------------------------------------------------
    @_errors_to_errno
    async def getxattr(self, inode, name, ctx):
        value = (await self._xattrs(inode)).get(name)
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value

    @_errors_to_errno
    async def listxattr(self, inode, ctx):
        names = list(await self._xattrs(inode))
        if ctx.uid == 0 or not names:
            return names
        st = (self.ns.tree_entry(inode) if is_tree_ino(inode) else await _in_thread(self.ns.getattr, inode)).stat
        return visible_xattrs(names, ctx, st)      # the kernel checks getxattr, not listxattr

    async def _xattrs(self, inode):
        if is_tree_ino(inode):
            return self.ns.tree_xattrs(inode)
        node = self.ns.node_at(inode)
        return await _in_thread(node.xattrs, self.ns)

    @_errors_to_errno
    async def setxattr(self, inode, name, value, ctx):
        node = self._node(inode)
        await _in_thread(node.setxattr, self.ns, name, value)

    @_errors_to_errno
    async def removexattr(self, inode, name, ctx):
        node = self._node(inode)
        await _in_thread(node.removexattr, self.ns, name)

    # --- the filesystem ---------------------------------------------------------------------
    @_errors_to_errno
    async def statfs(self, ctx):
        total, free, avail = await _in_thread(self.ns.store.ds.statfs)
        st = pyfuse3.StatvfsData()
        st.f_bsize = st.f_frsize = 4096
        st.f_blocks, st.f_bfree, st.f_bavail = total // 4096, free // 4096, avail // 4096
        st.f_namemax = 255
        return st

    def _import_finished(self, session, ok):
        """Tell the kernel: the import's name is gone, and (when sealed) images/ has a new entry."""
        ns = self.ns
        import_dir = ns.ino_of(ns.node(ImportDir, session.ref))
        pyfuse3.invalidate_entry_async(import_dir, session.new_id.encode(), ignore_enoent=True)
        pyfuse3.invalidate_entry_async(import_dir, session.new_id.encode() + b".error", ignore_enoent=True)
        if ok:
            images = ns.ino_of(ns.node(ImagesDir, session.ref.store))
            pyfuse3.invalidate_entry_async(images, session.new_id.encode(), ignore_enoent=True)
