"""Content digests (``sha256:<hex>``) and the IDs derived from them.

A layer's *digest* is the sha256 of its blob as stored (maybe compressed); its
*diffID* is the sha256 of the uncompressed tar. The *chain ID* of a layer names the
layer together with everything below it (docker's layer store): the chain ID of the
bottom layer is its diffID, and each next one is ``sha256(parent chain ID + " " +
diffID)``. imagefs names a loaded layer's image by its chain ID's hex, so the same
base layer is written once however many images share it.
"""
import hashlib
import re

from ..errors import InvalidInput

ALGORITHM = "sha256"
_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}\Z")


def check_digest(value, what="digest"):
    if not isinstance(value, str) or not _DIGEST_RE.match(value):
        raise InvalidInput(f"invalid {what} {value!r}: imagefs takes sha256:<64 lowercase hex digits>")
    return value


def digest_of(data: bytes) -> str:
    return f"{ALGORITHM}:{hashlib.sha256(data).hexdigest()}"


def hex_of(digest: str) -> str:
    return check_digest(digest).split(":", 1)[1]


def chain_ids(diff_ids):
    """The chain ID of each layer, bottom first."""
    out = []
    for diff_id in diff_ids:
        check_digest(diff_id, "diffID")
        out.append(diff_id if not out else digest_of(f"{out[-1]} {diff_id}".encode()))
    return out


def layer_image_id(chain_id: str) -> str:
    """The store image ID of a loaded layer: its chain ID's hex."""
    return hex_of(chain_id)


def verify(data: bytes, expected: str, what: str) -> bytes:
    got = digest_of(data)
    if got != expected:
        raise InvalidInput(f"{what}: digest mismatch: expected {expected}, got {got}")
    return data


class VerifyingReader:
    """Reads a file object through, hashing it; at its end the bytes must have the
    expected digest (and size, when known), else the read raises InvalidInput. So a
    consumer that reads to the end (the layer writer always does) fails on bad data
    before anything is kept."""

    def __init__(self, raw, expected: str | None, what: str, size: int | None = None, progress=None):
        self._raw = raw
        self._hash = hashlib.sha256()
        self._expected = expected
        self._what = what
        self._size = size
        self._progress = progress
        self.read_bytes = 0
        self._checked = False

    def read(self, n=-1):
        data = self._raw.read(n)
        if data:
            self._hash.update(data)
            self.read_bytes += len(data)
            if self._progress is not None:
                self._progress(len(data))
        elif not self._checked and n != 0:
            self._checked = True
            self.check()
        return data

    def check(self):
        if self._size is not None and self.read_bytes != self._size:
            raise InvalidInput(f"{self._what}: size mismatch: expected {self._size} bytes, got {self.read_bytes}")
        if self._expected is not None and self.digest != self._expected:
            raise InvalidInput(f"{self._what}: digest mismatch: expected {self._expected}, got {self.digest}")

    @property
    def digest(self):
        return f"{ALGORITHM}:{self._hash.hexdigest()}"
