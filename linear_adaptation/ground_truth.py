"""Ground truth of a query/database evaluation: the positive database ids of each query.

File format (JSON), one object mapping each query id to the list of its positive
database ids:

    {"queries/q1.jpg": ["db/a.jpg", "db/b.jpg"], "queries/q2.jpg": []}

Ids are those of the HDF5 `index` datasets, either escaped (`#Uxxxx`, as stored) or
with the original Unicode characters; both forms are matched after `canonical_id`.
A query with an empty list has no positive and is counted, not scored. The file is
UTF-8, with or without a byte-order mark.
"""
import json
import logging
import os
from dataclasses import dataclass, field

import numpy as np

from feature_extraction.image_list import canonical_id
from linear_adaptation.features_io import DataError

_logger = logging.getLogger(__name__)

_MAX_EXAMPLES = 5

# how a positive id that no database file contains is scored (see match_ground_truth)
MISSING_POSITIVES_CHOICES = ("count", "drop")


def _examples(values: list[str]) -> str:
    return ", ".join(repr(v) for v in values[:_MAX_EXAMPLES])


def find_duplicates(ids: list[str]) -> list[str]:
    """Return the ids that occur more than once, each once, in order of first repeat."""
    seen, repeated = set(), {}
    for image_id in ids:
        if image_id in seen:
            repeated[image_id] = None
        seen.add(image_id)
    return list(repeated)


def _object_rejecting_repeated_keys(path: str):
    """Return a json `object_pairs_hook` that raises DataError on a key repeated in one object.

    json.load keeps only the last value of a repeated key, which would drop a query's
    positives without a trace.
    """

    def build(pairs: list[tuple[str, object]]) -> dict:
        mapping = {}
        for key, value in pairs:
            if key in mapping:
                raise DataError(f"{path!r}: key {key!r} occurs twice in one JSON object; keep one entry per query")
            mapping[key] = value
        return mapping

    return build


def read_ground_truth(path: str | os.PathLike) -> dict[str, list[str]]:
    """Read a ground-truth JSON file into canonical query id -> distinct canonical positive ids.

    Raises:
        DataError: The file is missing or not valid JSON, is not an object of string
            lists, or names one query twice (repeated, or once escaped and once not).
    """
    path = str(path)
    if not os.path.isfile(path):
        raise DataError(f"ground-truth file {path!r} not found; check --gt_path")
    try:
        # utf-8-sig also reads the byte-order mark that some Windows editors write, which json.load rejects
        with open(path, encoding="utf-8-sig") as f:
            raw = json.load(f, object_pairs_hook=_object_rejecting_repeated_keys(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path!r} is not valid UTF-8 JSON ({e}); see the format in ground_truth.py") from e

    if not isinstance(raw, dict):
        raise DataError(
            f"{path!r} contains a JSON {type(raw).__name__}, expected an object mapping each query id "
            'to a list of positive database ids, e.g. {"q.jpg": ["a.jpg", "b.jpg"]}'
        )

    ground_truth: dict[str, list[str]] = {}
    for query_id, positives in raw.items():
        if not isinstance(positives, list) or not all(isinstance(p, str) for p in positives):
            raise DataError(
                f"{path!r}: the value of query {query_id!r} is {positives!r}, expected a list of database id strings"
            )
        key = canonical_id(query_id)
        if key in ground_truth:
            raise DataError(
                f"{path!r}: query {query_id!r} occurs twice (once escaped, once not); keep one entry per query"
            )
        # dict.fromkeys drops repeated positives, which would otherwise count twice in AP
        ground_truth[key] = list(dict.fromkeys(canonical_id(p) for p in positives))

    if not ground_truth:
        raise DataError(f"{path!r} lists no queries")
    return ground_truth


@dataclass
class MatchedGroundTruth:
    """Ground truth restated as rows of the query and database embedding files."""

    query_rows: np.ndarray  # (Q,) int64 rows of the query file that have ground truth, in file order
    positives: list[np.ndarray]  # per kept query, the int64 database rows of its positives
    listed_positives: np.ndarray  # (Q,) int64 distinct positive ids of each kept query, in the database or not
    queries_without_ground_truth: list[str] = field(default_factory=list)  # query-file ids absent from the file
    ground_truth_queries_missing: list[str] = field(default_factory=list)  # ground-truth queries not in the query file
    positives_missing: list[str] = field(default_factory=list)  # distinct positive ids of kept queries that the database lacks

    def counts(self) -> dict[str, int]:
        return {
            "queries_scored": int(len(self.query_rows)),
            "queries_without_ground_truth": len(self.queries_without_ground_truth),
            "ground_truth_queries_missing": len(self.ground_truth_queries_missing),
            "positives_missing_from_database": len(self.positives_missing),
            "queries_with_missing_positives": int((self.listed_positives > [len(p) for p in self.positives]).sum()),
        }


def _warn_about_queries_in_database(
    ground_truth: dict[str, list[str]], scored_queries: list[str], database_ids: list[str]
) -> None:
    """Warn about scored queries that are database rows but not their own positives.

    The search does not skip such a row. When the query and database embeddings of the image match,
    it ranks at or near the top and counts as a miss.
    """
    scored = set(scored_queries)
    in_database = {image_id for image_id in database_ids if image_id in scored}
    ranked_against_themselves = [q for q in scored_queries if q in in_database and q not in ground_truth[q]]
    if ranked_against_themselves:
        _logger.warning(
            "%d scored queries are also database rows and not their own positives (e.g. %s), so each can rank "
            "itself at or near the top as a miss; remove the queries from the database, or list each as its own positive",
            len(ranked_against_themselves),
            _examples(ranked_against_themselves),
        )


def match_ground_truth(
    ground_truth: dict[str, list[str]],
    query_ids: list[str],
    database_ids: list[str],
    missing_positives: str = "count",
    database_ids_checked: bool = False,
) -> MatchedGroundTruth:
    """Map ground-truth ids to query and database rows, logging what does not match.

    `database_ids` must already be canonical (see `canonical_id`); query ids are
    canonicalised here.

    Query-file ids without ground truth are skipped. Positive ids absent from the
    database are logged as a warning, since they usually mean a missing database shard
    or images that failed to extract. `missing_positives` only picks the warning's
    wording: the caller scores them as never retrieved ("count", as the ILIAS evaluation
    does) or leaves them out of P ("drop") with `listed_positives`. With
    `database_ids_checked`, the caller has already rejected repeated database ids, and the
    pass over them, about 4 s per 10 million ids, is skipped.

    Raises:
        DataError: Query or database ids repeat, or no query of the ground truth is in the query file.
    """
    if missing_positives not in MISSING_POSITIVES_CHOICES:
        raise ValueError(f"missing_positives must be one of {MISSING_POSITIVES_CHOICES}, got {missing_positives!r}")
    query_ids = [canonical_id(i) for i in query_ids]
    to_check = [("query", query_ids)] + ([] if database_ids_checked else [("database", database_ids)])
    for name, ids in to_check:
        repeated = find_duplicates(ids)
        if repeated:
            raise DataError(
                f"{len(repeated)} {name} ids occur more than once (e.g. {_examples(repeated)}); "
                "a repeated id makes its positives ambiguous, so remove the repeated rows or files"
            )

    query_set = set(query_ids)
    missing_queries = [q for q in ground_truth if q not in query_set]
    kept = [(row, q) for row, q in enumerate(query_ids) if q in ground_truth]
    skipped = [q for q in query_ids if q not in ground_truth]
    if not kept:
        raise DataError(
            f"none of the {len(ground_truth)} ground-truth queries is in the query file "
            f"(e.g. {_examples(list(ground_truth))}); are the query file and --gt_path for the same set?"
        )

    # map only the database ids that a scored query needs, since the database may contain millions. Positives of
    # ground-truth queries missing from the query file affect no score, so they are not reported as missing either.
    scored_positives = {p for _, q in kept for p in ground_truth[q]}
    row_of = {image_id: row for row, image_id in enumerate(database_ids) if image_id in scored_positives}
    absent_positives = sorted(scored_positives - row_of.keys())
    _warn_about_queries_in_database(ground_truth, [q for _, q in kept], database_ids)

    positives = [
        np.array([row_of[p] for p in ground_truth[q] if p in row_of], dtype=np.int64) for _, q in kept
    ]
    matched = MatchedGroundTruth(
        query_rows=np.array([row for row, _ in kept], dtype=np.int64),
        positives=positives,
        listed_positives=np.array([len(ground_truth[q]) for _, q in kept], dtype=np.int64),
        queries_without_ground_truth=skipped,
        ground_truth_queries_missing=missing_queries,
        positives_missing=absent_positives,
    )

    if skipped:
        _logger.warning(
            "%d query-file ids have no ground truth and are skipped (e.g. %s)", len(skipped), _examples(skipped)
        )
    if missing_queries:
        _logger.warning(
            "%d ground-truth queries are not in the query file (e.g. %s)", len(missing_queries), _examples(missing_queries)
        )
    if absent_positives:
        effect = (
            "They count as positives that were never retrieved, which lowers AP as in the ILIAS evaluation, "
            "unless --missing_positives drop is given"
            if missing_positives == "count"
            else "They are left out of their queries' positives, and --missing_positives count scores them as misses"
        )
        _logger.warning(
            "%d positive ids are not in the database (e.g. %s). %s. Check that every database shard was given "
            "and whether these images failed to extract",
            len(absent_positives),
            _examples(absent_positives),
            effect,
        )
    return matched
