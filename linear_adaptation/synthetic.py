"""Synthetic UnED-like embeddings for tests and benchmarks.

Each image embedding is

    x = normalise(centre[class] + nuisance_scale * U z + noise_scale * e / sqrt(dim))

- `centre[class]`: a random unit vector per class.
- `U`: an orthonormal (dim x nuisance_rank) basis shared by all classes, training and
  held-out alike, and `z ~ N(0, I)` drawn per image. This low-rank nuisance (think
  viewpoint or background) hides the class identity from raw kNN retrieval, and a
  linear layer trained on the training classes can learn to suppress it for the
  held-out classes too.
- `e ~ N(0, I)`: isotropic noise.

Class sizes are long-tailed: every class has `min_class_size` images plus a share of
the rest proportional to (rank + 1) ** -size_exponent. Classes are spread over `num_domains`
domains, with labels restarting at 0 in every domain as in UnED. The held-out set
contains other classes of the same domains, numbered after the training labels of
each domain, so no (domain, label) pair is shared.
"""
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import h5py
import numpy as np

_CHUNK_ROWS = 16384
DEFAULT_NUISANCE_RANK = 16

# Host bytes per generated row besides its embedding: the int64 labels, domains and class
# indices with their temporary copies, and the Python strings of the ids. An estimate:
# tracemalloc measured 220 bytes per row for 220,000 rows of dim 64 (numpy 2.4, Python 3.11).
_BYTES_PER_ROW = 256
# float32 arrays of one row block that exist at once in _make_split: noise, nuisance, the
# gathered centres and the temporaries of their sum. An estimate from the same measurements.
_BLOCK_ARRAYS = 7


@dataclass
class SyntheticSplit:
    """One labelled set: embeddings with list-style ids, labels and domains."""

    features: np.ndarray  # (N, dim), L2-normalised rows in the requested dtype
    labels: np.ndarray  # (N,) int64, restarting at 0 in every domain
    domains: np.ndarray  # (N,) int64
    ids: list[str]  # (N,) relative image paths as they would appear in a list file


@dataclass
class SyntheticDataset:
    """Training split and held-out split (other classes), generated together."""

    train: SyntheticSplit
    heldout: SyntheticSplit


class MemoryEstimate(NamedTuple):
    """Estimated host bytes of make_synthetic_dataset: the two embedding arrays and the working memory on top."""

    train_features: int
    heldout_features: int
    generation: int

    @property
    def total(self) -> int:
        return self.train_features + self.heldout_features + self.generation


def estimate_memory(num_train_images: int, num_train_classes: int, num_heldout_images: int,
                    num_heldout_classes: int, dim: int, dtype: str | np.dtype = "float32",
                    nuisance_rank: int = DEFAULT_NUISANCE_RANK) -> MemoryEstimate:
    """Estimate the peak host memory of make_synthetic_dataset with these sizes, without allocating it.

    The generation part counts the per-row labels and ids, the float32 class centres, the
    row-block working set and the nuisance basis with its QR factorisation.
    """
    itemsize = np.dtype(dtype).itemsize
    num_rows = num_train_images + num_heldout_images
    centres = (num_train_classes + num_heldout_classes) * dim * 4
    block = _BLOCK_ARRAYS * min(_CHUNK_ROWS, max(num_train_images, num_heldout_images)) * dim * 4
    basis = 3 * dim * max(nuisance_rank, 1) * 4  # the random draw, its QR factor and the float32 copy
    return MemoryEstimate(
        train_features=num_train_images * dim * itemsize,
        heldout_features=num_heldout_images * dim * itemsize,
        generation=num_rows * _BYTES_PER_ROW + centres + block + basis,
    )


def long_tailed_sizes(num_images: int, num_classes: int, size_exponent: float, min_class_size: int) -> np.ndarray:
    """Return class sizes (num_classes,) summing to num_images, largest first.

    Each class gets `min_class_size` images plus a share of the remaining images
    proportional to (rank + 1) ** -size_exponent. Rounding leftovers go to the largest classes.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes is {num_classes}; it must be at least 1")
    if num_images < num_classes * min_class_size:
        raise ValueError(
            f"{num_images} images cannot give {num_classes} classes {min_class_size} images each; "
            f"use at least {num_classes * min_class_size} images or fewer classes"
        )
    weights = (np.arange(1, num_classes + 1, dtype=np.float64)) ** -float(size_exponent)
    spare = num_images - num_classes * min_class_size
    extra = np.floor(weights / weights.sum() * spare).astype(np.int64)
    leftover = spare - int(extra.sum())
    extra[:leftover] += 1
    return extra + min_class_size


def _make_split(
    rng: np.random.Generator,
    class_sizes: np.ndarray,
    class_domains: np.ndarray,
    class_labels: np.ndarray,
    nuisance_basis: np.ndarray,
    nuisance_scale: float,
    noise_scale: float,
    dtype: np.dtype,
    prefix: str,
) -> SyntheticSplit:
    dim = nuisance_basis.shape[0]
    num_classes = class_sizes.shape[0]
    centres = rng.standard_normal((num_classes, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)

    class_of_row = np.repeat(np.arange(num_classes), class_sizes)  # (N,) grouped by class, as UnED lists are
    num_images = class_of_row.shape[0]
    features = np.empty((num_images, dim), dtype=dtype)

    # generated in row blocks so the float32 working set stays small for 1M-row float16 sets
    for start in range(0, num_images, _CHUNK_ROWS):
        block_classes = class_of_row[start : start + _CHUNK_ROWS]
        n = block_classes.shape[0]
        nuisance = rng.standard_normal((n, nuisance_basis.shape[1]), dtype=np.float32) @ nuisance_basis.T
        noise = rng.standard_normal((n, dim), dtype=np.float32)
        block = centres[block_classes] + nuisance_scale * nuisance + (noise_scale / np.sqrt(dim)) * noise
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        features[start : start + n] = block

    labels = class_labels[class_of_row]
    domains = class_domains[class_of_row]
    position_in_class = np.arange(num_images) - np.repeat(np.cumsum(class_sizes) - class_sizes, class_sizes)
    ids = [
        f"{prefix}/domain{d}/class{l:06d}/{p:05d}.jpg"
        for d, l, p in zip(domains.tolist(), labels.tolist(), position_in_class.tolist())
    ]
    return SyntheticSplit(features=features, labels=labels.astype(np.int64), domains=domains.astype(np.int64), ids=ids)


def _assign_domains(num_classes: int, num_domains: int, first_label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Spread classes round-robin over domains and number them within each domain from first_label."""
    domains = np.arange(num_classes) % num_domains
    labels = np.empty(num_classes, dtype=np.int64)
    for domain in range(num_domains):
        in_domain = np.flatnonzero(domains == domain)
        labels[in_domain] = first_label[domain] + np.arange(in_domain.shape[0])
    return domains.astype(np.int64), labels


def make_synthetic_dataset(
    num_train_images: int = 20000,
    num_train_classes: int = 2000,
    num_heldout_images: int = 2000,
    num_heldout_classes: int = 200,
    dim: int = 768,
    num_domains: int = 4,
    nuisance_rank: int = DEFAULT_NUISANCE_RANK,
    nuisance_scale: float = 0.3,
    noise_scale: float = 2.0,
    size_exponent: float = 0.5,
    min_class_size: int = 2,
    dtype: str | np.dtype = "float32",
    seed: int = 0,
) -> SyntheticDataset:
    """Generate a training split and a held-out split of other classes.

    Args:
        num_train_images: Rows of the training split.
        num_train_classes: Distinct (domain, label) classes of the training split.
        num_heldout_images: Rows of the held-out split.
        num_heldout_classes: Classes of the held-out split, none shared with training.
        dim: Embedding dimension.
        num_domains: Domains the classes are spread over (round-robin).
        nuisance_rank: Rank of the shared nuisance subspace; 0 disables it.
        nuisance_scale: Standard deviation of the nuisance component along each basis
            vector, relative to the unit-norm class centre.
        noise_scale: Norm (in expectation) of the isotropic noise, relative to the centre.
        size_exponent: Zipf exponent of the class sizes; 0 gives equal sizes. With the
            default 0.5, 100k images in 10k classes range from 6 to 405 per class.
        min_class_size: Minimum images per class; 2 or more gives every image a
            positive when it queries the rest of its split.
        dtype: Storage dtype of the features, e.g. "float32" or "float16".
        seed: Seed of the generator; the same arguments and seed give the same arrays.

    Returns:
        The two splits, rows grouped by class with the largest classes first.
    """
    if nuisance_rank > dim:
        raise ValueError(f"nuisance_rank {nuisance_rank} exceeds dim {dim}")
    dtype = np.dtype(dtype)
    rng = np.random.default_rng(seed)

    basis = rng.standard_normal((dim, max(nuisance_rank, 1)), dtype=np.float32)
    basis, _ = np.linalg.qr(basis)
    if nuisance_rank == 0:
        basis = np.zeros((dim, 1), dtype=np.float32)
    basis = basis.astype(np.float32)

    train_domains, train_labels = _assign_domains(num_train_classes, num_domains, np.zeros(num_domains, np.int64))
    first_heldout_label = np.array(
        [int(train_labels[train_domains == d].max()) + 1 if (train_domains == d).any() else 0 for d in range(num_domains)]
    )
    heldout_domains, heldout_labels = _assign_domains(num_heldout_classes, num_domains, first_heldout_label)

    common = dict(nuisance_basis=basis, nuisance_scale=nuisance_scale, noise_scale=noise_scale, dtype=dtype)
    train = _make_split(
        rng,
        long_tailed_sizes(num_train_images, num_train_classes, size_exponent, min_class_size),
        train_domains,
        train_labels,
        prefix="train",
        **common,
    )
    heldout = _make_split(
        rng,
        long_tailed_sizes(num_heldout_images, num_heldout_classes, size_exponent, min_class_size),
        heldout_domains,
        heldout_labels,
        prefix="heldout",
        **common,
    )
    return SyntheticDataset(train=train, heldout=heldout)


def write_split(split: SyntheticSplit, hdf5_path: str | os.PathLike, list_path: str | os.PathLike) -> None:
    """Write a split as an ILIAS-layout HDF5 file (`features`, `index`) and a `path,label,domain` list."""
    with h5py.File(hdf5_path, "w") as f:
        f.create_dataset("features", data=split.features)
        f.create_dataset("index", data=np.array(split.ids, dtype=object), dtype=h5py.string_dtype("ascii"))
    lines = [f"{i},{l},{d}\n" for i, l, d in zip(split.ids, split.labels.tolist(), split.domains.tolist())]
    Path(list_path).write_text("".join(lines), encoding="utf-8")
