"""A folder of a vSphere datastore as an imagefs datastore.

Directories go through FileManager (MakeDirectory, DeleteDatastoreFile_Task, ...),
listings and sizes through the datastore's HostDatastoreBrowser (one
SearchDatastoreSubFolders_Task lists a whole subtree), and bytes through the datastore
HTTP endpoint (transfer.py) behind a local block cache of sealed files (cache.py).
"""
import logging
import os
import posixpath
import secrets
import shutil
from contextlib import contextmanager

from pyVmomi import vim

from ...errors import ImageFSError, NotFound
from ..base import Datastore, FileInfo, ReadHandle
from .cache import BlockCache
from .lock import LockSpace
from .transfer import Transfer

log = logging.getLogger("imagefs.vsphere")

_BROWSER = vim.host.DatastoreBrowser


class CachedReadHandle(ReadHandle):
    def __init__(self, cache, entry):
        self._cache, self._entry = cache, entry

    def pread(self, offset, length):
        return self._cache.pread(self._entry, offset, length)

    def close(self):
        pass            # the cache owns the host file


class VSphereDatastore(Datastore):
    # Layers ESXi can use in a VM's disk chain: SEsparse deltas (VMFS-6 has no other
    # delta format; VMFS-5 and NFS read it too). Read by the image store once it can
    # write that format (the VMDK formats work); until then layers are monolithicSparse.
    default_disk_format = "seSparse"

    def __init__(self, session, location, cache_dir, cache_size, create=True):
        self.session = session
        self.location = location
        self.url = location.url
        content = session.content
        dc = session.call(lambda c: c.searchIndex.FindByInventoryPath(location.datacenter),
                          f"datacenter {location.datacenter}")
        if not isinstance(dc, vim.Datacenter):
            raise NotFound(f"{location.url}: no datacenter {location.datacenter}")
        self.dc = dc
        ds = next((d for d in session.call(lambda c: dc.datastore, "datastores")
                   if d.name == location.datastore), None)
        if ds is None:
            raise NotFound(f"{location.url}: no datastore {location.datastore} in {location.datacenter}")
        self.mo = ds
        self.name = ds.name
        self.aliases = _aliases(ds)
        self._prefix = location.path
        self._fm = content.fileManager
        self.browser = ds.browser
        self.transfer = Transfer(session, location.datacenter, self.name)
        self.cache = BlockCache(cache_dir, cache_size, self.transfer.read_range)
        self._locks = LockSpace(self)
        from .inventory import Inventory
        self.vms = Inventory(self)
        if self._prefix and not self.is_dir(""):
            if not create:
                raise NotFound(f"datastore {self.url} does not exist (imagefs store create makes it)")
            self.mkdir("", parents=True)

    # --- names --------------------------------------------------------------------------------
    def _rel(self, path):
        """The path inside the datastore (the URL's folder prefixed)."""
        path = path.strip("/")
        if self._prefix:
            return f"{self._prefix}/{path}" if path else self._prefix
        return path

    def _ds(self, path):
        rel = self._rel(path)
        return f"[{self.name}] {rel}" if rel else f"[{self.name}]"

    def datastore_path(self, path):
        return self._ds(path)

    # --- API helpers ----------------------------------------------------------------------------
    def _task(self, start, what, safe=True):
        return self.session.run_task(start, what, safe=safe)

    def server_time(self):
        return self.session.call(lambda c: self.session.si.CurrentTime(), "server time").timestamp()

    def _search(self, path, pattern, recursive):
        spec = _BROWSER.SearchSpec(matchPattern=[pattern], searchCaseInsensitive=False,
                                   details=_BROWSER.FileInfo.Details(fileSize=True, modification=True,
                                                                     fileType=True))
        if recursive:
            return self._task(lambda c: self.browser.SearchDatastoreSubFolders_Task(self._ds(path), spec), path)
        return [self._task(lambda c: self.browser.SearchDatastore_Task(self._ds(path), spec), path)]

    def _folder_rel(self, folder_path):
        """A result's folderPath ("[ds] a/b", or "[ds]/a" for first-level folders in vcsim)
        as a path inside the datastore."""
        rest = folder_path.split("]", 1)[1] if "]" in folder_path else folder_path
        return rest.strip().strip("/")

    # --- directories and files --------------------------------------------------------------------
    def mkdir(self, path, parents=False):
        self.session.call(lambda c: self._fm.MakeDirectory(self._ds(path), self.dc, parents), path,
                          safe=parents)
        # MakeDirectory without parents is not safe to repeat blindly: a retry after a lost
        # answer would report Exists for our own directory. It is the lock, so it fails instead.

    def walk(self, path, pattern="*"):
        base = self._rel(path)
        out = {}
        for result in self._search(path, pattern, recursive=True):
            folder = self._folder_rel(result.folderPath)
            if base and folder != base and not folder.startswith(base + "/"):
                continue
            sub = folder[len(base):].strip("/") if base else folder
            for f in result.file or ():
                key = f"{sub}/{f.path}" if sub else f.path
                out[key] = _entry(f)
        return out

    def listdir(self, path):
        out = []
        for result in self._search(path, "*", recursive=False):
            out.extend(f.path for f in result.file or ())
        return sorted(out)

    def stat(self, path):
        parent, name = posixpath.split(path.strip("/"))
        if not name:
            if self._prefix:
                self._search("", "*", recursive=False)      # NotFound if the URL's folder is missing
            return FileInfo(0, None, True)
        for result in self._search(parent, name, recursive=False):
            for f in result.file or ():
                if f.path == name:
                    return _entry(f)
        raise NotFound(f"{path}: no such file or directory")

    def is_dir(self, path):
        try:
            return self.stat(path).is_dir
        except NotFound:
            return False

    def exists(self, path):
        try:
            self.stat(path)
            return True
        except NotFound:
            return False

    def size(self, path):
        return self.stat(path).size

    def read_file(self, path):
        return self.transfer.read_all(self._rel(path))

    def write_file(self, path, data):
        """PUT to a temporary name, then move over the target: readers never see half."""
        if not data:
            self.transfer.put_bytes(self._rel(path), b"")     # nothing to see half of
            return
        tmp = f"{path}.tmp-{secrets.token_hex(4)}"
        self.transfer.put_bytes(self._rel(tmp), bytes(data))
        try:
            self._task(lambda c: self._fm.MoveDatastoreFile_Task(self._ds(tmp), self.dc, self._ds(path),
                                                                 self.dc, True), path, safe=False)
        except BaseException:
            self.remove(tmp)
            raise

    def remove(self, path, missing_ok=True):
        self.cache.forget(self._rel(path))
        try:
            self._task(lambda c: self._fm.DeleteDatastoreFile_Task(self._ds(path), self.dc), path)
        except NotFound:
            if not missing_ok:
                raise

    def rmtree(self, path, missing_ok=True):
        self.cache.forget_tree(self._rel(path))
        self.remove(path, missing_ok=missing_ok)        # DeleteDatastoreFile removes a folder whole

    def copy_file(self, src, dst):
        self.cache.forget(self._rel(dst))
        self._task(lambda c: self._fm.CopyDatastoreFile_Task(self._ds(src), self.dc, self._ds(dst),
                                                             self.dc, True), dst)

    def replace(self, src, dst):
        self.cache.forget(self._rel(src))
        self.cache.forget(self._rel(dst))
        self._task(lambda c: self._fm.MoveDatastoreFile_Task(self._ds(src), self.dc, self._ds(dst),
                                                             self.dc, True), dst, safe=False)

    def _entry(self, path, known=None):
        st = known or self.stat(path)
        if st.is_dir:
            raise ImageFSError(f"{path}: is a directory")
        return self.cache.entry(self._rel(path), st.size, _stamp(st))

    def open_read(self, path, known=None):
        return CachedReadHandle(self.cache, self._entry(path, known))

    def statfs(self):
        summary = self.session.call(lambda c: self.mo.summary, "datastore summary")
        return summary.capacity, summary.freeSpace, summary.freeSpace

    # --- host files ----------------------------------------------------------------------------------
    @contextmanager
    def host_files(self, paths):
        entries = [self._entry(p) for p in paths]
        for e in entries:
            self.cache.pin(e)
        try:
            yield [self.cache.materialize(e) for e in entries]
        finally:
            for e in entries:
                self.cache.unpin(e)

    @contextmanager
    def new_host_dir(self, path):
        rel = self._rel(path)
        self.cache.forget_tree(rel)
        host = self.cache.host_path(rel)
        os.makedirs(host, exist_ok=True)
        try:
            yield host
            names = sorted(n for n in os.listdir(host) if os.path.isfile(os.path.join(host, n)))
            for name in names:
                self.transfer.upload(os.path.join(host, name), f"{rel}/{name}")
        except BaseException:
            shutil.rmtree(host, ignore_errors=True)
            raise
        self._adopt(path, names)

    @contextmanager
    def edit_host_file(self, path):
        rel = self._rel(path)
        entry = self._entry(path)
        self.cache.pin(entry)
        try:
            host = self.cache.materialize(entry)
            try:
                yield host
            except BaseException:
                self.cache.forget(rel)          # the host copy may be half changed
                raise
            self.transfer.upload(host, rel)
        finally:
            self.cache.unpin(entry)
        directory, name = posixpath.split(path)
        self._adopt(directory, [name])

    def _adopt(self, directory, names):
        """Files just uploaded from the cache's host copies: cached whole, keyed by what
        the datastore now says of them."""
        found = {n: e for n, e in self.walk(directory).items() if "/" not in n} if names else {}
        for name in names:
            if name in found:
                self.cache.adopt(self._rel(f"{directory}/{name}"), _stamp(found[name]))

    # --- locking ---------------------------------------------------------------------------------------
    def lock(self, path, exclusive=True, blocking=True):
        return self._locks.lock(path, exclusive=exclusive, blocking=blocking)

    def close(self):
        self.cache.close()
        self.transfer.close()
        self.session.close()


def _entry(info):
    is_dir = isinstance(info, _BROWSER.FolderInfo)
    mtime = info.modification
    mtime_ns = None if mtime is None else int(mtime.timestamp()) * 10**9 + mtime.microsecond * 1000
    return FileInfo(0 if is_dir else (info.fileSize or 0), mtime_ns, is_dir)


def _stamp(entry):
    return f"{entry.size} {entry.mtime_ns}"


def _aliases(ds):
    """Other names of the datastore: a VMFS volume's uuid (/vmfs/volumes/<uuid>/)."""
    info = ds.info
    out = []
    vmfs = getattr(info, "vmfs", None)
    if vmfs is not None and getattr(vmfs, "uuid", None):
        out.append(vmfs.uuid)
    url = getattr(info, "url", "") or ""
    if "/vmfs/volumes/" in url:
        tail = url.rstrip("/").rsplit("/", 1)[-1]
        if tail and tail not in out and tail != ds.name:
            out.append(tail)
    return tuple(out)
