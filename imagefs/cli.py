"""The ``imagefs`` command line.

Every failure is one line on stderr (``imagefs: <reason>``) and a non-zero exit:
1 for an imagefs error, 2 for bad usage, 128 + the signal number when interrupted
(Ctrl-C, SIGTERM, SIGHUP: all three unwind like an error, so nothing half-made is left).
"""
import argparse
import logging
import os
import signal
import sys
import time

from .errors import ImageFSError, InvalidInput

log = logging.getLogger("imagefs")


def _open_store(args):
    from .datastore import open_datastore
    from .store import ImageStore
    return ImageStore(open_datastore(args.datastore), writer_method=getattr(args, "writer", None))


def _human(n):
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


class Progress:
    """Bytes-received progress on a terminal; silent when stderr is not a tty."""

    def __init__(self, label, stream=sys.stderr):
        self.label, self.stream = label, stream
        self.enabled = stream.isatty()
        self.start = self.last = time.monotonic()

    def __call__(self, nbytes):
        now = time.monotonic()
        if self.enabled and now - self.last >= 0.2:
            self.last = now
            rate = nbytes / max(now - self.start, 1e-6)
            self.stream.write(f"\r{self.label}: {_human(nbytes)} ({_human(rate)}/s)   ")
            self.stream.flush()

    def done(self):
        if self.enabled:
            self.stream.write("\r\033[K")
            self.stream.flush()


# --- store --------------------------------------------------------------------------------------
def cmd_store_create(args):
    st = _open_store(args)
    st.create_store(args.name, capacity=args.capacity)
    print(args.name)


def cmd_store_ls(args):
    for name in _open_store(args).list_stores():
        print(name)


def cmd_store_rm(args):
    _open_store(args).delete_store(args.name, force=args.force)


def cmd_store_usage(args):
    print(_open_store(args).usage(args.name))


def cmd_store_check(args):
    import json
    from .check import check_store
    from .datastore import open_datastore
    from .store import ImageStore
    st = ImageStore(open_datastore(args.datastore), recover=False)
    report = check_store(st, args.name, repair=args.repair, data=not args.no_data)
    if args.json:
        print(json.dumps(report.as_dict(), indent=1))
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
    progress = Progress(f"writing {args.id}")
    if args.file in (None, "-"):
        src, close = sys.stdin.buffer, False
    else:
        try:
            src, close = open(args.file, "rb"), True
        except OSError as e:
            raise InvalidInput(f"{args.file}: {e.strerror}") from None
    try:
        img, result = st.write_image(args.store, args.parent, args.id, src, metadata=meta,
                                     expected_sum=args.sum, progress=progress)
    finally:
        progress.done()
        if close:
            src.close()
    print(f"{img.id} {result.digest}")


def cmd_image_ls(args):
    st = _open_store(args)
    images = st.list_images(args.store, include_scratch=True)
    if args.quiet:
        for img in images:
            print(img.id)
        return
    print(f"{'ID':<40} {'PARENT':<40} {'SIZE':>10}")
    for img in images:
        print(f"{img.id:<40} {img.parent or '-':<40} {_human(st.layer_usage(args.store, img.id)):>10}")


def cmd_image_info(args):
    st = _open_store(args)
    img = st.get_image(args.store, args.id)
    print(f"id:         {img.id}")
    print(f"store:      {img.store}")
    print(f"parent:     {img.parent or '-'}")
    print(f"ancestors:  {' '.join(st.ancestors(args.store, args.id)) or '-'}")
    print(f"children:   {' '.join(st.children(args.store, args.id)) or '-'}")
    print(f"metadata:   {' '.join(img.metadata_keys) or '-'}")
    print(f"usage:      {st.layer_usage(args.store, args.id)}")
    print(f"url:        {st.url(args.store, args.id)}")
    print(f"disk:       {st.datastore_path(args.store, args.id)}")
    print(f"owners:     {' '.join(st.owners(args.store, args.id)) or '-'}")


def cmd_image_meta(args):
    st = _open_store(args)
    meta = st.metadata(args.store, args.id)
    if args.key is None:
        for key in sorted(meta):
            print(key)
        return
    if args.key not in meta:
        raise ImageFSError(f"image {args.id} has no metadata key {args.key}")
    sys.stdout.buffer.write(meta[args.key])


def cmd_image_rm(args):
    st = _open_store(args)
    if args.branch:
        for image_id in st.delete_branch(args.store, args.id):
            print(image_id)
    else:
        st.delete_image(args.store, args.id)


# --- export -------------------------------------------------------------------------------------
def _filter_spec(args):
    from .export.filterspec import FilterSpec
    if not (args.include or args.exclude or args.rebase or args.strip):
        return None
    return FilterSpec(inclusions=set(args.include or ()), exclusions=set(args.exclude or ()),
                      rebase=args.rebase or "", strip=args.strip or "")


def _write_stream(chunks, output):
    if output in (None, "-"):
        out = sys.stdout.buffer
        for chunk in chunks:
            out.write(chunk)
        out.flush()
        return
    tmp = f"{output}.part"
    try:
        with open(tmp, "wb") as out:
            for chunk in chunks:
                out.write(chunk)
        os.replace(tmp, output)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def cmd_export(args):
    from .export import export_diff
    st = _open_store(args)
    new = st.tree(args.store, args.id)
    old = st.tree(args.store, args.ancestor) if args.ancestor else None
    _write_stream(export_diff(new, old, spec=_filter_spec(args), data=not args.no_data), args.output)


# --- containers ---------------------------------------------------------------------------------
def cmd_container_join(args):
    c = _open_store(args).join(args.store, args.image, args.id)
    print(c.disk)


def cmd_container_ls(args):
    for c in _open_store(args).list_containers():
        print(f"{c.id} {c.store}/{c.image}")


def cmd_container_rm(args):
    _open_store(args).remove_container(args.id)


def cmd_container_import(args):
    st = _open_store(args)
    if args.file in (None, "-"):
        stats = st.container_import(args.id, sys.stdin.buffer, spec=_filter_spec(args))
    else:
        with open(args.file, "rb") as src:
            stats = st.container_import(args.id, src, spec=_filter_spec(args))
    print(f"{stats.entries} entries")


def cmd_container_export(args):
    st = _open_store(args)
    _write_stream(st.container_export(args.id, changes=args.changes, spec=_filter_spec(args),
                                      data=not args.no_data), args.output)


# --- mount --------------------------------------------------------------------------------------
def cmd_mount(args):
    from .fuse.mount import mount
    if args.mountpoint is None:
        args.datastore_pos, args.mountpoint = None, args.datastore_pos
    datastore = args.datastore_pos or args.datastore
    if datastore is None:
        from .datastore.base import default_datastore_path
        datastore = default_datastore_path()
    options = [o for opt in (args.options or []) for o in opt.split(",") if o]
    return mount(datastore, args.mountpoint, foreground=args.foreground, options=options)


def cmd_umount(args):
    from .fuse.mount import umount
    return umount(args.mountpoint, lazy=args.lazy)


def _add_filter_flags(p):
    p.add_argument("--include", action="append", metavar="PATH", help="keep PATH even under an exclusion")
    p.add_argument("--exclude", action="append", metavar="PATH", help="leave PATH (and below) out")
    p.add_argument("--rebase", metavar="PATH", help="prefix every name with PATH")
    p.add_argument("--strip", metavar="PATH", help="remove PATH from the front of every name")


def build_parser():
    p = argparse.ArgumentParser(prog="imagefs", description="Layered container image stores on VMDK disks.")
    p.add_argument("--datastore", metavar="PATH",
                   help="datastore directory (default $IMAGEFS_DATASTORE or ~/.local/share/imagefs)")
    p.add_argument("-v", "--verbose", action="store_true", help="log what happens on stderr")
    sub = p.add_subparsers(dest="command", required=True)

    store = sub.add_parser("store", help="image stores").add_subparsers(dest="sub", required=True)
    c = store.add_parser("create", help="create a store with its scratch image")
    c.add_argument("name")
    c.add_argument("--capacity", default="8GB", help="scratch disk capacity (default 8GB)")
    c.set_defaults(func=cmd_store_create)
    store.add_parser("ls", help="list stores").set_defaults(func=cmd_store_ls)
    c = store.add_parser("rm", help="delete a store")
    c.add_argument("name")
    c.add_argument("--force", action="store_true", help="also delete the images it holds")
    c.set_defaults(func=cmd_store_rm)
    c = store.add_parser("usage", help="bytes of layer disks in a store (scratch excluded)")
    c.add_argument("name")
    c.set_defaults(func=cmd_store_usage)
    c = store.add_parser("check", help="verify every image; list broken images and leftovers (exit 1 if any)")
    c.add_argument("name")
    c.add_argument("--repair", action="store_true", help="remove what is provably debris of killed writers")
    c.add_argument("--json", action="store_true", help="the report as JSON")
    c.add_argument("--no-data", action="store_true", help="read the trees' metadata but not the file data")
    c.set_defaults(func=cmd_store_check)

    image = sub.add_parser("image", help="images").add_subparsers(dest="sub", required=True)
    c = image.add_parser("write", help="write a layer from a tar (plain, gzip, bzip2, xz or zstd)")
    c.add_argument("store")
    c.add_argument("parent")
    c.add_argument("id")
    c.add_argument("file", nargs="?", help="tar file, or - for stdin (default)")
    c.add_argument("--meta", action="append", metavar="KEY=VALUE|KEY=@FILE")
    c.add_argument("--sum", metavar="sha256:HEX", help="expected sha256 of the bytes read")
    c.add_argument("--writer", choices=["kernel", "fuse2fs"], help="how the layer's ext4 is mounted for writing")
    c.set_defaults(func=cmd_image_write)
    c = image.add_parser("ls", help="list images")
    c.add_argument("store")
    c.add_argument("-q", "--quiet", action="store_true", help="IDs only")
    c.set_defaults(func=cmd_image_ls)
    c = image.add_parser("info", help="parent, metadata keys, usage, URL, owners")
    c.add_argument("store")
    c.add_argument("id")
    c.set_defaults(func=cmd_image_info)
    c = image.add_parser("meta", help="list metadata keys, or print one value")
    c.add_argument("store")
    c.add_argument("id")
    c.add_argument("key", nargs="?")
    c.set_defaults(func=cmd_image_meta)
    c = image.add_parser("rm", help="delete an image")
    c.add_argument("store")
    c.add_argument("id")
    c.add_argument("--branch", action="store_true", help="also delete ancestors that become unused")
    c.set_defaults(func=cmd_image_rm)

    c = sub.add_parser("export", help="write the tar diff of an image against an ancestor")
    c.add_argument("store")
    c.add_argument("id")
    c.add_argument("--ancestor", help="diff against this image (default: the whole image)")
    _add_filter_flags(c)
    c.add_argument("--no-data", action="store_true", help="headers only, tagged with change_type A/C/D")
    c.add_argument("-o", "--output", help="file to write (default stdout)")
    c.set_defaults(func=cmd_export)

    cont = sub.add_parser("container", help="container read-write layers").add_subparsers(dest="sub", required=True)
    c = cont.add_parser("join", help="create a container's read-write disk on an image")
    c.add_argument("store")
    c.add_argument("image")
    c.add_argument("id")
    c.set_defaults(func=cmd_container_join)
    cont.add_parser("ls", help="list containers").set_defaults(func=cmd_container_ls)
    c = cont.add_parser("rm", help="delete a container's disk")
    c.add_argument("id")
    c.set_defaults(func=cmd_container_rm)
    c = cont.add_parser("import", help="copy a tar into a container's disk (like docker cp)")
    c.add_argument("id")
    c.add_argument("file", nargs="?")
    _add_filter_flags(c)
    c.set_defaults(func=cmd_container_import)
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
    if args.command == "mount" and args.datastore_pos is None and args.mountpoint is None:
        parser.error("mount needs a MOUNTPOINT")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="imagefs: %(levelname)s: %(message)s")
    try:
        rc = args.func(args)
    except ImageFSError as e:
        print(f"imagefs: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        _say("imagefs: interrupted")
        return 128 + signal.SIGINT
    except _Terminated as t:
        _say(f"imagefs: stopped by {signal.Signals(t.signum).name}")
        return 128 + t.signum
    except BrokenPipeError:
        return 1
    except OSError as e:
        print(f"imagefs: {e.filename + ': ' if e.filename else ''}{e.strerror or e}", file=sys.stderr)
        return 1
    return rc or 0


if __name__ == "__main__":
    sys.exit(main())
