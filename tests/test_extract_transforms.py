import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as tv

from feature_extraction.backbones import Backbone
from feature_extraction.embedding import Embedder
from feature_extraction.transforms import (
    InferenceTransform,
    TransformName,
    centre_padding,
    large_side_size,
    multiple_padding,
)

SIZES = [(64, 48), (48, 64), (50, 50), (300, 7), (1, 1), (97, 131)]


def _random_image(size, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _ilias_large_side(size, resolution):
    # the ILIAS LargeSideResize arithmetic, kept as the reference
    width, height = size
    aspect = float(height) / float(width)
    new_height = max(1, int(resolution * aspect) if aspect <= 1 else resolution)
    new_width = max(1, int(resolution / aspect) if aspect > 1 else resolution)
    return new_width, new_height


@pytest.mark.parametrize("size", SIZES)
def test_large_side_size_matches_ilias(size):
    assert large_side_size(*size, 32) == _ilias_large_side(size, 32)


@pytest.mark.parametrize("size", SIZES)
def test_resize_large_bicubic_pixels(size):
    image = _random_image(size)
    result = InferenceTransform(TransformName.RESIZE_LARGE, 32).resize(image)
    expected = image.resize(_ilias_large_side(size, 32))  # PIL's default filter is bicubic
    assert np.array_equal(np.asarray(result), np.asarray(expected))


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize(
    "name, reference",
    [
        (TransformName.RESIZE_SMALL, lambda r: tv.Resize(r)),
        (TransformName.RESIZE_CENTER, lambda r: tv.Compose([tv.Resize(r), tv.CenterCrop(r)])),
        (TransformName.RESIZE_SQUARE, lambda r: tv.Resize((r, r))),
    ],
)
def test_resize_matches_torchvision(size, name, reference):
    image = _random_image(size, seed=1)
    result = InferenceTransform(name, 24).resize(image)
    expected = reference(24)(image)
    assert result.size == expected.size
    assert np.array_equal(np.asarray(result), np.asarray(expected))


def _identity_backbone(patch_size=None):
    return Backbone(module=torch.nn.Identity(), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), patch_size=patch_size)


@pytest.mark.parametrize(
    "name, min_size, size, expected_hw",
    [
        (TransformName.RESIZE_LARGE, 0, (64, 48), (24, 32)),
        (TransformName.RESIZE_LARGE, 30, (64, 48), (30, 32)),
        (TransformName.RESIZE_LARGE, 0, (48, 64), (32, 24)),
        (TransformName.RESIZE_SMALL, 0, (64, 48), (32, 42)),
        (TransformName.RESIZE_CENTER, 0, (64, 48), (32, 32)),
        (TransformName.RESIZE_SQUARE, 0, (90, 30), (32, 32)),
        (TransformName.RESIZE_PAD, 0, (90, 30), (32, 32)),
    ],
)
def test_transform_output_shape(name, min_size, size, expected_hw):
    transform = InferenceTransform(name, 32, min_size)
    pixels = torch.from_numpy(np.array(transform.resize(_random_image(size))))[None]
    embedder = Embedder(_identity_backbone(), transform, torch.device("cpu"))
    assert tuple(embedder.prepare(pixels).shape) == (1, 3, *expected_hw)


@pytest.mark.parametrize(
    "name, min_size, expected",
    [
        (TransformName.RESIZE_LARGE, 0, None),
        (TransformName.RESIZE_LARGE, 30, None),
        (TransformName.RESIZE_LARGE, 32, (32, 32)),
        (TransformName.RESIZE_LARGE, 40, (40, 40)),
        (TransformName.RESIZE_SMALL, 0, None),
        (TransformName.RESIZE_CENTER, 0, (32, 32)),
        (TransformName.RESIZE_SQUARE, 0, (32, 32)),
        (TransformName.RESIZE_PAD, 0, (32, 32)),
    ],
)
def test_fixed_output_size_matches_prepared_shapes(name, min_size, expected):
    transform = InferenceTransform(name, 32, min_size)
    embedder = Embedder(_identity_backbone(), transform, torch.device("cpu"))
    shapes = set()
    for size in SIZES:
        pixels = torch.from_numpy(np.array(transform.resize(_random_image(size))))[None]
        shapes.add(tuple(embedder.prepare(pixels).shape[-2:]))
    assert transform.fixed_output_size() == expected
    if expected is None:
        assert len(shapes) > 1
    else:
        assert shapes == {expected}


def test_padding_fills_mean_colour_centred():
    transform = InferenceTransform(TransformName.RESIZE_PAD, 8)
    pixels = torch.full((1, 4, 8, 3), 255, dtype=torch.uint8)  # a white 8x4 band
    prepared = Embedder(_identity_backbone(), transform, torch.device("cpu")).prepare(pixels)
    white = (1.0 - 0.5) / 0.25
    assert tuple(prepared.shape) == (1, 3, 8, 8)
    assert torch.allclose(prepared[0, :, 2:6, :], torch.full((3, 4, 8), white))
    assert torch.count_nonzero(prepared[0, :, :2]) == 0
    assert torch.count_nonzero(prepared[0, :, 6:]) == 0


def test_patch_padding_reaches_multiple():
    transform = InferenceTransform(TransformName.RESIZE_LARGE, 40)
    embedder = Embedder(_identity_backbone(patch_size=(16, 16)), transform, torch.device("cpu"))
    pixels = torch.zeros((2, 30, 40, 3), dtype=torch.uint8)
    padded = embedder._pad_to_patch_multiple(embedder.prepare(pixels))
    assert tuple(padded.shape) == (2, 3, 32, 48)


def test_prepare_normalises_with_mean_std():
    transform = InferenceTransform(TransformName.RESIZE_SQUARE, 2)
    pixels = torch.tensor([[[[0, 128, 255]] * 2] * 2], dtype=torch.uint8)  # (1, 2, 2, 3)
    prepared = Embedder(_identity_backbone(), transform, torch.device("cpu")).prepare(pixels)
    expected = (torch.tensor([0, 128, 255]) / 255.0 - 0.5) / 0.25
    assert torch.allclose(prepared[0, :, 0, 0], expected, atol=1e-6)
    assert prepared.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("size, target, expected", [(5, 8, (1, 2)), (8, 8, (0, 0)), (9, 8, (0, 0))])
def test_centre_padding_puts_extra_pixel_after(size, target, expected):
    assert centre_padding(size, target) == expected


@pytest.mark.parametrize("size, expected", [(16, (0, 0)), (17, (7, 8)), (30, (1, 1))])
def test_multiple_padding(size, expected):
    assert multiple_padding(size, 16) == expected


def test_draft_size_keeps_two_times_margin():
    transform = InferenceTransform(TransformName.RESIZE_LARGE, 256)
    assert transform.draft_size(4000, 3000) == (512, 384)
    assert transform.draft_size(300, 200) == (300, 200)
    small = InferenceTransform(TransformName.RESIZE_SMALL, 256)
    assert small.draft_size(4000, 3000) == (682, 512)


def test_device_normalisation_matches_cpu_path():
    # the torch normalisation that CUDA runs use, run here on CPU tensors against the numpy path
    transform = InferenceTransform(TransformName.RESIZE_LARGE, 8, 0)
    backbone = _identity_backbone()
    backbone.mean, backbone.std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    embedder = Embedder(backbone, transform, torch.device("cpu"))
    pixels = torch.randint(0, 256, (2, 5, 7, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))

    on_device = embedder._normalise_torch(pixels)
    on_cpu = embedder._normalise_numpy(pixels)

    assert on_device.shape == on_cpu.shape == (2, 3, 5, 7)
    torch.testing.assert_close(on_device, on_cpu, rtol=1e-6, atol=1e-5)
    assert on_cpu.abs().max() > 1.0  # normalised, not just scaled to [0, 1]
