"""Argument checks and help formatting shared by the trainer, the evaluator and the benchmarks.

Each check calls `parser.error` (exit status 2) with a message that names the flag, the
value and the fix, so that bad paths and values fail before any data is read.
"""
import argparse
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

# torch.manual_seed, torch.Generator and numpy.random.default_rng all accept this range
MAX_SEED = 2**63 - 1


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Append the default to each flag's help, except for required flags and flags whose default is None."""

    def _get_help_string(self, action):
        if action.required or action.default is None:
            return action.help
        return super()._get_help_string(action)


def check_input_file(parser: argparse.ArgumentParser, flag: str, path: str | os.PathLike) -> None:
    """Reject an input path that does not exist or is not a file."""
    if os.path.isfile(path):
        return
    if os.path.isdir(path):
        parser.error(f"{flag} {str(path)!r} is a folder; give the path of a file")
    parser.error(f"{flag} {str(path)!r} does not exist; check the path")


def check_input_files(parser: argparse.ArgumentParser, inputs: Mapping[str, list]) -> None:
    """Reject every input path of `inputs` (flag -> paths) that does not exist or is not a file."""
    for flag, paths in inputs.items():
        for path in paths:
            check_input_file(parser, flag, path)


def check_output_path(parser: argparse.ArgumentParser, flag: str, path: str | os.PathLike,
                      description: str = "the file to write") -> None:
    """Reject an output path that is empty, ends with a path separator or names an existing folder."""
    if str(path) == "":
        # Path("") is the current folder, which the message would name as "."
        parser.error(f"{flag} is empty; give the path of {description}")
    # Path() drops a trailing separator, so 'out/' would otherwise become a file named 'out'
    separators = tuple(sep for sep in (os.sep, os.altsep) if sep)
    if str(path).endswith(separators):
        parser.error(f"{flag} {str(path)!r} ends with a path separator, so it names a folder; give the path of {description}")
    if Path(path).is_dir():
        parser.error(f"{flag} {str(path)!r} is a folder; give the path of {description}")


def check_output_file(parser: argparse.ArgumentParser, flag: str, path: str | os.PathLike,
                      description: str = "the file to write") -> None:
    """Reject an empty output path, a folder, or a path whose folder cannot be created or written."""
    check_output_path(parser, flag, path, description)
    path = Path(path)
    folder = Path(os.path.abspath(path)).parent
    existing = next(p for p in [folder, *folder.parents] if p.exists())
    if not existing.is_dir():
        parser.error(f"{flag} {str(path)!r}: {str(existing)!r} is a file, not a folder; choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        parser.error(f"{flag} {str(path)!r}: the folder {str(existing)!r} is not writable; choose another path")


def same_file(first: str | os.PathLike, second: str | os.PathLike) -> bool:
    """Return whether two paths name the same file, through links too; a missing path compares by its resolved name."""
    try:
        return os.path.samefile(first, second)
    except OSError:
        return os.path.realpath(first) == os.path.realpath(second)


def check_not_an_input(
    parser: argparse.ArgumentParser, flag: str, output: str | os.PathLike, inputs: Mapping[str, list]
) -> None:
    """Reject an output path that is one of the input files, which writing it would destroy.

    `inputs` maps each input flag to its paths.
    """
    for input_flag, paths in inputs.items():
        for path in paths:
            if same_file(output, path):
                parser.error(
                    f"{flag} would write {str(output)!r}, which is the {input_flag} input {str(path)!r}; "
                    "choose another output path"
                )


def check_at_least_one(parser: argparse.ArgumentParser, args: argparse.Namespace, names: Iterable[str]) -> None:
    """Reject a value below 1 for each named flag; an unset flag (None) takes its default later."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} is {value}; it must be at least 1")


def check_seed(parser: argparse.ArgumentParser, flag: str, seed: int) -> None:
    """Reject a seed outside 0 .. 2**63 - 1."""
    if not 0 <= seed <= MAX_SEED:
        parser.error(f"{flag} is {seed}; it must lie between 0 and 2**63 - 1 ({MAX_SEED})")


def check_finite(parser: argparse.ArgumentParser, flag: str, value: float) -> None:
    """Reject NaN and infinite values."""
    if not math.isfinite(value):
        parser.error(f"{flag} is {value}; it must be a finite number")
