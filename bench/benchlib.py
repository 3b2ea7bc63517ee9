"""Pieces the benchmarks share: dropping the page cache, timing, the load average, tiny images."""
import os
import subprocess
import time


def drop_caches():
    """Write back and drop the page cache, dentries and inodes (root): a cold start."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")


def timed(fn):
    """Seconds ``fn()`` took."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def loadavg():
    """The 1, 5 and 15 minute load averages: how busy the shared machine was."""
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def empty_delta_image(images_dir, image_id, parent):
    """An image as the writer leaves one, holding nothing of its own: a delta VMDK made by
    qemu-img over ``parent``'s disk, an empty imageMetadata/ and the manifest."""
    d = os.path.join(images_dir, image_id)
    os.makedirs(os.path.join(d, "imageMetadata"), exist_ok=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", "-b", f"../{parent}/{parent}.vmdk", "-F", "vmdk",
                    os.path.join(d, f"{image_id}.vmdk")], check=True)
    open(os.path.join(d, "manifest"), "w").close()
