"""Every example in README.md and docs/*.md runs as written, under bash and under dash.

How a doc's fenced blocks are treated is said by their info string (the words after
the opening ```); a block without one, or with one not listed here, fails
``test_every_block_is_marked``:

  ```sh             Runs. All runnable blocks of a doc run in order as one session
                    (``set -e``: any failing command fails the doc), once under bash and
                    once under dash. Show an expected failure as ``cmd || echo ...``.
  ```python         Runs with the venv's python3, at its place in the session.
  ```text           Not a command: layouts, synopses, grammars, output samples that vary.
  ```text output    The exact stdout of the runnable block just before it: checked.
  ```fstab          fstab lines: the session's /etc/fstab becomes them, ``mount -a`` runs
                    twice, and each line's mountpoint must then be mounted exactly once
                    (through the helpers an earlier ``imagefs install-helpers`` put in /sbin).
  ```ini systemd    A systemd unit (its first line ``# /path/of/the.service``): written
                    there, checked by ``systemd-analyze verify``, then its ExecStartPre,
                    ExecStart (in the background) and ExecStop run as written; ExecStart
                    must mount, and exit 0 after ExecStop.
  ```sh vsphere     Runs against the vSphere simulator (tests/vsphere_sim.py) in a subshell
                    whose IMAGEFS_DATASTORE, IMAGEFS_VSPHERE_PASSWORD and
                    IMAGEFS_VSPHERE_CA_FILE point at it: write such examples in terms of
                    $IMAGEFS_DATASTORE (examples naming a real vCenter are ``text``).
  ```sh long        Campaigns and benchmarks that take minutes: each command starts as
                    written and must not fail within its first 3 seconds; then it gets
                    SIGINT, SIGKILL 10 s later (what it leaves dies with the sandbox).
  ```sh ci          What CI runs (the suite itself): each command must be one of .ci/run's.

An HTML comment ``<!-- doc-test`` ... ``-->`` on lines of its own holds shell lines
that run at that place without being shown: only for state the prose says the reader
has (prefer a visible block).

Where: the sandbox of tests/doc_sandbox.py (absolute paths as written: /var/lib/imagefs,
/mnt/images, /etc/fstab, /sbin, /opt/imagefs, /tmp all work and touch nothing outside).
Every doc runs from the checkout's root (commands such as ./scripts/quickstart.sh or
bench/... are relative to it; what they write lands in the sandbox). README.md starts
from nothing (its quick start installs and activates the venv); docs/*.md run with
the venv's bin first on PATH, as after the quick start's ``. .venv/bin/activate``.
"""
import glob
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass

import pytest

from doc_sandbox import CHECKOUT, run_sandboxed

VENV_BIN = os.path.dirname(sys.executable)
DOCS = ["README.md"] + sorted(os.path.relpath(p, CHECKOUT) for p in glob.glob(os.path.join(CHECKOUT, "docs", "*.md")))
RUNNABLE = {"sh", "python", "text output", "fstab", "ini systemd", "sh vsphere", "sh long"}
KINDS = RUNNABLE | {"text", "sh ci"}
LONG_SECONDS = 3
OUT = "/tmp/doc-test-out"          # the runner's own files, outside the doc's working directory


@dataclass
class Block:
    doc: str
    line: int
    kind: str                       # the info string, or "hidden" for a <!-- doc-test --> comment
    text: str

    @property
    def where(self):
        return f"{self.doc}:{self.line}"


def blocks(doc):
    lines = open(os.path.join(CHECKOUT, doc)).read().split("\n")
    out, i = [], 0
    while i < len(lines):
        fence = re.match(r"( *)```(.*)$", lines[i])
        hidden = lines[i].strip() == "<!-- doc-test"
        if fence or hidden:
            indent = len(fence.group(1)) if fence else 0
            end = i + 1
            while end < len(lines) and not (lines[end].strip().startswith("```") if fence else lines[end].strip() == "-->"):
                end += 1
            body = "".join(line[indent:] + "\n" for line in lines[i + 1:end])
            out.append(Block(doc, i + 1, " ".join(fence.group(2).split()) if fence else "hidden", body))
            i = end
        i += 1
    return out


def test_every_block_is_marked():
    unmarked = [f"{b.where}: ```{b.kind}" for doc in DOCS for b in blocks(doc) if b.kind not in KINDS | {"hidden"}]
    assert not unmarked, "blocks without a known info string (see this file's docstring):\n" + "\n".join(unmarked)


def test_ci_blocks_are_what_ci_runs():
    ci = [line.split(None, 1)[1] if line.startswith("exec ") else line
          for line in open(os.path.join(CHECKOUT, ".ci", "run")).read().splitlines()
          if line and not line.startswith(("#", "set ", "cd "))]
    for doc in DOCS:
        for b in blocks(doc):
            if b.kind == "sh ci":
                for cmd in _commands(b.text):
                    for part in cmd.split("&&"):
                        assert part.strip() in ci, f"{b.where}: {part.strip()!r} is not run by .ci/run"


def _commands(text):
    """The commands of a block: comments dropped, continuation lines joined."""
    joined = re.sub(r"\\\n", " ", text)
    return [c for c in (re.sub(r"(^|\s)#.*$", "", line).strip() for line in joined.splitlines()) if c]


def _heredoc(text, tag):
    return f"<<'{tag}'\n{text}{tag}\n"


def session(doc, shell):
    """The shell script that runs ``doc``'s examples in order, and whether it needs the simulator."""
    items = [b for b in blocks(doc) if b.kind in RUNNABLE | {"hidden"}]
    parts = [f"set -ex\nmkdir -p {OUT}\n"]
    needs_vsphere = False
    for n, b in enumerate(items):
        checked = n + 1 < len(items) and items[n + 1].kind == "text output"
        parts.append(f"\n: doc-test {b.where} {b.kind}\n")
        if b.kind in ("sh", "hidden"):
            code = b.text
        elif b.kind == "python":
            code = f"python3 - {_heredoc(b.text, 'DOC_TEST_PYTHON')}"
        elif b.kind == "text output":
            parts.append(f"cat > {OUT}/expected {_heredoc(b.text, 'DOC_TEST_OUTPUT')}"
                         f"diff -u {OUT}/expected {OUT}/out >&2\n")
            continue
        elif b.kind == "fstab":
            code = _fstab_check(b)
        elif b.kind == "ini systemd":
            code = _unit_check(b, shell)
        elif b.kind == "sh vsphere":
            needs_vsphere = True
            code = ("(\nprintf '%s\\n' \"$DOC_TEST_VSPHERE_CA\" > " + OUT + "/vsphere-ca.pem\n"
                    "export IMAGEFS_DATASTORE=\"$DOC_TEST_VSPHERE\" IMAGEFS_VSPHERE_PASSWORD=\"$DOC_TEST_VSPHERE_PASSWORD\" "
                    f"IMAGEFS_VSPHERE_CA_FILE={OUT}/vsphere-ca.pem\n{b.text})\n")
        elif b.kind == "sh long":
            code = "".join(_long_check(cmd, shell) for cmd in _commands(b.text))
        parts.append(f"{{\n{code}}} > {OUT}/out\ncat {OUT}/out\n" if checked else code)
    return "".join(parts), needs_vsphere


def _fstab_check(b):
    lines = [line.split() for line in b.text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    checks = "".join(f"[ \"$(awk '$5 == \"{fields[1]}\"' /proc/self/mountinfo | wc -l)\" -eq 1 ]\n" for fields in lines)
    return f"cat > /etc/fstab {_heredoc(b.text, 'DOC_TEST_FSTAB')}mount -a\nmount -a\n{checks}"


def _unit_check(b, shell):
    path = b.text.splitlines()[0].lstrip("# ").strip()
    assert path.startswith("/") and path.endswith(".service"), f"{b.where}: the unit's first line must name its file"

    def key(name):
        found = re.search(rf"^{name}=(.*)$", b.text, re.M)
        assert found, f"{b.where}: no {name}="
        return found.group(1)
    return (f"mkdir -p {os.path.dirname(path)}\ncat > {path} {_heredoc(b.text, 'DOC_TEST_UNIT')}"
            f"systemd-analyze verify {path}\n"
            f"{key('ExecStartPre')}\n"
            "_before=$(grep -c ' - fuse.imagefs ' /proc/self/mountinfo || true)\n"
            f"{key('ExecStart')} &\n_unit=$!\n"
            "_n=0; until [ \"$(grep -c ' - fuse.imagefs ' /proc/self/mountinfo)\" -gt \"$_before\" ]; do\n"
            "    _n=$((_n + 1)); [ $_n -lt 300 ]; sleep 0.1\ndone\n"
            f"{key('ExecStop')}\n"
            "wait $_unit\n")


def _long_check(cmd, shell):
    return (f"_rc=0; timeout -s INT -k 10 {LONG_SECONDS} {shell} -c {shlex.quote(cmd)} || _rc=$?\n"
            "[ $_rc -eq 0 ] || [ $_rc -eq 124 ] || [ $_rc -eq 137 ]\n")     # 124: interrupted, 137: killed later


def _env(doc):
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEFS_")}
    if doc != "README.md":
        env["PATH"] = f"{VENV_BIN}:{env['PATH']}"
    return env


RUN_DOCS = [d for d in DOCS if any(b.kind in RUNNABLE - {"text output"} for b in blocks(d))]


@pytest.mark.parametrize("shell", ["bash", "dash"])
@pytest.mark.parametrize("doc", RUN_DOCS)
def test_doc_examples_run_as_written(request, doc, shell):
    script, needs_vsphere = session(doc, shell)
    env = _env(doc)
    if needs_vsphere:
        env.update(_vsphere_env(request, shell))
    proc = run_sandboxed(script, shell, workdir=CHECKOUT, env=env)
    assert proc.returncode == 0, f"{doc} under {shell}:\n{proc.stderr[-4000:]}"


def _vsphere_env(request, shell):
    try:
        import vsphere_sim
    except ImportError:
        pytest.fail("docs have `sh vsphere` blocks but tests/vsphere_sim.py (the simulator) is missing")
    sim = request.getfixturevalue("vcsim")
    with open(sim.ca_file) as f:            # its file is in the host's /tmp, which the sandbox hides
        ca = f.read().strip()
    return {"DOC_TEST_VSPHERE": sim.url(f"doc-test-{os.getpid()}-{shell}"),
            "DOC_TEST_VSPHERE_PASSWORD": vsphere_sim.PASSWORD, "DOC_TEST_VSPHERE_CA": ca}


GOOD_DOC = """
<!-- doc-test
greeting=hello
-->
```sh
echo "$greeting"
```

```text output
hello
```

```sh long
sleep 30      # still running when interrupted
```

```python
print(2 + 2)
```

```text output
4
```

```text
not run: $(false)
```
"""
BAD_DOCS = {"a failing command": "```sh\nfalse\necho not reached\n```\n",
            "other output": "```sh\necho hi\n```\n\n```text output\nbye\n```\n",
            "a long command failing at once": "```sh long\nls /nonexistent\n```\n",
            "an fstab line that does not mount": "```fstab\n/nonexistent /mnt/x fuse.imagefs nofail 0 0\n```\n"}


def test_the_runner_does_what_its_docstring_says(tmp_path):
    doc = tmp_path / "good.md"
    doc.write_text(GOOD_DOC)
    script, _ = session(str(doc), "dash")
    proc = run_sandboxed(script, "dash", env=_env("docs/x.md"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == "hello\n4\n"
    for what, text in BAD_DOCS.items():
        doc = tmp_path / "bad.md"
        doc.write_text(text)
        script, _ = session(str(doc), "dash")
        proc = run_sandboxed(script, "dash", env=_env("docs/x.md"))
        assert proc.returncode != 0 and "not reached" not in proc.stdout, what


def test_bash_completion(tmp_path):
    script = subprocess.run([sys.executable, "-m", "imagefs", "completion", "bash"], check=True,
                            capture_output=True, text=True).stdout
    (tmp_path / "c.bash").write_text(script)
    probe = (f". {tmp_path / 'c.bash'}\n"
             "COMP_WORDS=(imagefs ima); COMP_CWORD=1; _imagefs; echo \"1:${COMPREPLY[*]}\"\n"
             "COMP_WORDS=(imagefs image sa); COMP_CWORD=2; _imagefs; echo \"2:${COMPREPLY[*]}\"\n"
             "COMP_WORDS=(imagefs image save s r --fo); COMP_CWORD=5; _imagefs; echo \"3:${COMPREPLY[*]}\"\n")
    out = subprocess.run(["bash", "-c", probe], check=True, capture_output=True, text=True).stdout
    assert "1:image\n" in out and "2:save\n" in out and "3:--format\n" in out
