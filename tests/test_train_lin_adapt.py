import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn as nn

from feature_extraction.image_list import file_sha256
from linear_adaptation.synthetic import make_synthetic_dataset, write_split
from linear_adaptation.train_lin_adapt import run

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "linear_adaptation" / "train_lin_adapt.py"

DATA_ARGS = dict(
    num_train_images=1500,
    num_train_classes=150,
    num_heldout_images=300,
    num_heldout_classes=30,
    dim=48,
    nuisance_rank=6,
    nuisance_scale=0.4,
    noise_scale=1.0,
)
FAST = ["--adaptation_layer_dim", "32", "--batch_size", "64", "--lr", "3e-3", "--num_epochs", "2", "--progress", "false"]


class IliasStyleAdapter(nn.Module):
    """The module layout of the older ILIAS loading code: an nn.Linear named `layer`."""

    def __init__(self, in_features, out_features):
        super().__init__()
        self.layer = nn.Linear(in_features, out_features)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synthetic")
    data = make_synthetic_dataset(**DATA_ARGS, seed=2)
    write_split(data.train, folder / "train.hdf5", folder / "train.txt")
    write_split(data.heldout, folder / "heldout.hdf5", folder / "heldout.txt")
    return folder


def train_args(data_dir, save_path, *extra, with_val=True):
    args = ["--uned_features_path", str(data_dir / "train.hdf5"), "--uned_info_path", str(data_dir / "train.txt")]
    if with_val:
        args += ["--val_features_path", str(data_dir / "heldout.hdf5"), "--val_info_path", str(data_dir / "heldout.txt")]
    return args + ["--save_dir", str(save_path), *FAST, *extra]


def copy_hdf5(source, target, transform):
    """Write a modified copy of an HDF5 embedding file; transform(features, ids) returns new ones."""
    with h5py.File(source, "r") as f:
        features, ids = f["features"][()], [i.decode() for i in f["index"][()]]
    features, ids = transform(features, ids)
    with h5py.File(target, "w") as f:
        f.create_dataset("features", data=features)
        f.create_dataset("index", data=np.array(ids, dtype=object), dtype=h5py.string_dtype("ascii"))


def assert_no_outputs(folder):
    assert not folder.exists() or sorted(p.name for p in folder.iterdir()) == []


def test_cli_writes_loadable_layer_and_record(data_dir, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    save_path = tmp_path / "out" / "layer.pth"
    assert run(train_args(data_dir, save_path)) == 0

    state = torch.load(save_path, map_location="cpu", weights_only=True)
    assert sorted(state) == ["layer.bias", "layer.weight"]
    assert state["layer.weight"].shape == (32, 48)

    # kNN code builds nn.Linear from the weight shape and loads strictly
    out_dim, in_dim = state["layer.weight"].shape
    linear = nn.Linear(in_dim, out_dim)
    linear.load_state_dict({k.removeprefix("layer."): v for k, v in state.items()}, strict=True)
    wrapper = IliasStyleAdapter(in_dim, out_dim)
    wrapper.load_state_dict(state, strict=True)

    record = json.loads((tmp_path / "out" / "layer.json").read_text())
    assert record["in_dim"] == 48
    assert record["out_dim"] == 32
    assert record["num_classes"] == 150
    assert record["num_images"] == 1500
    assert record["num_val_images"] == 300
    assert [e["epoch"] for e in record["epochs"]] == [0, 1, 2]
    assert record["epochs"][0]["loss"] is None
    assert record["epochs"][2]["loss"] > 0
    assert set(record["epochs"][2]["val"]["per_domain"]) == {"0", "1", "2", "3"}
    assert record["val_kept"]["map"] == record["epochs"][2]["val"]["map"]
    assert record["args"]["batch_size"] == 64
    assert record["inputs"]["uned_features_path"]["sha256"] == file_sha256(data_dir / "train.hdf5")
    assert record["inputs"]["val_info_path"]["sha256"] == file_sha256(data_dir / "heldout.txt")
    assert record["versions"]["torch"] == torch.__version__
    assert record["wall_seconds"] >= record["train_seconds"] > 0

    assert (tmp_path / "out" / "layer.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["layer.json", "layer.png", "layer.pth"]
    assert f"held-out mAP@100: {record['val_before']['map']:.2f} with the raw embeddings" in caplog.text


def test_cli_same_seed_same_file(data_dir, tmp_path):
    assert run(train_args(data_dir, tmp_path / "a.pth", with_val=False)) == 0
    assert run(train_args(data_dir, tmp_path / "b.pth", with_val=False)) == 0
    first = torch.load(tmp_path / "a.pth", weights_only=True)
    second = torch.load(tmp_path / "b.pth", weights_only=True)
    assert torch.equal(first["layer.weight"], second["layer.weight"])
    assert torch.equal(first["layer.bias"], second["layer.bias"])


def test_cli_shuffled_hdf5_rows_same_layer(data_dir, tmp_path):
    order = np.random.default_rng(3).permutation(1500)
    copy_hdf5(data_dir / "train.hdf5", tmp_path / "shuffled.hdf5", lambda f, i: (f[order], [i[k] for k in order]))
    base = ["--uned_info_path", str(data_dir / "train.txt"), *FAST]

    assert run(["--uned_features_path", str(data_dir / "train.hdf5"), "--save_dir", str(tmp_path / "a.pth"), *base]) == 0
    assert run(["--uned_features_path", str(tmp_path / "shuffled.hdf5"), "--save_dir", str(tmp_path / "b.pth"), *base]) == 0
    first = torch.load(tmp_path / "a.pth", weights_only=True)
    second = torch.load(tmp_path / "b.pth", weights_only=True)
    assert torch.equal(first["layer.weight"], second["layer.weight"])


def test_cli_big_endian_features_same_layer(data_dir, tmp_path):
    # HDF5 files written on or for big-endian machines read back as '>f4' arrays
    copy_hdf5(data_dir / "train.hdf5", tmp_path / "big_endian.hdf5", lambda f, i: (f.astype(">f4"), i))
    with h5py.File(tmp_path / "big_endian.hdf5", "r") as f:
        assert f["features"].dtype == np.dtype(">f4")
    base = ["--uned_info_path", str(data_dir / "train.txt"), *FAST]

    native = ["--uned_features_path", str(data_dir / "train.hdf5"), "--save_dir", str(tmp_path / "a.pth"), *base]
    assert run(native) == 0
    swapped = ["--uned_features_path", str(tmp_path / "big_endian.hdf5"), "--save_dir", str(tmp_path / "b.pth"), *base]
    assert run(swapped) == 0
    first = torch.load(tmp_path / "a.pth", weights_only=True)
    second = torch.load(tmp_path / "b.pth", weights_only=True)
    assert torch.equal(first["layer.weight"], second["layer.weight"])


def test_cli_val_fraction_holds_out_classes(data_dir, tmp_path):
    save_path = tmp_path / "layer.pth"
    assert run(train_args(data_dir, save_path, "--val_fraction", "0.2", "--keep", "best", with_val=False)) == 0
    record = json.loads((tmp_path / "layer.json").read_text())
    assert record["num_classes"] == 120
    assert record["num_images"] + record["num_val_images"] == 1500
    assert record["kept_epoch"] in (1, 2)
    assert record["val_kept"]["map"] == max(e["val"]["map"] for e in record["epochs"][1:])


def test_cli_missing_ids_stop_without_output(data_dir, tmp_path, caplog):
    listing = (data_dir / "train.txt").read_text() + "train/extra/not_extracted.jpg,0,0\n"
    (tmp_path / "list.txt").write_text(listing)
    out = tmp_path / "out"
    args = train_args(data_dir, out / "layer.pth", with_val=False)
    args[args.index("--uned_info_path") + 1] = str(tmp_path / "list.txt")

    assert run(args) == 1
    assert "1 list paths missing from the HDF5 index" in caplog.text
    assert "--allow_missing" in caplog.text
    assert not out.exists()


def test_cli_allow_missing_uses_intersection(data_dir, tmp_path):
    listing = (data_dir / "train.txt").read_text() + "train/extra/not_extracted.jpg,0,0\n"
    (tmp_path / "list.txt").write_text(listing)
    args = train_args(data_dir, tmp_path / "layer.pth", "--allow_missing", with_val=False)
    args[args.index("--uned_info_path") + 1] = str(tmp_path / "list.txt")

    assert run(args) == 0
    record = json.loads((tmp_path / "layer.json").read_text())
    assert record["num_images"] == 1500
    assert record["join"]["training"]["missing_in_hdf5"] == 1
    assert record["join"]["training"]["examples"]["missing_in_hdf5"] == ["train/extra/not_extracted.jpg"]


def test_cli_duplicate_ids_stop(data_dir, tmp_path, caplog):
    copy_hdf5(data_dir / "train.hdf5", tmp_path / "dup.hdf5", lambda f, i: (f, i[:1] + i[:1] + i[2:]))
    args = train_args(data_dir, tmp_path / "out" / "layer.pth", with_val=False)
    args[args.index("--uned_features_path") + 1] = str(tmp_path / "dup.hdf5")

    assert run(args) == 1
    assert "1 duplicate HDF5 ids" in caplog.text
    assert not (tmp_path / "out").exists()


def test_cli_malformed_line_reports_line_number(data_dir, tmp_path, caplog):
    lines = (data_dir / "train.txt").read_text().splitlines()
    lines[2] = lines[2].rsplit(",", 1)[0] + ",x"
    (tmp_path / "bad.txt").write_text("\n".join(lines) + "\n")
    args = train_args(data_dir, tmp_path / "out" / "layer.pth", with_val=False)
    args[args.index("--uned_info_path") + 1] = str(tmp_path / "bad.txt")

    assert run(args) == 1
    assert "bad.txt:3: domain 'x' is not an integer" in caplog.text
    assert not (tmp_path / "out").exists()


def _nan_training_args(data_dir, tmp_path) -> tuple[list[str], str]:
    """Return trainer arguments whose training HDF5 has a NaN in row 5, and that row's id."""
    broken = {}

    def poison(features, ids):
        features = features.copy()
        features[5, 3] = np.nan
        broken["id"] = ids[5]
        return features, ids

    copy_hdf5(data_dir / "train.hdf5", tmp_path / "nan.hdf5", poison)
    args = train_args(data_dir, tmp_path / "out" / "layer.pth", with_val=False)
    args[args.index("--uned_features_path") + 1] = str(tmp_path / "nan.hdf5")
    return args, broken["id"]


def test_cli_nan_embeddings_stop(data_dir, tmp_path, caplog):
    args, _ = _nan_training_args(data_dir, tmp_path)

    assert run(args) == 1
    assert "NaN or Inf" in caplog.text
    assert not (tmp_path / "out").exists()


def test_cli_nan_row_advice_works(data_dir, tmp_path, caplog):
    # Regression: the advice to drop NaN rows from the list left out --allow_missing, without
    # which the shortened list no longer matches the HDF5 rows and training stops again.
    args, broken_id = _nan_training_args(data_dir, tmp_path)
    assert run(args) == 1
    assert "drop them from the list and pass --allow_missing" in caplog.text

    lines = (data_dir / "train.txt").read_text().splitlines()
    remaining_lines = [line for line in lines if line.split(",")[0] != broken_id]
    assert len(remaining_lines) == len(lines) - 1
    (tmp_path / "train.txt").write_text("\n".join(remaining_lines) + "\n")
    args[args.index("--uned_info_path") + 1] = str(tmp_path / "train.txt")
    assert run([*args, "--allow_missing"]) == 0


def test_cli_validation_dimension_mismatch_stops(data_dir, tmp_path, caplog):
    copy_hdf5(data_dir / "heldout.hdf5", tmp_path / "narrow.hdf5", lambda f, i: (f[:, :40], i))
    args = train_args(data_dir, tmp_path / "out" / "layer.pth")
    args[args.index("--val_features_path") + 1] = str(tmp_path / "narrow.hdf5")

    assert run(args) == 1
    assert "validation embeddings have dimension 40 but training embeddings 48" in caplog.text
    assert not (tmp_path / "out").exists()


def test_cli_single_class_stops(data_dir, tmp_path, caplog):
    lines = (data_dir / "train.txt").read_text().splitlines()
    (tmp_path / "one.txt").write_text("".join(line.split(",")[0] + ",0,0\n" for line in lines))
    args = train_args(data_dir, tmp_path / "out" / "layer.pth", with_val=False)
    args[args.index("--uned_info_path") + 1] = str(tmp_path / "one.txt")

    assert run(args) == 1
    assert "needs at least 2" in caplog.text
    assert not (tmp_path / "out").exists()


def test_cli_save_dir_under_a_file_exit_2(data_dir, tmp_path, capsys):
    # Regression: this stopped after loading the data with an errno message (File exists).
    (tmp_path / "file").write_text("not a folder")
    save_path = tmp_path / "file" / "sub" / "layer.pth"
    with pytest.raises(SystemExit) as exit_info:
        run(train_args(data_dir, save_path, with_val=False))
    assert exit_info.value.code == 2
    assert f"--save_dir {str(save_path)!r}: {str(tmp_path / 'file')!r} is a file, not a folder" in capsys.readouterr().err
    assert (tmp_path / "file").read_text() == "not a folder"


def test_cli_unwritable_output_stops(data_dir, tmp_path, caplog, monkeypatch):
    # a folder that passes the argument checks but cannot be written, as on a full or read-only disk
    def fail_to_open(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr("linear_adaptation.outputs.tempfile.NamedTemporaryFile", fail_to_open)
    assert run(train_args(data_dir, tmp_path / "out" / "layer.pth", with_val=False)) == 1
    assert "cannot write to the output folder" in caplog.text
    assert "Read-only file system" in caplog.text
    assert not (tmp_path / "out").exists()


def test_cli_failure_keeps_existing_folder(data_dir, tmp_path):
    (tmp_path / "keep").mkdir()
    (tmp_path / "bad.txt").write_text("a.jpg,1\n")
    args = train_args(data_dir, tmp_path / "keep" / "layer.pth", with_val=False)
    args[args.index("--uned_info_path") + 1] = str(tmp_path / "bad.txt")
    assert run(args) == 1
    assert (tmp_path / "keep").is_dir()
    assert_no_outputs(tmp_path / "keep")


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--val_fraction", "1.5"], "--val_fraction is 1.5"),
        (["--val_fraction", "0"], "--val_fraction is 0.0"),
        (["--keep", "best"], "--keep best needs validation"),
        (["--loss", "normface", "--margin", "0.2"], "normface has no margin"),
        (["--use_gpu", "maybe"], "invalid boolean 'maybe'"),
        (["--use_gpu", "false", "--device", "cuda"], "conflicts with --device cuda"),
        (["--batch_size", "0"], "--batch_size is 0"),
        (["--amp", "fp16", "--device", "cpu"], "--amp fp16 needs CUDA"),
        (["--val_info_path", "x.txt"], "must be given together"),
        # Regression: NaN and Inf loss settings trained a NaN layer and exited 0, and a negative
        # seed failed only after loading the data.
        (["--margin", "nan"], "--margin is nan; it must be a finite number"),
        (["--scale", "inf"], "--scale is inf; it must be a finite number"),
        (["--lr", "inf"], "--lr is inf; it must be a finite number"),
        (["--lr=-1e-3"], "--lr is -0.001; it must be positive"),
        (["--weight_decay", "inf"], "--weight_decay is inf; it must be a finite number"),
        (["--weight_decay", "nan"], "--weight_decay is nan; it must be a finite number"),
        (["--loss", "arcface", "--margin", "3.2"], "an arcface margin is an angle in radians and must be below pi"),
        (["--loss", "cosface", "--margin", "2.5"], "a cosface margin must be at most 2"),
        (["--seed", "-1"], "--seed is -1; it must lie between 0 and 2**63 - 1"),
        (["--seed", str(10**23)], f"--seed is {10**23}; it must lie between 0"),
        (["--seed", "-1", "--val_fraction", "0.3"], "--seed is -1"),
        # Regression: an empty path was reported as the folder ''.
        (["--save_dir", ""], "--save_dir is empty; give the path of the .pth file to write"),
    ],
)
def test_cli_bad_arguments_exit_2(data_dir, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        run(train_args(data_dir, tmp_path / "out" / "layer.pth", *extra, with_val=False))
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_save_dir_folder_exit_2(data_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run(train_args(data_dir, tmp_path, with_val=False))
    assert exit_info.value.code == 2
    assert "is a folder" in capsys.readouterr().err


def test_cli_save_dir_trailing_slash_exit_2(data_dir, tmp_path, capsys):
    # Path() drops a trailing slash, so 'out/' was written as a file named 'out' beside 'out.json'.
    with pytest.raises(SystemExit) as exit_info:
        run(train_args(data_dir, f"{tmp_path / 'out'}{os.sep}", with_val=False))
    assert exit_info.value.code == 2
    assert "ends with a path separator" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "out.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")
def test_cli_cuda_without_gpu_exit_2(data_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run(train_args(data_dir, tmp_path / "layer.pth", "--device", "cuda", with_val=False))
    assert exit_info.value.code == 2
    assert "finds no CUDA device" in capsys.readouterr().err


@pytest.mark.parametrize("signum,expected", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_cli_signal_stops_without_output(data_dir, tmp_path, signum, expected):
    out = tmp_path / "out"
    args = train_args(data_dir, out / "layer.pth", "--device", "cpu", with_val=False)
    args[args.index("--num_epochs") + 1] = "1000"
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), *args],
        cwd=REPO,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        for line in process.stderr:
            if "training on " in line:
                break
        process.send_signal(signum)
        remaining = process.communicate(timeout=60)[1]
    finally:
        process.kill()
    assert process.returncode == expected
    assert "no output written" in remaining
    assert not out.exists()


@pytest.mark.parametrize("signum,expected", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_cli_signal_in_plot_import_stops(data_dir, tmp_path, monkeypatch, caplog, signum, expected):
    # The plot imports matplotlib on first use, and its class bodies call __set_name__. A signal
    # raised there comes out wrapped in a RuntimeError, which exited 1 as "training failed".
    class Descriptor:
        def __set_name__(self, owner, name):
            os.kill(os.getpid(), signum)

    def plot_during_signal(epochs, title):
        class Owner:
            attribute = Descriptor()

    monkeypatch.setattr("linear_adaptation.train_lin_adapt.plot_png_bytes", plot_during_signal)
    out = tmp_path / "out"
    with caplog.at_level(logging.ERROR):
        code = run(train_args(data_dir, out / "layer.pth", "--device", "cpu", with_val=False))
    assert code == expected
    assert "no output written" in caplog.text
    assert "training failed" not in caplog.text
    assert not out.exists()


def test_cli_fast_recipe_flags(data_dir, tmp_path):
    save_path = tmp_path / "fast.pth"
    extra = ["--classifier_init", "class_mean", "--lr_schedule", "cosine", "--warmup_steps", "2", "--max_steps", "30"]
    assert run(train_args(data_dir, save_path, *extra)) == 0
    record = json.loads((tmp_path / "fast.json").read_text())
    assert record["args"]["classifier_init"] == "class_mean"
    assert [e["steps"] for e in record["epochs"]] == [0, 23, 7]
    assert record["args"]["max_steps"] == 30
    assert record["kept_epoch"] == 2


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_atomic_write_holds_back_signal(signal_number, tmp_path, monkeypatch):
    # a signal raised during the renames is consumed and returned after all files are in place
    from linear_adaptation import outputs

    original_replace = os.replace

    def replace_then_signal(source, target):
        original_replace(source, target)
        if str(target).endswith("a.bin"):
            os.kill(os.getpid(), signal_number)

    monkeypatch.setattr(outputs.os, "replace", replace_then_signal)
    previous = signal.signal(signal_number, lambda *_: pytest.fail("the signal was not held back"))
    try:
        received = outputs.write_files_atomically({tmp_path / "a.bin": b"a", tmp_path / "b.bin": b"b"})
    finally:
        signal.signal(signal_number, previous)

    assert received == signal_number
    assert (tmp_path / "a.bin").read_bytes() == b"a"
    assert (tmp_path / "b.bin").read_bytes() == b"b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.bin"]


def test_cli_largest_seed_trains(data_dir, tmp_path):
    args = train_args(data_dir, tmp_path / "layer.pth", "--seed", str(2**63 - 1), "--val_fraction", "0.2",
                      with_val=False)
    args[args.index("--num_epochs") + 1] = "1"
    assert run(args) == 0
    assert json.loads((tmp_path / "layer.json").read_text())["args"]["seed"] == 2**63 - 1


@pytest.mark.parametrize("extra", [["--lr", "1e30"], ["--lr", "1e30", "--val_fraction", "0.3", "--keep", "best"]])
def test_cli_diverged_training_writes_nothing(data_dir, tmp_path, caplog, extra):
    # Regression: a learning rate of 1e30 saved a layer full of NaN and exited 0, and with
    # --keep best it kept epoch 1 at mAP 0.00.
    out = tmp_path / "out"
    # the logger is named, because bench_seeds.py raises the level of "linear_adaptation" for the process
    with caplog.at_level(logging.INFO), caplog.at_level(logging.INFO, logger="linear_adaptation"):
        code = run(train_args(data_dir, out / "layer.pth", *extra, with_val=False))
    assert code == 1
    assert "training diverged in epoch 1: the mean loss is nan" in caplog.text
    assert "lower --lr (now 1e+30)" in caplog.text
    assert "training on " in caplog.text
    assert "epoch 2/2" not in caplog.text
    assert not out.exists()


@pytest.mark.parametrize("victim", ["train.hdf5", "train.txt"])
def test_cli_save_dir_input_file_exit_2(data_dir, tmp_path, capsys, victim):
    # Regression: --save_dir naming the training HDF5 replaced it with the .pth.
    (tmp_path / "train.hdf5").write_bytes((data_dir / "train.hdf5").read_bytes())
    (tmp_path / "train.txt").write_text((data_dir / "train.txt").read_text())
    before = (tmp_path / victim).read_bytes()
    args = ["--uned_features_path", str(tmp_path / "train.hdf5"), "--uned_info_path", str(tmp_path / "train.txt"),
            "--save_dir", str(tmp_path / victim), *FAST]
    with pytest.raises(SystemExit) as exit_info:
        run(args)
    assert exit_info.value.code == 2
    flag = "--uned_features_path" if victim.endswith(".hdf5") else "--uned_info_path"
    assert f"which is the {flag} input" in capsys.readouterr().err
    assert (tmp_path / victim).read_bytes() == before


def test_cli_sidecar_input_file_exit_2(data_dir, tmp_path, capsys):
    # the .json record of --save_dir layer.pth would replace a list named layer.json
    (tmp_path / "layer.json").write_text((data_dir / "heldout.txt").read_text())
    args = train_args(data_dir, tmp_path / "layer.pth", with_val=False)
    args += ["--val_features_path", str(data_dir / "heldout.hdf5"), "--val_info_path", str(tmp_path / "layer.json")]
    with pytest.raises(SystemExit) as exit_info:
        run(args)
    assert exit_info.value.code == 2
    assert "--save_dir would write" in capsys.readouterr().err
    assert (tmp_path / "layer.json").read_text() == (data_dir / "heldout.txt").read_text()


@pytest.mark.parametrize("sidecar", ["layer.json", "layer.png"])
def test_cli_sidecar_folder_exit_2(data_dir, tmp_path, capsys, sidecar):
    # A folder in place of the .json or .png must be rejected before training, and the older record kept.
    older_record = tmp_path / "layer.json"
    (tmp_path / sidecar).mkdir()
    if sidecar != "layer.json":
        older_record.write_text("{}")
    with pytest.raises(SystemExit) as exit_info:
        run(train_args(data_dir, tmp_path / "layer.pth", with_val=False))
    assert exit_info.value.code == 2
    assert f"--save_dir would write {str(tmp_path / sidecar)!r}, which is a folder" in capsys.readouterr().err
    assert not (tmp_path / "layer.pth").exists()
    if sidecar != "layer.json":
        assert older_record.read_text() == "{}"


def test_cli_save_dir_replaces_older_layer(data_dir, tmp_path, caplog):
    save_path = tmp_path / "layer.pth"
    save_path.write_bytes(b"older layer")
    with caplog.at_level(logging.WARNING):
        assert run(train_args(data_dir, save_path, with_val=False)) == 0
    assert "replacing the existing" in caplog.text
    assert sorted(torch.load(save_path, weights_only=True)) == ["layer.bias", "layer.weight"]


def test_cli_save_dir_names_replaced_sidecars(data_dir, tmp_path, caplog):
    # Regression: an unrelated run.json beside the new run.pth was replaced without a warning.
    (tmp_path / "run.json").write_text('{"my": "metrics"}\n')
    with caplog.at_level(logging.WARNING):
        assert run(train_args(data_dir, tmp_path / "run.pth", with_val=False)) == 0
    assert f"replacing the existing {tmp_path / 'run.json'}" in caplog.text
    assert "run.png" not in caplog.text
    assert "embedding_space" in (tmp_path / "run.json").read_text()


@pytest.mark.parametrize("flag", ["--uned_features_path", "--uned_info_path", "--val_info_path"])
@pytest.mark.parametrize("kind", ["missing", "folder"])
def test_cli_missing_input_exit_2(data_dir, tmp_path, capsys, flag, kind):
    # Regression: a missing list ended in "training failed: FileNotFoundError" without the flag.
    bad = tmp_path / "nope.txt"
    if kind == "folder":
        bad.mkdir()
    args = train_args(data_dir, tmp_path / "out" / "layer.pth")
    args[args.index(flag) + 1] = str(bad)
    with pytest.raises(SystemExit) as exit_info:
        run(args)
    assert exit_info.value.code == 2
    expected = "is a folder; give the path of a file" if kind == "folder" else "does not exist; check the path"
    assert f"{flag} {str(bad)!r} {expected}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_max_steps_beyond_epochs_warns(data_dir, tmp_path, caplog):
    # 1500 images in batches of 64 give 23 steps per epoch
    args = train_args(data_dir, tmp_path / "layer.pth", "--max_steps", "1000", "--warmup_steps", "100",
                      with_val=False)
    args[args.index("--num_epochs") + 1] = "1"
    with caplog.at_level(logging.INFO), caplog.at_level(logging.INFO, logger="linear_adaptation"):
        assert run(args) == 0
    assert "--max_steps 1000 exceeds the 23 steps of 1 epoch, so training stops after 23 steps" in caplog.text
    assert "--warmup_steps 100 is not below the 23 training steps" in caplog.text
    assert "1 epoch of 23 steps" in caplog.text
    epoch = json.loads((tmp_path / "layer.json").read_text())["epochs"][1]
    assert epoch["steps"] == 23
    # the warning's peak is the learning rate of the last step
    assert f"the learning rate peaks at {epoch['lr']:g} (--lr is" in caplog.text


def test_cli_huge_layer_names_flag(data_dir, tmp_path, caplog):
    # Regression: an output dimension too large to allocate ended in an allocator traceback text.
    for dim in ("100000000000", str(10**20)):
        caplog.clear()
        args = train_args(data_dir, tmp_path / "out" / "layer.pth", with_val=False)
        args[args.index("--adaptation_layer_dim") + 1] = dim
        assert run(args) == 1
        assert "lower --adaptation_layer_dim" in caplog.text
        assert "training failed" not in caplog.text
        assert not (tmp_path / "out").exists()


def test_cli_nan_row_outside_list_ignored(data_dir, tmp_path, caplog):
    # Regression: a NaN row that the list does not use stopped training, with advice to drop
    # it from the list, which could not help.
    def add_broken_row(features, ids):
        return np.concatenate([features, np.full((1, features.shape[1]), np.nan, features.dtype)]), ids + ["x/broken.jpg"]

    copy_hdf5(data_dir / "train.hdf5", tmp_path / "extra.hdf5", add_broken_row)
    args = train_args(data_dir, tmp_path / "layer.pth", "--allow_missing", with_val=False)
    args[args.index("--uned_features_path") + 1] = str(tmp_path / "extra.hdf5")
    assert run(args) == 0
    assert json.loads((tmp_path / "layer.json").read_text())["num_images"] == 1500


def test_cli_val_k_below_5_mmp(data_dir, tmp_path):
    # with K below 5, MP@5 needs the top min(5, P) ranks, so it exists only while no query has more than K positives
    kept_lines, per_class = [], {}
    for line in (data_dir / "heldout.txt").read_text(encoding="utf-8").splitlines():
        path, label, domain = line.split(",")
        per_class[(domain, label)] = per_class.get((domain, label), 0) + 1
        if per_class[(domain, label)] <= 3:
            kept_lines.append(line)
    kept_ids = {line.split(",")[0] for line in kept_lines}
    (tmp_path / "small.txt").write_text("\n".join(kept_lines) + "\n", encoding="utf-8")
    copy_hdf5(data_dir / "heldout.hdf5", tmp_path / "small.hdf5",
              lambda features, ids: (features[[i in kept_ids for i in ids]], [i for i in ids if i in kept_ids]))
    assert max(per_class.values()) > 4  # the full set has queries with more than 3 positives

    small = ["--val_features_path", str(tmp_path / "small.hdf5"), "--val_info_path", str(tmp_path / "small.txt")]
    assert run(train_args(data_dir, tmp_path / "small" / "layer.pth", *small, "--val_k", "3", with_val=False)) == 0
    assert run(train_args(data_dir, tmp_path / "full" / "layer.pth", "--val_k", "3")) == 0

    small_record = json.loads((tmp_path / "small" / "layer.json").read_text())
    full_record = json.loads((tmp_path / "full" / "layer.json").read_text())
    assert 0 <= small_record["val_kept"]["mmp@5"] <= 100
    assert full_record["val_kept"]["mmp@5"] is None
