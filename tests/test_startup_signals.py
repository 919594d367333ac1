"""Ctrl-C, SIGTERM or SIGHUP while a command-line script is still importing torch."""
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO_ROOT

# The inputs of train and evaluate exist (empty files), so that the argument checks pass and
# the script is still running, not already exiting with status 2, when the signal arrives.
SCRIPTS = {
    "extract": ["feature_extraction/extract.py", "--dataset_dir", "absent", "--hdf5_dir", "absent"],
    "train": ["linear_adaptation/train_lin_adapt.py", "--uned_features_path", "{tmp}/empty.hdf5",
              "--uned_info_path", "{tmp}/empty.txt", "--save_dir", "{tmp}/absent/layer.pth"],
    "evaluate": ["linear_adaptation/evaluate.py", "--features_path", "{tmp}/empty.hdf5", "--info_path",
                 "{tmp}/empty.txt"],
}


def test_early_signal_handler_exits_quietly():
    code = (
        "import os, signal, time\n"
        "from feature_extraction.interrupts import exit_quietly_on_signals\n"
        "exit_quietly_on_signals()\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "time.sleep(5)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 143
    assert result.stderr == ""


@pytest.mark.parametrize("script", sorted(SCRIPTS))
@pytest.mark.parametrize("signal_number,expected", [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_signal_during_imports_gives_status(script, signal_number, expected, tmp_path):
    (tmp_path / "empty.hdf5").touch()
    (tmp_path / "empty.txt").touch()
    argv = [arg.format(tmp=tmp_path) for arg in SCRIPTS[script]]
    process = subprocess.Popen([sys.executable, *argv], cwd=REPO_ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.3)  # importing torch alone takes longer than this
    process.send_signal(signal_number)
    _, stderr = process.communicate(timeout=60)

    assert process.returncode == expected, stderr
    assert "Traceback" not in stderr


def test_sighup_ignored_by_nohup_stays_ignored():
    # nohup starts a program with SIGHUP ignored, so that it outlives the terminal or ssh session
    code = (
        "import os, signal, time\n"
        "signal.signal(signal.SIGHUP, signal.SIG_IGN)\n"
        "from feature_extraction import interrupts\n"
        "interrupts.exit_quietly_on_signals()\n"
        "os.kill(os.getpid(), signal.SIGHUP)\n"
        "with interrupts.termination_raises():\n"
        "    os.kill(os.getpid(), signal.SIGHUP)\n"
        "    time.sleep(0.05)\n"
        "with interrupts.signals_raise_interrupted():\n"
        "    os.kill(os.getpid(), signal.SIGHUP)\n"
        "    time.sleep(0.05)\n"
        "interrupts.restore_default_signals()\n"
        "print(signal.getsignal(signal.SIGHUP) is signal.SIG_IGN)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True"
