"""Argument checks and the summary output shared by the benchmark scripts."""
import argparse
import json
import os
from pathlib import Path

from benchmarks.machine import usable_cores


class SummaryWriteError(Exception):
    """The --json file could not be written after the summary line was printed."""


def check_threads(parser: argparse.ArgumentParser, threads: int | None) -> None:
    """Reject a --threads above the cores this process may use, where the extra threads would only wait."""
    cores = usable_cores()
    if threads is not None and threads > cores:
        parser.error(f"--threads is {threads} but this process may use {cores} cores; give at most {cores}")


def check_json_writable(parser: argparse.ArgumentParser, path: str) -> None:
    """Reject a --json path that cannot be opened for writing, before the benchmark runs.

    The check creates the missing parent folders and opens the file for appending, which
    leaves an existing file as it is. It then removes the file and the folders it created,
    so an early exit leaves nothing behind. os.access cannot tell this for root, which it
    reports as allowed to write everywhere, even under /proc.
    """
    target = Path(os.path.abspath(path))
    if target.exists() and not target.is_file():
        # opening a FIFO waits for a reader and takes it from the final write, so it is left to that write
        return
    # a symlink creates its target, which is what the cleanup must remove
    created = Path(os.path.realpath(target))
    missing_folders = [folder for folder in target.parents if not folder.exists()]
    existed = created.exists()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "a", encoding="utf-8"):
            pass
    except OSError as e:
        parser.error(f"--json {path!r} cannot be written: {e.strerror or e}; choose another path")
    finally:
        _remove_created(created, existed, missing_folders)


def _remove_created(target: Path, existed: bool, created_folders: list[Path]) -> None:
    """Remove the probe file unless it existed before, then the created folders, deepest first."""
    if not existed:
        _unlink_quietly(target)
    for folder in created_folders:
        try:
            folder.rmdir()
        except OSError:  # not created here after all, or no longer empty
            pass


def _unlink_quietly(path: Path) -> None:
    """Remove a file if it exists, because a cleanup step must not hide the error that triggered it."""
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def emit_summary(summary: dict, json_path: str | None) -> None:
    """Print the summary as one `summary: {...}` line on stdout and, with `json_path`, save it as JSON.

    Raises SummaryWriteError when the file cannot be written. A file that this call
    created is removed again, so a failed write leaves no empty or partial new file.
    """
    print("summary: " + json.dumps(summary), flush=True)
    if json_path is None:
        return
    path = Path(json_path)
    created = Path(os.path.realpath(path))
    existed = created.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    except OSError as e:
        if not existed:
            _unlink_quietly(created)
        raise SummaryWriteError(
            f"cannot write the summary to --json {json_path!r}: {e.strerror or e}. The summary line printed on "
            "stdout above has the same content"
        ) from e
