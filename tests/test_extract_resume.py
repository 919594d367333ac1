"""Interrupted and resumed extraction runs give the same file as one uninterrupted run."""
import json
import logging
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch

import feature_extraction.pipeline as pipeline
from feature_extraction.embedding import Embedder
from feature_extraction.hdf5_output import restore_replaced_report, save_replaced_report
from feature_extraction.interrupts import Interrupted
from feature_extraction.store import PartStore, SettingsMismatchError, fingerprint_differences

from conftest import REPO_ROOT, write_image
from test_extract_cli import TINY, read_output, run_cli


@pytest.fixture
def extract(sample_dataset, tmp_path):
    root, list_path, _ = sample_dataset

    def run(*extra, name="out"):
        out_dir = tmp_path / name
        code = run_cli("--dataset_dir", root, "--selected_ids", list_path, "--hdf5_dir", out_dir, *TINY, *extra)
        return code, out_dir / "features_uned.hdf5"

    return run


def _stop_after_windows(monkeypatch, count, signal_number=signal.SIGTERM):
    """Make the run stop as if a signal arrived right after `count` windows were saved."""
    original = PartStore.write_window
    calls = {"n": 0}

    def write_then_stop(self, window, part):
        original(self, window, part)
        calls["n"] += 1
        if calls["n"] == count:
            raise Interrupted(signal_number)

    monkeypatch.setattr(PartStore, "write_window", write_then_stop)


def test_interrupted_run_resumes_to_same_file(extract, monkeypatch, caplog):
    _, reference = extract(name="reference")

    _stop_after_windows(monkeypatch, 2)
    with caplog.at_level(logging.WARNING):
        code, output = extract()
    assert code == 143
    assert "8 of 10 rows are saved" in caplog.text
    assert "rerun the same command to resume" in caplog.text
    parts = output.with_name(output.name + ".parts")
    assert sorted(p.name for p in parts.iterdir()) == ["manifest.json", "window_000000.npz", "window_000001.npz"]
    assert not output.exists()
    assert not parts.with_name(parts.name + ".lock").exists()

    monkeypatch.undo()
    with caplog.at_level(logging.INFO):
        code, _ = extract()
    assert code == 0
    assert "resuming: 2 of 3 windows (8 rows)" in caplog.text
    reference_features, reference_ids, _ = read_output(reference)
    features, ids, _ = read_output(output)
    assert ids == reference_ids
    np.testing.assert_array_equal(features, reference_features)
    assert sorted(p.name for p in output.parent.iterdir()) == ["features_uned.hdf5"]


def test_resume_omits_window_size_advice(extract, monkeypatch, caplog):
    # a resumed run must keep its --window_size, so it is not advised to change it
    _stop_after_windows(monkeypatch, 2)
    assert extract("--num_workers", "2")[0] == 143

    monkeypatch.undo()
    with caplog.at_level(logging.INFO):
        code, _ = extract("--num_workers", "2")
    assert code == 0
    # two workers save windows in either order, so the saved rows are 8 or 6
    assert "resuming: 2 of 3 windows" in caplog.text
    assert "--window_size" not in caplog.text


def test_sigint_exit_code_130(extract, monkeypatch):
    _stop_after_windows(monkeypatch, 1, signal.SIGINT)
    code, _ = extract()
    assert code == 130


def test_changed_settings_rejected_while_partial(extract, monkeypatch, caplog):
    _stop_after_windows(monkeypatch, 1)
    extract()
    monkeypatch.undo()
    with caplog.at_level(logging.ERROR):
        code, output = extract("--resolution", "40", "--pooling", "gem")
    assert code == 2
    assert "resolution: 32 before, 40 now" in caplog.text
    assert "pooling: 'head' before, 'gem' now" in caplog.text
    assert "--overwrite" in caplog.text
    assert not output.exists()


def _assert_matches_within_float16(output, reference):
    """Assert the same ids in the same order, with embeddings equal up to float16 storage rounding."""
    features, ids, _ = read_output(output)
    reference_features, reference_ids, _ = read_output(reference)
    assert ids == reference_ids
    np.testing.assert_allclose(features.astype(np.float32), reference_features.astype(np.float32), atol=2e-3)


def _out_of_memory_on_sixth_batch(monkeypatch) -> dict:
    """Make the 6th embedded batch, the second of the second window, raise CUDA's out-of-memory error.

    torch.cuda.OutOfMemoryError is an ordinary exception class, so the CUDA failure can be raised
    on CPU. Returns the call counter, which a test resets to fail a later run the same way.
    """
    original = Embedder.embed
    calls = {"n": 0}

    def embed_until_out_of_memory(self, images):
        calls["n"] += 1
        if calls["n"] == 6:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(self, images)

    monkeypatch.setattr(Embedder, "embed", embed_until_out_of_memory)
    return calls


def test_out_of_memory_resumes_with_smaller_batch(extract, monkeypatch, caplog):
    _, reference = extract(name="reference")
    _out_of_memory_on_sixth_batch(monkeypatch)
    with caplog.at_level(logging.ERROR):
        code, output = extract()
    assert code == 1
    assert "out of memory on a batch of (" in caplog.text
    assert "lower --batch_size or --resolution" in caplog.text
    parts = output.with_name(output.name + ".parts")
    assert (parts / "window_000000.npz").exists()
    assert not output.exists()

    monkeypatch.undo()
    caplog.clear()
    with caplog.at_level(logging.INFO):
        code, _ = extract("--batch_size", "2")
    assert code == 0
    assert "resuming: 1 of 3 windows (4 rows)" in caplog.text
    _assert_matches_within_float16(output, reference)


def test_failed_overwrite_run_names_resume_command(extract, monkeypatch, caplog):
    # rerun as it is, a command with --overwrite true deletes the windows saved before the failure
    calls = _out_of_memory_on_sixth_batch(monkeypatch)
    with caplog.at_level(logging.WARNING):
        code, output = extract("--overwrite", "true")
    assert code == 1
    assert "4 of 10 rows are saved in" in caplog.text
    assert "rerun without --overwrite true to resume from them" in caplog.text

    calls["n"] = 0
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert extract(name="plain")[0] == 1
    assert "out of memory on a batch of (" in caplog.text
    assert "without --overwrite true" not in caplog.text


def test_resume_ignores_folding_and_priority(extract, monkeypatch, caplog):
    # folding changes the embeddings within rounding only, so the saved windows stay valid
    _, reference = extract("--fold_batchnorm", "false", name="reference")
    _stop_after_windows(monkeypatch, 1)
    assert extract("--fold_batchnorm", "false")[0] == 143
    monkeypatch.undo()

    with caplog.at_level(logging.INFO):
        code, output = extract("--fold_batchnorm", "true", "--worker_priority", "normal", "--num_workers", "1")

    assert code == 0
    assert "resuming: 1 of 3 windows (4 rows)" in caplog.text
    _assert_matches_within_float16(output, reference)
    assert read_output(output)[2]["batchnorm_folded"] > 0


def test_overwrite_discards_partial_run(extract, monkeypatch):
    _stop_after_windows(monkeypatch, 1)
    extract()
    monkeypatch.undo()
    code, output = extract("--resolution", "40", "--overwrite", "true")
    _, _, attrs = read_output(output)
    assert code == 0
    assert attrs["resolution"] == 40


def test_stopped_overwrite_run_names_resume_command(extract, monkeypatch, caplog):
    # --overwrite true discards the saved parts, so rerunning that same command would start over
    _stop_after_windows(monkeypatch, 2)
    with caplog.at_level(logging.WARNING):
        code, output = extract("--overwrite", "true")
    assert code == 143
    assert "8 of 10 rows are saved" in caplog.text
    assert "rerun the same command without --overwrite true to resume" in caplog.text
    assert "rerun the same command to resume" not in caplog.text

    monkeypatch.undo()
    caplog.clear()
    with caplog.at_level(logging.INFO):
        code, _ = extract()
    assert code == 0
    assert "resuming: 2 of 3 windows (8 rows)" in caplog.text


def _add_missing_image(sample_dataset) -> None:
    """Append a list line for an image that does not exist, so that every output has a failure report."""
    _, list_path, _ = sample_dataset
    list_path.write_text(list_path.read_text() + "missing.jpg,0,0\n")


def _report(output):
    return output.with_name(output.name + ".failed.txt")


# (case, patch that makes the run fail or stop, whether --dataset_dir names an empty folder, exit status,
# expected log part)
FAILED_OVERWRITE_RUNS = [
    ("out_of_memory", _out_of_memory_on_sixth_batch, False, 1, "stays as it was until then"),
    ("stopped", lambda monkeypatch: _stop_after_windows(monkeypatch, 2), False, 143, "stays as it was until then"),
    # no image readable, so no window is kept for a resume
    ("wrong_dataset_dir", lambda monkeypatch: None, True, 1, "are left as they were"),
]


@pytest.mark.parametrize("make_fail, empty_dataset_dir, exit_status, message",
                         [case[1:] for case in FAILED_OVERWRITE_RUNS],
                         ids=[case[0] for case in FAILED_OVERWRITE_RUNS])
def test_failed_overwrite_run_keeps_output(extract, monkeypatch, sample_dataset, tmp_path, caplog, make_fail,
                                           empty_dataset_dir, exit_status, message):
    _add_missing_image(sample_dataset)
    _, output = extract()
    before = output.read_bytes()
    report_before = _report(output).read_text()
    assert "missing.jpg," in report_before
    (tmp_path / "empty").mkdir()

    make_fail(monkeypatch)
    extra = ["--dataset_dir", tmp_path / "empty"] if empty_dataset_dir else []
    with caplog.at_level(logging.WARNING):
        code, _ = extract("--overwrite", "true", "--resolution", "40", *extra)
    assert code == exit_status
    assert output.read_bytes() == before
    assert _report(output).read_text() == report_before
    assert not output.with_name(output.name + ".tmp").exists()
    assert message in caplog.text


def _stopped_replacement(extract, monkeypatch):
    """Extract at resolution 32, then stop an --overwrite run at resolution 40 after 2 windows.

    Returns the output, its bytes before the stopped run, the parts folder and the names in it.
    """
    _, output = extract()
    before = output.read_bytes()
    _stop_after_windows(monkeypatch, 2)
    assert extract("--resolution", "40", "--overwrite", "true")[0] == 143
    monkeypatch.undo()
    parts = output.with_name(output.name + ".parts")
    return output, before, parts, sorted(p.name for p in parts.iterdir())


def test_stopped_overwrite_run_resumes_over_output(extract, monkeypatch, caplog):
    _, reference = extract("--resolution", "40", name="reference")
    output, before, _, _ = _stopped_replacement(extract, monkeypatch)
    assert output.read_bytes() == before

    with caplog.at_level(logging.INFO):
        code, _ = extract("--resolution", "40")
    assert code == 0
    assert "resuming the partial run of --overwrite true" in caplog.text
    assert "resuming: 2 of 3 windows (8 rows)" in caplog.text
    assert "this run decoded and embedded 2 images" in caplog.text
    features, ids, attrs = read_output(output)
    reference_features, reference_ids, _ = read_output(reference)
    assert ids == reference_ids
    np.testing.assert_array_equal(features, reference_features)
    assert attrs["resolution"] == 40
    assert sorted(p.name for p in output.parent.iterdir()) == ["features_uned.hdf5"]


def test_failed_resume_keeps_overwrite_run(extract, monkeypatch, caplog):
    # Regression: a resumed --overwrite run that failed before saving a window deleted the partial run,
    # so the next rerun kept the old output instead of replacing it
    _, output = extract()
    before = output.read_bytes()

    def stop(self, images):
        raise Interrupted(signal.SIGTERM)

    monkeypatch.setattr(Embedder, "embed", stop)
    assert extract("--resolution", "40", "--overwrite", "true")[0] == 143

    def out_of_memory(self, images):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(Embedder, "embed", out_of_memory)
    assert extract("--resolution", "40")[0] == 1
    parts = output.with_name(output.name + ".parts")
    assert (parts / "manifest.json").exists()
    assert output.read_bytes() == before

    monkeypatch.undo()
    with caplog.at_level(logging.INFO):
        code, _ = extract("--resolution", "40")
    assert code == 0
    assert "resuming the partial run of --overwrite true" in caplog.text
    assert read_output(output)[2]["resolution"] == 40


def test_rerun_with_output_settings_keeps_replacement(extract, monkeypatch, caplog):
    # the command requests the output that exists, so that output stays, and the saved windows of
    # the replacement stay too, because the command may lack only one of its flags
    _, reference = extract("--resolution", "40", name="reference")
    output, before, parts, saved = _stopped_replacement(extract, monkeypatch)

    with caplog.at_level(logging.INFO):
        code, _ = extract()
    assert code == 0
    assert "left untouched" in caplog.text
    assert f"kept {parts}, a partial run of --overwrite true" in caplog.text
    assert "resolution: 40 in the partial run, 32 now" in caplog.text
    assert output.read_bytes() == before
    assert sorted(p.name for p in parts.iterdir()) == saved

    caplog.clear()
    with caplog.at_level(logging.INFO):
        code, _ = extract("--resolution", "40")
    assert code == 0
    assert "resuming: 2 of 3 windows (8 rows)" in caplog.text
    np.testing.assert_array_equal(read_output(output)[0], read_output(reference)[0])


def test_rerun_matching_neither_exit_two(extract, monkeypatch, caplog):
    output, before, parts, saved = _stopped_replacement(extract, monkeypatch)

    with caplog.at_level(logging.ERROR):
        code, _ = extract("--resolution", "48")
    assert code == 2
    assert "resolution: 32 in the file, 48 now" in caplog.text
    assert "resolution: 40 in the partial run, 48 now" in caplog.text
    assert "Rerun with the flags and list of the partial run to resume it" in caplog.text
    assert "pass --overwrite true" in caplog.text
    assert output.read_bytes() == before
    assert sorted(p.name for p in parts.iterdir()) == saved


def test_overwrite_replaces_output_at_rename(extract, monkeypatch, sample_dataset, caplog):
    _, list_path, _ = sample_dataset
    _add_missing_image(sample_dataset)
    _, output = extract()
    before = output.read_bytes()
    # the new run skips another image, so its report differs from the old one
    list_path.write_text(list_path.read_text().replace("missing.jpg", "gone.jpg"))
    _, reference = extract("--resolution", "40", name="reference")

    seen = {}
    original_publish = pipeline.publish

    def publish_and_record(temporary, destination):
        seen["output_before_rename"] = destination.read_bytes()
        seen["report_before_rename"] = _report(destination).read_text()
        original_publish(temporary, destination)

    monkeypatch.setattr(pipeline, "publish", publish_and_record)
    code, _ = extract("--resolution", "40", "--overwrite", "true")
    assert code == 0
    assert seen["output_before_rename"] == before
    assert seen["report_before_rename"].startswith("gone.jpg,")
    features, ids, attrs = read_output(output)
    reference_features, reference_ids, _ = read_output(reference)
    assert ids == reference_ids
    np.testing.assert_array_equal(features, reference_features)
    assert attrs["resolution"] == 40
    assert _report(output).read_text() == _report(reference).read_text()
    assert sorted(p.name for p in output.parent.iterdir()) == ["features_uned.hdf5", "features_uned.hdf5.failed.txt"]


def test_stop_during_report_write_publishes_pair(extract, monkeypatch, sample_dataset, caplog):
    # Regression: a SIGTERM while the new failure report was written stopped the run before
    # the output's rename, so the old output stayed beside the new run's report
    _, list_path, _ = sample_dataset
    _add_missing_image(sample_dataset)
    _, output = extract()
    list_path.write_text(list_path.read_text().replace("missing.jpg", "gone.jpg"))
    _, reference = extract("--resolution", "40", name="reference")

    original_write = pipeline.write_failure_report

    def write_then_signal(path, failures):
        original_write(path, failures)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(pipeline, "write_failure_report", write_then_signal)
    with caplog.at_level(logging.WARNING):
        code, _ = extract("--resolution", "40", "--overwrite", "true")
    assert code == 143
    assert f"stopped by SIGTERM after {output} was complete" in caplog.text
    np.testing.assert_array_equal(read_output(output)[0], read_output(reference)[0])
    assert _report(output).read_text() == _report(reference).read_text()


class _Killed(BaseException):
    """Stands for a SIGKILL: no error handling of the command turns it into an exit status."""


def _kill_overwrite_run_before_rename(extract, monkeypatch, sample_dataset):
    """Extract with the sample list, then kill an --overwrite run with another list between its two renames.

    Returns the output, its bytes and its failure report before the kill. The list file
    is the first one again on return.
    """
    _, list_path, _ = sample_dataset
    _add_missing_image(sample_dataset)
    old_list = list_path.read_text()
    _, output = extract()
    before, report_before = output.read_bytes(), _report(output).read_text()

    def kill(temporary, destination):
        raise _Killed()

    list_path.write_text(old_list.replace("missing.jpg", "gone.jpg"))
    monkeypatch.setattr(pipeline, "publish", kill)
    with pytest.raises(_Killed):
        extract("--resolution", "40", "--overwrite", "true")
    monkeypatch.undo()
    assert output.read_bytes() == before
    assert _report(output).read_text().startswith("gone.jpg,")
    list_path.write_text(old_list)
    return output, before, report_before


# (case, flags of the rerun after the kill, whether a signal stops the rerun, exit status)
RERUNS_AFTER_KILL_BEFORE_RENAME = [
    ("old_output_settings", [], False, 0),
    ("other_settings", ["--resolution", "48"], False, 2),
    ("overwrite_stopped", ["--resolution", "48", "--overwrite", "true"], True, 143),
]


@pytest.mark.parametrize("rerun_flags, stopped, exit_status",
                         [case[1:] for case in RERUNS_AFTER_KILL_BEFORE_RENAME],
                         ids=[case[0] for case in RERUNS_AFTER_KILL_BEFORE_RENAME])
def test_kill_before_rename_restores_report(extract, monkeypatch, sample_dataset, caplog, rerun_flags,
                                                        stopped, exit_status):
    # Regression: a kill between the report's rename and the output's left the new run's report
    # beside the old output. A rerun that kept the old output, or discarded the partial run
    # with --overwrite true, kept that report.
    output, before, report_before = _kill_overwrite_run_before_rename(extract, monkeypatch, sample_dataset)

    if stopped:
        _stop_after_windows(monkeypatch, 1)
    with caplog.at_level(logging.WARNING):
        code, _ = extract(*rerun_flags)
    assert code == exit_status
    assert output.read_bytes() == before
    assert _report(output).read_text() == report_before


def test_resume_after_report_restored_replaces_pair(extract, monkeypatch, sample_dataset, caplog):
    _, list_path, _ = sample_dataset
    output, before, report_before = _kill_overwrite_run_before_rename(extract, monkeypatch, sample_dataset)
    assert extract()[0] == 0
    assert _report(output).read_text() == report_before

    # the partial run, resumed with its flags and list, replaces both files
    list_path.write_text(list_path.read_text().replace("missing.jpg", "gone.jpg"))
    _, reference = extract("--resolution", "40", name="reference")
    with caplog.at_level(logging.INFO):
        code, _ = extract("--resolution", "40")
    assert code == 0
    assert "resuming the partial run of --overwrite true" in caplog.text
    np.testing.assert_array_equal(read_output(output)[0], read_output(reference)[0])
    assert _report(output).read_text() == _report(reference).read_text()
    assert sorted(p.name for p in output.parent.iterdir()) == ["features_uned.hdf5", "features_uned.hdf5.failed.txt"]


def test_report_copy_without_report_ignored(tmp_path, caplog):
    # Regression: a copy that lacked its "report" field passed the check and then raised KeyError
    output = tmp_path / "features_uned.hdf5"
    output.write_bytes(b"old output")
    report = _report(output)
    report.write_text("old.jpg,not found\n")
    copy_path = tmp_path / "replaced_report.json"
    save_replaced_report(output, copy_path)
    saved = json.loads(copy_path.read_text())
    del saved["report"]
    copy_path.write_text(json.dumps(saved))
    report.write_text("new.jpg,not found\n")

    with caplog.at_level(logging.WARNING):
        restore_replaced_report(output, copy_path)
    assert f"ignoring {copy_path}" in caplog.text
    assert report.read_text() == "new.jpg,not found\n"

    # the unreadable copy is replaced by a copy of the current report
    save_replaced_report(output, copy_path)
    assert json.loads(copy_path.read_text())["report"] == "new.jpg,not found\n"


# manifests edited by hand into valid JSON with fields of the wrong type
MALFORMED_MANIFESTS = {
    "fingerprint_null": {"fingerprint": None, "info": {}, "replaces_output": True},
    "fingerprint_list": {"fingerprint": [], "info": {}, "replaces_output": True},
    "info_list": {"fingerprint": {}, "info": ["list"], "replaces_output": True},
    "replaces_output_text": {"fingerprint": {}, "info": {}, "replaces_output": "false"},
}


@pytest.mark.parametrize("manifest", MALFORMED_MANIFESTS.values(), ids=MALFORMED_MANIFESTS.keys())
def test_malformed_manifest_beside_output_rejected(extract, caplog, manifest):
    _, output = extract()
    before = output.read_bytes()
    parts = output.with_name(output.name + ".parts")
    parts.mkdir()
    (parts / "manifest.json").write_text(json.dumps(manifest))

    with caplog.at_level(logging.ERROR):
        code, _ = extract()
    assert code == 1
    assert f"cannot read {parts / 'manifest.json'}" in caplog.text
    assert f"delete {parts}" in caplog.text
    assert output.read_bytes() == before
    assert (parts / "manifest.json").exists()


def test_changed_list_rejected_while_partial(extract, monkeypatch, sample_dataset, caplog):
    _, list_path, _ = sample_dataset
    _stop_after_windows(monkeypatch, 1)
    extract()
    monkeypatch.undo()
    list_path.write_text(list_path.read_text() + "extra.jpg,0,0\n")
    with caplog.at_level(logging.ERROR):
        code, _ = extract()
    assert code == 2
    assert "list_paths_sha256" in caplog.text
    assert "num_rows: 10 before, 11 now" in caplog.text
    assert "image files found under --dataset_dir" in caplog.text


def _reformat_list(list_path) -> None:
    """Save the list again with a byte-order mark, CRLF line endings, blank lines and spaces around fields."""
    lines = list_path.read_text(encoding="utf-8").splitlines()
    spaced = [" , ".join(line.split(",")) for line in lines]
    list_path.write_bytes(("\ufeff" + "\r\n\r\n".join(spaced) + "\r\n\r\n").encode("utf-8"))


def test_reformatted_list_resumes(extract, monkeypatch, sample_dataset, caplog):
    # regression: a list saved again with a blank line blocked the resume, and the advice was --overwrite true
    _, list_path, _ = sample_dataset
    _, reference = extract(name="reference")
    _stop_after_windows(monkeypatch, 1)
    extract()
    monkeypatch.undo()
    before = list_path.read_bytes()
    _reformat_list(list_path)
    assert list_path.read_bytes() != before

    with caplog.at_level(logging.INFO):
        code, output = extract()
    assert code == 0
    assert "resuming: 1 of 3 windows" in caplog.text
    reference_features, reference_ids, _ = read_output(reference)
    features, ids, _ = read_output(output)
    assert ids == reference_ids
    np.testing.assert_array_equal(features, reference_features)


def test_reformatted_list_keeps_output(extract, sample_dataset, caplog):
    _, list_path, _ = sample_dataset
    code, output = extract()
    assert code == 0
    stored = output.read_bytes()
    _reformat_list(list_path)

    with caplog.at_level(logging.INFO):
        code, _ = extract()
    assert code == 0
    assert "exists with the same settings and is left untouched" in caplog.text
    assert output.read_bytes() == stored


def test_changed_label_resumes(extract, monkeypatch, sample_dataset, caplog):
    # extraction does not use labels, so a label corrected during a long run must not block the resume
    _, list_path, _ = sample_dataset
    _, reference = extract(name="reference")
    _stop_after_windows(monkeypatch, 1)
    extract()
    monkeypatch.undo()
    lines = list_path.read_text(encoding="utf-8").splitlines()
    path, label, domain = lines[0].split(",")
    lines[0] = f"{path},{int(label) + 1},{domain}"
    list_path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    with caplog.at_level(logging.INFO):
        code, output = extract()
    assert code == 0
    assert "resuming: 1 of 3 windows" in caplog.text
    assert read_output(output)[1] == read_output(reference)[1]


def test_reordered_paths_rejected_while_partial(extract, monkeypatch, sample_dataset, caplog):
    _, list_path, _ = sample_dataset
    _stop_after_windows(monkeypatch, 1)
    extract()
    monkeypatch.undo()
    lines = list_path.read_text(encoding="utf-8").splitlines()
    lines[0], lines[1] = lines[1], lines[0]
    list_path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    with caplog.at_level(logging.ERROR):
        code, _ = extract()
    assert code == 2
    assert "list_paths_sha256" in caplog.text
    assert "num_rows" not in caplog.text


def test_older_partial_run_compared_by_file_hash(extract, monkeypatch, sample_dataset, caplog):
    # manifests written before list_paths_sha256 existed record only the hash of the list file
    _, list_path, _ = sample_dataset
    _stop_after_windows(monkeypatch, 1)
    _, output = extract()
    monkeypatch.undo()
    manifest_path = output.with_name(output.name + ".parts") / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["fingerprint"]["list_paths_sha256"]
    manifest_path.write_text(json.dumps(manifest))
    _reformat_list(list_path)

    with caplog.at_level(logging.ERROR):
        code, _ = extract()
    assert code == 2
    assert "list_sha256:" in caplog.text
    assert "list_paths_sha256" not in caplog.text


def test_changed_tag_with_checkpoint_rejected(extract, monkeypatch, tmp_path, caplog):
    # Regression: with --checkpoint the fingerprint kept neither the tag nor the mean and std
    # it sets, so a rerun with another tag resumed and mixed two normalisations in one file
    import timm

    torch.save(timm.create_model("tf_efficientnet_b0", num_classes=0).state_dict(), tmp_path / "b0.pth")
    options = ["--pretrained", "", "--checkpoint", tmp_path / "b0.pth"]
    _stop_after_windows(monkeypatch, 1)
    assert extract("--model", "tf_efficientnet_b0.in1k", *options)[0] == 143
    monkeypatch.undo()

    with caplog.at_level(logging.ERROR):
        code, output = extract("--model", "tf_efficientnet_b0.ap_in1k", *options)
    assert code == 2
    assert "pretrained_cfg: 'tf_efficientnet_b0.in1k' before, 'tf_efficientnet_b0.ap_in1k' now" in caplog.text
    assert "mean: [0.485, 0.456, 0.406] before, [0.5, 0.5, 0.5] now" in caplog.text
    assert not output.exists()


def test_parts_of_older_format_rejected(tmp_path):
    store = PartStore(tmp_path / "out.hdf5.parts")
    store.open({"format_version": 1, "model": "resnet10t"}, {})
    store.close()
    with pytest.raises(SettingsMismatchError, match="saved in format 1.*--overwrite true"):
        store.open({"format_version": 2, "model": "resnet10t"}, {})
    store.close()


def test_parts_removal_deletes_manifest_first(tmp_path, monkeypatch):
    store = PartStore(tmp_path / "out.hdf5.parts")
    store.open({"format_version": 2, "model": "resnet10t"}, {})
    seen = {}

    def cut_short(path, *args, **kwargs):
        seen["manifest"] = (path / "manifest.json").exists()
        raise OSError("deletion cut short")

    monkeypatch.setattr(shutil, "rmtree", cut_short)
    with pytest.raises(OSError, match="cut short"):
        store.remove()
    monkeypatch.undo()
    assert seen == {"manifest": False}
    # the remaining files are no partial run, so a run with other settings starts afresh
    store.open({"format_version": 2, "model": "resnet14t"}, {})
    store.close()


def test_parts_without_manifest_discarded(extract, monkeypatch, caplog):
    # Regression: windows left without their manifest were taken into a run with other settings
    _, reference = extract("--resolution", "40", name="reference")
    _stop_after_windows(monkeypatch, 2)
    _, output = extract()
    monkeypatch.undo()
    parts = output.with_name(output.name + ".parts")
    (parts / "manifest.json").unlink()

    with caplog.at_level(logging.INFO):
        code, _ = extract("--resolution", "40")
    assert code == 0
    assert "removing 2 part files" in caplog.text
    assert "resuming" not in caplog.text
    np.testing.assert_array_equal(read_output(output)[0], read_output(reference)[0])


def test_finished_parts_with_stale_temporary_files_assembled(extract, monkeypatch):
    _, reference = extract(name="reference")
    # all windows saved, then a kill while the HDF5 file was being assembled
    _stop_after_windows(monkeypatch, 3)
    _, output = extract()
    monkeypatch.undo()
    parts = output.with_name(output.name + ".parts")
    output.with_name(output.name + ".tmp").write_bytes(b"half an hdf5 file")
    (parts / "window_000001.npz.abc.tmp").write_bytes(b"half a part")

    code, _ = extract()
    assert code == 0
    np.testing.assert_array_equal(read_output(output)[0], read_output(reference)[0])
    assert sorted(p.name for p in output.parent.iterdir()) == ["features_uned.hdf5"]


def test_corrupt_part_recomputed(extract, monkeypatch, caplog):
    _, reference = extract(name="reference")
    _stop_after_windows(monkeypatch, 2)
    _, output = extract()
    monkeypatch.undo()
    part = output.with_name(output.name + ".parts") / "window_000001.npz"
    part.write_bytes(part.read_bytes()[:100])

    with caplog.at_level(logging.WARNING):
        code, _ = extract()
    assert code == 0
    assert "window_000001.npz is unreadable" in caplog.text
    np.testing.assert_array_equal(read_output(output)[0], read_output(reference)[0])


def _open_in_child(directory, results):
    from feature_extraction.store import StoreError

    try:
        PartStore(directory).open({"a": 1}, {})
        results.put("opened")
    except StoreError as e:
        results.put(str(e))


def _open_in_other_process(directory) -> str:
    # the lock is per process (a POSIX record lock), so the second opener must be another process
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    child = context.Process(target=_open_in_child, args=(directory, results))
    child.start()
    child.join(timeout=60)
    return results.get(timeout=5)


def test_second_process_on_same_parts_rejected(tmp_path):
    first = PartStore(tmp_path / "out.hdf5.parts")
    first.open({"a": 1}, {})
    assert "another process is extracting into" in _open_in_other_process(tmp_path / "out.hdf5.parts")
    first.close()
    assert _open_in_other_process(tmp_path / "out.hdf5.parts") == "opened"


def _hold_lock_in_child(directory, locked, release):
    store = PartStore(directory)
    store.lock()
    locked.set()
    release.wait(timeout=120)
    store.close()


def test_overwrite_rejected_while_locked(extract, monkeypatch, caplog):
    # Regression: --overwrite true deleted the parts folder before taking the lock, which
    # lived inside that folder, so the run holding it went on writing into the new run's
    # folder and the two merged into one file of mixed resolutions.
    _stop_after_windows(monkeypatch, 1)
    _, output = extract()
    monkeypatch.undo()
    parts = output.with_name(output.name + ".parts")
    saved = sorted(p.name for p in parts.iterdir())

    context = multiprocessing.get_context("fork")
    locked, release = context.Event(), context.Event()
    holder = context.Process(target=_hold_lock_in_child, args=(parts, locked, release))
    holder.start()
    try:
        assert locked.wait(timeout=60)
        with caplog.at_level(logging.ERROR):
            code, _ = extract("--overwrite", "true", "--resolution", "40")
    finally:
        release.set()
        holder.join(timeout=60)

    assert code == 1
    assert "another process is extracting into" in caplog.text
    assert sorted(p.name for p in parts.iterdir()) == saved
    assert not output.exists()
    assert extract("--overwrite", "true", "--resolution", "40")[0] == 0
    assert read_output(output)[2]["resolution"] == 40


def test_parts_folder_deleted_during_run_named(extract, monkeypatch, caplog):
    original = PartStore.write_window
    calls = {"n": 0}

    def delete_folder_then_write(self, window, part):
        calls["n"] += 1
        if calls["n"] == 2:
            shutil.rmtree(self.directory)
        original(self, window, part)

    monkeypatch.setattr(PartStore, "write_window", delete_folder_then_write)
    with caplog.at_level(logging.ERROR):
        code, output = extract()
    assert code == 1
    assert "was deleted while this run was writing to it" in caplog.text
    assert "free space" not in caplog.text
    assert not output.exists()


def test_unusable_output_folder_fails_cleanly(sample_dataset, tmp_path, caplog):
    root, list_path, _ = sample_dataset
    (tmp_path / "a_file").write_text("not a folder")
    with caplog.at_level(logging.ERROR):
        code = run_cli("--dataset_dir", root, "--selected_ids", list_path, "--hdf5_dir", tmp_path / "a_file/out", *TINY)
    assert code == 1
    assert "choose a writable --hdf5_dir" in caplog.text
    assert f"{tmp_path / 'a_file'} is a file, not a folder" in caplog.text


def test_output_folder_that_is_file_named(sample_dataset, tmp_path, caplog):
    # Regression: the message showed only "[Errno 17] File exists"
    root, list_path, _ = sample_dataset
    (tmp_path / "a_file").write_text("not a folder")
    with caplog.at_level(logging.ERROR):
        code = run_cli("--dataset_dir", root, "--selected_ids", list_path, "--hdf5_dir", tmp_path / "a_file", *TINY)
    assert code == 1
    assert f"cannot write in {tmp_path / 'a_file'}: it is a file, not a folder" in caplog.text
    assert "choose a writable --hdf5_dir" in caplog.text
    assert (tmp_path / "a_file").read_text() == "not a folder"


# ---------------------------------------------------------------------------- real signals


@pytest.fixture
def many_images(tmp_path):
    """64 small images and their list, enough for a subprocess to be stopped mid-run."""
    root = tmp_path / "many"
    lines = []
    for i in range(64):
        relative = f"d{i % 4}/img_{i:03d}.jpg"
        write_image(root / relative, (96 + i % 3 * 16, 72), seed=i)
        lines.append(f"{relative},{i % 5},0\n")
    list_path = tmp_path / "many.txt"
    list_path.write_text("".join(lines))
    return root, list_path


# SIGHUP reaches a run whose terminal or ssh session closed
@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_stop_signal_ends_subprocess_cleanly(many_images, tmp_path, signal_number):
    root, list_path = many_images
    out_dir = tmp_path / "out"
    argv = ["--dataset_dir", str(root), "--selected_ids", str(list_path), "--hdf5_dir", str(out_dir), *TINY]
    argv[argv.index("--resolution") + 1] = "96"
    argv[argv.index("--num_workers") + 1] = "1"
    process = subprocess.Popen([sys.executable, str(REPO_ROOT / "feature_extraction/extract.py"), *argv],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)

    parts = out_dir / "features_uned.hdf5.parts"
    deadline = time.monotonic() + 120
    while not list(parts.glob("window_*.npz")) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.01)
    process.send_signal(signal_number)
    _, stderr = process.communicate(timeout=60)

    assert process.returncode == 128 + signal_number, stderr[-2000:]
    assert f"stopped by {signal.Signals(signal_number).name}" in stderr
    assert "rerun the same command to resume" in stderr
    assert "Traceback" not in stderr
    assert not (out_dir / "features_uned.hdf5").exists()

    assert run_cli(*argv) == 0
    with h5py.File(out_dir / "features_uned.hdf5", "r") as f:
        assert f["features"].shape == (64, 512)
        assert [i.decode() for i in f["index"][:]] == [line.split(",")[0] for line in list_path.read_text().split()]


def _unwritable_folder(monkeypatch):
    """Make taking the lock fail as it does in a folder that this user cannot write."""
    def lock_denied(self):
        raise PermissionError(13, "Permission denied", str(self.lock_path))

    monkeypatch.setattr(PartStore, "lock", lock_denied)


@pytest.mark.parametrize("extra, exit_status, message", [
    # a complete output with the same settings needs no write
    ((), 0, "left untouched (its folder cannot be written"),
    (("--resolution", "40"), 2, "resolution: 32 in the file, 40 now"),
    (("--overwrite", "true"), 1, "cannot write in"),
])
def test_unwritable_folder_with_output(extract, monkeypatch, caplog, extra, exit_status, message):
    _, output = extract()
    before = output.read_bytes()
    _unwritable_folder(monkeypatch)

    with caplog.at_level(logging.INFO):
        code, _ = extract(*extra)
    assert code == exit_status
    assert message in caplog.text
    assert output.read_bytes() == before


def test_unwritable_folder_ilias_output_other_list(extract, monkeypatch, sample_dataset, tmp_path, caplog):
    # a file of the older ILIAS tools records no list hash, so its ids are compared with the list
    _, _, paths = sample_dataset
    _, output = extract()
    with h5py.File(output, "a") as f:
        for key in list(f.attrs):
            del f.attrs[key]
    before = output.read_bytes()
    reversed_list = tmp_path / "reversed.txt"
    reversed_list.write_text("".join(f"{p},0,0\n" for p in paths[::-1]), encoding="utf-8")
    _unwritable_folder(monkeypatch)

    with caplog.at_level(logging.INFO):
        same_list_status, _ = extract()
        same_list_log = caplog.text
        caplog.clear()
        reversed_list_status, _ = extract("--selected_ids", reversed_list)
    assert same_list_status == 0
    assert "only its ids were compared with the list" in same_list_log
    assert "its folder cannot be written" in same_list_log
    assert reversed_list_status == 2
    assert "9 of its 10 ids are repeated or in another order than in the list" in caplog.text
    assert output.read_bytes() == before


def test_unwritable_folder_partial_run_exit_one(extract, monkeypatch, caplog):
    # the saved windows of a stopped replacement need the lock to be resumed or removed
    output, before, parts, saved = _stopped_replacement(extract, monkeypatch)
    _unwritable_folder(monkeypatch)

    with caplog.at_level(logging.ERROR):
        code, _ = extract()
    assert code == 1
    assert "cannot write in" in caplog.text
    assert output.read_bytes() == before
    assert sorted(p.name for p in parts.iterdir()) == saved


def test_unwritable_folder_without_output_exit_one(extract, monkeypatch, caplog):
    _unwritable_folder(monkeypatch)

    with caplog.at_level(logging.ERROR):
        code, output = extract()
    assert code == 1
    assert "cannot write in" in caplog.text
    assert not output.exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes in a read-only folder")
def test_read_only_folder_exit_zero(extract):
    _, output = extract()
    before = output.read_bytes()
    output.parent.chmod(0o555)
    try:
        code, _ = extract()
    finally:
        output.parent.chmod(0o755)
    assert code == 0
    assert output.read_bytes() == before


def test_list_hash_compared_by_what_both_record():
    older = {"list_sha256": "file-a", "resolution": 32}
    newer = {"list_sha256": "file-b", "list_paths_sha256": "entries-a", "resolution": 32}

    # both record the entries' hash: the file's bytes may differ
    assert fingerprint_differences(newer, {**newer, "list_sha256": "file-c"}) == []
    assert fingerprint_differences(newer, {**newer, "list_paths_sha256": "entries-b"}) == ["list_paths_sha256"]
    # one records only the file's hash: that is compared, and the missing key is not a difference
    assert fingerprint_differences(older, {**newer, "list_sha256": "file-a"}) == []
    assert fingerprint_differences(older, newer) == ["list_sha256"]
