import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps

from feature_extraction.images import DecodeOptions, ImageDecodeError, load_image
from feature_extraction.transforms import InferenceTransform, TransformName

from conftest import write_image

LARGE_32 = DecodeOptions(InferenceTransform(TransformName.RESIZE_LARGE, 32))


def _png_with_declared_size(path, width, height):
    # a PNG whose header declares the size; the pixel data is never reached
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16)))
    return path


def test_missing_file_reason(tmp_path):
    with pytest.raises(ImageDecodeError, match="file not found"):
        load_image(tmp_path / "absent.jpg", LARGE_32)


def test_zero_byte_file_reason(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageDecodeError, match=r"empty file \(0 bytes\)"):
        load_image(tmp_path / "empty.jpg", LARGE_32)


def test_directory_reason(tmp_path):
    (tmp_path / "folder.jpg").mkdir()
    with pytest.raises(ImageDecodeError, match="is a directory"):
        load_image(tmp_path / "folder.jpg", LARGE_32)


def test_random_bytes_reason(tmp_path):
    (tmp_path / "noise.jpg").write_bytes(np.random.default_rng(0).bytes(2000))
    with pytest.raises(ImageDecodeError, match="not an image"):
        load_image(tmp_path / "noise.jpg", LARGE_32)


def test_truncated_jpeg_reason(tmp_path):
    path = write_image(tmp_path / "full.jpg", (200, 150))
    data = path.read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageDecodeError, match="truncated or corrupt"):
        load_image(tmp_path / "cut.jpg", LARGE_32)


def test_pixel_limit_reason(tmp_path):
    path = write_image(tmp_path / "big.png", (50, 40))
    options = DecodeOptions(InferenceTransform(TransformName.RESIZE_LARGE, 32), max_image_pixels=1999)
    with pytest.raises(ImageDecodeError, match=r"50x40 = 2000 pixels, above the --max_image_pixels limit of 1999"):
        load_image(path, options)


def test_declared_huge_size_rejected_before_decoding(tmp_path):
    path = _png_with_declared_size(tmp_path / "bomb.png", 100_000, 100_000)
    with pytest.raises(ImageDecodeError, match="too large"):
        load_image(path, LARGE_32)


def test_rgb_jpeg_resized(tmp_path):
    pixels = load_image(write_image(tmp_path / "x.jpg", (64, 48)), LARGE_32)
    assert pixels.shape == (24, 32, 3)
    assert pixels.dtype == np.uint8


def test_one_pixel_image_upscaled(tmp_path):
    pixels = load_image(write_image(tmp_path / "dot.png", (1, 1)), LARGE_32)
    assert pixels.shape == (32, 32, 3)


def test_greyscale_becomes_three_equal_channels(tmp_path):
    pixels = load_image(write_image(tmp_path / "grey.png", (32, 32), mode="L"), LARGE_32)
    assert pixels.shape == (32, 32, 3)
    assert np.array_equal(pixels[..., 0], pixels[..., 1])
    assert np.array_equal(pixels[..., 0], pixels[..., 2])


def test_alpha_dropped_colour_kept(tmp_path):
    rgba = np.zeros((32, 32, 4), dtype=np.uint8)
    rgba[..., 0] = 200  # red under a fully transparent alpha
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    pixels = load_image(tmp_path / "alpha.png", LARGE_32)
    assert pixels.shape == (32, 32, 3)
    assert np.all(pixels[..., 0] == 200)
    assert np.all(pixels[..., 1:] == 0)


def test_greyscale_alpha_decoded(tmp_path):
    pixels = load_image(write_image(tmp_path / "la.png", (32, 32), mode="LA"), LARGE_32)
    assert pixels.shape == (32, 32, 3)


def test_palette_with_transparency_decoded(tmp_path):
    image = Image.new("P", (32, 32), 1)
    image.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    image.save(tmp_path / "palette.png", transparency=0)
    pixels = load_image(tmp_path / "palette.png", LARGE_32)
    assert np.all(pixels == np.array([10, 200, 30], dtype=np.uint8))


def test_palette_gif_decoded(tmp_path):
    pixels = load_image(write_image(tmp_path / "anim.gif", (40, 30), mode="P"), LARGE_32)
    assert pixels.shape == (24, 32, 3)


def test_sixteen_bit_png_scaled_to_eight_bits(tmp_path):
    values = np.array([[0, 257 * 128, 65535, 65535]] * 4, dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    options = DecodeOptions(InferenceTransform(TransformName.RESIZE_SQUARE, 4))
    pixels = load_image(tmp_path / "deep.png", options)
    assert pixels[0, 0].tolist() == [0, 0, 0]
    assert pixels[0, 3].tolist() == [255, 255, 255]


def test_cmyk_jpeg_decoded(tmp_path):
    pixels = load_image(write_image(tmp_path / "print.jpg", (64, 48), mode="CMYK"), LARGE_32)
    assert pixels.shape == (24, 32, 3)


@pytest.mark.parametrize("draft", [False, True])
def test_exif_orientation_applied(tmp_path, draft):
    stored = np.zeros((100, 200, 3), dtype=np.uint8)
    stored[:, :100] = (255, 0, 0)  # left half red, right half blue as stored
    stored[:, 100:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise
    Image.fromarray(stored).save(tmp_path / "rotated.jpg", exif=exif, quality=95)

    options = DecodeOptions(InferenceTransform(TransformName.RESIZE_LARGE, 40), jpeg_draft=draft)
    pixels = load_image(tmp_path / "rotated.jpg", options)
    assert pixels.shape == (40, 20, 3)  # portrait once rotated
    # the stored left edge (red) is now the top, the right edge (blue) the bottom
    assert pixels[5, 10, 0] > 200
    assert pixels[5, 10, 2] < 60
    assert pixels[35, 10, 2] > 200
    assert pixels[35, 10, 0] < 60

    reference = ImageOps.exif_transpose(Image.open(tmp_path / "rotated.jpg")).convert("RGB").resize((20, 40))
    assert np.abs(pixels.astype(int) - np.asarray(reference).astype(int)).mean() < 8


def test_jpeg_draft_close_to_full_decode(tmp_path):
    path = write_image(tmp_path / "large.jpg", (1024, 768), quality=95)
    transform = InferenceTransform(TransformName.RESIZE_LARGE, 64)
    drafted = load_image(path, DecodeOptions(transform, jpeg_draft=True))
    full = load_image(path, DecodeOptions(transform, jpeg_draft=False))
    assert drafted.shape == full.shape == (48, 64, 3)
    difference = np.abs(drafted.astype(int) - full.astype(int))
    assert difference.mean() < 3
    assert not np.array_equal(drafted, full)  # the draft path did run
