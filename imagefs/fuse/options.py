"""Mount options: which go to the kernel (through libfuse) and which imagefs takes itself.

Safe by default: ``nosuid`` and ``nodev`` unless ``suid``/``dev`` are given, the
kernel checks permissions (``default_permissions``, always on), only the mounting
user may enter the mount unless ``allow_other`` is given, and even then only the
mount's owner (and the ``admin_group``, when given) may change anything or read
what bypasses an image's modes (exports, metadata, reports).

Paths in options are made absolute here, before a background daemon changes its
directory to ``/``.
"""
import grp
import os
from dataclasses import dataclass, field

from ..errors import InvalidInput
from ..scratch import DEFAULT_CAPACITY, parse_size

# Passed to libfuse/the kernel as they are (the ones libfuse 3 accepts).
_KERNEL_FLAGS = {"ro", "rw", "exec", "noexec", "atime", "noatime", "sync", "async", "dirsync",
                 "allow_other", "allow_root", "auto_unmount", "default_permissions"}
# Opposite pairs imagefs decides (the later one on the command line wins).
_SAFETY = {"suid": ("nosuid", False), "nosuid": ("nosuid", True), "dev": ("nodev", False), "nodev": ("nodev", True)}
# Meaningful to mount(8) and fstab only.
_IGNORED = {"defaults", "auto", "noauto", "user", "users", "nouser", "owner", "group", "_netdev", "nofail"}
_IGNORED_PREFIXES = ("x-", "comment=")
# Settings of a vsphere:// datastore (docs/vsphere.md); a password is never an option.
_DATASTORE_KEYS = {"password_file", "ca_file", "cache_size", "cache_dir"}

DEFAULT_MAX_EXPORTS = 32
DEFAULT_MAX_EXPORTS_PER_USER = 8


WRITERS = ("kernel", "fuse2fs")


def _writable_log(path):
    """Checked up front, so a bad log= is one line at mount time, not a failing daemon."""
    try:
        with open(path, "a"):
            pass
    except OSError as e:
        raise InvalidInput(f"log={path}: {e.strerror}") from None
    return os.path.abspath(path)


@dataclass
class MountOptions:
    fuse: set = field(default_factory=set)   # for pyfuse3.init
    debug: bool = False                      # libfuse request trace, debug log; implies foreground
    log_file: str | None = None              # where a background daemon logs (else syslog)
    workdir: str | None = None               # layer writer's work files (never inside the mount)
    writer: str | None = None                # layer writer method: kernel or fuse2fs
    scratch_capacity: int = DEFAULT_CAPACITY  # size of scratch for stores made with mkdir
    admin_gid: int | None = None             # this group may change the mount and read exports
    max_exports: int = DEFAULT_MAX_EXPORTS   # open exports in the whole mount
    max_exports_per_user: int = DEFAULT_MAX_EXPORTS_PER_USER
    warnings: list = field(default_factory=list)
    datastore: dict = field(default_factory=dict)  # remote backend settings (password_file, ca_file, ...)

    @property
    def read_only(self):
        return "ro" in self.fuse


def parse_options(options):
    """MountOptions from ``["allow_other", "ro", "log=/x", ...]`` (comma lists allowed)."""
    out = MountOptions()
    safety = {"nosuid": True, "nodev": True}
    for item in (o.strip() for opt in options or () for o in opt.split(",")):
        key, eq, value = item.partition("=")
        if not item or item in _IGNORED or item.startswith(_IGNORED_PREFIXES):
            continue
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in item):
            raise InvalidInput(f"mount option {item!r} holds a control character")
        if item in _SAFETY:
            flag, on = _SAFETY[item]
            safety[flag] = on
        elif item in _KERNEL_FLAGS:
            out.fuse.discard({"ro": "rw", "rw": "ro"}.get(item))
            out.fuse.add(item)
        elif item == "debug":
            out.debug = True
        elif eq and key == "log":
            out.log_file = _writable_log(value)
        elif eq and key == "workdir":
            if not os.path.isdir(value):
                raise InvalidInput(f"workdir={value}: no such directory")
            out.workdir = _absolute(key, value)
        elif eq and key == "writer":
            if value not in WRITERS:
                raise InvalidInput(f"writer={value}: use one of {', '.join(WRITERS)}")
            out.writer = value
        elif eq and key == "scratch_size":
            out.scratch_capacity = parse_size(value)
        elif eq and key == "admin_group":
            out.admin_gid = _group_id(value)
        elif eq and key in ("max_exports", "max_exports_per_user"):
            setattr(out, key, _count(key, value))
        elif eq and key in _DATASTORE_KEYS:
            out.datastore[key] = parse_size(value) if key == "cache_size" else value
        elif item == "insecure":
            out.datastore["insecure"] = True
        else:
            raise InvalidInput(f"unknown mount option {item!r}")
    out.fuse |= {"fsname=imagefs", "subtype=imagefs", "default_permissions"}
    # libfuse mounts nosuid,nodev unless told "suid"/"dev" outright
    out.fuse |= {flag if on else flag[2:] for flag, on in safety.items()}
    if out.debug:
        out.fuse.add("debug")
    if "allow_other" in out.fuse:
        for flag, what in (("suid", "setuid and setgid programs in images run with their owners' rights "
                                    "for every user"),
                           ("dev", "device nodes in images open the host's devices for every user "
                                   "their modes admit")):
            if flag in out.fuse:
                out.warnings.append(f"{flag} with allow_other: {what}")
    return out


def _absolute(key, value):
    if not value:
        raise InvalidInput(f"{key}= needs a path")
    return os.path.abspath(value)


def _group_id(value):
    """A group name or number."""
    if value.isdigit():
        return int(value)
    try:
        return grp.getgrnam(value).gr_gid
    except KeyError:
        raise InvalidInput(f"admin_group={value}: no such group") from None


def _count(key, value):
    try:
        n = int(value)
    except ValueError:
        n = 0
    if not 1 <= n <= 100000:
        raise InvalidInput(f"{key}={value}: use a whole number from 1 to 100000")
    return n
