"""Input-size-dependent positional embeddings for open_clip image towers.

open_clip's ViT and its ResNet attention pool add a learned embedding for a fixed grid
(7x7 for RN50 at 224 px), so any other input size fails. Here the grid part of that
embedding is resized bicubically to the grid of each incoming input, as the ILIAS
extractor does for RN50's attention pool. The class position is kept unchanged.
"""
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def resize_positional_embedding(
    embedding: torch.Tensor, source_grid: tuple[int, int], target_grid: tuple[int, int]
) -> torch.Tensor:
    """Resize a (1 + h*w, C) embedding with one leading class position to another grid."""
    if tuple(source_grid) == tuple(target_grid):
        return embedding
    class_position, grid = embedding[:1], embedding[1:]
    channels = grid.shape[-1]
    grid = grid.reshape(1, source_grid[0], source_grid[1], channels).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=target_grid, mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(target_grid[0] * target_grid[1], channels)
    return torch.cat([class_position, grid.to(embedding.dtype)], dim=0)


class _GridHook:
    """Forward pre-hook that sets `positional_embedding` to the grid of the incoming input."""

    def __init__(self, source_grid: tuple[int, int], grid_of_input: Callable[[torch.Tensor], tuple[int, int]]):
        self.source_grid = source_grid
        self.grid_of_input = grid_of_input
        self.cache: dict[tuple, torch.Tensor] = {}

    def __call__(self, module: nn.Module, args: tuple) -> None:
        source = module.positional_embedding_source
        grid = self.grid_of_input(args[0])
        key = (grid, source.device, source.dtype)
        if key not in self.cache:
            self.cache[key] = resize_positional_embedding(source, self.source_grid, grid)
        # a plain attribute shadows the removed parameter for open_clip's forward
        module.__dict__["positional_embedding"] = self.cache[key]


def _make_dynamic(module: nn.Module, source_grid: tuple[int, int], grid_of_input: Callable) -> None:
    source = module._parameters.pop("positional_embedding").detach()
    module.register_buffer("positional_embedding_source", source, persistent=False)
    module.__dict__["positional_embedding"] = source
    module.register_forward_pre_hook(_GridHook(source_grid, grid_of_input))


def enable_dynamic_input_size(visual: nn.Module) -> bool:
    """Let an open_clip image tower take any input size; return False for unsupported towers.

    Call after loading weights, because the positional embedding leaves the state dict.
    """
    from open_clip.modified_resnet import ModifiedResNet
    from open_clip.transformer import VisionTransformer

    if isinstance(visual, ModifiedResNet):
        pool = visual.attnpool
        side = int(round((pool.positional_embedding.shape[0] - 1) ** 0.5))
        _make_dynamic(pool, (side, side), lambda features: tuple(features.shape[-2:]))
        return True

    if isinstance(visual, VisionTransformer):
        patch_height, patch_width = visual.patch_size
        _make_dynamic(
            visual,
            tuple(visual.grid_size),
            lambda images: (images.shape[-2] // patch_height, images.shape[-1] // patch_width),
        )
        return True
    return False
