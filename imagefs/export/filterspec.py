"""Which paths an export (or import) keeps, and under which names: VIC's FilterSpec.

A FilterSpec holds inclusion and exclusion paths, a strip path and a rebase path
(vmware/vic ``lib/archive``). ``excludes(path)`` decides whether an entry is left
out: the longest inclusion that matches competes with the longest exclusion that
matches, and the path is excluded only if the exclusion is longer (a tie
includes). ``rename(path)`` removes the strip prefix, then puts the rebase path in
front. Paths are relative, '/'-separated, without a leading '/'.

VIC's wire format (``encode_filter_spec``/``decode_filter_spec``), its
``CreateFilterSpec`` (``create_filter_spec``, same error strings) and its rules
are kept, with these deliberate differences:

* Matching is per path component, not by raw string prefix: exclusion ``exclude``
  hits ``exclude`` and ``exclude/x`` but not ``excludeme`` (VIC's prefix test hits
  all three, and ``strip=mnt/vols`` turned ``mnt/volsX/a`` into ``X/a``). Strip and
  rebase are component-wise too.
* A leading '/' on a key is ignored (VIC's own tests used '/exclude' against
  'exclude/...' paths, which can never match a raw prefix; those tests were
  skipped). '.' components and repeated '/' are ignored as well.
* Kept from VIC: '' (or '/') matches every path; a trailing '/' on a key matches
  what is below the directory but not the directory itself (``mnt/A/`` hides the
  contents of a nested mount while keeping its mount point); with inclusions
  alone nothing is excluded (inclusions only re-admit paths under an exclusion;
  to keep only ``etc`` use exclude '' plus include ``etc``).
* ``create_filter_spec`` refuses a second rebase or strip path whatever the order
  (VIC checked "already non-empty", so a first '' path slipped through), and
  strip or rebase paths with '..' are refused: they would name paths outside the
  root. So is any path holding a NUL or another control character (``..%00``
  passed the '..' test, and tar readers cut names at the NUL).

``parse_filter_text`` reads the compact form used in CLI flags and FUSE file
names: ``include=PATH,exclude=PATH,rebase=PATH,strip=PATH`` (any order, include
and exclude repeatable), each value percent-decoded so ``%2F`` can stand for '/'
where a file name cannot hold one.
"""
import base64
import binascii
import enum
import json
import urllib.parse
from dataclasses import dataclass, field
from typing import Callable

from ..errors import InvalidInput

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"


class FilterType(enum.IntEnum):
    """VIC's filter types, the values of a ``create_filter_spec`` map."""
    INCLUDE = 0
    EXCLUDE = 1
    REBASE = 2
    STRIP = 3


def _parts(path):
    """Path components of a '/'-separated relative or absolute path ('.' and '' dropped)."""
    return tuple(p for p in path.split("/") if p not in ("", "."))


def _key(raw):
    """(components, children_only) of an inclusion or exclusion key."""
    parts = _parts(raw)
    return parts, bool(parts) and raw.endswith("/")


def _best_match(keys, parts):
    """Specificity of the most specific key matching ``parts``; (-1, False) if none."""
    best = (-1, False)
    for raw in keys:
        kparts, children_only = _key(raw)
        n = len(kparts)
        if parts[:n] == kparts and (not children_only or len(parts) > n):
            best = max(best, (n, children_only))
    return best


@dataclass
class FilterSpec:
    inclusions: set[str] = field(default_factory=set)
    exclusions: set[str] = field(default_factory=set)
    rebase: str = ""
    strip: str = ""

    def __post_init__(self):
        for what, values in (("include", self.inclusions), ("exclude", self.exclusions),
                             ("rebase", [self.rebase]), ("strip", [self.strip])):
            for value in values:
                if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
                    raise InvalidInput(f"invalid filter specification: {what} path {value!r} "
                                       "holds a control character")
        for what, value in (("rebase", self.rebase), ("strip", self.strip)):
            if ".." in value.split("/"):
                raise InvalidInput(f"invalid filter specification: {what} path {value!r} contains '..'")

    @property
    def is_empty(self):
        return not (self.inclusions or self.exclusions or _parts(self.rebase) or _parts(self.strip))

    def excludes(self, path):
        """True if ``path`` is left out: the longest matching exclusion beats every inclusion."""
        if not self.exclusions:
            return False
        parts = _parts(path)
        return _best_match(self.inclusions, parts) < _best_match(self.exclusions, parts)

    def rename(self, path):
        """``path`` with the strip prefix removed (when it is under it) and the rebase path put in front."""
        parts = _parts(path)
        strip = _parts(self.strip)
        if strip and parts[:len(strip)] == strip:
            parts = parts[len(strip):]
        return "/".join(_parts(self.rebase) + parts)

    def to_path_filter(self) -> Callable[[str], "str | None"]:
        """For the importer: tar name -> new name ('' = the root), or None to skip the entry.

        A whiteout is tested against the path it deletes, as on export.
        """
        def path_filter(name):
            head, _, base = name.rpartition("/")
            subject = name
            if base.startswith(WHITEOUT_PREFIX) and base != OPAQUE_MARKER:
                subject = f"{head}/{base[len(WHITEOUT_PREFIX):]}"
            if self.excludes(subject):
                return None
            return self.rename(name)
        return path_filter


def create_filter_spec(spec):
    """VIC's CreateFilterSpec: a map of path -> FilterType (or its int value) to a FilterSpec."""
    inclusions, exclusions, rebase, strip = set(), set(), None, None
    for path, kind in (spec or {}).items():
        if kind == FilterType.INCLUDE:
            inclusions.add(path)
        elif kind == FilterType.EXCLUDE:
            exclusions.add(path)
        elif kind == FilterType.REBASE:
            if rebase is not None:
                raise InvalidInput("error creating filter spec: only one rebase path allowed")
            rebase = path
        elif kind == FilterType.STRIP:
            if strip is not None:
                raise InvalidInput("error creating filter spec: only one strip path allowed")
            strip = path
        else:
            raise InvalidInput(f"invalid filter specification: {kind}")
    return FilterSpec(inclusions, exclusions, rebase or "", strip or "")


# --- VIC wire format: std base64 of Go's json.Marshal(FilterSpec) -----------------------
_GO_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def _go_json(value):
    """json.dumps as Go's encoding/json writes it (compact, HTML characters escaped)."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, sort_keys=True)
    return "".join(_GO_ESCAPES.get(c, c) for c in text)


def encode_filter_spec(spec):
    """The base64 form VIC passes between processes (keys Inclusions/Exclusions/RebasePath/StripPath)."""
    doc = {
        "Inclusions": {p: {} for p in spec.inclusions},
        "Exclusions": {p: {} for p in spec.exclusions},
        "RebasePath": spec.rebase,
        "StripPath": spec.strip,
    }
    # Field order as Go writes struct fields; sets as {"path":{}} like Go's map[string]struct{}.
    text = "{" + ",".join(f"{_go_json(k)}:{_go_json(v)}" for k, v in doc.items()) + "}"
    return base64.b64encode(text.encode("utf-8", "surrogateescape")).decode("ascii")


def decode_filter_spec(encoded):
    """Inverse of encode_filter_spec; None or '' is the empty spec (as in VIC)."""
    if not encoded:
        return FilterSpec()
    try:
        raw = base64.b64decode(encoded, validate=True)
        doc = json.loads(raw.decode("utf-8", "surrogateescape")) if raw else {}
    except (binascii.Error, ValueError) as e:
        raise InvalidInput(f"invalid filter specification encoding: {e}") from None
    if not isinstance(doc, dict):
        raise InvalidInput("invalid filter specification encoding: not a JSON object")
    # Go's json.Unmarshal matches field names case-insensitively.
    fields = {k.lower(): v for k, v in doc.items()}

    def path_set(name):
        value = fields.get(name) or {}
        if not isinstance(value, dict):
            raise InvalidInput(f"invalid filter specification encoding: {name} is not a set")
        return set(value)

    def path(name):
        value = fields.get(name) or ""
        if not isinstance(value, str):
            raise InvalidInput(f"invalid filter specification encoding: {name} is not a string")
        return value

    return FilterSpec(path_set("inclusions"), path_set("exclusions"), path("rebasepath"), path("strippath"))


# --- compact forms for the CLI and FUSE names -------------------------------------------
_OPTION_TYPES = {"include": FilterType.INCLUDE, "exclude": FilterType.EXCLUDE,
                 "rebase": FilterType.REBASE, "strip": FilterType.STRIP}


def parse_filter_options(options):
    """{"include": [...], "exclude": [...], "rebase": p, "strip": p} (str or list values) to a FilterSpec."""
    inclusions, exclusions, single = set(), set(), {}
    for key, values in (options or {}).items():
        kind = _OPTION_TYPES.get(key)
        if kind is None:
            raise InvalidInput(f"unknown filter option {key!r}: use include, exclude, rebase or strip")
        values = [values] if isinstance(values, str) else list(values)
        if kind == FilterType.INCLUDE:
            inclusions.update(values)
        elif kind == FilterType.EXCLUDE:
            exclusions.update(values)
        elif values:
            if len(values) > 1 or key in single:
                raise InvalidInput(f"error creating filter spec: only one {key} path allowed")
            single[key] = values[0]
    return FilterSpec(inclusions, exclusions, single.get("rebase", ""), single.get("strip", ""))


def parse_filter_text(text):
    """``include=a,exclude=b%2Fc,rebase=x,strip=y`` to a FilterSpec ('' is the empty spec)."""
    options = {}
    for item in filter(None, text.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise InvalidInput(f"invalid filter option {item!r}: expected KEY=PATH")
        options.setdefault(key.strip(), []).append(urllib.parse.unquote(value, errors="surrogateescape"))
    return parse_filter_options(options)


def format_filter_text(spec):
    """The canonical compact form of ``spec`` (sorted; every '/', ',' and '%' percent-encoded)."""
    def q(value):
        return urllib.parse.quote(value, safe="", errors="surrogateescape")
    items = [f"include={q(p)}" for p in sorted(spec.inclusions)]
    items += [f"exclude={q(p)}" for p in sorted(spec.exclusions)]
    items += [f"{k}={q(v)}" for k, v in (("rebase", spec.rebase), ("strip", spec.strip)) if v]
    return ",".join(items)
