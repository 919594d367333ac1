"""The linear adaptation layer: an `nn.Linear` whose output is L2-normalised.

Its state dict has exactly the keys `layer.weight` (out x in) and `layer.bias` (out),
the layout of the layers published with ILIAS, so either side can load the other's files.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class LinearAdapter(nn.Module):
    """Linear map from backbone embeddings to adapted, L2-normalised embeddings."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.layer = nn.Linear(in_features, out_features)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.layer.weight)
        nn.init.zeros_(self.layer.bias)

    @property
    def in_features(self) -> int:
        return self.layer.in_features

    @property
    def out_features(self) -> int:
        return self.layer.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 1:
            x = x.unsqueeze(0)
        return F.normalize(self.layer(x), p=2, dim=-1)
