"""Search and metrics against a brute-force reference written with plain loops, on random cases.

The cases have many equal scores (small integer embeddings, exact copies), queries without
positives, k above and below the number of positives and above the database size, and one
to three domains. The reference ranks with Python's sort on (-score, row) and scores each
query by the definitions in README.md (ILIAS mAP@k, UnED mMP@5 and recall@1).
"""
import math

import numpy as np
import pytest

from linear_adaptation.knn import iterate_chunks, knn_search
from linear_adaptation.metrics import labelled_set_metrics, positive_set_metrics

NAMES = ("map", "recall@1", "mmp@5")


def _ranked(query, database, k, skip=None):
    """Database rows by inner product descending, then row ascending, at most k, without row `skip`."""
    scored = []
    for row in range(len(database)):
        if row != skip:
            score = sum(float(a) * float(b) for a, b in zip(query, database[row]))  # exact for small integers
            scored.append((-score, row))
    scored.sort()
    return [row for _, row in scored[:k]]


def _query_scores(ranked, positives, k):
    """(AP@k, recall@1, MP@5) of one query, or None when it has no positive."""
    if not positives:
        return None
    hits, precision_sum = 0, 0.0
    for rank, row in enumerate(ranked[:k], start=1):
        if row in positives:
            hits += 1
            precision_sum += hits / rank
    ap = precision_sum / min(k, len(positives))
    recall_at_1 = 1.0 if ranked and ranked[0] in positives else 0.0
    m = min(5, len(positives))
    mp5 = math.nan if m > k else sum(1 for row in ranked[:m] if row in positives) / m
    return ap, recall_at_1, mp5


def _mean_percent(values):
    return 100 * sum(values) / len(values) if values else math.nan


def _close(a, b):
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-9)


def _random_embeddings(rng, rows, dim):
    embeddings = rng.integers(-2, 3, (rows, dim)).astype(np.float32)
    copies = rng.integers(0, rows, rows // 4)
    embeddings[rng.integers(0, rows, rows // 4)] = embeddings[copies]  # exact duplicates
    return embeddings


@pytest.mark.parametrize("seed", range(4))
def test_labelled_set_matches_reference(seed):
    rng = np.random.default_rng(seed)
    for _ in range(40):
        num_images, dim = int(rng.integers(1, 30)), int(rng.integers(1, 5))
        domains = rng.integers(0, int(rng.integers(1, 4)), num_images)
        labels = rng.integers(0, int(rng.integers(1, 6)), num_images)
        embeddings = _random_embeddings(rng, num_images, dim)
        k = int(rng.choice([1, 2, 4, 5, 6, 10, 100]))

        depth = max(1, min(k, num_images - 1))  # what evaluate.py searches
        _, rows = knn_search(
            embeddings, iterate_chunks(embeddings, int(rng.integers(1, num_images + 1))), k=depth, exclude_self=True
        )
        result = labelled_set_metrics(rows, labels, domains, k)

        per_domain, every_query = {}, []
        for q in range(num_images):
            ranked = _ranked(embeddings[q], embeddings, k, skip=q)
            assert [r for r in rows[q].tolist() if r >= 0] == ranked[:depth]
            positives = {
                r for r in range(num_images) if r != q and (labels[r], domains[r]) == (labels[q], domains[q])
            }
            scores = _query_scores(ranked, positives, k)
            if scores is not None:
                per_domain.setdefault(int(domains[q]), []).append(scores)
                every_query.append(scores)

        for i, name in enumerate(NAMES):
            domain_means = {d: _mean_percent([s[i] for s in v]) for d, v in per_domain.items()}
            for d, value in domain_means.items():
                assert _close(result["per_domain"][d][name], value)
            macro = sum(domain_means.values()) / len(domain_means) if domain_means else math.nan
            assert _close(result[name], macro), (name, result[name], macro)
            assert _close(result["all_queries"][name], _mean_percent([s[i] for s in every_query]))
        assert result["num_queries"] == len(every_query)
        assert result["queries_without_positives"] == num_images - len(every_query)


@pytest.mark.parametrize("seed", range(4))
def test_positive_sets_match_reference(seed):
    rng = np.random.default_rng(100 + seed)
    for _ in range(40):
        num_rows, dim = int(rng.integers(1, 40)), int(rng.integers(1, 5))
        database = _random_embeddings(rng, num_rows, dim)
        queries = rng.integers(-2, 3, (int(rng.integers(1, 8)), dim)).astype(np.float32)
        positives = [
            np.unique(rng.integers(0, num_rows, int(rng.integers(0, num_rows + 1)))) for _ in range(len(queries))
        ]
        # positives that the database lacks, as rows past its end that no search returns
        absent = [int(n) for n in rng.integers(0, 3, len(queries))]
        k = int(rng.choice([1, 2, 4, 5, 6, 10, 100]))

        depth = min(k, num_rows)
        _, rows = knn_search(queries, iterate_chunks(database, int(rng.integers(1, num_rows + 1))), k=depth)
        results = {
            "drop": positive_set_metrics(rows, positives, k),
            "count": positive_set_metrics(rows, positives, k, np.array([len(p) for p in positives]) + absent),
        }

        scored = {"drop": [], "count": []}
        for q, query in enumerate(queries):
            ranked = _ranked(query, database, k)
            assert rows[q].tolist() == ranked[:depth]
            present = set(positives[q].tolist())
            listed = present | {num_rows + i for i in range(absent[q])}
            for mode, positive_set in (("drop", present), ("count", listed)):
                scores = _query_scores(ranked, positive_set, k)
                if scores is not None:
                    scored[mode].append(scores)
        for mode, result in results.items():
            for i, name in enumerate(NAMES):
                assert _close(result[name], _mean_percent([s[i] for s in scored[mode]])), (mode, name)
            assert result["num_queries"] == len(scored[mode])
            assert result["queries_without_positives"] == len(queries) - len(scored[mode])


def test_reference_hand_example():
    # the reference itself, on the README definitions: positives at ranks 2 and 4 of 6, k = 4
    ap, recall_at_1, mp5 = _query_scores([9, 3, 8, 5, 7, 1], {3, 5, 6}, k=4)
    assert ap == pytest.approx((1 / 2 + 2 / 4) / 3)
    assert recall_at_1 == 0.0
    assert mp5 == pytest.approx(1 / 3)  # ranks 1 to 3 hold one of the positives
    assert math.isnan(_query_scores([3], {3, 5}, k=1)[2])
