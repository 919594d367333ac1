"""Final output: the ILIAS-layout HDF5 file and the `<output>.failed.txt` report.

The ILIAS tools read two datasets: `features` (N x D, float16 or float32) and `index`
(N ASCII ids, the list paths escaped with `escape_id`). Rows follow the list order and
unreadable images are left out. Run settings are stored as file attributes. The file is
assembled from the window parts in `<output>.tmp`, fsynced and renamed, so the final
name only ever refers to a complete file.
"""
import json
import logging
import os
import re
from pathlib import Path

import h5py
import numpy as np

from feature_extraction.dataset import Window
from feature_extraction.store import PartStore, fsync_directory, write_atomically

_logger = logging.getLogger(__name__)

# HDF5 chunks of about 1 MiB read and compress well
_CHUNK_BYTES = 1 << 20


class OutputError(OSError):
    """The output file cannot be written (for example a full disk); the message names the path and the fix."""


def _write_failure_reason(error: BaseException) -> str:
    # HDF5 reports a failed write() inside a long message: keep its errno text when present
    for cause in (error, error.__context__):
        match = re.search(r"error message = '([^']*)'", str(cause)) if cause is not None else None
        if match:
            return match.group(1)
    return str(error).splitlines()[0]


def temporary_path_for(output: Path) -> Path:
    return output.with_name(output.name + ".tmp")


def failures_path_for(output: Path) -> Path:
    return output.with_name(output.name + ".failed.txt")


def _create_datasets(
    f: h5py.File, dim: int, store_dtype: np.dtype, compression: int
) -> tuple[h5py.Dataset, h5py.Dataset]:
    chunk_rows = max(1, _CHUNK_BYTES // (dim * store_dtype.itemsize))
    options = {"compression": "gzip", "compression_opts": compression} if compression > 0 else {}
    features = f.create_dataset(
        "features", shape=(0, dim), maxshape=(None, dim), dtype=store_dtype, chunks=(chunk_rows, dim), **options
    )
    index = f.create_dataset(
        "index", shape=(0,), maxshape=(None,), dtype=h5py.string_dtype("ascii"), chunks=(min(chunk_rows, 4096),)
    )
    return features, index


def assemble_hdf5(
    store: PartStore,
    windows: list[Window],
    ids: list[str],
    path: Path,
    store_dtype: np.dtype,
    compression: int,
    attributes: dict,
) -> tuple[int, list[tuple[int, str]]]:
    """Stream the window parts, in row order, into an HDF5 file at `path`.

    Holds one window in memory at a time. Returns the number of embedded rows and the
    (row, reason) pairs of the unreadable ones.
    """
    try:
        return _assemble(store, windows, ids, path, store_dtype, compression, attributes)
    except (OSError, RuntimeError) as e:
        if isinstance(e, OutputError):
            raise
        raise OutputError(
            f"cannot write {path}: {_write_failure_reason(e)}; free space in {path.parent} or choose "
            "another --hdf5_dir, then rerun to resume"
        ) from e


def _assemble(
    store: PartStore,
    windows: list[Window],
    ids: list[str],
    path: Path,
    store_dtype: np.dtype,
    compression: int,
    attributes: dict,
) -> tuple[int, list[tuple[int, str]]]:
    failures: list[tuple[int, str]] = []
    num_rows = 0
    # Without a chunk cache a failed write (full disk, file size limit) raises at once.
    # With one, the dirty chunks stayed in HDF5's cache and crashed the process at exit.
    with h5py.File(path, "w", rdcc_nbytes=0) as f:
        features = index = None
        for window in windows:
            part = store.read_window(window)
            failures.extend(zip(part.failed_rows.tolist(), part.failed_reasons))
            if len(part.rows) == 0:
                continue

            order = np.argsort(part.rows)
            rows, vectors = part.rows[order], part.features[order]
            if features is None:
                features, index = _create_datasets(f, vectors.shape[1], store_dtype, compression)
            features.resize(num_rows + len(rows), axis=0)
            index.resize(num_rows + len(rows), axis=0)
            features[num_rows:] = vectors.astype(store_dtype, copy=False)
            index[num_rows:] = [ids[row].encode("ascii") for row in rows]
            num_rows += len(rows)

        if features is None:
            return 0, sorted(failures)
        for key, value in attributes.items():
            f.attrs[key] = value
        f.attrs["num_images"] = num_rows
        f.attrs["num_failed"] = len(failures)
        f.attrs["dim"] = features.shape[1]
        f.flush()

    # h5py's close does not fsync, so flush the file's data before it is renamed
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return num_rows, sorted(failures)


def plain_attribute(value):
    """Convert an HDF5 attribute to the Python value that a fingerprint contains.

    h5py returns numpy scalars and arrays, and bytes for strings that other writers store as
    fixed-length byte strings.
    """
    value = value.tolist() if hasattr(value, "tolist") else value
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def read_attributes(path: Path) -> dict:
    """Return the file attributes of an existing output as Python values, raising OutputError if it cannot be read."""
    try:
        with h5py.File(path, "r") as f:
            return {key: plain_attribute(value) for key, value in f.attrs.items()}
    except OSError as e:
        raise OutputError(
            f"cannot read the existing output {path}: {e}; pass --overwrite true to replace it, or choose "
            "another --hdf5_dir or --hdf5_name"
        ) from e


def read_ids(path: Path) -> list[str]:
    """Return the `index` ids of an existing output as text, raising OutputError if they cannot be read."""
    try:
        with h5py.File(path, "r") as f:
            index = f.get("index")
            # a group or a scalar in place of the (N,) dataset
            if not isinstance(index, h5py.Dataset) or index.ndim != 1:
                raise OutputError(
                    f"the existing output {path} has no one-dimensional `index` dataset, so it is not an ILIAS "
                    "embeddings file; pass --overwrite true to replace it, or choose another --hdf5_dir or --hdf5_name"
                )
            raw_ids = index[:]
    except OutputError:
        raise
    except OSError as e:
        raise OutputError(
            f"cannot read the index of the existing output {path}: {e}; pass --overwrite true to replace it, "
            "or choose another --hdf5_dir or --hdf5_name"
        ) from e
    # the ILIAS tools store ASCII bytes, and backslash escapes keep any other byte visible in messages
    return [i.decode("utf-8", "backslashreplace") if isinstance(i, bytes) else str(i) for i in raw_ids]


def describe_compression(compression: str | None, level) -> str:
    """Return "no compression", "gzip level N" or the filter name, as h5py reports a dataset's compression."""
    if compression is None:
        return "no compression"
    if compression == "gzip":
        return f"gzip level {level}"
    return str(compression)


def read_compression(path: Path) -> str | None:
    """Return `describe_compression` of the `features` dataset of an existing output, or None when it has none."""
    try:
        with h5py.File(path, "r") as f:
            if "features" not in f:
                return None
            features = f["features"]
            return describe_compression(features.compression, features.compression_opts)
    except OSError as e:
        raise OutputError(
            f"cannot read the existing output {path}: {e}; pass --overwrite true to replace it, or choose "
            "another --hdf5_dir or --hdf5_name"
        ) from e


def write_failure_report(path: Path, failures: list[tuple[str, str]]) -> None:
    """Write `path,reason` lines atomically, or remove a stale report when nothing failed."""
    if not failures:
        if path.exists():
            _logger.info("removing the failure report %s of an earlier run", path)
            path.unlink()
        return
    text = "".join(f"{image_path},{reason}\n" for image_path, reason in failures)
    write_atomically(path, text.encode("utf-8"))


def _file_identity(path: Path) -> list[int]:
    # a rename onto `path` gives it another inode, and the size and mtime rule out a reused inode number
    stat = path.stat()
    return [stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns]


def _read_report_copy(copy_path: Path) -> dict | None:
    """Return the copy that `save_replaced_report` wrote, or None when there is none or it cannot be read."""
    if not copy_path.exists():
        return None
    try:
        saved = json.loads(copy_path.read_text(encoding="utf-8"))
        if not (isinstance(saved, dict) and isinstance(saved.get("output"), list) and "report" in saved
                and isinstance(saved["report"], (str, type(None)))):
            raise ValueError("it is not a report copy written by extract.py")
        return saved
    except (OSError, ValueError) as e:
        _logger.warning("ignoring %s, which cannot be read: %s", copy_path, e)
        return None


def save_replaced_report(output: Path, copy_path: Path) -> None:
    """Copy the failure report of `output`, or the fact that it has none, to `copy_path` before a new report replaces it.

    A copy made earlier for the same `output` file is kept, because the attempt that made it
    may have been killed after it replaced the report beside `output`.
    """
    identity = _file_identity(output)
    saved = _read_report_copy(copy_path)
    if saved is not None and saved["output"] == identity:
        return
    report = failures_path_for(output)
    # surrogateescape keeps the bytes of a report that is not UTF-8
    text = report.read_bytes().decode("utf-8", "surrogateescape") if report.exists() else None
    write_atomically(copy_path, json.dumps({"output": identity, "report": text}).encode("ascii"))


def restore_replaced_report(output: Path, copy_path: Path) -> None:
    """Put back the failure report that `save_replaced_report` copied, if `output` is still the file it belongs to.

    A run killed between the rename of its report and the rename of its HDF5 file leaves
    the old output beside the new report. A rerun that keeps the old output, or discards
    the stopped run, calls this first.
    """
    saved = _read_report_copy(copy_path)
    if saved is None or not output.exists() or saved["output"] != _file_identity(output):
        return
    report = failures_path_for(output)
    expected = None if saved["report"] is None else saved["report"].encode("utf-8", "surrogateescape")
    current = report.read_bytes() if report.exists() else None
    if current == expected:
        return
    _logger.warning("putting back the failure report %s of %s from %s, because a run of --overwrite true was "
                    "stopped after it replaced the report and before it replaced the output", report, output, copy_path)
    if expected is None:
        report.unlink()
        fsync_directory(report.parent)
    else:
        write_atomically(report, expected)


def publish(temporary: Path, output: Path) -> None:
    """Rename the finished temporary file to the output name and flush the rename."""
    os.replace(temporary, output)
    fsync_directory(output.parent)
