"""Loading the labelled embeddings for training and validation, and holding out classes.

Embeddings are joined to list lines by id, never by position, so HDF5 rows may come in
any order. Every check runs before training starts, so bad input fails before any
output is written.
"""
import logging
import os
from dataclasses import dataclass

import numpy as np

from feature_extraction.image_list import read_image_list
from linear_adaptation.embedding_space import read_embedding_space, warn_if_spaces_differ
from linear_adaptation.features_io import (
    DataError,
    JoinReport,
    check_finite_rows,
    join_by_id,
    list_remedy,
    load_hdf5_features,
)
from linear_adaptation.trainer import LabelledEmbeddings, class_index_first_appearance

_logger = logging.getLogger(__name__)


def load_labelled_embeddings(
    features_path: str | os.PathLike, list_path: str | os.PathLike, allow_missing: bool, name: str
) -> tuple[LabelledEmbeddings, JoinReport]:
    """Read a `path,label,domain` list and an HDF5 embedding file and pair them by id.

    The list is parsed first, so a malformed line is reported (with its line number)
    before a large HDF5 file is read.

    Raises:
        ImageListError: a malformed list line, duplicate path or empty list.
        DataError: an unreadable HDF5 file, NaN/Inf in a row the list uses, or ids
            that do not match one-to-one (unless `allow_missing`).
    """
    entries = read_image_list(list_path, require_labels=True)
    features, ids = load_hdf5_features(features_path, check_finite=False)
    joined = join_by_id(ids, entries, allow_missing=allow_missing, source=f"{name} embeddings {str(features_path)!r}")
    check_finite_rows(features, joined.rows, ids, features_path, list_remedy(allow_missing))
    data = LabelledEmbeddings(features=features, rows=joined.rows, labels=joined.labels, domains=joined.domains)
    _logger.info(
        "%s set: %d images of %d classes joined by id from %s and %s (%d HDF5 rows)",
        name, data.num_images, count_classes(data), list_path, features_path, features.shape[0],
    )
    return data, joined.report


def count_classes(data: LabelledEmbeddings) -> int:
    """Return the number of distinct (domain, label) pairs."""
    return int(np.unique(np.stack([data.domains, data.labels], axis=1), axis=0).shape[0])


def check_training_set(train: LabelledEmbeddings, batch_size: int) -> int:
    """Raise DataError unless the set has 2+ classes and at least one full batch; return the class count."""
    num_classes = count_classes(train)
    if num_classes < 2:
        raise DataError(
            f"the training set has {num_classes} (domain, label) class; the classification loss needs at "
            "least 2, so check the labels of the list"
        )
    if train.num_images < batch_size:
        raise DataError(
            f"the training set has {train.num_images} images, fewer than one batch of {batch_size}; "
            "lower --batch_size"
        )
    return num_classes


def check_validation_set(train: LabelledEmbeddings, validation: LabelledEmbeddings, k: int) -> None:
    """Raise DataError for a dimension mismatch or a set without positives; warn about shared classes."""
    if validation.dim != train.dim:
        raise DataError(
            f"validation embeddings have dimension {validation.dim} but training embeddings {train.dim}; "
            "extract both with the same backbone"
        )
    class_sizes = np.unique(np.stack([validation.domains, validation.labels], axis=1), axis=0, return_counts=True)[1]
    if validation.num_images < 2 or class_sizes.max() < 2:
        raise DataError(
            f"the validation set ({validation.num_images} images) has no class with 2 or more images, "
            "so no query has a positive; use a larger validation set"
        )

    train_pairs = {tuple(p) for p in np.stack([train.domains, train.labels], axis=1).tolist()}
    val_pairs = {tuple(p) for p in np.stack([validation.domains, validation.labels], axis=1).tolist()}
    shared = train_pairs & val_pairs
    if shared:
        _logger.warning(
            "%d of the %d validation classes also occur in the training set (e.g. (domain, label) %s); "
            "held-out scores will overstate generalisation to unseen instances",
            len(shared), len(val_pairs), sorted(shared)[0],
        )
    if validation.num_images <= k:
        _logger.info("the validation set has %d images, so each query ranks all %d others", validation.num_images,
                     validation.num_images - 1)


def split_heldout_classes(
    data: LabelledEmbeddings, fraction: float, seed: int
) -> tuple[LabelledEmbeddings, LabelledEmbeddings]:
    """Hold out a random `fraction` of the (domain, label) classes for validation.

    The classes are drawn with NumPy's generator seeded by `seed`; at least one class
    is held out and at least two stay for training. Both parts share the feature matrix.

    Returns:
        The training part and the held-out part.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"held-out fraction {fraction} must lie strictly between 0 and 1")
    classes, pairs = class_index_first_appearance(data.labels, data.domains)
    num_classes = pairs.shape[0]
    if num_classes < 3:
        raise DataError(
            f"--val_fraction needs at least 3 classes (2 to train on, 1 to hold out) but the list has {num_classes}; "
            "pass --val_features_path/--val_info_path instead"
        )

    num_heldout = min(max(int(round(fraction * num_classes)), 1), num_classes - 2)
    heldout_classes = np.random.default_rng(seed).choice(num_classes, size=num_heldout, replace=False)
    is_heldout = np.isin(classes, heldout_classes)
    train, heldout = data.subset(~is_heldout), data.subset(is_heldout)
    _logger.info(
        "--val_fraction %g: holding out %d of %d classes (%d images); training on %d classes (%d images)",
        fraction, num_heldout, num_classes, heldout.num_images, num_classes - num_heldout, train.num_images,
    )
    return train, heldout


@dataclass
class TrainingInputs:
    """Checked training and validation sets with their join reports."""

    train: LabelledEmbeddings
    validation: LabelledEmbeddings | None
    join_reports: dict[str, JoinReport | None]


def load_training_inputs(
    *,
    features_path: str | os.PathLike,
    list_path: str | os.PathLike,
    val_features_path: str | os.PathLike | None,
    val_list_path: str | os.PathLike | None,
    val_fraction: float | None,
    allow_missing: bool,
    seed: int,
    batch_size: int,
    val_k: int,
) -> TrainingInputs:
    """Load, join and check the training set and the optional validation set.

    Validation comes from its own files when `val_features_path` is set, else from
    `val_fraction` of the training classes, else there is none.

    Raises:
        ImageListError, DataError: see load_labelled_embeddings, check_training_set and
            check_validation_set.
    """
    train, train_report = load_labelled_embeddings(features_path, list_path, allow_missing=allow_missing, name="training")
    validation, val_report = None, None
    if val_features_path is not None:
        validation, val_report = load_labelled_embeddings(
            val_features_path, val_list_path, allow_missing=allow_missing, name="validation"
        )
        if validation.dim != train.dim:
            raise DataError(
                f"validation embeddings have dimension {validation.dim} but training embeddings {train.dim} "
                f"(validation file {str(val_features_path)!r}, training file {str(features_path)!r}); "
                "extract both with the same backbone"
            )
        warn_if_spaces_differ(
            (f"the training file {str(features_path)!r}", read_embedding_space(features_path)),
            [(f"the validation file {str(val_features_path)!r}", read_embedding_space(val_features_path))],
        )
    elif val_fraction is not None:
        train, validation = split_heldout_classes(train, fraction=val_fraction, seed=seed)

    check_training_set(train, batch_size=batch_size)
    if validation is not None:
        check_validation_set(train, validation, k=val_k)
    return TrainingInputs(train=train, validation=validation, join_reports={"training": train_report, "validation": val_report})
