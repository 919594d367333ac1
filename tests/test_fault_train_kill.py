"""A killed train_lin_adapt.py run never leaves a truncated or mismatched .pth or .json.

The trainer runs in a subprocess on synthetic embeddings and is killed with SIGKILL at
seeded random times and, through a kill hook, between writing its output files and
renaming them, and between the renames. Afterwards the `.pth` and `.json` either do not
exist or load completely, and a `.json` beside a `.pth` describes that `.pth`. The only
leftovers are temporary files whose names start with "." and end with ".tmp".
"""
import json
import os
import random
import shutil
import signal
import time

import pytest
import torch

from linear_adaptation.synthetic import make_synthetic_dataset, write_split

from fault_injection import TRAIN, command, hooked_command, kill_and_reap, run, start, wait_for


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Synthetic embeddings large enough for a training run of several seconds."""
    base = tmp_path_factory.mktemp("train_kill")
    dataset = make_synthetic_dataset(num_train_images=1500, num_train_classes=100, num_heldout_images=200,
                                     num_heldout_classes=20, dim=64, num_domains=2, dtype="float16", seed=6)
    paths = {}
    for name, split in (("train", dataset.train), ("heldout", dataset.heldout)):
        paths[name] = (base / f"{name}.hdf5", base / f"{name}.txt")
        write_split(split, *paths[name])
    return paths


def _args(data, save, seed=0):
    (train, train_list), (heldout, heldout_list) = data["train"], data["heldout"]
    return ["--uned_features_path", train, "--uned_info_path", train_list, "--val_features_path", heldout,
            "--val_info_path", heldout_list, "--save_dir", save, "--num_epochs", "2", "--batch_size", "32",
            "--adaptation_layer_dim", "32", "--device", "cpu", "--progress", "false", "--seed", seed]


def _outputs(save):
    return save, save.with_suffix(".json"), save.with_suffix(".png")


def _check_outputs(save) -> tuple[dict | None, dict | None]:
    """Load whichever of the .pth and .json exist; both must be complete. Return them (or None)."""
    pth, record_path, _ = _outputs(save)
    state = record = None
    if pth.exists():
        state = torch.load(pth, weights_only=True)
        assert sorted(state) == ["layer.bias", "layer.weight"]
        assert state["layer.weight"].shape == (32, 64)
    if record_path.exists():
        record = json.loads(record_path.read_text())
        assert record["out_dim"] == 32
        assert len(record["epochs"]) == 3
    # every other file in the folder is a temporary file that cannot be taken for an output
    for name in os.listdir(save.parent):
        if name not in {p.name for p in _outputs(save)}:
            assert name.startswith("."), name
            assert name.endswith(".tmp"), name
    return state, record


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """A complete run with seed 0: its output path, its layer and its wall time in seconds."""
    save = tmp_path_factory.mktemp("train_reference") / "layer.pth"
    started = time.monotonic()
    result = run(command(TRAIN, _args(data, save, seed=0)))
    seconds = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-3000:]
    state, record = _check_outputs(save)
    assert record["args"]["seed"] == 0
    return save, state, seconds


def _is_reference(state, reference) -> bool:
    return torch.equal(state["layer.weight"], reference[1]["layer.weight"])


def test_sigkill_at_random_times_leaves_no_partial_output(data, reference, tmp_path):
    rng = random.Random(99)
    for round_number in range(2):
        save = tmp_path / f"round{round_number}" / "layer.pth"
        process = start(command(TRAIN, _args(data, save)))
        # anywhere from the start-up to the end of the run (the reference run's wall time);
        # a run that ends first is checked the same way
        wait_for(lambda: False, process, timeout=rng.uniform(0.2, 1.0) * reference[2])
        kill_and_reap(process)
        state, record = _check_outputs(save) if save.parent.exists() else (None, None)
        if state is not None:
            assert _is_reference(state, reference)
        if record is not None:
            assert state is not None


def test_sigkill_while_replacing_keeps_a_matching_pair(data, reference, tmp_path):
    save = tmp_path / "out" / "layer.pth"
    save.parent.mkdir()
    for source, target in zip(_outputs(reference[0]), _outputs(save)):
        shutil.copyfile(source, target)

    # kills of a run with another seed that replaces the outputs: after its temporary
    # files are written, after each rename, and at a random time
    args = _args(data, save, seed=1)
    runs = [hooked_command(TRAIN, args, "output_fsync", 3)]
    runs += [hooked_command(TRAIN, args, "output_rename", count) for count in (1, 2)]
    for argv in runs:
        result = run(argv)
        assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
        state, record = _check_outputs(save)
        assert state is not None
        # Regression: a kill after the .pth rename left the .json of the replaced layer
        # beside the new one. A record beside the layer now always describes it.
        if record is not None:
            assert record["args"]["seed"] == (0 if _is_reference(state, reference) else 1)

    process = start(command(TRAIN, args))
    wait_for(lambda: False, process, timeout=random.Random(7).uniform(0.5, 1.0) * reference[2])
    kill_and_reap(process)
    state, record = _check_outputs(save)
    if record is not None:
        assert record["args"]["seed"] == (0 if _is_reference(state, reference) else 1)


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_stop_signal_to_process_group_writes_nothing(signal_number, data, tmp_path):
    save = tmp_path / "out" / "layer.pth"
    process = start(command(TRAIN, _args(data, save)), start_new_session=True)
    # the output folder is made once the signal handlers are in place
    assert wait_for(save.parent.exists, process)
    time.sleep(1.0)
    os.killpg(process.pid, signal_number)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal_number, stderr[-3000:]
    assert f"({signal.Signals(signal_number).name})" in stderr
    assert "Traceback" not in stderr
    assert not any(path.exists() for path in _outputs(save))


def test_sighup_under_nohup_does_not_stop_training(data, tmp_path):
    save = tmp_path / "out" / "layer.pth"
    process = start(command(TRAIN, _args(data, save)), start_new_session=True,
                    preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    assert wait_for(save.parent.exists, process)
    time.sleep(1.0)
    os.killpg(process.pid, signal.SIGHUP)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-3000:]
    assert all(path.exists() for path in _outputs(save))


@pytest.mark.parametrize("signal_name, exit_status", [("SIGINT", 130), ("SIGTERM", 143)])
def test_dropped_signal_stops_training(signal_name, exit_status, data, tmp_path):
    # Regression: a signal whose handler ran inside a __del__ method was printed as
    # "Exception ignored", and the run went on to write its outputs with exit status 0.
    save = tmp_path / "out" / "layer.pth"
    result = run(hooked_command(TRAIN, _args(data, save), "training_step", 5, f"{signal_name}:finalizer"))
    assert result.returncode == exit_status, result.stderr[-3000:]
    assert "Exception ignored" in result.stderr
    assert "no output written" in result.stderr
    assert not any(path.exists() for path in _outputs(save))
