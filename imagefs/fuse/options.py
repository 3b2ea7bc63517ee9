"""Mount options: which go to the kernel (through libfuse) and which imagefs takes itself.

Safe by default: ``nosuid`` and ``nodev`` unless ``suid``/``dev`` are given, the
kernel checks permissions (``default_permissions``, always on), and only the
mounting user may enter the mount unless ``allow_other`` is given.
"""
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
            out.workdir = value
        elif eq and key == "writer":
            if value not in WRITERS:
                raise InvalidInput(f"writer={value}: use one of {', '.join(WRITERS)}")
            out.writer = value
        elif eq and key == "scratch_size":
            out.scratch_capacity = parse_size(value)
        else:
            raise InvalidInput(f"unknown mount option {item!r}")
    out.fuse |= {"fsname=imagefs", "subtype=imagefs", "default_permissions"}
    # libfuse mounts nosuid,nodev unless told "suid"/"dev" outright
    out.fuse |= {flag if on else flag[2:] for flag, on in safety.items()}
    if out.debug:
        out.fuse.add("debug")
    return out
