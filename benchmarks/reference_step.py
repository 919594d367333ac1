"""The published training step written with plain autograd, as a yardstick for the trainer.

This is the recipe the ILIAS layers were trained with, in its most direct form. It keeps a
float32 copy of the data, normalises the class weights into a new (C, D) tensor every step,
and uses dense cosine logits, torch's cross-entropy and Adam's default implementation. It is
slow on purpose, because the trainer computes the same function with a fused loss and fused
Adam.

Batch order:
- "sampler": the older tool's order, torch's RandomSampler drawn from the global generator
  inside BatchSampler with drop_last, so a seed gives that tool's batches.
- "trainer": the order train_linear_adapter draws (a torch.randperm per epoch from a
  generator seeded with `seed`), so the two can be compared step for step.
"""
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import BatchSampler, RandomSampler

from linear_adaptation.lin_adapt import LinearAdapter
from linear_adaptation.trainer import LabelledEmbeddings, class_index_first_appearance

BATCH_ORDERS = ("sampler", "trainer")


def _batches(order: str, num_images: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Yield one epoch of full batches of row positions in the given order."""
    if order == "sampler":
        for batch in BatchSampler(RandomSampler(range(num_images)), batch_size=batch_size, drop_last=True):
            yield torch.as_tensor(batch)
    else:
        perm = torch.randperm(num_images, generator=generator)
        for start in range(0, num_images - batch_size + 1, batch_size):
            yield perm[start : start + batch_size]


def train_reference(
    train: LabelledEmbeddings,
    *,
    out_dim: int = 512,
    num_epochs: int = 5,
    batch_size: int = 128,
    lr: float = 1e-3,
    weight_decay: float = 1e-6,
    scale: float = 16.0,
    seed: int = 0,
    order: str = "sampler",
) -> dict[str, torch.Tensor]:
    """Train the layer with the published step on the CPU and return its state dict (layer.weight, layer.bias)."""
    if order not in BATCH_ORDERS:
        raise ValueError(f"batch order {order!r} is not one of {', '.join(BATCH_ORDERS)}")
    features = torch.from_numpy(train.features[train.rows].astype(np.float32))  # (M, D) in list order
    classes, class_pairs = class_index_first_appearance(train.labels, train.domains)
    targets = torch.from_numpy(classes)

    torch.manual_seed(seed)
    adapter = LinearAdapter(features.shape[1], out_dim)
    classifier = nn.Linear(out_dim, class_pairs.shape[0], bias=False)
    params = list(adapter.parameters()) + list(classifier.parameters())
    optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, foreach=False)
    generator = torch.Generator().manual_seed(seed)

    for _ in range(num_epochs):
        for batch in _batches(order, features.shape[0], batch_size, generator):
            embedded = adapter(features[batch])  # L2-normalised by the adapter
            cosine = embedded @ F.normalize(classifier.weight, dim=1).T
            loss = F.cross_entropy(scale * cosine, targets[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return {k: v.detach().clone() for k, v in adapter.state_dict().items()}
