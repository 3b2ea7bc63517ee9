"""VMDK descriptors: the text that names a disk's type, CIDs, parent and extents.

A descriptor is a file of its own (``# Disk DescriptorFile``) or embedded in a hosted
sparse extent (monolithicSparse, streamOptimized). Virtual Disk Format 1.1, "The
Descriptor File": a header of ``key=value`` lines, one line per extent
(``ACCESS SECTORS TYPE ["FILE" [OFFSET]]``), then the disk database (``ddb.*``).
"""
import re
from dataclasses import dataclass, field

from ..errors import CorruptDisk

NO_PARENT_CID = "ffffffff"
MAX_DESCRIPTOR = 1 << 20        # bytes: a descriptor is a few hundred; qemu reads at most 1 MiB
MAX_EXTENTS = 1 << 16           # a 64 TiB twoGbMaxExtent* disk has 32768

EXTENT_TYPES = ("SPARSE", "FLAT", "ZERO", "VMFS", "VMFSSPARSE", "SESPARSE")
CREATE_TYPES = ("monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat",
                "streamOptimized", "vmfs", "vmfsThin", "vmfsSparse", "seSparse")

_EXTENT_RE = re.compile(r'(RW|RDONLY|NOACCESS)\s+(\d+)\s+([A-Z]+)(?:\s+"([^"]*)"(?:\s+(\d+))?)?\s*$')
_KEY_RE = re.compile(r'[A-Za-z][A-Za-z0-9_.]*')
_CID_RE = re.compile(r"[0-9a-fA-F]{1,8}")


@dataclass(frozen=True)
class ExtentLine:
    access: str         # RW, RDONLY or NOACCESS
    sectors: int        # how much of the virtual disk this extent covers
    type: str           # one of EXTENT_TYPES
    filename: str | None = None
    offset: int = 0     # FLAT: the sector in the file where the extent's data starts

    def render(self):
        text = f'{self.access} {self.sectors} {self.type}'
        if self.filename is not None:
            text += f' "{self.filename}"'
            if self.type == "FLAT":
                text += f" {self.offset}"
        return text


@dataclass
class Descriptor:
    values: dict = field(default_factory=dict)      # header keys (CID, createType, ...)
    extents: list = field(default_factory=list)     # ExtentLine
    ddb: dict = field(default_factory=dict)         # ddb.* keys

    @property
    def create_type(self):
        return self.values.get("createType", "")

    @property
    def cid(self):
        return self.values.get("CID", "").lower()

    @property
    def parent_cid(self):
        return self.values.get("parentCID", NO_PARENT_CID).lower().rjust(8, "0")

    @property
    def parent_hint(self):
        return self.values.get("parentFileNameHint") or None

    @property
    def sectors(self):
        return sum(e.sectors for e in self.extents)

    def render(self):
        """The descriptor as ESXi writes one (header, extents, disk database)."""
        lines = ["# Disk DescriptorFile", "version=1", 'encoding="UTF-8"']
        for key, value in self.values.items():
            if key in ("version", "encoding"):
                continue
            quoted = key not in ("CID", "parentCID")
            lines.append(f'{key}="{value}"' if quoted else f"{key}={value}")
        lines += ["", "# Extent description", *(e.render() for e in self.extents), "",
                  "# The Disk Data Base", "#DDB", ""]
        lines += [f'{key} = "{value}"' for key, value in self.ddb.items()]
        return "\n".join(lines) + "\n"


def parse_descriptor(raw, path):
    """A Descriptor from descriptor bytes (NULs end an embedded one). CorruptDisk names ``path``."""
    if len(raw) > MAX_DESCRIPTOR:
        raise CorruptDisk(f"{path}: descriptor is larger than {MAX_DESCRIPTOR} bytes")
    text = raw.split(b"\0", 1)[0].decode("utf-8", "replace")
    desc = Descriptor()
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] == "#":
            continue
        m = _EXTENT_RE.match(line) if line[0] in "RN" else None     # RW, RDONLY, NOACCESS
        if m:
            access, sectors, etype, filename, offset = m.groups()
            if etype not in EXTENT_TYPES:
                raise CorruptDisk(f"{path}: extent type {etype} is not supported "
                                  f"(only {', '.join(EXTENT_TYPES)})")
            if etype != "ZERO" and filename is None:
                raise CorruptDisk(f"{path}: extent line {line!r} names no file")
            if len(desc.extents) >= MAX_EXTENTS:
                raise CorruptDisk(f"{path}: more than {MAX_EXTENTS} extents")
            desc.extents.append(ExtentLine(access, int(sectors), etype, filename, int(offset or 0)))
            continue
        key, eq, value = line.partition("=")    # (no regex: a chain opens hundreds of these)
        key, value = key.rstrip(), value.strip()
        if eq and _KEY_RE.fullmatch(key):
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            (desc.ddb if key.startswith("ddb.") else desc.values)[key] = value
    if desc.create_type and desc.create_type not in CREATE_TYPES:
        raise CorruptDisk(f"{path}: createType {desc.create_type!r} is not supported "
                          f"(only {', '.join(CREATE_TYPES)})")
    cid = desc.values.get("CID", "")
    if not _CID_RE.fullmatch(cid):
        raise CorruptDisk(f"{path}: descriptor has no valid CID")
    if not _CID_RE.fullmatch(desc.values.get("parentCID", NO_PARENT_CID)):
        raise CorruptDisk(f"{path}: descriptor has an invalid parentCID")
    desc.values["CID"] = cid.lower().rjust(8, "0")
    return desc
