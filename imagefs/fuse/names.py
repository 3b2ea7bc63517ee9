"""Export file names: ``export/<ancestor>[,option...].tar`` and ``rootfs[,option...].tar``.

One meaning per name, the same as the CLI's:

- ``<id>/export/<ancestor>.tar`` is the diff of the image against ``<ancestor>``
  (``imagefs export STORE ID --ancestor ANCESTOR``); ``scratch.tar`` included: the
  image's changes over the scratch skeleton, which is what a base layer of a docker
  or OCI image holds.
- ``<id>/rootfs.tar`` is the whole image, every file and no whiteouts, a diff against
  nothing (``imagefs export STORE ID``).

Options are ``include=PATH``, ``exclude=PATH`` (repeatable), ``rebase=PATH``,
``strip=PATH`` (values percent-encoded, ``%2F`` for '/') and the flag ``headers``
(headers only: no file data, entries tagged with ``change_type``). Image IDs cannot
hold ',' so the first comma always ends the ancestor.
"""
from dataclasses import dataclass

from ..errors import InvalidInput
from ..export.filterspec import FilterSpec, parse_filter_text
from ..ids import check_id

SUFFIX = ".tar"
HEADERS_FLAG = "headers"
WHOLE_IMAGE = "rootfs"       # rootfs.tar beside rootfs/: the image as one tar


@dataclass(frozen=True)
class ExportName:
    ancestor: str | None         # None: the whole image (a diff against nothing)
    spec: FilterSpec | None      # None: everything
    data: bool                   # False: headers only


def _parse(name: str):
    """(head, options ExportName fields) of ``<head>[,opts].tar``, or None."""
    if not name.endswith(SUFFIX):
        return None
    head, _, rest = name[: -len(SUFFIX)].partition(",")
    items = rest.split(",") if rest else []
    data = HEADERS_FLAG not in items
    return head, items, data


def _options(items, data, ancestor):
    spec = parse_filter_text(",".join(i for i in items if i != HEADERS_FLAG))
    return ExportName(ancestor, None if spec.is_empty else spec, data)


def parse_export_name(name: str) -> ExportName | None:
    """The export ``export/<name>`` asks for; None if it is no export name, InvalidInput for bad options."""
    parsed = _parse(name)
    if parsed is None:
        return None
    ancestor, items, data = parsed
    try:
        check_id(ancestor)
    except InvalidInput:
        return None
    return _options(items, data, ancestor)


def parse_whole_image_name(name: str) -> ExportName | None:
    """The whole-image export ``<id>/<name>`` asks for (``rootfs[,opts].tar``), or None."""
    parsed = _parse(name)
    if parsed is None or parsed[0] != WHOLE_IMAGE:
        return None
    return _options(parsed[1], parsed[2], None)


def export_file_name(ancestor: str) -> str:
    return ancestor + SUFFIX
