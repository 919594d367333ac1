"""Scheduling of the decode worker processes."""
import os
import subprocess
import sys

import pytest
from torch.utils.data import IterableDataset

from feature_extraction.dataset import WORKER_NICENESS, make_loader, resolve_worker_priority

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
        "print(lower_worker_priority('idle'), os.nice(0) - before)\n"
    )
    assert out == f"niceness +{WORKER_NICENESS} {WORKER_NICENESS}"


class SchedulingReport(IterableDataset):
    """Yields, from inside the worker, its niceness change and whether it runs under SCHED_IDLE."""

    def __init__(self, parent_niceness: int):
        self.parent_niceness = parent_niceness

    def __iter__(self):
        idle = hasattr(os, "SCHED_IDLE") and os.sched_getscheduler(0) == os.SCHED_IDLE
        yield os.nice(0) - self.parent_niceness, idle


@pytest.mark.parametrize("priority,expected_niceness,expected_idle", [
    ("low", WORKER_NICENESS, False),
    ("normal", 0, False),
    pytest.param("idle", 0, True, marks=pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="Linux-only")),
])
def test_loader_applies_worker_priority(priority, expected_niceness, expected_idle):
    loader = make_loader(SchedulingReport(os.nice(0)), num_workers=1, pin_memory=False, worker_priority=priority)
    assert [tuple(record) for record in loader] == [(expected_niceness, expected_idle)]


@pytest.mark.parametrize("priority,device_type,expected", [
    ("auto", "cpu", "idle"),
    ("auto", "cuda", "low"),
    ("normal", "cpu", "normal"),
    ("idle", "cuda", "idle"),
])
def test_auto_priority_follows_device(priority, device_type, expected):
    assert resolve_worker_priority(priority, device_type) == expected


def test_unknown_priority_rejected():
    with pytest.raises(ValueError, match="'lowest' is not one of auto, idle, low, normal"):
        resolve_worker_priority("lowest", "cpu")
