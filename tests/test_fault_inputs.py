"""Bad HDF5 embedding files and hostile checkpoints get clear errors and no output.

Every bad HDF5 file is given to the trainer (as training and as validation file) and to
the evaluator (labelled set, query file and database file). Each run must stop with exit
status 1 and a message naming the file, and must write nothing. A file that does not
exist is an invalid argument instead: exit status 2, with the flag named. HDF5 ids join to list
paths whether they were stored escaped (`#Uxxxx`) or as Unicode text.

Checkpoints that would run code when unpickled are rejected by every loader before the
code runs. A marker file that the pickled object's `__reduce__` would create shows this.
"""
import json
import logging
import re
import sys

import h5py
import numpy as np
import pytest
import torch

from feature_extraction.image_list import escape_id
from linear_adaptation import evaluate
from linear_adaptation.lin_adapt import LayerLoadError, LinearAdapter, load_lin_adapt_layer
from linear_adaptation.synthetic import make_synthetic_dataset, write_split
from linear_adaptation.train_lin_adapt import run as train_run

from conftest import write_image
from fault_injection import REPO_ROOT, TINY_MODEL, extract_in_process, marker_pickle, run

DIM = 32


@pytest.fixture
def labelled(tmp_path):
    """Synthetic train and held-out sets (32 dimensions) as HDF5 files and lists."""
    data = make_synthetic_dataset(num_train_images=240, num_train_classes=24, num_heldout_images=60,
                                  num_heldout_classes=12, dim=DIM, num_domains=2, seed=4)
    paths = {}
    for name, split in (("train", data.train), ("heldout", data.heldout)):
        paths[name] = (tmp_path / f"{name}.hdf5", tmp_path / f"{name}.txt")
        write_split(split, *paths[name])
    return paths


def _read(path):
    with h5py.File(path, "r") as f:
        return f["features"][()], [i.decode() for i in f["index"][()]]


def _write(path, features=None, ids=None, groups=()):
    with h5py.File(path, "w") as f:
        if features is not None:
            f.create_dataset("features", data=features)
        if ids is not None:
            f.create_dataset("index", data=np.array(ids, dtype=object), dtype=h5py.string_dtype())
        for name in groups:
            f.create_group(name)


def _corrupt_chunk(path, features, ids):
    # valid header and index, one compressed chunk of `features` overwritten
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=features, chunks=(16, features.shape[1]), compression="gzip")
        f.create_dataset("index", data=np.array(ids, dtype=object), dtype=h5py.string_dtype())
        chunk = f["features"].id.get_chunk_info(2)
    data = bytearray(path.read_bytes())
    data[chunk.byte_offset : chunk.byte_offset + 40] = b"\xff" * 40
    path.write_bytes(bytes(data))


def _unavailable_filter(path, features, ids):
    # gzip-compressed `features` whose filter id is then changed to 32001 (Blosc), a
    # plugin that h5py does not include, as in files compressed with hdf5plugin
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=features, chunks=(16, features.shape[1]), compression="gzip")
        f.create_dataset("index", data=np.array(ids, dtype=object), dtype=h5py.string_dtype())
    data = bytearray(path.read_bytes())
    assert data.count(b"deflate\x00") == 1
    # filter pipeline entry: id, name length, flags, number of values, then the name
    entry = data.find(b"deflate\x00") - 8
    data[entry : entry + 2] = (32001).to_bytes(2, "little")
    data[entry + 4 : entry + 6] = (0).to_bytes(2, "little")  # mandatory, so reading fails
    path.write_bytes(bytes(data))


def _with_value(features, row, value):
    bad = features.copy()
    bad[row, 3] = value
    return bad


# (case, writer of the bad file from the good features and ids, expected message part)
BAD_FILES = [
    ("missing_features", lambda p, x, i: _write(p, ids=i), "has no 'features' dataset"),
    ("missing_index", lambda p, x, i: _write(p, features=x), "has no 'index' dataset"),
    # regression: a group in place of a dataset raised TypeError, a traceback in both commands
    ("features_is_group", lambda p, x, i: _write(p, ids=i, groups=("features",)), "'features' is not a dataset"),
    ("nan_row", lambda p, x, i: _write(p, _with_value(x, 7, np.nan), i), ("row 7", "NaN or Inf")),
    ("inf_row", lambda p, x, i: _write(p, _with_value(x, 9, np.inf), i), ("row 9", "NaN or Inf")),
    ("zero_rows", lambda p, x, i: _write(p, x[:0], []), "'features' has zero rows"),
    # regression: N x 0 embeddings were accepted
    ("zero_dims", lambda p, x, i: _write(p, x[:, :0], i), "'features' has zero columns"),
    ("index_shorter", lambda p, x, i: _write(p, x, i[:-1]), f"'features' has {{rows}} rows but 'index' has"),
    ("integer_features", lambda p, x, i: _write(p, (x * 100).astype(np.int32), i), "expected float16/32/64"),
    ("truncated", lambda p, x, i: (_write(p, x, i), p.write_bytes(p.read_bytes()[:4000])), "was it written completely"),
    # regression: a damaged chunk raised a bare OSError, a traceback in evaluate.py
    ("corrupt_chunk", _corrupt_chunk, "the file is damaged"),
    ("unavailable_filter", _unavailable_filter, ("HDF5 filter", "id 32001", "HDF5_PLUGIN_PATH")),
    ("not_hdf5", lambda p, x, i: p.write_bytes(np.random.default_rng(0).bytes(5000)), "cannot open"),
    # regression: a list passed to the embeddings flag was reported as an incompletely written HDF5 file
    ("list_in_place", lambda p, x, i: p.write_text("".join(f"{image_id},0,0\n" for image_id in i), encoding="utf-8"),
     ("is a text file, not an HDF5 embedding file", "extract.py here, not a list")),
]


def _bad_copy(good_path, tmp_path, writer):
    features, ids = _read(good_path)
    bad = tmp_path / "bad.hdf5"
    writer(bad, features, ids)
    return bad, len(ids)


def _train(features, list_path, save, *extra):
    return train_run(["--uned_features_path", str(features), "--uned_info_path", str(list_path),
                      "--save_dir", str(save), "--num_epochs", "1", "--batch_size", "32",
                      "--adaptation_layer_dim", "16", "--device", "cpu", "--progress", "false",
                      *[str(a) for a in extra]])


def _evaluate(*argv):
    return evaluate.main(evaluate.get_args_parser().parse_args(["--device", "cpu", *[str(a) for a in argv]]))


def _assert_error(caplog, path, message, rows):
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors
    assert str(path) in errors[0]
    for part in (message,) if isinstance(message, str) else message:
        assert part.format(rows=rows) in errors[0]


CASE_IDS = [case[0] for case in BAD_FILES]
CASE_ARGS = [case[1:] for case in BAD_FILES]


@pytest.mark.parametrize("role", ["train", "validation"])
@pytest.mark.parametrize("writer, message", CASE_ARGS, ids=CASE_IDS)
def test_train_rejects_bad_hdf5(labelled, tmp_path, caplog, role, writer, message):
    train_features, train_list = labelled["train"]
    val_features, val_list = labelled["heldout"]
    if role == "train":
        bad, rows = _bad_copy(train_features, tmp_path, writer)
        train_features = bad
    else:
        bad, rows = _bad_copy(val_features, tmp_path, writer)
        val_features = bad
    with caplog.at_level(logging.ERROR):
        code = _train(train_features, train_list, tmp_path / "out" / "layer.pth",
                      "--val_features_path", val_features, "--val_info_path", val_list)
    assert code == 1
    _assert_error(caplog, bad, message, rows)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("writer, message", CASE_ARGS, ids=CASE_IDS)
def test_evaluate_labelled_set_rejects_bad_hdf5(labelled, tmp_path, caplog, writer, message):
    features, list_path = labelled["heldout"]
    bad, rows = _bad_copy(features, tmp_path, writer)
    with caplog.at_level(logging.ERROR):
        code = _evaluate("--features_path", bad, "--info_path", list_path, "--save_json", tmp_path / "out/m.json")
    assert code == 1
    _assert_error(caplog, bad, message, rows)
    assert not (tmp_path / "out").exists()


def _ground_truth(tmp_path, query_ids, database_ids):
    gt = {query: [database_ids[i % len(database_ids)], database_ids[(i + 3) % len(database_ids)]]
          for i, query in enumerate(query_ids)}
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt, ensure_ascii=False), encoding="utf-8")
    return path


@pytest.mark.parametrize("role", ["query", "database"])
@pytest.mark.parametrize("writer, message", CASE_ARGS, ids=CASE_IDS)
def test_evaluate_query_database_rejects_bad_hdf5(labelled, tmp_path, caplog, role, writer, message):
    query_features, _ = labelled["heldout"]
    database_features, _ = labelled["train"]
    gt = _ground_truth(tmp_path, _read(query_features)[1][:10], _read(database_features)[1])
    bad, rows = _bad_copy(query_features if role == "query" else database_features, tmp_path, writer)
    if role == "query":
        query_features = bad
    else:
        database_features = bad
    with caplog.at_level(logging.ERROR):
        code = _evaluate("--query_hdf5", query_features, "--db_hdf5", database_features, "--gt_path", gt,
                         "--k", "20", "--save_ranks", tmp_path / "out/ranks.npz")
    assert code == 1
    _assert_error(caplog, bad, message, rows)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command, flag", [("train", "--uned_features_path"), ("train", "--val_features_path"),
                                           ("evaluate", "--features_path"), ("evaluate", "--query_hdf5"),
                                           ("evaluate", "--db_hdf5")])
def test_missing_hdf5_exit_2(labelled, tmp_path, capsys, command, flag):
    train_features, train_list = labelled["train"]
    val_features, val_list = labelled["heldout"]
    gt = _ground_truth(tmp_path, _read(val_features)[1][:10], _read(train_features)[1])
    missing = tmp_path / "missing.hdf5"
    if command == "train":
        argv = {"--uned_features_path": train_features, "--val_features_path": val_features}
        argv[flag] = missing
        call = lambda: _train(argv["--uned_features_path"], train_list, tmp_path / "out" / "layer.pth",
                              "--val_features_path", argv["--val_features_path"], "--val_info_path", val_list)
    elif flag == "--features_path":
        call = lambda: _evaluate("--features_path", missing, "--info_path", val_list)
    else:
        argv = {"--query_hdf5": val_features, "--db_hdf5": train_features}
        argv[flag] = missing
        call = lambda: _evaluate("--query_hdf5", argv["--query_hdf5"], "--db_hdf5", argv["--db_hdf5"], "--gt_path", gt)
    with pytest.raises(SystemExit) as exit_info:
        call()
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert flag in error
    assert f"{str(missing)!r}" in error
    assert "not found; check the path" in error or "does not exist; check the path" in error
    assert not (tmp_path / "out").exists()


def test_train_validation_dimension_mismatch_names_files(labelled, tmp_path, caplog):
    train_features, train_list = labelled["train"]
    val_features, val_list = labelled["heldout"]
    features, ids = _read(val_features)
    narrow = tmp_path / "narrow.hdf5"
    _write(narrow, features[:, :16], ids)
    with caplog.at_level(logging.ERROR):
        code = _train(train_features, train_list, tmp_path / "out/layer.pth",
                      "--val_features_path", narrow, "--val_info_path", val_list)
    assert code == 1
    # Regression: the message named neither file.
    assert f"validation embeddings have dimension 16 but training embeddings {DIM}" in caplog.text
    assert f"validation file {str(narrow)!r}, training file {str(train_features)!r}" in caplog.text
    assert "extract both with the same backbone" in caplog.text
    assert not (tmp_path / "out").exists()


def test_evaluate_database_dimension_mismatch(labelled, tmp_path, caplog):
    query_features, _ = labelled["heldout"]
    database_features, _ = labelled["train"]
    features, ids = _read(database_features)
    narrow = tmp_path / "narrow.hdf5"
    _write(narrow, features[:, :16], ids)
    gt = _ground_truth(tmp_path, _read(query_features)[1][:5], ids)
    with caplog.at_level(logging.ERROR):
        code = _evaluate("--query_hdf5", query_features, "--db_hdf5", narrow, "--gt_path", gt,
                         "--save_json", tmp_path / "out/m.json")
    assert code == 1
    # Regression: the message named the query file but not the database files.
    assert f"queries in {str(query_features)!r} have {DIM} dimensions but the database has 16" in caplog.text
    assert f"({str(narrow)!r})" in caplog.text
    assert "embed both with the same backbone" in caplog.text
    assert not (tmp_path / "out").exists()


def test_evaluate_layer_dimension_mismatch(labelled, tmp_path, caplog):
    features, list_path = labelled["heldout"]
    layer = tmp_path / "layer16.pth"
    torch.save(LinearAdapter(16, 8).state_dict(), layer)
    with caplog.at_level(logging.ERROR):
        code = _evaluate("--features_path", features, "--info_path", list_path, "--lin_adapt_path", layer,
                         "--save_json", tmp_path / "out/m.json")
    assert code == 1
    assert f"{str(layer)!r} maps 16-dimensional embeddings but the embeddings have {DIM} dimensions" in caplog.text
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------- escaped and Unicode ids


@pytest.fixture
def unicode_sets(tmp_path):
    """Train and held-out sets whose paths contain non-ASCII characters, lists in Unicode."""
    data = make_synthetic_dataset(num_train_images=240, num_train_classes=24, num_heldout_images=60,
                                  num_heldout_classes=12, dim=DIM, num_domains=2, seed=5)
    sets = {}
    for name, split in (("train", data.train), ("heldout", data.heldout)):
        paths = [f"货架/{path.replace('class', 'café')}" for path in split.ids]
        list_path = tmp_path / f"{name}.txt"
        list_path.write_text("".join(f"{p},{label},{domain}\n" for p, label, domain in
                                     zip(paths, split.labels.tolist(), split.domains.tolist())), encoding="utf-8")
        escaped_list = tmp_path / f"{name}_escaped.txt"
        escaped_list.write_text(list_path.read_text(encoding="utf-8").replace("货架", escape_id("货架"))
                                .replace("café", escape_id("café")), encoding="utf-8")
        escaped_hdf5, unicode_hdf5 = tmp_path / f"{name}_escaped.hdf5", tmp_path / f"{name}_unicode.hdf5"
        _write(escaped_hdf5, split.features, [escape_id(p) for p in paths])
        _write(unicode_hdf5, split.features, paths)
        sets[name] = {"list": list_path, "escaped_list": escaped_list,
                      "escaped": escaped_hdf5, "unicode": unicode_hdf5}
    return sets


ID_FORMS = [("escaped", "list"), ("unicode", "list"), ("escaped", "escaped_list"), ("unicode", "escaped_list")]


def test_train_joins_escaped_and_unicode_ids(unicode_sets, tmp_path):
    layers = []
    for hdf5_form, list_form in ID_FORMS:
        train, val = unicode_sets["train"], unicode_sets["heldout"]
        save = tmp_path / f"{hdf5_form}_{list_form}" / "layer.pth"
        code = _train(train[hdf5_form], train[list_form], save,
                      "--val_features_path", val[hdf5_form], "--val_info_path", val[list_form])
        assert code == 0, (hdf5_form, list_form)
        layers.append(torch.load(save, weights_only=True))
        record = json.loads(save.with_suffix(".json").read_text())
        assert record["num_images"] == 240
        assert record["num_val_images"] == 60
    for layer in layers[1:]:
        assert torch.equal(layer["layer.weight"], layers[0]["layer.weight"])


def test_evaluate_joins_escaped_and_unicode_ids(unicode_sets, capsys):
    tables = []
    for hdf5_form, list_form in ID_FORMS:
        held_out = unicode_sets["heldout"]
        assert _evaluate("--features_path", held_out[hdf5_form], "--info_path", held_out[list_form]) == 0
        tables.append(capsys.readouterr().out)
    assert all(table == tables[0] for table in tables)


def test_evaluate_ground_truth_ids_in_either_form(unicode_sets, tmp_path, capsys):
    queries, database = unicode_sets["heldout"], unicode_sets["train"]
    query_ids = _read(queries["unicode"])[1][:8]
    database_ids = _read(database["unicode"])[1]
    unicode_gt = _ground_truth(tmp_path, query_ids, database_ids)
    escaped_gt = tmp_path / "gt_escaped.json"
    escaped_gt.write_text(json.dumps({escape_id(q): [escape_id(d) for d in ds]
                                      for q, ds in json.loads(unicode_gt.read_text()).items()}))
    tables = []
    for gt in (unicode_gt, escaped_gt):
        for query_form, database_form in (("escaped", "unicode"), ("unicode", "escaped")):
            code = _evaluate("--query_hdf5", queries[query_form], "--db_hdf5", database[database_form],
                             "--gt_path", gt, "--k", "50")
            assert code == 0
            tables.append(capsys.readouterr().out)
    assert re.search(r"all queries +8 ", tables[0]), tables[0]
    assert all(table == tables[0] for table in tables)


# ---------------------------------------------------------------------------- checkpoints


@pytest.fixture
def malicious(tmp_path):
    """Checkpoints in torch's zip and legacy formats whose unpickling would create `marker`."""
    marker = tmp_path / "marker_created"
    zip_format = marker_pickle(tmp_path / "evil.pth", marker)
    legacy = tmp_path / "evil_legacy.pth"
    marker_pickle(legacy, marker, legacy_format=True)
    return [zip_format, legacy], marker


def test_malicious_layer_rejected_by_loader(malicious):
    files, marker = malicious
    for path in files:
        with pytest.raises(LayerLoadError, match=r"rejected by torch.load\(weights_only=True\)"):
            load_lin_adapt_layer(path)
    assert not marker.exists()


def test_malicious_layer_rejected_by_evaluate(malicious, labelled, tmp_path, caplog):
    files, marker = malicious
    features, list_path = labelled["heldout"]
    for path in files:
        with caplog.at_level(logging.ERROR):
            code = _evaluate("--features_path", features, "--info_path", list_path, "--lin_adapt_path", path,
                             "--save_json", tmp_path / "out/m.json")
        assert code == 1
        assert "rejected by torch.load(weights_only=True)" in caplog.text
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


@pytest.fixture
def one_image(tmp_path):
    root = tmp_path / "images"
    write_image(root / "a.jpg", (48, 40))
    list_path = tmp_path / "list.txt"
    list_path.write_text("a.jpg,0,0\n")
    return root, list_path


def _extract_with_checkpoint(one_image, tmp_path, checkpoint):
    root, list_path = one_image
    return extract_in_process("--dataset_dir", root, "--selected_ids", list_path, "--hdf5_dir", tmp_path / "out",
                              *TINY_MODEL, "--checkpoint", checkpoint)


def test_malicious_checkpoint_rejected_by_extract(malicious, one_image, tmp_path, caplog):
    files, marker = malicious
    for path in files:
        with caplog.at_level(logging.ERROR):
            code = _extract_with_checkpoint(one_image, tmp_path, path)
        assert code == 1
        assert "rejected by torch.load(weights_only=True)" in caplog.text
    assert not marker.exists()
    assert not (tmp_path / "out" / "features_uned.hdf5").exists()


def test_malicious_checkpoint_rejected_by_converter(malicious, tmp_path):
    files, marker = malicious
    for path in files:
        result = run([sys.executable, str(REPO_ROOT / "misc/convert_efficientnet_lite0.py"),
                      "--source", str(path), "--output", str(tmp_path / "converted.pth")])
        assert result.returncode != 0
        assert "Weights only load failed" in result.stderr
    assert not marker.exists()
    assert not (tmp_path / "converted.pth").exists()


def _test_vit_state_dict():
    import timm

    return timm.create_model("test_vit", pretrained=False, num_classes=0).state_dict()


def _one_tensor_halved(state):
    key = next(k for k, v in state.items() if v.ndim and v.shape[0] > 1)
    return {**state, key: state[key][: state[key].shape[0] // 2]}


CHECKPOINT_CASES = [
    ("not_a_state_dict", lambda: torch.zeros(3), "does not contain a state dict (got Tensor)"),
    ("other_model_keys", lambda: LinearAdapter(8, 4).state_dict(), "does not match the model"),
    ("missing_key", lambda: {k: v for i, (k, v) in enumerate(_test_vit_state_dict().items()) if i},
     "1 missing keys"),
    ("wrong_shape", lambda: _one_tensor_halved(_test_vit_state_dict()), "1 keys with other shapes"),
    ("non_tensor_entry", lambda: {**_test_vit_state_dict(), "epoch": 3}, "has entries that are not tensors"),
]


@pytest.mark.parametrize("make, message", [c[1:] for c in CHECKPOINT_CASES], ids=[c[0] for c in CHECKPOINT_CASES])
def test_extract_checkpoint_mismatch(one_image, tmp_path, caplog, make, message):
    checkpoint = tmp_path / "weights.pth"
    torch.save(make(), checkpoint)
    with caplog.at_level(logging.ERROR):
        code = _extract_with_checkpoint(one_image, tmp_path, checkpoint)
    assert code == 1
    assert message in caplog.text
    assert str(checkpoint) in caplog.text
    assert not (tmp_path / "out" / "features_uned.hdf5").exists()


UNREADABLE_CHECKPOINTS = [
    ("empty_file", lambda path: path.write_bytes(b"")),
    ("random_bytes", lambda path: path.write_bytes(np.random.default_rng(1).bytes(4096))),
    ("truncated", lambda path: (torch.save(_test_vit_state_dict(), path),
                                path.write_bytes(path.read_bytes()[:3000]))),
    ("text_file", lambda path: path.write_text("layer.weight = [[1, 2], [3, 4]]\n")),
]


@pytest.mark.parametrize("make", [c[1] for c in UNREADABLE_CHECKPOINTS], ids=[c[0] for c in UNREADABLE_CHECKPOINTS])
def test_extract_unreadable_checkpoint(one_image, tmp_path, caplog, make):
    checkpoint = tmp_path / "weights.pth"
    make(checkpoint)
    with caplog.at_level(logging.ERROR):
        code = _extract_with_checkpoint(one_image, tmp_path, checkpoint)
    assert code == 1
    assert f"cannot read --checkpoint {str(checkpoint)!r}" in caplog.text
    # only a file that unpickles to something other than tensors is called that
    assert "objects other than tensors" not in caplog.text
    assert not (tmp_path / "out" / "features_uned.hdf5").exists()


@pytest.mark.parametrize("make", [c[1] for c in UNREADABLE_CHECKPOINTS], ids=[c[0] for c in UNREADABLE_CHECKPOINTS])
def test_evaluate_unreadable_layer(labelled, tmp_path, caplog, make):
    features, list_path = labelled["heldout"]
    layer = tmp_path / "layer.pth"
    make(layer)
    with caplog.at_level(logging.ERROR):
        code = _evaluate("--features_path", features, "--info_path", list_path, "--lin_adapt_path", layer)
    assert code == 1
    assert f"cannot read {str(layer)!r} as a torch file" in caplog.text
