"""Retrieval metrics over ranked kNN lists: mAP@k, recall@1 and mMP@5.

Definitions, per query with P positives and a ranked list of k ids:
- AP@k = sum over ranks r <= k of precision@r * rel(r), divided by min(k, P). A query
  with no positive in its top k scores 0. When the scores are given (the query/database
  evaluation), a rank whose score equals that of later ranks takes the precision at the
  last of them, as scikit-learn's average_precision_score does in the ILIAS evaluation
  (ilias-vrg/ilias, evaluation/src/dataset.py).
- recall@1 = 1 if the top-ranked id is a positive.
- MP@5 = (positives in the top m) / m with m = min(5, P). It needs the top m ranks, so
  it is NaN for a query with m > k, and the mean MP@5 is then NaN too (reported as
  n/a). This happens only for k < 5.
Queries with P = 0 have no defined score and are left out of every mean; their count
is reported as `queries_without_positives`.

A ranked list may be shorter than k only when the database has no more rows to return
(every image but the query itself in a labelled set). Then every positive is in the list,
and the metrics equal those of a list padded to k, so callers search no deeper than the
database.
"""
import numpy as np

METRIC_NAMES = ("map", "recall@1", "mmp@5")


def search_depth(k: int, available: int) -> int:
    """Return the ranked-list length to search: k cut to the `available` candidates, and at least 1."""
    return max(1, min(k, available))


def _precision_at_end_of_ties(precision: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Give each rank the precision at the last rank with the same score.

    `scores` is (Q, n), descending in each row, so equal scores are neighbours.
    """
    num_ranks = scores.shape[1]
    last_of_tie = np.ones(scores.shape, dtype=bool)
    last_of_tie[:, :-1] = scores[:, :-1] != scores[:, 1:]
    end = np.where(last_of_tie, np.arange(num_ranks), num_ranks - 1)
    end = np.minimum.accumulate(end[:, ::-1], axis=1)[:, ::-1]  # (Q, n) last rank of each tie
    return np.take_along_axis(precision, end, axis=1)


def per_query_metrics(
    relevant: np.ndarray, num_positives: np.ndarray, k: int | None = None, scores: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Compute AP@k, recall@1 and MP@5 for each query.

    `relevant` is (Q, n) bool, True where the id at that rank is a positive, for the top
    n <= k ranks; `num_positives` is (Q,) int, the positives of each query in the whole
    database. `k` defaults to n. MP@5 is NaN where min(5, positives) > k. With `scores`
    (Q, n), descending in each row, AP treats equal scores as one threshold (module docstring).
    """
    relevant = np.asarray(relevant, dtype=bool)
    num_positives = np.asarray(num_positives, dtype=np.int64)
    num_queries, n = relevant.shape
    # Positives are counted in int64, so a larger k (which cuts nothing) would overflow np.minimum.
    k = n if k is None else min(k, np.iinfo(np.int64).max)
    if n > k:
        raise ValueError(f"relevant has {n} ranks, more than k = {k}")
    if num_positives.shape != (num_queries,):
        raise ValueError(f"num_positives has shape {num_positives.shape}, expected ({num_queries},)")

    hits = np.cumsum(relevant, axis=1)  # (Q, n) positives up to each rank
    ranks = np.arange(1, n + 1)
    precision = hits / ranks
    if scores is not None:
        precision = _precision_at_end_of_ties(precision, np.asarray(scores))
    precision_sum = (relevant * precision).sum(axis=1)  # (Q,)
    ap = precision_sum / np.maximum(np.minimum(num_positives, k), 1)

    recall_at_1 = relevant[:, 0].astype(np.float64) if n > 0 else np.zeros(num_queries)

    m = np.clip(np.minimum(num_positives, 5), 1, 5)  # (Q,) ranks that MP@5 looks at
    hits_at_m = hits[np.arange(num_queries), np.minimum(m, n) - 1] if n > 0 else np.zeros(num_queries)
    mp5 = np.where(m > k, np.nan, hits_at_m / m)  # ranks beyond k were never searched

    return {"map": ap, "recall@1": recall_at_1, "mmp@5": mp5}


def summarise(per_query: dict[str, np.ndarray], num_positives: np.ndarray) -> dict:
    """Average per-query metrics (in percent) over the queries that have positives."""
    valid = np.asarray(num_positives) > 0
    summary = {
        name: float(per_query[name][valid].mean() * 100) if valid.any() else float("nan")
        for name in METRIC_NAMES
    }
    summary["num_queries"] = int(valid.sum())
    summary["queries_without_positives"] = int((~valid).sum())
    return summary


def class_ids(labels: np.ndarray, domains: np.ndarray) -> np.ndarray:
    """Number each distinct (domain, label) pair, since labels restart in every domain."""
    pairs = np.stack([np.asarray(domains, np.int64), np.asarray(labels, np.int64)], axis=1)
    _, inverse = np.unique(pairs, axis=0, return_inverse=True)
    return inverse.reshape(-1)


def _ranks_at_k(ranked_indices: np.ndarray, k: int, num_queries: int) -> np.ndarray:
    """Cut ranked lists to at most k columns; narrower lists stay as they are (see the module docstring)."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    ranked_indices = np.asarray(ranked_indices, dtype=np.int64)
    if ranked_indices.ndim != 2 or ranked_indices.shape[0] != num_queries:
        raise ValueError(f"ranked_indices has shape {ranked_indices.shape}, expected ({num_queries}, k)")
    return ranked_indices[:, :k]


def labelled_set_metrics(
    ranked_indices: np.ndarray, labels: np.ndarray, domains: np.ndarray, k: int
) -> dict:
    """Score a labelled set where every image queried all the others.

    `ranked_indices` (Q=N, n) contains database rows of the same set, self excluded,
    with -1 where fewer than n results exist; n may be below k (see the module docstring).
    Positives share (domain, label). Returns the macro average over the domains that
    have queries with positives at the top level, the per-domain summaries under
    `per_domain`, and the mean over all queries (micro average) under `all_queries`.
    """
    classes = class_ids(labels, domains)
    class_sizes = np.bincount(classes)
    num_positives = class_sizes[classes] - 1  # (N,) the query itself is not a positive

    ranked_indices = _ranks_at_k(ranked_indices, k, len(classes))
    found = ranked_indices >= 0
    relevant = found & (classes[np.where(found, ranked_indices, 0)] == classes[:, None])
    per_query = per_query_metrics(relevant, num_positives, k)

    domains = np.asarray(domains)
    per_domain = {}
    for domain in np.unique(domains):
        mask = domains == domain
        per_domain[int(domain)] = summarise({n: v[mask] for n, v in per_query.items()}, num_positives[mask])

    # A domain whose queries all lack positives stays out of the macro average. A domain with
    # queries and an n/a metric (mMP@5 with k < 5) makes that macro average n/a.
    scored_domains = [d for d in per_domain.values() if d["num_queries"] > 0]
    result = {}
    for name in METRIC_NAMES:
        values = [d[name] for d in scored_domains]
        result[name] = float(np.mean(values)) if values else float("nan")
    result.update(
        k=k,
        num_queries=int(sum(d["num_queries"] for d in per_domain.values())),
        queries_without_positives=int((num_positives == 0).sum()),
        per_domain=per_domain,
        all_queries=summarise(per_query, num_positives),
    )
    return result


def positive_set_metrics(
    ranked_indices: np.ndarray,
    positives: list[np.ndarray],
    k: int,
    num_positives: np.ndarray | None = None,
    scores: np.ndarray | None = None,
) -> dict:
    """Score queries against a database whose positives are listed per query.

    `ranked_indices` (Q, n) contains database rows, padded with -1, with n <= k. `positives[q]`
    contains the distinct database rows that are positives of query q. `num_positives` (Q,)
    is each query's P when it has positives that the database lacks, which then count as never
    retrieved; it defaults to len(positives[q]). `scores` (Q, n), the search scores of the
    ranked rows, makes AP treat equal scores as the ILIAS evaluation does (module docstring).
    Returns the summary of `summarise` plus `k`.
    """
    ranked_indices = _ranks_at_k(ranked_indices, k, len(positives))
    if scores is not None:
        scores = np.asarray(scores)[:, :k]
        if scores.shape != ranked_indices.shape:
            raise ValueError(f"scores has shape {scores.shape}, expected {ranked_indices.shape} like ranked_indices")
    present = np.array([len(p) for p in positives], dtype=np.int64)
    if num_positives is None:
        num_positives = present
    else:
        num_positives = np.asarray(num_positives, dtype=np.int64)
        if num_positives.shape != present.shape or (num_positives < present).any():
            raise ValueError(
                f"num_positives must give each of the {len(present)} queries at least its positives in the database"
            )

    # (query, row) pairs packed into one int64 each, so that membership is one np.isin
    width = int(max(ranked_indices.max(initial=-1), max((int(p.max()) for p in positives if len(p)), default=-1))) + 2
    query_column = np.arange(len(positives), dtype=np.int64)[:, None]  # (Q, 1)
    ranked_keys = query_column * width + ranked_indices + 1  # (Q, k); a -1 pad maps to the unused key q * width
    positive_keys = np.concatenate(
        [q * width + np.asarray(p, dtype=np.int64) + 1 for q, p in enumerate(positives)] + [np.zeros(0, np.int64)]
    )
    relevant = (ranked_indices >= 0) & np.isin(ranked_keys, positive_keys)

    result = summarise(per_query_metrics(relevant, num_positives, k, scores), num_positives)
    result["k"] = k
    return result
