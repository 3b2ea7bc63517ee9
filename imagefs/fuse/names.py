"""Export file names: ``<ancestor>[,option...].tar``.

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


@dataclass(frozen=True)
class ExportName:
    ancestor: str
    spec: FilterSpec | None      # None: everything
    data: bool                   # False: headers only


def parse_export_name(name: str) -> ExportName | None:
    """The export a file name asks for; None if it is no export name at all, InvalidInput for bad options."""
    if not name.endswith(SUFFIX):
        return None
    ancestor, _, rest = name[: -len(SUFFIX)].partition(",")
    try:
        check_id(ancestor)
    except InvalidInput:
        return None
    items = rest.split(",") if rest else []
    data = HEADERS_FLAG not in items
    spec = parse_filter_text(",".join(i for i in items if i != HEADERS_FLAG))
    return ExportName(ancestor, None if spec.is_empty else spec, data)


def export_file_name(ancestor: str) -> str:
    return ancestor + SUFFIX
