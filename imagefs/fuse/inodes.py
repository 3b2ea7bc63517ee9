"""The mount's inode numbers: the one place that knows the scheme.

The root is 1; synthetic nodes (stores, images/, info.json, ...) count up from 2 and
stay below 2**32. A file of an image tree is ``(image index << 32) | ext4 inode``.
Each incarnation of an image gets its index the first time the mount sees it, and
an index is never reused, so numbers are stable for the life of the mount, and an
image deleted and made again gets new ones (the kernel may still hold pages of the
old one).
"""
ROOT_INO = 1
_SHIFT = 32
_LOW = (1 << _SHIFT) - 1
MAX_SYNTHETIC = _LOW


def tree_ino(idx, ext4_ino):
    return (idx << _SHIFT) | ext4_ino


def is_tree_ino(ino):
    return ino > _LOW


def split_tree_ino(ino):
    """(image index, ext4 inode) of a tree inode."""
    return ino >> _SHIFT, ino & _LOW
