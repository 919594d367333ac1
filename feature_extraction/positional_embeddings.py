"""Input-size-dependent positional embeddings for open_clip image towers.

open_clip's ViT and its ResNet attention pool add a learned embedding for a fixed grid
(7x7 for RN50 at 224 px), so any other input size fails. Here the grid part of that
embedding is resized bicubically to the grid of each incoming input, as the ILIAS
extractor does for RN50's attention pool. The class position is kept unchanged.

Towers built on timm (open_clip's TimmModel) get a copy of their timm trunk built with
`dynamic_img_size=True`, which resamples the positional embedding (or the RoPE grid) to
each input in timm's own way. timm CNNs take any size as they are.
"""
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

_logger = logging.getLogger(__name__)


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


def _takes_any_size(trunk: nn.Module) -> bool:
    # timm's default config sets fixed_input_size for architectures with a fixed token grid (ViTs,
    # Swin), and a model built to resample that grid has dynamic_img_size set
    if getattr(trunk, "dynamic_img_size", False):
        return True
    pretrained_cfg = getattr(trunk, "pretrained_cfg", None) or {}
    return not pretrained_cfg.get("fixed_input_size", False)


def _fill_missing_buffers(copy: nn.Module, source: nn.Module) -> bool:
    """Set each buffer of `copy` still on the meta device to `source`'s buffer of the same name and shape.

    Returns False when `source` has no such buffer for one of them.
    """
    source_buffers = dict(source.named_buffers())
    for name, buffer in list(copy.named_buffers()):
        if not buffer.is_meta:
            continue
        replacement = source_buffers.get(name)
        if replacement is None or replacement.shape != buffer.shape:
            return False
        module_name, _, buffer_name = name.rpartition(".")
        copy.get_submodule(module_name)._buffers[buffer_name] = replacement
    return True


def dynamic_img_size_copy(trunk: nn.Module) -> nn.Module | None:
    """Return a copy of a timm model, built with `dynamic_img_size=True`, that uses the model's tensors.

    Returns None when the architecture has no such option, or when this timm release cannot
    list the model's construction arguments (`timm.models.get_model_args`, present in timm
    1.0.31). The copy may share tensors with `trunk`, so use it in place of `trunk`.
    """
    import timm
    import timm.models

    get_model_args = getattr(timm.models, "get_model_args", None)
    architecture = (getattr(trunk, "pretrained_cfg", None) or {}).get("architecture")
    if get_model_args is None or not architecture:
        return None
    # num_classes, global_pool and img_size as the trunk has them now, without the drop rates
    kwargs = {**get_model_args(trunk), "dynamic_img_size": True}

    try:
        # built without memory or initialisation, because the tensors come from `trunk`
        with torch.device("meta"):
            copy = timm.create_model(architecture, pretrained=False, **kwargs)
    except TypeError as e:
        if "dynamic_img_size" not in str(e):
            raise
        return None
    # assign=True takes the trunk's tensors in place of the meta ones. Buffers left out of the
    # state dict (index tables, RoPE frequencies) come from the trunk by name.
    copy.load_state_dict(trunk.state_dict(), strict=True, assign=True)
    if not _fill_missing_buffers(copy, trunk):
        _logger.info("building %s with dynamic_img_size=True again with initialised tensors, because the "
                     "trunk lacks some of its buffers", architecture)
        copy = timm.create_model(architecture, pretrained=False, **kwargs)
        copy.load_state_dict(trunk.state_dict(), strict=True)
    return copy.train(trunk.training)


def enable_dynamic_input_size(visual: nn.Module) -> bool:
    """Let an open_clip image tower take any input size. Returns False where it keeps a fixed size.

    Call after loading weights, because the positional embedding of open_clip's own ViT
    and ResNet leaves the state dict, and a timm trunk is replaced by a copy.
    """
    from open_clip.modified_resnet import ModifiedResNet
    from open_clip.timm_model import TimmModel
    from open_clip.transformer import VisionTransformer

    if isinstance(visual, TimmModel):
        if _takes_any_size(visual.trunk):
            return True
        copy = dynamic_img_size_copy(visual.trunk)
        if copy is None:
            return False
        visual.trunk = copy
        return True

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
