import json
import logging

import h5py
import numpy as np
import pytest
import torch

from feature_extraction.image_list import escape_id
from linear_adaptation.embedding_space import (
    MAX_LOGGED_DIFFERENCES,
    read_embedding_space,
    read_layer_space,
    space_differences,
    warn_if_spaces_differ,
)
from linear_adaptation.evaluate import get_args_parser, main
from linear_adaptation.synthetic import make_synthetic_dataset, write_split
from linear_adaptation.train_lin_adapt import run as train_run

DIM = 8
# the attributes extract.py writes for a timm model, as numpy values where h5py returns them
LITE0 = {
    "framework": "timm", "model": "tf_efficientnet_lite0", "pretrained": "", "pretrained_cfg": "tf_efficientnet_lite0.in1k",
    "checkpoint_sha256": "ab" * 32, "resolution": np.int64(256), "transforms": "RESIZE_LARGE", "min_size": np.int64(0),
    "pooling": "head", "multiscale": np.False_, "dtype": "float16", "list_sha256": "cd" * 32,
}


def _write_embeddings(path, ids, features, attributes=None):
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=features)
        f.create_dataset("index", data=np.array([escape_id(i) for i in ids], dtype=np.bytes_))
        for key, value in (attributes or {}).items():
            f.attrs[key] = value


def _unit_rows(rng, rows):
    x = rng.standard_normal((rows, DIM))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _evaluate(argv):
    return main(get_args_parser().parse_args([str(a) for a in argv]))


@pytest.fixture
def query_database(tmp_path):
    """Queries and two database shards, each with a positive of the first query."""
    rng = np.random.default_rng(5)
    _write_embeddings(tmp_path / "queries.hdf5", ["q/0.jpg", "q/1.jpg"], _unit_rows(rng, 2), LITE0)
    for shard in (1, 2):
        ids = [f"db/{shard}/{i}.jpg" for i in range(6)]
        _write_embeddings(tmp_path / f"db_{shard}.hdf5", ids, _unit_rows(rng, 6), LITE0)
    gt_path = tmp_path / "gt.json"
    gt_path.write_text(json.dumps({"q/0.jpg": ["db/1/0.jpg", "db/2/3.jpg"], "q/1.jpg": ["db/2/1.jpg"]}))
    return tmp_path, ["--query_hdf5", tmp_path / "queries.hdf5", "--db_hdf5", tmp_path / "db_{idx}.hdf5",
                      "--gt_path", gt_path, "--k", 5]


def test_read_space_plain_values(tmp_path):
    _write_embeddings(tmp_path / "a.hdf5", ["x.jpg"], np.ones((1, DIM), np.float32),
                      {**LITE0, "model": "vit_base_patch16_clip_224.openai"})
    space = read_embedding_space(tmp_path / "a.hdf5")

    assert space["model"] == "vit_base_patch16_clip_224"  # the tag is compared through pretrained_cfg
    assert space["resolution"] == 256
    assert type(space["resolution"]) is int
    assert space["multiscale"] is False
    # the list, storage precision and window do not define the space
    assert "list_sha256" not in space
    assert "dtype" not in space


def test_read_space_without_attributes(tmp_path):
    _write_embeddings(tmp_path / "ilias.hdf5", ["x.jpg"], np.ones((1, DIM), np.float32))

    assert read_embedding_space(tmp_path / "ilias.hdf5") == {}
    assert read_embedding_space(tmp_path / "missing.hdf5") == {}


def test_differences_only_shared_keys():
    older = {"model": "resnet50", "resolution": 224}
    newer = {"model": "resnet50", "resolution": 512, "pooling": "gem"}

    assert space_differences(older, newer) == ["resolution 224 against 512"]
    assert space_differences(newer, newer) == []


def test_evaluate_same_space_no_warning(query_database, caplog):
    _, argv = query_database
    with caplog.at_level(logging.WARNING):
        assert _evaluate(argv) == 0
    assert "extracted with different settings" not in caplog.text


def test_evaluate_warns_other_database_model(query_database, caplog):
    folder, argv = query_database
    with h5py.File(folder / "db_2.hdf5", "a") as f:
        f.attrs["model"] = "convnext_tiny"
        f.attrs["resolution"] = 512
    with caplog.at_level(logging.WARNING):
        assert _evaluate(argv) == 0

    warnings = [r.getMessage() for r in caplog.records if "extracted with different settings" in r.getMessage()]
    assert len(warnings) == 1
    assert str(folder / "db_2.hdf5") in warnings[0]
    assert "model 'tf_efficientnet_lite0' against 'convnext_tiny'" in warnings[0]
    assert "resolution 256 against 512" in warnings[0]


def test_evaluate_older_files_not_compared(query_database, caplog):
    folder, argv = query_database
    with h5py.File(folder / "db_1.hdf5", "a") as f:
        for key in list(f.attrs):
            del f.attrs[key]
    with caplog.at_level(logging.WARNING):
        assert _evaluate(argv) == 0
    assert "extracted with different settings" not in caplog.text


def _save_layer_with_record(folder, space):
    rng = np.random.default_rng(2)
    torch.save({"layer.weight": torch.from_numpy(rng.standard_normal((4, DIM)).astype(np.float32)),
                "layer.bias": torch.zeros(4)}, folder / "layer.pth")
    if space is not None:
        (folder / "layer.json").write_text(json.dumps({"embedding_space": space}))
    return folder / "layer.pth"


@pytest.mark.parametrize("record_space, warned", [
    ({"model": "convnext_tiny", "resolution": 256}, True),
    ({"model": "tf_efficientnet_lite0", "resolution": 256}, False),
    (None, False),  # a layer published without the trainer's record
])
def test_evaluate_layer_trained_elsewhere(query_database, caplog, record_space, warned):
    folder, argv = query_database
    layer_path = _save_layer_with_record(folder, record_space)
    with caplog.at_level(logging.WARNING):
        assert _evaluate([*argv, "--lin_adapt_path", layer_path]) == 0

    warnings = [r.getMessage() for r in caplog.records if "extracted with different settings" in r.getMessage()]
    assert len(warnings) == int(warned)
    if warned:
        assert "the layer's training embeddings" in warnings[0]
        assert "model 'tf_efficientnet_lite0' against 'convnext_tiny'" in warnings[0]


def test_labelled_set_layer_trained_elsewhere(tmp_path, caplog):
    rng = np.random.default_rng(8)
    ids = [f"c{label}/{i}.jpg" for label in range(3) for i in range(4)]
    _write_embeddings(tmp_path / "set.hdf5", ids, _unit_rows(rng, len(ids)), LITE0)
    (tmp_path / "set.txt").write_text("".join(f"{path},{n // 4},0\n" for n, path in enumerate(ids)))
    layer_path = _save_layer_with_record(tmp_path, {"pooling": "gem"})
    with caplog.at_level(logging.WARNING):
        code = _evaluate(["--features_path", tmp_path / "set.hdf5", "--info_path", tmp_path / "set.txt",
                          "--lin_adapt_path", layer_path])
    assert code == 0
    assert "pooling 'head' against 'gem'" in caplog.text


@pytest.fixture
def training_files(tmp_path):
    data = make_synthetic_dataset(num_train_images=400, num_train_classes=40, num_heldout_images=80,
                                  num_heldout_classes=8, dim=DIM, nuisance_rank=2, seed=4)
    write_split(data.train, tmp_path / "train.hdf5", tmp_path / "train.txt")
    write_split(data.heldout, tmp_path / "val.hdf5", tmp_path / "val.txt")
    for name in ("train.hdf5", "val.hdf5"):
        with h5py.File(tmp_path / name, "a") as f:
            f.attrs.update(LITE0)
    return tmp_path


def _train(folder, save_path):
    argv = ["--uned_features_path", folder / "train.hdf5", "--uned_info_path", folder / "train.txt",
            "--val_features_path", folder / "val.hdf5", "--val_info_path", folder / "val.txt",
            "--save_dir", save_path, "--adaptation_layer_dim", 4, "--batch_size", 32, "--num_epochs", 1,
            "--progress", "false"]
    return train_run([str(a) for a in argv])


def test_trainer_records_training_space(training_files, caplog):
    with caplog.at_level(logging.WARNING):
        assert _train(training_files, training_files / "out" / "layer.pth") == 0

    record = json.loads((training_files / "out" / "layer.json").read_text())
    assert record["embedding_space"] == read_embedding_space(training_files / "train.hdf5")
    assert record["embedding_space"]["model"] == "tf_efficientnet_lite0"
    assert "extracted with different settings" not in caplog.text


def test_trainer_warns_other_validation_space(training_files, caplog):
    with h5py.File(training_files / "val.hdf5", "a") as f:
        f.attrs["checkpoint_sha256"] = "ef" * 32
    with caplog.at_level(logging.WARNING):
        assert _train(training_files, training_files / "out" / "layer.pth") == 0

    assert f"the training file {str(training_files / 'train.hdf5')!r}" in caplog.text
    assert f"checkpoint_sha256 {'ab' * 32!r} against {'ef' * 32!r}" in caplog.text


def test_many_differing_shards_one_count(caplog):
    reference = ("the queries", {"model": "resnet50"})
    shards = [(f"shard {i}", {"model": "vit_small_patch16_224"}) for i in range(10)]
    with caplog.at_level(logging.WARNING):
        assert warn_if_spaces_differ(reference, shards) == 10

    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == MAX_LOGGED_DIFFERENCES + 1
    assert "shard 2" in messages[2]
    assert messages[-1] == f"{10 - MAX_LOGGED_DIFFERENCES} more files differ from the queries in their settings"


def test_read_space_bytes_attributes(tmp_path):
    # regression: strings stored as fixed-length bytes gave false warnings and an unwritable record
    as_bytes = {key: np.bytes_(value.encode()) if isinstance(value, str) else value for key, value in LITE0.items()}
    _write_embeddings(tmp_path / "bytes.hdf5", ["x.jpg"], np.ones((1, DIM), np.float32), as_bytes)
    _write_embeddings(tmp_path / "text.hdf5", ["x.jpg"], np.ones((1, DIM), np.float32), LITE0)

    space = read_embedding_space(tmp_path / "bytes.hdf5")
    assert space["model"] == "tf_efficientnet_lite0"
    assert space["framework"] == "timm"
    assert space_differences(space, read_embedding_space(tmp_path / "text.hdf5")) == []
    json.dumps(space)


def test_read_space_first_version_tag(tmp_path):
    # files of the first extractor version lack pretrained_cfg, and the typed tag is the only record of it
    first_version = {key: value for key, value in LITE0.items() if key != "pretrained_cfg"}
    for name, model in (("augreg", "vit_base_patch16_224.augreg_in21k"), ("orig", "vit_base_patch16_224.orig_in21k")):
        _write_embeddings(tmp_path / f"{name}.hdf5", ["x.jpg"], np.ones((1, DIM), np.float32),
                          {**first_version, "model": model})
    augreg = read_embedding_space(tmp_path / "augreg.hdf5")
    orig = read_embedding_space(tmp_path / "orig.hdf5")

    assert augreg["model"] == "vit_base_patch16_224"
    assert augreg["pretrained_cfg"] == "vit_base_patch16_224.augreg_in21k"
    assert space_differences(augreg, orig) == [
        "pretrained_cfg 'vit_base_patch16_224.augreg_in21k' against 'vit_base_patch16_224.orig_in21k'"
    ]


def test_layer_record_nested_too_deeply(tmp_path):
    (tmp_path / "layer.json").write_text("[" * 50_000)

    assert read_layer_space(tmp_path / "layer.json") == {}


def test_trainer_bytes_attributes_record(training_files, caplog):
    with h5py.File(training_files / "train.hdf5", "a") as f:
        for key in ("framework", "model", "pooling"):
            f.attrs[key] = np.bytes_(f.attrs[key].encode())
    with caplog.at_level(logging.WARNING):
        assert _train(training_files, training_files / "out" / "layer.pth") == 0

    record = json.loads((training_files / "out" / "layer.json").read_text())
    assert record["embedding_space"]["model"] == "tf_efficientnet_lite0"
    assert "extracted with different settings" not in caplog.text
