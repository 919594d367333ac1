"""Folding eval-mode BatchNorm layers into the convolutions before them."""
import copy
import logging

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import BatchNormAct2d, StdConv2d

from feature_extraction.batchnorm_folding import (
    AfterFoldedNorm,
    find_conv_norm_pairs,
    fold_backbone_batchnorm,
    fold_batchnorm,
)


def randomise_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine parameters, so folding has something to fold."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.5)
                module.running_var.copy_(torch.rand(n, generator=generator) * 2 + 0.1)
                module.weight.copy_(torch.randn(n, generator=generator))
                module.bias.copy_(torch.randn(n, generator=generator) * 0.2)
    return model.eval()


def images(height=64, width=48, batch=2, seed=1):
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def count_batchnorms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


@pytest.fixture(scope="module")
def efficientnet():
    torch.manual_seed(0)
    return randomise_batchnorm(timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0))


def test_efficientnet_folds_every_batchnorm(efficientnet):
    before = count_batchnorms(efficientnet)
    folded, count = fold_batchnorm(efficientnet, images())

    assert before == 49
    assert count == 49
    assert count_batchnorms(folded) == 0
    assert count_batchnorms(efficientnet) == 49  # the original is left as it was
    assert any(isinstance(m, AfterFoldedNorm) for m in folded.modules())


@pytest.mark.parametrize("height,width", [(64, 48), (96, 96), (40, 72)])
def test_folded_model_gives_same_output(efficientnet, height, width):
    folded, _ = fold_batchnorm(efficientnet, images())
    x = images(height, width, seed=height)
    with torch.inference_mode():
        reference, candidate = efficientnet(x), folded(x)

    assert reference.abs().max() > 0.1
    torch.testing.assert_close(candidate, reference, rtol=1e-4, atol=1e-4)
    assert F.cosine_similarity(candidate, reference).min() > 0.99999


def test_folded_model_matches_under_channels_last(efficientnet):
    original = copy.deepcopy(efficientnet).to(memory_format=torch.channels_last)
    folded, _ = fold_batchnorm(original, images())
    x = images(80, 64).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        reference = original(x)
        candidate = folded.to(memory_format=torch.channels_last)(x)
    torch.testing.assert_close(candidate, reference, rtol=1e-4, atol=1e-4)


class SharedConvOutput(nn.Module):
    """A convolution whose output feeds both a BatchNorm and a residual sum, so folding would change the sum."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        return (self.bn(y) + y).flatten(1)


def test_shared_conv_output_keeps_original(caplog):
    model = randomise_batchnorm(SharedConvOutput())
    with caplog.at_level(logging.WARNING, logger="feature_extraction.batchnorm_folding"):
        result, count = fold_batchnorm(model, images(16, 16))

    assert find_conv_norm_pairs(model, images(16, 16)) == [("conv", "bn")]
    assert result is model
    assert count == 0
    assert "keeping the unfolded model" in caplog.text


class SmallSharedUse(SharedConvOutput):
    """The convolution's output also enters the result with weight 1e-3, so folding changes it by about 1e-3."""

    def forward(self, x):
        y = self.conv(x)
        return (self.bn(y) + 1e-3 * y).flatten(1)


def test_small_output_change_rejected():
    # a change this small leaves the cosine above 0.99999 but is far above rounding
    model = randomise_batchnorm(SmallSharedUse())
    result, count = fold_batchnorm(model, images(16, 16))
    assert result is model
    assert count == 0


class ConvCalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(3)
        self.bn2 = nn.BatchNorm2d(3)

    def forward(self, x):
        return (self.bn1(self.conv(x)) + self.bn2(self.conv(x * 2))).flatten(1)


def test_module_called_twice_not_folded():
    model = randomise_batchnorm(ConvCalledTwice())
    assert find_conv_norm_pairs(model, images(16, 16)) == []
    result, count = fold_batchnorm(model, images(16, 16))
    assert result is model
    assert count == 0


class StandardisedConvBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = StdConv2d(3, 4, 3, padding=1)
        self.bn = BatchNormAct2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)).flatten(1)


def test_weight_standardised_conv_not_folded():
    # StdConv2d normalises its weights in forward, which would undo the per-channel scale
    model = randomise_batchnorm(StandardisedConvBlock())
    assert find_conv_norm_pairs(model, images(16, 16)) == []


def test_batchnorm_in_training_mode_not_folded():
    model = randomise_batchnorm(StandardisedConvBlock())
    model.conv = nn.Conv2d(3, 4, 3, padding=1)
    model.train()
    running_mean = model.bn.running_mean.clone()
    result, count = fold_batchnorm(model, images(16, 16))

    assert result is model
    assert count == 0
    # a traced training-mode BatchNorm would update its running statistics from the example
    torch.testing.assert_close(model.bn.running_mean, running_mean, rtol=0, atol=0)
    # the output check alone would also reject the fold, so test the pair search directly
    assert find_conv_norm_pairs(model, images(16, 16)) == []


def test_model_without_batchnorm_returned_unchanged():
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32).eval()
    result, count = fold_batchnorm(vit, images(32, 32))
    assert result is vit
    assert count == 0


def test_conv_without_bias_gets_folded_bias():
    model = randomise_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Flatten()))
    folded, count = fold_batchnorm(model, images(16, 16))
    x = images(20, 12, seed=5)
    with torch.inference_mode():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)
    assert count == 1
    assert isinstance(folded[1], nn.Identity)
    assert folded[0].bias is not None


class _FailingForward(nn.Module):
    """A conv -> BatchNorm model whose forward raises `error`, as a CPU allocation at a huge resolution does."""

    def __init__(self, error: BaseException):
        super().__init__()
        self.conv, self.norm, self.error = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4).eval(), error

    def forward(self, x):
        raise self.error


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 120 GB"),
        # timm checks input sizes with assert statements
        AssertionError("Input height (64) doesn't match model (224)."),
    ],
    ids=["allocation", "assertion"],
)
def test_failed_trace_keeps_unfolded_model(caplog, error):
    model = _FailingForward(error)
    with caplog.at_level(logging.WARNING, logger="feature_extraction.batchnorm_folding"):
        result, count = fold_backbone_batchnorm(model, 64)
    assert result is model
    assert count == 0
    assert "BatchNorm folding skipped: the model failed on a 64x64 test input" in caplog.text
    assert str(error).rstrip(".") in caplog.text


def test_signal_during_trace_is_not_swallowed():
    # a signal exception raised inside a lazy import can reach the caller wrapped in a RuntimeError
    wrapped = RuntimeError("Error calling __set_name__")
    wrapped.__cause__ = KeyboardInterrupt()
    with pytest.raises(KeyboardInterrupt):
        fold_backbone_batchnorm(_FailingForward(wrapped), 16)
