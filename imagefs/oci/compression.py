"""Layer blobs: plain tar, gzip or zstd, told apart by their first bytes (docker save
archives carry no media types, and media types in the wild are not always right)."""
import zlib

from ..errors import InvalidInput

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
CHUNK = 1 << 20


def kind_of(head: bytes) -> str:
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    return "plain"


class DecompressingReader:
    """A file object of the uncompressed bytes of ``raw`` (plain, gzip or zstd)."""

    def __init__(self, raw, what):
        self._raw = raw
        self._what = what
        head = raw.read(4)
        self.kind = kind_of(head)
        self._pending = b""
        self._eof = False
        if self.kind == "gzip":
            self._dec = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif self.kind == "zstd":
            import zstandard
            self._dec = zstandard.ZstdDecompressor().decompressobj()
        else:
            self._dec = None
        self._head = head

    def _feed(self, data):
        if self._dec is None:
            return data
        try:
            out = self._dec.decompress(data)
            if self.kind == "gzip":
                while self._dec.eof and self._dec.unused_data:   # concatenated gzip members
                    rest = self._dec.unused_data
                    self._dec = zlib.decompressobj(16 + zlib.MAX_WBITS)
                    out += self._dec.decompress(rest)
            return out
        except Exception as e:        # zlib.error, zstandard.ZstdError
            raise InvalidInput(f"{self._what}: broken {self.kind} data: {e}") from None

    def read(self, n=-1):
        while not self._eof and (n < 0 or len(self._pending) < n):
            data = self._head or self._raw.read(CHUNK)
            self._head = b""
            if not data:
                self._eof = True
                if self.kind == "gzip" and not self._dec.eof:
                    raise InvalidInput(f"{self._what}: truncated gzip data")
                break
            self._pending += self._feed(data)
            if n < 0:
                continue
        if n < 0:
            out, self._pending = self._pending, b""
        else:
            out, self._pending = self._pending[:n], self._pending[n:]
        return out
