"""Structure-aware mutations of the files of a VMDK chain in any format.

``classify`` sniffs a file (text descriptor, hosted sparse KDMV with or without an
embedded descriptor, streamOptimized, COWD, SEsparse, flat data) and ``regions`` finds,
parsing independently of imagefs, where each keeps its header fields, descriptor,
grain directory and tables, grains, compressed-grain markers and footer.
``mutate_file`` then changes one of them: a header field or a table entry set to a
value that breaks assumptions (see ``*_VALUES``), a descriptor line rewritten (CIDs,
create types, extent lines, parent links to other disks of the store in the three
hint forms), or the file cut short. Flat data files are only ever cut (never loaded).
"""
import struct
import zlib

from .choices import pick
from .mutate import INTERESTING, SECTOR, mutate_region

KDMV = struct.Struct("<4sIIQQQQIQQQB4sH")
GD_AT_END = 0xFFFFFFFFFFFFFFFF
COWD = struct.Struct("<4sIIIIIII")
SES_CONST = struct.Struct("<26Q")
SES_ALLOCATED, SES_ZERO, SES_UNMAPPED, SES_GD = 3 << 60, 2 << 60, 1 << 60, 1 << 60
MAX_REGIONS = 48                # per kind: enough variety, bounded set-up cost


def classify(data):
    if data[:4] == b"KDMV":
        return "kdmv"
    if data[:4] == b"COWD":
        return "cowd"
    if len(data) >= 8 and struct.unpack_from("<Q", data)[0] == 0xCAFEBABE:
        return "sesparse"
    if data.lstrip()[:21] == b"# Disk DescriptorFile":
        return "descriptor"
    return "flat"


def _sample(items):
    if len(items) <= MAX_REGIONS:
        return items
    step = len(items) / MAX_REGIONS
    return [items[int(i * step)] for i in range(MAX_REGIONS)]


def regions(kind, data):
    """{region kind: [(offset, length)]} of one file; {} for what is not parsed."""
    try:
        return {"kdmv": _kdmv, "cowd": _cowd, "sesparse": _sesparse}[kind](data)
    except (KeyError, struct.error, ZeroDivisionError):
        return {}


def _kdmv(data):
    (_, _, flags, capacity, grain, desc_off, desc_size, gtes, rgd, gd, *_r) = KDMV.unpack_from(data)
    out = {"header": [(0, KDMV.size)]}
    if desc_off and desc_size:
        out["descriptor"] = [(desc_off * SECTOR, desc_size * SECTOR)]
    if gd == GD_AT_END:          # streamOptimized: footer marker, footer header, end-of-stream
        end = len(data)
        out["footer"] = [(end - 2 * SECTOR, KDMV.size)]
        out["marker"] = [(end - 3 * SECTOR, 16), (end - SECTOR, 16)]
        (_, _, flags, capacity, grain, _, _, gtes, rgd, gd, *_r) = KDMV.unpack_from(data, end - 2 * SECTOR)
    n_gdes = -(-capacity // (grain * gtes))
    out["gd"] = [(gd * SECTOR, n_gdes * 4)]
    if rgd:
        out["rgd"] = [(rgd * SECTOR, n_gdes * 4)]
    gts = [s for s in struct.unpack_from(f"<{n_gdes}I", data, gd * SECTOR) if s]
    out["gt"] = _sample([(s * SECTOR, gtes * 4) for s in gts])
    grains = sorted({e for s in gts for e in struct.unpack_from(f"<{gtes}I", data, s * SECTOR) if e > 1})
    if flags & 0x10000:          # compressed: each grain is a marker (LBA, size) and deflate data
        markers = []
        for g in _sample(grains):
            size = struct.unpack_from("<I", data, g * SECTOR + 8)[0]
            markers.append((g * SECTOR, 12))
            out.setdefault("deflate", []).append((g * SECTOR + 12, size))
        out["grain-marker"] = markers
    else:
        out["grain"] = [(g * SECTOR, grain * SECTOR) for g in _sample(grains)]
    return out


def _cowd(data):
    _, _, _, capacity, grain, gd, gd_entries, _free = COWD.unpack_from(data)
    out = {"header": [(0, COWD.size)], "header-rest": [(COWD.size, 2048 - COWD.size)],
           "gd": [(gd * SECTOR, gd_entries * 4)]}
    gts = [s for s in struct.unpack_from(f"<{gd_entries}I", data, gd * SECTOR) if s]
    out["gt"] = _sample([(s * SECTOR, 4096 * 4) for s in gts])
    grains = sorted({e for s in gts for e in struct.unpack_from("<4096I", data, s * SECTOR) if e > 1})
    out["grain"] = [(g * SECTOR, grain * SECTOR) for g in _sample(grains)]
    return out


def _sesparse(data):
    f = SES_CONST.unpack_from(data)
    vol, gd, gd_size, gts_at, grains_at = f[10], f[16], f[17], f[18], f[24]
    out = {"header": [(0, SES_CONST.size)], "volatile": [(vol * SECTOR, 32)],
           "gd": [(gd * SECTOR, gd_size * SECTOR)]}
    tables = [e & 0xFFFFFFFF for e in struct.unpack_from(f"<{gd_size * SECTOR // 8}Q", data, gd * SECTOR)
              if e >> 60 == 1]
    out["gt"] = _sample([(gts_at * SECTOR + t * 4096 * 8, 4096 * 8) for t in tables])
    clusters = []
    for t in tables[:4]:
        for e in struct.unpack_from("<4096Q", data, gts_at * SECTOR + t * 4096 * 8):
            if e >> 60 == 3:
                clusters.append(((e >> 48) & 0xFFF) | ((e & 0xFFFFFFFFFFFF) << 12))
    out["grain"] = [((grains_at + c * 8) * SECTOR, 4096) for c in _sample(sorted(clusters))]
    return out


# --- table entries --------------------------------------------------------------------------------
def _ses_entry(cluster):
    return SES_ALLOCATED | ((cluster & 0xFFF) << 48) | ((cluster >> 12) & 0xFFFFFFFFFFFF)


SES_GT_VALUES = [0, SES_UNMAPPED, SES_ZERO, SES_ALLOCATED, _ses_entry(1), _ses_entry(0xFFF), _ses_entry(0x1000),
                 _ses_entry(1 << 40), _ses_entry((1 << 60) - 1), 4 << 60, 0xF << 60, SES_ZERO | 1,
                 SES_ALLOCATED | 0x0FFFFFFFFFFFFFFF]
SES_GD_VALUES = [0, SES_GD, SES_GD | 1, SES_GD | 0xFFFFFFFF, SES_GD | (1 << 32), 2 << 60, 1, (1 << 64) - 1]


def mutate_entry(buf, region, width, values, choices):
    """Set one ``width``-byte entry of a table region to one of ``values`` or a neighbour's value."""
    start, length = region
    n = min(length, len(buf) - start) // width
    if n <= 0:
        return
    pos = start + choices.int(0, n - 1) * width
    fmt = "<Q" if width == 8 else "<I"
    op = choices.int(0, 3)
    if op == 0 and n > 1:                                 # a copy of another entry (aliasing)
        value = struct.unpack_from(fmt, buf, start + choices.int(0, n - 1) * width)[0]
    elif op == 1:                                         # off by a little
        value = (struct.unpack_from(fmt, buf, pos)[0] + pick(choices, [-1, 1, -8, 8, 128])) % (1 << (8 * width))
    else:
        value = pick(choices, values) if choices.int(0, 1) else pick(choices, INTERESTING)
    struct.pack_into(fmt, buf, pos, value & ((1 << (8 * width)) - 1))


def _file_sectors(buf):
    n = len(buf) // SECTOR
    return [0, 1, 2, n - 3, n - 2, n - 1, n, n + 1, n + 1000]


# --- descriptors -------------------------------------------------------------------------------
CREATE_TYPES = ["monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat",
                "streamOptimized", "vmfs", "vmfsThin", "vmfsSparse", "seSparse", "vmfsRDM", "fullDevice",
                "custom", ""]
EXTENT_TYPES = ["SPARSE", "FLAT", "ZERO", "VMFS", "VMFSSPARSE", "SESPARSE", "VMFSRDM", "sparse", ""]
SECTOR_VALUES = ["0", "1", "-1", "7", "4194304", "4294967295", "4294967296", str(1 << 40), str((1 << 46) // 512),
                 str((1 << 46) // 512 + 1), "99999999999999999999999", "0x10", "abc"]
CID_VALUES = ["ffffffff", "fffffffe", "0", "00000000", "zzzz", "123456789", "", "-1", "0x1234", "FFFFFFFF"]


class DiskContext:
    """What a descriptor mutation may point at: the store's files (datastore-relative) and CIDs."""

    def __init__(self, files, cids, ds_name):
        self.files, self.cids, self.ds_name = sorted(files), cids, ds_name

    def hints(self, here, choices):
        """Names of another file of the store as a hint written in file ``here`` would give it."""
        import posixpath
        target = pick(choices, self.files)
        rel = posixpath.relpath(target, posixpath.dirname(here))
        return pick(choices, [rel, rel, f"/vmfs/volumes/{self.ds_name}/{target}", f"[{self.ds_name}] {target}",
                              f"[{self.ds_name}]{target}", f"[other] {target}", f"/vmfs/volumes/other/{target}",
                              f"[] {target}", f"[{self.ds_name}] /{target}", f"[{self.ds_name}] ../{target}",
                              posixpath.dirname(rel) or ".", "/" + target, "../" * 8 + target, rel + "\\x",
                              "C:\\" + target, rel + "/", posixpath.basename(here), "x" * 5000, "\udcff"])


def mutate_descriptor_text(text, here, ctx, choices):
    """One change of descriptor text: a key, an extent line, a parent link, or garbage."""
    lines = text.split("\n")
    extents = [i for i, ln in enumerate(lines) if ln.split(" ", 1)[0] in ("RW", "RDONLY", "NOACCESS")]
    op = choices.int(0, 9)
    if op <= 1:                                           # a parent link to another disk of the store
        hint = ctx.hints(here, choices)
        lines = _set(lines, "parentFileNameHint", f'"{hint}"')
        if choices.int(0, 1) and ctx.cids:
            lines = _set(lines, "parentCID", pick(choices, sorted(ctx.cids.values())))
    elif op == 2:
        lines = _set(lines, pick(choices, ["CID", "parentCID"]),
                     pick(choices, CID_VALUES + sorted(ctx.cids.values())))
    elif op == 3:
        lines = _set(lines, "createType", f'"{pick(choices, CREATE_TYPES)}"')
    elif op <= 6 and extents:                             # one field of an extent line
        i = pick(choices, extents)
        parts = lines[i].split(" ")
        field = choices.int(0, 4)
        if field == 0:
            parts[0] = pick(choices, ["RW", "RDONLY", "NOACCESS", "rw", "WR"])
        elif field == 1 and len(parts) > 1:
            parts[1] = pick(choices, SECTOR_VALUES)
        elif field == 2 and len(parts) > 2:
            parts[2] = pick(choices, EXTENT_TYPES)
        elif field == 3:
            parts = parts[:3] + [f'"{ctx.hints(here, choices)}"']
        else:
            parts = parts[:4] + [pick(choices, ["0", "1", "2048", str(1 << 31), str(1 << 40), str(1 << 63), "-5"])]
        lines[i] = " ".join(parts)
    elif op == 7 and extents:                             # extent lines removed or repeated
        i = pick(choices, extents)
        count = pick(choices, [0, 2, 3, 100, 65537])
        lines[i:i + 1] = [lines[i]] * count
    elif op == 8:                                         # a line removed
        if lines:
            del lines[choices.int(0, len(lines) - 1)]
    else:                                                 # garbage
        lines.insert(choices.int(0, len(lines)), pick(choices, [
            "garbage", "=", '"', "RW", "RW 1", 'RW 1 FLAT "', "a=" * 300, "\0", "\udcff\udcfe",
            'ddb.x = "' + "y" * 3000 + '"', "#" * 70000, "x" * (1 << 20), "CID=1\nCID=2", "version=99"]))
    return "\n".join(lines)


def _set(lines, key, value):
    out = [ln for ln in lines if not ln.startswith(key + "=")]
    at = next((i for i, ln in enumerate(out) if ln.startswith("createType")), 1)
    out.insert(at, f"{key}={value}")
    return out


def _decode(raw):
    return raw.decode("utf-8", "surrogateescape")


def _encode(text):
    return text.encode("utf-8", "surrogateescape")


# --- one mutation of one file --------------------------------------------------------------------
def mutate_file(buf, kind, regs, here, ctx, choices):
    """Mutate ``buf`` (a bytearray, the file at datastore path ``here``) in place."""
    if choices.int(0, 11) == 0:                            # cut short
        del buf[choices.int(0, max(0, len(buf) - 1)):]
        return
    if kind == "descriptor":
        text = _decode(bytes(buf))
        buf[:] = _encode(mutate_descriptor_text(text, here, ctx, choices))
        return
    names = sorted(k for k, v in regs.items() if v)
    if not names:
        mutate_region(buf, (0, len(buf)), choices)
        return
    name = pick(choices, names + ["header"] * 2 if "header" in names else names)
    region = pick(choices, regs[name])
    if name == "descriptor":
        start, length = region
        text = _decode(bytes(buf[start:start + length]).split(b"\0", 1)[0])
        new = _encode(mutate_descriptor_text(text, here, ctx, choices))[:length]
        buf[start:start + length] = new + bytes(length - len(new))
    elif name == "deflate" and choices.int(0, 2) == 0:     # valid deflate of other bytes
        start, length = region
        data = zlib.compress(pick(choices, [b"", b"x", bytes(1 << 20), bytes(70000), b"y" * 65537]))
        buf[start - 4:start] = struct.pack("<I", len(data) if choices.int(0, 1) else length)
        buf[start:start + min(length, len(data))] = data[:length]
    elif name in ("gd", "rgd", "gt"):
        if kind == "sesparse":
            mutate_entry(buf, region, 8, SES_GD_VALUES if name == "gd" else SES_GT_VALUES, choices)
        else:
            mutate_entry(buf, region, 4, _file_sectors(buf) + [0xFFFFFFFF, 0x7FFFFFFF], choices)
    elif name == "header" and kind == "sesparse" and choices.int(0, 1):
        mutate_entry(buf, region, 8, [0, 1, 8, 64, 0x200000001, 1 << 32, 1 << 40, 1 << 63, len(buf) // SECTOR],
                     choices)
    elif name in ("header", "footer") and kind in ("kdmv", "cowd") and choices.int(0, 1):
        mutate_entry(buf, region, 4, [0, 1, 2, 3, 4, 8, 128, 512, 4096, 0x10000, 0x20000, 0x30004], choices)
    else:
        mutate_region(buf, region, choices)
