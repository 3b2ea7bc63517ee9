"""mount(8), umount(8) and fstab with imagefs's helpers, as root would use them.

Each test runs in the sandbox of tests/doc_sandbox.py, so /sbin and /etc/fstab are the
test's own (writes land in an overlay) and no other test run sees its mounts.
"""
import os
import re
import sys

from doc_sandbox import run_sandboxed

VENV_BIN = os.path.dirname(sys.executable)
PRELUDE = r"""
set -e
export PATH="$VENV_BIN:$PATH"
mkdir -p /var/lib/imagefs /mnt/t rootdir/etc && echo hi > rootdir/etc/motd && tar -cf l.tar -C rootdir .
imagefs --datastore /var/lib/imagefs store create s --capacity 256MiB
ready() { n=0; until [ -d /mnt/t/s ]; do n=$((n + 1)); [ $n -lt 300 ]; sleep 0.1; done; }
images() { echo "$1: $(ls /var/lib/imagefs/VIC/s/images | tr '\n' ' ')"; }
"""


def sandboxed(script, workdir="/tmp"):
    proc = run_sandboxed(PRELUDE + script, "sh", workdir=workdir, env=dict(os.environ, VENV_BIN=VENV_BIN),
                         timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_umount_8_ends_the_daemon_cleanly():
    """umount(8) unmounts itself (no imagefs helper); the daemon sees it and finishes: a
    pending import is dropped, a busy mount is refused, umount -l lets an import being
    written commit, and a background daemon exits."""
    out = sandboxed(r"""
imagefs mount -f /var/lib/imagefs /mnt/t 2> /tmp/fg.log & daemon=$!
ready
touch /mnt/t/s/images/scratch/import/pending
setfattr -n user.imagefs.meta.key -v value /mnt/t/s/images/scratch/import/pending
umount /mnt/t
wait $daemon && echo "daemon 1: exit 0"
images "after umount"

imagefs mount -f /var/lib/imagefs /mnt/t 2>> /tmp/fg.log & daemon=$!
ready
mkdir -p middir && head -c 20000 /dev/zero > middir/blob && tar -cf mid.tar -C middir .   # 5120 B: mid-member
python3 -c '
import os, sys, time
data = open("mid.tar", "rb").read()
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)   # one descriptor, no shell copies
os.write(fd, data[:5120])
while not os.path.exists("/tmp/go"):
    time.sleep(0.1)
os.write(fd, data[5120:])
os.close(fd)
' /mnt/t/s/images/scratch/import/mid & writer=$!
n=0; until [ "$(stat -c %s /mnt/t/s/images/scratch/import/mid 2>/dev/null)" = 5120 ]; do
    n=$((n + 1)); [ $n -lt 600 ] || { ls -la /mnt/t/s/images/scratch/import/ >&2; cat /tmp/fg.log >&2; exit 1; }; sleep 0.1
done
umount /mnt/t 2> /tmp/busy || echo "busy: $(cat /tmp/busy)"
umount -l /mnt/t
touch /tmp/go
wait $writer && echo "writer: exit 0"
wait $daemon && echo "daemon 2: exit 0"
images "after umount -l"

imagefs mount -o log=/tmp/bg.log /var/lib/imagefs /mnt/t
pid=$(getfattr --only-values -n user.imagefs.pid /mnt/t)
umount /mnt/t
n=0; while kill -0 $pid 2>/dev/null; do n=$((n + 1)); [ $n -lt 300 ]; sleep 0.1; done
echo "background daemon: gone"
grep -c "unmounted /mnt/t" /tmp/bg.log /tmp/fg.log
""")
    assert "daemon 1: exit 0\nafter umount: scratch \n" in out
    assert re.search(r"busy: umount: /mnt/t: target is busy", out)
    assert "writer: exit 0\ndaemon 2: exit 0\nafter umount -l: mid scratch \n" in out
    assert "background daemon: gone\n/tmp/bg.log:1\n/tmp/fg.log:2\n" in out


def test_umount_8_runs_umount_fuse_imagefs_only_when_lazy():
    """What util-linux's libmount does (context_umount.c): for root it takes the type from
    statfs ("fuse") unless -l/-f make it read mountinfo ("fuse.imagefs"). Helpers that log
    their calls show it; imagefs therefore installs no umount helper."""
    out = sandboxed(r"""
for helper in umount.fuse.imagefs umount.fuse; do
    printf '#!/bin/sh\necho "%s $*" >> /tmp/calls\nexec umount -i "$@"\n' $helper > /sbin/$helper
    chmod 755 /sbin/$helper
done
imagefs mount /var/lib/imagefs /mnt/t && umount /mnt/t
imagefs mount /var/lib/imagefs /mnt/t && umount -l /mnt/t
cat /tmp/calls
""")
    assert out.splitlines()[-2:] == ["umount.fuse /mnt/t -n", "umount.fuse.imagefs /mnt/t -l"]


def test_mount_8_and_fstab_with_the_installed_helpers():
    out = sandboxed(r"""
imagefs install-helpers
ls /sbin/mount.fuse.imagefs /sbin/mount.imagefs
env -i /usr/bin/mount -t fuse.imagefs /var/lib/imagefs /mnt/t -o ro,allow_other   # no PATH, no venv
ls /mnt/t; umount /mnt/t
mount -t imagefs /var/lib/imagefs /mnt/t && ls /mnt/t/s/images && umount /mnt/t
echo "/var/lib/imagefs /mnt/t fuse.imagefs noauto,allow_other,x-systemd.automount 0 0" > /etc/fstab
mount /mnt/t && ls /mnt/t && umount /mnt/t
echo "/var/lib/imagefs /mnt/t fuse.imagefs allow_other,nofail 0 0" > /etc/fstab
mount -a && mount -a
echo "mounts: $(awk '$5 == "/mnt/t"' /proc/self/mountinfo | wc -l)"
findmnt -n -o SOURCE,FSTYPE /mnt/t
""")
    assert "/sbin/mount.fuse.imagefs\n/sbin/mount.imagefs\ns\nscratch\ns\n" in out
    assert "mounts: 1\n/var/lib/imagefs fuse.imagefs\n" in out
