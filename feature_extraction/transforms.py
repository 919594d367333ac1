"""Resize and padding rules of the inference transforms, the same as the ILIAS extractor's.

Each transform is split in two stages so that batches can be formed by exact shape.

`resize` runs in the decode workers on PIL images:
- RESIZE_LARGE and RESIZE_PAD resize the longer side to the resolution and keep the
  aspect ratio (PIL bicubic).
- RESIZE_SMALL resizes the shorter side (PIL bilinear, as torchvision `Resize(res)`).
- RESIZE_CENTER does the same and then crops the centre square (torchvision `CenterCrop`).
- RESIZE_SQUARE resizes to res x res (PIL bilinear).

`padded_size` gives the centred zero padding applied to the batch after mean/std
normalisation: RESIZE_LARGE pads each side up to `min_size`, RESIZE_PAD pads to res x res.
"""
import enum
from dataclasses import dataclass

from PIL import Image

# the draft decoder may shrink a JPEG by a power of two until a side would fall below
# this multiple of the resized side, so a real resample of at least 2x always follows
DRAFT_OVERSAMPLING = 2


class TransformName(str, enum.Enum):
    RESIZE_LARGE = "RESIZE_LARGE"
    RESIZE_SMALL = "RESIZE_SMALL"
    RESIZE_CENTER = "RESIZE_CENTER"
    RESIZE_SQUARE = "RESIZE_SQUARE"
    RESIZE_PAD = "RESIZE_PAD"


def large_side_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """Return (width, height) with the longer side at `resolution` and the aspect ratio kept."""
    aspect = height / width
    if aspect <= 1:
        return resolution, max(1, int(resolution * aspect))
    return max(1, int(resolution / aspect)), resolution


def small_side_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """Return (width, height) with the shorter side at `resolution`, rounding the longer down."""
    if width <= height:
        return resolution, int(resolution * height / width)
    return int(resolution * width / height), resolution


@dataclass(frozen=True)
class InferenceTransform:
    """One inference transform: a resize stage on PIL images and a padding stage on tensors."""

    name: TransformName
    resolution: int
    min_size: int = 0

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """Return the (width, height) that `resize` scales an image of this size to, before any crop."""
        if self.name in (TransformName.RESIZE_LARGE, TransformName.RESIZE_PAD):
            return large_side_size(width, height, self.resolution)
        if self.name in (TransformName.RESIZE_SMALL, TransformName.RESIZE_CENTER):
            return small_side_size(width, height, self.resolution)
        return self.resolution, self.resolution

    def draft_size(self, width: int, height: int) -> tuple[int, int]:
        """Return the smallest decode size that keeps a 2x margin over the resized size."""
        resized_width, resized_height = self.resized_size(width, height)
        return (
            min(width, resized_width * DRAFT_OVERSAMPLING),
            min(height, resized_height * DRAFT_OVERSAMPLING),
        )

    def resize(
        self,
        image: Image.Image,
        source_size: tuple[int, int] | None = None,
        box: tuple[float, float, float, float] | None = None,
    ) -> Image.Image:
        """Resize (and for RESIZE_CENTER crop) an RGB image.

        After a JPEG draft decode, `source_size` is the (width, height) of the full picture,
        which sets the output size, and `box` the region of the reduced `image` that covers
        it (its last row and column can be partly padding).
        """
        if box is None:
            box = (0, 0, image.width, image.height)
        width, height = self.resized_size(*(source_size or image.size))

        if self.name in (TransformName.RESIZE_LARGE, TransformName.RESIZE_PAD):
            resample = Image.Resampling.BICUBIC
        else:
            resample = Image.Resampling.BILINEAR
        if (width, height) != image.size or box != (0, 0, image.width, image.height):
            image = image.resize((width, height), resample, box=box)

        if self.name == TransformName.RESIZE_CENTER:
            # same rounding as torchvision's center_crop; both sides are >= resolution here
            top = int(round((height - self.resolution) / 2.0))
            left = int(round((width - self.resolution) / 2.0))
            image = image.crop((left, top, left + self.resolution, top + self.resolution))
        return image

    def fixed_output_size(self) -> tuple[int, int] | None:
        """Return the (height, width) of every model input when all images get the same size, else None."""
        if self.name in (TransformName.RESIZE_CENTER, TransformName.RESIZE_SQUARE, TransformName.RESIZE_PAD):
            return self.resolution, self.resolution
        # the longer side is at the resolution, so padding both sides to min_size gives a square
        if self.name == TransformName.RESIZE_LARGE and self.min_size >= self.resolution:
            return self.min_size, self.min_size
        return None

    def padded_size(self, height: int, width: int) -> tuple[int, int]:
        """Return the (height, width) after the centred zero padding of the batch stage."""
        if self.name == TransformName.RESIZE_LARGE:
            return max(height, self.min_size), max(width, self.min_size)
        if self.name == TransformName.RESIZE_PAD:
            return max(height, self.resolution), max(width, self.resolution)
        return height, width


def centre_padding(size: int, target: int) -> tuple[int, int]:
    """Return the (before, after) zero padding that centres `size` in `target`, the extra pixel after."""
    total = max(target - size, 0)
    return total // 2, total - total // 2


def multiple_padding(size: int, multiple: int) -> tuple[int, int]:
    """Return the centred padding that brings `size` up to the next multiple of `multiple`."""
    target = -(-size // multiple) * multiple
    return centre_padding(size, target)
