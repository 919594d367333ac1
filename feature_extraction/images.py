"""Robust image decoding: every file becomes an RGB uint8 array or an ImageDecodeError.

`load_image` turns any error of a bad file into an ImageDecodeError with a one-line
reason. Readable odd formats are converted. The EXIF orientation is applied, and CMYK,
greyscale, palette and other modes become RGB. An alpha channel is dropped and the
colour values under it are kept, as PIL's `convert("RGB")` and the ILIAS extractor do.
16-bit greyscale is scaled to 8 bits by dividing by 257.
"""
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from feature_extraction.transforms import InferenceTransform

# Pillow's own default for Image.MAX_IMAGE_PIXELS (above it Pillow warns of a possible
# decompression bomb); about 268 MB of RGB pixels once decoded
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485

# EXIF orientations 5 to 8 swap width and height
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)
_EXIF_ORIENTATION_TAG = 0x0112
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class ImageDecodeError(Exception):
    """A file that cannot be embedded; the message is the reason written to the failure report."""


@dataclass(frozen=True)
class DecodeOptions:
    transform: InferenceTransform
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    jpeg_draft: bool = True


def _check_file(path: Path) -> None:
    # One stat call serves every check. Path.is_dir() raises for some errors, such as a
    # file name longer than the file system allows, and that ended the whole run.
    try:
        status = path.stat()
    except FileNotFoundError:
        raise ImageDecodeError("file not found") from None
    except OSError as e:
        raise ImageDecodeError(f"cannot read file: {e.strerror}") from None
    except ValueError as e:  # a path the operating system cannot represent, e.g. with a NUL byte
        raise ImageDecodeError(f"invalid file path: {e}") from None
    if stat.S_ISDIR(status.st_mode):
        raise ImageDecodeError("is a directory, not an image file")
    # A FIFO would block the decoder until a writer appears, and a device has no image size.
    # Both stat as 0 bytes, so they are named before the size check.
    if not stat.S_ISREG(status.st_mode):
        raise ImageDecodeError("not a regular file (a FIFO, socket or device)")
    if status.st_size == 0:
        raise ImageDecodeError("empty file (0 bytes)")


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(_EXIF_ORIENTATION_TAG, 1))
    except Exception:  # a malformed EXIF block must not cost the image its pixels
        return 1


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        # PIL's own conversion clips 16-bit values at 255, which turns most pixels white
        values = np.asarray(image, dtype=np.float64) / 257.0
        grey = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if image.mode == "F":
        grey = np.clip(np.rint(np.asarray(image)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as e:
        raise ImageDecodeError(f"unsupported colour mode {image.mode}: {e}") from None


def _decode(path: Path, options: DecodeOptions) -> Image.Image:
    try:
        image = Image.open(path)
    except UnidentifiedImageError:
        raise ImageDecodeError("not an image (no known image format)") from None

    with image:
        width, height = image.size
        if width * height > options.max_image_pixels:
            raise ImageDecodeError(
                f"image too large: {width}x{height} = {width * height} pixels, above the "
                f"--max_image_pixels limit of {options.max_image_pixels} (decompression-bomb guard)"
            )

        orientation = _orientation(image)
        transposed = orientation in _TRANSPOSING_ORIENTATIONS
        source_size = (height, width) if transposed else (width, height)

        # JPEG draft mode decodes at 1/2, 1/4 or 1/8 scale straight from the DCT, much
        # faster than a full decode followed by a large downscale
        box = None
        if options.jpeg_draft and image.format in ("JPEG", "MPO"):
            draft_width, draft_height = options.transform.draft_size(*source_size)
            if transposed:
                draft_width, draft_height = draft_height, draft_width
            drafted = image.draft("RGB", (draft_width, draft_height))
            if drafted is not None and image.size != (width, height):
                box = drafted[1]

        image.load()
        if orientation != 1:
            image = ImageOps.exif_transpose(image)
            # The draft box is in the unrotated frame, so a rotated image is used whole. This
            # shifts the far edges by less than one reduced pixel.
            box = None
        rgb = _to_rgb(image)
        return options.transform.resize(rgb, source_size=source_size, box=box)


def load_image(path: str | os.PathLike, options: DecodeOptions) -> np.ndarray:
    """Decode, convert and resize one image file to an (H, W, 3) uint8 array.

    Raises ImageDecodeError with a one-line reason (missing, empty, a directory, not an
    image, too large, truncated or corrupt data, unsupported mode) for any file that
    cannot be embedded.
    """
    path = Path(path)
    _check_file(path)
    try:
        resized = _decode(path, options)
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(f"image too large (decompression-bomb guard): {e}") from None
    except OSError as e:
        raise ImageDecodeError(f"truncated or corrupt image data: {e}") from None
    except Exception as e:  # decoders raise SyntaxError, ValueError, struct.error, ... for bad data
        raise ImageDecodeError(f"decoding failed: {type(e).__name__}: {e}") from None
    return np.asarray(resized, dtype=np.uint8)
