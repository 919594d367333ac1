"""Scheduling of the decode worker processes."""
import os
import subprocess
import sys

import pytest

from feature_extraction.dataset import WORKER_NICENESS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_in_child(code: str) -> str:
    """Run `code` in a fresh interpreter (a priority cannot be raised again) and return its stdout."""
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="SCHED_IDLE is Linux-only")
def test_worker_runs_under_sched_idle():
    out = run_in_child(
        "import os; from feature_extraction.dataset import _init_worker; before = os.nice(0); _init_worker(0); "
        "print(os.sched_getscheduler(0) == os.SCHED_IDLE, os.nice(0) - before)"
    )
    assert out.split() == ["True", "0"]  # the policy alone, without niceness on top


def test_worker_falls_back_to_niceness():
    out = run_in_child(
        "import os\n"
        "def forbidden(*args): raise PermissionError('blocked by policy')\n"
        "os.sched_setscheduler = forbidden\n"
        "from feature_extraction.dataset import lower_worker_priority\n"
        "before = os.nice(0)\n"
        "print(lower_worker_priority(), os.nice(0) - before)\n"
    )
    assert out == f"niceness +{WORKER_NICENESS} {WORKER_NICENESS}"
