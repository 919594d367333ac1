"""End-to-end runs of extract.py's main() on generated images with small random-weight models."""
import argparse
import logging
import shutil
import signal
import unicodedata

import h5py
import numpy as np
import pytest
import torch

from feature_extraction.existing_output import index_mismatch
from feature_extraction.extract import bool_flag, check_args, get_args_parser, main
from feature_extraction.image_list import escape_id

from conftest import raise_wrapped_signal, write_image

TINY = ["--framework", "timm", "--model", "resnet10t", "--pretrained", "none", "--resolution", "32",
        "--num_workers", "0", "--batch_size", "3", "--window_size", "4"]


def run_cli(*argv: str) -> int:
    parser = get_args_parser()
    args = parser.parse_args([str(a) for a in argv])
    check_args(parser, args)
    return main(args)


def read_output(path):
    with h5py.File(path, "r") as f:
        return f["features"][:], [i.decode("ascii") for i in f["index"][:]], dict(f.attrs)


@pytest.fixture
def extract(sample_dataset, tmp_path):
    """Run extraction on the sample list into tmp_path/<name>; return (exit code, output path)."""
    root, list_path, _ = sample_dataset

    def run(*extra, name="out", list_file=None):
        out_dir = tmp_path / name
        code = run_cli("--dataset_dir", root, "--selected_ids", list_file or list_path, "--hdf5_dir", out_dir,
                       *TINY, *extra)
        return code, out_dir / "features_uned.hdf5"

    return run


def test_rows_and_ids_follow_list_order(extract, sample_dataset):
    _, _, paths = sample_dataset
    code, output = extract()
    features, ids, attrs = read_output(output)
    assert code == 0
    assert ids == [escape_id(p) for p in paths]
    assert features.shape == (10, 512)
    assert features.dtype == np.float16
    assert np.allclose(np.linalg.norm(features.astype(np.float32), axis=1), 1.0, atol=2e-3)
    assert len({row.tobytes() for row in features}) == 10


def test_index_is_ascii_with_escaped_unicode(extract):
    _, output = extract()
    with h5py.File(output, "r") as f:
        assert h5py.check_string_dtype(f["index"].dtype).encoding == "ascii"
        ids = [i.decode("ascii") for i in f["index"][:]]
    assert "c/#U8d27#U67b6/#U82f9#U679c.jpg" in ids
    assert "c/caf#U00e9.jpg" in ids


def test_attributes_record_settings(extract, sample_dataset):
    _, list_path, _ = sample_dataset
    _, output = extract()
    _, _, attrs = read_output(output)
    assert attrs["framework"] == "timm"
    assert attrs["model"] == "resnet10t"
    assert attrs["pretrained"] == "none"
    assert attrs["resolution"] == 32
    assert attrs["transforms"] == "RESIZE_LARGE"
    assert attrs["pooling"] == "head"
    assert attrs["dtype"] == "float16"
    assert attrs["num_images"] == 10
    assert attrs["num_failed"] == 0
    assert attrs["torch_version"] == str(torch.__version__)
    from feature_extraction.image_list import file_sha256

    assert attrs["list_sha256"] == file_sha256(list_path)


def test_no_leftovers_after_success(extract):
    _, output = extract()
    assert sorted(p.name for p in output.parent.iterdir()) == ["features_uned.hdf5"]


def test_escaped_name_on_disk_is_read(extract, sample_dataset):
    root, _, _ = sample_dataset
    unicode_path = root / "c/货架/苹果.jpg"
    escaped_path = root / escape_id("c/货架/苹果.jpg")
    escaped_path.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(unicode_path, escaped_path)
    code, output = extract()
    _, ids, attrs = read_output(output)
    assert code == 0
    assert attrs["num_failed"] == 0
    assert escape_id("c/货架/苹果.jpg") in ids


def test_other_spellings_in_list_are_read(extract, sample_dataset, tmp_path):
    # Regression: a list rebuilt from an HDF5 index (escaped names) and a decomposed file name
    # copied from macOS both gave "file not found"
    root, list_path, paths = sample_dataset
    shutil.move(root / "c/café.jpg", root / unicodedata.normalize("NFD", "c/café.jpg"))
    listed = [escape_id(p) if p.startswith("c/货架") else p for p in paths]
    rebuilt = tmp_path / "rebuilt.txt"
    rebuilt.write_text("".join(f"{p},0,0\n" for p in listed), encoding="utf-8")

    code, output = extract(list_file=rebuilt)
    _, ids, attrs = read_output(output)
    assert code == 0
    assert attrs["num_failed"] == 0
    assert ids == [escape_id(p) for p in paths]


def test_failed_images_reported_rows_aligned(extract, sample_dataset, tmp_path):
    root, _, paths = sample_dataset
    _, clean_output = extract(name="clean")
    clean_features, clean_ids, _ = read_output(clean_output)

    (root / "bad").mkdir()
    (root / "bad/empty.jpg").write_bytes(b"")
    (root / "bad/noise.jpg").write_bytes(np.random.default_rng(0).bytes(500))
    bad = ["bad/missing.jpg", "bad/empty.jpg", "bad/noise.jpg"]
    # two bad rows fill one window of 4 with the first bad row, so a window has no image left
    listed = paths[:1] + bad[:1] + paths[1:4] + bad[1:] + paths[4:]
    list_path = tmp_path / "with_bad.txt"
    list_path.write_text("".join(f"{p},0,0\n" for p in listed), encoding="utf-8")

    code, output = extract(name="bad", list_file=list_path)
    features, ids, attrs = read_output(output)
    assert code == 0
    assert ids == clean_ids
    # other windows form other batches, so only float16 rounding may differ
    np.testing.assert_allclose(features.astype(np.float32), clean_features.astype(np.float32), atol=1e-3)
    assert attrs["num_failed"] == 3

    report = output.with_name(output.name + ".failed.txt").read_text(encoding="utf-8").splitlines()
    assert [line.split(",", 1)[0] for line in report] == bad
    assert report[0].endswith(",file not found")
    assert report[1].endswith(",empty file (0 bytes)")
    assert "not an image" in report[2]


def test_skip_warns_positional_readers(extract, sample_dataset, tmp_path, caplog):
    _, list_path, paths = sample_dataset
    lines = list_path.read_text(encoding="utf-8").splitlines()
    with_missing = tmp_path / "with_missing.txt"
    with_missing.write_text("\n".join([lines[0], "absent.jpg,0,0", *lines[1:]]) + "\n", encoding="utf-8")

    with caplog.at_level(logging.WARNING):
        code, output = extract(name="missing", list_file=with_missing)
    _, ids, _ = read_output(output)
    assert code == 0
    # a reader that pairs row i with list line i now gives row 1 the label of absent.jpg
    assert ids[1] == escape_id(paths[1])
    assert "pairs rows with list lines by position" in caplog.text


def test_all_images_unreadable_fails(tmp_path):
    (tmp_path / "images").mkdir()
    list_path = tmp_path / "list.txt"
    list_path.write_text("a.jpg,0,0\nb.jpg,0,0\n")
    code = run_cli("--dataset_dir", tmp_path / "images", "--selected_ids", list_path, "--hdf5_dir", tmp_path / "out",
                   *TINY)
    assert code == 1
    assert not (tmp_path / "out/features_uned.hdf5").exists()
    assert not (tmp_path / "out/features_uned.hdf5.parts").exists()
    assert (tmp_path / "out/features_uned.hdf5.failed.txt").read_text().count("file not found") == 2


def test_all_images_unreadable_names_paths(tmp_path, monkeypatch, caplog):
    # a relative --dataset_dir is resolved against the working folder, so the message shows both
    (tmp_path / "images").mkdir()
    list_path = tmp_path / "list.txt"
    list_path.write_text("a.jpg,0,0\nb.jpg,0,0\n")
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.ERROR):
        code = run_cli("--dataset_dir", "images", "--selected_ids", list_path, "--hdf5_dir", tmp_path / "out", *TINY)
    assert code == 1
    assert "none of the 2 images could be read" in caplog.text
    assert f"first reason: file not found, for {tmp_path / 'images/a.jpg'}" in caplog.text
    assert "--dataset_dir 'images'" in caplog.text


@pytest.mark.parametrize("bad_path", ["../outside.jpg", "/etc/passwd", "a/../../outside.jpg"])
def test_path_escaping_dataset_dir_rejected(extract, tmp_path, bad_path, caplog):
    list_path = tmp_path / "escape.txt"
    list_path.write_text(f"a/landscape_0.jpg,0,0\n{bad_path},0,0\n")
    with caplog.at_level(logging.ERROR):
        code, output = extract(list_file=list_path)
    assert code == 1
    assert not output.exists()
    assert "escape.txt:2" in caplog.text


def test_stale_failure_report_removed(extract):
    code, output = extract()
    report = output.with_name(output.name + ".failed.txt")
    report.write_text("old,stale\n")
    code, _ = extract("--overwrite", "true")
    assert code == 0
    assert not report.exists()


def test_existing_output_left_untouched(extract, caplog):
    _, output = extract()
    before = output.read_bytes()
    parts = output.with_name(output.name + ".parts")
    parts.mkdir()
    (parts / "window_000000.npz").write_bytes(b"leftover")
    with caplog.at_level(logging.INFO):
        code, _ = extract()
    assert code == 0
    assert output.read_bytes() == before
    assert "left untouched" in caplog.text
    assert not parts.exists()


@pytest.mark.parametrize("extra, difference", [
    (["--resolution", "40"], "resolution: 32 in the file, 40 now"),
    (["--model", "resnet14t"], "model: 'resnet10t' in the file, 'resnet14t' now"),
    (["--store_fp16", "false"], "dtype: 'float16' in the file, 'float32' now"),
])
def test_existing_output_with_other_settings_exit_two(extract, caplog, extra, difference):
    # Regression: an existing output made every other flag irrelevant, and a rerun with other
    # settings exited 0 with the old embeddings
    _, output = extract()
    before = output.read_bytes()
    with caplog.at_level(logging.ERROR):
        code, _ = extract(*extra)
    assert code == 2
    assert difference in caplog.text
    assert "--overwrite true" in caplog.text
    assert output.read_bytes() == before


def test_existing_output_other_window_size_kept(extract, caplog):
    # the window size only groups rows into resumable parts, so it does not define the embeddings
    _, output = extract()
    before = output.read_bytes()
    with caplog.at_level(logging.INFO):
        code, _ = extract("--window_size", "3")
    assert code == 0
    assert output.read_bytes() == before
    assert "left untouched" in caplog.text


def test_existing_output_other_list_exit_two(extract, sample_dataset, tmp_path, caplog):
    _, list_path, _ = sample_dataset
    _, output = extract()
    shorter = tmp_path / "shorter.txt"
    shorter.write_text("".join(list_path.read_text().splitlines(keepends=True)[:5]))
    with caplog.at_level(logging.ERROR):
        code, _ = extract(list_file=shorter)
    assert code == 2
    assert "list_paths_sha256" in caplog.text


def test_existing_output_still_checks_inputs(extract, tmp_path, caplog):
    _, output = extract()
    before = output.read_bytes()
    with caplog.at_level(logging.ERROR):
        missing_list, _ = extract(list_file=tmp_path / "missing.txt")
        missing_checkpoint, _ = extract("--checkpoint", tmp_path / "missing.pth")
    assert missing_list == 1
    assert "missing.txt" in caplog.text
    assert missing_checkpoint == 1
    assert "missing.pth" in caplog.text
    assert output.read_bytes() == before


def test_existing_ilias_output_without_attributes_kept(extract, caplog):
    _, output = extract()
    with h5py.File(output, "a") as f:
        for key in list(f.attrs):
            del f.attrs[key]
    before = output.read_bytes()
    with caplog.at_level(logging.INFO):
        code, _ = extract("--resolution", "40")
    assert code == 0
    assert output.read_bytes() == before
    assert "files of the older ILIAS tools record no settings" in caplog.text
    assert "left untouched" in caplog.text
    assert "only its ids were compared with the list" in caplog.text
    assert "exists with the same settings" not in caplog.text


def _remove_attributes(output):
    """Make `output` look like a file of the older ILIAS extractor, which records no settings."""
    with h5py.File(output, "a") as f:
        for key in list(f.attrs):
            del f.attrs[key]


def _write_list(path, image_paths):
    path.write_text("".join(f"{p},0,0\n" for p in image_paths), encoding="utf-8")
    return path


def test_existing_ilias_output_other_images_exit_two(extract, sample_dataset, tmp_path, caplog):
    # Regression: a file without settings was kept for any list, and the log stated that the settings matched
    root, _, paths = sample_dataset
    _, output = extract()
    _remove_attributes(output)
    before = output.read_bytes()
    others = [f"d/other_{i}.jpg" for i in range(4)]
    for seed, relative in enumerate(others):
        write_image(root / relative, (48, 40), seed=100 + seed)

    with caplog.at_level(logging.INFO):
        code, _ = extract(list_file=_write_list(tmp_path / "others.txt", others))
    assert code == 2
    assert f"{output} records no settings" in caplog.text
    assert "10 of its 10 ids are not in the list" in caplog.text
    assert repr(escape_id(paths[0])) in caplog.text
    assert "--overwrite true" in caplog.text
    assert "--hdf5_dir" in caplog.text
    assert "exists with the same settings" not in caplog.text
    assert output.read_bytes() == before


def test_existing_ilias_output_other_order_exit_two(extract, sample_dataset, tmp_path, caplog):
    _, _, paths = sample_dataset
    _, output = extract()
    _remove_attributes(output)
    before = output.read_bytes()

    with caplog.at_level(logging.ERROR):
        code, _ = extract(list_file=_write_list(tmp_path / "reversed.txt", paths[::-1]))
    assert code == 2
    assert "9 of its 10 ids are repeated or in another order than in the list" in caplog.text
    assert repr(escape_id(paths[1])) in caplog.text
    assert "--overwrite true" in caplog.text
    assert output.read_bytes() == before


def test_existing_ilias_output_missing_rows_kept(extract, sample_dataset, tmp_path, caplog):
    # rows of images that failed are left out, so an older file may lack some list ids
    _, _, paths = sample_dataset
    _, output = extract(list_file=_write_list(tmp_path / "some.txt", paths[:3] + paths[5:]))
    _remove_attributes(output)
    before = output.read_bytes()

    with caplog.at_level(logging.INFO):
        code, _ = extract()
    assert code == 0
    assert "only its ids were compared with the list" in caplog.text
    # a shorter earlier list looks the same, so the count of missing ids is logged
    assert f"lacks 2 of the list's {len(paths)} ids, such as {escape_id(paths[3])!r}" in caplog.text
    assert output.read_bytes() == before


@pytest.mark.parametrize("damage", ["group", "scalar"])
def test_existing_output_unusable_index_named(extract, caplog, damage):
    # regression: a group or a scalar in place of `index` ended in a traceback
    _, output = extract()
    _remove_attributes(output)
    with h5py.File(output, "a") as f:
        del f["index"]
        if damage == "group":
            f.create_group("index")
        else:
            f.create_dataset("index", data=b"a.jpg")
    before = output.read_bytes()

    with caplog.at_level(logging.ERROR):
        code, _ = extract()
    assert code == 1
    assert "has no one-dimensional `index` dataset" in caplog.text
    assert "Traceback" not in caplog.text
    assert output.read_bytes() == before


def test_existing_output_bytes_attributes_kept(extract, caplog):
    # regression: strings stored as fixed-length bytes, as other writers do, read as other settings
    _, output = extract()
    with h5py.File(output, "a") as f:
        for key in ("framework", "model", "transforms", "pooling", "list_sha256"):
            f.attrs[key] = np.bytes_(f.attrs[key].encode())
    before = output.read_bytes()

    with caplog.at_level(logging.INFO):
        code, _ = extract()
    assert code == 0
    assert "exists with the same settings and is left untouched" in caplog.text
    assert output.read_bytes() == before


@pytest.mark.parametrize("file_ids, expected", [
    (["a.jpg", "b.jpg", "c.jpg"], None),
    # rows of failed images are left out
    (["a.jpg", "c.jpg"], None),
    # regression: an output without rows was kept as matching any list
    ([], "it has no ids"),
    # the ILIAS trainer and evaluator accept unescaped ids, so they match their escaped list ids
    (["a.jpg", "café.jpg"], None),
    (["a.jpg", "x.jpg", "y.jpg"], "2 of its 3 ids are not in the list, such as 'x.jpg'"),
    (["a.jpg", "a.jpg"], "1 of its 2 ids are repeated or in another order than in the list, such as 'a.jpg'"),
    (["c.jpg", "a.jpg", "b.jpg"], "2 of its 3 ids are repeated or in another order than in the list, such as 'a.jpg'"),
])
def test_index_mismatch_cases(file_ids, expected):
    list_ids = [escape_id(p) for p in ["a.jpg", "b.jpg", "c.jpg", "café.jpg"]]
    assert index_mismatch(file_ids, list_ids) == expected


@pytest.mark.parametrize("first, second, kept, requested", [
    ("0", "4", "no compression", "gzip level 4"),
    ("4", "0", "gzip level 4", "no compression"),
    ("4", "6", "gzip level 4", "gzip level 6"),
])
def test_existing_output_other_compression_warns(extract, caplog, first, second, kept, requested):
    # Regression: the requested compression was ignored without a word
    _, output = extract("--hdf5_compression", first)
    before = output.read_bytes()
    with caplog.at_level(logging.WARNING):
        code, _ = extract("--hdf5_compression", second)
    assert code == 0
    assert output.read_bytes() == before
    assert f"{output} keeps its compression ({kept})" in caplog.text
    assert f"--hdf5_compression {second} ({requested})" in caplog.text
    assert "--overwrite true" in caplog.text


def test_existing_output_same_compression_no_warning(extract, caplog):
    _, output = extract("--hdf5_compression", "4")
    with caplog.at_level(logging.WARNING):
        code, _ = extract("--hdf5_compression", "4")
    assert code == 0
    assert "keeps its compression" not in caplog.text


def test_existing_output_of_earlier_version_compares_recorded(extract, caplog):
    # a file of an earlier version lacks the newer attributes but still records the resolution
    _, output = extract()
    with h5py.File(output, "a") as f:
        del f.attrs["pretrained_cfg"]
    before = output.read_bytes()
    with caplog.at_level(logging.INFO):
        code, _ = extract()
    assert code == 0
    assert "does not record pretrained_cfg" in caplog.text
    assert output.read_bytes() == before
    with caplog.at_level(logging.ERROR):
        code, _ = extract("--resolution", "40")
    assert code == 2
    assert "resolution: 32 in the file, 40 now" in caplog.text


def test_overwrite_recomputes_with_new_settings(extract):
    _, output = extract()
    code, _ = extract("--resolution", "40", "--overwrite", "true")
    _, _, attrs = read_output(output)
    assert code == 0
    assert attrs["resolution"] == 40


def test_store_fp16_false_writes_float32(extract):
    _, output = extract("--store_fp16", "false")
    features, _, attrs = read_output(output)
    assert features.dtype == np.float32
    assert attrs["dtype"] == "float32"
    assert np.allclose(np.linalg.norm(features, axis=1), 1.0, atol=1e-5)


def test_compression_keeps_values(extract):
    _, plain = extract(name="plain")
    _, packed = extract("--hdf5_compression", "4", name="packed")
    with h5py.File(packed, "r") as f:
        assert f["features"].compression == "gzip"
    np.testing.assert_array_equal(read_output(plain)[0], read_output(packed)[0])


def test_workers_give_same_file_as_main_process(extract):
    _, single = extract(name="single")
    _, multi = extract("--num_workers", "2", name="multi")
    single_features, single_ids, _ = read_output(single)
    multi_features, multi_ids, _ = read_output(multi)
    assert multi_ids == single_ids
    np.testing.assert_array_equal(multi_features, single_features)


def test_multiscale_unit_norm_and_different(extract):
    _, single = extract(name="single")
    _, multi = extract("--multiscale", "true", name="multi")
    single_features = read_output(single)[0].astype(np.float32)
    multi_features = read_output(multi)[0].astype(np.float32)
    assert np.allclose(np.linalg.norm(multi_features, axis=1), 1.0, atol=2e-3)
    assert not np.allclose(single_features, multi_features, atol=1e-2)


def test_checkpoint_changes_embedding_and_is_recorded(extract, tmp_path):
    import timm

    from feature_extraction.image_list import file_sha256

    for seed in (1, 2):
        torch.manual_seed(seed)
        torch.save(timm.create_model("resnet10t", num_classes=0).state_dict(), tmp_path / f"w{seed}.pth")
    options = [o for o in TINY if o not in ("--pretrained", "none")]
    _, first = extract(*options, "--checkpoint", tmp_path / "w1.pth", name="w1")
    _, second = extract(*options, "--checkpoint", tmp_path / "w2.pth", name="w2")
    first_features, _, attrs = read_output(first)
    second_features = read_output(second)[0]
    assert attrs["checkpoint_sha256"] == file_sha256(tmp_path / "w1.pth")
    assert attrs["pretrained"] == ""
    cosines = (first_features.astype(np.float32) * second_features.astype(np.float32)).sum(axis=1)
    assert cosines.max() < 0.999


def test_recorded_paths_are_absolute(sample_dataset, tmp_path, monkeypatch):
    # Regression: the checkpoint and list attributes kept the paths as typed, relative to the
    # folder the run started in.
    import timm

    root, list_path, _ = sample_dataset
    torch.save(timm.create_model("resnet10t", num_classes=0).state_dict(), tmp_path / "w.pth")
    monkeypatch.chdir(tmp_path)
    options = [o for o in TINY if o not in ("--pretrained", "none")]
    code = run_cli("--dataset_dir", root, "--selected_ids", list_path.name, "--hdf5_dir", "out", *options,
                   "--checkpoint", "w.pth")
    assert code == 0
    _, _, attrs = read_output(tmp_path / "out" / "features_uned.hdf5")
    assert attrs["checkpoint"] == str(tmp_path / "w.pth")
    assert attrs["list_source"] == str(list_path)


@pytest.mark.parametrize(
    "batch_size, message",
    [
        ("3", "returned NaN, Inf or all-zero embeddings for 3 of their 3 images"),
        # Regression: with fewer images than a batch, the run ended with "none of the images could
        # be read; check --dataset_dir", though every image was read and the weights were at fault.
        ("64", "none of the 10 images could be embedded (first reason: the model returned NaN"),
    ],
    ids=["first_batches", "short_list"],
)
def test_nan_checkpoint_ends_run(extract, tmp_path, caplog, batch_size, message):
    # Regression: a checkpoint with one NaN weight gave all-NaN embeddings, written with exit 0
    import timm

    state = timm.create_model("resnet10t", num_classes=0).state_dict()
    state["conv1.0.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.pth")
    options = [o for o in TINY if o not in ("--pretrained", "none")]
    with caplog.at_level(logging.ERROR):
        code, output = extract(*options, "--checkpoint", tmp_path / "nan.pth", "--batch_size", batch_size)
    assert code == 1
    assert message in caplog.text
    assert "--dataset_dir" not in caplog.text
    assert not output.exists()


def test_zero_checkpoint_ends_run(extract, tmp_path, caplog):
    # Regression: a checkpoint of zeros gave all-zero rows, written with exit 0
    import timm

    state = {key: torch.zeros_like(value) if value.is_floating_point() else value
             for key, value in timm.create_model("resnet10t", num_classes=0).state_dict().items()}
    torch.save(state, tmp_path / "zero.pth")
    options = [o for o in TINY if o not in ("--pretrained", "none")]
    with caplog.at_level(logging.ERROR):
        code, output = extract(*options, "--checkpoint", tmp_path / "zero.pth")
    assert code == 1
    assert "returned NaN, Inf or all-zero embeddings for" in caplog.text
    # zeros are no float16 overflow, and this run has no float16 autocast
    assert "--comp_fp16" not in caplog.text
    assert not output.exists()


@pytest.mark.parametrize("window_size", ["4", "2"], ids=["nothing_saved", "failed_rows_saved"])
def test_corrected_command_after_broken_model_runs(extract, tmp_path, window_size):
    # Regression: the failed run left a partial run without embeddings (at window size 2, windows of
    # failed rows only), so the command with working weights exited 2 naming the changed checkpoint
    import timm

    state = timm.create_model("resnet10t", num_classes=0).state_dict()
    state["conv1.0.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.pth")
    options = [o for o in TINY if o not in ("--pretrained", "none")]
    code, output = extract(*options, "--checkpoint", tmp_path / "nan.pth", "--window_size", window_size)
    assert code == 1
    assert not output.with_name(output.name + ".parts").exists()

    state["conv1.0.weight"][0, 0, 0, 0] = 0.0
    torch.save(state, tmp_path / "fixed.pth")
    code, output = extract(*options, "--checkpoint", tmp_path / "fixed.pth", "--window_size", window_size)
    assert code == 0
    assert read_output(output)[0].shape[0] == 10


@pytest.mark.parametrize("value, reason", [(float("inf"), "NaN or Inf"), (0.0, "all-zero embedding")],
                         ids=["inf", "zero"])
def test_unusable_rows_listed_as_failed(extract, sample_dataset, monkeypatch, value, reason):
    # Regression for the zero case: an all-zero row was stored, though rows are promised unit length
    from feature_extraction.embedding import Embedder

    _, _, paths = sample_dataset
    original = Embedder.embed
    calls = {"n": 0}

    def embed_with_overflow(self, images):
        vectors = original(self, images).clone()
        calls["n"] += 1
        if calls["n"] == 2:
            vectors[0] = value
        return vectors

    monkeypatch.setattr(Embedder, "embed", embed_with_overflow)
    code, output = extract()
    features, ids, attrs = read_output(output)
    report = output.with_name(output.name + ".failed.txt").read_text().splitlines()

    assert code == 0
    assert features.shape == (9, 512)
    assert np.isfinite(features).all()
    assert (np.abs(features).max(axis=1) > 0).all()
    assert attrs["num_failed"] == 1
    assert len(report) == 1
    assert reason in report[0]
    failed_path = report[0].split(",")[0]
    assert escape_id(failed_path) not in ids
    assert ids == [escape_id(p) for p in paths if p != failed_path]


@pytest.mark.parametrize("offline", [True, False])
def test_failed_weight_download_exit_one(extract, monkeypatch, caplog, offline):
    # Regression: a failed download exited 2 (invalid arguments), and the message had a double
    # full stop and advised setting HF_HUB_OFFLINE=1 when it was already set
    import timm

    def create_offline(name, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("cannot reach huggingface.co and the files are not in the local cache.")
        raise AssertionError("only the download is expected")

    monkeypatch.setattr(timm, "create_model", create_offline)
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with caplog.at_level(logging.ERROR):
        code, output = extract("--pretrained", "c3_in1k")
    assert code == 1
    assert "could not load the pretrained weights of timm model 'resnet10t.c3_in1k'" in caplog.text
    assert ".." not in caplog.text
    assert ("HF_HUB_OFFLINE is set" in caplog.text) == offline
    assert ("set HF_HUB_OFFLINE=1" in caplog.text) != offline
    assert not output.exists()


@pytest.mark.parametrize("extra", [["--pretrained", "c3_in1k"], []], ids=["download", "random_weights"])
def test_interrupt_in_model_build_exits_quietly(extract, monkeypatch, extra):
    # A signal handler that raises inside a lazy import comes out wrapped in a RuntimeError. The model
    # build must neither report it as "weights not at hand" (exit 1) nor re-raise it as a traceback.
    import timm

    def create_interrupted(name, pretrained=False, **kwargs):
        raise_wrapped_signal(SystemExit(143))

    monkeypatch.setattr(timm, "create_model", create_interrupted)
    with pytest.raises(SystemExit) as info:
        extract(*extra)
    assert info.value.code == 143


def test_interrupt_wrapped_in_model_error_stops_run(extract, monkeypatch, caplog):
    # the same wrapped signal in the forward pass must stop the run, not skip the batch's images
    from feature_extraction.embedding import Embedder
    from feature_extraction.interrupts import Interrupted

    def embed_interrupted(self, images):
        raise_wrapped_signal(Interrupted(signal.SIGTERM))

    monkeypatch.setattr(Embedder, "embed", embed_interrupted)
    with caplog.at_level(logging.WARNING):
        code, output = extract()
    assert code == 143
    assert "rerun the same command to resume" in caplog.text
    assert "cannot embed" not in caplog.text
    assert not output.exists()


def test_fewer_windows_than_workers_logged(extract, caplog):
    # each worker decodes whole windows, so one window of 10 rows starts one of the two workers
    with caplog.at_level(logging.INFO):
        code, output = extract("--num_workers", "2", "--window_size", "16")
    assert code == 0
    assert "1 pending window for --num_workers 2, so 1 decode worker starts" in caplog.text
    assert read_output(output)[0].shape[0] == 10


def test_all_images_used_without_list(sample_dataset, tmp_path):
    root, _, paths = sample_dataset
    code = run_cli("--dataset_dir", root, "--hdf5_dir", tmp_path / "out", *TINY)
    _, ids, attrs = read_output(tmp_path / "out/features_uned.hdf5")
    assert code == 0
    assert ids == [escape_id(p) for p in sorted(paths)]
    assert "sorted by path" in attrs["list_source"]


@pytest.mark.parametrize("transforms", ["RESIZE_LARGE", "RESIZE_SMALL", "RESIZE_CENTER", "RESIZE_SQUARE",
                                        "RESIZE_PAD"])
def test_vit_runs_every_transform(extract, transforms):
    code, output = extract("--model", "vit_tiny_patch16_224", "--transforms", transforms, "--resolution", "40")
    features, _, _ = read_output(output)
    assert code == 0
    assert features.shape == (10, 192)


def test_open_clip_alias_and_model_tag(extract):
    options = [o for o in TINY if o not in ("--pretrained", "none")]
    code, output = extract(*options, "--framework", "och", "--model", "RN50.none", "--resolution", "64",
                           "--min_size", "64")
    features, _, attrs = read_output(output)
    assert code == 0
    assert features.shape == (10, 1024)
    assert attrs["framework"] == "openclip"
    assert attrs["model"] == "RN50.none"


def _assert_only_wide_image_skipped(code, output, paths, reason):
    _, ids, attrs = read_output(output)
    assert code == 0
    assert attrs["num_failed"] == 1
    assert ids == [escape_id(p) for p in paths if p != "b/wide.jpg"]
    report = output.with_name(output.name + ".failed.txt").read_text()
    assert report.startswith(f"b/wide.jpg,{reason}")


def test_shape_the_model_rejects_is_skipped(extract, sample_dataset):
    # RN50's stride-2 average pools fail below about 32 px per side; the 90x30 image becomes 64x21
    _, _, paths = sample_dataset
    code, output = extract("--framework", "och", "--model", "RN50", "--resolution", "64")
    _assert_only_wide_image_skipped(code, output, paths, "the model cannot embed a 21x64 input")


@pytest.mark.parametrize(
    "widths, batch_size",
    [
        # three shapes after resizing (64x6, 64x10 and 64x14), so three batches of one image
        ([320, 192, 137], 8),
        # a first window of 16 panoramas in five shapes (64x6 to 64x10), filling the first batches
        ([320, 300, 280, 260, 240, 220, 200, 192] * 2, 4),
    ],
    ids=["three_panoramas", "panorama_window"],
)
def test_odd_shapes_first_are_skipped(extract, sample_dataset, tmp_path, widths, batch_size):
    # Regression: panoramas at the top of the list became the first three batches, so their
    # failures ended the run as a broken model. Listed last, they were skipped.
    root, _, paths = sample_dataset
    panoramas = [f"odd/pano_{i}.jpg" for i in range(len(widths))]
    for i, (name, width) in enumerate(zip(panoramas, widths)):
        write_image(root / name, (width, 30), seed=100 + i)
    list_path = tmp_path / "panoramas_first.txt"
    list_path.write_text("".join(f"{p},0,0\n" for p in panoramas + paths), encoding="utf-8")

    code, output = extract("--framework", "och", "--model", "RN50", "--resolution", "64", "--batch_size",
                           str(batch_size), "--window_size", "16", list_file=list_path)
    assert code == 0
    _, ids, attrs = read_output(output)
    assert attrs["num_failed"] == len(widths) + 1
    assert ids == [escape_id(p) for p in paths if p != "b/wide.jpg"]
    report = output.with_name(output.name + ".failed.txt").read_text()
    assert report.count("the model cannot embed a") == len(widths) + 1


@pytest.mark.parametrize("multiscale", [False, True], ids=["single_scale", "multiscale"])
def test_model_failing_on_square_input_is_broken(extract, monkeypatch, caplog, multiscale):
    # the square probe image must not rescue a model that fails on every input
    from feature_extraction.embedding import Embedder

    probes = []

    def broken(self, images):
        if bool((images == 128).all()):
            probes.append(tuple(images.shape))
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(Embedder, "embed", broken)
    with caplog.at_level(logging.ERROR):
        code, output = extract("--multiscale", str(multiscale).lower())
    assert code == 1
    assert "failed on each of the first 3 batches: it raised an error on 3 of their 3 images" in caplog.text
    assert "On a grey 32x32 image it raised an error too (mat1 and mat2 shapes cannot be multiplied)" in caplog.text
    # resnet10t's config gives its training input size
    assert "Check --resolution and --transforms against the input size the model takes (176x176 in its config)" \
        in caplog.text
    assert ("--multiscale true also gives the model inputs rescaled" in caplog.text) is multiscale
    assert probes == [(1, 32, 32, 3)]  # one grey image at --resolution 32
    assert not output.exists()
    # nothing was saved, so no partial run is left to make a corrected command exit 2
    assert not output.with_name(output.name + ".parts").exists()


def test_mixed_first_failures_counted_by_kind(extract, monkeypatch, caplog):
    # Regression: errors and NaN embeddings on the first batches were all reported as NaN
    from feature_extraction.embedding import Embedder

    sizes = []

    def raise_then_nan(self, images):
        sizes.append(images.shape[0])
        if len(sizes) <= 2:
            raise RuntimeError("Output size is too small")
        return torch.full((images.shape[0], 8), float("nan"))

    monkeypatch.setattr(Embedder, "embed", raise_then_nan)
    with caplog.at_level(logging.ERROR):
        code, _ = extract()
    assert code == 1
    expected = (f"it raised an error on {sizes[0] + sizes[1]} and returned NaN, Inf or all-zero embeddings for "
                f"{sizes[2]} of their {sum(sizes)} images")
    assert expected in caplog.text


def test_unembeddable_shapes_only_suggest_transforms(extract, sample_dataset, tmp_path, caplog):
    # a list too short to fill the first batches, made only of shapes the model raises errors on
    root, _, _ = sample_dataset
    panoramas = [f"odd/pano_{i}.jpg" for i in range(3)]
    for i, (name, width) in enumerate(zip(panoramas, [320, 192, 137])):
        write_image(root / name, (width, 30), seed=300 + i)
    list_path = tmp_path / "panoramas_only.txt"
    list_path.write_text("".join(f"{p},0,0\n" for p in panoramas), encoding="utf-8")

    with caplog.at_level(logging.ERROR):
        code, output = extract("--framework", "och", "--model", "RN50", "--resolution", "64", "--batch_size", "8",
                               list_file=list_path)
    assert code == 1
    assert "none of the 3 images could be embedded" in caplog.text
    assert "pass --transforms RESIZE_SQUARE or RESIZE_PAD, which give every image one size, or --min_size" \
        in caplog.text
    assert not output.exists()


def test_broken_model_needs_failed_batch():
    from feature_extraction.pipeline import _FirstFailures

    # three single odd images do not yet mean a broken model at batch size 16
    first = _FirstFailures(batch_size=16)
    assert [first.add(torch.Size([1, 64, 6, 3]), raised=True) for _ in range(3)] == [False, False, False]
    assert first.add(torch.Size([13, 64, 64, 3]), raised=True) is True
    # full batches: the third failure ends the run
    full = _FirstFailures(batch_size=16)
    assert [full.add(torch.Size([16, 64, 64, 3]), raised=False) for _ in range(3)] == [False, False, True]
    # once a batch is embedded, failures are the images' own
    after = _FirstFailures(batch_size=16, embedded=True)
    assert [after.add(torch.Size([16, 64, 64, 3]), raised=True) for _ in range(3)] == [False, False, False]
    assert after.batches == 0


@pytest.mark.parametrize(
    "error, message, absent",
    [
        (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), "failed on each of the first 3 batches", None),
        (RuntimeError("DefaultCPUAllocator: can't allocate memory"),
         "can't allocate memory; lower --batch_size or --resolution", None),
        # a faulting kernel is not an allocation failure, so a smaller batch or resolution does not fix it
        (RuntimeError("CUDA error: an illegal memory access was encountered"),
         "an illegal memory access was encountered", "lower --batch_size"),
        # timm checks input sizes with assert statements in models that take one size only
        (AssertionError("Input height (32) doesn't match model (384)."),
         "it takes inputs of one size only. Pass --transforms RESIZE_SQUARE", None),
        (ValueError("Input image size (32*24) doesn't match model (224*224)."),
         "failed on each of the first 3 batches", None),
    ],
    ids=["shape", "allocation", "illegal_memory_access", "assertion", "value_error"],
)
def test_model_errors_that_end_the_run(extract, monkeypatch, caplog, error, message, absent):
    from feature_extraction.embedding import Embedder

    def broken(self, images):
        raise error

    monkeypatch.setattr(Embedder, "embed", broken)
    with caplog.at_level(logging.ERROR):
        code, output = extract()
    assert code == 1
    assert message in caplog.text
    if absent is not None:
        assert absent not in caplog.text
    assert not output.exists()


def test_assertion_on_one_shape_ends_run(extract, monkeypatch, caplog):
    # Regression: a timm model that asserts one input size (vit_relpos_medium_patch16_cls_224 at
    # --resolution 224) had every non-square image skipped, with exit 0.
    from feature_extraction.embedding import Embedder

    embed = Embedder.embed

    def rejects_wide(self, images):
        if images.shape[1] * 2 < images.shape[2]:  # the 90x30 image, 32x10 after resizing
            raise AssertionError(f"Input height ({images.shape[1]}) doesn't match model (32).")
        return embed(self, images)

    monkeypatch.setattr(Embedder, "embed", rejects_wide)
    with caplog.at_level(logging.ERROR):
        code, output = extract()
    assert code == 1
    assert "the model rejected a batch of 1 image of 10x32 pixels (Input height (10)" in caplog.text
    assert "takes inputs of one size only" in caplog.text
    assert not output.exists()


@pytest.mark.parametrize("stop", [KeyboardInterrupt(), SystemExit(143)], ids=["keyboard_interrupt", "system_exit"])
def test_stop_in_model_forward_propagates(extract, monkeypatch, stop):
    from feature_extraction.embedding import Embedder

    def stopped(self, images):
        raise stop

    monkeypatch.setattr(Embedder, "embed", stopped)
    with pytest.raises(type(stop)):
        extract()


def test_interrupt_in_model_forward_stops_run(extract, monkeypatch, caplog):
    # Interrupted is an Exception, so the handler of model errors must re-raise it
    from feature_extraction.embedding import Embedder
    from feature_extraction.interrupts import Interrupted

    def interrupted(self, images):
        raise Interrupted(signal.SIGINT)

    monkeypatch.setattr(Embedder, "embed", interrupted)
    with caplog.at_level(logging.WARNING):
        code, output = extract()
    assert code == 130
    assert "cannot embed" not in caplog.text
    assert not output.exists()


def test_open_clip_timm_vit_at_other_resolution(extract):
    # PE-Core-T-16-384's timm trunk takes 384x384 inputs unless built with dynamic_img_size
    code, output = extract("--framework", "openclip", "--model", "PE-Core-T-16-384")
    features, _, attrs = read_output(output)
    assert code == 0
    assert features.shape == (10, 512)
    assert attrs["num_failed"] == 0


def test_open_clip_fixed_size_tower_exits_two(extract, caplog):
    with caplog.at_level(logging.ERROR):
        code, output = extract("--framework", "openclip", "--model", "vit_relpos_medium_patch16_cls_224")
    assert code == 2
    assert "takes only 224x224 inputs" in caplog.text
    assert "--resolution 224" in caplog.text
    assert "Traceback" not in caplog.text
    assert not output.exists()
    assert not output.with_name(output.name + ".parts").exists()


def test_unknown_model_exit_two(extract):
    code, _ = extract("--model", "no_such_model_xyz")
    assert code == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_request_without_gpu_exit_two(extract, caplog):
    with caplog.at_level(logging.ERROR):
        code, _ = extract("--device", "cuda")
    assert code == 2
    assert "no CUDA device" in caplog.text


# ---------------------------------------------------------------------------- flags


def test_help_mentions_every_flag():
    parser = get_args_parser()
    text = parser.format_help()
    for action in parser._actions:
        for option in action.option_strings:
            assert option in text
        if action.option_strings and action.dest != "help":
            assert "default" in action.help or action.required, action.dest
            assert action.metavar, action.dest
    assert "exit status" in text
    assert "143" in text


@pytest.mark.parametrize("value", ["true", "True", "on", "1", "yes"])
def test_bool_flag_true_values(value):
    assert bool_flag(value) is True


@pytest.mark.parametrize("value", ["false", "OFF", "0", "no"])
def test_bool_flag_false_values(value):
    assert bool_flag(value) is False


def test_bool_flag_rejects_other_values():
    with pytest.raises(argparse.ArgumentTypeError, match="invalid boolean 'maybe'"):
        bool_flag("maybe")


def test_bool_flag_on_command_line():
    args = get_args_parser().parse_args(["--dataset_dir", "d", "--hdf5_dir", "h", "--multiscale", "on",
                                         "--store_fp16", "0", "--overwrite", "yes"])
    assert (args.multiscale, args.store_fp16, args.overwrite) == (True, False, True)


@pytest.mark.parametrize(
    "extra",
    [
        ["--batch_size", "0"],
        ["--resolution", "-1"],
        ["--hdf5_compression", "10"],
        ["--num_workers", "-1"],
        ["--min_size", "64", "--transforms", "RESIZE_SQUARE"],
        ["--framework", "keras"],
        ["--multiscale", "maybe"],
    ],
)
def test_bad_flag_values_exit_two(extra, capsys):
    parser = get_args_parser()
    with pytest.raises(SystemExit) as info:
        args = parser.parse_args(["--dataset_dir", "d", "--hdf5_dir", "h", *extra])
        check_args(parser, args)
    assert info.value.code == 2


@pytest.mark.parametrize("flag", ["--resolution", "--min_size", "--window_size", "--max_image_pixels"])
def test_int64_overflow_flags_exit_two(flag, capsys):
    # These settings become 64-bit HDF5 attributes and torch sizes, so a larger value must be
    # rejected before any image is embedded.
    parser = get_args_parser()
    args = parser.parse_args(["--dataset_dir", "d", "--hdf5_dir", "h", flag, str(2**63)])
    with pytest.raises(SystemExit) as info:
        check_args(parser, args)
    assert info.value.code == 2
    assert f"{flag} is {2**63}; it must be at most 2**63 - 1" in capsys.readouterr().err


def test_largest_max_image_pixels_recorded(extract):
    code, output = extract("--max_image_pixels", str(2**63 - 1))
    assert code == 0
    assert read_output(output)[2]["max_image_pixels"] == 2**63 - 1


@pytest.mark.parametrize("extra, message", [
    (["--checkpoint", ""], "--checkpoint is empty"),
    (["--model", ""], "--model is empty"),
    (["--model", "resnet18."], "--model 'resnet18.' ends with a dot"),
])
def test_empty_model_flags_exit_two(extra, message, capsys):
    parser = get_args_parser()
    args = parser.parse_args(["--dataset_dir", "d", "--hdf5_dir", "h", *extra])
    with pytest.raises(SystemExit) as info:
        check_args(parser, args)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_empty_pretrained_means_default_tag():
    parser = get_args_parser()
    args = parser.parse_args(["--dataset_dir", "d", "--hdf5_dir", "h", "--pretrained", ""])
    check_args(parser, args)
    assert args.pretrained is None


def test_framework_alias_accepted():
    args = get_args_parser().parse_args(["--dataset_dir", "d", "--hdf5_dir", "h", "--framework", "och"])
    assert args.framework == "och"


def test_auto_window_size_spreads_short_lists():
    from feature_extraction.dataset import MAX_AUTO_WINDOW_SIZE, auto_window_size

    # a 1,060-image list must give several windows, so two workers both decode
    assert auto_window_size(1060) == 133
    assert auto_window_size(10) == 128
    assert auto_window_size(10_000_000) == MAX_AUTO_WINDOW_SIZE


def test_batchnorm_folding_flag(extract):
    folded_code, folded_output = extract("--fold_batchnorm", "true", name="folded")
    plain_code, plain_output = extract("--fold_batchnorm", "false", name="plain")
    folded, folded_ids, folded_attrs = read_output(folded_output)
    plain, plain_ids, plain_attrs = read_output(plain_output)

    assert folded_code == plain_code == 0
    assert folded_attrs["batchnorm_folded"] > 0
    assert plain_attrs["batchnorm_folded"] == 0
    assert folded_ids == plain_ids
    cosine = (folded.astype(np.float32) * plain.astype(np.float32)).sum(axis=1)
    assert cosine.min() > 0.999


def test_missing_dataset_dir_names_fix(sample_dataset, tmp_path, caplog):
    _, list_path, _ = sample_dataset
    with caplog.at_level(logging.ERROR):
        code = run_cli("--dataset_dir", tmp_path / "nope", "--selected_ids", list_path,
                       "--hdf5_dir", tmp_path / "out", *TINY)
    assert code == 1
    assert "is not a folder; pass the folder that the list paths are relative to" in caplog.text


@pytest.mark.parametrize("flag, value, message", [
    # Regression: an empty --dataset_dir or --hdf5_dir meant the current folder, so an unset
    # shell variable extracted into it or listed every image as missing there.
    ("--dataset_dir", "", "--dataset_dir is empty"),
    ("--hdf5_dir", "", "--hdf5_dir is empty"),
    ("--hdf5_name", "", "--hdf5_name is empty"),
    ("--selected_ids", "", "--selected_ids is empty"),
    # Regression: a stem with a '/' wrote the output into another folder than --hdf5_dir.
    ("--hdf5_name", "sub/features", "--hdf5_name 'sub/features' contains a '/'"),
    ("--hdf5_name", "../features", "--hdf5_name '../features' contains a '/'"),
])
def test_empty_or_nested_path_flags_exit_two(sample_dataset, tmp_path, monkeypatch, capsys, flag, value, message):
    root, list_path, _ = sample_dataset
    work_dir = tmp_path / "work"
    work_dir.mkdir()
    monkeypatch.chdir(work_dir)
    argv = {"--dataset_dir": root, "--selected_ids": list_path, "--hdf5_dir": tmp_path / "out"}
    argv[flag] = value
    with pytest.raises(SystemExit) as info:
        run_cli(*[item for pair in argv.items() for item in pair], *TINY)
    assert info.value.code == 2
    assert message in capsys.readouterr().err
    assert list(work_dir.iterdir()) == []
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("overwrite", ["false", "true"])
def test_output_path_folder_exit_two(extract, tmp_path, capsys, overwrite):
    # --overwrite true cannot replace a folder, so both runs must stop before touching it.
    folder = tmp_path / "out" / "features_uned.hdf5"
    (folder / "kept").mkdir(parents=True)
    with pytest.raises(SystemExit) as info:
        extract("--overwrite", overwrite)
    assert info.value.code == 2
    assert f"the output {str(folder)!r} is a folder" in capsys.readouterr().err
    assert (folder / "kept").is_dir()
    assert not folder.with_name(folder.name + ".parts").exists()


def test_changed_folder_named_in_mismatch(sample_dataset, tmp_path, caplog):
    # Without --selected_ids the list is the image files found under --dataset_dir. A rerun after
    # an image was added exited 2 naming only the list hash, which did not say what had changed.
    root, _, _ = sample_dataset
    out_dir = tmp_path / "out"
    assert run_cli("--dataset_dir", root, "--hdf5_dir", out_dir, *TINY) == 0
    write_image(root / "added" / "new.jpg", (40, 30), seed=99)
    with caplog.at_level(logging.ERROR):
        code = run_cli("--dataset_dir", root, "--hdf5_dir", out_dir, *TINY)
    assert code == 2
    assert "list_paths_sha256" in caplog.text
    assert "image files found under --dataset_dir" in caplog.text
