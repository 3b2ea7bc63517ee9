"""Property: for random trees and random layers on them (written by imagefs's layer writer),

* extracting export(Ln, nothing) with GNU tar reproduces tree(Ln), and
* umoci applying export(Lk, nothing) then export(Ln, Lk) reproduces tree(Ln), and
  export(Ln, nothing) then export(Lk, Ln) reproduces tree(Lk),
* and the one-chain fast diff equals the full walk.

Directory mtimes are compared only for directories the diff emits: a directory whose
only change is its mtime is no change (docker's rule). Generated mtimes never share a
second with different nanoseconds, which the second-tolerant rule would rightly ignore.
"""
import os
import posixpath
import stat
import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from export_helpers import Store, dump_dir, dump_tree
from helpers import make_tar
from imagefs.export import diff_changes, export_diff
from oracles import gnu_tar, umoci_apply

NAMES = ["a", "b", "c", "dd", "n\udce9"]       # the last one is not UTF-8 on disk
EPOCH = 1_600_000_000


class Model:
    """What the tree holds (path -> "dir" | "file" | "symlink"), to generate valid layers."""

    def __init__(self):
        self.kinds = {"": "dir"}

    def under(self, path):
        prefix = path + "/"
        return [p for p in self.kinds if p.startswith(prefix)]

    def of_kind(self, kind):
        return sorted(p for p, k in self.kinds.items() if k == kind and p)


def _attrs(draw, kind):
    mtime_s = draw(st.integers(0, 9))
    opts = {"mtime": EPOCH + mtime_s + (0.5 if mtime_s % 2 else 0),   # one fraction per second
            "uid": draw(st.sampled_from([0, 1000])), "gid": draw(st.sampled_from([0, 50]))}
    if kind == "file":
        opts["mode"] = draw(st.sampled_from([0o644, 0o600, 0o4755]))
        opts["data"] = draw(st.sampled_from([b"", b"same", b"SAME", b"other content"]))
    elif kind == "dir":
        opts["mode"] = draw(st.sampled_from([0o755, 0o700, 0o1777]))
    if kind != "symlink" and draw(st.booleans()):
        value = draw(st.binary(min_size=1, max_size=6))
        opts["xattrs"] = {"user.x": value.decode("utf-8", "surrogateescape")}
    return opts


class LayerBuilder:
    """One layer's tar entries, applied to the model as they are drawn."""

    def __init__(self, draw, model):
        self.draw, self.model = draw, model
        self.entries = []
        self.claimed = set()        # paths this layer already wrote or removed

    def free(self, path, destructive):
        """May an operation on ``path`` still go in this layer? A path is written at most once,
        and nothing this layer wrote may be below a later whiteout (it would remove it)."""
        if path in self.claimed:
            return False
        return not (destructive and any(c.startswith(path + "/") for c in self.claimed))

    def add(self, path, kind, opts=None):
        opts = dict(opts or {})
        if kind != "link":
            opts = {**_attrs(self.draw, kind), **opts}
        self.entries.append((path + "/" if kind == "dir" else path, kind, opts))
        self.claimed.add(path)
        self.model.kinds[path] = "file" if kind == "link" else kind

    def remove(self, path):
        for p in [path] + self.model.under(path):
            del self.model.kinds[p]

    def new_name(self, parent):
        name = self.draw(st.sampled_from(NAMES))
        path = posixpath.join(parent, name) if parent else name
        return None if path in self.model.kinds or not self.free(path, False) else path

    def step(self, ops):
        draw, model = self.draw, self.model
        op = draw(st.sampled_from(ops))
        if op in ("file", "dir", "symlink", "link"):
            path = self.new_name(draw(st.sampled_from(model.of_kind("dir") + [""])))
            if path is None:
                return
            if op == "link":
                targets = [f for f in model.of_kind("file") if self.free(f, False)]
                if targets:
                    self.add(path, "link", {"target": draw(st.sampled_from(targets))})
            elif op == "symlink":
                self.add(path, "symlink", {"target": draw(st.sampled_from(["a", "../b", "/etc", "x" * 70]))})
            else:
                self.add(path, op)
            return
        candidates = model.of_kind("file") if op == "modify" else \
            model.of_kind("dir") if op in ("replace", "opaque", "chattr") else sorted(p for p in model.kinds if p)
        candidates = [p for p in candidates if self.free(p, op != "chattr")]
        if not candidates:
            return
        path = draw(st.sampled_from(candidates))
        head, base = posixpath.split(path)
        if op == "modify":
            self.add(path, "file")
        elif op == "chattr":
            self.add(path, "dir")
        elif op == "delete":
            self.entries.append((posixpath.join(head, ".wh." + base), "file", {}))
            self.remove(path)
            self.claimed.add(path)
        elif op == "replace":
            self.entries.append((posixpath.join(head, ".wh." + base), "file", {}))
            self.remove(path)
            self.add(path, "dir")
            self.children(path)
        elif op == "opaque":
            self.entries.append((path + "/.wh..wh..opq", "file", {}))
            for p in model.under(path):
                del model.kinds[p]
            self.claimed.add(path)
            self.children(path)
        else:   # retype: a file or symlink becomes a directory, a directory a file
            was = model.kinds[path]
            self.remove(path)
            self.add(path, "file" if was == "dir" else "dir")

    def children(self, parent):
        """0-2 new entries in ``parent``, which this layer just replaced or made opaque."""
        for _ in range(self.draw(st.integers(0, 2))):
            path = self.new_name(parent)
            if path is not None:
                self.add(path, self.draw(st.sampled_from(["file", "dir"])))
        self.claimed.update(self.model.under(parent))


ADDITIONS = ["file", "dir", "dir", "symlink", "link"]
EDITS = ADDITIONS + ["modify", "delete", "delete", "replace", "replace", "opaque", "chattr", "retype"]


def draw_layer(draw, model, steps, ops):
    builder = LayerBuilder(draw, model)
    for _ in range(steps):
        builder.step(ops)
    return make_tar(builder.entries)


def comparable(dump, emitted_dirs):
    """Drop directory mtimes the diff need not carry (directories it did not emit)."""
    return {p: dict(e, mtime_ns=None) if e["type"] == stat.S_IFDIR and p not in emitted_dirs else e
            for p, e in dump.items()}


@settings(max_examples=int(os.environ.get("IMAGEFS_PROPERTY_EXAMPLES", "15")), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_exports_reproduce_the_image(data):
    draw = data.draw
    model = Model()
    with tempfile.TemporaryDirectory(prefix="imagefs-prop-", dir="/var/tmp") as tmp:
        os.mkdir(os.path.join(tmp, "empty"))
        store = Store(os.path.join(tmp, "store"))
        store.base_from_dir("L0", os.path.join(tmp, "empty"), size="32M")
        n = draw(st.integers(2, 3))
        for i in range(1, n + 1):
            store.layer(f"L{i - 1}", f"L{i}", draw_layer(draw, model, *((16, ADDITIONS) if i == 1 else (8, EDITS))))
        top = store.tree(f"L{n}")
        expected = dump_tree(top)

        full = b"".join(export_diff(top, None))
        out = os.path.join(tmp, "gnu")
        os.mkdir(out)
        gnu_tar("--xattrs", "--xattrs-include=*", "-xpf", "-", "-C", out, tar_bytes=full)
        assert dump_dir(out) == expected

        k = draw(st.integers(1, n - 1))     # L0 is empty: the full export covers it
        lower = store.tree(f"L{k}")
        changes = diff_changes(top, lower)
        assert changes == diff_changes(top, lower, fast=False)
        emitted = {c.path.lstrip(b"/") for c in changes if c.kind != "D"}
        rootfs = umoci_apply(os.path.join(tmp, "umoci"),
                             [b"".join(export_diff(lower, None)), b"".join(export_diff(top, lower))])
        assert comparable(dump_dir(rootfs), emitted) == comparable(expected, emitted)

        back = diff_changes(lower, top)        # the reverse diff undoes the layers
        assert back == diff_changes(lower, top, fast=False)
        emitted = {c.path.lstrip(b"/") for c in back if c.kind != "D"}
        rootfs = umoci_apply(os.path.join(tmp, "umoci-back"),
                             [full, b"".join(export_diff(lower, top))])
        assert comparable(dump_dir(rootfs), emitted) == comparable(dump_tree(lower), emitted)
