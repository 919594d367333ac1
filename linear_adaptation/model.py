"""Cosine classifier head and the softmax margin losses that train the adaptation layer.

The recipe is the one the published ILIAS layers were trained with: logits are cosines
between the L2-normalised adapted embedding and the L2-normalised class weights, an
optional margin is applied to the target class only, and the result is multiplied by a
fixed scale before the mean softmax cross-entropy.

- normface: no margin.
- cosface: the margin is subtracted from the target cosine.
- arcface: the margin is added to the target angle, acos(cosine), whose input is clamped
  to [-1 + 1e-7, 1 - 1e-7] so the angle and its gradient stay finite.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

LOSS_TYPES = ("normface", "cosface", "arcface")

ARCFACE_CLAMP = 1e-7
_NORM_EPS = 1e-12  # the eps of F.normalize


def _compute_dtype(device_type: str) -> torch.dtype | None:
    """Return the autocast dtype active for this device, or None when autocast is off."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


class _CosineLogits(torch.autograd.Function):
    """Cosines between rows of `features` (already L2-normalised) and normalised rows of `weight`.

    Same function as `features @ F.normalize(weight).T`, but the row norms of `weight` scale
    the (B, C) output rather than the (C, D) weight: the forward pass and its gradient then
    touch the weight matrix once each instead of once per normalisation step, which saves
    several passes over a 10k x 512 matrix per training step.
    """

    @staticmethod
    def forward(ctx, features: torch.Tensor, weight: torch.Tensor, compute_dtype: torch.dtype | None):
        inv_norm = weight.norm(dim=1).clamp_min(_NORM_EPS).reciprocal()  # (C,)
        if compute_dtype is not None:
            features = features.to(compute_dtype)
            weight_cast = weight.to(compute_dtype)
        else:
            features = features.to(weight.dtype)
            weight_cast = weight

        logits = torch.mm(features, weight_cast.t()).to(weight.dtype)  # (B, C)
        logits.mul_(inv_norm)

        ctx.save_for_backward(features, weight, weight_cast, inv_norm, logits)
        return logits

    @staticmethod
    def backward(ctx, grad_logits: torch.Tensor):
        features, weight, weight_cast, inv_norm, logits = ctx.saved_tensors
        grad_scaled = grad_logits * inv_norm  # (B, C)

        grad_features = None
        if ctx.needs_input_grad[0]:
            grad_features = torch.mm(grad_scaled.to(weight_cast.dtype), weight_cast)  # (B, D)

        grad_weight = None
        if ctx.needs_input_grad[1]:
            # d(cos_bc)/dW_c = inv_norm_c * f_b - cos_bc * inv_norm_c^2 * W_c,
            # and the second term vanishes where the norm was clamped to eps
            row_coef = (grad_logits * logits).sum(dim=0) * inv_norm.square()  # (C,)
            row_coef = torch.where(inv_norm < 1.0 / _NORM_EPS, row_coef, torch.zeros_like(row_coef))
            grad_weight = torch.mm(grad_scaled.t().to(features.dtype), features).to(weight.dtype)  # (C, D)
            grad_weight.addcmul_(weight, row_coef.unsqueeze(1), value=-1.0)

        return grad_features, grad_weight, None


def cosine_logits(features: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Return cosines (B, C) between L2-normalised `features` (B, D) and the rows of `weight` (C, D).

    Under torch.autocast the matrix products run in the autocast dtype; the weight norms
    and the float32 output do not.
    """
    return _CosineLogits.apply(features, weight, _compute_dtype(features.device.type))


class CosineClassifier(nn.Linear):
    """Bias-free linear classifier whose logits are cosines to L2-normalised class weights.

    It is an nn.Linear(in_features, num_classes, bias=False) with that module's default
    initialisation, as in the published recipe.
    """

    def __init__(self, in_features: int, num_classes: int):
        super().__init__(in_features, num_classes, bias=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return cosine_logits(features, self.weight)


def apply_margin(cosine: torch.Tensor, targets: torch.Tensor, loss_type: str, margin: float) -> torch.Tensor:
    """Return a copy of `cosine` (B, C) with the margin of `loss_type` applied to each target column.

    Only the B target entries are gathered, changed and scattered back, so no (B, C)
    one-hot matrix is built.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss type {loss_type!r} is not one of {', '.join(LOSS_TYPES)}")
    if loss_type == "normface":
        return cosine

    index = targets.unsqueeze(1)  # (B, 1)
    target_cosine = cosine.gather(1, index)
    if loss_type == "cosface":
        target_logit = target_cosine - margin
    else:
        theta = torch.acos(target_cosine.clamp(-1.0 + ARCFACE_CLAMP, 1.0 - ARCFACE_CLAMP))
        target_logit = torch.cos(theta + margin)
    return cosine.scatter(1, index, target_logit)


def margin_softmax_loss(
    cosine: torch.Tensor, targets: torch.Tensor, loss_type: str, margin: float, scale: float
) -> torch.Tensor:
    """Return the mean softmax cross-entropy of the scaled cosine logits after the margin."""
    if cosine.dtype in (torch.float16, torch.bfloat16):
        cosine = cosine.float()  # softmax in at least float32 precision
    logits = apply_margin(cosine, targets, loss_type, margin)
    return F.cross_entropy(logits * scale, targets)
