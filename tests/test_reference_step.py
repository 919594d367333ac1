"""The trainer's fused step against the published step written with plain autograd."""
import numpy as np
import pytest
import torch

from benchmarks.reference_step import train_reference
from linear_adaptation.synthetic import make_synthetic_dataset
from linear_adaptation.trainer import LabelledEmbeddings, train_linear_adapter

RECIPE = dict(out_dim=32, num_epochs=3, batch_size=50, lr=3e-3, seed=4)


@pytest.fixture(scope="module")
def train_set():
    data = make_synthetic_dataset(
        num_train_images=1000, num_train_classes=100, num_heldout_images=100, num_heldout_classes=10, dim=48, seed=3
    ).train
    # rows stored in a shuffled order, so the list-order gather is part of what is compared
    order = np.random.default_rng(0).permutation(len(data.ids))
    return LabelledEmbeddings(data.features, order, data.labels[order], data.domains[order])


def test_trainer_matches_plain_autograd_step(train_set):
    torch.manual_seed(123)  # neither run may depend on the global state before it
    fused = train_linear_adapter(train_set, show_progress=False, **RECIPE).state_dict
    plain = train_reference(train_set, order="trainer", **RECIPE)

    assert set(fused) == set(plain) == {"layer.weight", "layer.bias"}
    start = train_reference(train_set, order="trainer", **{**RECIPE, "num_epochs": 0})
    moved = (plain["layer.weight"] - start["layer.weight"]).abs().max().item()
    assert moved > 1e-2  # training changed the weights by far more than the tolerance below
    for key in plain:
        torch.testing.assert_close(fused[key], plain[key], rtol=0, atol=1e-5)


def test_sampler_order_seeded_and_distinct(train_set):
    first = train_reference(train_set, order="sampler", **RECIPE)
    again = train_reference(train_set, order="sampler", **RECIPE)
    trainer_order = train_reference(train_set, order="trainer", **RECIPE)

    torch.testing.assert_close(first["layer.weight"], again["layer.weight"], rtol=0, atol=0)
    assert not torch.allclose(first["layer.weight"], trainer_order["layer.weight"], atol=1e-3)


def test_unknown_batch_order_rejected(train_set):
    with pytest.raises(ValueError, match="'shuffled' is not one of sampler, trainer"):
        train_reference(train_set, order="shuffled")
