"""The permission checks the kernel leaves to the filesystem.

With ``default_permissions`` the kernel checks modes before open, lookup, mkdir,
rmdir, create, unlink and getxattr (``user.*`` needs read permission, ``trusted.*``
needs CAP_SYS_ADMIN). listxattr it passes through unchecked, so the names it
returns are filtered here the same way: a caller sees the names of the attributes
it could read (``security.*`` and ``system.*`` always, as on ext4; ``user.*``
only on files it may read; ``trusted.*`` only as root).

Modes only, like the kernel's check (the mount does not enable FUSE's POSIX ACL
support, so ACLs inside images are shown but not enforced).
"""

_READ = 0o4


def caller_groups(pid):
    """Supplementary group IDs of process ``pid`` (empty if it cannot be read)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Groups:"):
                    return {int(g) for g in line.split()[1:]}
    except (OSError, ValueError):
        pass
    return set()


def may_read(ctx, st):
    """Would the kernel let the caller ``ctx`` read a file with Stat ``st``?"""
    if ctx.uid == 0:
        return True
    if ctx.uid == st.uid:
        return bool(st.mode >> 6 & _READ)
    if st.gid == ctx.gid or st.gid in caller_groups(ctx.pid):
        return bool(st.mode >> 3 & _READ)
    return bool(st.mode & _READ)


def visible_xattrs(names, ctx, st):
    """The attribute names of a file with Stat ``st`` that the caller could get one by one."""
    if ctx.uid == 0:
        return list(names)
    readable = None
    out = []
    for name in names:
        if name.startswith((b"security.", b"system.")):
            out.append(name)
        elif name.startswith(b"user."):
            if readable is None:
                readable = may_read(ctx, st)
            if readable:
                out.append(name)
    return out


