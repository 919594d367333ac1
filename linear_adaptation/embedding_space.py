"""The backbone and preprocessing behind an HDF5 file's embeddings, read from extract.py's attributes.

Two backbones, or one backbone with other weights or preprocessing, can give embeddings of
the same dimension that lie in different spaces. A kNN search across such files, or a layer
trained on one and applied to the other, then gives meaningless scores without any error,
so the trainer and the evaluator warn when the recorded settings differ. Files of the older
ILIAS tools carry no attributes, and only the settings that both files record are compared.
"""
import json
import logging
import os

import h5py

from feature_extraction.hdf5_output import plain_attribute

_logger = logging.getLogger(__name__)

# the extraction settings that define the embedding space, unlike the list, precision, window
# and library versions
SPACE_ATTRIBUTES = (
    "framework", "model", "pretrained", "pretrained_cfg", "checkpoint_sha256",
    "resolution", "transforms", "min_size", "pooling", "multiscale",
)

# files whose differences are logged one by one
MAX_LOGGED_DIFFERENCES = 3


def read_embedding_space(path: str | os.PathLike) -> dict:
    """Return the SPACE_ATTRIBUTES that the HDF5 file records, as plain Python values.

    Returns {} for a file without them and for one that cannot be read, which the loaders
    report on their own.
    """
    try:
        with h5py.File(path, "r") as f:
            space = {key: plain_attribute(f.attrs[key]) for key in SPACE_ATTRIBUTES if key in f.attrs}
    except (OSError, ValueError):
        return {}
    # extract.py stores the model name as typed, so a tag ("model.tag") is compared through pretrained_cfg.
    # Files of its first version lack pretrained_cfg, and there the typed "model.tag" is timm's name for it.
    if "model" in space:
        model, dot, tag = str(space["model"]).partition(".")
        space["model"] = model
        if tag and "pretrained_cfg" not in space:
            space["pretrained_cfg"] = f"{model}{dot}{tag}"
    return space


def read_layer_space(record_path: str | os.PathLike) -> dict:
    """Return the embedding space recorded in a trainer's JSON record, or {} when it records none."""
    try:
        with open(record_path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError, RecursionError):  # RecursionError: JSON nested too deeply
        return {}
    space = record.get("embedding_space") if isinstance(record, dict) else None
    return space if isinstance(space, dict) else {}


def space_differences(first: dict, second: dict) -> list[str]:
    """Return "KEY A against B" for each setting that both spaces record with different values."""
    return [
        f"{key} {first[key]!r} against {second[key]!r}"
        for key in SPACE_ATTRIBUTES
        if key in first and key in second and first[key] != second[key]
    ]


def warn_if_spaces_differ(reference: tuple[str, dict], others: list[tuple[str, dict]]) -> int:
    """Log a warning for each of `others` whose space differs from `reference`'s; return how many differ.

    Each item is (a description of the file for the message, its space). After
    MAX_LOGGED_DIFFERENCES files, one more line gives the count of the rest, since a database
    can have thousands of shards.
    """
    reference_name, reference_space = reference
    differing = [(name, space_differences(reference_space, space)) for name, space in others]
    differing = [(name, differences) for name, differences in differing if differences]
    for name, differences in differing[:MAX_LOGGED_DIFFERENCES]:
        _logger.warning(
            "%s and %s were extracted with different settings (%s), so their embeddings may lie in different "
            "spaces and the scores may be meaningless; extract both with the same backbone and settings unless "
            "this is intended", reference_name, name, "; ".join(differences),
        )
    if len(differing) > MAX_LOGGED_DIFFERENCES:
        _logger.warning("%d more files differ from %s in their settings", len(differing) - MAX_LOGGED_DIFFERENCES,
                        reference_name)
    return len(differing)
