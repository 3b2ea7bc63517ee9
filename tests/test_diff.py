"""The diff engine on real images: VIC's diff_test cases, docker's rules, one-chain fast path."""
import os
import subprocess
import tarfile

import pytest

from export_fixtures import A, ADDED, B, CHANGED, DIRS, MTIME, REMOVED, VIC_CHANGES, vic, write_file  # noqa: F401
from export_helpers import Store, dump_dir, dump_tree, members
from helpers import make_tar
from imagefs.export import Change, diff_changes, export_diff
from oracles import gnu_tar, umoci_apply

def kinds(changes):
    return {c.path.decode(): c.kind for c in changes}


def checked_changes(new, old):
    """diff_changes, asserting that the one-chain fast path and the full walk agree."""
    fast = diff_changes(new, old)
    assert fast == diff_changes(new, old, fast=False)
    return fast


def test_vic_fixture_changes(vic):
    new, old = vic
    assert kinds(checked_changes(new, old)) == VIC_CHANGES


def test_no_ancestor_adds_everything(vic):
    new, _ = vic
    changes = diff_changes(new, None)
    assert {c.kind for c in changes} == {"A"}
    paths = {c.path.decode() for c in changes}
    assert {"/" + f for f in ADDED + CHANGED + DIRS} <= paths
    assert not {"/" + f for f in REMOVED} & paths


def test_changes_are_sorted_per_component(vic):
    new, old = vic
    paths = [c.path for c in diff_changes(new, old)]
    assert paths == sorted(paths, key=lambda p: p.split(b"/"))


def test_diff_against_itself_is_empty(vic):
    new, _ = vic
    assert diff_changes(new, new) == []


# --- docker's rules, on chains built by the layer writer ---------------------------------
@pytest.fixture(scope="module")
def rules(tmp_path_factory):
    """A base image and layers on it, each exercising one rule; returns (store, base tree)."""
    tmp = tmp_path_factory.mktemp("rules")
    src = tmp / "src"
    for d in ["deep/a/b", "keep", "dirs/moded", "dirs/timed", "replace/sub", "opq/sub", "links"]:
        os.makedirs(src / d)
    for f in ["deep/a/b/x", "deep/a/y", "keep/k", "replace/r1", "replace/sub/r2", "opq/o1", "opq/sub/o2",
              "links/lower", "same", "xattr", "ns", "f2d"]:
        write_file(str(src), f, A, mode=0o644)
    os.symlink("target-1", src / "sym")
    os.makedirs(src / "d2f/child")
    os.utime(src, (MTIME, MTIME))
    store = Store(tmp / "store")
    return store, store.base_from_dir("base", str(src))


def layer_changes(rules, name, entries):
    store, base = rules
    new = store.layer("base", name, make_tar(entries))
    return kinds(checked_changes(new, base)), new


def test_topmost_deletion_only(rules):
    got, _ = layer_changes(rules, "del", [("deep/.wh.a", "file", {})])
    assert got == {"/deep": "C", "/deep/a": "D"}


def test_dir_mtime_alone_is_no_change_but_mode_is(rules):
    got, _ = layer_changes(rules, "dirattr", [
        ("dirs/timed/", "dir", {"mode": 0o755, "mtime": MTIME + 5000}),
        ("dirs/moded/", "dir", {"mode": 0o700, "mtime": MTIME}),
    ])
    assert got == {"/dirs": "C", "/dirs/moded": "C"}


def test_xattr_only_change(rules):
    got, _ = layer_changes(rules, "xattr", [
        ("xattr", "file", {"data": A, "mode": 0o644, "mtime": MTIME, "xattrs": {"user.k": "v"}})])
    assert got == {"/xattr": "C"}


def test_same_size_same_mtime_rewrite_is_seen(rules):
    data = A.replace(b"mollusk", b"MOLLUSK")
    got, _ = layer_changes(rules, "rewrite", [("same", "file", {"data": data, "mode": 0o644, "mtime": MTIME})])
    assert got == {"/same": "C"}


def test_rewrite_with_equal_content_and_tar_truncated_mtime_is_no_change(rules):
    # the base has whole-second mtimes; the layer's copy adds nanoseconds in the same second
    got, _ = layer_changes(rules, "identical", [
        ("keep/k", "file", {"data": A, "mode": 0o644, "mtime": MTIME + 0.25}),
        ("ns", "file", {"data": A, "mode": 0o644, "mtime": MTIME + 1.5}),
    ])
    assert got == {"/ns": "C"}


def test_symlink_target_change(rules):
    got, _ = layer_changes(rules, "sym", [("sym", "symlink", {"target": "target-2", "mtime": MTIME})])
    assert got == {"/sym": "C"}


def test_type_changes(rules):
    got, _ = layer_changes(rules, "types", [
        ("d2f", "file", {"data": b"now a file"}),
        ("f2d/", "dir", {}),
        ("f2d/inside", "file", {"data": b"x"}),
    ])
    assert got == {"/d2f": "C", "/f2d": "C", "/f2d/inside": "A"}


def test_replaced_directory_is_opaque(rules):
    _, base = rules
    got, new = layer_changes(rules, "replace", [
        (".wh.replace", "file", {}), ("replace/", "dir", {}), ("replace/r1", "file", {"data": A}),
        ("replace/fresh", "file", {"data": B}),
    ])
    assert got == {"/replace": "C", "/replace/r1": "C", "/replace/fresh": "A"}
    top = [c for c in diff_changes(new, base) if c.path == b"/replace"][0]
    assert top.opaque


def test_opaque_marker_in_a_layer_keeps_the_dir_and_whites_out_its_entries(rules):
    got, new = layer_changes(rules, "opqlayer", [("opq/.wh..wh..opq", "file", {}), ("opq/o3", "file", {})])
    assert got == {"/opq": "C", "/opq/o1": "D", "/opq/sub": "D", "/opq/o3": "A"}


def test_new_link_to_lower_file_emits_the_whole_group(rules):
    got, new = layer_changes(rules, "link", [("links/new", "link", {"target": "links/lower"})])
    assert got == {"/links": "C", "/links/lower": "C", "/links/new": "A"}
    inos = {c.ino for c in diff_changes(new, rules[1]) if c.path.startswith(b"/links/")}
    assert len(inos) == 1


def test_chain_of_two_layers_against_the_base(rules):
    store, base = rules
    store.layer("base", "two1", make_tar([("keep/k2", "file", {"data": b"1"})]))
    top = store.layer("two1", "two2", make_tar([("keep/.wh.k", "file", {}), ("keep/k2", "file", {"data": b"2"})]))
    assert kinds(checked_changes(top, base)) == {"/keep": "C", "/keep/k": "D", "/keep/k2": "A"}
    assert kinds(checked_changes(top, store.tree("two1"))) == {"/keep": "C", "/keep/k": "D", "/keep/k2": "C"}


def test_reverse_diff_undoes_layers(rules):
    store, base = rules
    store.layer("base", "rev1", make_tar([("keep/.wh.k", "file", {}), ("keep/new", "file", {"data": b"n"})]))
    top = store.layer("rev1", "rev2", make_tar([("deep/.wh.a", "file", {})]))
    assert kinds(checked_changes(base, top)) == {
        "/deep": "C", "/deep/a": "A", "/deep/a/b": "A", "/deep/a/b/x": "A", "/deep/a/y": "A",
        "/keep": "C", "/keep/k": "A", "/keep/new": "D"}


def test_change_records_the_new_inode(rules):
    _, base = rules
    change = diff_changes(base, None)[0]
    assert isinstance(change, Change)
    assert base.stat(change.ino)
    assert change.kind == "A" and change.ino == base.resolve(change.path)


def test_very_deep_trees_need_no_recursion(tmp_path):
    depth = 600      # deeper than Python's recursion limit allows a recursive walk (mke2fs -d breaks near 1500)
    src = tmp_path / "src"
    os.mkdir(src)
    fd = os.open(src, os.O_DIRECTORY)
    for _ in range(depth):       # os.makedirs would recurse too deep itself
        os.mkdir("d", dir_fd=fd)
        fd, old = os.open("d", os.O_DIRECTORY, dir_fd=fd), fd
        os.close(old)
    os.close(fd)
    store = Store(tmp_path / "store")
    base = store.base_from_dir("base", str(src))
    subprocess.run(["rm", "-rf", str(src)], check=True)    # pytest's recursive cleanup would overflow
    assert len(diff_changes(base, None)) == depth + 1       # with lost+found
    leaf = "/".join(["d"] * depth) + "/leaf"
    top = store.layer("base", "top", make_tar([(leaf, "file", {"data": b"x"})]))
    assert kinds(checked_changes(top, base)) == {"/" + "/".join(["d"] * i): "C" for i in range(1, depth + 1)} | {
        "/" + leaf: "A"}


# --- regressions found by tests/test_diff_property.py ------------------------------------
def test_hardlinked_fifos_devices_and_symlinks_stay_linked_in_the_tar(tmp_path):
    """Every name after the first of any multiply-linked non-directory is a hardlink entry.
    The tar writer used to link regular files only and wrote each name of a linked FIFO,
    device or symlink as a node of its own, so GNU tar and umoci split the inode."""
    store = Store(tmp_path / "store")
    os.mkdir(tmp_path / "empty")
    store.base_from_dir("base", str(tmp_path / "empty"), size="16M")
    low = store.layer("base", "low", make_tar([
        ("p", "fifo", {}), ("p2", "link", {"target": "p"}),
        ("c", "chr", {"major": 300, "minor": 70000}), ("c2", "link", {"target": "c"}),
        ("s", "symlink", {"target": "nowhere"}), ("s2", "link", {"target": "s"})]))
    top = store.layer("low", "top", make_tar([("p3", "link", {"target": "p"})]))   # new link to a lower FIFO
    full, diff = b"".join(export_diff(low, None)), b"".join(export_diff(top, low))
    links = {n: (i.type, i.linkname) for n, (i, _) in members(full).items() if n[-1] == "2"}
    assert links == {"p2": (tarfile.LNKTYPE, "p"), "c2": (tarfile.LNKTYPE, "c"), "s2": (tarfile.LNKTYPE, "s")}
    got = members(diff)
    assert got["p"][0].isfifo() and [got[n][0].linkname for n in ("p2", "p3")] == ["p", "p"]
    out = tmp_path / "gnu"
    os.mkdir(out)
    gnu_tar("-xpf", "-", "-C", str(out), tar_bytes=full)
    assert dump_dir(out) == dump_tree(low)
    assert dump_dir(umoci_apply(str(tmp_path / "umoci"), [full, diff])) == dump_tree(top)
