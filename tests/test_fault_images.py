"""Broken and odd image files never stop an extraction run and never shift its rows.

Each case puts one odd file between two ordinary images in a list and runs extract.py's
main(). A readable file must be embedded in its row. An unreadable one must be left out
of the HDF5 file and listed in `<output>.failed.txt` with its reason. In both cases the
two ordinary images keep their order and their embeddings.
"""
import os
import re
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps

from feature_extraction.image_list import escape_id

from conftest import write_image
from fault_injection import FLOAT16_TOLERANCE, TINY_MODEL, extract_in_process, read_failure_report, read_hdf5

BEFORE, AFTER = "ok/before.jpg", "ok/after.png"


def _png_declaring_size(path, width, height):
    # only the header declares the size; no pixel buffer of that size is ever allocated
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)))


def _zero_bytes(root):
    (root / "odd").mkdir(parents=True, exist_ok=True)
    (root / "odd/empty.jpg").write_bytes(b"")
    return "odd/empty.jpg"


def _truncated_jpeg(root):
    data = write_image(root / "odd/full.jpg", (120, 90), seed=3).read_bytes()
    (root / "odd/full.jpg").unlink()
    (root / "odd/cut.jpg").write_bytes(data[: len(data) // 2])
    return "odd/cut.jpg"


def _random_bytes(root):
    (root / "odd").mkdir(parents=True, exist_ok=True)
    (root / "odd/noise.jpg").write_bytes(np.random.default_rng(5).bytes(3000))
    return "odd/noise.jpg"


def _png_with_alpha(root):
    write_image(root / "odd/alpha.png", (50, 40), seed=6, mode="RGBA")
    return "odd/alpha.png"


def _sixteen_bit_png(root):
    values = (np.arange(40 * 50, dtype=np.uint32).reshape(40, 50) * 30 % 65536).astype(np.uint16)
    (root / "odd").mkdir(parents=True, exist_ok=True)
    Image.fromarray(values).save(root / "odd/deep.png")
    assert Image.open(root / "odd/deep.png").mode.startswith("I")
    return "odd/deep.png"


def _greyscale(root):
    write_image(root / "odd/grey.jpg", (50, 40), seed=7, mode="L")
    return "odd/grey.jpg"


def _cmyk_jpeg(root):
    write_image(root / "odd/print.jpg", (50, 40), seed=8, mode="CMYK")
    assert Image.open(root / "odd/print.jpg").mode == "CMYK"
    return "odd/print.jpg"


def _palette_gif(root):
    write_image(root / "odd/anim.gif", (50, 40), seed=9, mode="P")
    return "odd/anim.gif"


def _one_pixel(root):
    write_image(root / "odd/dot.png", (1, 1), seed=10)
    return "odd/dot.png"


def _huge_declared_size(root):
    _png_declaring_size(root / "odd/bomb.png", 200_000, 200_000)
    return "odd/bomb.png"


def _directory(root):
    (root / "odd/folder.jpg").mkdir(parents=True)
    return "odd/folder.jpg"


def _missing(root):
    return "odd/never_written.jpg"


def _chinese_path(root):
    write_image(root / "货架/苹果.jpg", (50, 40), seed=11)
    return "货架/苹果.jpg"


def _escaped_name_on_disk(root):
    # some UnED folders (RP2K) store the file under the escaped form of the listed path
    write_image(root / escape_id("货架/梨.jpg"), (50, 40), seed=12)
    assert not (root / "货架/梨.jpg").exists()
    return "货架/梨.jpg"


def _png_named_jpg(root):
    write_image(root / "odd/really_a_png.jpg", (50, 40), seed=13, format="PNG")
    return "odd/really_a_png.jpg"


def _truncated_png(root):
    data = write_image(root / "odd/full.png", (120, 90), seed=14).read_bytes()
    (root / "odd/full.png").unlink()
    (root / "odd/cut.png").write_bytes(data[: len(data) // 2])
    return "odd/cut.png"


def _thin(root):
    write_image(root / "odd/thin.png", (3000, 1), seed=15)
    return "odd/thin.png"


def _tall(root):
    write_image(root / "odd/tall.png", (1, 3000), seed=16)
    return "odd/tall.png"


def _fifo(root):
    # Regression: a FIFO stats as 0 bytes and was reported as an empty file. Opening it
    # for reading would block until a writer appears.
    (root / "odd").mkdir(parents=True, exist_ok=True)
    os.mkfifo(root / "odd/pipe.jpg")
    return "odd/pipe.jpg"


# (case name, file maker, reason pattern for an unreadable file or None when it must be embedded)
CASES = [
    ("zero_bytes", _zero_bytes, r"^empty file \(0 bytes\)$"),
    ("truncated_jpeg", _truncated_jpeg, r"^truncated or corrupt image data: "),
    ("random_bytes_jpg", _random_bytes, r"^not an image \(no known image format\)$"),
    ("png_with_alpha", _png_with_alpha, None),
    ("sixteen_bit_png", _sixteen_bit_png, None),
    ("greyscale", _greyscale, None),
    ("cmyk_jpeg", _cmyk_jpeg, None),
    ("palette_gif", _palette_gif, None),
    ("one_pixel", _one_pixel, None),
    ("huge_declared_size", _huge_declared_size,
     r"^image too large: 200000x200000 = 40000000000 pixels, above the --max_image_pixels limit of \d+ "
     r"\(decompression-bomb guard\)$"),
    ("directory", _directory, r"^is a directory, not an image file$"),
    ("missing_file", _missing, r"^file not found$"),
    ("chinese_path", _chinese_path, None),
    ("escaped_name_on_disk", _escaped_name_on_disk, None),
    ("png_named_jpg", _png_named_jpg, None),
    ("truncated_png", _truncated_png, r"^truncated or corrupt image data: "),
    ("thin_3000x1", _thin, None),
    ("tall_1x3000", _tall, None),
    ("fifo", _fifo, r"^not a regular file \(a FIFO, socket or device\)$"),
]


def _write_list(path, entries):
    path.write_text("".join(f"{entry},{i},0\n" for i, entry in enumerate(entries)), encoding="utf-8")
    return path


def _extract(root, list_path, out_dir, *extra):
    code = extract_in_process("--dataset_dir", root, "--selected_ids", list_path, "--hdf5_dir", out_dir,
                              *TINY_MODEL, *extra)
    return code, out_dir / "features_uned.hdf5"


@pytest.fixture
def dataset(tmp_path):
    root = tmp_path / "images"
    write_image(root / BEFORE, (64, 48), seed=1)
    write_image(root / AFTER, (40, 56), seed=2)
    return root


@pytest.fixture
def clean_embeddings(dataset, tmp_path):
    """Embeddings of the two ordinary images, extracted without any odd file."""
    code, output = _extract(dataset, _write_list(tmp_path / "clean.txt", [BEFORE, AFTER]), tmp_path / "clean")
    assert code == 0
    features, ids, _ = read_hdf5(output)
    return dict(zip(ids, features))


@pytest.mark.parametrize("make, reason", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_odd_file_embedded_or_reported(dataset, clean_embeddings, tmp_path, caplog, make, reason):
    odd = make(dataset)
    list_path = _write_list(tmp_path / "list.txt", [BEFORE, odd, AFTER])
    code, output = _extract(dataset, list_path, tmp_path / "out")
    assert code == 0

    features, ids, attrs = read_hdf5(output)
    report = output.with_name(output.name + ".failed.txt")
    if reason is None:
        assert ids == [escape_id(BEFORE), escape_id(odd), escape_id(AFTER)]
        assert np.isfinite(features).all()
        np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, atol=FLOAT16_TOLERANCE)
        assert not report.exists()
        assert attrs["num_failed"] == 0
    else:
        assert ids == [escape_id(BEFORE), escape_id(AFTER)]
        reasons = read_failure_report(report)
        assert list(reasons) == [odd]
        assert reasons[odd] == reasons[odd].strip()
        assert re.search(reason, reasons[odd]), reasons[odd]
        assert attrs["num_failed"] == 1
        assert f"skipping {odd} (list line 2)" in caplog.text

    # the ordinary images keep their embeddings, whatever sits between them
    for image in (BEFORE, AFTER):
        row = ids.index(escape_id(image))
        np.testing.assert_allclose(features[row], clean_embeddings[escape_id(image)], atol=FLOAT16_TOLERANCE)


def test_exif_rotation_applied_before_embedding(dataset, tmp_path):
    # stored landscape with EXIF orientation 6 (displayed rotated 90 degrees clockwise)
    stored = write_image(tmp_path / "source.png", (60, 40), seed=20)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.open(stored).convert("RGB").save(dataset / "odd_rotated.jpg", exif=exif, quality=95)

    # the same pixels, rotated by hand and saved without EXIF, and not rotated at all
    decoded = Image.open(dataset / "odd_rotated.jpg")
    decoded.load()
    ImageOps.exif_transpose(decoded).save(dataset / "by_hand.png")
    decoded.getexif().clear()
    Image.fromarray(np.asarray(decoded.convert("RGB"))).save(dataset / "not_rotated.png")
    assert Image.open(dataset / "by_hand.png").size == (40, 60)

    entries = [BEFORE, "odd_rotated.jpg", "by_hand.png", "not_rotated.png", AFTER]
    code, output = _extract(dataset, _write_list(tmp_path / "list.txt", entries), tmp_path / "out")
    assert code == 0
    features, ids, _ = read_hdf5(output)
    assert ids == entries

    rotated, by_hand, not_rotated = features[1], features[2], features[3]
    np.testing.assert_allclose(rotated, by_hand, atol=FLOAT16_TOLERANCE)
    assert np.abs(rotated - not_rotated).max() > 10 * FLOAT16_TOLERANCE


def test_lowered_pixel_limit_reported(dataset, tmp_path):
    write_image(dataset / "big.png", (100, 80), seed=21)
    list_path = _write_list(tmp_path / "list.txt", [BEFORE, "big.png", AFTER])
    code, output = _extract(dataset, list_path, tmp_path / "out", "--max_image_pixels", "7999")
    assert code == 0
    reasons = read_failure_report(output.with_name(output.name + ".failed.txt"))
    assert reasons == {
        "big.png": "image too large: 100x80 = 8000 pixels, above the --max_image_pixels limit of 7999 "
                   "(decompression-bomb guard)"
    }
    # the two ordinary images are within the limit
    assert read_hdf5(output)[1] == [BEFORE, AFTER]


def test_all_unreadable_fails_without_output(dataset, tmp_path, caplog):
    _zero_bytes(dataset)
    _random_bytes(dataset)
    list_path = _write_list(tmp_path / "list.txt", ["odd/empty.jpg", "odd/noise.jpg", "odd/absent.jpg"])
    code, output = _extract(dataset, list_path, tmp_path / "out")
    assert code == 1
    assert "none of the 3 images could be read" in caplog.text
    assert not output.exists()
    assert not output.with_name(output.name + ".tmp").exists()
    assert not output.with_name(output.name + ".parts").exists()
