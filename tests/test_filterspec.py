import base64
import json

import pytest

from imagefs.errors import InvalidInput
from imagefs.export import (FilterSpec, FilterType, create_filter_spec, decode_filter_spec,
                            encode_filter_spec, format_filter_text, parse_filter_options, parse_filter_text)

# VIC lib/archive diff_test fixture keys (leading '/' as VIC wrote them)
VIC_EXCLUDED = ["/exclude", "/excludeme", "/include/excludeme"]
VIC_INCLUDED = ["/exclude/includeme", "/include/"]


def vic_spec(**extra):
    spec = {p: FilterType.EXCLUDE for p in VIC_EXCLUDED}
    spec.update({p: FilterType.INCLUDE for p in VIC_INCLUDED})
    spec.update(extra)
    return create_filter_spec(spec)


# --- CreateFilterSpec ---------------------------------------------------------------
def test_create_filter_spec_sorts_paths_by_type():
    spec = create_filter_spec({"a": 0, "b": 1, "r": 2, "s": 3})
    assert spec == FilterSpec({"a"}, {"b"}, "r", "s")


def test_create_filter_spec_of_nothing_is_empty():
    assert create_filter_spec(None) == FilterSpec()
    assert create_filter_spec({}).is_empty


@pytest.mark.parametrize("spec, message", [
    ({"a": FilterType.REBASE, "b": FilterType.REBASE}, "error creating filter spec: only one rebase path allowed"),
    ({"": FilterType.REBASE, "b": FilterType.REBASE}, "error creating filter spec: only one rebase path allowed"),
    ({"a": FilterType.STRIP, "b": FilterType.STRIP}, "error creating filter spec: only one strip path allowed"),
    ({"a": 7}, "invalid filter specification: 7"),
    ({"a": -1}, "invalid filter specification: -1"),
])
def test_create_filter_spec_errors_are_vics(spec, message):
    with pytest.raises(InvalidInput) as err:
        create_filter_spec(spec)
    assert str(err.value) == message


def test_dotdot_in_rebase_or_strip_is_refused():
    with pytest.raises(InvalidInput):
        FilterSpec(rebase="a/../../b")
    with pytest.raises(InvalidInput):
        create_filter_spec({"..": FilterType.STRIP})


# --- Excludes -------------------------------------------------------------------------
def test_empty_spec_and_inclusions_alone_exclude_nothing():
    assert not FilterSpec().excludes("anything/at/all")
    assert not FilterSpec(inclusions={"etc"}).excludes("usr/bin")


def test_exclusions_match_whole_components():
    spec = FilterSpec(exclusions={"exclude"})
    assert spec.excludes("exclude")
    assert spec.excludes("exclude/x/y")
    assert not spec.excludes("excludeme")
    assert not spec.excludes("excludeme/x")
    assert not spec.excludes("other/exclude")


def test_empty_exclusion_matches_everything_and_leading_slash_is_ignored():
    assert FilterSpec(exclusions={""}).excludes("a/b")
    assert FilterSpec(exclusions={"/"}).excludes("a")
    assert FilterSpec(exclusions={"/a//b/./"}).excludes("a/b/c")


def test_longest_match_wins_and_a_tie_includes():
    spec = FilterSpec(inclusions={"", "etc/ssh"}, exclusions={"etc", "etc/ssh/keys"})
    assert not spec.excludes("usr")
    assert spec.excludes("etc/passwd")
    assert not spec.excludes("etc/ssh/sshd_config")
    assert spec.excludes("etc/ssh/keys/host")
    assert not FilterSpec(inclusions={"a"}, exclusions={"a"}).excludes("a/b")


def test_trailing_slash_hides_the_children_but_not_the_directory():
    # VIC's nested-mount rule: root inclusions {mnt}, exclusions {"", mnt/A/}
    spec = FilterSpec(inclusions={"mnt"}, exclusions={"", "mnt/A/"})
    assert not spec.excludes("mnt")
    assert not spec.excludes("mnt/A")
    assert spec.excludes("mnt/A/file")
    assert not spec.excludes("mnt/B/file")
    assert spec.excludes("etc")


def test_vic_diff_test_keys():
    spec = vic_spec()
    excluded = ["exclude", "exclude/excludeme", "excludeme", "include/excludeme"]
    kept = ["exclude/includeme", "include/includeme", "original", "original/file1", "add/file1", "file1",
            "include"]
    assert [p for p in excluded + kept if spec.excludes(p)] == excluded


# --- rename -------------------------------------------------------------------------
def test_rename_strips_then_rebases_per_component():
    spec = FilterSpec(rebase="/path/to/prefix", strip="mnt/vols")
    assert spec.rename("mnt/vols/a/b") == "path/to/prefix/a/b"
    assert spec.rename("mnt/volsX/a") == "path/to/prefix/mnt/volsX/a"
    assert spec.rename("mnt/vols") == "path/to/prefix"
    assert FilterSpec(strip="mnt/vols").rename("mnt/vols") == ""
    assert FilterSpec().rename("/a/./b/") == "a/b"


def test_path_filter_for_the_importer():
    pf = FilterSpec(exclusions={"skip"}, rebase="base", strip="top").to_path_filter()
    assert pf("top/a") == "base/a"
    assert pf("skip/a") is None
    assert pf("./other") == "base/other"
    assert pf(".wh.skip") is None                 # a whiteout is judged by what it deletes
    assert pf("top/.wh.x") == "base/.wh.x"
    assert pf("skip/.wh..wh..opq") is None


# --- wire format ----------------------------------------------------------------------
def test_encoding_is_gos_json_in_std_base64():
    spec = FilterSpec({"b", "a"}, set(), "r<&>", "")
    raw = base64.b64decode(encode_filter_spec(spec))
    assert raw == (b'{"Inclusions":{"a":{},"b":{}},"Exclusions":{},'
                   b'"RebasePath":"r\\u003c\\u0026\\u003e","StripPath":""}')


def test_encoding_round_trips():
    spec = vic_spec(**{"/path/to/prefix": FilterType.REBASE, "strip/me": FilterType.STRIP})
    assert decode_filter_spec(encode_filter_spec(spec)) == spec
    odd = FilterSpec({"caf\u00e9", "bad\udcff"}, {"x,y"}, "", "")
    assert decode_filter_spec(encode_filter_spec(odd)) == odd


def test_decoding_normalises_like_go():
    assert decode_filter_spec(None) == FilterSpec()
    assert decode_filter_spec("") == FilterSpec()
    doc = {"inclusions": None, "EXCLUSIONS": {"x": {}}, "rebasePath": "r"}
    assert decode_filter_spec(base64.b64encode(json.dumps(doc).encode()).decode()) == FilterSpec(set(), {"x"}, "r")


@pytest.mark.parametrize("encoded", ["not base64!", base64.b64encode(b"[1]").decode(),
                                     base64.b64encode(b'{"Inclusions": 3}').decode()])
def test_decoding_garbage_is_invalid_input(encoded):
    with pytest.raises(InvalidInput):
        decode_filter_spec(encoded)


# --- compact forms -------------------------------------------------------------------
def test_options_dict():
    spec = parse_filter_options({"include": ["a", "b"], "exclude": "c", "rebase": "r", "strip": ["s"]})
    assert spec == FilterSpec({"a", "b"}, {"c"}, "r", "s")
    with pytest.raises(InvalidInput, match="only one rebase path allowed"):
        parse_filter_options({"rebase": ["x", "y"]})
    with pytest.raises(InvalidInput, match="unknown filter option"):
        parse_filter_options({"exclud": "x"})


def test_text_form_round_trips_through_file_names():
    spec = FilterSpec({"etc/ssh", "a,b"}, {"", "etc"}, "new/root", "100%")
    text = format_filter_text(spec)
    assert "/" not in text
    assert parse_filter_text(text) == spec
    assert parse_filter_text("exclude=etc,include=etc/ssh,rebase=x") == FilterSpec({"etc/ssh"}, {"etc"}, "x")
    assert parse_filter_text("") == FilterSpec()


@pytest.mark.parametrize("text", ["exclude", "colour=red", "strip=a,strip=b"])
def test_bad_text_form_is_invalid_input(text):
    with pytest.raises(InvalidInput):
        parse_filter_text(text)
