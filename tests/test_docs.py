"""The documented examples run as written: docs/cli.md's shell blocks (bash and dash, in order,
in an empty directory), its systemd unit, the completion script and docs/api.md's Python."""
import os
import re
import subprocess
import sys
import time

import pytest

DOCS = os.path.join(os.path.dirname(__file__), "..", "docs")
VENV_BIN = os.path.dirname(sys.executable)


def blocks(doc, lang):
    with open(os.path.join(DOCS, doc)) as f:
        return re.findall(rf"```{lang}\n(.*?)```", f.read(), re.S)


def env():
    return dict(os.environ, PATH=f"{VENV_BIN}:{os.environ['PATH']}")


@pytest.mark.parametrize("shell", ["bash", "dash"])
def test_cli_md_examples_run_as_written(tmp_path, shell):
    script = "set -e\n" + "\n".join(blocks("cli.md", "sh"))
    proc = subprocess.run([shell, "-c", script], cwd=tmp_path, env=env(), capture_output=True, text=True)
    try:
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "exit 3" in proc.stdout
        assert "imagefs " in proc.stdout and "libfuse " in proc.stdout
    finally:
        if os.path.ismount(tmp_path / "mnt"):
            subprocess.run(["fusermount3", "-u", "-z", str(tmp_path / "mnt")])


def test_systemd_unit_commands(tmp_path):
    (unit,) = blocks("cli.md", "ini")
    ds, mnt = tmp_path / "ds", tmp_path / "mnt"
    subprocess.run([sys.executable, "-m", "imagefs", "--datastore", str(ds), "store", "create", "s",
                    "--capacity", "256MiB"], check=True)

    def command(key):
        line = re.search(rf"^{key}=(.*)$", unit, re.M).group(1)
        line = line.replace("/opt/imagefs/.venv/bin/imagefs", os.path.join(VENV_BIN, "imagefs"))
        return line.replace("/var/lib/imagefs", str(ds)).replace("/mnt/images", str(mnt)).split()

    subprocess.run(command("ExecStartPre"), check=True)
    daemon = subprocess.Popen(command("ExecStart"), stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(100):
            if os.path.isdir(mnt / "s"):
                break
            time.sleep(0.1)
        assert os.listdir(mnt / "s" / "images") == ["scratch"]
        assert subprocess.run(command("ExecStop")).returncode == 0
        assert daemon.wait(timeout=30) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)])


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


def test_api_md_example(tmp_path):
    (code,) = blocks("api.md", "python")
    code = code.replace("/tmp/api-example", str(tmp_path / "ds"))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "['hello.txt']\n"
