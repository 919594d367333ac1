"""Hostile and malformed image lists get the documented behaviour in all three commands.

Rejected lists stop extract.py, train_lin_adapt.py and evaluate.py with exit status 1 and
a message that names the list, the line number and the fix, before any output is
written. Lists that are only formatted differently (blank lines, Windows line endings,
a byte-order mark, spaces around fields) give the same result as the clean list.
"""
import logging

import numpy as np
import pytest
import torch

from feature_extraction.image_list import escape_id
from linear_adaptation import evaluate
from linear_adaptation.synthetic import make_synthetic_dataset, write_split
from linear_adaptation.train_lin_adapt import run as train_run

from conftest import write_image
from fault_injection import TINY_MODEL, extract_in_process, read_failure_report, read_hdf5

IMAGES = ["a/one.jpg", "a/two.png", "b/three.jpg", "b/货架.jpg"]
CLEAN_LINES = [f"{path},{i},{i % 2}" for i, path in enumerate(IMAGES)]

# (case, list bytes, the line number and the part of the message that must be reported)
REJECTED = [
    ("absolute_path", "a/one.jpg,0,0\n/etc/passwd,1,0\n", 2, "absolute path '/etc/passwd' is not allowed"),
    ("windows_drive", "a/one.jpg,0,0\nC:\\images\\x.jpg,1,0\n", 2, "absolute path 'C:\\\\images\\\\x.jpg'"),
    ("unc_path", "a/one.jpg,0,0\n\\\\server\\x.jpg,1,0\n", 2, "absolute path"),
    ("parent_folder", "a/one.jpg,0,0\n../outside.jpg,1,0\n", 2, "contains '..'"),
    ("parent_inside_path", "a/one.jpg,0,0\na/../../outside.jpg,1,0\n", 2, "contains '..'"),
    ("extra_columns", "a/one.jpg,0,0\na/two.png,1,0,extra\n", 2, "got 4 fields"),
    ("two_columns", "a/one.jpg,0,0\na/two.png,1\n", 2, "got 2 fields"),
    ("text_label", "a/one.jpg,0,0\na/two.png,cat,0\n", 2, "label 'cat' is not an integer"),
    ("float_domain", "a/one.jpg,0,0\na/two.png,1,0.5\n", 2, "domain '0.5' is not an integer"),
    ("duplicate_path", "a/one.jpg,0,0\na/two.png,1,0\na/one.jpg,2,0\n", 3,
     "duplicate path 'a/one.jpg' (first on line 1)"),
    # regression: two spellings of one id gave the HDF5 file duplicate ids
    ("same_id_twice", "b/货架.jpg,0,0\nb/#U8d27#U67b6.jpg,1,0\n", 2, "has the same HDF5 id 'b/#U8d27#U67b6.jpg'"),
    ("empty_path", "a/one.jpg,0,0\n,1,0\n", 2, "empty path"),
    # regression: a NUL byte ended the run with a ValueError traceback after the model was built
    ("nul_byte", "a/one.jpg,0,0\na/t\x00wo.png,1,0\n", 2, "contains the control character U+0000"),
    # regression: a byte-order mark inside the list (two lists joined with cat) became part of the id
    ("byte_order_mark_inside", "a/one.jpg,0,0\n\ufeffa/two.png,1,0\n", 2, "contains a byte-order mark (U+FEFF)"),
    ("tab_separated", "a/one.jpg,0,0\na/two.png\t1\t0\n", 2, "separate the fields of 'path,label,domain' with commas"),
    ("blank_lines_counted", "\n\n   \na/one.jpg,0,0\n/abs.jpg,1,0\n", 5, "absolute path"),
    ("crlf_line_counted", "a/one.jpg,0,0\r\n\r\na/two.png,x,0\r\n", 3, "label 'x' is not an integer"),
]


def _list_bytes(text: str) -> bytes:
    return text.encode("utf-8")


@pytest.fixture
def dataset(tmp_path):
    root = tmp_path / "images"
    for seed, relative in enumerate(IMAGES):
        write_image(root / relative, (48 + 8 * seed, 40), seed=seed)
    return root


def _extract(root, list_path, out_dir):
    code = extract_in_process("--dataset_dir", root, "--selected_ids", list_path, "--hdf5_dir", out_dir, *TINY_MODEL)
    return code, out_dir / "features_uned.hdf5"


# ------------------------------------------------------------------------------- extract.py


@pytest.mark.parametrize("content, line_no, message", [c[1:] for c in REJECTED], ids=[c[0] for c in REJECTED])
def test_extract_rejects_list_line(dataset, tmp_path, caplog, content, line_no, message):
    list_path = tmp_path / "list.txt"
    list_path.write_bytes(_list_bytes(content))
    with caplog.at_level(logging.ERROR):
        code, output = _extract(dataset, list_path, tmp_path / "out")
    assert code == 1
    assert f"{list_path}:{line_no}: " in caplog.text
    assert message in caplog.text
    assert not (tmp_path / "out").exists()


def test_extract_rejects_invalid_utf8(dataset, tmp_path, caplog):
    # Regression: a list saved in Latin-1 ended the run with a UnicodeDecodeError traceback.
    list_path = tmp_path / "list.txt"
    list_path.write_bytes(b"a/one.jpg,0,0\n\nb/caf\xe9.jpg,1,0\n")
    with caplog.at_level(logging.ERROR):
        code, _ = _extract(dataset, list_path, tmp_path / "out")
    assert code == 1
    assert f"{list_path}:3: invalid UTF-8 (byte 0xe9); save the list as UTF-8" in caplog.text
    assert not (tmp_path / "out").exists()


def test_extract_rejects_folder_with_same_id_twice(dataset, tmp_path, caplog):
    # Regression: without a list, a file and a file named with its escaped path both
    # got the same id in the HDF5 file.
    write_image(dataset / "b/#U8d27#U67b6.jpg", (40, 40), seed=9)
    with caplog.at_level(logging.ERROR):
        code = extract_in_process("--dataset_dir", dataset, "--hdf5_dir", tmp_path / "out", *TINY_MODEL)
    assert code == 1
    assert "'b/#U8d27#U67b6.jpg' and 'b/货架.jpg'" in caplog.text
    assert "have the same HDF5 id 'b/#U8d27#U67b6.jpg'" in caplog.text
    assert not (tmp_path / "out").exists()


def test_extract_rejects_empty_list(dataset, tmp_path, caplog):
    list_path = tmp_path / "list.txt"
    list_path.write_bytes(b"\xef\xbb\xbf\r\n  \r\n")
    with caplog.at_level(logging.ERROR):
        code, _ = _extract(dataset, list_path, tmp_path / "out")
    assert code == 1
    assert "the list contains no image paths" in caplog.text
    assert not (tmp_path / "out").exists()


FORMATS = [
    ("blank_lines", "\n" + "\n\n".join(CLEAN_LINES) + "\n  \n"),
    ("windows_line_endings", "\r\n".join(CLEAN_LINES) + "\r\n"),
    ("byte_order_mark", "\ufeff" + "\n".join(CLEAN_LINES) + "\n"),
    ("bom_crlf_blank_lines", "\ufeff\r\n" + "\r\n\r\n".join(CLEAN_LINES)),
    ("old_mac_line_endings", "\r".join(CLEAN_LINES) + "\r"),
    ("spaces_around_fields", "\n".join(" , ".join(line.split(",")) for line in CLEAN_LINES) + "\n"),
    ("path_only_lines", "\n".join(IMAGES) + "\n"),
]


@pytest.fixture
def clean_extraction(dataset, tmp_path):
    list_path = tmp_path / "clean.txt"
    list_path.write_text("\n".join(CLEAN_LINES) + "\n", encoding="utf-8")
    code, output = _extract(dataset, list_path, tmp_path / "clean")
    assert code == 0
    return read_hdf5(output)


@pytest.mark.parametrize("content", [f[1] for f in FORMATS], ids=[f[0] for f in FORMATS])
def test_extract_accepts_list_format(dataset, clean_extraction, tmp_path, content):
    list_path = tmp_path / "list.txt"
    list_path.write_bytes(_list_bytes(content))
    code, output = _extract(dataset, list_path, tmp_path / "out")
    assert code == 0
    features, ids, _ = read_hdf5(output)
    clean_features, clean_ids, _ = clean_extraction
    assert ids == clean_ids == [escape_id(p) for p in IMAGES]
    np.testing.assert_array_equal(features, clean_features)


def test_extract_list_larger_than_folder(dataset, tmp_path, caplog):
    # Listed files that do not exist are reported, not fatal, and the others keep their order.
    # Regression: a name longer than the file system allows (ENAMETOOLONG) ended the run.
    long_ascii, long_unicode = "a/" + "x" * 300 + ".jpg", "b/" + "货" * 100 + ".jpg"
    lines = ["a/one.jpg", "a/gone.jpg", "a/two.png", long_ascii, "b/three.jpg", long_unicode, "b/货架.jpg",
             "b/also_gone.jpg"]
    list_path = tmp_path / "list.txt"
    list_path.write_text("".join(f"{line},0,0\n" for line in lines), encoding="utf-8")
    code, output = _extract(dataset, list_path, tmp_path / "out")
    assert code == 0
    assert read_hdf5(output)[1] == [escape_id(p) for p in IMAGES]
    reasons = read_failure_report(output.with_name(output.name + ".failed.txt"))
    assert reasons == {
        "a/gone.jpg": "file not found",
        long_ascii: "cannot read file: File name too long",
        long_unicode: "cannot read file: File name too long",
        "b/also_gone.jpg": "file not found",
    }
    assert "skipping a/gone.jpg (list line 2): file not found" in caplog.text


# ------------------------------------------------------------- train_lin_adapt.py, evaluate.py


@pytest.fixture
def labelled(tmp_path):
    """Small synthetic train and held-out sets as HDF5 files and lists."""
    data = make_synthetic_dataset(num_train_images=240, num_train_classes=24, num_heldout_images=60,
                                  num_heldout_classes=12, dim=32, num_domains=2, seed=3)
    paths = {}
    for name, split in (("train", data.train), ("heldout", data.heldout)):
        paths[name] = (tmp_path / f"{name}.hdf5", tmp_path / f"{name}.txt")
        write_split(split, *paths[name])
    return paths


def _train(features, list_path, save, *extra):
    return train_run(["--uned_features_path", str(features), "--uned_info_path", str(list_path),
                      "--save_dir", str(save), "--num_epochs", "1", "--batch_size", "32",
                      "--adaptation_layer_dim", "16", "--device", "cpu", "--progress", "false", *extra])


def _evaluate(features, list_path, *extra):
    args = evaluate.get_args_parser().parse_args(
        ["--features_path", str(features), "--info_path", str(list_path), "--device", "cpu", *map(str, extra)]
    )
    return evaluate.main(args)


def _hostile_list(clean_list, tmp_path, line: str):
    """Insert `line` as line 3 of a copy of the clean list."""
    lines = clean_list.read_text(encoding="utf-8").splitlines(keepends=True)
    hostile = tmp_path / "hostile.txt"
    hostile.write_text("".join(lines[:2]) + line + "\n" + "".join(lines[2:]), encoding="utf-8")
    return hostile


TRAIN_REJECTED = [
    # the trainer has no --dataset_dir flag, so the advice names extract.py's
    ("absolute_path", "/data/x.jpg,1,0",
     "absolute path '/data/x.jpg' is not allowed; write paths relative to the image folder (extract.py's --dataset_dir)"),
    ("parent_folder", "../x.jpg,1,0", "contains '..' and could leave the image folder"),
    ("path_without_label", "train/extra.jpg", "has a path but no label and domain"),
    ("extra_columns", "train/extra.jpg,1,0,0", "got 4 fields"),
    ("text_label", "train/extra.jpg,one,0", "label 'one' is not an integer"),
    # Regression: the evaluator reported the path as missing from the HDF5 file, with an invisible prefix.
    ("byte_order_mark_inside", "\ufefftrain/extra.jpg,1,0", "contains a byte-order mark (U+FEFF)"),
    # Regression: labels beyond int64 ended in an OverflowError traceback without a line number.
    ("label_beyond_int64", "train/extra.jpg,99999999999999999999999,0",
     "label '99999999999999999999999' does not fit in a 64-bit integer"),
    ("domain_beyond_int64", "train/extra.jpg,1,-9223372036854775809",
     "domain '-9223372036854775809' does not fit in a 64-bit integer"),
]


@pytest.mark.parametrize("line, message", [c[1:] for c in TRAIN_REJECTED], ids=[c[0] for c in TRAIN_REJECTED])
def test_train_rejects_list_line(labelled, tmp_path, caplog, line, message):
    features, clean_list = labelled["train"]
    hostile = _hostile_list(clean_list, tmp_path, line)
    with caplog.at_level(logging.ERROR):
        code = _train(features, hostile, tmp_path / "out" / "layer.pth")
    assert code == 1
    assert f"{hostile}:3: " in caplog.text
    assert message in caplog.text
    assert not (tmp_path / "out").exists()


def test_train_swapped_list_and_hdf5(labelled, tmp_path, caplog):
    features, clean_list = labelled["train"]
    with caplog.at_level(logging.ERROR):
        code = _train(clean_list, features, tmp_path / "out" / "layer.pth")
    assert code == 1
    # the list is read first, so the HDF5 file in its place is named
    assert f"{str(features)!r} is an HDF5 file, not a list of 'path,label,domain' lines" in caplog.text
    assert "invalid UTF-8" not in caplog.text
    assert not (tmp_path / "out").exists()


def test_train_rejects_duplicate_path(labelled, tmp_path, caplog):
    features, clean_list = labelled["train"]
    first = clean_list.read_text(encoding="utf-8").splitlines()[0]
    hostile = _hostile_list(clean_list, tmp_path, first)
    with caplog.at_level(logging.ERROR):
        code = _train(features, hostile, tmp_path / "out" / "layer.pth")
    assert code == 1
    assert f"{hostile}:3: duplicate path" in caplog.text
    assert "(first on line 1)" in caplog.text
    assert not (tmp_path / "out").exists()


def test_train_accepts_bom_crlf_list(labelled, tmp_path):
    features, clean_list = labelled["train"]
    lines = clean_list.read_text(encoding="utf-8").splitlines()
    formatted = tmp_path / "formatted.txt"
    formatted.write_bytes(("\ufeff" + "\r\n\r\n".join(lines) + "\r\n").encode("utf-8"))

    assert _train(features, clean_list, tmp_path / "clean" / "layer.pth") == 0
    assert _train(features, formatted, tmp_path / "formatted" / "layer.pth") == 0
    clean = torch.load(tmp_path / "clean" / "layer.pth", weights_only=True)
    other = torch.load(tmp_path / "formatted" / "layer.pth", weights_only=True)
    assert torch.equal(clean["layer.weight"], other["layer.weight"])
    assert torch.equal(clean["layer.bias"], other["layer.bias"])


def test_train_rejects_invalid_utf8(labelled, tmp_path, caplog):
    # Regression: a Latin-1 list stopped the trainer with "UnicodeDecodeError" and no line number.
    features, clean_list = labelled["train"]
    hostile = tmp_path / "latin1.txt"
    hostile.write_bytes(clean_list.read_bytes() + b"train/caf\xe9.jpg,0,0\n")
    with caplog.at_level(logging.ERROR):
        code = _train(features, hostile, tmp_path / "out" / "layer.pth")
    assert code == 1
    assert f"{hostile}:241: invalid UTF-8" in caplog.text
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("line, message", [c[1:] for c in TRAIN_REJECTED], ids=[c[0] for c in TRAIN_REJECTED])
def test_evaluate_rejects_list_line(labelled, tmp_path, caplog, line, message):
    features, clean_list = labelled["heldout"]
    hostile = _hostile_list(clean_list, tmp_path, line)
    with caplog.at_level(logging.ERROR):
        code = _evaluate(features, hostile, "--save_json", tmp_path / "out" / "metrics.json")
    assert code == 1
    assert f"{hostile}:3: " in caplog.text
    assert message in caplog.text
    assert not (tmp_path / "out").exists()


def test_evaluate_rejects_invalid_utf8(labelled, tmp_path, caplog):
    # Regression: a Latin-1 list ended evaluate.py with a UnicodeDecodeError traceback.
    features, clean_list = labelled["heldout"]
    hostile = tmp_path / "latin1.txt"
    hostile.write_bytes(b"heldout/caf\xe9.jpg,0,0\n" + clean_list.read_bytes())
    with caplog.at_level(logging.ERROR):
        code = _evaluate(features, hostile, "--save_json", tmp_path / "out" / "metrics.json")
    assert code == 1
    assert f"{hostile}:1: invalid UTF-8" in caplog.text
    assert not (tmp_path / "out").exists()


def test_evaluate_accepts_bom_crlf_list(labelled, tmp_path, capsys):
    features, clean_list = labelled["heldout"]
    lines = clean_list.read_text(encoding="utf-8").splitlines()
    formatted = tmp_path / "formatted.txt"
    formatted.write_bytes(("\ufeff" + "\r\n".join(lines) + "\r\n\r\n").encode("utf-8"))

    assert _evaluate(features, clean_list) == 0
    clean_table = capsys.readouterr().out
    assert _evaluate(features, formatted) == 0
    assert capsys.readouterr().out == clean_table
    assert "mAP@100" in clean_table
