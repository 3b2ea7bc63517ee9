"""The ``imagefs`` command line.

Every failure is one line on stderr (``imagefs: <reason>``) and an exit code that
says what kind of failure it was (``EXIT_CODES``, documented in docs/cli.md).
Listings and info commands take ``--json``. Progress of long transfers goes to
stderr when it is a terminal (``-q`` silences it), never to stdout. Ctrl-C, SIGTERM and
SIGHUP unwind like an error (exit 128 + the signal's number), so nothing half-made is left.
"""
import argparse
import json
import logging
import os
import signal
import stat
import sys

from . import errors
from .errors import ImageFSError, InvalidInput
from .progress import Progress, Quiet, human

log = logging.getLogger("imagefs")

# exit code -> (error types, meaning); the first matching type decides
EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_NOT_FOUND, EXIT_IN_USE, EXIT_EXISTS, EXIT_READ_ONLY, EXIT_NO_SPACE = \
    0, 1, 2, 3, 4, 5, 6, 7
EXIT_INTERRUPTED = 130
EXIT_CODES = [
    (errors.InvalidInput, EXIT_INVALID),
    (errors.NotFound, EXIT_NOT_FOUND),
    (errors.InUse, EXIT_IN_USE),
    (errors.Exists, EXIT_EXISTS),
    (errors.ReadOnly, EXIT_READ_ONLY),
    (errors.NoSpace, EXIT_NO_SPACE),
]


def datastore_options(args):
    """The remote backends' settings from the global flags (None: not given)."""
    return {"password_file": args.password_file, "ca_file": args.ca_file,
            "insecure": True if args.insecure else None, "cache_size": args.cache_size}


def exit_code(err):
    for kind, code in EXIT_CODES:
        if isinstance(err, kind):
            return code
    return EXIT_FAILED


def _progress(args, label="", total=None):
    return Quiet(label, total) if args.quiet else Progress(label, total)


def _emit(args, obj, text_lines):
    """--json prints ``obj``; otherwise the text lines."""
    if getattr(args, "json", False):
        print(json.dumps(obj, indent=2, sort_keys=True))
    else:
        for line in text_lines:
            print(line)


def _table(header, rows, right=()):
    """Text lines of a table whose columns are as wide as their widest cell (IDs of loaded
    images are 64 characters); columns numbered in ``right`` are right-aligned."""
    cells = [list(header)] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return ["  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
            for row in cells]


def _datastore_spec(args, create=False):
    from .datastore.base import default_datastore_path
    spec = args.datastore or default_datastore_path()
    if "://" not in spec and not create and not os.path.isdir(spec):
        raise errors.NotFound(f"datastore {spec} does not exist (imagefs store create makes it; "
                              "or give --datastore / $IMAGEFS_DATASTORE)")
    return spec


def _open_store(args, create=False):
    from .datastore import open_datastore
    from .store import ImageStore
    options = dict(datastore_options(args), create=create)   # a remote folder too is made by store create only
    return ImageStore(open_datastore(_datastore_spec(args, create), options),
                      writer_method=getattr(args, "writer", None))


def _open_input(path):
    """(file object, size or None, close?) of a path or '-' (stdin)."""
    if path in (None, "-"):
        return sys.stdin.buffer, None, False
    try:
        f = open(path, "rb")
    except OSError as e:
        raise InvalidInput(f"{path}: {e.strerror}") from None
    st = os.fstat(f.fileno())
    return f, (st.st_size if stat.S_ISREG(st.st_mode) else None), True


# --- store --------------------------------------------------------------------------------------
def cmd_store_create(args):
    _open_store(args, create=True).create_store(args.name, capacity=args.capacity, disk_format=args.disk_format)
    print(args.name)


def cmd_store_ls(args):
    names = _open_store(args).list_stores()
    _emit(args, names, names)


def cmd_store_rm(args):
    _open_store(args).delete_store(args.name, force=args.force)


def cmd_store_usage(args):
    usage = _open_store(args).usage(args.name)
    _emit(args, {"store": args.name, "usage": usage}, [usage])


def cmd_store_check(args):
    from .check import check_store
    from .datastore import open_datastore
    from .store import ImageStore
    st = ImageStore(open_datastore(_datastore_spec(args)), recover=False)
    report = check_store(st, args.name, repair=args.repair, data=not args.no_data)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2, sort_keys=True))
    else:
        for problem in report.problems:
            print(problem.line())
        repaired = sum(p.repaired for p in report.problems)
        print(f"store {args.name}: {report.images_checked} images checked, {len(report.problems)} problems"
              + (f", {repaired} repaired" if args.repair else "")
              + (f", {len(report.in_progress)} being written" if report.in_progress else ""))
    return 0 if report.ok else 1


# --- images -------------------------------------------------------------------------------------
def _parse_meta(items):
    meta = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidInput(f"--meta {item!r}: use KEY=VALUE or KEY=@FILE")
        if value.startswith("@"):
            try:
                with open(value[1:], "rb") as f:
                    meta[key] = f.read()
            except OSError as e:
                raise InvalidInput(f"--meta {key}: cannot read {value[1:]}: {e.strerror}") from None
        else:
            meta[key] = value.encode()
    return meta


def cmd_image_write(args):
    st = _open_store(args)
    meta = _parse_meta(args.meta)
    src, size, close = _open_input(args.file)
    progress = _progress(args, f"writing {args.id}", size)
    try:
        img, result = st.write_image(args.store, args.parent, args.id, src, metadata=meta,
                                     expected_sum=args.sum, progress=progress)
    finally:
        progress.done()
        if close:
            src.close()
    print(f"{img.id} {result.digest}")


def _refs(st, store):
    from .oci.refs import RefStore
    by_image = {}
    for ref in RefStore(st, store).list():
        by_image.setdefault(ref.image, []).append(ref.name)
    return by_image


def cmd_image_ls(args):
    st = _open_store(args)
    images = st.list_images(args.store, include_scratch=True)
    refs = _refs(st, args.store)
    rows = [{"id": img.id, "parent": img.parent, "size": st.layer_usage(args.store, img.id),
             "refs": refs.get(img.id, [])} for img in images]
    if args.quiet_ids:
        _emit(args, [r["id"] for r in rows], [r["id"] for r in rows])
        return
    lines = _table(("ID", "PARENT", "SIZE", "REFS"),
                   [(r["id"], r["parent"] or "-", human(r["size"]), ",".join(r["refs"]) or "-") for r in rows],
                   right={2})
    _emit(args, rows, lines)


def _image_facts(st, store, image_id):
    img = st.get_image(store, image_id)
    return {"id": img.id, "store": img.store, "parent": img.parent,
            "ancestors": st.ancestors(store, image_id), "children": st.children(store, image_id),
            "metadata": sorted(img.metadata_keys), "usage": st.layer_usage(store, image_id),
            "url": st.url(store, image_id), "disk": st.datastore_path(store, image_id),
            **_disk_format(st, store, image_id),
            "owners": st.owners(store, image_id), "refs": _refs(st, store).get(image_id, [])}


def _disk_format(st, store, image_id):
    disk = st.layer_disk(store, image_id)
    return {"format": disk.create_type, "extents": list(disk.extent_files)}


def cmd_image_info(args):
    st = _open_store(args)
    facts = _image_facts(st, args.store, _image_id(st, args.store, args.id))
    _emit(args, facts, [f"{k + ':':<11} {_show(v)}" for k, v in facts.items()])


def _show(value):
    if isinstance(value, list):
        value = " ".join(value)
    return "-" if value in (None, "") else value


def _image_id(st, store, text):
    """An image ID, or the image a reference names."""
    from .oci.refs import RefStore
    return RefStore(st, store).resolve(text).image


def cmd_image_meta(args):
    st = _open_store(args)
    meta = st.metadata(args.store, _image_id(st, args.store, args.id))
    if args.key is None:
        _emit(args, sorted(meta), sorted(meta))
        return
    if args.key not in meta:
        raise errors.NotFound(f"image {args.id} has no metadata key {args.key}")
    sys.stdout.buffer.write(meta[args.key])


def cmd_image_rm(args):
    st = _open_store(args)
    if args.branch:
        for image_id in st.delete_branch(args.store, args.id, keep=_refs(st, args.store)):
            print(image_id)
    else:
        st.delete_image(args.store, args.id)


def cmd_image_load(args):
    from .oci.load import load
    st = _open_store(args)
    loaded = load(st, args.store, args.src, tags=args.tag or (), name=args.name, platform=args.platform,
                  progress=_progress(args))
    rows = [{"image": x.image, "refs": x.names, "layers": x.layers, "written": x.written} for x in loaded]
    _emit(args, rows, [f"{x.image} {' '.join(x.names) or '-'} ({x.written} of {len(x.layers)} layers written)"
                       for x in loaded])


def cmd_image_save(args):
    from .oci.save import save
    st = _open_store(args)
    digest = save(st, args.store, args.ref, args.output, fmt=args.format, progress=_progress(args))
    print(digest)


def cmd_image_tag(args):
    from .oci.refs import RefStore
    st = _open_store(args)
    refs = RefStore(st, args.store)
    print(refs.tag(refs.resolve(args.image).image, args.ref).name)


def cmd_image_untag(args):
    from .oci.refs import RefStore
    RefStore(_open_store(args), args.store).untag(args.ref)


# --- export -------------------------------------------------------------------------------------
def _filter_spec(args):
    from .export.filterspec import FilterSpec
    if not (args.include or args.exclude or args.rebase or args.strip):
        return None
    return FilterSpec(inclusions=set(args.include or ()), exclusions=set(args.exclude or ()),
                      rebase=args.rebase or "", strip=args.strip or "")


def _write_stream(args, chunks, label):
    """Write a tar stream to -o FILE (atomically: FILE.part renamed when complete) or stdout."""
    output = args.output
    progress = _progress(args, label)
    try:
        if output in (None, "-"):
            if sys.stdout.isatty():
                raise InvalidInput("refusing to write a tar to a terminal: use -o FILE or redirect stdout")
            out = sys.stdout.buffer
            for chunk in chunks:
                out.write(chunk)
                progress.update(len(chunk))
            out.flush()
            return
        tmp = f"{output}.part"
        try:
            with open(tmp, "wb") as out:
                for chunk in chunks:
                    out.write(chunk)
                    progress.update(len(chunk))
            os.replace(tmp, output)
        except OSError as e:
            raise ImageFSError(f"{output}: {e.strerror or e}") from None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    finally:
        progress.done()


def cmd_export(args):
    from .export import export_diff
    st = _open_store(args)
    new = st.tree(args.store, _image_id(st, args.store, args.id))
    old = st.tree(args.store, _image_id(st, args.store, args.ancestor)) if args.ancestor else None
    _write_stream(args, export_diff(new, old, spec=_filter_spec(args), data=not args.no_data), f"exporting {args.id}")


# --- containers ---------------------------------------------------------------------------------
def cmd_container_join(args):
    st = _open_store(args)
    c = st.join(args.store, _image_id(st, args.store, args.image), args.id, vm=args.vm, repo=args.repo)
    print(c.disk)


def cmd_container_detach(args):
    _open_store(args).detach(args.id, args.vm, destroy=args.destroy)


def cmd_container_ls(args):
    rows = [{"id": c.id, "store": c.store, "image": c.image, "disk": c.disk, "vm": c.vm, "repo": c.repo}
            for c in _open_store(args).list_containers()]
    _emit(args, rows, [f"{r['id']} {r['store']}/{r['image']}" + (f" vm={r['vm']}" if r["vm"] else "")
                       + (f" repo={r['repo']}" if r["repo"] else "") for r in rows])


def cmd_container_rm(args):
    _open_store(args).remove_container(args.id)


def cmd_container_cp(args):
    st = _open_store(args)
    src, size, close = _open_input(args.file)
    progress = _progress(args, f"copying into {args.id}", size)

    class Counting:                  # progress as the bytes are read
        def read(self, n=-1):
            data = src.read(n)
            progress.update(len(data))
            return data

    try:
        stats = st.container_import(args.id, Counting(), spec=_filter_spec(args))
    finally:
        progress.done()
        if close:
            src.close()
    print(f"{stats.entries} entries")


def cmd_container_export(args):
    st = _open_store(args)
    _write_stream(args, st.container_export(args.id, changes=args.changes, spec=_filter_spec(args),
                                            data=not args.no_data), f"exporting {args.id}")


# --- mounts -------------------------------------------------------------------------------------
def cmd_mount(args):
    from .fuse.mount import mount
    if args.mountpoint is None:
        args.datastore_pos, args.mountpoint = None, args.datastore_pos
    args.datastore = args.datastore_pos or args.datastore
    datastore = _datastore_spec(args)
    options = [o for opt in (args.options or []) for o in opt.split(",") if o]
    for key, value in datastore_options(args).items():
        if value is not None:
            options.append(key if value is True else f"{key}={value}")
    return mount(datastore, args.mountpoint, foreground=args.foreground, options=options)


def cmd_umount(args):
    from .fuse.mount import umount
    return umount(args.mountpoint, lazy=args.lazy)


def cmd_status(args):
    from .fuse.mount import active_mounts
    rows = active_mounts()
    lines = _table(("MOUNTPOINT", "DATASTORE", "PID", "STATE"),
                   [(m["mountpoint"], m["datastore"], m["pid"] or "-", m["state"]) for m in rows], right={2})
    _emit(args, rows, lines)


def cmd_version(args):
    info = versions()
    _emit(args, info, [f"{k} {v}" for k, v in info.items()])


def versions():
    import ctypes
    from importlib import metadata

    def dist(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    try:
        lib = ctypes.CDLL("libfuse3.so.3")
        lib.fuse_pkgversion.restype = ctypes.c_char_p
        libfuse = lib.fuse_pkgversion().decode()
    except (OSError, AttributeError):
        libfuse = "not found"
    return {"imagefs": dist("imagefs"), "libfuse": libfuse, "pyfuse3": dist("pyfuse3"), "trio": dist("trio"),
            "pyvmomi": dist("pyvmomi"), "python": sys.version.split()[0]}


def cmd_completion(args):
    from .completion import bash_completion
    sys.stdout.write(bash_completion(build_parser()))


def cmd_install_helpers(args):
    from .fuse.helper import install_helpers
    for path in install_helpers(args.dir):
        print(path)


# --- the parser ---------------------------------------------------------------------------------
class _Once(argparse.Action):
    """An option that may be given once (a second --rebase is an error, not a silent override)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest, None) is not None:
            parser.error(f"{option_string} can be given only once")
        setattr(namespace, self.dest, values)


def _add_filter_flags(p):
    p.add_argument("--include", action="append", metavar="PATH", help="keep PATH even under an exclusion")
    p.add_argument("--exclude", action="append", metavar="PATH", help="leave PATH (and below) out")
    p.add_argument("--rebase", action=_Once, metavar="PATH", help="prefix every name with PATH (once)")
    p.add_argument("--strip", action=_Once, metavar="PATH", help="remove PATH from the front of every name (once)")


def _json_flag(p):
    p.add_argument("--json", action="store_true", help="print JSON")


def build_parser():
    p = argparse.ArgumentParser(prog="imagefs", description="Layered container image stores on VMDK disks.")
    p.add_argument("--datastore", metavar="PATH|URL",
                   help="datastore directory or vsphere://USER@HOST[:PORT]/DATACENTER/DATASTORE[/PATH] "
                        "(default $IMAGEFS_DATASTORE or ~/.local/share/imagefs)")
    p.add_argument("--password-file", metavar="FILE",
                   help="vSphere password file (else $IMAGEFS_VSPHERE_PASSWORD, else a prompt)")
    p.add_argument("--ca-file", metavar="FILE", help="a CA to trust for vSphere TLS ($IMAGEFS_VSPHERE_CA_FILE)")
    p.add_argument("--insecure", action="store_true",
                   help="do not verify the vSphere TLS certificate ($IMAGEFS_VSPHERE_INSECURE=1)")
    p.add_argument("--cache-size", metavar="SIZE", help="local cache of vSphere layer blocks (default 4GiB)")
    p.add_argument("-v", "--verbose", action="store_true", help="log what happens on stderr")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.add_argument("--version", action="store_true", help="versions of imagefs, libfuse, pyfuse3, trio, pyvmomi")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    store = sub.add_parser("store", help="image stores").add_subparsers(dest="sub", required=True, metavar="SUB")
    c = store.add_parser("create", help="create a store with its scratch image (and the datastore)")
    c.add_argument("name")
    c.add_argument("--capacity", default="8GB", help="scratch disk capacity (default 8GB)")
    c.add_argument("--disk-format", choices=["monolithicSparse", "vmfsSparse", "seSparse"],
                   help="createType of the store's layers (default: the datastore's; monolithicSparse "
                        "locally); vmfsSparse and seSparse are ESXi delta formats")
    c.set_defaults(func=cmd_store_create)
    c = store.add_parser("ls", help="list stores")
    _json_flag(c)
    c.set_defaults(func=cmd_store_ls)
    c = store.add_parser("rm", help="delete a store")
    c.add_argument("name")
    c.add_argument("--force", action="store_true", help="also delete the images it holds")
    c.set_defaults(func=cmd_store_rm)
    c = store.add_parser("usage", help="bytes of layer disks in a store (scratch excluded)")
    c.add_argument("name")
    _json_flag(c)
    c.set_defaults(func=cmd_store_usage)
    c = store.add_parser("check", help="verify every image; list broken images and leftovers (exit 1 if any)")
    c.add_argument("name")
    c.add_argument("--repair", action="store_true", help="remove what is provably debris of killed writers")
    _json_flag(c)
    c.add_argument("--no-data", action="store_true", help="read the trees' metadata but not the file data")
    c.set_defaults(func=cmd_store_check)

    image = sub.add_parser("image", help="images").add_subparsers(dest="sub", required=True, metavar="SUB")
    c = image.add_parser("write", help="write a layer from a tar (plain, gzip, bzip2, xz or zstd)")
    c.add_argument("store")
    c.add_argument("parent")
    c.add_argument("id")
    c.add_argument("file", nargs="?", help="tar file, or - for stdin (default)")
    c.add_argument("--meta", action="append", metavar="KEY=VALUE|KEY=@FILE")
    c.add_argument("--sum", metavar="sha256:HEX", help="expected sha256 of the bytes read")
    c.add_argument("--writer", choices=["kernel", "fuse2fs"], help="how the layer's ext4 is mounted for writing")
    c.set_defaults(func=cmd_image_write)
    c = image.add_parser("ls", help="list images with their references")
    c.add_argument("store")
    c.add_argument("-q", "--quiet", dest="quiet_ids", action="store_true", help="IDs only")
    _json_flag(c)
    c.set_defaults(func=cmd_image_ls)
    c = image.add_parser("info", help="parent, metadata keys, usage, URL, owners, references")
    c.add_argument("store")
    c.add_argument("id", help="image ID or reference")
    _json_flag(c)
    c.set_defaults(func=cmd_image_info)
    c = image.add_parser("meta", help="list metadata keys, or print one value")
    c.add_argument("store")
    c.add_argument("id")
    c.add_argument("key", nargs="?")
    _json_flag(c)
    c.set_defaults(func=cmd_image_meta)
    c = image.add_parser("rm", help="delete an image")
    c.add_argument("store")
    c.add_argument("id")
    c.add_argument("--branch", action="store_true", help="also delete ancestors that become unused")
    c.set_defaults(func=cmd_image_rm)
    c = image.add_parser("load", help="load a docker save archive, OCI layout or OCI archive")
    c.add_argument("store")
    c.add_argument("src", help="docker save archive, OCI layout directory or OCI archive")
    c.add_argument("--tag", action="append", metavar="NAME:TAG", help="also name the image so (repeatable)")
    c.add_argument("--name", help="NAME for references the source gives as a bare tag (default: SRC's name)")
    c.add_argument("--platform", metavar="OS/ARCH[/VARIANT]",
                   help="the platform to take from a multi-platform image (default: this host's)")
    _json_flag(c)
    c.set_defaults(func=cmd_image_load)
    c = image.add_parser("save", help="save an image as an OCI layout/archive or a docker archive")
    c.add_argument("store")
    c.add_argument("ref", help="reference (NAME:TAG) or image ID")
    c.add_argument("-o", "--output", required=True, metavar="PATH",
                   help="OCI: a layout directory, or an archive if PATH ends in .tar; docker-archive: a file")
    c.add_argument("--format", choices=["oci", "docker-archive"], default="oci")
    c.set_defaults(func=cmd_image_save)
    c = image.add_parser("tag", help="name an image NAME:TAG")
    c.add_argument("store")
    c.add_argument("image", help="image ID or reference")
    c.add_argument("ref", metavar="NAME[:TAG]")
    c.set_defaults(func=cmd_image_tag)
    c = image.add_parser("untag", help="remove a reference")
    c.add_argument("store")
    c.add_argument("ref", metavar="NAME[:TAG]")
    c.set_defaults(func=cmd_image_untag)

    c = sub.add_parser("export", help="write the tar diff of an image against an ancestor")
    c.add_argument("store")
    c.add_argument("id", help="image ID or reference")
    c.add_argument("--ancestor", help="diff against this image (default: the whole image)")
    _add_filter_flags(c)
    c.add_argument("--no-data", action="store_true", help="headers only, tagged with change_type A/C/D")
    c.add_argument("-o", "--output", help="file to write (default stdout, never a terminal)")
    c.set_defaults(func=cmd_export)

    cont = sub.add_parser("container", help="container read-write layers").add_subparsers(
        dest="sub", required=True, metavar="SUB")
    c = cont.add_parser("join", help="create a container's read-write disk on an image")
    c.add_argument("store")
    c.add_argument("image")
    c.add_argument("id")
    c.add_argument("--vm", metavar="VM", help="vSphere: add the disk to this VM (ReconfigVM)")
    c.add_argument("--repo", metavar="NAME", help="repository name recorded with the join (with --vm)")
    c.set_defaults(func=cmd_container_join)
    c = cont.add_parser("detach", help="vSphere: take a joined container's disk off its VM")
    c.add_argument("id")
    c.add_argument("--vm", metavar="VM", required=True)
    c.add_argument("--destroy", action="store_true", help="also delete the disk (default: keep it)")
    c.set_defaults(func=cmd_container_detach)
    c = cont.add_parser("ls", help="list containers")
    _json_flag(c)
    c.set_defaults(func=cmd_container_ls)
    c = cont.add_parser("rm", help="delete a container's disk")
    c.add_argument("id")
    c.set_defaults(func=cmd_container_rm)
    c = cont.add_parser("cp", help="copy a tar's files into a container's disk (like docker cp)")
    c.add_argument("id")
    c.add_argument("file", nargs="?")
    _add_filter_flags(c)
    c.set_defaults(func=cmd_container_cp)
    c = cont.add_parser("export", help="tar of a container's tree (or its changes with --changes)")
    c.add_argument("id")
    c.add_argument("--changes", action="store_true", help="only what changed against its image")
    _add_filter_flags(c)
    c.add_argument("--no-data", action="store_true")
    c.add_argument("-o", "--output")
    c.set_defaults(func=cmd_container_export)

    c = sub.add_parser("mount", help="mount a datastore as a filesystem")
    c.add_argument("datastore_pos", metavar="DATASTORE", nargs="?")
    c.add_argument("mountpoint", metavar="MOUNTPOINT", nargs="?")
    c.add_argument("-f", "--foreground", action="store_true")
    c.add_argument("-o", dest="options", action="append", metavar="OPT[,OPT...]",
                   help="allow_other, ro, debug, suid, dev, ...")
    c.set_defaults(func=cmd_mount)
    c = sub.add_parser("umount", help="unmount (also a stale mount of a killed daemon)")
    c.add_argument("mountpoint")
    c.add_argument("-z", "--lazy", action="store_true")
    c.set_defaults(func=cmd_umount)
    c = sub.add_parser("status", help="active imagefs mounts and their daemons")
    _json_flag(c)
    c.set_defaults(func=cmd_status)
    c = sub.add_parser("version", help="versions of imagefs and what it runs on")
    _json_flag(c)
    c.set_defaults(func=cmd_version)
    c = sub.add_parser("completion", help="print the bash completion script")
    c.add_argument("shell", choices=["bash"], nargs="?", default="bash")
    c.set_defaults(func=cmd_completion)
    c = sub.add_parser("install-helpers", help="install the mount(8) helpers (mount.fuse.imagefs, mount.imagefs)")
    c.add_argument("--dir", default="/sbin", help="where mount(8) looks for helpers (default /sbin)")
    c.set_defaults(func=cmd_install_helpers)
    return p


class _Terminated(BaseException):
    """SIGTERM or SIGHUP (``timeout``, ``kill``, a closed terminal), raised where the main
    thread is, so every ``with`` and ``finally`` on the way out runs, as for Ctrl-C."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


def _terminate(signum, _frame):
    raise _Terminated(signum)


def _say(message):
    try:
        print(message, file=sys.stderr)
    except OSError:
        pass                                 # the terminal may be gone (SIGHUP)


def main(argv=None):
    previous = {sig: signal.signal(sig, _terminate) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        return _main(argv)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _main(argv):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        args.json = False
        return cmd_version(args) or 0
    if args.command is None:
        parser.error("a COMMAND is needed (imagefs --help lists them)")
    if args.command == "mount" and args.datastore_pos is None and args.mountpoint is None:
        parser.error("mount needs a MOUNTPOINT")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="imagefs: %(levelname)s: %(message)s")
    logging.getLogger("libarchive").setLevel(logging.WARNING)   # its INFO lines are not ours to show
    try:
        rc = args.func(args)
    except ImageFSError as e:
        print(f"imagefs: {e}", file=sys.stderr)
        return exit_code(e)
    except KeyboardInterrupt:
        _say("imagefs: interrupted")
        return EXIT_INTERRUPTED
    except _Terminated as t:
        _say(f"imagefs: stopped by {signal.Signals(t.signum).name}")
        return 128 + t.signum
    except BrokenPipeError:
        return EXIT_FAILED
    except OSError as e:
        print(f"imagefs: {e.filename + ': ' if e.filename else ''}{e.strerror or e}", file=sys.stderr)
        return EXIT_FAILED
    return rc or 0


if __name__ == "__main__":
    sys.exit(main())
