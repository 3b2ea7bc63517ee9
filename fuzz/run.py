"""Run the fuzz campaign: ``python -m fuzz.run [vmdk|ext4|tar|all] [options]``.

Engines: ``random`` (seeded, reproducible: failure I of seed S replays with
``--seed S --only I``) and ``atheris`` (coverage-guided over imagefs's code; a failing
input is saved and replays with ``--replay FILE``). Every execution runs under an alarm
(a hang is a failure) and the process under an address-space limit (an allocation sized
by an untrusted field fails with MemoryError, a failure too). A clear error, an
ImageFSError, is a good outcome: counted, not a failure.

Prints one line per target: executions, clear errors, failures, time. Exit 1 if anything
failed; each failure's input and traceback go to ``--crashes`` (default fuzz/crashes/).
"""
import argparse
import gc
import os
import resource
import shutil
import signal
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))


class Hang(BaseException):
    """An execution ran past its alarm (BaseException: no ``except Exception`` swallows it)."""


def _alarm(signum, frame):
    raise Hang("execution exceeded its time limit")


class Runner:
    def __init__(self, target, args):
        self.target = target
        self.args = args
        self.runs = self.failures = 0
        self.start = time.monotonic()

    def one(self, choices, label):
        signal.setitimer(signal.ITIMER_REAL, self.args.timeout)
        mutated = None
        try:
            mutated = self.target(choices)
        except (Exception, Hang) as e:     # noqa: B902 - every escape is a finding
            signal.setitimer(signal.ITIMER_REAL, 0)
            self.failures += 1
            self.save(label, e, getattr(e, "mutated", None) or mutated)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            self.runs += 1
            self.clean()
            mutated = None
            if self.failures:
                gc.collect()        # a failure's frames hold cycles (and maybe much memory)

    def clean(self):
        for name in os.listdir(self.target.work_dir):
            shutil.rmtree(os.path.join(self.target.work_dir, name), ignore_errors=True)

    def save(self, label, err, mutated):
        os.makedirs(self.args.crashes, exist_ok=True)
        base = os.path.join(self.args.crashes, f"{self.target.name}-{label}")
        with open(base + ".txt", "w") as f:
            f.write(f"target {self.target.name}, input {label}\n")
            f.write("".join(traceback.format_exception(err)))
        first = traceback.format_exception_only(err)[-1].strip()
        print(f"{self.target.name}: FAILURE at {label}: {first[:300]}", flush=True)

    def summary(self):
        took = time.monotonic() - self.start
        print(f"{self.target.name}: {self.runs} executions, {self.target.errors} clear errors, "
              f"{self.failures} failures ({took:.1f} s)", flush=True)


def run_random(target, args):
    from .choices import RandomChoices
    runner = Runner(target, args)
    indices = [args.only] if args.only is not None else range(args.runs or 10**12)
    deadline = time.monotonic() + args.seconds if args.seconds else None
    for i in indices:
        if deadline and time.monotonic() > deadline:
            break
        runner.one(RandomChoices(f"{target.name}:{args.seed}:{i}"), f"seed{args.seed}-{i}")
    runner.summary()
    return runner.failures


def run_atheris(target, args):
    import atheris
    from .choices import AtherisChoices
    runner = Runner(target, args)
    deadline = time.monotonic() + args.seconds if args.seconds else None

    def one_input(data):
        if (args.runs and runner.runs >= args.runs) or (deadline and time.monotonic() > deadline):
            runner.summary()
            sys.stdout.flush()
            os._exit(1 if runner.failures else 0)
        label = f"atheris-{runner.runs}"
        if runner.failures < 50:
            path = os.path.join(args.crashes, f"{target.name}-{label}.input")
            os.makedirs(args.crashes, exist_ok=True)
            runner.last_input = (path, data)
        before = runner.failures
        runner.one(AtherisChoices(atheris.FuzzedDataProvider(data)), label)
        if runner.failures > before:
            with open(runner.last_input[0], "wb") as f:
                f.write(data)
        if runner.runs % 1000 == 0:
            runner.summary()

    if args.replay:
        with open(args.replay, "rb") as f:
            one_input(f.read())
        runner.summary()
        return runner.failures
    atheris.Setup([sys.argv[0], "-max_len=4096", f"-seed={args.seed}", "-timeout=0", "-rss_limit_mb=0"],
                  one_input)
    atheris.Fuzz()
    return runner.failures


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m fuzz.run")
    p.add_argument("target", nargs="?", default="all", choices=["vmdk", "ext4", "tar", "all"])
    p.add_argument("--runs", type=int, help="executions per target")
    p.add_argument("--seconds", type=float, help="time per target")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--only", type=int, help="replay one input of the random engine")
    p.add_argument("--replay", help="replay one saved atheris input")
    p.add_argument("--engine", choices=["random", "atheris"], default="random")
    p.add_argument("--timeout", type=float, default=20.0, help="seconds one execution may take")
    p.add_argument("--memory-mb", type=int, default=3072, help="address-space limit of the process")
    p.add_argument("--cache", default=os.environ.get("IMAGEFS_FUZZ_CACHE", "/var/tmp/imagefs-fuzz"))
    p.add_argument("--crashes", default=os.path.join(HERE, "crashes"))
    args = p.parse_args(argv)
    if not (args.runs or args.seconds or args.only is not None or args.replay):
        args.runs = 200
    if args.engine == "atheris":
        import atheris
        with atheris.instrument_imports(include=["imagefs", "dissect"]):
            import imagefs.store, imagefs.tree, imagefs.export, imagefs.layer.extract  # noqa: F401, E401
    from .seeds import seeds
    from .targets import TARGETS
    import imagefs.layer.extract  # noqa: F401 - loads libarchive (and its large libraries) before the limit
    seed_dir = seeds(args.cache)        # before the memory limit: the tools need room
    resource.setrlimit(resource.RLIMIT_AS, (args.memory_mb << 20, resource.RLIM_INFINITY))
    signal.signal(signal.SIGALRM, _alarm)
    failures = 0
    names = sorted(TARGETS) if args.target == "all" else [args.target]
    with tempfile.TemporaryDirectory(prefix="imagefs-fuzz-", dir="/dev/shm" if os.path.isdir("/dev/shm")
                                     else None) as work:
        for name in names:
            target = TARGETS[name](seed_dir, work)
            failures += (run_atheris if args.engine == "atheris" else run_random)(target, args)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
