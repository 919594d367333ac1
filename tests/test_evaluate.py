"""The evaluation command on small HDF5 files, checked against a brute-force reference."""
import json
import os
import signal
import subprocess
import sys
import tracemalloc
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from feature_extraction.image_list import canonical_id, escape_id, file_sha256
import linear_adaptation.evaluate as evaluate_module
from linear_adaptation.eval_report import write_ilias_similarities
from linear_adaptation.evaluate import evaluate_query_database, get_args_parser, main
from linear_adaptation.features_io import DataError
from linear_adaptation.ground_truth import match_ground_truth, read_ground_truth
from linear_adaptation.hdf5_shards import expand_database_paths
from linear_adaptation.lin_adapt import LinearAdapter

REPO = Path(__file__).resolve().parents[1]
DIM = 8


# ---------------------------------------------------------------- helpers


def _write_hdf5(path, ids, features, escape=True):
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=features)
        if escape:
            f.create_dataset("index", data=np.array([escape_id(i) for i in ids], dtype=np.bytes_))
        else:
            f.create_dataset("index", data=ids, dtype=h5py.string_dtype())


def _normalise(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _ranked_ids(queries, database, database_ids, k, query_ids=None):
    """Rank by cosine in float64, ties by lower row; with query_ids, a query's own id is skipped."""
    scores = _normalise(queries) @ _normalise(database).T
    ranked = []
    for q, row_scores in enumerate(scores):
        order = sorted(range(len(database_ids)), key=lambda r: (-row_scores[r], r))
        ids = [database_ids[r] for r in order if query_ids is None or database_ids[r] != query_ids[q]]
        ranked.append(ids[:k])
    return ranked


def _reference_metrics(ranked, positives, k):
    """Mean AP@k, recall@1 and MP@5 in percent over queries with positives, written independently."""
    aps, recalls, precisions = [], [], []
    for ranked_ids, positive_ids in zip(ranked, positives):
        if not positive_ids:
            continue
        hits, precision_sum = 0, 0.0
        for rank, image_id in enumerate(ranked_ids[:k], start=1):
            if image_id in positive_ids:
                hits += 1
                precision_sum += hits / rank
        aps.append(precision_sum / min(k, len(positive_ids)))
        recalls.append(float(ranked_ids[0] in positive_ids))
        m = min(5, len(positive_ids))
        precisions.append(sum(i in positive_ids for i in ranked_ids[:m]) / m)
    return {"map": 100 * np.mean(aps), "recall@1": 100 * np.mean(recalls), "mmp@5": 100 * np.mean(precisions)}


def _adapt(weight, bias, features):
    return _normalise(np.asarray(features, dtype=np.float64) @ weight.T.astype(np.float64) + bias)


def _save_layer(path, weight, bias):
    torch.save({"layer.weight": torch.from_numpy(weight), "layer.bias": torch.from_numpy(bias)}, path)


def _run(argv):
    return main(get_args_parser().parse_args([str(a) for a in argv]))


@pytest.fixture
def layer_params():
    rng = np.random.default_rng(7)
    return rng.standard_normal((6, DIM)).astype(np.float32), rng.standard_normal(6).astype(np.float32) * 0.1


# ---------------------------------------------------------------- mode 1: labelled set


@pytest.fixture
def labelled_set(tmp_path):
    """24 images, 2 domains x 3 classes x 4 images, clustered around class centres."""
    rng = np.random.default_rng(3)
    entries, features = [], []
    for domain in range(2):
        for label in range(3):
            centre = rng.standard_normal(DIM)
            for i in range(4):
                name = f"d{domain}/c{label}/caf\u00e9_{i}.jpg" if (domain, label, i) == (1, 2, 0) else f"d{domain}/c{label}/{i}.jpg"
                entries.append((name, label, domain))
                features.append(centre + 0.9 * rng.standard_normal(DIM))
    features = _normalise(features).astype(np.float32)

    # the HDF5 rows are stored in another order than the list
    order = rng.permutation(len(entries))
    hdf5_path = tmp_path / "heldout.hdf5"
    _write_hdf5(hdf5_path, [entries[i][0] for i in order], features[order])
    list_path = tmp_path / "heldout_paths.txt"
    list_path.write_text("".join(f"{p},{l},{d}\n" for p, l, d in entries), encoding="utf-8")
    return {"hdf5": hdf5_path, "list": list_path, "entries": entries, "features": features}


def _labelled_reference(entries, embeddings, k):
    ids = [e[0] for e in entries]
    ranked = _ranked_ids(embeddings, embeddings, ids, k, query_ids=ids)
    classes = {e[0]: (e[2], e[1]) for e in entries}
    positives = [{i for i in ids if classes[i] == classes[q_id] and i != q_id} for q_id in ids]
    per_domain = {}
    for domain in sorted({e[2] for e in entries}):
        members = [q for q, e in enumerate(entries) if e[2] == domain]
        per_domain[domain] = _reference_metrics([ranked[q] for q in members], [positives[q] for q in members], k)
    per_domain["all"] = _reference_metrics(ranked, positives, k)
    return per_domain, ranked


def test_labelled_set_without_layer(labelled_set, tmp_path, capsys):
    save_json, save_ranks = tmp_path / "out" / "metrics.json", tmp_path / "out" / "ranks.json"
    code = _run(
        ["--features_path", labelled_set["hdf5"], "--info_path", labelled_set["list"], "--k", 5,
         "--device", "cpu", "--chunk_rows", 7, "--save_json", save_json, "--save_ranks", save_ranks]
    )
    assert code == 0

    per_domain, ranked = _labelled_reference(labelled_set["entries"], labelled_set["features"], 5)
    report = json.loads(save_json.read_text())
    metrics = report["metrics"]["without_layer"]
    assert "with_layer" not in report["metrics"]
    overall = per_domain.pop("all")
    for domain, expected in per_domain.items():
        for name, value in expected.items():
            assert metrics["per_domain"][str(domain)][name] == pytest.approx(value)
    assert metrics["map"] == pytest.approx(np.mean([m["map"] for m in per_domain.values()]))
    for name, value in overall.items():
        assert metrics["all_queries"][name] == pytest.approx(value)
    assert report["mode"] == "labelled_set"
    assert report["k"] == 5
    assert report["counts"]["images"] == 24
    assert report["inputs"]["features_path"][0]["sha256"] == file_sha256(labelled_set["hdf5"])
    assert report["args"]["device"] == "cpu"

    ranks = json.loads(save_ranks.read_text())
    first_id = escape_id(labelled_set["entries"][0][0])
    assert ranks["without_layer"][first_id]["ids"] == [escape_id(i) for i in ranked[0]]
    assert len(ranks["without_layer"][first_id]["scores"]) == 5

    table = capsys.readouterr().out
    assert "mAP@5" in table
    assert f"{metrics['map']:.2f}" in table.splitlines()[-2]
    assert f"{metrics['all_queries']['map']:.2f}" in table.splitlines()[-1]
    assert "domain 1" in table


def test_labelled_set_with_layer(labelled_set, tmp_path, layer_params, capsys):
    weight, bias = layer_params
    layer_path = tmp_path / "lin_adapt.pth"
    _save_layer(layer_path, weight, bias)
    save_json = tmp_path / "metrics.json"
    code = _run(
        ["--features_path", labelled_set["hdf5"], "--info_path", labelled_set["list"], "--k", 6,
         "--lin_adapt_path", layer_path, "--device", "cpu", "--save_json", save_json]
    )
    assert code == 0

    report = json.loads(save_json.read_text())["metrics"]
    adapted = _adapt(weight, bias, labelled_set["features"])
    without, _ = _labelled_reference(labelled_set["entries"], labelled_set["features"], 6)
    with_layer, _ = _labelled_reference(labelled_set["entries"], adapted, 6)
    for domain in (0, 1):
        assert report["without_layer"]["per_domain"][str(domain)]["map"] == pytest.approx(without[domain]["map"])
        assert report["with_layer"]["per_domain"][str(domain)]["map"] == pytest.approx(with_layer[domain]["map"])
    assert report["with_layer"]["map"] != pytest.approx(report["without_layer"]["map"])

    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[1:3] == ["without", "with"]
    macro = lines[-2].split()
    assert macro[:2] == ["macro", "average"]
    assert float(macro[3]) == pytest.approx(report["without_layer"]["map"], abs=0.006)
    assert float(macro[4]) == pytest.approx(report["with_layer"]["map"], abs=0.006)
    micro = lines[-1].split()
    assert micro[:2] == ["all", "queries"]
    assert float(micro[3]) == pytest.approx(report["without_layer"]["all_queries"]["map"], abs=0.006)


def test_labelled_set_missing_list_entry(labelled_set, tmp_path):
    lines = labelled_set["list"].read_text().splitlines()
    labelled_set["list"].write_text("\n".join(lines[1:]) + "\n")
    save_json = tmp_path / "metrics.json"
    args = ["--features_path", labelled_set["hdf5"], "--info_path", labelled_set["list"], "--save_json", save_json]
    assert _run(args) == 1
    assert not save_json.exists()
    assert _run(args + ["--allow_missing", "yes"]) == 0
    assert json.loads(save_json.read_text())["counts"]["hdf5_ids_missing_from_list"] == 1


def test_layer_dimension_mismatch_exits_1(labelled_set, tmp_path, caplog):
    layer_path = tmp_path / "wide.pth"
    torch.save(LinearAdapter(DIM + 1, 4).state_dict(), layer_path)
    save_json = tmp_path / "metrics.json"
    code = _run(
        ["--features_path", labelled_set["hdf5"], "--info_path", labelled_set["list"],
         "--lin_adapt_path", layer_path, "--save_json", save_json]
    )
    assert code == 1
    assert "maps 9-dimensional embeddings but the embeddings have 8" in caplog.text
    assert not save_json.exists()


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["--features_path", "a.hdf5"],
        ["--features_path", "a.hdf5", "--info_path", "l.txt", "--query_hdf5", "q.hdf5"],
        ["--features_path", "a.hdf5", "--info_path", "l.txt", "--k", "0"],
        ["--features_path", "a.hdf5", "--info_path", "l.txt", "--save_ranks", "ranks.csv"],
        ["--features_path", "a.hdf5", "--info_path", "l.txt", "--allow_missing", "maybe"],
        ["--query_hdf5", "q.hdf5", "--db_hdf5", "d.hdf5"],
    ],
    ids=["no_mode", "mode1_incomplete", "both_modes", "k_zero", "rank_extension", "bad_bool", "mode2_incomplete"],
)
def test_bad_arguments_exit_2(argv):
    with pytest.raises(SystemExit) as exit_info:
        _run(argv)
    assert exit_info.value.code == 2


def test_cli_subprocess_exit_codes(labelled_set, tmp_path):
    script = REPO / "linear_adaptation" / "evaluate.py"
    ok = subprocess.run(
        [sys.executable, script, "--features_path", labelled_set["hdf5"], "--info_path", labelled_set["list"],
         "--k", "5", "--device", "cpu"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    assert "macro average" in ok.stdout

    save_json = tmp_path / "metrics.json"
    missing = subprocess.run(
        [sys.executable, script, "--features_path", tmp_path / "absent.hdf5", "--info_path", labelled_set["list"],
         "--save_json", save_json],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert missing.returncode == 2
    assert "--features_path " in missing.stderr
    assert "absent.hdf5' does not exist; check the path" in missing.stderr
    assert "Traceback" not in missing.stderr
    assert not save_json.exists()


# ---------------------------------------------------------------- mode 2: queries against a database


@pytest.fixture
def query_database(tmp_path):
    """4 query rows (one without ground truth) and 25 database rows in shards 1, 2 and 10."""
    rng = np.random.default_rng(11)
    query_ids = ["q/0.jpg", "q/\u00fcn\u00ef.jpg", "q/2.jpg", "q/no_gt.jpg"]
    queries = _normalise(rng.standard_normal((4, DIM))).astype(np.float32)
    _write_hdf5(tmp_path / "queries.hdf5", query_ids, queries)

    shard_rows = {1: 10, 2: 10, 10: 5}  # numeric order 1, 2, 10; text order would put 10 before 2
    database = rng.standard_normal((25, DIM))
    # positives lie near their query, so that they rank at various places in the top k
    for query, rows in ((0, (3, 17, 20)), (1, (10, 24))):
        database[list(rows)] = queries[query] + 0.5 * rng.standard_normal((len(rows), DIM))
    database = _normalise(database).astype(np.float16)

    database_ids, start = [], 0
    for shard, rows in shard_rows.items():
        ids = [f"db/{shard}/\u00f1_{i}.jpg" if i == 0 else f"db/{shard}/{i}.jpg" for i in range(rows)]
        # shard 10 stores unescaped UTF-8 ids, as some writers do
        _write_hdf5(tmp_path / f"db_{shard}.hdf5", ids, database[start : start + rows], escape=shard != 10)
        database_ids += ids
        start += rows

    ground_truth = {
        "q/0.jpg": ["db/1/3.jpg", "db/10/\u00f1_0.jpg", "db/2/7.jpg", "db/missing.jpg"],
        escape_id("q/\u00fcn\u00ef.jpg"): [escape_id("db/2/\u00f1_0.jpg"), "db/10/4.jpg"],
        "q/2.jpg": [],
        "q/not_in_query_file.jpg": ["db/1/1.jpg"],
    }
    gt_path = tmp_path / "gt.json"
    gt_path.write_text(json.dumps(ground_truth, ensure_ascii=False), encoding="utf-8")
    positives = [
        {"db/1/3.jpg", "db/10/\u00f1_0.jpg", "db/2/7.jpg"},
        {"db/2/\u00f1_0.jpg", "db/10/4.jpg"},
        set(),
    ]
    return {
        "dir": tmp_path, "queries": queries, "query_ids": query_ids, "database": database,
        "database_ids": database_ids, "gt": gt_path, "positives": positives,
    }


@pytest.mark.parametrize("missing_positives", [None, "count", "drop"])
def test_query_database_with_shards_and_layer(query_database, tmp_path, layer_params, capsys, missing_positives):
    weight, bias = layer_params
    layer_path = tmp_path / "lin_adapt.pth"
    _save_layer(layer_path, weight, bias)
    save_json, save_ranks = tmp_path / "metrics.json", tmp_path / "ranks.json"
    mode_flag = [] if missing_positives is None else ["--missing_positives", missing_positives]
    code = _run(
        ["--query_hdf5", tmp_path / "queries.hdf5", "--db_hdf5", tmp_path / "db_{idx}.hdf5", "--gt_path",
         query_database["gt"], "--k", 6, "--chunk_rows", 4, "--lin_adapt_path", layer_path, "--device", "cpu",
         "--save_json", save_json, "--save_ranks", save_ranks, *mode_flag]
    )
    assert code == 0
    # by default, as in the ILIAS evaluation, the positive that no shard contains is one never retrieved
    positives = [set(p) for p in query_database["positives"]]
    if missing_positives != "drop":
        positives[0].add("db/missing.jpg")

    queries, database = query_database["queries"][:3], query_database["database"]
    ids = query_database["database_ids"]
    expected = {
        "without_layer": _ranked_ids(queries, database, ids, 6),
        "with_layer": _ranked_ids(_adapt(weight, bias, queries), _adapt(weight, bias, database), ids, 6),
    }
    report = json.loads(save_json.read_text())
    ranks = json.loads(save_ranks.read_text())
    for variant, ranked in expected.items():
        reference = _reference_metrics(ranked, positives, 6)
        for name, value in reference.items():
            assert report["metrics"][variant][name] == pytest.approx(value)
        assert report["metrics"][variant]["num_queries"] == 2
        assert report["metrics"][variant]["queries_without_positives"] == 1
        escaped_query = escape_id(query_database["query_ids"][1])
        assert ranks[variant][escaped_query]["ids"] == [escape_id(i) for i in ranked[1]]

    assert report["counts"] == {
        "database_rows": 25,
        "database_rows_left_out_by_selection": 0,
        "queries_scored": 3,
        "queries_without_ground_truth": 1,
        "ground_truth_queries_missing": 1,
        "positives_missing_from_database": 1,
        "queries_with_missing_positives": 1,
    }
    assert report["args"]["missing_positives"] == (missing_positives or "count")
    assert [Path(e["path"]).name for e in report["inputs"]["db_hdf5"]] == ["db_1.hdf5", "db_2.hdf5", "db_10.hdf5"]
    table = capsys.readouterr().out
    assert "all queries" in table
    assert "mAP@6" in table


@pytest.mark.parametrize("missing_positives", ["count", "drop"])
def test_query_whose_positives_are_all_missing(query_database, tmp_path, missing_positives):
    # q/2.jpg lists only ids that no shard contains, as when its positives failed to extract
    gt_path = tmp_path / "gt_missing.json"
    gt_path.write_text(json.dumps({"q/0.jpg": ["db/1/3.jpg"], "q/2.jpg": ["db/gone_1.jpg", "db/gone_2.jpg"]}))
    save_json = tmp_path / "metrics.json"
    code = _run(
        ["--query_hdf5", tmp_path / "queries.hdf5", "--db_hdf5", tmp_path / "db_{idx}.hdf5", "--gt_path", gt_path,
         "--k", 6, "--missing_positives", missing_positives, "--save_json", save_json]
    )
    assert code == 0

    metrics = json.loads(save_json.read_text())["metrics"]["without_layer"]
    ranked = _ranked_ids(query_database["queries"][:1], query_database["database"], query_database["database_ids"], 6)
    ap_of_q0 = _reference_metrics(ranked, [{"db/1/3.jpg"}], 6)["map"]
    if missing_positives == "count":
        assert (metrics["num_queries"], metrics["queries_without_positives"]) == (2, 0)
        assert metrics["map"] == pytest.approx(ap_of_q0 / 2)  # q/2.jpg scores AP 0
    else:
        assert (metrics["num_queries"], metrics["queries_without_positives"]) == (1, 1)
        assert metrics["map"] == pytest.approx(ap_of_q0)


def test_missing_positives_flag_is_for_mode_2_only(labelled_set, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _run(["--features_path", labelled_set["hdf5"], "--info_path", labelled_set["list"],
              "--missing_positives", "drop"])
    assert exit_info.value.code == 2
    assert "--missing_positives applies to mode 2 only" in capsys.readouterr().err


def _ilias_style_map(similarities, ground_truth, k):
    """mAP@k in percent as the ILIAS evaluation computes it from a similarity file, for distinct scores.

    Each query's list is sorted by descending score and cut to k. AP is the mean precision at
    the hits (average precision over the list) times hits / min(k, listed positives).
    """
    aps = []
    for query_id, ranked in similarities.items():
        order = sorted(ranked, key=lambda image_id: -ranked[image_id])[:k]
        relevant = [image_id in ground_truth[query_id] for image_id in order]
        hits = sum(relevant)
        if hits == 0:
            aps.append(0.0)
            continue
        precisions = [sum(relevant[: rank + 1]) / (rank + 1) for rank in range(len(order)) if relevant[rank]]
        aps.append(sum(precisions) / hits * hits / min(k, len(ground_truth[query_id])))
    return 100 * sum(aps) / len(aps)


@pytest.mark.parametrize("with_layer", [True, False])
def test_save_similarities_in_ilias_format(query_database, tmp_path, layer_params, with_layer):
    weight, bias = layer_params
    _save_layer(tmp_path / "layer.pth", weight, bias)
    gt_path = tmp_path / "gt_listed.json"
    ground_truth = {"q/0.jpg": ["db/1/3.jpg", "db/10/\u00f1_0.jpg", "db/2/7.jpg", "db/missing.jpg"],
                    escape_id("q/\u00fcn\u00ef.jpg"): ["db/10/4.jpg"]}
    gt_path.write_text(json.dumps(ground_truth))
    similarities_path, save_json = tmp_path / "out" / "similarities.json", tmp_path / "metrics.json"
    layer_flag = ["--lin_adapt_path", tmp_path / "layer.pth"] if with_layer else []
    code = _run(
        ["--query_hdf5", tmp_path / "queries.hdf5", "--db_hdf5", tmp_path / "db_{idx}.hdf5", "--gt_path", gt_path,
         "--k", 8, "--save_similarities", similarities_path, "--save_json", save_json, *layer_flag]
    )
    assert code == 0

    similarities = json.loads(similarities_path.read_text(encoding="utf-8"))
    assert list(similarities) == ["q/0.jpg", escape_id("q/\u00fcn\u00ef.jpg")]
    queries, database = query_database["queries"][:2], query_database["database"]
    if with_layer:
        queries, database = _adapt(weight, bias, queries), _adapt(weight, bias, database)
    expected = _ranked_ids(queries, database, query_database["database_ids"], 8)
    expected_scores = np.sort(_normalise(queries) @ _normalise(database).T.astype(np.float64), axis=1)[:, ::-1][:, :8]
    for position, ranked in enumerate(similarities.values()):
        assert list(ranked) == [escape_id(i) for i in expected[position]]
        assert np.allclose(list(ranked.values()), expected_scores[position], atol=1e-3)

    variant = "with_layer" if with_layer else "without_layer"
    report = json.loads(save_json.read_text())["metrics"][variant]
    escaped_truth = {escape_id(q): {escape_id(p) for p in positives} for q, positives in ground_truth.items()}
    assert report["map"] == pytest.approx(_ilias_style_map(similarities, escaped_truth, 8))


def test_similarities_written_one_query_at_a_time(tmp_path):
    # 1,000 queries x 300 places as Python floats and ints take about 20 MB, one query's list a few kB
    num_queries, depth = 1000, 300
    rng = np.random.default_rng(0)
    scores = -np.sort(-rng.random((num_queries, depth), dtype=np.float32), axis=1)
    rows = rng.permuted(np.tile(np.arange(1000), (num_queries, 1)), axis=1)[:, :depth]
    rows[-1, -10:] = -1  # padding is left out
    path = tmp_path / "similarities.json"

    tracemalloc.start()
    try:
        write_ilias_similarities(str(path), [f"q/{i}.jpg" for i in range(num_queries)],
                                 [f"db/{i}.jpg" for i in range(1000)], scores, rows)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    assert peak < 5_000_000
    similarities = json.loads(path.read_text())
    assert len(similarities) == num_queries
    assert list(similarities["q/0.jpg"]) == [f"db/{r}.jpg" for r in rows[0]]
    assert list(similarities["q/0.jpg"].values()) == scores[0].tolist()
    assert list(similarities[f"q/{num_queries - 1}.jpg"]) == [f"db/{r}.jpg" for r in rows[-1, :-10]]


def test_map_with_tied_scores_matches_ilias(tmp_path):
    # rows 0 and 1 are copies and tie at the top, but only row 0 is a positive. The ILIAS
    # evaluation (scikit-learn's average precision) gives both the precision at the end of
    # the tie, 1/2, whichever of them the search lists first.
    e0, e1 = np.eye(DIM)[0], np.eye(DIM)[1]
    database = np.stack([e0, e0, e1, (e0 + e1) / np.sqrt(2)]).astype(np.float32)
    database_ids = ["db/pos_a.jpg", "db/copy.jpg", "db/other.jpg", "db/pos_b.jpg"]
    _write_hdf5(tmp_path / "db.hdf5", database_ids, database)
    _write_hdf5(tmp_path / "q.hdf5", ["q.jpg"], e0[None].astype(np.float32))
    (tmp_path / "gt.json").write_text(json.dumps({"q.jpg": ["db/pos_a.jpg", "db/pos_b.jpg"]}))
    similarities_path, save_json = tmp_path / "similarities.json", tmp_path / "metrics.json"
    code = _run(["--query_hdf5", tmp_path / "q.hdf5", "--db_hdf5", tmp_path / "db.hdf5", "--gt_path",
                 tmp_path / "gt.json", "--k", 4, "--device", "cpu", "--save_similarities", similarities_path,
                 "--save_json", save_json])
    assert code == 0

    ranked = json.loads(similarities_path.read_text())["q.jpg"]
    assert list(ranked) == ["db/pos_a.jpg", "db/copy.jpg", "db/pos_b.jpg", "db/other.jpg"]
    assert ranked["db/pos_a.jpg"] == ranked["db/copy.jpg"]
    metrics = json.loads(save_json.read_text())["metrics"]["without_layer"]
    assert metrics["map"] == pytest.approx(100 * (1 / 2 + 2 / 3) / 2)
    assert metrics["recall@1"] == 100.0  # the lower row comes first
    assert metrics["mmp@5"] == pytest.approx(50.0)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--save_similarities", "sims.pkl"], "--save_similarities 'sims.pkl' must end with .json"),
        (["--save_similarities", "{out}", "--save_ranks", "{out}"], "--save_ranks and --save_similarities both name"),
    ],
    ids=["extension", "same_as_ranks"],
)
def test_save_similarities_bad_paths_exit_2(query_database, tmp_path, capsys, extra, message):
    out = str(tmp_path / "out.json")
    argv = ["--query_hdf5", tmp_path / "queries.hdf5", "--db_hdf5", tmp_path / "db_1.hdf5", "--gt_path",
            query_database["gt"], *[value.replace("{out}", out) for value in extra]]
    code, error = _exit_status_and_error(argv, capsys)
    assert code == 2
    assert message in error


def test_save_similarities_is_for_mode_2_only(labelled_set, tmp_path, capsys):
    code, error = _exit_status_and_error(_labelled_args(labelled_set, "--save_similarities", tmp_path / "s.json"), capsys)
    assert code == 2
    assert "--save_similarities applies to mode 2 only" in error
    assert not (tmp_path / "s.json").exists()


def test_database_selection_searches_subset(query_database, tmp_path):
    selection = tmp_path / "selected.txt"
    # an id, a list line, the shard folder "2" (matched as the second path component) and a blank line
    selection.write_text("db/1/5.jpg\r\ndb/10/1.jpg,3,0\n\n2\n", encoding="utf-8")
    save_json, save_ranks = tmp_path / "metrics.json", tmp_path / "ranks.json"
    code = _run(
        ["--query_hdf5", tmp_path / "queries.hdf5", "--db_hdf5", tmp_path / "db_{idx}.hdf5", "--gt_path",
         query_database["gt"], "--db_selected_ids", selection, "--k", 6, "--chunk_rows", 3,
         "--save_json", save_json, "--save_ranks", save_ranks]
    )
    assert code == 0

    ids = query_database["database_ids"]
    positives_in_ground_truth = {"db/1/3.jpg", "db/10/\u00f1_0.jpg", "db/2/7.jpg", "db/2/\u00f1_0.jpg", "db/10/4.jpg",
                                 "db/1/1.jpg"}
    kept = [row for row, image_id in enumerate(ids)
            if image_id in {"db/1/5.jpg", "db/10/1.jpg"} | positives_in_ground_truth or image_id.startswith("db/2/")]
    assert len(kept) == 16  # 10 rows of shard 2, 2 selected ids and 4 positives outside shard 2
    ranked = _ranked_ids(query_database["queries"][:3], query_database["database"][kept], [ids[r] for r in kept], 6)

    ranks = json.loads(save_ranks.read_text())["without_layer"]
    assert [ranks[escape_id(q)]["ids"] for q in query_database["query_ids"][:3]] == [
        [escape_id(i) for i in r] for r in ranked
    ]
    report = json.loads(save_json.read_text())
    positives = [set(p) for p in query_database["positives"]]
    positives[0].add("db/missing.jpg")
    for name, value in _reference_metrics(ranked, positives, 6).items():
        assert report["metrics"]["without_layer"][name] == pytest.approx(value)
    assert report["counts"]["database_rows"] == 16
    assert report["counts"]["database_rows_left_out_by_selection"] == 9


def test_database_selection_without_matches(query_database, tmp_path, caplog):
    selection = tmp_path / "selected.txt"
    selection.write_text("elsewhere/0.jpg\n", encoding="utf-8")
    save_json = tmp_path / "metrics.json"
    code = _run(
        ["--query_hdf5", tmp_path / "queries.hdf5", "--db_hdf5", tmp_path / "db_{idx}.hdf5", "--gt_path",
         query_database["gt"], "--db_selected_ids", selection, "--save_json", save_json]
    )
    assert code == 0
    assert "no database row other than the ground-truth positives matches the 1 ids" in caplog.text
    assert json.loads(save_json.read_text())["counts"]["database_rows"] == 6  # the positives only

    gt_path = tmp_path / "gt_absent.json"
    gt_path.write_text(json.dumps({"q/0.jpg": ["db/missing.jpg"]}))
    code = _run(
        ["--query_hdf5", tmp_path / "queries.hdf5", "--db_hdf5", tmp_path / "db_{idx}.hdf5", "--gt_path", gt_path,
         "--db_selected_ids", selection]
    )
    assert code == 1
    assert "no database row is selected by" in caplog.text


def test_id_repeated_across_shards_names_files(query_database, tmp_path, caplog):
    copy = tmp_path / "copy.hdf5"
    _write_hdf5(copy, ["db/1/5.jpg"], query_database["database"][:1])
    code = _run(
        ["--query_hdf5", tmp_path / "queries.hdf5", "--db_hdf5", tmp_path / "db_1.hdf5", copy,
         "--gt_path", query_database["gt"]]
    )
    assert code == 1
    assert f"1 database ids occur more than once (e.g. 'db/1/5.jpg' in {str(tmp_path / 'db_1.hdf5')!r} and " \
           f"{str(copy)!r})" in caplog.text


def test_database_selection_is_for_mode_2_only(labelled_set, tmp_path, capsys):
    selection = tmp_path / "selected.txt"
    selection.write_text("a.jpg\n", encoding="utf-8")
    code, error = _exit_status_and_error(_labelled_args(labelled_set, "--db_selected_ids", selection), capsys)
    assert code == 2
    assert "--db_selected_ids applies to mode 2 only" in error


def test_database_selection_file_missing_exit_2(query_database, tmp_path, capsys):
    argv = ["--query_hdf5", tmp_path / "queries.hdf5", "--db_hdf5", tmp_path / "db_1.hdf5", "--gt_path",
            query_database["gt"], "--db_selected_ids", tmp_path / "absent.txt"]
    code, error = _exit_status_and_error(argv, capsys)
    assert code == 2
    assert "--db_selected_ids" in error
    assert "absent.txt' does not exist" in error


@pytest.mark.parametrize("extension", [".npz", ".hdf5"])
def test_query_database_compact_ranks(query_database, tmp_path, extension):
    save_ranks = tmp_path / f"ranks{extension}"
    code = _run(
        ["--query_hdf5", tmp_path / "queries.hdf5", "--db_hdf5", tmp_path / "db_1.hdf5", tmp_path / "db_2.hdf5",
         tmp_path / "db_1?.hdf5", "--gt_path", query_database["gt"], "--k", 30, "--save_ranks", save_ranks]
    )
    assert code == 0

    if extension == ".npz":
        with np.load(save_ranks) as f:
            arrays = {name: f[name] for name in f.files}
    else:
        with h5py.File(save_ranks, "r") as f:
            arrays = {name: f[name][()] for name in f}
            arrays["k"] = f.attrs["k"]
    assert int(arrays["k"]) == 30
    # 25 database rows and k = 30: the search returns the whole database, without padding
    assert arrays["rows_without_layer"].shape == (3, 25)
    assert "rows_with_layer" not in arrays
    assert (arrays["rows_without_layer"] >= 0).all()

    database_ids = [i.decode() for i in arrays["database_ids"]]
    assert database_ids == [escape_id(i) for i in query_database["database_ids"]]
    expected = _ranked_ids(query_database["queries"][:3], query_database["database"], database_ids, 25)
    ranked = [[database_ids[r] for r in rows[:25]] for rows in arrays["rows_without_layer"]]
    assert ranked == expected
    assert [i.decode() for i in arrays["query_ids"]] == [escape_id(i) for i in query_database["query_ids"][:3]]


def test_query_database_dimension_mismatch(query_database, tmp_path):
    _write_hdf5(tmp_path / "wide.hdf5", ["w/0.jpg"], np.ones((1, DIM + 2), dtype=np.float32))
    with pytest.raises(DataError, match="queries in .* have 8 dimensions but the database has 10"):
        evaluate_query_database(str(tmp_path / "queries.hdf5"), [str(tmp_path / "wide.hdf5")], str(query_database["gt"]))


def test_query_database_nan_row(query_database, tmp_path):
    features = np.ones((3, DIM), dtype=np.float32)
    features[2, 0] = np.nan
    _write_hdf5(tmp_path / "nan.hdf5", ["n/0.jpg", "n/1.jpg", "n/2.jpg"], features)
    with pytest.raises(DataError, match="row 2 \\(id 'n/2.jpg'\\) contains NaN or Inf"):
        evaluate_query_database(
            str(tmp_path / "queries.hdf5"), [str(tmp_path / "nan.hdf5")], str(query_database["gt"]), chunk_rows=2
        )


# ---------------------------------------------------------------- database paths and ground truth


def test_shard_pattern_numeric_order(tmp_path):
    for shard in (10, 2, 1):
        (tmp_path / f"part_{shard}.h5").touch()
    (tmp_path / "part_x.h5").touch()
    paths = expand_database_paths([str(tmp_path / "part_{idx}.h5")])
    assert [Path(p).name for p in paths] == ["part_1.h5", "part_2.h5", "part_10.h5"]
    paths = expand_database_paths([str(tmp_path / "part_*.h5")])
    assert [Path(p).name for p in paths] == ["part_1.h5", "part_2.h5", "part_10.h5", "part_x.h5"]


def test_shard_pattern_with_doubled_separator(tmp_path):
    # "$DIR/part_{idx}.h5" with DIR ending in "/" gives "//", which glob collapses in what it returns
    for shard in (2, 1):
        (tmp_path / f"part_{shard}.h5").touch()
    paths = expand_database_paths([str(tmp_path) + "//part_{idx}.h5"])
    assert [Path(p).name for p in paths] == ["part_1.h5", "part_2.h5"]
    assert all(Path(p).parent == tmp_path for p in paths)


def test_shard_pattern_gap_to_huge_number(tmp_path, caplog):
    # a stray file numbered like a timestamp once made the gap check build a set of 10**12 numbers
    for shard in (1, 3, 10**12):
        (tmp_path / f"part_{shard}.h5").touch()
    code = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))\n"
        "from linear_adaptation.hdf5_shards import expand_database_paths\n"
        "print(len(expand_database_paths([sys.argv[1]])))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "part_{idx}.h5")],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "3"

    expand_database_paths([str(tmp_path / "part_{idx}.h5")])
    assert f"{10**12 - 3} shard numbers from 1 to {10**12} are missing (first: [2, 4, 5, 6," in caplog.text


def test_shard_pattern_errors(tmp_path):
    (tmp_path / "a.h5").touch()
    with pytest.raises(DataError, match="no file matches the database pattern"):
        expand_database_paths([str(tmp_path / "b_{idx}.h5")])
    with pytest.raises(DataError, match="no file matches the database glob"):
        expand_database_paths([str(tmp_path / "b*.h5")])
    with pytest.raises(DataError, match="not found"):
        expand_database_paths([str(tmp_path / "b.h5")])
    # Regression: a folder was reported as a missing file.
    with pytest.raises(DataError, match="is a folder; give its HDF5 files, a glob such as"):
        expand_database_paths([str(tmp_path)])
    with pytest.raises(DataError, match="given more than once"):
        expand_database_paths([str(tmp_path / "a.h5"), str(tmp_path / "*.h5")])


def test_database_file_named_like_glob(tmp_path):
    (tmp_path / "run[2]").mkdir()
    (tmp_path / "run2").mkdir()
    (tmp_path / "run[2]" / "db.h5").touch()
    (tmp_path / "run2" / "db.h5").touch()
    paths = expand_database_paths([str(tmp_path / "run[2]" / "db.h5")])
    assert paths == [str(tmp_path / "run[2]" / "db.h5")]
    # a glob that names no file is still expanded
    paths = expand_database_paths([str(tmp_path / "run[0-9]" / "db.h5")])
    assert paths == [str(tmp_path / "run2" / "db.h5")]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "is not valid UTF-8 JSON"),
        ('["q.jpg"]', "contains a JSON list, expected an object"),
        ('{"q.jpg": "a.jpg"}', "expected a list of database id strings"),
        ('{"q\\u00e9.jpg": [], "q#U00e9.jpg": []}', "occurs twice"),
        ('{"q.jpg": ["a.jpg"], "r.jpg": [], "q.jpg": ["b.jpg"]}', "key 'q.jpg' occurs twice in one JSON object"),
        ("{}", "lists no queries"),
    ],
    ids=["syntax", "list", "string_value", "escaped_twice", "same_key_twice", "empty"],
)
def test_ground_truth_format_errors(tmp_path, content, message):
    path = tmp_path / "gt.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message):
        read_ground_truth(path)


def test_ground_truth_with_byte_order_mark(tmp_path):
    # editors on Windows often start a UTF-8 file with a byte-order mark
    path = tmp_path / "gt.json"
    path.write_text('{"q\u00e9.jpg": ["a.jpg"]}', encoding="utf-8-sig")
    assert read_ground_truth(path) == {"q#U00e9.jpg": ["a.jpg"]}


def test_ground_truth_matching(tmp_path):
    path = tmp_path / "gt.json"
    path.write_text(json.dumps({"q\u00e9.jpg": ["b.jpg", "a.jpg", "b.jpg", "zz.jpg"], "other.jpg": ["a.jpg"]}))
    matched = match_ground_truth(read_ground_truth(path), ["x.jpg", "q#U00e9.jpg"], ["a.jpg", "b.jpg", "c.jpg"])
    assert matched.query_rows.tolist() == [1]
    assert matched.positives[0].tolist() == [1, 0]  # the repeated b.jpg counts once
    assert matched.listed_positives.tolist() == [3]  # b.jpg, a.jpg and zz.jpg, which the database lacks
    assert matched.counts() == {
        "queries_scored": 1,
        "queries_without_ground_truth": 1,
        "ground_truth_queries_missing": 1,
        "positives_missing_from_database": 1,
        "queries_with_missing_positives": 1,
    }


def test_missing_positives_of_unscored_queries_ignored(tmp_path, caplog):
    # other.jpg is not in the query file, so its positive gone.jpg affects no score
    path = tmp_path / "gt.json"
    path.write_text(json.dumps({"q.jpg": ["a.jpg"], "other.jpg": ["gone.jpg"]}))
    matched = match_ground_truth(read_ground_truth(path), ["q.jpg"], ["a.jpg", "b.jpg"])
    assert matched.positives_missing == []
    assert matched.counts()["positives_missing_from_database"] == 0
    assert "not in the database" not in caplog.text


def test_raw_backslash_positive_is_a_missing_positive(tmp_path, caplog):
    # The database stores an ASCII id with a backslash in its escaped form. A raw one in the
    # ground truth cannot be distinguished from an escaped id, so it stays unmatched.
    raw = "db/a\\b.jpg"
    path = tmp_path / "gt.json"
    path.write_text(json.dumps({"q.jpg": [raw, "db/c.jpg"]}))
    matched = match_ground_truth(read_ground_truth(path), ["q.jpg"], [canonical_id(escape_id(raw)), "db/c.jpg"])
    assert matched.positives[0].tolist() == [1]
    assert matched.listed_positives.tolist() == [2]
    assert matched.positives_missing == [raw]
    assert f"1 positive ids are not in the database (e.g. {raw!r}). They count as positives" in caplog.text


def test_ground_truth_warns_query_in_database(tmp_path, caplog):
    path = tmp_path / "gt.json"
    path.write_text(json.dumps({"a.jpg": ["b.jpg"], "c.jpg": ["c.jpg", "d.jpg"], "q.jpg": ["d.jpg"]}))
    database_ids = ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]
    matched = match_ground_truth(read_ground_truth(path), ["a.jpg", "c.jpg", "q.jpg"], database_ids)
    assert matched.positives[0].tolist() == [1]
    # a.jpg ranks itself first as a non-positive; c.jpg lists itself as a positive
    assert "1 scored queries are also database rows and not their own positives (e.g. 'a.jpg')" in caplog.text


def test_ground_truth_rejects_repeated_database_ids(tmp_path):
    path = tmp_path / "gt.json"
    path.write_text(json.dumps({"q.jpg": ["a.jpg"]}))
    with pytest.raises(DataError, match="1 database ids occur more than once"):
        match_ground_truth(read_ground_truth(path), ["q.jpg"], ["a.jpg", "b.jpg", "a.jpg"])
    # evaluate.py checks the database ids first, naming their files, so the second pass is skipped
    matched = match_ground_truth(read_ground_truth(path), ["q.jpg"], ["a.jpg", "b.jpg"], database_ids_checked=True)
    assert matched.positives[0].tolist() == [0]
    with pytest.raises(DataError, match="1 query ids occur more than once"):
        match_ground_truth(read_ground_truth(path), ["q.jpg", "q.jpg"], ["a.jpg"], database_ids_checked=True)
    with pytest.raises(DataError, match="none of the 1 ground-truth queries"):
        match_ground_truth(read_ground_truth(path), ["x.jpg"], ["a.jpg"])


# ---------------------------------------------------------------- signals

@pytest.mark.parametrize("signal_name,expected", [("SIGINT", 130), ("SIGTERM", 143), ("SIGHUP", 129)])
def test_signal_exits_without_traceback(signal_name, expected, tmp_path):
    # the signal arrives while main runs; run() must turn it into the exit status
    code = (
        "import os, signal, sys, time, logging\n"
        "logging.basicConfig(level=logging.INFO)\n"
        "import linear_adaptation.evaluate as evaluate\n"
        f"def interrupted_main(args):\n    os.kill(os.getpid(), signal.{signal_name})\n    time.sleep(5)\n    return 0\n"
        "evaluate.main = interrupted_main\n"
        "sys.exit(evaluate.run(['--features_path', 'x.hdf5', '--info_path', 'x.txt']))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)

    assert result.returncode == expected, result.stderr
    assert "Traceback" not in result.stderr
    assert f"({signal_name})" in result.stderr


def test_signal_handlers_restored_after_run(monkeypatch):
    before = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGHUP)}
    monkeypatch.setattr(evaluate_module, "main", lambda args: 0)
    assert evaluate_module.run(["--features_path", "x.hdf5", "--info_path", "x.txt"]) == 0
    assert signal.getsignal(signal.SIGTERM) is before[signal.SIGTERM]
    assert signal.getsignal(signal.SIGHUP) is before[signal.SIGHUP]


# ---------------------------------------------------------------- argument and output checks


def _labelled_args(labelled_set, *extra):
    return ["--features_path", labelled_set["hdf5"], "--info_path", labelled_set["list"], "--device", "cpu", *extra]


def _exit_status_and_error(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _run(argv)
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--save_json", "--save_ranks"])
@pytest.mark.parametrize("victim", ["list", "hdf5"])
def test_output_naming_input_exit_2(labelled_set, tmp_path, capsys, flag, victim):
    # Regression: --save_json naming the list replaced it with the metrics JSON.
    target = labelled_set[victim]
    if flag == "--save_ranks":
        target = target.rename(target.with_suffix(".json"))
        labelled_set[victim] = target
    before = target.read_bytes()
    code, error = _exit_status_and_error(_labelled_args(labelled_set, flag, target), capsys)
    assert code == 2
    input_flag = "--info_path" if victim == "list" else "--features_path"
    assert f"{flag} would write {str(target)!r}, which is the {input_flag} input" in error
    assert target.read_bytes() == before


@pytest.mark.parametrize("flag", ["--save_json", "--save_ranks"])
def test_output_naming_layer_record_exit_2(labelled_set, tmp_path, capsys, layer_params, flag):
    # Regression: --save_json lay.json beside lay.pth replaced the trainer's record, which the
    # evaluator reads to compare embedding spaces, with the metrics.
    layer = tmp_path / "lay.pth"
    _save_layer(layer, *layer_params)
    record = tmp_path / "lay.json"
    record.write_text('{"embedding_space": {"model": "a"}}\n')
    before = record.read_bytes()

    code, error = _exit_status_and_error(_labelled_args(labelled_set, "--lin_adapt_path", layer, flag, record), capsys)
    assert code == 2
    assert f"{flag} would write {str(record)!r}, the name of the training record" in error
    assert str(tmp_path / "lay_eval.json") in error
    assert record.read_bytes() == before

    # another name beside the layer is fine
    assert _run(_labelled_args(labelled_set, "--lin_adapt_path", layer, flag, tmp_path / "lay_eval.json")) == 0
    assert record.read_bytes() == before


def _column_ends(line):
    """Return the end position of every space-separated token of a table line."""
    ends, inside = [], False
    for i, char in enumerate(line + " "):
        if char == " " and inside:
            ends.append(i)
        inside = char != " "
    return ends


@pytest.mark.parametrize("with_layer", [False, True])
def test_table_columns_for_long_labels(labelled_set, tmp_path, layer_params, capsys, with_layer):
    # Regression: --k 100000 printed the header "queriesmAP@100000".
    extra = ["--k", "100000"]
    if with_layer:
        _save_layer(tmp_path / "lay.pth", *layer_params)
        extra += ["--lin_adapt_path", tmp_path / "lay.pth"]
    assert _run(_labelled_args(labelled_set, *extra)) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line for line in lines if line.startswith(("domain", "macro average", "all queries"))]
    header = lines[lines.index(rows[0]) - 1]

    assert "queries" in header.split()
    assert "mAP@100000" in " ".join(lines[: lines.index(header) + 1]).split()
    # the numbers of every row end where the header's columns end
    assert len(rows) == 4
    for row in rows:
        assert _column_ends(row)[-len(_column_ends(header)):] == _column_ends(header)


def test_k_beyond_int64_exit_2(labelled_set, tmp_path, capsys):
    # Regression: this k crashed after the evaluation, while writing .npz and .hdf5 rank files
    ranks = tmp_path / "ranks.npz"
    code, error = _exit_status_and_error(_labelled_args(labelled_set, "--k", 2**63, "--save_ranks", ranks), capsys)
    assert code == 2
    assert f"--k must be at most {2**63 - 1} (2**63 - 1), got {2**63}" in error
    assert not ranks.exists()
    assert _run(_labelled_args(labelled_set, "--k", 2**63 - 1, "--save_ranks", ranks)) == 0


def test_empty_output_path_exit_2(labelled_set, capsys):
    # Regression: an empty --save_json was reported as the folder '.'.
    code, error = _exit_status_and_error(_labelled_args(labelled_set, "--save_json", ""), capsys)
    assert code == 2
    assert "--save_json is empty; give the path of the file to write" in error


def test_save_json_trailing_slash_exit_2(labelled_set, tmp_path, capsys):
    # Path() drops a trailing slash, so 'out/' was written as a file named 'out'.
    output = f"{tmp_path / 'out'}{os.sep}"
    code, error = _exit_status_and_error(_labelled_args(labelled_set, "--save_json", output), capsys)
    assert code == 2
    assert f"--save_json {output!r} ends with a path separator" in error
    assert not (tmp_path / "out").exists()


def test_output_naming_input_through_link_exit_2(labelled_set, tmp_path, capsys):
    (tmp_path / "link.txt").symlink_to(labelled_set["list"])
    code, error = _exit_status_and_error(_labelled_args(labelled_set, "--save_json", tmp_path / "link.txt"), capsys)
    assert code == 2
    assert "which is the --info_path input" in error


def test_output_naming_layer_or_ground_truth_exit_2(query_database, tmp_path, layer_params, capsys):
    _save_layer(tmp_path / "layer.pth", *layer_params)
    base = ["--query_hdf5", tmp_path / "queries.hdf5", "--db_hdf5", tmp_path / "db_1.hdf5", "--gt_path",
            query_database["gt"], "--lin_adapt_path", tmp_path / "layer.pth"]
    code, error = _exit_status_and_error([*base, "--save_json", query_database["gt"]], capsys)
    assert code == 2
    assert "which is the --gt_path input" in error
    code, error = _exit_status_and_error([*base, "--save_ranks", tmp_path / "db_1.hdf5"], capsys)
    assert code == 2
    assert "which is the --db_hdf5 input" in error


def test_same_json_and_ranks_exit_2(labelled_set, tmp_path, capsys):
    out = tmp_path / "out.json"
    code, error = _exit_status_and_error(_labelled_args(labelled_set, "--save_json", out, "--save_ranks", out), capsys)
    assert code == 2
    assert "--save_json and --save_ranks both name" in error


@pytest.mark.parametrize("flag", ["--features_path", "--info_path", "--lin_adapt_path"])
@pytest.mark.parametrize("kind", ["missing", "folder"])
def test_missing_input_exit_2(labelled_set, tmp_path, capsys, flag, kind):
    # Regression: a missing --info_path ended in a FileNotFoundError traceback, a folder in IsADirectoryError.
    bad = tmp_path / "nope.txt"
    if kind == "folder":
        bad.mkdir()
    argv = _labelled_args(labelled_set)
    if flag in argv:
        argv[argv.index(flag) + 1] = bad
    else:
        argv += [flag, bad]
    code, error = _exit_status_and_error(argv, capsys)
    assert code == 2
    expected = "is a folder; give the path of a file" if kind == "folder" else "does not exist; check the path"
    assert f"{flag} {str(bad)!r} {expected}" in error


def test_missing_list_subprocess_no_traceback(labelled_set, tmp_path):
    result = subprocess.run(
        [sys.executable, REPO / "linear_adaptation" / "evaluate.py", "--features_path", labelled_set["hdf5"],
         "--info_path", tmp_path / "nope.txt"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"--info_path {str(tmp_path / 'nope.txt')!r} does not exist" in result.stderr


def test_database_file_twice_exit_2(query_database, tmp_path, capsys):
    argv = ["--query_hdf5", tmp_path / "queries.hdf5", "--db_hdf5", tmp_path / "db_1.hdf5", tmp_path / "db_1.hdf5",
            "--gt_path", query_database["gt"]]
    code, error = _exit_status_and_error(argv, capsys)
    assert code == 2
    assert "--db_hdf5: database files given more than once" in error


def test_outputs_get_umask_permissions(labelled_set, tmp_path):
    # Regression: the temporary file's 0600 mode was kept by the renamed output.
    previous = os.umask(0o022)
    try:
        assert _run(_labelled_args(labelled_set, "--save_json", tmp_path / "m.json", "--save_ranks",
                                   tmp_path / "r.npz")) == 0
    finally:
        os.umask(previous)
    assert (tmp_path / "m.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "r.npz").stat().st_mode & 0o777 == 0o644


def test_k_above_set_size_searches_no_deeper(labelled_set, tmp_path, monkeypatch, capsys):
    # Regression: --k 100000000 padded every list to k places (112 GiB); the search now stops
    # at the 23 other images, and mAP@k keeps its value.
    depths = []
    original = evaluate_module.knn_search

    def recording_search(*args, k, **kwargs):
        depths.append(k)
        return original(*args, k=k, **kwargs)

    monkeypatch.setattr(evaluate_module, "knn_search", recording_search)
    assert _run(_labelled_args(labelled_set, "--k", 1000, "--save_json", tmp_path / "deep.json",
                               "--save_ranks", tmp_path / "r.npz")) == 0
    assert "mAP@1000" in capsys.readouterr().out
    assert depths == [23]
    with np.load(tmp_path / "r.npz") as ranks:
        assert ranks["rows_without_layer"].shape == (24, 23)
        assert int(ranks["k"]) == 1000
    assert _run(_labelled_args(labelled_set, "--k", 23, "--save_json", tmp_path / "full.json")) == 0

    deep = json.loads((tmp_path / "deep.json").read_text())["metrics"]["without_layer"]
    full = json.loads((tmp_path / "full.json").read_text())["metrics"]["without_layer"]
    assert deep["k"] == 1000
    for name in ("map", "recall@1", "mmp@5"):
        assert deep[name] == pytest.approx(full[name])


def test_k_above_database_size_searches_no_deeper(query_database, tmp_path, monkeypatch):
    depths = []
    original = evaluate_module.knn_search
    monkeypatch.setattr(evaluate_module, "knn_search", lambda *a, k, **kw: depths.append(k) or original(*a, k=k, **kw))
    result = evaluate_query_database(str(tmp_path / "queries.hdf5"), [str(tmp_path / "db_1.hdf5")],
                                     str(query_database["gt"]), k=10**8)
    assert depths == [10]
    assert result.k == 10**8
    assert result.ranks["without_layer"][1].shape == (3, 10)


def test_k_below_5_reports_mmp5_unavailable(labelled_set, tmp_path, capsys):
    # Regression: with --k 1, mMP@5 was recall@1 divided by min(5, positives).
    assert _run(_labelled_args(labelled_set, "--k", 1, "--save_json", tmp_path / "m.json")) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())["metrics"]["without_layer"]
    assert metrics["mmp@5"] is None
    assert metrics["recall@1"] > 0
    assert metrics["all_queries"]["mmp@5"] is None
    macro_row = [line for line in capsys.readouterr().out.splitlines() if line.startswith("macro average")][0]
    assert macro_row.split()[-1] == "n/a"


def test_k_below_5_keeps_mmp5_when_positives_fit(labelled_set, tmp_path):
    # every class has 4 images, so each query has 3 positives and MP@5 looks at the top 3 only
    assert _run(_labelled_args(labelled_set, "--k", 3, "--save_json", tmp_path / "m.json")) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())["metrics"]["without_layer"]
    reference, _ = _labelled_reference(labelled_set["entries"], labelled_set["features"], 3)
    assert metrics["all_queries"]["mmp@5"] == pytest.approx(reference["all"]["mmp@5"])
    help_text = " ".join(get_args_parser().format_help().split())
    assert "below 5, mMP@5 is n/a when a query has more than k positives" in help_text


def test_nan_row_outside_list_is_ignored(labelled_set, tmp_path):
    # Regression: a NaN row stopped the run although the list did not use it.
    with h5py.File(labelled_set["hdf5"], "r") as f:
        features, ids = f["features"][()], [i.decode() for i in f["index"][()]]
    features = np.concatenate([features, np.full((1, DIM), np.nan, dtype=np.float32)])
    _write_hdf5(labelled_set["hdf5"], [*ids, "extra/broken.jpg"], features, escape=False)
    argv = _labelled_args(labelled_set, "--save_json", tmp_path / "m.json")
    assert _run(argv) == 1
    assert _run([*argv, "--allow_missing"]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["counts"]["images"] == 24


def test_nan_rows_in_list_named(labelled_set, caplog):
    with h5py.File(labelled_set["hdf5"], "r") as f:
        features, ids = f["features"][()], [i.decode() for i in f["index"][()]]
    features[[3, 7]] = np.inf
    _write_hdf5(labelled_set["hdf5"], ids, features, escape=False)
    assert _run(_labelled_args(labelled_set)) == 1
    list_order = [escape_id(e[0]) for e in labelled_set["entries"]]
    (first, first_row), (second, second_row) = sorted([(ids[3], 3), (ids[7], 7)], key=lambda p: list_order.index(p[0]))
    assert (f"2 of the 24 embeddings used contain NaN or Inf, ids {first!r} (row {first_row}), "
            f"{second!r} (row {second_row})") in caplog.text


def test_nan_row_advice_for_list(labelled_set, caplog):
    # Regression: the advice was to drop the rows from the list, but a list that names fewer
    # rows than the HDF5 file contains is rejected unless --allow_missing is given too.
    with h5py.File(labelled_set["hdf5"], "r") as f:
        features, ids = f["features"][()], [i.decode() for i in f["index"][()]]
    features[3] = np.nan
    _write_hdf5(labelled_set["hdf5"], ids, features, escape=False)
    assert _run(_labelled_args(labelled_set)) == 1
    assert "drop them from the list and pass --allow_missing" in caplog.text

    remaining_entries = [e for e in labelled_set["entries"] if escape_id(e[0]) != ids[3]]
    labelled_set["list"].write_text("".join(f"{p},{l},{d}\n" for p, l, d in remaining_entries), encoding="utf-8")
    assert _run([*_labelled_args(labelled_set), "--allow_missing"]) == 0


def test_nan_query_advice_for_ground_truth(query_database, tmp_path, caplog):
    # Regression: the advice for a broken query row named a list, which mode 2 does not read.
    queries = query_database["queries"].copy()
    queries[0] = np.nan
    _write_hdf5(tmp_path / "queries.hdf5", query_database["query_ids"], queries)
    argv = ["--query_hdf5", tmp_path / "queries.hdf5", "--db_hdf5", tmp_path / "db_{idx}.hdf5",
            "--gt_path", query_database["gt"], "--k", 6]
    assert _run(argv) == 1
    assert "drop those queries from the ground truth (--gt_path)" in caplog.text
    assert "from the list" not in caplog.text

    ground_truth = json.loads(query_database["gt"].read_text(encoding="utf-8"))
    del ground_truth["q/0.jpg"]
    query_database["gt"].write_text(json.dumps(ground_truth), encoding="utf-8")
    assert _run(argv) == 0


def test_no_class_with_two_images_warns(labelled_set, caplog, capsys):
    entries = labelled_set["entries"]
    labelled_set["list"].write_text("".join(f"{p},{i},{d}\n" for i, (p, _, d) in enumerate(entries)))
    assert _run(_labelled_args(labelled_set)) == 0
    assert "no two images share a (domain, label) class, so no query has a positive" in caplog.text
    assert "n/a" in capsys.readouterr().out


def test_help_text_states_defaults():
    help_text = " ".join(get_args_parser().format_help().split())
    assert "None means" not in help_text
    assert "(default: None)" not in help_text
    assert "(default: 100 in mode 1, 1000 in mode 2)" in help_text
    assert help_text.count("the flag alone means true") == 2


def test_copies_tie_whatever_chunk_rows(tmp_path):
    # Regression: the layer ran on blocks of --chunk_rows rows, and BLAS rounded a copy in a
    # file's short last block differently. Copies of one image stopped tying, so their order
    # changed with --chunk_rows, and so did the metrics when only some copies are positives.
    rng = np.random.default_rng(5)
    dim = 64
    image = rng.standard_normal(dim)
    query = _normalise([image + 0.3 * rng.standard_normal(dim)]).astype(np.float16)
    database = _normalise(rng.standard_normal((23, dim))).astype(np.float16)
    copies = [2, 9, 10, 16, 22]
    database[copies] = _normalise([image]).astype(np.float16)
    database_ids = [f"db/{i}.jpg" for i in range(23)]
    for name, rows in (("a", slice(0, 10)), ("b", slice(10, 11)), ("c", slice(11, 23))):
        _write_hdf5(tmp_path / f"db_{name}.hdf5", database_ids[rows], database[rows])
    _write_hdf5(tmp_path / "q.hdf5", ["q.jpg"], query)
    (tmp_path / "gt.json").write_text(json.dumps({"q.jpg": ["db/10.jpg", "db/22.jpg", "db/5.jpg"]}))
    weight = rng.standard_normal((32, dim)).astype(np.float32)
    _save_layer(tmp_path / "layer.pth", weight, rng.standard_normal(32).astype(np.float32))

    outcomes = []
    for chunk_rows in (1, 3, 4, 64):
        ranks_path, json_path = tmp_path / f"ranks_{chunk_rows}.npz", tmp_path / f"m_{chunk_rows}.json"
        assert _run(["--query_hdf5", tmp_path / "q.hdf5", "--db_hdf5", *(tmp_path / f"db_{n}.hdf5" for n in "abc"),
                     "--gt_path", tmp_path / "gt.json", "--k", 8, "--chunk_rows", chunk_rows, "--device", "cpu",
                     "--lin_adapt_path", tmp_path / "layer.pth", "--save_ranks", ranks_path,
                     "--save_json", json_path, "--hash_inputs", "false"]) == 0
        with np.load(ranks_path) as f:
            rows, scores = f["rows_with_layer"][0], f["scores_with_layer"][0]
        assert rows[:5].tolist() == copies, chunk_rows  # the copies tie and keep row order
        assert len(set(scores[:5].tolist())) == 1
        metrics = json.loads(json_path.read_text())["metrics"]["with_layer"]
        outcomes.append((rows.tolist(), scores.tolist(), metrics["map"], metrics["mmp@5"]))
    assert all(outcome == outcomes[0] for outcome in outcomes)
