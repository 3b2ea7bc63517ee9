"""Which names are valid for image stores and images.

IDs become directory names and VMDK basenames on every datastore (local and
vSphere), so they are kept to a portable set: 1-128 characters from
``[A-Za-z0-9_.:-]``, not starting with ``.`` or ``-`` (so never ``.``, ``..``, a
hidden file or an option). Docker layer IDs (64 hex digits) and
``sha256:<hex>`` digests fit.
"""
import re

from .errors import InvalidInput

MAX_ID_LEN = 128
_ID_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]{0,127}\Z")

SCRATCH = "scratch"
ERROR_SUFFIX = ".error"      # import/<id>.error in the mount


def check_id(value, what="image ID"):
    """Return ``value`` if it is a valid ID, else raise InvalidInput naming the rule."""
    if isinstance(value, str) and value.endswith(ERROR_SUFFIX) and _ID_RE.match(value):
        raise InvalidInput(f"invalid {what} {value!r}: names ending in {ERROR_SUFFIX} are the mount's "
                           "import failure reports")
    if not isinstance(value, str) or not _ID_RE.match(value):
        raise InvalidInput(
            f"invalid {what} {value!r}: use 1-{MAX_ID_LEN} characters from A-Z a-z 0-9 _ . : -, "
            "not starting with '.' or '-'")
    return value
