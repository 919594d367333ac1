"""A full disk or an unwritable output path gives a clear error and no partial output file.

Two real ways to fail a write are used, because the tests run as root and root ignores
folder permissions. A file size limit (RLIMIT_FSIZE, with SIGXFSZ ignored) makes a
write past the limit fail with EFBIG, as a write to a full disk fails with ENOSPC. A
small tmpfs is a full disk for real, where mounting is permitted. An output path whose
parent is a regular file cannot be created by anyone.
"""
import json
import logging

import numpy as np
import pytest
import torch

from linear_adaptation import evaluate
from linear_adaptation.eval_report import OutputWriteError
from linear_adaptation.synthetic import make_synthetic_dataset, write_split
from linear_adaptation.train_lin_adapt import run as train_run

from conftest import write_image
from fault_injection import (
    EVALUATE,
    EXTRACT,
    TINY_MODEL,
    assert_same_extraction,
    command,
    extract_in_process,
    file_size_limit,
    file_size_limit_here,
    folder_listing,
    run,
    small_tmpfs,
)

OUTPUT_NAME = "features_uned.hdf5"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """40 small images, their list, and the output of one extraction without any limit."""
    base = tmp_path_factory.mktemp("disk_images")
    root = base / "images"
    lines = []
    for i in range(40):
        relative = f"d{i % 2}/img_{i:03d}.jpg"
        write_image(root / relative, (56 + (i % 2) * 8, 48), seed=i)
        lines.append(f"{relative},{i % 5},0\n")
    list_path = base / "list.txt"
    list_path.write_text("".join(lines))
    assert extract_in_process(*_extract_args((root, list_path), base / "reference")) == 0
    return root, list_path, base / "reference" / OUTPUT_NAME


def _extract_args(images, out_dir):
    return ["--dataset_dir", images[0], "--selected_ids", images[1], "--hdf5_dir", out_dir, *TINY_MODEL,
            "--window_size", "8"]


@pytest.mark.parametrize("limit, failing_file", [(1500, "window_000000.npz"), (200_000, OUTPUT_NAME + ".tmp")])
def test_extract_file_size_limit_fails_cleanly_then_resumes(images, tmp_path, limit, failing_file):
    # Regression: a failed HDF5 write ended the run with RuntimeError tracebacks and then a
    # segmentation fault at exit, because HDF5 kept the unwritten chunks in its cache.
    out_dir = tmp_path / "out"
    result = run(command(EXTRACT, _extract_args(images, out_dir)), preexec_fn=file_size_limit(limit))
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert f"{failing_file}: File too large; free space in {out_dir}" in result.stderr
    assert "then rerun to resume" in result.stderr
    assert not (out_dir / OUTPUT_NAME).exists()
    assert [name for name in folder_listing(out_dir) if not name.startswith(OUTPUT_NAME + ".parts")] == []

    # without the limit, the same command resumes and writes the uninterrupted output
    assert extract_in_process(*_extract_args(images, out_dir)) == 0
    assert_same_extraction(out_dir / OUTPUT_NAME, images[2])
    assert folder_listing(out_dir) == [OUTPUT_NAME]


def test_extract_full_tmpfs_fails_cleanly_then_resumes(images, tmp_path):
    disk = tmp_path / "disk"
    with small_tmpfs(disk, "300k") as resize:
        out_dir = disk / "out"
        result = run(command(EXTRACT, _extract_args(images, out_dir)))
        assert result.returncode == 1, result.stderr[-3000:]
        assert "Traceback" not in result.stderr
        assert f"{OUTPUT_NAME}.tmp: No space left on device; free space in {out_dir}" in result.stderr
        assert not (out_dir / OUTPUT_NAME).exists()
        assert not (out_dir / (OUTPUT_NAME + ".tmp")).exists()

        resize("4m")
        result = run(command(EXTRACT, _extract_args(images, out_dir)))
        assert result.returncode == 0, result.stderr[-3000:]
        assert "resuming: 5 of 5 windows" in result.stderr
        assert_same_extraction(out_dir / OUTPUT_NAME, images[2])
        assert folder_listing(out_dir) == [OUTPUT_NAME]


def test_extract_output_parent_is_file(images, tmp_path, caplog):
    (tmp_path / "a_file").write_text("not a folder")
    with caplog.at_level(logging.ERROR):
        code = extract_in_process(*_extract_args(images, tmp_path / "a_file" / "out"))
    assert code == 1
    assert "choose a writable --hdf5_dir" in caplog.text
    assert (tmp_path / "a_file").read_text() == "not a folder"


# ----------------------------------------------------------------------------- trainer


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    base = tmp_path_factory.mktemp("disk_labelled")
    data = make_synthetic_dataset(num_train_images=240, num_train_classes=24, num_heldout_images=60,
                                  num_heldout_classes=12, dim=32, num_domains=2, seed=8)
    paths = {}
    for name, split in (("train", data.train), ("heldout", data.heldout)):
        paths[name] = (base / f"{name}.hdf5", base / f"{name}.txt")
        write_split(split, *paths[name])
    return paths


def _train(labelled, save, seed=0):
    (train, train_list), (heldout, heldout_list) = labelled["train"], labelled["heldout"]
    return train_run(["--uned_features_path", str(train), "--uned_info_path", str(train_list),
                      "--val_features_path", str(heldout), "--val_info_path", str(heldout_list),
                      "--save_dir", str(save), "--num_epochs", "1", "--batch_size", "32",
                      "--adaptation_layer_dim", "16", "--device", "cpu", "--progress", "false", "--seed", str(seed)])


def _train_outputs(save):
    return [save, save.with_suffix(".json"), save.with_suffix(".png")]


@pytest.mark.parametrize("limit", [2000, 20_000])
def test_train_file_size_limit_keeps_previous_outputs(labelled, tmp_path, caplog, limit):
    # 2000 bytes fail the .pth, 20 kB the .png after the .pth and .json were written
    save = tmp_path / "out" / "layer.pth"
    assert _train(labelled, save, seed=0) == 0
    previous = {path: path.read_bytes() for path in _train_outputs(save)}

    with caplog.at_level(logging.ERROR), file_size_limit_here(limit):
        code = _train(labelled, save, seed=1)
    assert code == 1
    # Regression: the message was "training failed: OSError: [Errno 27] File too large", naming no file.
    assert "File too large; free space in" in caplog.text
    assert "or choose another --save_dir" in caplog.text
    assert f"cannot write '{save.parent}/layer." in caplog.text
    # the previous run's files are untouched and no temporary file is left
    assert {path: path.read_bytes() for path in _train_outputs(save)} == previous
    assert sorted(p.name for p in save.parent.iterdir()) == ["layer.json", "layer.png", "layer.pth"]


def test_train_full_tmpfs_writes_nothing(labelled, tmp_path, caplog):
    with small_tmpfs(tmp_path / "disk", "24k"):
        save = tmp_path / "disk" / "out" / "layer.pth"
        with caplog.at_level(logging.ERROR):
            code = _train(labelled, save)
        assert code == 1
        assert "No space left on device" in caplog.text
        assert not save.parent.exists() or list(save.parent.iterdir()) == []


def test_train_output_parent_is_file(labelled, tmp_path, capsys):
    # rejected with the arguments, before any data is loaded
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(SystemExit) as exit_info:
        _train(labelled, tmp_path / "a_file" / "layer.pth")
    assert exit_info.value.code == 2
    assert f"{str(tmp_path / 'a_file')!r} is a file, not a folder; choose another path" in capsys.readouterr().err
    assert (tmp_path / "a_file").read_text() == "not a folder"


# ----------------------------------------------------------------------------- evaluator


def _evaluate(labelled, *extra):
    features, list_path = labelled["heldout"]
    argv = ["--features_path", str(features), "--info_path", str(list_path), "--device", "cpu",
            *[str(a) for a in extra]]
    return evaluate.main(evaluate.get_args_parser().parse_args(argv))


@pytest.mark.parametrize("flag, name", [("--save_ranks", "ranks.json"), ("--save_ranks", "ranks.hdf5"),
                                        ("--save_json", "metrics.json")])
def test_evaluate_file_size_limit_leaves_nothing(labelled, tmp_path, caplog, flag, name):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with caplog.at_level(logging.ERROR), file_size_limit_here(1000):
        code = _evaluate(labelled, flag, out_dir / name)
    assert code == 1
    # Regression: an .hdf5 ranked-list file made the process crash at exit (HDF5 chunk cache),
    # and the message named no file.
    assert f"cannot write {str(out_dir / name)!r}: File too large; free space there or choose another path" in caplog.text
    assert list(out_dir.iterdir()) == []


def test_evaluate_subprocess_hdf5_ranks_limit_exits_1(labelled, tmp_path):
    # Regression: the failed HDF5 write left unwritten chunks in HDF5's cache, and the
    # process died of a segmentation fault at exit instead of exiting with status 1.
    features, list_path = labelled["heldout"]
    ranks = tmp_path / "out" / "ranks.hdf5"
    result = run(command(EVALUATE, ["--features_path", features, "--info_path", list_path, "--device", "cpu",
                                    "--save_ranks", ranks]), preexec_fn=file_size_limit(2000))
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert f"cannot write {str(ranks)!r}: File too large" in result.stderr
    assert list(ranks.parent.iterdir()) == []


@pytest.mark.parametrize("flag", ["--save_json", "--save_ranks"])
def test_evaluate_output_parent_is_file(labelled, tmp_path, capsys, monkeypatch, flag):
    # Regression: the search ran to the end before the write failed, with advice to free space.
    monkeypatch.setattr(evaluate, "evaluate_labelled_set", lambda **kwargs: pytest.fail("searched before the check"))
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(SystemExit) as exit_info:
        _evaluate(labelled, flag, tmp_path / "a_file" / "out.json")
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert f"{flag} {str(tmp_path / 'a_file' / 'out.json')!r}: {str(tmp_path / 'a_file')!r} is a file" in error
    assert "free space" not in error
    assert (tmp_path / "a_file").read_text() == "not a folder"


def test_evaluate_output_is_folder(labelled, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(evaluate, "evaluate_labelled_set", lambda **kwargs: pytest.fail("searched before the check"))
    (tmp_path / "metrics.json").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        _evaluate(labelled, "--save_json", tmp_path / "metrics.json")
    assert exit_info.value.code == 2
    assert f"--save_json {str(tmp_path / 'metrics.json')!r} is a folder" in capsys.readouterr().err
    assert (tmp_path / "metrics.json").is_dir()
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_evaluate_failed_json_still_writes_ranks(labelled, tmp_path, caplog, monkeypatch):
    # Regression: a failed --save_json write skipped --save_ranks.
    def fail(path, payload):
        raise OutputWriteError(f"cannot write {path!r}: Permission denied; choose another path")

    monkeypatch.setattr(evaluate, "write_json", fail)
    with caplog.at_level(logging.ERROR):
        code = _evaluate(labelled, "--save_json", tmp_path / "m.json", "--save_ranks", tmp_path / "r.json")
    assert code == 1
    assert "Permission denied; choose another path (the metrics are printed above)" in caplog.text
    assert json.loads((tmp_path / "r.json").read_text())["k"] == 100
