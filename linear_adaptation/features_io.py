"""Reading HDF5 embedding files and joining their rows to list labels by id.

The HDF5 layout is that of the ILIAS tools: dataset `features` (N x D) and dataset
`index` (N ASCII ids, the list paths escaped with `#Uxxxx`).
"""
import logging
import os
from collections import Counter
from dataclasses import dataclass, field

import h5py
import numpy as np

from feature_extraction.image_list import ListEntry, canonical_id, escape_id

_logger = logging.getLogger(__name__)

_FINITE_CHECK_ROWS = 65536
_MAX_EXAMPLES = 5


class DataError(ValueError):
    """Input embeddings or lists that cannot be used: the message names the value and the fix."""


_LAYOUT_HINT = "expected the ILIAS layout written by feature_extraction/extract.py"


def check_hdf5_layout(f: h5py.File, path: str) -> tuple[h5py.Dataset, h5py.Dataset]:
    """Return the `features` and `index` datasets of an open file after checking their layout.

    Raises DataError for a missing dataset, a group in place of one, `features` that is
    not a non-empty N x D floating-point matrix, or an `index` of another length.
    """
    for name in ("features", "index"):
        if name not in f:
            raise DataError(f"{path!r} has no '{name}' dataset (found: {sorted(f.keys())}); {_LAYOUT_HINT}")
        if not isinstance(f[name], h5py.Dataset):
            raise DataError(f"{path!r}: '{name}' is not a dataset but a {type(f[name]).__name__}; {_LAYOUT_HINT}")
    features, index = f["features"], f["index"]

    if features.ndim != 2:
        raise DataError(f"{path!r}: 'features' has shape {features.shape}, expected N x D; {_LAYOUT_HINT}")
    if features.shape[0] == 0:
        raise DataError(f"{path!r}: 'features' has zero rows; extract the embeddings again, or check the image list")
    if features.shape[1] == 0:
        raise DataError(f"{path!r}: 'features' has zero columns (shape {features.shape}); extract the embeddings again")
    if not np.issubdtype(features.dtype, np.floating):
        raise DataError(f"{path!r}: 'features' has dtype {features.dtype}, expected float16/32/64")
    if index.ndim != 1:
        raise DataError(f"{path!r}: 'index' has shape {index.shape}, expected one id per row; {_LAYOUT_HINT}")
    if index.shape[0] != features.shape[0]:
        raise DataError(f"{path!r}: 'features' has {features.shape[0]} rows but 'index' has {index.shape[0]} ids")
    return features, index


def check_filters_available(datasets: tuple[h5py.Dataset, ...], path: str) -> None:
    """Raise DataError naming the HDF5 filters of `datasets` that this h5py cannot decode.

    Called after a failed read, because a missing optional filter does not stop reading
    chunks that were stored without it. HDF5 reports a missing filter only as a failed
    plugin search, which reads like a damaged file.
    """
    missing = []
    for dataset in datasets:
        plist = dataset.id.get_create_plist()
        for i in range(plist.get_nfilters()):
            code, _flags, _values, name = plist.get_filter(i)
            if not h5py.h5z.filter_avail(code):
                filter_name = name.decode(errors="replace") or "unnamed"
                missing.append(f"'{dataset.name.lstrip('/')}': {filter_name} (id {code})")
    if missing:
        raise DataError(
            f"cannot read {path!r}: it is compressed with an HDF5 filter that this h5py cannot decode "
            f"({', '.join(missing)}); set HDF5_PLUGIN_PATH to a folder with that filter's plugin, "
            "or rewrite the file without filters (h5repack -f NONE IN OUT)"
        )


def decode_ids(index: h5py.Dataset, path: str) -> list[str]:
    """Read an `index` dataset of the file `path` as text ids, whether stored as bytes or str.

    Raises DataError naming the row of an id that is not UTF-8, and lets h5py's errors
    of a damaged file pass.
    """
    ids = []
    for row, value in enumerate(index[()]):
        if not isinstance(value, bytes):
            ids.append(str(value))
            continue
        try:
            ids.append(value.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise DataError(
                f"id {row} of {path!r} is not UTF-8 text ({value[:80]!r}: {e.reason} at byte {e.start}); ids must "
                "be stored as UTF-8, as extract.py writes them: write the file again with its ids encoded as UTF-8"
            ) from e
    return ids


def _looks_like_text(path: str) -> bool:
    """Return True when the file's first 4 KiB decode as UTF-8 and contain no NUL byte, as a list does."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    if not head or b"\0" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        # the 4 KiB may end inside a multi-byte character
        return e.start >= len(head) - 3
    return True


def open_error(path: str, error: OSError) -> DataError:
    """Return the DataError for a file that h5py cannot open, naming a text file (a list passed by mistake) as such."""
    # the list and embedding flags sit side by side, so swapping them is an easy mistake
    if _looks_like_text(path):
        return DataError(
            f"{path!r} is a text file, not an HDF5 embedding file; pass the HDF5 file written by "
            "feature_extraction/extract.py here, not a list"
        )
    return DataError(f"cannot open {path!r} as HDF5 ({error}); was it written completely?")


def load_hdf5_features(path: str | os.PathLike, check_finite: bool = True) -> tuple[np.ndarray, list[str]]:
    """Load `features` in their stored dtype, in native byte order, and the decoded `index` ids.

    Raises DataError for a missing or damaged file, a bad layout (see
    check_hdf5_layout), or, with `check_finite`, rows with NaN or Inf values. Callers
    that use only some rows pass False and call `check_finite_rows` on those rows.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise DataError(f"embedding file {path!r} not found; check the path")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise open_error(path, e) from e

    with f:
        features_dataset, index = check_hdf5_layout(f, path)
        try:
            features = features_dataset[()]
            ids = decode_ids(index, path)
        except DataError:
            raise
        except (OSError, ValueError) as e:
            # a damaged chunk fails only when it is read (h5py raises OSError)
            check_filters_available((features_dataset, index), path)
            raise DataError(f"cannot read {path!r} ({e}); the file is damaged, copy or extract it again") from e

    if not features.dtype.isnative:
        # torch.from_numpy rejects big-endian arrays, which HDF5 files may store
        features = features.astype(features.dtype.newbyteorder("="))

    if check_finite:
        check_finite_rows(features, np.arange(features.shape[0]), ids, path)

    _logger.info("loaded %s: %d x %d %s", path, features.shape[0], features.shape[1], features.dtype)
    return features, ids


def list_remedy(allow_missing: bool) -> str:
    """Return the fix that the NaN or Inf message names for rows read through a list.

    Without --allow_missing the list must name every HDF5 row, so dropping the rows from
    the list alone would fail on the next run.
    """
    if allow_missing:
        return "re-extract those images or drop them from the list"
    return "re-extract those images, or drop them from the list and pass --allow_missing"


def check_finite_rows(
    features: np.ndarray, rows: np.ndarray, ids: list[str], path: str, remedy: str = "re-extract those images"
) -> None:
    """Raise DataError naming the count and the first ids of the given rows that contain NaN or Inf.

    `rows` (M,) are row numbers into `features` (N, D) and `ids` (N,) its ids. `remedy` is
    the fix that ends the message, worded for the command that read the rows.
    """
    bad_rows = []
    # checked in blocks so a float16 file is never copied whole to another dtype
    for start in range(0, len(rows), _FINITE_CHECK_ROWS):
        block_rows = rows[start : start + _FINITE_CHECK_ROWS]
        finite = np.isfinite(features[block_rows]).all(axis=1)
        bad_rows.extend(block_rows[~finite].tolist())
    if bad_rows:
        examples = ", ".join(f"{ids[r]!r} (row {r})" for r in bad_rows[:_MAX_EXAMPLES])
        raise DataError(
            f"{str(path)!r}: {len(bad_rows)} of the {len(rows)} embeddings used contain NaN or Inf, ids "
            f"{examples}; {remedy}"
        )


@dataclass
class JoinReport:
    """Ids that did not pair up one-to-one between a list and an HDF5 index."""

    missing_in_hdf5: list[str] = field(default_factory=list)
    missing_in_list: list[str] = field(default_factory=list)
    duplicate_ids: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing_in_hdf5 or self.missing_in_list or self.duplicate_ids)

    def describe(self) -> str:
        parts = []
        for name, values in (
            ("list paths missing from the HDF5 index", self.missing_in_hdf5),
            ("HDF5 ids missing from the list", self.missing_in_list),
            ("duplicate HDF5 ids", self.duplicate_ids),
        ):
            if values:
                examples = ", ".join(repr(v) for v in values[:_MAX_EXAMPLES])
                parts.append(f"{len(values)} {name} (e.g. {examples})")
        return "; ".join(parts)


@dataclass
class JoinedLabels:
    """Rows of an embedding matrix paired with their (domain, label) class."""

    rows: np.ndarray  # (M,) int64 row numbers into `features`, in list order
    labels: np.ndarray  # (M,) int64
    domains: np.ndarray  # (M,) int64
    ids: list[str]  # (M,) escaped ids
    report: JoinReport


def join_by_id(
    hdf5_ids: list[str],
    entries: list[ListEntry],
    allow_missing: bool = False,
    source: str = "embeddings",
) -> JoinedLabels:
    """Pair each list entry with the HDF5 row of the same id, whatever the row order.

    Without `allow_missing`, any id that is not matched one-to-one raises DataError;
    with it, only the intersection is kept and the mismatch is logged. Duplicate ids
    are never used, since their row cannot be chosen safely.
    """
    canonical = [canonical_id(i) for i in hdf5_ids]
    counts = Counter(canonical)
    duplicates = sorted(i for i, n in counts.items() if n > 1)
    row_of = {i: r for r, i in enumerate(canonical) if counts[i] == 1}

    list_ids = [escape_id(e.path) for e in entries]
    list_set = set(list_ids)
    duplicate_set = set(duplicates)
    report = JoinReport(
        missing_in_hdf5=[i for i in list_ids if i not in row_of and i not in duplicate_set],
        missing_in_list=[i for i in canonical if i not in list_set and counts[i] == 1],
        duplicate_ids=duplicates,
    )

    if not report.ok:
        message = f"{source}: ids do not match the list one-to-one: {report.describe()}"
        if not allow_missing:
            raise DataError(message + "; fix the inputs, or pass --allow_missing to use the intersection")
        _logger.warning("%s; using the intersection (--allow_missing)", message)

    keep = [k for k, i in enumerate(list_ids) if i in row_of]
    if not keep:
        raise DataError(f"{source}: no list path matches an HDF5 id; are the list and file for the same images?")
    for k in keep:
        if entries[k].label is None:
            raise DataError(
                f"list line {entries[k].line_no} ({entries[k].path!r}) has no label and domain; "
                "training and evaluation need 'path,label,domain' lines"
            )

    return JoinedLabels(
        rows=np.array([row_of[list_ids[k]] for k in keep], dtype=np.int64),
        labels=np.array([entries[k].label for k in keep], dtype=np.int64),
        domains=np.array([entries[k].domain for k in keep], dtype=np.int64),
        ids=[list_ids[k] for k in keep],
        report=report,
    )
