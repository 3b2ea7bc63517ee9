"""A sandbox in which documented commands run as written, absolute paths and all.

``run_sandboxed(script, shell)`` runs a shell script in new mount and PID namespaces
(``unshare``). There /etc, /opt, /usr/sbin (so /sbin), /var/lib, /var/tmp and the
checkout are overlays whose writes land in a tmpfs of the sandbox's own, so a doc can write
/etc/fstab, install /sbin/mount.fuse.imagefs, keep a datastore in /var/lib/imagefs or
run scripts/quickstart.sh without touching the machine (layer writers work in a
directory of the sandbox's own, ``$IMAGEFS_WORKDIR``); /tmp and /mnt are empty
tmpfs, as after a boot (so sandboxes running at the same time never share a
mountpoint), HOME an empty directory in /tmp, and /opt/imagefs the checkout (as the
systemd unit example names it). Mounts made inside are seen by nobody else. At the
end every imagefs mount made inside is unmounted lazily and its daemon given time to
finish, and whatever still runs dies with the PID namespace.
"""
import os
import subprocess
import tempfile

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERLAID = ("/etc", "/opt", "/usr/sbin", "/var/lib", CHECKOUT, "/var/tmp")   # /var/tmp, home of the sandbox's tmpfs, last

_SETUP = r"""
set -e
base=$1 shell=$2 script=$3 workdir=$4
mount -t tmpfs -o mode=0755 imagefs-sandbox "$base"
for d in $OVERLAID; do
    key=$(printf %s "$d" | tr / _)
    mkdir -p "$base/upper$key" "$base/work$key"
    mount -t overlay overlay -o "lowerdir=$d,upperdir=$base/upper$key,workdir=$base/work$key" "$d"
done
keep=$base/checkout                 # the checkout, kept where the /tmp below cannot hide it
mkdir -p "$keep"
mount --bind "$CHECKOUT" "$keep"
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs -o mode=0755 tmpfs /mnt   # mountpoints of its own: sandboxes run side by side
if [ ! -d "$CHECKOUT/imagefs" ]; then   # a checkout under /tmp or /mnt: put it back at its path
    mkdir -p "$CHECKOUT"
    mount --bind "$keep" "$CHECKOUT"
fi
mkdir -p /opt/imagefs /tmp/home "$workdir"
# Layer writers' work directories of the sandbox's own: a flock does not cross the overlay,
# so a live writer's directory of the host would look dead here, and be "recovered".
export IMAGEFS_WORKDIR="${IMAGEFS_WORKDIR:-/var/tmp/imagefs-sandbox-work}"
mkdir -p "$IMAGEFS_WORKDIR"
mount --bind "$keep" /opt/imagefs
imagefs_mounts() {   # mountpoints of fuse.imagefs mounts, deepest first
    awk '{for (i = 7; i < NF; i++) if ($i == "-") { if ($(i + 1) == "fuse.imagefs") print $5; break }}' \
        /proc/self/mountinfo | sort -r
}
mounts_before=$(imagefs_mounts)
set +e
(cd "$workdir" && HOME=/tmp/home "$shell" "$script")
rc=$?
for mp in $(imagefs_mounts); do
    case " $(echo $mounts_before) " in *" $mp "*) continue;; esac
    pid=$(getfattr --only-values -n user.imagefs.pid "$mp" 2>/dev/null)
    umount -l "$mp"
    for i in $(seq 100); do [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
done
exit $rc
"""


def run_sandboxed(script, shell="sh", workdir=CHECKOUT, env=None, timeout=900):
    """Run ``script`` (text) with ``shell`` in ``workdir`` inside a new sandbox; a CompletedProcess."""
    base = tempfile.mkdtemp(prefix="imagefs-sandbox-", dir="/var/tmp")
    try:
        path = os.path.join(base + ".sh")
        with open(path, "w") as f:
            f.write(script)
        env = dict(env if env is not None else os.environ, OVERLAID=" ".join(OVERLAID), CHECKOUT=CHECKOUT)
        argv = ["unshare", "--mount", "--propagation", "private", "--pid", "--fork", "--mount-proc",
                "sh", "-c", _SETUP, "sandbox", base, shell, path, workdir]
        return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
    finally:
        os.rmdir(base)
        os.remove(base + ".sh")
