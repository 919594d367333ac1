import tracemalloc

import numpy as np
import pytest

from feature_extraction.image_list import read_image_list
from linear_adaptation.features_io import join_by_id, load_hdf5_features
from linear_adaptation.knn import knn_search
from linear_adaptation.metrics import labelled_set_metrics
from linear_adaptation.synthetic import estimate_memory, long_tailed_sizes, make_synthetic_dataset, write_split

SMALL = dict(
    num_train_images=600, num_train_classes=60, num_heldout_images=200, num_heldout_classes=20, dim=48, nuisance_rank=4
)


def raw_map(split):
    _, ranked = knn_search(split.features.astype(np.float32), [split.features.astype(np.float32)], k=100, exclude_self=True)
    return labelled_set_metrics(ranked, split.labels, split.domains, 100)["map"]


def test_long_tailed_sizes_sum_and_order():
    sizes = long_tailed_sizes(1000, 50, size_exponent=1.0, min_class_size=3)
    assert sizes.sum() == 1000
    assert sizes.min() >= 3
    assert sizes[-1] == sizes.min()
    assert (np.diff(sizes) <= 0).all()
    assert sizes[0] > 10 * sizes[-1]


def test_long_tailed_sizes_reject_too_few_images():
    with pytest.raises(ValueError, match="at least 100 images"):
        long_tailed_sizes(99, 50, size_exponent=1.0, min_class_size=2)


def test_synthetic_shapes_and_normalisation():
    data = make_synthetic_dataset(**SMALL, dtype="float16")
    assert data.train.features.shape == (600, 48)
    assert data.heldout.features.shape == (200, 48)
    assert data.train.features.dtype == np.float16
    norms = np.linalg.norm(data.train.features.astype(np.float32), axis=1)
    assert np.allclose(norms, 1.0, atol=2e-3)
    assert len(data.train.ids) == 600
    assert len(set(data.train.ids) | set(data.heldout.ids)) == 800


def test_synthetic_classes_disjoint_and_domain_labels():
    data = make_synthetic_dataset(**SMALL, num_domains=3)
    train_pairs = set(zip(data.train.domains.tolist(), data.train.labels.tolist()))
    heldout_pairs = set(zip(data.heldout.domains.tolist(), data.heldout.labels.tolist()))
    assert len(train_pairs) == 60
    assert len(heldout_pairs) == 20
    assert not train_pairs & heldout_pairs
    for domain in range(3):
        labels = sorted({label for d, label in train_pairs if d == domain})
        assert labels == list(range(len(labels)))


def test_synthetic_same_seed_same_data():
    first = make_synthetic_dataset(**SMALL, seed=5)
    second = make_synthetic_dataset(**SMALL, seed=5)
    other = make_synthetic_dataset(**SMALL, seed=6)
    assert np.array_equal(first.train.features, second.train.features)
    assert np.array_equal(first.heldout.labels, second.heldout.labels)
    assert not np.array_equal(first.train.features, other.train.features)


def test_nuisance_lowers_raw_retrieval():
    clean = make_synthetic_dataset(**SMALL, nuisance_scale=0.0, noise_scale=0.5)
    nuisance = make_synthetic_dataset(**SMALL, nuisance_scale=0.8, noise_scale=0.5)
    assert raw_map(clean.heldout) > raw_map(nuisance.heldout) + 20


def test_write_split_round_trip(tmp_path):
    data = make_synthetic_dataset(**SMALL)
    write_split(data.heldout, tmp_path / "h.hdf5", tmp_path / "h.txt")

    features, ids = load_hdf5_features(tmp_path / "h.hdf5")
    entries = read_image_list(tmp_path / "h.txt", require_labels=True)
    joined = join_by_id(ids, entries)

    assert np.array_equal(features, data.heldout.features)
    assert np.array_equal(joined.labels, data.heldout.labels)
    assert np.array_equal(joined.domains, data.heldout.domains)
    assert np.array_equal(joined.rows, np.arange(200))


@pytest.mark.parametrize("sizes", [
    dict(num_train_images=20000, num_train_classes=2000, num_heldout_images=2000, num_heldout_classes=200, dim=64),
    dict(num_train_images=5000, num_train_classes=50, num_heldout_images=500, num_heldout_classes=10, dim=512,
         dtype="float16"),
])
def test_memory_estimate_covers_peak(sizes):
    # numpy reports its allocations to tracemalloc, so the traced peak covers the arrays and the id strings
    tracemalloc.start()
    try:
        make_synthetic_dataset(**sizes)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    estimate = estimate_memory(**sizes)

    assert estimate.total >= peak
    assert estimate.total < 3 * peak  # an estimate, but not so loose that it rejects sizes that fit
    assert estimate.train_features == sizes["num_train_images"] * sizes["dim"] * np.dtype(sizes.get("dtype", "float32")).itemsize
