"""Evaluate kNN retrieval on embeddings, without and with a linear adaptation layer.

Mode 1, one labelled set: every image queries all the others (itself excluded) and the
positives are the images of the same (domain, label), as in UnED's kNN evaluation.
Metrics are reported per domain and macro-averaged over domains.

    python linear_adaptation/evaluate.py --features_path heldout.hdf5 \\
        --info_path heldout_paths.txt --lin_adapt_path lin_adapt.pth

Mode 2, queries against a database (one or several files, e.g. distractor shards) with
a ground-truth JSON mapping each query id to its positive database ids (format in
linear_adaptation/ground_truth.py):

    python linear_adaptation/evaluate.py --query_hdf5 queries.hdf5 \\
        --db_hdf5 'db/features_{idx}.hdf5' --gt_path gt.json --k 1000

Raw embeddings are L2-normalised and the layer's output is L2-normalised, so both
variants rank by cosine similarity. Search is exact inner product (faiss on CPU, torch
on CUDA), with the database read in blocks of --chunk_rows rows. Equal scores are
ordered by lower database row. The table
is printed to stdout and the log goes to stderr. Exit status: 0 on success, 1 for
unusable input data (nothing is written) or a failed output write, 2 for invalid
arguments (including input files that do not exist and output paths that cannot be
written or would replace an input), 130 after SIGINT, 143 after SIGTERM and 129 after
SIGHUP.
"""
import argparse
import itertools
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from feature_extraction.interrupts import (  # noqa: E402
    EXIT_SIGINT,
    TerminationRequested,
    exit_quietly_on_signals,
    raise_if_signal_lost,
    restore_default_signals,
    termination_raises,
)

if __name__ == "__main__":
    exit_quietly_on_signals()  # until the script's own handling starts, because importing torch takes seconds

import faiss  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from feature_extraction.flags import bool_flag  # noqa: E402
from feature_extraction.image_list import ImageListError, canonical_id, read_image_list  # noqa: E402
from linear_adaptation.arg_checks import (  # noqa: E402
    HelpFormatter,
    check_input_files,
    check_not_an_input,
    check_output_file,
    same_file,
)
from linear_adaptation.eval_report import (  # noqa: E402
    RANK_EXTENSIONS,
    TIE_BREAK,
    describe_inputs,
    format_metrics_table,
    write_ilias_similarities,
    write_json,
    write_ranks,
)
from linear_adaptation.database_subset import make_row_filter, read_selected_ids  # noqa: E402
from linear_adaptation.embedding_space import (  # noqa: E402
    read_embedding_space,
    read_layer_space,
    warn_if_spaces_differ,
)
from linear_adaptation.features_io import (  # noqa: E402
    DataError,
    check_finite_rows,
    join_by_id,
    list_remedy,
    load_hdf5_features,
)
from linear_adaptation.ground_truth import (  # noqa: E402
    MISSING_POSITIVES_CHOICES,
    match_ground_truth,
    read_ground_truth,
)
from linear_adaptation.hdf5_shards import HDF5Database, expand_database_paths  # noqa: E402
from linear_adaptation.knn import DEFAULT_CHUNK_ROWS, iterate_chunks, knn_search  # noqa: E402
from linear_adaptation.lin_adapt import apply_layer, load_lin_adapt_layer  # noqa: E402
from linear_adaptation.outputs import sidecar_paths  # noqa: E402
from linear_adaptation.metrics import (  # noqa: E402
    class_ids,
    labelled_set_metrics,
    positive_set_metrics,
    search_depth,
)

_MAX_K = 2**63 - 1
_logger = logging.getLogger(__name__)

DEFAULT_K_LABELLED_SET = 100
DEFAULT_K_QUERY_DATABASE = 1000
_NORM_TOLERANCE = 1e-2


@dataclass
class EvaluationResult:
    """Metrics and ranked lists of one evaluation, per variant (`without_layer`, `with_layer`)."""

    k: int
    metrics: dict[str, dict]
    ranks: dict[str, tuple[np.ndarray, np.ndarray]]  # variant -> (scores, rows), each (Q, min(k, rows returnable))
    query_ids: list[str]
    database_ids: list[str]
    counts: dict[str, int] = field(default_factory=dict)


def l2_normalise(embeddings: np.ndarray) -> np.ndarray:
    """Return the rows L2-normalised in float32, the same operation the trainer applies to raw embeddings."""
    tensor = torch.from_numpy(np.asarray(embeddings, dtype=np.float32))
    return torch.nn.functional.normalize(tensor, dim=-1).numpy()


def _warn_if_not_normalised(features: np.ndarray, source: str) -> None:
    norms = np.linalg.norm(np.asarray(features, dtype=np.float32), axis=1)
    off = np.abs(norms - 1) > _NORM_TOLERANCE
    if off.any():
        _logger.warning(
            "%s: %d of %d embeddings are not L2-normalised (norms %.3f to %.3f); they are normalised for the search",
            source,
            int(off.sum()),
            len(norms),
            float(norms.min()),
            float(norms.max()),
        )


def _search_depth(k: int, available: int, candidates: str) -> int:
    """Return min(k, available), logging when k is cut, so that no list is padded to k places.

    `candidates` names what a query ranks, for the log line.
    """
    if k > available:
        _logger.info(
            "k = %d exceeds the %d %s, so each query ranks all of them; mAP@%d is the same as for a list padded to k",
            k, available, candidates, k,
        )
    return search_depth(k, available)


def _warn_if_no_positives(labels: np.ndarray, domains: np.ndarray, source: str) -> None:
    if np.bincount(class_ids(labels, domains)).max() < 2:
        _logger.warning(
            "%s: no two images share a (domain, label) class, so no query has a positive and every metric is n/a; "
            "check the labels of the list", source,
        )


def evaluate_labelled_set(
    features_path: str,
    info_path: str,
    k: int = DEFAULT_K_LABELLED_SET,
    device: str = "cpu",
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    lin_adapt_path: str | None = None,
    allow_missing: bool = False,
) -> EvaluationResult:
    """Let every image of a labelled set query all the others, without and with a layer.

    Uses the same `knn_search(exclude_self=True)` and `labelled_set_metrics` calls as
    the trainer's validation, so both report the same figures for the same embeddings.

    Raises:
        DataError: Unusable embeddings, list, or layer file.
        ImageListError: A malformed list.
    """
    features, hdf5_ids = load_hdf5_features(features_path, check_finite=False)
    entries = read_image_list(info_path, require_labels=True)
    joined = join_by_id(hdf5_ids, entries, allow_missing=allow_missing, source=features_path)
    check_finite_rows(features, joined.rows, hdf5_ids, features_path, list_remedy(allow_missing))
    features = features[joined.rows]  # (N, D) in list order, stored dtype
    _warn_if_not_normalised(features, features_path)
    _warn_if_no_positives(joined.labels, joined.domains, features_path)
    search_k = _search_depth(k, len(joined.ids) - 1, "other images of the set")

    adapter = None
    if lin_adapt_path is not None:
        adapter = load_lin_adapt_layer(lin_adapt_path, device=device, expected_in_features=features.shape[1])
        warn_if_layer_space_differs(lin_adapt_path, (f"the embeddings {features_path!r}", read_embedding_space(features_path)))

    variants = {"without_layer": l2_normalise(features)}
    if adapter is not None:
        variants["with_layer"] = apply_layer(adapter, features, batch_rows=chunk_rows)

    metrics, ranks = {}, {}
    for variant, embeddings in variants.items():
        _logger.info("searching %d queries, %s", len(embeddings), variant.replace("_", " "))
        scores, rows = knn_search(
            embeddings,
            iterate_chunks(embeddings, chunk_rows=chunk_rows),
            k=search_k,
            device=device,
            exclude_self=True,
            total_rows=len(embeddings),
        )
        metrics[variant] = labelled_set_metrics(rows, joined.labels, joined.domains, k)
        ranks[variant] = (scores, rows)

    return EvaluationResult(
        k=k,
        metrics=metrics,
        ranks=ranks,
        query_ids=joined.ids,
        database_ids=joined.ids,
        counts={
            "images": len(joined.ids),
            "list_paths_missing_from_hdf5": len(joined.report.missing_in_hdf5),
            "hdf5_ids_missing_from_list": len(joined.report.missing_in_list),
            "duplicate_hdf5_ids": len(joined.report.duplicate_ids),
        },
    )


def evaluate_query_database(
    query_path: str,
    database_paths: list[str],
    gt_path: str,
    k: int = DEFAULT_K_QUERY_DATABASE,
    device: str = "cpu",
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    lin_adapt_path: str | None = None,
    missing_positives: str = "count",
    selected_ids_path: str | None = None,
) -> EvaluationResult:
    """Search a database with the queries that have ground truth, without and with a layer.

    The database files are read in blocks of `chunk_rows` rows, and the layer is applied
    block by block, so memory holds one block, the queries and the (Q, k) results.
    Positive ids that the database lacks count as never retrieved with `missing_positives`
    "count", as in the ILIAS evaluation, and are left out of P with "drop". With
    `selected_ids_path`, the database is the subset described in database_subset.py.

    Raises:
        DataError: Unusable embeddings, ground truth, or layer file.
    """
    query_features, query_ids = load_hdf5_features(query_path, check_finite=False)
    ground_truth = read_ground_truth(gt_path)
    database = _open_database(database_paths, ground_truth, selected_ids_path)
    if database.dim != query_features.shape[1]:
        raise DataError(
            f"queries in {query_path!r} have {query_features.shape[1]} dimensions but the database has "
            f"{database.dim} ({', '.join(repr(path) for path in database.paths)}); embed both with the same backbone"
        )

    query_space = (f"the queries {query_path!r}", read_embedding_space(query_path))
    warn_if_spaces_differ(query_space, [(f"the database file {path!r}", read_embedding_space(path)) for path in database.paths])

    database.check_unique_ids()
    matched = match_ground_truth(ground_truth, query_ids, database.ids, missing_positives, database_ids_checked=True)
    num_positives = matched.listed_positives if missing_positives == "count" else None
    check_finite_rows(query_features, matched.query_rows, query_ids, query_path,
                      "re-extract those images or drop those queries from the ground truth (--gt_path)")
    queries = np.asarray(query_features[matched.query_rows], dtype=np.float32)  # (Q, D)
    search_k = _search_depth(k, database.num_rows, "database rows")
    _warn_if_not_normalised(queries, query_path)

    adapter = None
    if lin_adapt_path is not None:
        adapter = load_lin_adapt_layer(lin_adapt_path, device=device, expected_in_features=database.dim)
        warn_if_layer_space_differs(lin_adapt_path, query_space)

    metrics, ranks = {}, {}
    for variant in ("without_layer", "with_layer") if adapter is not None else ("without_layer",):
        if variant == "with_layer":
            variant_queries = apply_layer(adapter, queries, batch_rows=chunk_rows)
            chunks = database.iterate_chunks(chunk_rows, transform=lambda block: apply_layer(adapter, block))
        else:
            variant_queries = l2_normalise(queries)
            chunks = database.iterate_chunks(chunk_rows, transform=l2_normalise)

        _logger.info(
            "searching %d queries in %d database rows, %s", len(queries), database.num_rows, variant.replace("_", " ")
        )
        scores, rows = knn_search(
            variant_queries, chunks, k=search_k, device=device, exclude_self=False, total_rows=database.num_rows
        )
        metrics[variant] = positive_set_metrics(rows, matched.positives, k, num_positives, scores=scores)
        ranks[variant] = (scores, rows)

    return EvaluationResult(
        k=k,
        metrics=metrics,
        ranks=ranks,
        query_ids=[canonical_id(query_ids[r]) for r in matched.query_rows],
        database_ids=database.ids,
        counts={
            "database_rows": database.num_rows,
            "database_rows_left_out_by_selection": sum(database.stored_rows_per_file) - database.num_rows,
            **matched.counts(),
        },
    )


def warn_if_layer_space_differs(lin_adapt_path: str, embeddings: tuple[str, dict]) -> None:
    """Warn when the trainer's record beside the layer names a training embedding space other than `embeddings`.

    Layers published without that record, such as the ILIAS ones, are not checked.
    """
    record_path = sidecar_paths(lin_adapt_path)[0]
    layer_space = read_layer_space(record_path)
    warn_if_spaces_differ(embeddings, [(f"the layer's training embeddings (recorded in {str(record_path)!r})", layer_space)])


def _open_database(
    database_paths: list[str], ground_truth: dict[str, list[str]], selected_ids_path: str | None
) -> HDF5Database:
    """Open the database files, keeping only the selected rows and the positives when a selection file is given."""
    if selected_ids_path is None:
        return HDF5Database(database_paths)

    selected = read_selected_ids(selected_ids_path)
    positives = {p for listed in ground_truth.values() for p in listed}
    database = HDF5Database(database_paths, keep_id=make_row_filter(selected, positives))
    if database.num_rows == 0:
        raise DataError(
            f"no database row is selected by {selected_ids_path!r} or listed as a positive in the ground truth; "
            "check that the selection file lists database ids or their second path component"
        )
    selected_rows = sum(1 for image_id in database.ids if image_id not in positives)
    if selected_rows == 0:
        _logger.warning(
            "no database row other than the ground-truth positives matches the %d ids of %r, so the search has no "
            "distractors; check that the file lists database ids or their second path component",
            len(selected), selected_ids_path,
        )
    return database


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="kNN retrieval mAP@k, recall@1 and mMP@5 of embeddings, without and with a linear adaptation layer.",
        formatter_class=HelpFormatter,
    )
    labelled = parser.add_argument_group("mode 1: one labelled set, every image queries all the others")
    labelled.add_argument("--features_path", metavar="HDF5", help="embeddings of the labelled set (ILIAS layout)")
    labelled.add_argument("--info_path", metavar="LIST", help="list file with 'path,label,domain' lines")
    labelled.add_argument(
        "--allow_missing",
        type=bool_flag,
        nargs="?",
        const=True,
        metavar="BOOL",
        help="evaluate the ids present in both list and HDF5 instead of failing on a mismatch "
        "(true/false; the flag alone means true)",
    )

    query_db = parser.add_argument_group("mode 2: queries against a database with ground truth")
    query_db.add_argument("--query_hdf5", metavar="HDF5", help="query embeddings (ILIAS layout)")
    query_db.add_argument(
        "--db_hdf5",
        nargs="+",
        metavar="HDF5",
        help="database embeddings: one or more files, globs, or a pattern with {idx} for numbered shards "
        "(quote globs and patterns); rows are numbered across files in this order",
    )
    query_db.add_argument(
        "--gt_path", metavar="JSON", help='ground truth {"query_id": ["db_id", ...], ...}; ids escaped or not'
    )
    query_db.add_argument(
        "--db_selected_ids",
        metavar="FILE",
        help="search only the database rows whose ids this file lists, one per line (or whose second path "
        "component it lists, as the ILIAS search reads its mini-ILIAS list), plus every ground-truth positive "
        "(default: every row)",
    )
    query_db.add_argument(
        "--missing_positives",
        choices=MISSING_POSITIVES_CHOICES,
        metavar="MODE",
        help="positive ids that no database file contains: 'count' scores them as never retrieved, so they lower AP "
        "as in the ILIAS evaluation, and 'drop' leaves them out of their query's positives (default: count)",
    )

    common = parser.add_argument_group("search and outputs")
    common.add_argument(
        "--lin_adapt_path",
        metavar="PTH",
        help="adaptation layer (state dict with layer.weight and layer.bias) applied to queries and database; "
        "metrics are then reported without and with it",
    )
    common.add_argument(
        "--k",
        type=int,
        metavar="N",
        help=f"ranked-list length k of mAP@k (default: {DEFAULT_K_LABELLED_SET} in mode 1, "
        f"{DEFAULT_K_QUERY_DATABASE} in mode 2); below 5, mMP@5 is n/a when a query has more than k positives",
    )
    common.add_argument("--device", choices=("auto", "cpu", "cuda"), metavar="DEVICE", help="auto, cpu or cuda")
    common.add_argument(
        "--chunk_rows", type=int, metavar="ROWS", help="database rows read, adapted and searched per block"
    )
    common.add_argument(
        "--save_json", metavar="PATH", help="write metrics, arguments and input file sizes/hashes (default: not written)"
    )
    common.add_argument(
        "--save_ranks",
        metavar="PATH",
        help="write the top-k ids and scores per query: .json, or compressed .npz/.hdf5 for large runs "
        "(default: not written)",
    )
    common.add_argument(
        "--save_similarities",
        metavar="PATH",
        help="mode 2: write the ranked lists as the ILIAS kNN search does, a .json file "
        "{query_id: {db_id: score, ...}} that the ILIAS evaluation reads. It contains the results with the layer "
        "when --lin_adapt_path is given, and those of the raw embeddings otherwise (default: not written)",
    )
    common.add_argument(
        "--hash_inputs",
        type=bool_flag,
        nargs="?",
        const=True,
        metavar="BOOL",
        help="store the SHA-256 of every input file in --save_json, which reads each file once more "
        "(true/false; the flag alone means true)",
    )

    parser.set_defaults(
        allow_missing=False,
        k=None,
        device="auto",
        chunk_rows=DEFAULT_CHUNK_ROWS,
        hash_inputs=True,
    )
    return parser


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Validate flag combinations and fill the mode-dependent defaults, calling parser.error on misuse."""
    labelled = [args.features_path, args.info_path]
    query_db = [args.query_hdf5, args.db_hdf5, args.gt_path]
    if any(v is not None for v in labelled) and any(v is not None for v in query_db):
        parser.error("give either --features_path/--info_path (mode 1) or --query_hdf5/--db_hdf5/--gt_path (mode 2)")
    if any(v is not None for v in labelled):
        if None in labelled:
            parser.error("mode 1 needs both --features_path and --info_path")
        if args.missing_positives is not None:
            parser.error("--missing_positives applies to mode 2 only: in mode 1 every positive is a row of the set")
        if args.save_similarities is not None:
            parser.error("--save_similarities applies to mode 2 only. Use --save_ranks in mode 1")
        if args.db_selected_ids is not None:
            parser.error("--db_selected_ids applies to mode 2 only. In mode 1, list the images to evaluate in --info_path")
        args.mode = "labelled_set"
    elif any(v is not None for v in query_db):
        if None in query_db:
            parser.error("mode 2 needs --query_hdf5, --db_hdf5 and --gt_path")
        if args.allow_missing:
            parser.error("--allow_missing applies to mode 1 only")
        args.mode = "query_database"
        if args.missing_positives is None:
            args.missing_positives = "count"
    else:
        parser.error("give --features_path and --info_path (mode 1) or --query_hdf5, --db_hdf5 and --gt_path (mode 2)")

    if args.k is None:
        args.k = DEFAULT_K_LABELLED_SET if args.mode == "labelled_set" else DEFAULT_K_QUERY_DATABASE
    if args.k < 1:
        parser.error(f"--k must be at least 1, got {args.k}")
    if args.k > _MAX_K:
        # .npz and .hdf5 rank files record k as a 64-bit integer
        parser.error(f"--k must be at most {_MAX_K} (2**63 - 1), got {args.k}")
    if args.chunk_rows < 1:
        parser.error(f"--chunk_rows must be at least 1, got {args.chunk_rows}")
    if args.save_ranks is not None and os.path.splitext(args.save_ranks)[1].lower() not in RANK_EXTENSIONS:
        parser.error(f"--save_ranks {args.save_ranks!r} must end with one of {', '.join(RANK_EXTENSIONS)}")
    if args.save_similarities is not None and not args.save_similarities.lower().endswith(".json"):
        parser.error(f"--save_similarities {args.save_similarities!r} must end with .json, the ILIAS similarity format")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was requested but torch sees no CUDA device; use --device cpu or auto")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    _check_paths(parser, args)


def _check_paths(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Check the input files and the output paths before any data is read.

    Expands --db_hdf5 into `args.db_files`. Rejects inputs that do not exist, outputs
    that cannot be written, and outputs that are an input file or each other.
    """
    if args.mode == "query_database":
        try:
            args.db_files = expand_database_paths(args.db_hdf5)
        except DataError as e:
            parser.error(f"--db_hdf5: {e}")
    inputs = {f"--{name}": paths for name, paths in _input_files(args).items()}
    check_input_files(parser, inputs)

    named = (("--save_json", args.save_json), ("--save_ranks", args.save_ranks),
             ("--save_similarities", args.save_similarities))
    outputs = {flag: path for flag, path in named if path is not None}
    for flag, path in outputs.items():
        check_output_file(parser, flag, path)
        check_not_an_input(parser, flag, path, inputs)
        check_not_layer_record(parser, flag, path, args.lin_adapt_path)
    for first, second in itertools.combinations(outputs, 2):
        if same_file(outputs[first], outputs[second]):
            parser.error(f"{first} and {second} both name {outputs[first]!r}; give two different files")


def check_not_layer_record(parser: argparse.ArgumentParser, flag: str, path: str, lin_adapt_path: str | None) -> None:
    """Reject an output path that is the training record beside the layer.

    train_lin_adapt.py writes that record as the layer's name with .json, and this script
    reads it to compare embedding spaces, so replacing it with metrics loses both.
    """
    if lin_adapt_path is None:
        return
    record_path = sidecar_paths(lin_adapt_path)[0]
    if same_file(path, record_path):
        parser.error(
            f"{flag} would write {path!r}, the name of the training record that train_lin_adapt.py keeps beside "
            f"the layer --lin_adapt_path {lin_adapt_path!r}; choose another output path, "
            f"such as {str(record_path.with_name(record_path.stem + '_eval.json'))!r}"
        )


def _input_files(args: argparse.Namespace) -> dict[str, list[str]]:
    if args.mode == "labelled_set":
        files = {"features_path": [args.features_path], "info_path": [args.info_path]}
    else:
        files = {"query_hdf5": [args.query_hdf5], "db_hdf5": args.db_files, "gt_path": [args.gt_path]}
        if args.db_selected_ids is not None:
            files["db_selected_ids"] = [args.db_selected_ids]
    if args.lin_adapt_path is not None:
        files["lin_adapt_path"] = [args.lin_adapt_path]
    return files


def main(args: argparse.Namespace) -> int:
    _check_args(get_args_parser(), args)
    _logger.info("config: %s", {key: value for key, value in sorted(vars(args).items())})
    start = time.time()

    try:
        if args.mode == "labelled_set":
            result = evaluate_labelled_set(
                features_path=args.features_path,
                info_path=args.info_path,
                k=args.k,
                device=args.device,
                chunk_rows=args.chunk_rows,
                lin_adapt_path=args.lin_adapt_path,
                allow_missing=args.allow_missing,
            )
        else:
            result = evaluate_query_database(
                query_path=args.query_hdf5,
                database_paths=args.db_files,
                gt_path=args.gt_path,
                k=args.k,
                device=args.device,
                chunk_rows=args.chunk_rows,
                lin_adapt_path=args.lin_adapt_path,
                missing_positives=args.missing_positives,
                selected_ids_path=args.db_selected_ids,
            )
    except (DataError, ImageListError) as e:
        _logger.error("%s", e)
        return 1

    print(format_metrics_table(result.metrics, result.k), flush=True)
    _logger.info("evaluated in %.1f s", time.time() - start)

    return _write_outputs(args, result)


def _write_outputs(args: argparse.Namespace, result: EvaluationResult) -> int:
    """Write each requested output file whether or not another one failed; return the exit status."""
    writers = {}
    if args.save_json is not None:
        writers[args.save_json] = lambda: write_json(
            args.save_json,
            {
                "mode": args.mode,
                "k": result.k,
                "tie_break": TIE_BREAK,
                "metrics": result.metrics,
                "counts": result.counts,
                "args": vars(args),
                "inputs": describe_inputs(_input_files(args), hash_files=args.hash_inputs),
                "versions": {"torch": torch.__version__, "faiss": faiss.__version__, "numpy": np.__version__},
            },
        )
    if args.save_ranks is not None:
        writers[args.save_ranks] = lambda: write_ranks(
            args.save_ranks, result.query_ids, result.database_ids, result.ranks, result.k
        )
    if args.save_similarities is not None:
        # the ILIAS search applies the layer whenever it is given one, so the file stores that variant
        variant = "with_layer" if "with_layer" in result.ranks else "without_layer"
        writers[args.save_similarities] = lambda: write_ilias_similarities(
            args.save_similarities, result.query_ids, result.database_ids, *result.ranks[variant]
        )

    status = 0
    for path, write in writers.items():
        raise_if_signal_lost()
        try:
            write()
        except OSError as e:
            _logger.error("%s (the metrics are printed above)", e)
            status = 1
            continue
        _logger.info("wrote %s", path)
    return status


def run(argv: list[str] | None = None) -> int:
    """Parse the arguments and run main, ending with status 130, 143 or 129 and no traceback on SIGINT, SIGTERM or SIGHUP."""
    args = get_args_parser().parse_args(argv)
    try:
        with termination_raises():
            return main(args)
    except KeyboardInterrupt:
        _logger.error("interrupted (SIGINT); outputs not yet written were skipped, and none is left half-written")
        return EXIT_SIGINT
    except TerminationRequested as e:
        _logger.error("terminated (%s); outputs not yet written were skipped, and none is left half-written", e)
        return e.exit_code


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    restore_default_signals()  # run() turns them into its own messages and exit statuses
    sys.exit(run())
