"""Cosine classifier head and the softmax margin losses that train the adaptation layer.

The recipe is the one the published ILIAS layers were trained with. Logits are cosines
between the L2-normalised adapted embedding and the L2-normalised class weights. An
optional margin changes the target class's logit only, and all logits are multiplied by
a fixed scale before the mean softmax cross-entropy.

- normface: no margin.
- cosface: the margin is subtracted from the target cosine.
- arcface: the margin is added to the target angle, acos(cosine), whose input is clamped
  to [-1 + 1e-7, 1 - 1e-7] so the angle and its gradient stay finite.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

LOSS_TYPES = ("normface", "cosface", "arcface")

ARCFACE_CLAMP = 1e-7
_NORM_EPS = 1e-12  # the eps of F.normalize


def _onednn_linear_works() -> bool:
    try:
        a, b = torch.ones(2, 3), torch.ones(4, 3)
        return torch.equal(torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], ""), a @ b.t())
    except (AttributeError, RuntimeError):
        return False


# NOTE: a private torch op, checked once at import. On one core of an AMD EPYC (Zen 4) with
# torch 2.14 it ran the float32 (128 x 512) @ (512 x 10000) product 20% faster than torch.mm
# (MKL) and (128 x 10000) @ (10000 x 512) 7% faster.
_ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and _onednn_linear_works()


def matmul_nt(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Return a @ b.T for a (M, K) and b (N, K), through oneDNN on the CPU when torch has it."""
    if _ONEDNN_LINEAR and a.device.type == "cpu" and a.dtype in (torch.float32, torch.bfloat16):
        return torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")
    return torch.mm(a, b.t())


def _compute_dtype(device_type: str) -> torch.dtype | None:
    """Return the autocast dtype active for this device, or None when autocast is off."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


class _CosineLogits(torch.autograd.Function):
    """Cosines between rows of `features` (already L2-normalised) and normalised rows of `weight`.

    Same function as `features @ F.normalize(weight).T`, but the row norms of `weight` scale
    the (B, C) output rather than the (C, D) weight. The forward and backward passes then
    read the weight matrix once each instead of once per normalisation step.
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

        logits = matmul_nt(features, weight_cast).to(weight.dtype)  # (B, C)
        logits.mul_(inv_norm)

        ctx.save_for_backward(features, weight, weight_cast, inv_norm, logits)
        return logits

    @staticmethod
    def backward(ctx, grad_logits: torch.Tensor):
        features, weight, weight_cast, inv_norm, logits = ctx.saved_tensors
        grad_scaled = grad_logits * inv_norm  # (B, C)

        grad_features = None
        if ctx.needs_input_grad[0]:
            grad_features = matmul_nt(grad_scaled.to(weight_cast.dtype), weight_cast.t())  # (B, D)

        grad_weight = None
        if ctx.needs_input_grad[1]:
            # d(cos_bc)/dW_c = inv_norm_c * f_b - cos_bc * inv_norm_c^2 * W_c,
            # and the second term vanishes where the norm was clamped to eps
            row_coef = (grad_logits * logits).sum(dim=0) * inv_norm.square()  # (C,)
            row_coef = torch.where(inv_norm < 1.0 / _NORM_EPS, row_coef, torch.zeros_like(row_coef))
            grad_weight = matmul_nt(grad_scaled.t().to(features.dtype), features.t()).to(weight.dtype)  # (C, D)
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


def _target_margin(target_cosine: torch.Tensor, loss_type: str, margin: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the target logits after the margin and their derivative by the target cosine."""
    if loss_type == "normface":
        return target_cosine, torch.ones_like(target_cosine)
    if loss_type == "cosface":
        return target_cosine - margin, torch.ones_like(target_cosine)

    low, high = -1.0 + ARCFACE_CLAMP, 1.0 - ARCFACE_CLAMP
    clamped = target_cosine.clamp(low, high)
    angle = torch.acos(clamped) + margin
    # d cos(acos(c) + m) / dc = sin(acos(c) + m) / sqrt(1 - c^2); zero where the clamp is active,
    # as in autograd's clamp backward
    derivative = torch.sin(angle) * torch.rsqrt(1.0 - clamped * clamped)
    inside = (target_cosine >= low) & (target_cosine <= high)
    return torch.cos(angle), torch.where(inside, derivative, torch.zeros_like(derivative))


# log(float32 smallest normal) is about -87; below this logit spread, softmax probabilities
# of the target cannot underflow, so -log(p_target) is exact
_SAFE_LOGIT_SPREAD = 80.0


class _CosineMarginLoss(torch.autograd.Function):
    """Fused cosine logits, target margin, scale and mean softmax cross-entropy, with a hand-written backward.

    Computes the same function as margin_softmax_loss(cosine_logits(features, weight), ...)
    with two (B, C) buffers: the scaled cosines and the softmax probabilities, which
    the backward pass turns into the gradient in place. The margin only touches the B
    target entries. Because of that reuse, backward can run only once per forward pass;
    autograd raises on a second call (retain_graph=True).
    """

    @staticmethod
    def forward(ctx, features, weight, targets, loss_type, margin, scale, compute_dtype):
        batch_size, num_classes = features.shape[0], weight.shape[0]
        with torch.autocast(features.device.type, enabled=False):
            inv_norm = torch.linalg.vector_norm(weight, dim=1).clamp_min(_NORM_EPS).reciprocal()  # (C,)
            if compute_dtype is not None:
                features_cast, weight_cast = features.to(compute_dtype), weight.to(compute_dtype)
            else:
                features_cast, weight_cast = features.to(weight.dtype), weight

            logits = matmul_nt(features_cast, weight_cast).to(weight.dtype)  # (B, C)
            logits.mul_(inv_norm * scale)  # scale * cosine

            index = targets.unsqueeze(1)  # (B, 1)
            scaled_target_cosine = logits.gather(1, index)
            target_logit, target_derivative = _target_margin(scaled_target_cosine / scale, loss_type, margin)
            has_margin = loss_type != "normface"
            if has_margin:
                logits.scatter_(1, index, target_logit * scale)

            # logits lie in [-scale * (2 + margin), scale], so the spread bounds how small p_target can get
            if scale * (2.0 + abs(margin)) + math.log(num_classes) < _SAFE_LOGIT_SPREAD:
                prob = torch.softmax(logits, dim=1)
                loss = -prob.gather(1, index).log().sum() / batch_size
            else:
                prob = torch.log_softmax(logits, dim=1)
                loss = -prob.gather(1, index).sum() / batch_size
                prob.exp_()
            if has_margin:
                logits.scatter_(1, index, scaled_target_cosine)  # back to scale * cosine for the backward pass

        # the radial gradient term needs sum_b grad_bc * cosine_bc: from the (B, C) logits when B
        # is small, else from the (C, D) weight gradient (see backward), whichever is smaller
        use_logits = batch_size <= weight.shape[1]
        ctx.save_for_backward(
            features_cast, weight_cast, weight, inv_norm, logits if use_logits else None, prob, index, target_derivative
        )
        ctx.scale = scale
        ctx.has_margin = has_margin
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        features_cast, weight_cast, weight, inv_norm, logits, prob, index, target_derivative = ctx.saved_tensors
        batch_size = prob.shape[0]

        # dL/draw for raw = features @ weight.T: (softmax - one_hot) * grad / B, times the scale,
        # the target margin's derivative and d cosine / d raw = inv_norm
        grad = prob
        grad.scatter_add_(1, index, torch.full_like(target_derivative, -1.0))
        grad.mul_(inv_norm * (grad_loss * (ctx.scale / batch_size)))
        if ctx.has_margin:
            grad.scatter_(1, index, grad.gather(1, index) * target_derivative)

        grad_cast = grad.to(weight_cast.dtype)
        grad_features = None
        if ctx.needs_input_grad[0]:
            grad_features = matmul_nt(grad_cast, weight_cast.t())  # (B, D)

        grad_weight = None
        if ctx.needs_input_grad[1]:
            # torch.mm takes the transposed (C, B) operand without a copy; oneDNN would copy it
            grad_weight = torch.mm(grad_cast.t(), features_cast).to(weight.dtype)  # (C, D)
            # cosine_bc = raw_bc * inv_norm_c and d inv_norm_c / dW_c = -inv_norm_c^3 W_c, so
            # dL/dW_c = grad_weight_c - inv_norm_c^2 (sum_b dL/draw_bc raw_bc) W_c, where the sum
            # equals W_c . grad_weight_c
            if logits is not None:
                radial = (grad * logits).sum(dim=0) * (inv_norm / ctx.scale)  # (C,)
            else:
                radial = (weight * grad_weight).sum(dim=1) * inv_norm.square()
            radial = torch.where(inv_norm < 1.0 / _NORM_EPS, radial, torch.zeros_like(radial))
            grad_weight.addcmul_(weight, radial.unsqueeze(1), value=-1.0)
        return grad_features, grad_weight, None, None, None, None, None


def cosine_margin_loss(
    features: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    loss_type: str,
    margin: float,
    scale: float,
) -> torch.Tensor:
    """Return the mean margin softmax loss of L2-normalised `features` (B, D) against class weights (C, D).

    Same value and gradients as margin_softmax_loss(cosine_logits(features, weight), ...)
    up to float rounding, in fewer passes over memory. Under torch.autocast the matrix
    products run in the autocast dtype and everything else in float32.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss type {loss_type!r} is not one of {', '.join(LOSS_TYPES)}")
    compute_dtype = _compute_dtype(features.device.type)
    return _CosineMarginLoss.apply(features, weight, targets, loss_type, float(margin), float(scale), compute_dtype)
