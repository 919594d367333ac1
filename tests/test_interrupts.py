"""Stop signals whose handler exception is dropped by a finalizer still stop the run."""
import gc
import os
import signal
import time

import pytest

from feature_extraction.interrupts import (
    Interrupted,
    TerminationRequested,
    raise_if_signal_lost,
    signals_raise_interrupted,
    termination_raises,
)
from linear_adaptation.synthetic import make_synthetic_dataset, write_split

from fault_injection import EVALUATE, hooked_command, run


class _SignalsWhenDropped:
    """Sends a signal to this process from its __del__, where Python drops the handler's exception."""

    def __init__(self, signal_number: int):
        self.signal_number = signal_number

    def __del__(self):
        os.kill(os.getpid(), self.signal_number)
        time.sleep(0.05)  # interrupted by the signal, whose handler raises here


def _drop_signal(signal_number: int) -> None:
    _SignalsWhenDropped(signal_number)
    gc.collect()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("handlers, signal_number, expected", [
    (signals_raise_interrupted, signal.SIGINT, Interrupted),
    (signals_raise_interrupted, signal.SIGTERM, Interrupted),
    (signals_raise_interrupted, signal.SIGHUP, Interrupted),
    (termination_raises, signal.SIGINT, KeyboardInterrupt),
    (termination_raises, signal.SIGTERM, TerminationRequested),
    (termination_raises, signal.SIGHUP, TerminationRequested),
])
def test_dropped_signal_raised_again(handlers, signal_number, expected):
    steps = []
    with pytest.raises(expected) as stopped:
        with handlers():
            _drop_signal(signal_number)
            steps.append("went on after the finalizer")
            raise_if_signal_lost()
            steps.append("went on after the check")
    assert steps == ["went on after the finalizer"]
    if expected is not KeyboardInterrupt:
        assert stopped.value.signal_number == signal_number


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_signal_record_ends_with_its_block():
    with pytest.raises(TerminationRequested):
        with termination_raises():
            _drop_signal(signal.SIGTERM)
            raise_if_signal_lost()
    # a later run in the same process does not stop for the earlier signal
    with termination_raises():
        raise_if_signal_lost()
    with signals_raise_interrupted():
        raise_if_signal_lost()


def test_termination_handlers_restored():
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    with termination_raises():
        assert signal.getsignal(signal.SIGINT) is not before[signal.SIGINT]
    assert {sig: signal.getsignal(sig) for sig in before} == before

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with termination_raises():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("signal_name, exit_status", [("SIGINT", 130), ("SIGHUP", 129)])
def test_dropped_signal_stops_evaluation(signal_name, exit_status, tmp_path):
    # Regression: a signal whose handler ran inside a __del__ method was printed as
    # "Exception ignored", and the evaluation went on to write its outputs.
    data = make_synthetic_dataset(num_train_images=40, num_train_classes=4, num_heldout_images=60,
                                  num_heldout_classes=12, dim=16, num_domains=2, seed=3)
    features, list_path = tmp_path / "heldout.hdf5", tmp_path / "heldout.txt"
    write_split(data.heldout, features, list_path)
    metrics = tmp_path / "out" / "metrics.json"
    argv = ["--features_path", features, "--info_path", list_path, "--device", "cpu", "--save_json", metrics]
    result = run(hooked_command(EVALUATE, argv, "knn_search", 1, f"{signal_name}:finalizer"))
    assert result.returncode == exit_status, result.stderr[-3000:]
    assert "Exception ignored" in result.stderr
    assert "outputs not yet written were skipped" in result.stderr
    assert not metrics.exists()
