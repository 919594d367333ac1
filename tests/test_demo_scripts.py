"""`misc/run_demo.sh` and the Makefile targets, run with a stand-in interpreter instead of torch.

The stand-in records each step's arguments and the signals it receives, so these tests check
how the shell passes paths and signals on, in about a second each.
"""
import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

FAKE_STEP = """\
import json, os, signal, sys, time

def record(event):
    with open(os.environ["FAKE_STEP_LOG"], "a") as f:
        f.write(json.dumps({"pid": os.getpid(), "event": event, "argv": sys.argv[1:]}) + "\\n")

def stop(signal_number, frame):
    record(signal.Signals(signal_number).name)
    time.sleep(0.5)  # a real step first finishes its batch, so a second signal would arrive meanwhile
    sys.exit(128 + signal_number)

for signal_number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(signal_number, stop)
record("start")
time.sleep(float(os.environ.get("FAKE_STEP_SECONDS", "0")))
record("end")
"""


def _write_executable(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def _recording_shell_script(path: Path, name: str, calls: Path, body: str = "") -> Path:
    """Write a shell stand-in that appends `name` and its arguments to `calls`, then runs `body`."""
    return _write_executable(path, f'#!/bin/sh\necho "{name} $*" >> "{calls}"\n{body}')


def _fake_python(path: Path) -> Path:
    """Write an interpreter stand-in that runs FAKE_STEP whatever script it is given."""
    step = path.parent / "fake_step.py"
    step.parent.mkdir(parents=True, exist_ok=True)
    step.write_text(FAKE_STEP)
    return _write_executable(path, f'#!/bin/sh\nexec "{sys.executable}" "{step}" "$@"\n')


def _dataset(folder: Path) -> Path:
    """Make a dataset folder that passes the demo's checks. The stand-in never reads it."""
    (folder / "images").mkdir(parents=True)
    (folder / "train_paths.txt").write_text("a.jpg,0,0\n")
    (folder / "heldout_paths.txt").write_text("b.jpg,0,0\n")
    return folder


def _records(log: Path) -> list[dict]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines()]


def _wait_for_start(log: Path, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        starts = [r for r in _records(log) if r["event"] == "start"]
        if starts:
            return starts[0]
        time.sleep(0.05)
    raise AssertionError(f"no step started within {timeout} s")


def _is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize(
    "signal_name, whole_group",
    [
        ("SIGTERM", False),  # kill PID, or make passing on its own SIGTERM
        ("SIGINT", False),
        ("SIGHUP", False),
        ("SIGTERM", True),  # timeout(1) and kill -- -PGID
        ("SIGINT", True),  # Ctrl-C in a terminal
    ],
)
def test_run_demo_signal_stops_step(tmp_path, signal_name, whole_group):
    log = tmp_path / "steps.jsonl"
    env = {
        **os.environ,
        "PYTHON": str(_fake_python(tmp_path / "bin" / "python")),
        "DATA": str(_dataset(tmp_path / "data")),
        "OUT": str(tmp_path / "out"),
        "FAKE_STEP_LOG": str(log),
        "FAKE_STEP_SECONDS": "20",
    }
    signal_number = getattr(signal, signal_name)
    process = subprocess.Popen(
        ["bash", "misc/run_demo.sh"], cwd=REPO_ROOT, env=env, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        step = _wait_for_start(log)
        if whole_group:
            os.killpg(process.pid, signal_number)
        else:
            process.send_signal(signal_number)
        output, _ = process.communicate(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for record in _records(log):
            if _is_running(record["pid"]):
                os.kill(record["pid"], signal.SIGKILL)

    records = _records(log)
    received = [r["event"] for r in records if r["event"].startswith("SIG")]
    assert process.returncode == 128 + signal_number, output
    assert received == [signal_name], output
    assert not _is_running(step["pid"])
    assert [r["argv"][0] for r in records if r["event"] == "start"] == ["misc/convert_efficientnet_lite0.py"]


def _make(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    return subprocess.run(
        ["make", "-C", str(REPO_ROOT), *args], env=env, capture_output=True, text=True, timeout=60,
    )


def test_make_demo_paths_with_spaces(tmp_path):
    venv = tmp_path / "venv"
    _fake_python(venv / "bin" / "python")
    (venv / ".installed").touch()  # newer than the requirements files, so make installs nothing
    data = _dataset(tmp_path / "my data")
    out = tmp_path / "demo output"
    log = tmp_path / "steps.jsonl"

    result = _make(
        "demo", f"VENV={venv}", f"DATA={data}", f"OUT={out}",
        env={**os.environ, "FAKE_STEP_LOG": str(log)},
    )

    assert result.returncode == 0, result.stdout + result.stderr
    steps = [r["argv"] for r in _records(log) if r["event"] == "start"]
    assert len(steps) == 5, steps
    assert steps[0] == ["misc/convert_efficientnet_lite0.py", "--output", f"{out}/tf_efficientnet_lite0.pth"]
    assert f"{data}/images" in steps[1]
    assert f"{out}/features" in steps[2]
    assert out.is_dir()


def test_make_clean_demo_path_with_space(tmp_path):
    out = tmp_path / "demo output"
    (out / "features").mkdir(parents=True)
    sibling = tmp_path / "demo"  # the first word of OUT, which must survive
    sibling.mkdir()

    result = _make("clean-demo", f"OUT={out}")

    assert result.returncode == 0, result.stdout + result.stderr
    assert not out.exists()
    assert sibling.is_dir()


def test_make_venv_repairs_missing_pip(tmp_path):
    # `python3 -m venv` without ensurepip (Debian's python3 without python3-venv) exits 1 and leaves
    # bin/python without pip behind. The next make must run venv again, which installs pip.
    calls = tmp_path / "calls.txt"
    venv = tmp_path / "venv"
    _recording_shell_script(
        venv / "bin" / "python", "venv-python", calls,
        f'if [ "$1" = -m ] && [ "$2" = pip ] && [ ! -e "{venv}/pip-installed" ]; then\n'
        '    echo "No module named pip" >&2\n    exit 1\nfi\n',
    )
    base_python = _recording_shell_script(
        tmp_path / "base-python", "base-python", calls,
        'if [ "$1" = -m ] && [ "$2" = venv ]; then touch "$3/pip-installed"; fi\n',
    )

    result = _make("venv", f"VENV={venv}", f"PYTHON={base_python}")

    assert result.returncode == 0, result.stdout + result.stderr
    assert f"base-python -m venv {venv}" in calls.read_text().splitlines()
    assert (venv / ".installed").exists()


def test_make_venv_offline_keeps_pip(tmp_path):
    # Offline, upgrading pip fails, but the requirements already installed still resolve from the
    # environment. A touched requirements file must then not stop `make test` or `make demo`.
    calls = tmp_path / "calls.txt"
    venv = tmp_path / "venv"
    _recording_shell_script(
        venv / "bin" / "python", "venv-python", calls,
        'case "$*" in *"--upgrade pip"*) echo "ERROR: No matching distribution found for pip" >&2; exit 1;; esac\n',
    )

    result = _make("venv", f"VENV={venv}", "PYTHON=/bin/false")

    assert result.returncode == 0, result.stdout + result.stderr
    assert any("-r requirements-dev.txt" in line for line in calls.read_text().splitlines())
    assert "could not upgrade pip" in result.stdout + result.stderr
    assert (venv / ".installed").exists()


def test_make_demo_sigterm_stops_step(tmp_path):
    venv = tmp_path / "venv"
    _fake_python(venv / "bin" / "python")
    (venv / ".installed").touch()
    log = tmp_path / "steps.jsonl"
    env = {**os.environ, "FAKE_STEP_LOG": str(log), "FAKE_STEP_SECONDS": "20"}
    if shutil.which("make") is None:
        pytest.skip("make is not installed")

    process = subprocess.Popen(
        ["make", "-C", str(REPO_ROOT), "demo", f"VENV={venv}", f"DATA={_dataset(tmp_path / 'data')}",
         f"OUT={tmp_path / 'out'}"],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        step = _wait_for_start(log)
        process.send_signal(signal.SIGTERM)  # to make alone, as kill PID sends it
        process.wait(timeout=10)
        deadline = time.monotonic() + 10
        while _is_running(step["pid"]) and time.monotonic() < deadline:
            time.sleep(0.05)
        stopped = not _is_running(step["pid"])
    finally:
        # make's process group contains the shell that runs the demo, and each step has its own group
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        for record in _records(log):
            if _is_running(record["pid"]):
                os.kill(record["pid"], signal.SIGKILL)

    assert stopped
    assert [r["event"] for r in _records(log) if r["event"].startswith("SIG")] == ["SIGTERM"]
