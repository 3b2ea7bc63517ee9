"""Resolving parent hints and extent file names inside the datastore that holds a disk.

ESXi writes a child's ``parentFileNameHint`` in three forms: a name relative to the
child's directory (``../base/base.vmdk``), an absolute ``/vmfs/volumes/<datastore
name or uuid>/<path>``, and a datastore path ``[<datastore>] <path>``. All three
resolve here to a datastore-relative path, so a store copied off a VMFS datastore
reads unchanged. A hint that leaves the datastore (``..`` past its root, another
datastore, any other absolute path) is refused: a disk must never make imagefs read
files it was not given.

``names`` are the names a hint may use for this datastore (its name and uuid); None
accepts any single name, which suits a local directory holding a copy of a datastore
whose name is not known here.
"""
import posixpath
import re

from ..errors import CorruptDisk

_VMFS_PREFIX = "/vmfs/volumes/"
_DSPATH_RE = re.compile(r"\[([^\]]*)\]\s*(.*)\Z", re.S)


def resolve_hint(child_path, hint, names=None, what="parent hint"):
    """The datastore-relative path that ``hint`` (written in ``child_path``) names."""
    def refuse(why):
        return CorruptDisk(f"{child_path}: {what} {hint!r} {why}; refused")

    if not hint or "\0" in hint:
        raise refuse("is empty or invalid")
    if "\\" in hint or re.match(r"[A-Za-z]:", hint):
        raise refuse("is a Windows path")
    m = _DSPATH_RE.match(hint)
    if m:
        _check_name(m.group(1).strip(), names, refuse)
        rel = m.group(2)
        if rel.startswith("/"):
            raise refuse("is an absolute path inside a datastore path")
        return _inside(rel, refuse)
    if hint.startswith("/"):
        if not hint.startswith(_VMFS_PREFIX):
            raise refuse("is an absolute path outside /vmfs/volumes")
        name, _, rel = hint[len(_VMFS_PREFIX):].partition("/")
        _check_name(name, names, refuse)
        return _inside(rel, refuse)
    return _inside(posixpath.join(posixpath.dirname(child_path), hint), refuse)


def _check_name(name, names, refuse):
    if not name or name in (".", "..") or "/" in name:
        raise refuse("names no datastore")
    if names is not None and name not in names:
        raise refuse(f"points to datastore {name!r}, not to this one ({', '.join(sorted(names))})")


def _inside(rel, refuse):
    path = posixpath.normpath(rel.lstrip("/")) if rel else ""
    if not path or path == "." or path == ".." or path.startswith("../"):
        raise refuse("points outside the datastore")
    return path


def relative_hint(child_path, parent_path):
    """The hint a child at ``child_path`` writes for ``parent_path`` (both datastore-relative)."""
    return posixpath.relpath(parent_path, posixpath.dirname(child_path) or ".")
