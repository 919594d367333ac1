"""Resumable extraction state: a `<output>.parts/` folder with one file per finished window.

`manifest.json` contains the settings fingerprint of the run, the paths it read, and whether
the run replaces an existing output (`--overwrite true`). Each finished window of
consecutive list rows is saved as `window_NNNNNN.npz` (embeddings of its readable rows,
their row numbers, and the unreadable rows with reasons). A run that replaces an output
saves that output's failure report in `replaced_report.json` before it writes its own
report, so the old one can be put back. Every file is written to a
temporary name, fsynced and renamed, so a killed process leaves either the complete file
or none. The next start removes leftover temporary files. Removing the folder deletes the
manifest first, and part files found without a manifest are discarded.

The lock that keeps a second process out is `<output>.parts.lock`, beside the folder
rather than in it, so a run that deletes the folder (`--overwrite true`) holds the lock
first and a run in progress never has its folder deleted by another extractor.
"""
import fcntl
import io
import json
import logging
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from feature_extraction.dataset import Window

_logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
REPLACED_REPORT_NAME = "replaced_report.json"
LOCK_SUFFIX = ".lock"
PART_FORMAT = "window_{:06d}.npz"
PART_GLOB = "window_*.npz"
_TEMP_SUFFIX = ".tmp"
# what np.load raises for a truncated or overwritten .npz file
_UNREADABLE_PART_ERRORS = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile)


class SettingsMismatchError(Exception):
    """The parts folder belongs to a run with other settings; the message names them and the fix."""


def list_keys_ignored(previous: dict, current: dict) -> set[str]:
    """Return the list hash that a comparison of the two settings leaves out.

    A list saved again with other line endings, blank lines or spaces around its fields, or
    with other labels, has other bytes (list_sha256) but the same paths (list_paths_sha256).
    Runs and outputs written before list_paths_sha256 existed are compared by list_sha256.
    """
    if "list_paths_sha256" in previous and "list_paths_sha256" in current:
        return {"list_sha256"}
    return {"list_paths_sha256"}


def fingerprint_differences(previous: dict, current: dict) -> list[str]:
    """Return the sorted keys whose values differ between two fingerprints, keys in only one included."""
    keys = (set(previous) | set(current)) - list_keys_ignored(previous, current)
    return [key for key in sorted(keys) if previous.get(key) != current.get(key)]


def describe_differences(keys: list[str], previous: dict, current: dict, previous_label: str = "before") -> str:
    """Return "key: old <previous_label>, new now" for each key, joined with semicolons."""
    return "; ".join(f"{key}: {previous.get(key)!r} {previous_label}, {current.get(key)!r} now" for key in keys)


def list_change_note(differing_keys: list[str]) -> str:
    """Return a sentence on what a changed list hash means, or "" when neither list hash changed."""
    if "list_paths_sha256" in differing_keys:
        return (" The list_paths_sha256 is the hash of the paths of the --selected_ids file or, without that "
                "flag, of the image files found under --dataset_dir, in order, so list paths were added, removed, "
                "reordered or changed, or images were added, removed or renamed.")
    if "list_sha256" in differing_keys:
        return (" The list_sha256 is the hash of the --selected_ids file or, without that flag, of the image "
                "files found under --dataset_dir, so a list was edited or images were added, removed or renamed.")
    return ""


class StoreError(Exception):
    """A parts folder or part file that cannot be used; the message names the fix."""


@dataclass
class SavedRun:
    """The manifest of a partial run."""

    fingerprint: dict
    info: dict
    # saved by an --overwrite true run: its output replaces an existing one once complete.
    # Manifests written before this field existed lack it and read as False.
    replaces_output: bool


@dataclass
class WindowPart:
    rows: np.ndarray  # (n,) int64 rows with an embedding, ascending
    features: np.ndarray  # (n, D) stored dtype
    failed_rows: np.ndarray  # (f,) int64
    failed_reasons: list[str]


def fsync_directory(path: Path) -> None:
    """Flush a directory entry (a rename or a deletion) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, data: bytes) -> None:
    """Write bytes to `path` through a fsynced temporary file and a rename."""
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=path.name + ".", suffix=_TEMP_SUFFIX, delete=False) as f:
        temp_path = Path(f.name)
        try:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        except BaseException:
            f.close()
            temp_path.unlink(missing_ok=True)
            raise
    try:
        os.replace(temp_path, path)
    except BaseException:
        temp_path.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def parts_dir_for(output: Path) -> Path:
    """Return the parts folder that belongs to a final output file."""
    return output.with_name(output.name + ".parts")


class PartStore:
    """The parts folder of one output: manifest, finished windows and their files."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.lock_path = directory.with_name(directory.name + LOCK_SUFFIX)
        self._lock_file = None

    def lock(self) -> None:
        """Take the lock of this output, or raise StoreError when another process holds it.

        A second process on the same output (a requeued job while the first still runs)
        would interleave windows or delete them. The lock is released by `close` and when
        this process exits. A POSIX record lock (lockf), unlike flock, is not shared with
        forked DataLoader workers, which outlive a SIGKILLed main process by up to 5 s and
        kept a rerun out.
        """
        if self._lock_file is not None:
            return
        while True:
            lock_file = open(self.lock_path, "a")
            try:
                fcntl.lockf(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                lock_file.close()
                raise StoreError(
                    f"another process is extracting into {self.directory} (it holds {self.lock_path}); "
                    "wait for it to finish or stop it"
                ) from e
            # `close` deletes the lock file, so the previous holder may have unlinked the file
            # locked here. Only a lock on the file now at the path counts.
            if _same_file(lock_file, self.lock_path):
                self._lock_file = lock_file
                return
            lock_file.close()

    def read_manifest(self) -> SavedRun | None:
        """Return the manifest of the partial run in the folder, or None when there is none.

        Raises StoreError when the manifest cannot be read.
        """
        if not self.manifest_path.exists():
            return None
        try:
            manifest = json.loads(self.manifest_path.read_text())
            saved = SavedRun(manifest["fingerprint"], manifest.get("info", {}), manifest.get("replaces_output", False))
            # a manifest edited by hand can be valid JSON with fields of other types
            if not (isinstance(saved.fingerprint, dict) and isinstance(saved.info, dict)
                    and isinstance(saved.replaces_output, bool)):
                raise TypeError("fingerprint and info must be JSON objects, and replaces_output true or false")
            return saved
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise StoreError(
                f"cannot read {self.manifest_path}: {e}; delete {self.directory} (or pass --overwrite true) "
                "to start again"
            ) from e

    def open(self, fingerprint: dict, info: dict, replaces_output: bool = False) -> None:
        """Create the folder for a new run, or check the fingerprint of an existing one, under the lock.

        `replaces_output` is recorded for a new run only, and is not compared with an existing one.
        Raises SettingsMismatchError naming the differing settings, and StoreError when
        another process holds the folder.
        """
        self.lock()
        self.directory.mkdir(parents=True, exist_ok=True)
        saved = self.read_manifest()
        if saved is not None:
            previous = saved.fingerprint
            if previous.get("format_version") != fingerprint.get("format_version"):
                raise SettingsMismatchError(
                    f"{self.directory} contains a partial run saved in format {previous.get('format_version')!r}, "
                    f"and this version of extract.py resumes format {fingerprint.get('format_version')!r} only. "
                    "Pass --overwrite true to discard it and extract again"
                )
            differing = fingerprint_differences(previous, fingerprint)
            if differing:
                raise SettingsMismatchError(
                    f"{self.directory} contains a partial run with other settings ("
                    + describe_differences(differing, previous, fingerprint)
                    + ")." + list_change_note(differing)
                    + " Rerun with the same flags and list to resume it, or pass --overwrite true to discard it"
                )
            for key in sorted(set(saved.info) & set(info)):
                if saved.info[key] != info[key]:
                    # e.g. a dataset copied to another node's scratch: allowed, but worth a look
                    _logger.warning("resuming a run whose %s was %r; now it is %r", key, saved.info[key], info[key])
            self._remove_temporary_files()
            return

        self._remove_temporary_files()
        self._remove_parts_without_manifest()
        manifest = {"fingerprint": fingerprint, "info": info, "replaces_output": replaces_output}
        write_atomically(self.manifest_path, json.dumps(manifest, indent=2, sort_keys=True).encode())

    def _remove_temporary_files(self) -> None:
        for path in self.directory.glob("*" + _TEMP_SUFFIX):
            _logger.info("removing %s left by an interrupted write", path)
            path.unlink(missing_ok=True)

    def _remove_parts_without_manifest(self) -> None:
        # a deletion cut short can leave part files without their manifest, and their settings are unknown
        orphaned = sorted(self.directory.glob(PART_GLOB))
        if orphaned:
            _logger.warning("removing %d part files in %s that have no manifest, so their settings are unknown",
                            len(orphaned), self.directory)
        for path in orphaned:
            path.unlink()

    @property
    def manifest_path(self) -> Path:
        """Settings fingerprint of the partial run in the folder."""
        return self.directory / MANIFEST_NAME

    @property
    def replaced_report_path(self) -> Path:
        """Copy of the failure report of the output that this run replaces."""
        return self.directory / REPLACED_REPORT_NAME

    def part_path(self, window_index: int) -> Path:
        return self.directory / PART_FORMAT.format(window_index)

    def finished_windows(self, windows: list[Window]) -> set[int]:
        """Return the indices of windows whose part file exists and opens."""
        finished = set()
        for window in windows:
            path = self.part_path(window.index)
            if not path.exists():
                continue
            try:
                with np.load(path, allow_pickle=False) as part:
                    num_rows = part["rows"].shape[0] + part["failed_rows"].shape[0]
            except _UNREADABLE_PART_ERRORS as e:
                _logger.warning("part file %s is unreadable (%s); its window will be recomputed", path, e)
                path.unlink(missing_ok=True)
                continue
            if num_rows != window.stop - window.start:
                _logger.warning("part file %s has %d rows, not %d; its window will be recomputed",
                                path, num_rows, window.stop - window.start)
                path.unlink(missing_ok=True)
                continue
            finished.add(window.index)
        return finished

    def write_window(self, window: Window, part: WindowPart) -> None:
        """Save one finished window atomically."""
        buffer = io.BytesIO()
        np.savez(
            buffer,
            rows=part.rows.astype(np.int64),
            features=part.features,
            failed_rows=part.failed_rows.astype(np.int64),
            failed_reasons=np.array(part.failed_reasons, dtype=str),
        )
        try:
            write_atomically(self.part_path(window.index), buffer.getvalue())
        except OSError as e:
            if not self.directory.is_dir():
                raise StoreError(
                    f"the parts folder {self.directory} was deleted while this run was writing to it, so "
                    "its saved windows are lost; check that no other program deletes it, then rerun to "
                    "start again"
                ) from e
            raise StoreError(
                f"cannot save {self.part_path(window.index)}: {e.strerror or e}; free space in "
                f"{self.directory.parent} or choose another --hdf5_dir, then rerun to resume"
            ) from e

    def read_window(self, window: Window) -> WindowPart:
        """Load and check one part file; raise StoreError if it does not cover its window exactly."""
        path = self.part_path(window.index)
        try:
            with np.load(path, allow_pickle=False) as data:
                part = WindowPart(
                    rows=data["rows"],
                    features=data["features"],
                    failed_rows=data["failed_rows"],
                    failed_reasons=[str(reason) for reason in data["failed_reasons"]],
                )
        except _UNREADABLE_PART_ERRORS as e:
            path.unlink(missing_ok=True)
            raise StoreError(f"part file {path} is unreadable ({e}); it was removed, rerun to recompute it") from e

        covered = np.sort(np.concatenate([part.rows, part.failed_rows]))
        if not np.array_equal(covered, np.arange(window.start, window.stop)) or part.features.shape[0] != len(part.rows):
            path.unlink(missing_ok=True)
            raise StoreError(
                f"part file {path} does not cover rows {window.start}-{window.stop - 1} exactly; "
                "it was removed, rerun to recompute it"
            )
        return part

    def close(self) -> None:
        """Release the lock, if this process holds it, and delete the lock file."""
        if self._lock_file is not None:
            # deleted while still locked, so no other process can hold the lock on this file
            self.lock_path.unlink(missing_ok=True)
            self._lock_file.close()
            self._lock_file = None

    def remove_manifest(self) -> None:
        """Delete the manifest, so the folder is no longer a run that a rerun would resume."""
        if self.manifest_path.exists():
            self.manifest_path.unlink()
            fsync_directory(self.directory)

    def remove(self) -> None:
        """Delete the parts folder and everything in it; the lock stays held until `close`.

        The manifest goes first, so a deletion cut short leaves no run that a rerun would resume.
        """
        self.remove_manifest()
        shutil.rmtree(self.directory, ignore_errors=False)
        fsync_directory(self.directory.parent)


def _same_file(open_file, path: Path) -> bool:
    try:
        on_disk = path.stat()
    except FileNotFoundError:
        return False
    opened = os.fstat(open_file.fileno())
    return (on_disk.st_dev, on_disk.st_ino) == (opened.st_dev, opened.st_ino)
