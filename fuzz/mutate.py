"""Structure-aware mutations: a seed is cut into regions (a VMDK header, its descriptor,
grain directory and tables; an ext4 superblock, group descriptors, inode records, extent
and directory and xattr blocks; tar headers and PAX records) and a mutation hits a field
inside one region with a value that breaks assumptions (0, 1, all ones, sign bits, sizes
beyond the file) or random bytes, or copies a structure over another."""
import struct

from .choices import pick

INTERESTING = [0, 1, 2, 3, 7, 8, 0x7F, 0x80, 0xFF, 0x100, 0x1FF, 0x200, 0x3FF, 0x400, 0x1000, 0x7FFF,
               0x8000, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF, 1 << 32, 1 << 40,
               (1 << 63) - 1, 1 << 63, (1 << 64) - 1]
WIDTHS = [(1, "<B"), (2, "<H"), (4, "<I"), (8, "<Q")]


def mutate_region(buf, region, choices):
    """One mutation inside ``region`` = (offset, length) of bytearray ``buf``."""
    start, length = region
    if length <= 0 or start >= len(buf):
        return
    length = min(length, len(buf) - start)
    op = choices.int(0, 9)
    if op <= 4:                                            # a field to an interesting value
        size, fmt = pick(choices, WIDTHS)
        pos = start + choices.int(0, max(0, length - size))
        if pos + size > len(buf):
            return
        value = pick(choices, INTERESTING) if op <= 3 else choices.int(0, (1 << (8 * size)) - 1)
        struct.pack_into(fmt, buf, pos, value & ((1 << (8 * size)) - 1))
    elif op <= 6:                                          # flip a bit
        pos = start + choices.int(0, length - 1)
        buf[pos] ^= 1 << choices.int(0, 7)
    elif op == 7:                                          # a few random bytes
        n = choices.int(1, 16)
        pos = start + choices.int(0, length - 1)
        buf[pos:pos + n] = choices.bytes(n)[: len(buf) - pos]
    else:                                                  # another structure copied over this one
        n = min(length, choices.int(4, 512))
        src = choices.int(0, max(0, len(buf) - n))
        pos = start + choices.int(0, max(0, length - n))
        buf[pos:pos + n] = buf[src:src + n]


# --- VMDK --------------------------------------------------------------------------------------
_SPARSE_HEADER = struct.Struct("<4sIIQQQQIQQQB4sH")
SECTOR = 512


def vmdk_regions(data):
    """{kind: [(offset, length)]} of a monolithicSparse VMDK file, parsed independently of imagefs."""
    (_, _, _, capacity, grain, desc_off, desc_size, gtes, _rgd, gd_off, _over, *_rest) = \
        _SPARSE_HEADER.unpack_from(data)
    out = {"header": [(0, _SPARSE_HEADER.size)], "descriptor": [(desc_off * SECTOR, desc_size * SECTOR)]}
    n_gdes = -(-capacity // (grain * gtes))
    out["gd"] = [(gd_off * SECTOR, n_gdes * 4)]
    gts = [struct.unpack_from("<I", data, gd_off * SECTOR + 4 * i)[0] for i in range(n_gdes)]
    out["gt"] = [(s * SECTOR, gtes * 4) for s in gts if s]
    grains = sorted({e for s in gts if s for e in struct.unpack_from(f"<{gtes}I", data, s * SECTOR) if e > 1})
    out["grain"] = [(g * SECTOR, grain * SECTOR) for g in grains[:64]]
    return out


_DESCRIPTOR_KEYS = ["CID", "parentCID", "createType", "parentFileNameHint", "version", "encoding"]
_HOSTILE_VALUES = ["", "0", "ffffffff", "fffffffe", "zzzz", "12345678", "../../../../etc/passwd", "/etc/passwd",
                   "child.vmdk", "scratch.vmdk", "../child/child.vmdk", "a" * 5000, "monolithicFlat",
                   "streamOptimized", "vmfsSparse", "twoGbMaxExtentSparse", "\0", "\udcff", "ds://x"]


def mutate_descriptor(buf, choices):
    """Rewrite one descriptor line (key = "value") or the extent line, in place and at the same size."""
    (_, _, _, _, _, desc_off, desc_size, *_rest) = _SPARSE_HEADER.unpack_from(buf)
    start, end = desc_off * SECTOR, min(len(buf), (desc_off + desc_size) * SECTOR)
    if start >= end:
        return
    text = bytes(buf[start:end]).split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
    lines = text.split("\n")
    op = choices.int(0, 3)
    if op <= 1:
        key = pick(choices, _DESCRIPTOR_KEYS)
        value = pick(choices, _HOSTILE_VALUES)
        lines = [ln for ln in lines if not ln.startswith(key + "=")] + [f'{key}="{value}"']
    elif op == 2:
        extent = [i for i, ln in enumerate(lines) if ln.startswith(("RW ", "RDONLY "))]
        if extent:
            size = pick(choices, ["0", "1", "-1", "99999999999999999999", "abc", str(1 << 40)])
            kind = pick(choices, ["SPARSE", "FLAT", "ZERO", "VMFSSPARSE", "SESPARSE", ""])
            lines[extent[0]] = f'RW {size} {kind} "{pick(choices, ["x.vmdk", "", "../../x", "/dev/zero"])}"'
    else:
        lines.insert(choices.int(0, len(lines)), pick(choices, ["garbage", "=", "a=" * 300, "# comment",
                                                                 "ddb.x = \"" + "y" * 3000 + "\""]))
    new = "\n".join(lines).encode("utf-8", "surrogateescape")[: end - start]
    buf[start:end] = new + bytes(end - start - len(new))


def mutate_vmdk(buf, regions, choices):
    """One mutation of a VMDK file, ``regions`` from vmdk_regions of the file before any."""
    kind = pick(choices, ["header", "header", "descriptor", "descriptor-text", "gd", "gt", "gt", "grain",
                          "truncate"])
    if kind == "descriptor-text":
        mutate_descriptor(buf, choices)
    elif kind == "truncate":
        del buf[choices.int(0, len(buf) - 1):]
    elif regions.get(kind):
        mutate_region(buf, pick(choices, regions[kind]), choices)


# --- ext4 --------------------------------------------------------------------------------------
def mutate_ext4(buf, regions, choices):
    kinds = [k for k in ("superblock", "gdt", "inode", "inode", "inode", "extent", "dir", "dir", "xattr")
             if regions.get(k)]
    mutate_region(buf, pick(choices, regions[pick(choices, kinds)]), choices)


# --- tar -----------------------------------------------------------------------------------------
_TAR_FIELDS = [(0, 100), (100, 8), (108, 8), (116, 8), (124, 12), (136, 12), (148, 8), (156, 1), (157, 100),
               (257, 8), (329, 8), (337, 8), (345, 155), (483, 12)]   # name..prefix, GNU sparse/realsize


def tar_regions(data):
    """Header blocks (found by their checksums) and PAX/GNU extended-data blocks of a tar."""
    headers, pos = [], 0
    while pos + 512 <= len(data):
        block = data[pos:pos + 512]
        if block == bytes(512):
            break
        try:
            size = int(block[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        except ValueError:
            break
        headers.append(pos)
        pos += 512 + -(-size // 512) * 512
    return headers


def mutate_tar(buf, choices, fix_checksum=True):
    headers = tar_regions(buf)
    op = choices.int(0, 9)
    if not headers or op == 9:
        mutate_region(buf, (0, len(buf)), choices)
        return
    h = pick(choices, headers)
    if op <= 5:
        off, length = pick(choices, _TAR_FIELDS)
        value = pick(choices, [b"", b"0", b"7777777", b"77777777777", b"-1", b"\x80" + bytes(10) + b"\x01",
                               b"\xff" * 12, b"../../x", b"/abs", b"a/../../b", b".wh..wh..opq", b".wh.",
                               b"x" * 100, b"1", b"2", b"3", b"4", b"5", b"6", b"7", b"L", b"K", b"x", b"g",
                               b"S", b"D", b"M", b"V", choices.bytes(length)])
        buf[h + off:h + off + length] = value[:length].ljust(length, b"\0")
    elif op <= 7 and buf[h + 156:h + 157] in (b"x", b"g"):
        mutate_pax(buf, h, choices)
        fix_checksum = True
    else:
        mutate_region(buf, (h, 512 + 512), choices)
    if fix_checksum and choices.int(0, 4):                  # mostly: let the header through
        block = buf[h:h + 512]
        block[148:156] = b" " * 8
        buf[h + 148:h + 156] = b"%06o\0 " % sum(block)


def mutate_pax(buf, header, choices):
    """Change one record of the PAX extended header at ``header`` (its size field kept)."""
    size = int(buf[header + 124:header + 136].split(b"\0", 1)[0].strip() or b"0", 8)
    start = header + 512
    body = bytes(buf[start:start + size])
    record = pick(choices, [b"path=../../escape", b"path=/abs", b"linkpath=../../x", b"size=99999999999999",
                            b"size=-1", b"uid=-1", b"mtime=1e999", b"mtime=nan", b"GNU.sparse.size=1099511627776",
                            b"GNU.sparse.numblocks=1000000000", b"GNU.sparse.map=0,1,2",
                            b"SCHILY.xattr.user.x=" + b"v" * 100, b"SCHILY.xattr.=x",
                            b"LIBARCHIVE.xattr.%ff=!!!", b"hdrcharset=BINARY", b"path=a\0b"])
    line = b"%d %s\n" % (len(record) + 3 + len(str(len(record))), record)
    new = (line + body)[:size] if choices.int(0, 1) else (body + line)[:size]
    if choices.int(0, 3) == 0:          # a record whose length field lies
        new = b"999999 " + new[7:]
    buf[start:start + size] = new
