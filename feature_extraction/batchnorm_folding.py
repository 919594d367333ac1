"""Fold eval-mode BatchNorm layers into the convolutions that feed them.

In eval mode, BatchNorm is a per-channel affine map y = s * x + t with
s = gamma / sqrt(running_var + eps) and t = beta - s * running_mean. Its input may be the
output of a convolution that nothing else reads. Then scaling the convolution's output
channels by s and setting its bias to s * b + t gives the same function, without the
BatchNorm pass over the activations.

Pairs are found by running the model once on an example input with hooks: a BatchNorm
whose input tensor is the very tensor the latest convolution returned. The folded model is then
checked against the original on that input, and the original is kept if they disagree,
for example when another layer also reads the convolution's output.
"""
import copy
import logging

import torch
import torch.nn as nn
from timm.layers import BatchNormAct2d, Conv2dSame

from feature_extraction.interrupts import raise_wrapped_interrupt

_logger = logging.getLogger(__name__)

# Exact types only: a subclass may change its weights in forward (timm's StdConv2d
# standardises them) or apply more than the affine map.
FOLDABLE_CONVS = (nn.Conv2d, Conv2dSame)
FOLDABLE_NORMS = (nn.BatchNorm2d, BatchNormAct2d)

# Largest accepted ||folded - original|| / ||original|| per output row on the example. Correct
# folds measured about 1e-6 in float32, and rounding to float16 for storage alone is about 3e-4.
MAX_RELATIVE_ERROR = 5e-5


class AfterFoldedNorm(nn.Module):
    """Remainder of a timm BatchNormAct2d after its affine map is folded: dropout, then the activation."""

    def __init__(self, drop: nn.Module, act: nn.Module):
        super().__init__()
        self.drop = drop
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(x))


def _is_foldable_norm(module: nn.Module) -> bool:
    return (
        type(module) in FOLDABLE_NORMS
        and not module.training
        and module.running_mean is not None
        and module.running_var is not None
    )


def find_conv_norm_pairs(module: nn.Module, example: torch.Tensor) -> list[tuple[str, str]]:
    """Return (convolution name, BatchNorm name) pairs where the BatchNorm reads the convolution's output directly.

    Runs `module` once on `example`, unless it has no foldable BatchNorm. A pair is only
    found when no other convolution runs between the two. Modules called more than once
    are left out, because folding them would change every call.
    """
    return _trace_pairs(module, example)[0]


def _trace_pairs(module: nn.Module, example: torch.Tensor) -> tuple[list[tuple[str, str]], torch.Tensor | None]:
    """Return find_conv_norm_pairs' pairs and the output of the traced forward pass (None when there was none)."""
    convs = {m: n for n, m in module.named_modules() if type(m) in FOLDABLE_CONVS}
    norms = {m: n for n, m in module.named_modules() if _is_foldable_norm(m)}
    if not norms:
        return [], None

    calls: dict[nn.Module, int] = {}
    # only the latest convolution output is kept, so the trace keeps one activation alive at most
    latest: list[tuple[torch.Tensor, str]] = []
    pairs: list[tuple[str, str]] = []

    def after_conv(conv, inputs, output):
        calls[conv] = calls.get(conv, 0) + 1
        latest[:] = [(output, convs[conv])]

    def before_norm(norm, inputs):
        calls[norm] = calls.get(norm, 0) + 1
        if latest and latest[0][0] is inputs[0]:
            pairs.append((latest[0][1], norms[norm]))

    handles = [m.register_forward_hook(after_conv) for m in convs]
    handles += [m.register_forward_pre_hook(before_norm) for m in norms]
    try:
        with torch.inference_mode():
            output = module(example)
    finally:
        for handle in handles:
            handle.remove()

    by_name = {**{n: m for m, n in convs.items()}, **{n: m for m, n in norms.items()}}
    return [(c, b) for c, b in pairs if calls[by_name[c]] == 1 and calls[by_name[b]] == 1], output


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


@torch.no_grad()
def _fold_pair(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> None:
    scale = torch.ones_like(norm.running_var) if norm.weight is None else norm.weight.clone()
    scale /= torch.sqrt(norm.running_var + norm.eps)
    shift = -norm.running_mean * scale
    if norm.bias is not None:
        shift += norm.bias
    conv_bias = conv.bias if conv.bias is not None else torch.zeros_like(shift)

    conv.weight.mul_(scale.to(conv.weight.dtype).view(-1, 1, 1, 1))
    new_bias = (conv_bias * scale + shift).to(conv.weight.dtype)
    if conv.bias is None:
        conv.bias = nn.Parameter(new_bias, requires_grad=False)
    else:
        conv.bias.copy_(new_bias)


def fold_batchnorm(module: nn.Module, example: torch.Tensor) -> tuple[nn.Module, int]:
    """Return a copy of `module` (in eval mode) with conv -> BatchNorm pairs folded, and the number folded.

    `module` itself is returned, unchanged, when it has no foldable pair or when the folded
    copy's output on `example` differs from the original's by more than MAX_RELATIVE_ERROR.
    """
    pairs, original_output = _trace_pairs(module, example)
    if not pairs:
        return module, 0

    folded = copy.deepcopy(module)
    for conv_name, norm_name in pairs:
        norm = folded.get_submodule(norm_name)
        _fold_pair(folded.get_submodule(conv_name), norm)
        rest = AfterFoldedNorm(norm.drop, norm.act) if isinstance(norm, BatchNormAct2d) else nn.Identity()
        _replace(folded, norm_name, rest)

    with torch.inference_mode():
        candidate = folded(example).double().flatten(1)
    reference = original_output.double().flatten(1)
    error = ((candidate - reference).norm(dim=1) / reference.norm(dim=1).clamp_min(1e-30)).max().item()
    if not error <= MAX_RELATIVE_ERROR:
        _logger.warning(
            "BatchNorm folding changed the model output (relative error %.3g > %g); keeping the unfolded model",
            error, MAX_RELATIVE_ERROR,
        )
        return module, 0
    return folded, len(pairs)


def fold_backbone_batchnorm(module: nn.Module, resolution: int) -> tuple[nn.Module, int]:
    """Fold the BatchNorm layers of an eval-mode backbone, tracing it on one seeded random resolution x resolution image.

    Returns the module to use and the number of folded pairs, and logs the outcome.
    """
    try:
        generator = torch.Generator().manual_seed(0)
        example = torch.randn(1, 3, resolution, resolution, generator=generator)
        folded, count = fold_batchnorm(module, example)
    except Exception as e:
        # Folding only saves time, so the run goes on and the extraction reports its own error on this
        # model. timm rejects input sizes with assert statements too. Signal exceptions are raised again.
        raise_wrapped_interrupt(e)
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        _logger.warning("BatchNorm folding skipped: the model failed on a %dx%d test input (%s)",
                        resolution, resolution, message)
        return module, 0
    if count:
        _logger.info("folded %d BatchNorm layers into the convolutions before them", count)
    return folded, count
