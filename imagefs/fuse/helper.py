"""The mount(8) helper (``mount_helpers/mount.imagefs`` runs it).

mount(8) runs ``mount.fuse.imagefs DATASTORE MOUNTPOINT [-sfnv] [-N ns] [-o OPTS] [-t TYPE]``
for ``mount -t fuse.imagefs`` and fstab lines. There is no umount helper: as root,
umount(8) unmounts by itself (it looks for ``umount.fuse.imagefs`` only with ``-l`` or
``-f``; tests/test_mount_helpers.py shows it), and the daemon finishes on its own.
"""
import getopt
import os
import shlex
import sys

from .mount import mount


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        flags, positional = getopt.gnu_getopt(argv, "sfnvo:t:N:")
    except getopt.GetoptError as e:
        return _usage(e, "mount.imagefs DATASTORE MOUNTPOINT [-o OPTIONS]")
    if len(positional) != 2:
        return _usage("need DATASTORE and MOUNTPOINT", "mount.imagefs DATASTORE MOUNTPOINT [-o OPTIONS]")
    if ("-f", "") in flags:
        return 0                     # mount -f: pretend
    return mount(positional[0], positional[1], options=[v for f, v in flags if f == "-o"])


HELPER_NAMES = ("mount.fuse.imagefs", "mount.imagefs")


def install_helpers(directory="/sbin"):
    """Write the mount(8) helpers into ``directory`` with this Python's path written in:
    mount(8) runs helpers with an empty environment (no PATH, no venv), so the helper
    must name the interpreter that has imagefs. Returns the paths written."""
    script = ("#!/bin/sh\n"
              "# mount(8) helper for imagefs, written by `imagefs install-helpers`\n"
              f"exec {shlex.quote(sys.executable)} -m imagefs.fuse.helper \"$@\"\n")
    first = os.path.join(directory, HELPER_NAMES[0])
    tmp = f"{first}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(script)
    os.chmod(tmp, 0o755)
    os.replace(tmp, first)
    written = [first]
    for name in HELPER_NAMES[1:]:
        link = os.path.join(directory, name)
        if os.path.lexists(link):
            os.unlink(link)
        os.symlink(HELPER_NAMES[0], link)
        written.append(link)
    return written


def _usage(error, usage):
    print(f"imagefs: {error}\nusage: {usage}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
