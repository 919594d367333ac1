import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from linear_adaptation.model import (
    ARCFACE_CLAMP,
    CosineClassifier,
    apply_margin,
    cosine_logits,
    cosine_margin_loss,
    matmul_nt,
    margin_softmax_loss,
)


def reference_loss(cosine, targets, loss_type, margin, scale):
    """The published recipe, written with a dense one-hot matrix as the older trainer does."""
    one_hot = F.one_hot(targets, num_classes=cosine.shape[1]).to(cosine.dtype)
    if loss_type == "arcface":
        theta = torch.acos(torch.clamp(cosine, -1.0 + ARCFACE_CLAMP, 1.0 - ARCFACE_CLAMP))
        cosine = torch.cos(theta + margin) * one_hot + cosine * (1 - one_hot)
    elif loss_type == "cosface":
        cosine = (cosine - margin) * one_hot + cosine * (1 - one_hot)
    return F.cross_entropy(cosine * scale, targets)


def random_head(num_classes=7, dim=5, batch=4, seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    features = F.normalize(torch.randn(batch, dim, generator=generator, dtype=dtype), dim=1)
    weight = torch.randn(num_classes, dim, generator=generator, dtype=dtype)
    targets = torch.randint(0, num_classes, (batch,), generator=generator)
    return features, weight, targets


def test_cosine_logits_match_normalised_linear():
    features, weight, _ = random_head()
    expected = features @ F.normalize(weight, dim=1).T
    assert torch.allclose(cosine_logits(features, weight), expected, atol=1e-12)


def test_cosine_logits_gradients_match_autograd():
    features, weight, _ = random_head()
    upstream = torch.randn(features.shape[0], weight.shape[0], dtype=torch.float64)

    f1, w1 = features.clone().requires_grad_(), weight.clone().requires_grad_()
    (cosine_logits(f1, w1) * upstream).sum().backward()
    f2, w2 = features.clone().requires_grad_(), weight.clone().requires_grad_()
    ((f2 @ F.normalize(w2, dim=1).T) * upstream).sum().backward()

    assert torch.allclose(f1.grad, f2.grad, atol=1e-12)
    assert torch.allclose(w1.grad, w2.grad, atol=1e-12)


def test_cosine_logits_pass_gradcheck():
    features, weight, _ = random_head(num_classes=3, dim=4, batch=2)
    features.requires_grad_()
    weight.requires_grad_()
    assert torch.autograd.gradcheck(lambda f, w: cosine_logits(f, w), (features, weight))


def test_cosine_logits_bf16_autocast_close_to_float32():
    features, weight, _ = random_head(num_classes=50, dim=64, batch=16, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = cosine_logits(features, weight)
    assert low.dtype == torch.float32
    assert (low - cosine_logits(features, weight)).abs().max() < 2e-2


def test_classifier_uses_nn_linear_initialisation():
    torch.manual_seed(3)
    head = CosineClassifier(16, 10)
    torch.manual_seed(3)
    plain = nn.Linear(16, 10, bias=False)
    assert head.bias is None
    assert torch.equal(head.weight, plain.weight)


def test_cosface_margin_by_hand():
    cosine = torch.tensor([[0.5, 0.2, -0.1], [0.3, 0.9, 0.4]], dtype=torch.float64)
    targets = torch.tensor([0, 2])
    out = apply_margin(cosine, targets, "cosface", 0.35)
    expected = torch.tensor([[0.15, 0.2, -0.1], [0.3, 0.9, 0.05]], dtype=torch.float64)
    assert torch.allclose(out, expected, atol=1e-12)


def test_arcface_margin_by_hand():
    cosine = torch.tensor([[0.5, 0.2, -0.1], [0.3, 0.9, 0.4]], dtype=torch.float64)
    targets = torch.tensor([0, 2])
    out = apply_margin(cosine, targets, "arcface", 0.5)
    assert out[0, 0].item() == pytest.approx(math.cos(math.acos(0.5) + 0.5), abs=1e-12)
    assert out[1, 2].item() == pytest.approx(math.cos(math.acos(0.4) + 0.5), abs=1e-12)
    assert torch.equal(out[0, 1:], cosine[0, 1:])
    assert torch.equal(out[1, :2], cosine[1, :2])


def test_arcface_clamps_cosine_of_one():
    cosine = torch.tensor([[1.0, 0.0]], dtype=torch.float64, requires_grad=True)
    out = apply_margin(cosine, torch.tensor([0]), "arcface", 0.1)
    out.sum().backward()
    assert out[0, 0].item() == pytest.approx(math.cos(math.acos(1 - ARCFACE_CLAMP) + 0.1), abs=1e-12)
    assert torch.isfinite(cosine.grad).all()


def test_normface_leaves_logits_unchanged():
    cosine = torch.tensor([[0.5, 0.2]])
    assert apply_margin(cosine, torch.tensor([1]), "normface", 0.0) is cosine


def test_loss_by_hand_for_two_classes():
    cosine = torch.tensor([[0.6, 0.1]], dtype=torch.float64)
    targets = torch.tensor([0])
    # cosface, margin 0.2, scale 10: logits 4 and 1 -> loss log(1 + e^-3)
    loss = margin_softmax_loss(cosine, targets, "cosface", 0.2, 10.0)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-3.0)), abs=1e-12)


@pytest.mark.parametrize("loss_type,margin", [("normface", 0.0), ("cosface", 0.0), ("cosface", 0.3), ("arcface", 0.2), ("arcface", 0.0)])
def test_loss_matches_one_hot_reference(loss_type, margin):
    features, weight, targets = random_head(num_classes=11, dim=6, batch=9, seed=1)
    w1 = weight.clone().requires_grad_()
    w2 = weight.clone().requires_grad_()

    loss = margin_softmax_loss(cosine_logits(features, w1), targets, loss_type, margin, 16.0)
    expected = reference_loss(features @ F.normalize(w2, dim=1).T, targets, loss_type, margin, 16.0)
    loss.backward()
    expected.backward()

    assert loss.item() == pytest.approx(expected.item(), abs=1e-12)
    assert torch.allclose(w1.grad, w2.grad, atol=1e-12)


def test_unknown_loss_type_rejected():
    with pytest.raises(ValueError, match="sphereface"):
        apply_margin(torch.zeros(1, 2), torch.tensor([0]), "sphereface", 0.1)


@pytest.mark.parametrize("loss_type,margin", [("normface", 0.0), ("cosface", 0.35), ("arcface", 0.3), ("arcface", 0.0)])
@pytest.mark.parametrize("batch,dim", [(4, 8), (10, 6)])  # radial term from the logits, then from the weight gradient
@pytest.mark.parametrize("scale", [16.0, 40.0])  # softmax, then log_softmax for a wide logit range
def test_fused_loss_matches_one_hot_reference(loss_type, margin, batch, dim, scale):
    features, weight, targets = random_head(num_classes=13, dim=dim, batch=batch, seed=2)
    f1, w1 = features.clone().requires_grad_(), weight.clone().requires_grad_()
    f2, w2 = features.clone().requires_grad_(), weight.clone().requires_grad_()

    loss = cosine_margin_loss(f1, w1, targets, loss_type, margin, scale)
    expected = reference_loss(f2 @ F.normalize(w2, dim=1).T, targets, loss_type, margin, scale)
    (loss * 0.7).backward()
    (expected * 0.7).backward()

    assert loss.item() == pytest.approx(expected.item(), abs=1e-12)
    assert torch.allclose(f1.grad, f2.grad, atol=1e-12)
    assert torch.allclose(w1.grad, w2.grad, atol=1e-12)


def test_fused_loss_large_scale_stays_finite():
    # a target far below the best logit at scale 64 underflows float32 softmax; the loss must not be inf
    features = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=1)
    weight = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])
    targets = torch.tensor([1, 2])
    loss = cosine_margin_loss(features, weight, targets, "cosface", 0.0, 64.0)
    expected = reference_loss(features @ F.normalize(weight, dim=1).T, targets, "cosface", 0.0, 64.0)
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_fused_loss_second_backward_raises():
    # the backward pass reuses the saved probabilities in place, so autograd must refuse a rerun
    features, weight, targets = random_head(num_classes=5, dim=4, batch=3, seed=4)
    weight.requires_grad_()
    loss = cosine_margin_loss(features, weight, targets, "arcface", 0.4, 8.0)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_matmul_nt_matches_mm():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(7, 5, generator=generator)
    b = torch.randn(9, 5, generator=generator)
    assert torch.allclose(matmul_nt(a, b), a @ b.T, atol=1e-5)
    assert torch.allclose(matmul_nt(a.t().contiguous().t(), b.t().contiguous().t()), a @ b.T, atol=1e-5)


def test_fused_loss_float32_matches_float64():
    features, weight, targets = random_head(num_classes=1000, dim=64, batch=32, seed=5)
    w32 = weight.float().requires_grad_()
    w64 = weight.clone().requires_grad_()
    loss32 = cosine_margin_loss(features.float(), w32, targets, "cosface", 0.2, 16.0)
    loss64 = cosine_margin_loss(features, w64, targets, "cosface", 0.2, 16.0)
    loss32.backward()
    loss64.backward()
    assert loss32.item() == pytest.approx(loss64.item(), rel=1e-5)
    assert torch.allclose(w32.grad.double(), w64.grad, atol=1e-7)


def test_fused_loss_bf16_close_to_float32():
    features, weight, targets = random_head(num_classes=500, dim=64, batch=32, seed=6, dtype=torch.float32)
    w_low = weight.clone().requires_grad_()
    w_full = weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = cosine_margin_loss(features, w_low, targets, "cosface", 0.0, 16.0)
    full = cosine_margin_loss(features, w_full, targets, "cosface", 0.0, 16.0)
    low.backward()
    full.backward()
    assert low.dtype == torch.float32
    assert w_low.grad.dtype == torch.float32
    assert low.item() == pytest.approx(full.item(), rel=1e-2)
    cosine = F.cosine_similarity(w_low.grad.flatten(), w_full.grad.flatten(), dim=0)
    assert cosine > 0.99


@pytest.mark.parametrize("loss_type,margin", [("normface", 0.0), ("cosface", 0.35), ("arcface", 0.5)])
def test_fused_loss_gradients_match_finite_differences(loss_type, margin):
    # gradcheck cannot run here because it calls backward several times on one output
    features, weight, targets = random_head(num_classes=4, dim=3, batch=5, seed=7)
    f, w = features.clone().requires_grad_(), weight.clone().requires_grad_()
    cosine_margin_loss(f, w, targets, loss_type, margin, 16.0).backward()

    eps = 1e-6
    for tensor, analytic in ((features, f.grad), (weight, w.grad)):
        numeric = torch.zeros_like(tensor)
        for i in range(tensor.numel()):
            values = []
            for step in (eps, -eps):
                moved = tensor.clone()
                moved.view(-1)[i] += step
                inputs = (moved, weight) if tensor is features else (features, moved)
                values.append(cosine_margin_loss(*inputs, targets, loss_type, margin, 16.0).item())
            numeric.view(-1)[i] = (values[0] - values[1]) / (2 * eps)
        assert torch.allclose(analytic, numeric, atol=1e-7)


def test_fused_loss_zero_weight_and_clamped_target():
    # rows 0 and 1 point exactly along and against their target weights, so arcface clamps them,
    # and class 4 has a zero weight, where F.normalize's eps sets the gradient
    _, weight, _ = random_head(num_classes=5, dim=6, batch=1, seed=8)
    weight[4] = 0.0
    targets = torch.tensor([0, 1, 2])
    features = F.normalize(weight[targets], dim=1) * torch.tensor([[1.0], [-1.0], [1.0]], dtype=torch.float64)
    features[2] = F.normalize(torch.arange(1.0, 7.0, dtype=torch.float64), dim=0)
    for loss_type, margin in (("cosface", 0.35), ("arcface", 0.5)):
        f1, w1 = features.clone().requires_grad_(), weight.clone().requires_grad_()
        f2, w2 = features.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = cosine_margin_loss(f1, w1, targets, loss_type, margin, 16.0)
        expected = reference_loss(f2 @ F.normalize(w2, dim=1).T, targets, loss_type, margin, 16.0)
        loss.backward()
        expected.backward()
        assert loss.item() == pytest.approx(expected.item(), abs=1e-12)
        assert torch.allclose(f1.grad, f2.grad, rtol=1e-12, atol=1e-12)
        assert torch.allclose(w1.grad, w2.grad, rtol=1e-12, atol=1e-12)
