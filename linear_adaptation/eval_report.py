"""Outputs of the retrieval evaluation: the metrics table, the metrics JSON and the ranked lists.

Ranked-list files (`--save_ranks`), chosen by extension:
- `.json`: {"k": k, "tie_break": ..., "without_layer": {query_id: {"ids": [...], "scores": [...]}},
  "with_layer": {...}}, with the padding of short lists left out. Readable, but large
  for many queries.
- `.npz` or `.hdf5`/`.h5`: arrays `query_ids` (Q,) and `database_ids` (N,) as ASCII
  bytes, `k` (a file attribute in HDF5), and per variant `rows_<variant>` (Q, n) int64 database rows (-1 pads) and
  `scores_<variant>` (Q, n) float32 (-inf pads). Compressed, for large runs.
`<variant>` is `without_layer` or `with_layer`. Ids are the escaped form of the HDF5 index.

The lists hold n = min(k, database rows) places, or min(k, images - 1) in a labelled set,
because the search returns no more. Every file is written to a temporary name first,
given the permissions a new file gets under the umask, and renamed when complete.

ILIAS similarity file (`--save_similarities`, `.json`): one variant's ranked lists in the
layout that the ILIAS kNN search writes and the ILIAS evaluation reads,
{query_id: {database_id: score, ...}, ...}, with each query's ids in rank order.
"""
import errno
import json
import math
import os
import re
import tempfile
from contextlib import contextmanager

import h5py
import numpy as np

from feature_extraction.image_list import file_sha256
from linear_adaptation.outputs import default_file_mode

VARIANTS = ("without_layer", "with_layer")
_SPACE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
RANK_EXTENSIONS = (".json", ".npz", ".hdf5", ".h5")
TIE_BREAK = "equal scores are ordered by lower database row"

_VARIANT_HEADERS = {"without_layer": "without", "with_layer": "with"}
_VALUE_WIDTH = 9  # the minimum: a label such as mAP@100000 widens the value columns
_TITLE_WIDTH = 14
_COUNT_WIDTH = 8


def _metric_labels(k: int) -> dict[str, str]:
    return {"map": f"mAP@{k}", "recall@1": "recall@1", "mmp@5": "mMP@5"}


def _format_value(value: float, width: int) -> str:
    return f"{'n/a':>{width}}" if math.isnan(value) else f"{value:{width}.2f}"


def format_metrics_table(metrics: dict[str, dict], k: int) -> str:
    """Format metrics (in percent) as a text table with variants side by side.

    `metrics` maps `without_layer` and optionally `with_layer` to the result of
    `labelled_set_metrics` (one row per domain, the macro average over domains, and
    the mean over all queries) or of `positive_set_metrics` (one row).
    """
    variants = [v for v in VARIANTS if v in metrics]
    first = metrics[variants[0]]
    if "per_domain" in first:
        groups = [(f"domain {d}", d) for d in first["per_domain"]] + [("macro average", None), ("all queries", "all")]
    else:
        groups = [("all queries", None)]
    rows = []
    for title, key in groups:
        if key is None:
            summaries = [metrics[v] for v in variants]
        elif key == "all":
            summaries = [metrics[v]["all_queries"] for v in variants]
        else:
            summaries = [metrics[v]["per_domain"][key] for v in variants]
        rows.append((title, summaries))

    # every column keeps at least one space before its text
    labels = _metric_labels(k)
    width = max(_VALUE_WIDTH, -(-(max(map(len, labels.values())) + 1) // len(variants)))
    title_width = max(_TITLE_WIDTH, *(len(title) + 1 for title, _ in rows))
    count_width = max(_COUNT_WIDTH, *(len(str(summaries[0]["num_queries"])) + 1 for _, summaries in rows))
    left = f"{'':<{title_width}}{'queries':>{count_width}}"
    if len(variants) == 1:
        lines = [left + "".join(f"{label:>{width}}" for label in labels.values())]
    else:
        span = width * len(variants)
        sub = "".join(f"{_VARIANT_HEADERS[v]:>{width}}" for v in variants)
        lines = [" " * len(left) + "".join(f"{label:>{span}}" for label in labels.values()), left + sub * len(labels)]

    for title, summaries in rows:
        values = "".join(_format_value(s[name], width) for name in labels for s in summaries)
        lines.append(f"{title:<{title_width}}{summaries[0]['num_queries']:>{count_width}}" + values)
    return "\n".join(lines)


def json_safe(value):
    """Recursively turn NaN and infinite floats into None and numpy scalars into Python ones."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class OutputWriteError(OSError):
    """An output file that cannot be written; the message names the path and the reason."""


def _write_failure_reason(error: BaseException) -> str:
    # HDF5 reports a failed write() inside a long message: keep its errno text when present
    match = re.search(r"error message = '([^']*)'", str(error))
    if match:
        return match.group(1)
    return getattr(error, "strerror", None) or str(error).splitlines()[0]


def _write_failure(path: str, error: BaseException) -> OutputWriteError:
    """Describe a failed write with its reason and the fix for that reason."""
    reason = _write_failure_reason(error)
    out_of_space = getattr(error, "errno", None) in _SPACE_ERRORS or reason in map(os.strerror, _SPACE_ERRORS)
    fix = "free space there or choose another path" if out_of_space else "choose another path"
    return OutputWriteError(f"cannot write {path!r}: {reason}; {fix}")


@contextmanager
def _atomic_path(path: str):
    """Yield a temporary path beside `path` and rename it to `path` only if the block succeeds.

    Raises OutputWriteError naming `path` when the folder, the temporary file or the
    rename fails, for example on a full disk.
    """
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.splitext(path)[1])
    except OSError as e:
        raise _write_failure(path, e) from e
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, default_file_mode())  # mkstemp creates 0600 files
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # h5py raises RuntimeError for some failed writes
        raise _write_failure(path, e) from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: str, payload: dict) -> None:
    """Write `payload` as indented JSON, with NaN written as null."""
    with _atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(json_safe(payload), f, indent=2)
            f.write("\n")


def write_ranks(
    path: str,
    query_ids: list[str],
    database_ids: list[str],
    ranks: dict[str, tuple[np.ndarray, np.ndarray]],
    k: int,
) -> None:
    """Write the ranked lists in the format chosen by the extension of `path` (see the module docstring).

    `ranks` maps each variant to its (scores, rows) arrays of shape (Q, k).
    """
    extension = os.path.splitext(path)[1].lower()
    if extension not in RANK_EXTENSIONS:
        raise ValueError(f"ranked-list file {path!r} must end with one of {RANK_EXTENSIONS}")

    if extension == ".json":
        payload = {"k": k, "tie_break": TIE_BREAK}
        for variant, (scores, rows) in ranks.items():
            payload[variant] = {
                query_id: {
                    "ids": [database_ids[r] for r in row_list if r >= 0],
                    "scores": [float(s) for s, r in zip(score_list, row_list) if r >= 0],
                }
                for query_id, score_list, row_list in zip(query_ids, scores.tolist(), rows.tolist())
            }
        write_json(path, payload)
        return

    # canonical ids are ASCII, so fixed-width bytes hold them without loss
    arrays = {
        "query_ids": np.array(query_ids, dtype=np.bytes_),
        "database_ids": np.array(database_ids, dtype=np.bytes_),
        "k": np.int64(k),
    }
    for variant, (scores, rows) in ranks.items():
        arrays[f"rows_{variant}"] = np.asarray(rows, dtype=np.int64)
        arrays[f"scores_{variant}"] = np.asarray(scores, dtype=np.float32)

    with _atomic_path(path) as tmp:
        if extension == ".npz":
            with open(tmp, "wb") as f:
                np.savez_compressed(f, **arrays)
        else:
            # Without a chunk cache a failed write (full disk) raises at once. With one, the
            # unwritten chunks stayed in HDF5's cache and crashed the process at exit.
            with h5py.File(tmp, "w", rdcc_nbytes=0) as f:
                for name, array in arrays.items():
                    if array.ndim == 0:
                        f.attrs[name] = array
                    else:
                        f.create_dataset(name, data=array, compression="gzip")
                f.attrs["tie_break"] = TIE_BREAK


def write_ilias_similarities(
    path: str, query_ids: list[str], database_ids: list[str], scores: np.ndarray, rows: np.ndarray
) -> None:
    """Write one variant's (Q, n) scores and database rows as an ILIAS similarity JSON (module docstring).

    Each query is written as soon as it is formatted, so memory contains one query's list
    rather than the whole mapping.
    """
    with _atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("{")
            for position, (query_id, query_scores, query_rows) in enumerate(zip(query_ids, scores, rows)):
                # one query at a time, because (Q, n) arrays as Python lists take about 65 bytes a place
                pairs = zip(query_scores.tolist(), query_rows.tolist())
                ranked = {database_ids[r]: score for score, r in pairs if r >= 0}
                separator = ",\n" if position else "\n"
                f.write(f"{separator}{json.dumps(query_id)}: {json.dumps(ranked, allow_nan=False)}")
            f.write("\n}\n")


def describe_inputs(paths: dict[str, list[str]], hash_files: bool) -> dict[str, list[dict]]:
    """Record the size and, with `hash_files`, the SHA-256 of each input file by role."""
    described = {}
    for role, files in paths.items():
        entries = []
        for path in files:
            entry = {"path": os.path.abspath(path), "bytes": os.path.getsize(path)}
            if hash_files:
                entry["sha256"] = file_sha256(path)
            entries.append(entry)
        described[role] = entries
    return described
