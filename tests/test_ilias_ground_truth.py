"""The ILIAS ground-truth converter, and an ILIAS-style evaluation through evaluate.py with its output."""
import json
import logging
import subprocess
import sys

import h5py
import numpy as np
import pytest

from feature_extraction.image_list import escape_id
from linear_adaptation import evaluate
from misc import ilias_ground_truth
from test_evaluate import _ilias_style_map

from conftest import REPO_ROOT


def _write_ids(ids_dir, queries, positives):
    ids_dir.mkdir(parents=True, exist_ok=True)
    (ids_dir / "image_query_ids.txt").write_bytes(("\ufeff" + "\r\n".join(queries) + "\r\n").encode("utf-8"))
    (ids_dir / "positive_ids.txt").write_text("\n".join(positives) + "\n\n", encoding="utf-8")


def _write_hdf5(path, ids, features):
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=features)
        f.create_dataset("index", data=np.array([escape_id(i) for i in ids], dtype=np.bytes_))


QUERIES = ["bike/query/q1.jpg", "bike/query/q2.jpg", "mug/query/q1.jpg", "lamp/query/q1.jpg"]
# positive lines carry the object's scale and clutter after the id
POSITIVES = ["mug/pos/b.jpg,0.10,20", "bike/pos/a.jpg,0.05,3", "bike/pos/c.jpg,0.31,40", "mug/pos/a.jpg,0.2,7"]


def test_ground_truth_by_instance(tmp_path, caplog):
    _write_ids(tmp_path / "image_ids", QUERIES, POSITIVES)
    output = tmp_path / "out" / "gt.json"
    with caplog.at_level(logging.WARNING):
        code = ilias_ground_truth.main(["--ids_dir", str(tmp_path / "image_ids"), "--output", str(output)])
    assert code == 0
    assert json.loads(output.read_text(encoding="utf-8")) == {
        "bike/query/q1.jpg": ["bike/pos/a.jpg", "bike/pos/c.jpg"],
        "bike/query/q2.jpg": ["bike/pos/a.jpg", "bike/pos/c.jpg"],
        "mug/query/q1.jpg": ["mug/pos/a.jpg", "mug/pos/b.jpg"],
        "lamp/query/q1.jpg": [],
    }
    assert "1 queries have no positive in positive_ids.txt (e.g. 'lamp/query/q1.jpg')" in caplog.text
    assert [p.name for p in output.parent.iterdir()] == ["gt.json"]


def test_repeated_id_exits_1(tmp_path, caplog):
    _write_ids(tmp_path / "image_ids", QUERIES, [*POSITIVES, "bike/pos/a.jpg,0.05,3"])
    output = tmp_path / "gt.json"
    code = ilias_ground_truth.main(["--ids_dir", str(tmp_path / "image_ids"), "--output", str(output)])
    assert code == 1
    assert "positive_ids.txt:5: id 'bike/pos/a.jpg' is listed twice" in caplog.text
    assert not output.exists()


@pytest.mark.parametrize("problem", ["missing_positives", "output_folder"])
def test_bad_arguments_exit_2(tmp_path, capsys, problem):
    _write_ids(tmp_path / "image_ids", QUERIES, POSITIVES)
    output = tmp_path / "gt.json"
    if problem == "missing_positives":
        (tmp_path / "image_ids" / "positive_ids.txt").unlink()
        expected = "has no positive_ids.txt; give the ILIAS image_ids folder"
    else:
        output.mkdir()
        expected = "is a folder; give the path of the file to write"
    with pytest.raises(SystemExit) as exit_info:
        ilias_ground_truth.main(["--ids_dir", str(tmp_path / "image_ids"), "--output", str(output)])
    assert exit_info.value.code == 2
    assert expected in capsys.readouterr().err


def test_ilias_evaluation_end_to_end(tmp_path):
    # queries, positives and two distractor shards as the ILIAS extractors name them
    rng = np.random.default_rng(5)
    dim = 8
    queries = rng.standard_normal((len(QUERIES), dim)).astype(np.float32)
    positive_ids = [line.split(",")[0] for line in POSITIVES]
    positives = np.stack([queries[QUERIES.index(f"{p.split('/')[0]}/query/q1.jpg")] + 0.8 * rng.standard_normal(dim)
                          for p in positive_ids]).astype(np.float32)
    _write_hdf5(tmp_path / "features_image_queries.hdf5", QUERIES, queries)
    _write_hdf5(tmp_path / "features_positive.hdf5", positive_ids, positives)
    for shard in range(2):
        ids = [f"{shard:05d}/{i}.jpg" for i in range(30)]
        _write_hdf5(tmp_path / f"features_distractors_{shard:05d}.hdf5", ids, rng.standard_normal((30, dim)))
    _write_ids(tmp_path / "image_ids", QUERIES, POSITIVES)
    gt_path = tmp_path / "gt.json"
    assert ilias_ground_truth.main(["--ids_dir", str(tmp_path / "image_ids"), "--output", str(gt_path)]) == 0

    similarities, metrics = tmp_path / "similarities.json", tmp_path / "metrics.json"
    code = evaluate.main(evaluate.get_args_parser().parse_args([
        "--query_hdf5", str(tmp_path / "features_image_queries.hdf5"),
        "--db_hdf5", str(tmp_path / "features_positive.hdf5"), str(tmp_path / "features_distractors_{idx}.hdf5"),
        "--gt_path", str(gt_path), "--k", "20", "--device", "cpu",
        "--save_similarities", str(similarities), "--save_json", str(metrics),
    ]))
    assert code == 0

    report = json.loads(metrics.read_text())
    ground_truth = {q: set(p) for q, p in json.loads(gt_path.read_text()).items() if p}
    scored = {q: r for q, r in json.loads(similarities.read_text()).items() if q in ground_truth}
    assert report["metrics"]["without_layer"]["num_queries"] == 3  # lamp has no positive
    assert report["metrics"]["without_layer"]["map"] == pytest.approx(_ilias_style_map(scored, ground_truth, 20))
    assert report["counts"]["database_rows"] == 64


def test_interrupt_leaves_no_output(tmp_path):
    # SIGINT arrives as KeyboardInterrupt during the run, simulated here while the positive file is read
    _write_ids(tmp_path / "image_ids", QUERIES, POSITIVES)
    code = (
        "import sys, runpy\n"
        "import feature_extraction.image_list as image_list\n"
        "original = image_list.read_list_text\n"
        "def interrupted(list_path):\n"
        "    if list_path.endswith('positive_ids.txt'):\n"
        "        raise KeyboardInterrupt\n"
        "    return original(list_path)\n"
        "image_list.read_list_text = interrupted\n"
        f"sys.argv = ['ilias_ground_truth.py', '--ids_dir', {str(tmp_path / 'image_ids')!r}, "
        f"'--output', {str(tmp_path / 'gt.json')!r}]\n"
        "runpy.run_path('misc/ilias_ground_truth.py', run_name='__main__')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 130
    assert "interrupted (SIGINT); the output was not written" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "gt.json").exists()


@pytest.mark.parametrize("name", ["image_query_ids.txt", "positive_ids.txt"])
def test_output_that_is_an_input_exits_2(tmp_path, capsys, name):
    ids_dir = tmp_path / "image_ids"
    _write_ids(ids_dir, QUERIES, POSITIVES)
    before = (ids_dir / name).read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        ilias_ground_truth.main(["--ids_dir", str(ids_dir), "--output", str(ids_dir / name)])
    assert exit_info.value.code == 2
    assert f"which is the --ids_dir input {str(ids_dir / name)!r}; choose another output path" in capsys.readouterr().err
    assert (ids_dir / name).read_bytes() == before


def test_output_under_a_file_exits_2(tmp_path, capsys):
    _write_ids(tmp_path / "image_ids", QUERIES, POSITIVES)
    (tmp_path / "notes").write_text("not a folder\n")
    output = tmp_path / "notes" / "gt.json"
    with pytest.raises(SystemExit) as exit_info:
        ilias_ground_truth.main(["--ids_dir", str(tmp_path / "image_ids"), "--output", str(output)])
    assert exit_info.value.code == 2
    assert f"{str(tmp_path / 'notes')!r} is a file, not a folder; choose another path" in capsys.readouterr().err


def test_line_without_id_exits_1(tmp_path, caplog):
    # a line with fields but an empty first field has lost its id, so skipping it would drop a positive silently
    _write_ids(tmp_path / "image_ids", QUERIES, [*POSITIVES[:2], ",0.12,5", *POSITIVES[2:]])
    output = tmp_path / "gt.json"
    code = ilias_ground_truth.main(["--ids_dir", str(tmp_path / "image_ids"), "--output", str(output)])
    assert code == 1
    assert "positive_ids.txt:3: the line has no id in its first field" in caplog.text
    assert not output.exists()


@pytest.mark.parametrize("signal_name, status", [("SIGTERM", 143), ("SIGHUP", 129)])
def test_termination_during_write(tmp_path, signal_name, status):
    # the signal arrives while the JSON is written to its temporary file
    _write_ids(tmp_path / "image_ids", QUERIES, POSITIVES)
    output_dir = tmp_path / "out"
    code = (
        "import json, os, runpy, signal, sys\n"
        "original = json.dump\n"
        "def dump_then_signal(*a, **k):\n"
        "    original(*a, **k)\n"
        f"    os.kill(os.getpid(), signal.{signal_name})\n"
        "json.dump = dump_then_signal\n"
        f"sys.argv = ['ilias_ground_truth.py', '--ids_dir', {str(tmp_path / 'image_ids')!r}, "
        f"'--output', {str(output_dir / 'gt.json')!r}]\n"
        "runpy.run_path('misc/ilias_ground_truth.py', run_name='__main__')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == status
    assert f"terminated ({signal_name}); the output was not written" in result.stderr
    assert "Traceback" not in result.stderr
    assert list(output_dir.iterdir()) == []
