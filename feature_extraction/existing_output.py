"""Comparison of an existing output with a rerun's settings and list, before the rerun keeps it.

Files of this extractor record their settings as attributes, the list included as
`list_sha256`. Files of the older ILIAS tools record no settings, so only their `index`
can be compared with the list.
"""
import logging
from dataclasses import dataclass
from pathlib import Path

from feature_extraction.hdf5_output import describe_compression, read_attributes, read_compression, read_ids
from feature_extraction.image_list import ListEntry, canonical_id, escape_id
from feature_extraction.store import SettingsMismatchError, list_change_note, list_keys_ignored

_logger = logging.getLogger(__name__)


@dataclass
class OutputComparison:
    """The differences between an existing output and this command's settings and list."""

    # keys of the differing settings, and "index" for ids that contradict the list
    differing: list[str]
    # one "key: ... in the file, ... now" description per differing key
    differences: list[str]
    # False for files of the older ILIAS tools, whose ids alone can be compared
    records_settings: bool
    # how the ids contradict the list, for a file without `list_sha256`, or None when they match
    index_difference: str | None = None


def compare_output(output: Path, fingerprint: dict, entries: list[ListEntry]) -> OutputComparison:
    """Compare the settings that `output` records with `fingerprint`, and its ids with `entries` when needed.

    Files of the older ILIAS tools record no settings, and files of earlier versions of this
    extractor record fewer. The missing ones are logged as unchecked. A file without
    `list_sha256` has its `index` compared with the ids of the list instead.
    """
    stored = read_attributes(output)
    # the window size only groups rows into resumable parts, so it does not define the embeddings
    ignored = {"format_version", "num_rows", "window_size", *list_keys_ignored(stored, fingerprint)}
    requested = {key: value for key, value in fingerprint.items() if key not in ignored}
    # the attributes store the dtype as `dtype` and the model as typed, tag included
    requested["dtype"] = requested.pop("store_dtype")
    if "model" in stored:
        stored["model"] = str(stored["model"]).partition(".")[0]

    differing = [key for key, value in sorted(requested.items()) if key in stored and stored[key] != value]
    unchecked = sorted(key for key in requested if key not in stored)
    if unchecked:
        _logger.warning("%s does not record %s, so these settings could not be compared with this command's "
                        "(files of the older ILIAS tools record no settings, and files of earlier versions of "
                        "this extractor record fewer)", output, ", ".join(unchecked))
    differences = [f"{key}: {stored[key]!r} in the file, {requested[key]!r} now" for key in differing]

    index_difference = None
    if "list_sha256" not in stored:
        file_ids, list_ids = read_ids(output), [escape_id(entry.path) for entry in entries]
        index_difference = index_mismatch(file_ids, list_ids)
        if index_difference is not None:
            differing.append("index")
            differences.append(f"index: {index_difference}")
        else:
            _warn_if_ids_missing(output, file_ids, list_ids)
    records_settings = any(key in stored for key in requested)
    return OutputComparison(differing, differences, records_settings, index_difference)


def index_mismatch(file_ids: list[str], list_ids: list[str]) -> str | None:
    """Describe how `file_ids` contradict `list_ids`, or return None when they agree.

    They agree when the file's ids are the list's ids in list order, some possibly missing,
    because the rows of images that failed are left out of an output.
    """
    if not file_ids and list_ids:
        return "it has no ids"
    list_rows = {image_id: row for row, image_id in enumerate(list_ids)}
    unknown = [image_id for image_id in file_ids if canonical_id(image_id) not in list_rows]
    if unknown:
        return f"{len(unknown)} of its {len(file_ids)} ids are not in the list, such as {unknown[0]!r}"

    out_of_order = []
    last_row = -1
    for image_id in file_ids:
        row = list_rows[canonical_id(image_id)]
        if row <= last_row:
            out_of_order.append(image_id)
        last_row = max(last_row, row)
    if out_of_order:
        return (f"{len(out_of_order)} of its {len(file_ids)} ids are repeated or in another order than in the "
                f"list, such as {out_of_order[0]!r}")
    return None


def _warn_if_ids_missing(output: Path, file_ids: list[str], list_ids: list[str]) -> None:
    """Warn when a kept file lacks list ids, because a shorter earlier list leaves them out as failed images do."""
    stored = {canonical_id(image_id) for image_id in file_ids}
    missing = [image_id for image_id in list_ids if image_id not in stored]
    if missing:
        _logger.warning("%s lacks %d of the list's %d ids, such as %r. Outputs leave out images that could not be "
                        "read, but if these were not such failures, pass --overwrite true to extract them",
                        output, len(missing), len(list_ids), missing[0])


def output_mismatch_error(output: Path, comparison: OutputComparison) -> SettingsMismatchError:
    """Return the error for an existing output that records other settings or ids than this command's."""
    if comparison.records_settings:
        problem = ("exists and was extracted with other settings (" + "; ".join(comparison.differences) + ")."
                   + list_change_note(comparison.differing))
    else:
        problem = ("records no settings (a file of the older ILIAS tools), and its ids do not match the list: "
                   f"{comparison.index_difference}.")
    return SettingsMismatchError(
        f"{output} {problem} Pass --overwrite true to replace it, or choose another --hdf5_dir or --hdf5_name "
        "to keep it"
    )


def kept_output_message(output: Path, comparison: OutputComparison) -> str:
    """Return the first sentence of the log line for an existing output that is left untouched."""
    if comparison.records_settings:
        return f"{output} exists with the same settings and is left untouched"
    return (f"{output} records no settings, so only its ids were compared with the list. They match, and the "
            "file is left untouched")


def warn_if_compression_differs(output: Path, hdf5_compression: int) -> None:
    """Log a warning when the compression of `features` in a kept `output` differs from the requested one.

    Compression does not change the embeddings, so a rerun with another level is not rejected.
    """
    existing = read_compression(output)
    requested = describe_compression("gzip" if hdf5_compression > 0 else None, hdf5_compression)
    if existing is not None and existing != requested:
        _logger.warning("%s keeps its compression (%s) rather than the requested --hdf5_compression %d (%s); "
                        "pass --overwrite true to rewrite it with the requested compression",
                        output, existing, hdf5_compression, requested)
