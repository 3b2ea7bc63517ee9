"""The pyfuse3 adapter: FUSE requests in, node calls, attributes and errnos out.

What the mount looks like is defined by the nodes (nodes.py) over the namespace
(namespace.py); this module only dispatches. A request for inode N goes to the
node ``ns.resolve(N)``, on the event loop for nodes that answer from memory and
local preads (image trees, ``inline``: cheaper than a thread hop), in a worker
thread for the others (they touch the image store: datastore listings, VMDK
headers, maybe a remote backend). Imports and exports have their own worker threads
(imports.py, exports.py), so no heavy work ever blocks the loop.

Errors: ImageFSError and OSError become their errno; anything else is logged and
becomes EIO. The daemon never dies of a request.
"""
import errno
import functools
import logging
import stat

import pyfuse3
import trio

from ..errors import ImageFSError, ReadOnly
from .access import visible_xattrs
from .files import HandleTable, Listings
from .namespace import TreeClosed
from .nodes import XATTR_PREFIX, ImagesDir, ImportDir

log = logging.getLogger("imagefs.fuse")

BLKSIZE = 128 * 1024
# FUSE's no-opendir mode: opendir answers ENOSYS, the kernel stops sending opendir and
# releasedir and keeps every listing it reads (Namespace.note_listing says how the changing
# ones are read again). readdir must then learn its directory from the request: the
# project's pyfuse3 patch (scripts/build-pyfuse3.sh). Without it each opendir is answered
# and every readdir asks the daemon.
NO_OPENDIR = hasattr(pyfuse3.ReaddirToken, "inode")


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


def _dot_attributes(ino):
    """"." and ".." of a listing, for ls -a. The kernel resolves both itself and takes
    nothing from them but the entry's type, so they need no stat (which, for a directory
    whose names change, would list it a second time)."""
    a = pyfuse3.EntryAttributes()
    a.st_ino = ino
    a.st_mode = stat.S_IFDIR
    return a


def _negative(ttl):
    """A "no such entry" the kernel may remember for ``ttl`` seconds (st_ino 0)."""
    a = pyfuse3.EntryAttributes()
    a.st_ino = 0
    a.entry_timeout = ttl
    return a


async def _call(node, method, *args):
    """``method(*args)`` of ``node``: inline for nodes that answer from memory, else in a thread."""
    if node.inline:
        return method(*args)
    return await trio.to_thread.run_sync(method, *args)


class Operations(pyfuse3.Operations):
    supports_dot_lookup = False       # no NFS export: no ".." lookups to answer

    def __init__(self, ns, imports):
        super().__init__()
        self.ns = ns
        self.imports = imports
        self.handles = HandleTable()
        self.listings = Listings()
        self._logged = set()
        imports.on_finished = self._import_finished

    def start(self, nursery):
        """Serve with ``nursery`` holding the import and export workers."""
        self.ns.exports.nursery = nursery
        self.imports.nursery = nursery

    async def shutdown(self):
        """Abort imports still receiving and stop exports; committing imports finish."""
        self.ns.close()
        await self.imports.shutdown()

    async def _resolve(self, ino):
        """The node of ``ino``; a tree closed to bound memory is opened again in a worker thread."""
        try:
            return self.ns.resolve(ino)
        except TreeClosed as closed:
            await trio.to_thread.run_sync(self.ns.reopen, closed.idx)
            return self.ns.resolve(ino)

    def _log_once(self, message):
        if message not in self._logged:
            log.error("%s", message)
            if len(self._logged) < 10000:
                self._logged.add(message)

    # --- names and attributes ------------------------------------------------------------
    @_errors_to_errno
    async def lookup(self, parent_inode, name, ctx):
        parent = await self._resolve(parent_inode)
        if name in (b".", b".."):
            raise pyfuse3.FUSEError(errno.ENOENT)   # the kernel resolves these itself
        entry = await _call(parent, parent.lookup, self.ns, name)
        if entry is None:
            if not parent.negative_ttl:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return _negative(parent.negative_ttl)
        for directory, old_name in self.ns.note_lookup(parent_inode, name, entry.ino):
            pyfuse3.invalidate_entry_async(directory, old_name, ignore_enoent=True)
        return _attributes(entry)

    @_errors_to_errno
    async def getattr(self, inode, ctx):
        node = await self._resolve(inode)
        return _attributes(await _call(node, node.getattr, self.ns))

    @_errors_to_errno
    async def setattr(self, inode, attr, fields, fh, ctx):
        node = await self._resolve(inode)
        if not node.settable:
            raise ReadOnly("read-only")
        if fields.update_size:
            handle = self.handles.get(fh) if fh is not None else None
            if handle is None:
                raise pyfuse3.FUSEError(errno.EINVAL)
            await handle.truncate(attr.st_size)
        return _attributes(await _call(node, node.getattr, self.ns))

    @_errors_to_errno
    async def readlink(self, inode, ctx):
        node = await self._resolve(inode)
        return await _call(node, node.readlink, self.ns)

    async def forget(self, inode_list):
        # Inode numbers live as long as the mount, except export names with options (any name
        # makes one): those go when the kernel forgets them.
        for inode, nlookup in inode_list:
            self.ns.forget(inode, nlookup)

    # --- directories -------------------------------------------------------------------
    @_errors_to_errno
    async def opendir(self, inode, ctx):
        if NO_OPENDIR:
            raise pyfuse3.FUSEError(errno.ENOSYS)    # once: the kernel opens directories itself then
        await self._resolve(inode)
        return inode        # the handle is the directory's inode number: readdir lists that

    @_errors_to_errno
    async def readdir(self, fh, start_id, token):
        ino = token.inode if NO_OPENDIR else fh
        entries = self.listings.continued(ino) if start_id else None
        if entries is None:
            node = await self._resolve(ino)
            listing = await _call(node, node.listdir, self.ns)
            dots = _dot_attributes(ino)
            entries = [(b".", dots), (b"..", dots)] + [(name, _attributes(e)) for name, e in listing]
            self.listings.start(ino, entries)
        if start_id >= len(entries):
            self.listings.end(ino)       # the reading's last call: nothing left to list
            return
        reply = pyfuse3.readdir_reply
        for i in range(start_id, len(entries)):
            name, attrs = entries[i]
            if not reply(token, name, attrs, i + 1):
                break

    async def releasedir(self, fh):
        pass

    @_errors_to_errno
    async def mkdir(self, parent_inode, name, mode, ctx):
        parent = await self._resolve(parent_inode)
        entry = await _call(parent, lambda: self.ns.entry(parent.mkdir(self.ns, name), parent.names_ttl))
        return _attributes(entry)

    @_errors_to_errno
    async def rmdir(self, parent_inode, name, ctx):
        parent = await self._resolve(parent_inode)
        await _call(parent, parent.rmdir, self.ns, name)

    @_errors_to_errno
    async def unlink(self, parent_inode, name, ctx):
        parent = await self._resolve(parent_inode)
        await _call(parent, parent.unlink, self.ns, name)

    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        raise pyfuse3.FUSEError(errno.EROFS)

    async def symlink(self, parent_inode, name, target, ctx):
        raise pyfuse3.FUSEError(errno.EROFS)

    async def link(self, inode, new_parent_inode, new_name, ctx):
        raise pyfuse3.FUSEError(errno.EROFS)

    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        raise pyfuse3.FUSEError(errno.EROFS)

    # --- files ---------------------------------------------------------------------------
    @_errors_to_errno
    async def create(self, parent_inode, name, mode, flags, ctx):
        parent = await self._resolve(parent_inode)
        handle, entry = await _call(parent, parent.create, self.ns, name, flags)
        return self._file_info(handle), _attributes(entry)

    @_errors_to_errno
    async def open(self, inode, flags, ctx):
        node = await self._resolve(inode)
        return self._file_info(await _call(node, node.open, self.ns, flags, ctx.uid))

    def _file_info(self, handle):
        return pyfuse3.FileInfo(fh=self.handles.add(handle), direct_io=handle.direct_io,
                                keep_cache=handle.keep_cache)

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
        value = (await self._xattrs(inode, name)).get(name)
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value

    @_errors_to_errno
    async def listxattr(self, inode, ctx):
        names = list(await self._xattrs(inode))
        if ctx.uid == 0 or not names:
            return names
        node = await self._resolve(inode)
        st = (await _call(node, node.getattr, self.ns)).stat
        return visible_xattrs(names, ctx, st)      # the kernel checks getxattr, not listxattr

    async def _xattrs(self, inode, name=None):
        node = await self._resolve(inode)
        if name is not None and not node.inline and not name.startswith(XATTR_PREFIX):
            return {}       # synthetic nodes keep user.imagefs.* only: ls -l's ACL questions need no thread
        return await _call(node, node.xattrs, self.ns)

    @_errors_to_errno
    async def setxattr(self, inode, name, value, ctx):
        node = await self._resolve(inode)
        await _call(node, node.setxattr, self.ns, name, value)

    @_errors_to_errno
    async def removexattr(self, inode, name, ctx):
        node = await self._resolve(inode)
        await _call(node, node.removexattr, self.ns, name)

    # --- the filesystem ---------------------------------------------------------------------
    @_errors_to_errno
    async def statfs(self, ctx):
        total, free, avail = await trio.to_thread.run_sync(self.ns.store.ds.statfs)
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
        # their listings changed: the kernel asks getattr before it trusts them again
        _invalidate_attributes(import_dir)
        if ok:
            images = ns.ino_of(ns.node(ImagesDir, session.ref.store))
            pyfuse3.invalidate_entry_async(images, session.new_id.encode(), ignore_enoent=True)
            _invalidate_attributes(images)


def _invalidate_attributes(ino):
    """Make the kernel ask for ``ino``'s attributes again (with no writeback cache this never
    blocks: the loop may call it). Nothing to do if the kernel does not know the inode."""
    try:
        pyfuse3.invalidate_inode(ino, attr_only=True)
    except OSError as e:
        if e.errno != errno.ENOENT:
            log.debug("invalidate inode %d: %s", ino, e)
