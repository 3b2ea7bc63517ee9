"""Operations an unprivileged fuse2fs mount cannot do, applied later with ``debugfs -w``.

Without CAP_MKNOD, CAP_SYS_ADMIN and CAP_FOWNER the kernel refuses device nodes,
``trusted.*``/``security.*`` xattrs and hardlinks to setuid files (fs.protected_hardlinks)
before fuse2fs is even asked. The extractor records them here instead; once fuse2fs has
exited (and before qsd stops) ``apply()`` runs them as a debugfs script on the raw disk.

debugfs 1.47 pitfalls handled (toolchain-probe §B2):
- ``mknod`` takes a bare name in the cwd (a ``/`` path becomes a literal name), so we ``cd``;
  it also refuses numbers above 65535, so the device number is written with ``sif block[]``;
- ``ln`` leaves ``links_count`` alone: it is set explicitly, counted while still mounted;
- xattr values go through ``ea_set -f <file>`` so binary values survive;
- errors only show on stderr; the exit code is always 0;
- a script line is cut at its first CR, so a request naming a path with a CR runs alone
  with ``-R`` (which takes it whole), and a device node whose path holds one is made under
  a CR-free temporary name in the root, then linked to its name and the temporary unlinked.

Paths are bytes relative to the filesystem root, symlinks already resolved.
"""
import os
import stat
from dataclasses import dataclass

from ..errors import InvalidInput, ToolFailed
from ..ext4 import encode_rdev, time_extra
from .tarread import show_name as _show
from .tools import run

PRIVILEGED_XATTR_PREFIXES = ("trusted.", "security.")


@dataclass
class NodeMeta:
    perm: int
    uid: int
    gid: int
    atime_ns: int
    mtime_ns: int


@dataclass
class _Node:
    kind: int          # stat.S_IFCHR or stat.S_IFBLK
    major: int
    minor: int
    meta: NodeMeta


@dataclass
class _Link:
    target: bytes      # never itself a deferred link (chains are collapsed)


def needs_privilege(xattr_name: str) -> bool:
    return xattr_name.startswith(PRIVILEGED_XATTR_PREFIXES)


def is_protected_link_source(st: os.stat_result) -> bool:
    """Would fs.protected_hardlinks refuse a non-owner's link to this (setuid, setgid-exec)?"""
    mode = st.st_mode
    return stat.S_ISREG(mode) and bool(mode & stat.S_ISUID or
                                       (mode & stat.S_ISGID and mode & stat.S_IXGRP))


class DeferredOps:
    """Device nodes, privileged xattrs and hardlinks waiting for the debugfs pass."""

    def __init__(self, stage_dir: str):
        self._stage = stage_dir
        self._ops: dict[bytes, _Node | _Link] = {}
        self._xattrs: dict[bytes, list[tuple[str, bytes]]] = {}
        self._targets: dict[bytes, int] = {}      # link target -> pending links to it
        self._nlinks: dict[bytes, int] = {}

    def is_empty(self) -> bool:
        return not (self._ops or self._xattrs)

    # --- recording (while the filesystem is mounted) ---

    def node(self, path: bytes, kind: int, major: int, minor: int, meta: NodeMeta) -> None:
        self._ops[path] = _Node(kind, major, minor, meta)

    def link(self, target: bytes, path: bytes) -> None:
        op = self._ops.get(target)
        target = op.target if isinstance(op, _Link) else target
        self._ops[path] = _Link(target)
        self._targets[target] = self._targets.get(target, 0) + 1

    def xattr(self, path: bytes, name: str, value: bytes) -> None:
        self._xattrs.setdefault(path, []).append((name, value))

    def kind(self, path: bytes) -> int:
        """The file type of a pending path: its device node's, or (a deferred link to a
        setuid file) a regular file."""
        op = self._ops[path]
        if isinstance(op, _Link):
            op = self._ops.get(op.target)
        return op.kind if isinstance(op, _Node) else stat.S_IFREG

    def pending(self, path: bytes) -> bool:
        """True if ``path`` exists only as a deferred node or link."""
        return path in self._ops

    def forget(self, path: bytes, subtree: bool = False) -> None:
        """``path`` (with ``subtree``, anything below it too) is replaced or removed on the mount."""
        if subtree:
            below = path + b"/"
            doomed = [p for p in {*self._ops, *self._xattrs} if p == path or p.startswith(below)]
            targets = [t for t in self._targets if t == path or t.startswith(below)]
        else:
            doomed, targets = [path], [path] if path in self._targets else []
        if targets:
            raise InvalidInput(f"cannot defer the hardlinks to {_show(targets[0])}: "
                               "it is replaced later in the same layer")
        for p in doomed:
            self._xattrs.pop(p, None)
            op = self._ops.pop(p, None)
            if isinstance(op, _Link):
                self._targets[op.target] -= 1
                if not self._targets[op.target]:
                    del self._targets[op.target]

    def count_links(self, root: str) -> None:
        """Work out each link target's final links_count; needs the filesystem still mounted."""
        self._nlinks = {t: n + (1 if t in self._ops else os.lstat(os.path.join(root, os.fsdecode(t))).st_nlink)
                        for t, n in self._targets.items()}

    # --- applying (filesystem unmounted, raw disk still exported) ---

    def apply(self, raw: str) -> None:
        for n, lines in enumerate(_batches(self._script())):
            if b"\r" in lines[0]:
                argv = [b"debugfs", b"-w", b"-R", lines[0], os.fsencode(raw)]
            else:
                script = os.path.join(self._stage, f"deferred-{n}.debugfs")
                with open(script, "wb") as f:
                    f.write(b"\n".join(lines) + b"\n")
                argv = ["debugfs", "-w", "-f", script, raw]
            proc = run(argv, "debugfs")
            errors = [line for line in proc.stderr.splitlines()
                      if line.strip() and not line.startswith("debugfs ")]
            if errors:
                raise ToolFailed(f"debugfs could not apply deferred operations: {errors[0].strip()}")

    def _script(self):
        for n, (path, op) in enumerate(self._ops.items()):
            if isinstance(op, _Node) and b"\r" in path:
                temp = b".imagefs-node-%d" % n
                yield from self._node_cmds(temp, op)
                yield b"ln " + _q(b"/" + temp) + b" " + _q(b"/" + path)
                yield b"unlink " + _q(b"/" + temp)
            elif isinstance(op, _Node):
                yield from self._node_cmds(path, op)
            else:
                yield b"ln " + _q(b"/" + op.target) + b" " + _q(b"/" + path)
        for target, count in self._nlinks.items():
            yield b"sif " + _q(b"/" + target) + b" links_count %d" % count
        for n, (path, attrs) in enumerate(self._xattrs.items()):
            for m, (name, value) in enumerate(attrs):
                valfile = os.path.join(self._stage, f"xattr-{n}-{m}")
                with open(valfile, "wb") as f:
                    f.write(value)
                yield b"ea_set -f " + _q(os.fsencode(valfile)) + b" " + _q(b"/" + path) + b" " + _q(os.fsencode(name))

    @staticmethod
    def _node_cmds(path: bytes, op: _Node):
        parent, _, base = path.rpartition(b"/")
        kind = b"c" if op.kind == stat.S_IFCHR else b"b"
        block0, block1 = encode_rdev(op.major, op.minor)
        q, m = _q(b"/" + path), op.meta
        yield b"cd " + _q(b"/" + parent)
        yield b"mknod " + _q(base) + b" " + kind + b" 0 0"
        yield b"cd /"
        yield b"sif %s block[0] %d" % (q, block0)
        yield b"sif %s block[1] %d" % (q, block1)
        yield b"sif %s mode 0%o" % (q, op.kind | m.perm)
        yield b"sif %s uid %d" % (q, m.uid)
        yield b"sif %s gid %d" % (q, m.gid)
        for field, ns in ((b"atime", m.atime_ns), (b"mtime", m.mtime_ns)):
            sec, nsec = divmod(ns, 1_000_000_000)
            yield b"sif %s %s @%d" % (q, field, sec)
            yield b"sif %s %s_extra %d" % (q, field, time_extra(sec, nsec))


def _batches(lines):
    """Runs of CR-free requests (one script each), and each request holding a CR alone."""
    batch = []
    for line in lines:
        if b"\r" in line:
            if batch:
                yield batch
                batch = []
            yield [line]
        else:
            batch.append(line)
    if batch:
        yield batch


def _q(s: bytes) -> bytes:
    """A debugfs (libss) argument: double-quoted, inner quotes doubled."""
    if b"\n" in s:
        raise InvalidInput(f"cannot defer an operation on {_show(s)}: newline in name")
    return b'"' + s.replace(b'"', b'""') + b'"'

