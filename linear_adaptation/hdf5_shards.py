"""A database of embeddings split over one or several HDF5 files, read block by block.

Each file has the ILIAS layout (`features` N x D, `index` N ids). Database rows are
numbered across files in the order given, so row r of the second file is row
(rows of the first file) + r. Only the ids are held in memory; features are read one
block at a time while searching.
"""
import glob
import logging
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator

import h5py
import numpy as np

from feature_extraction.image_list import canonical_id
from linear_adaptation.features_io import (
    DataError,
    check_filters_available,
    check_hdf5_layout,
    decode_ids,
    open_error,
)
from linear_adaptation.ground_truth import find_duplicates

_logger = logging.getLogger(__name__)

SHARD_PLACEHOLDER = "{idx}"
_GLOB_CHARS = re.compile(r"[*?\[]")
_REPEATED_SEPARATORS = re.compile(r"/{2,}")


def _natural_key(path: str) -> list:
    """Sort key comparing digit runs as numbers, so that part_2 sorts before part_10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path)]


def _expand_shard_pattern(pattern: str) -> list[str]:
    # glob returns the matches of "db//part_*" as "db/part_1", which a regex built from "db//" would not match
    prefix, suffix = _REPEATED_SEPARATORS.sub("/", pattern).split(SHARD_PLACEHOLDER, 1)
    if SHARD_PLACEHOLDER in suffix:
        raise DataError(f"database pattern {pattern!r} contains {SHARD_PLACEHOLDER} more than once; use it once")
    matcher = re.compile(re.escape(prefix) + r"(\d+)" + re.escape(suffix) + r"\Z")
    found = []
    for path in glob.glob(glob.escape(prefix) + "*" + glob.escape(suffix)):
        match = matcher.match(path)
        if match:
            found.append((int(match.group(1)), path))
    if not found:
        raise DataError(
            f"no file matches the database pattern {pattern!r} ({SHARD_PLACEHOLDER} stands for a shard number)"
        )
    found.sort()
    numbers = [number for number, _ in found]
    missing, first_missing = _missing_numbers(numbers)
    if missing:
        _logger.warning(
            "database pattern %r: %d shard numbers from %d to %d are missing (first: %s)",
            pattern, missing, numbers[0], numbers[-1], first_missing,
        )
    return [path for _, path in found]


def _missing_numbers(numbers: list[int], max_listed: int = 10) -> tuple[int, list[int]]:
    """Return how many integers between the smallest and the largest of `numbers` are absent, and the first of them.

    Counts from the gaps between neighbours, so a stray file numbered like a timestamp costs no memory.
    """
    distinct = sorted(set(numbers))
    count, listed = 0, []
    for low, high in zip(distinct, distinct[1:]):
        count += high - low - 1
        listed.extend(range(low + 1, min(high, low + 1 + max_listed - len(listed))))
    return count, listed


def expand_database_paths(patterns: list[str]) -> list[str]:
    """Expand database arguments into an ordered list of existing files.

    An argument that names an existing file is that file, even if its name contains
    `[` or `*`. Otherwise an argument containing `{idx}` matches files with any number
    in its place, in numeric order, and one with `*`, `?` or `[` is a glob, expanded in
    natural order. Any other argument must name an existing file.

    Raises:
        DataError: A pattern matches nothing, a file is missing, or a file is given twice.
    """
    paths = []
    for pattern in patterns:
        # as a glob, "run[2]/db.hdf5" would match "run2/db.hdf5" and never itself
        if os.path.isfile(pattern):
            paths.append(pattern)
        elif SHARD_PLACEHOLDER in pattern:
            paths.extend(_expand_shard_pattern(pattern))
        elif _GLOB_CHARS.search(pattern):
            matches = sorted(glob.glob(pattern), key=_natural_key)
            if not matches:
                raise DataError(f"no file matches the database glob {pattern!r}")
            paths.extend(matches)
        elif os.path.isdir(pattern):
            raise DataError(
                f"database path {pattern!r} is a folder; give its HDF5 files, a glob such as "
                f"{os.path.join(pattern, '*.hdf5')!r} or a shard pattern with {SHARD_PLACEHOLDER}"
            )
        else:
            raise DataError(f"database file {pattern!r} not found; check the path")

    uses = Counter(os.path.realpath(p) for p in paths)
    repeated = sorted({p for p in paths if uses[os.path.realpath(p)] > 1})
    if repeated:
        raise DataError(f"database files given more than once: {repeated}; list each shard once")
    return paths


def _describe_files(rows_per_path: Counter) -> str:
    """Name each file with its row count when above 1, e.g. "'a.hdf5' and 'b.hdf5' (2 rows)"."""
    named = [repr(path) + (f" ({count} rows)" if count > 1 else "") for path, count in rows_per_path.items()]
    return " and ".join(named) if len(named) <= 2 else ", ".join(named[:-1]) + " and " + named[-1]


class HDF5Database:
    """Database files checked for layout and dimension, with their ids loaded.

    With `keep_id`, only the rows whose canonical id it accepts are database rows. They are
    numbered consecutively in file order, and the other rows are never searched or checked.

    Attributes:
        paths: Files in row order.
        rows_per_file: Database rows of each file.
        stored_rows_per_file: Rows stored in each file, kept or not.
        ids: Canonical ids of all database rows, in row order.
        dim: Embedding dimension, equal in all files.
    """

    def __init__(self, paths: list[str], keep_id: Callable[[str], bool] | None = None):
        self.paths = list(paths)
        self.rows_per_file: list[int] = []
        self.stored_rows_per_file: list[int] = []
        self.ids: list[str] = []
        self.dim: int | None = None
        self._kept_rows: list[np.ndarray | None] = []  # per file, the stored rows kept, or None for all
        self._keep_id = keep_id
        for path in self.paths:
            self._read_header(path)
        if keep_id is None:
            _logger.info(
                "database: %d rows x %d dimensions in %d file(s)", self.num_rows, self.dim, len(self.paths)
            )
        else:
            _logger.info(
                "database: %d of %d rows kept by the selection, x %d dimensions in %d file(s)",
                self.num_rows, sum(self.stored_rows_per_file), self.dim, len(self.paths),
            )

    @property
    def num_rows(self) -> int:
        return sum(self.rows_per_file)

    def _read_header(self, path: str) -> None:
        try:
            f = h5py.File(path, "r")
        except OSError as e:
            raise open_error(path, e) from e

        with f:
            features, index = check_hdf5_layout(f, path)
            if self.dim is not None and features.shape[1] != self.dim:
                raise DataError(
                    f"{path!r} has {features.shape[1]}-dimensional embeddings but {self.paths[0]!r} has "
                    f"{self.dim}; all database files must come from the same backbone"
                )
            try:
                ids = decode_ids(index, path)
            except DataError:
                raise
            except (OSError, ValueError) as e:
                check_filters_available((index,), path)
                raise DataError(f"cannot read the ids of {path!r} ({e}); the file is damaged, copy it again") from e
            self.dim = features.shape[1]

        canonical = [canonical_id(i) for i in ids]
        self.stored_rows_per_file.append(len(canonical))
        if self._keep_id is None:
            self._kept_rows.append(None)
        else:
            kept = np.flatnonzero(np.fromiter(map(self._keep_id, canonical), dtype=bool, count=len(canonical)))
            self._kept_rows.append(kept)
            canonical = [canonical[row] for row in kept]
        self.rows_per_file.append(len(canonical))
        self.ids.extend(canonical)

    def check_unique_ids(self) -> None:
        """Raise DataError naming the files of up to 3 database ids that occur more than once.

        A repeated id makes the positives of the ground truth ambiguous, and across hundreds of
        shards the files are what the user needs to find it.
        """
        repeated = find_duplicates(self.ids)
        if not repeated:
            return
        examples = repeated[:3]
        files_of = {image_id: Counter() for image_id in examples}
        start = 0
        for path, num_rows in zip(self.paths, self.rows_per_file):
            for image_id in self.ids[start : start + num_rows]:
                if image_id in files_of:
                    files_of[image_id][path] += 1
            start += num_rows
        places = "; ".join(f"{image_id!r} in {_describe_files(files_of[image_id])}" for image_id in examples)
        raise DataError(
            f"{len(repeated)} database ids occur more than once (e.g. {places}); a repeated id makes its "
            "positives ambiguous, so remove the repeated rows or files"
        )

    def iterate_chunks(
        self, chunk_rows: int, transform: Callable[[np.ndarray], np.ndarray] | None = None
    ) -> Iterator[np.ndarray]:
        """Yield blocks of at most `chunk_rows` database rows in row order, file by file.

        Blocks do not span files. Each block is read from disk when requested, cut to the
        kept rows (with a selection, blocks can be smaller, and a block with no kept row is
        skipped), checked for NaN and Inf, and then passed through `transform` when given.

        Raises:
            DataError: A block cannot be read or contains NaN or Inf.
        """
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be at least 1, got {chunk_rows}")
        offset = 0  # database rows of the earlier files
        for path, stored_rows, kept in zip(self.paths, self.stored_rows_per_file, self._kept_rows):
            emitted = 0  # database rows of this file yielded so far
            with h5py.File(path, "r") as f:
                features = f["features"]
                for start in range(0, stored_rows, chunk_rows):
                    end = min(start + chunk_rows, stored_rows)
                    if kept is None:
                        stored_rows_of_block = np.arange(start, end)
                    else:
                        # kept is sorted, so the kept rows of [start, end) are one slice of it
                        first, last = np.searchsorted(kept, [start, end])
                        if first == last:
                            continue  # no kept row here, so nothing is read
                        stored_rows_of_block = kept[first:last]
                    read_start, read_end = int(stored_rows_of_block[0]), int(stored_rows_of_block[-1]) + 1
                    try:
                        block = features[read_start:read_end]  # (n, D) in the stored dtype
                    except OSError as e:
                        check_filters_available((features,), path)
                        raise DataError(
                            f"cannot read rows {read_start}+ of {path!r} ({e}); the file is damaged, copy or "
                            "extract it again"
                        ) from e
                    if kept is not None:
                        block = block[stored_rows_of_block - read_start]

                    finite = np.isfinite(block).all(axis=1)
                    if not finite.all():
                        bad = int(np.flatnonzero(~finite)[0])
                        raise DataError(
                            f"{path!r}: row {int(stored_rows_of_block[bad])} (id {self.ids[offset + emitted + bad]!r}) "
                            "contains NaN or Inf; re-extract that image or drop it from the database"
                        )
                    emitted += len(block)
                    yield transform(block) if transform is not None else block
            offset += emitted
