"""From a batch of resized uint8 images to L2-normalised float32 embeddings.

On the device: mean/std normalisation, the transform's centred zero padding, zero
padding to a multiple of the ViT patch size, channels_last layout, optional autocast,
and optional multiscale averaging. Padding after normalisation fills with the mean
colour, as the ILIAS extractor's padding does.
"""
import contextlib
import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from feature_extraction.backbones import Backbone
from feature_extraction.transforms import InferenceTransform, centre_padding, multiple_padding

_logger = logging.getLogger(__name__)

MULTISCALE_FACTORS = (0.707, 1.0, 1.414)
AMP_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


class DeviceError(Exception):
    """A --device or precision request the machine cannot satisfy."""


def resolve_device(device: str) -> torch.device:
    """Map 'auto', 'cpu' or 'cuda' to a torch device; raise DeviceError if CUDA is requested but absent."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise DeviceError(
            "--device cuda was requested but torch finds no CUDA device "
            f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); use --device cpu or auto"
        )
    if device not in ("cpu", "cuda"):
        raise DeviceError(f"--device {device!r} is not one of auto, cpu, cuda")
    return torch.device(device)


def cpu_supports_bfloat16() -> bool:
    """Return True when oneDNN has native bfloat16 kernels on this CPU (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_autocast(device: torch.device, comp_fp16: bool, amp_dtype: str, cpu_bf16: bool) -> torch.dtype | None:
    """Return the autocast dtype for the device and flags, or None for plain float32."""
    if device.type == "cuda":
        return AMP_DTYPES[amp_dtype] if comp_fp16 else None
    if cpu_bf16:
        if cpu_supports_bfloat16():
            return torch.bfloat16
        _logger.warning("--cpu_bf16 is set but this CPU has no native bfloat16 support; computing in float32")
    return None


@dataclass
class Embedder:
    """Runs a backbone on uint8 batches and returns unit-norm float32 embeddings."""

    backbone: Backbone
    transform: InferenceTransform
    device: torch.device
    autocast_dtype: torch.dtype | None = None
    multiscale: bool = False

    def __post_init__(self) -> None:
        self.backbone.module.to(self.device, memory_format=torch.channels_last)
        std = np.asarray(self.backbone.std, dtype=np.float32)
        mean = np.asarray(self.backbone.mean, dtype=np.float32)
        # (x / 255 - mean) / std folded into one multiply-add per channel
        self._scale = 1.0 / (255.0 * std)  # (3,)
        self._offset = -mean / std  # (3,)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def _pad_to_patch_multiple(self, images: torch.Tensor) -> torch.Tensor:
        if self.backbone.patch_size is None:
            return images
        top, bottom = multiple_padding(images.shape[-2], self.backbone.patch_size[0])
        left, right = multiple_padding(images.shape[-1], self.backbone.patch_size[1])
        if top == bottom == left == right == 0:
            return images
        return F.pad(images, (left, right, top, bottom))

    def _normalise(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """Return (B, 3, H, W) float32 normalised images in channels_last layout on the device."""
        if self.device.type == "cpu":
            return self._normalise_numpy(images_uint8)
        return self._normalise_torch(images_uint8)

    def _normalise_numpy(self, images_uint8: torch.Tensor) -> torch.Tensor:
        # numpy, one thread: a per-row scale vector keeps the inner loop contiguous, about
        # 5x faster than torch's size-3 broadcast, and it does not wait for OpenMP threads
        batch, height, width, _ = images_uint8.shape
        pixels = images_uint8.numpy().astype(np.float32)  # (B, H, W, 3)
        rows = pixels.reshape(batch * height, width * 3)
        rows *= np.tile(self._scale, width)
        rows += np.tile(self._offset, width)
        return torch.from_numpy(pixels).permute(0, 3, 1, 2)

    def _normalise_torch(self, images_uint8: torch.Tensor) -> torch.Tensor:
        # the CUDA path: the uint8 batch is copied to the device, a quarter of the float32 bytes
        images = images_uint8.to(self.device, non_blocking=True).permute(0, 3, 1, 2)  # (B, 3, H, W)
        scale = torch.from_numpy(self._scale).to(self.device).view(1, 3, 1, 1)
        offset = torch.from_numpy(self._offset).to(self.device).view(1, 3, 1, 1)
        return images.float() * scale + offset

    def prepare(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """Turn (B, H, W, 3) uint8 into the normalised, padded (B, 3, H', W') float32 model input."""
        images = self._normalise(images_uint8)

        height, width = images.shape[-2:]
        target_height, target_width = self.transform.padded_size(height, width)
        if (target_height, target_width) != (height, width):
            top, bottom = centre_padding(height, target_height)
            left, right = centre_padding(width, target_width)
            images = F.pad(images, (left, right, top, bottom))
        return images

    def _forward(self, images: torch.Tensor) -> torch.Tensor:
        images = self._pad_to_patch_multiple(images).contiguous(memory_format=torch.channels_last)
        with self._autocast():
            features = self.backbone.module(images)
        return F.normalize(features.float(), dim=-1)  # (B, D)

    @torch.inference_mode()
    def embed(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """Embed a (B, H, W, 3) uint8 batch; return (B, D) float32 unit vectors on the CPU."""
        images = self.prepare(images_uint8)
        if not self.multiscale:
            return self._forward(images).cpu()

        per_scale = []
        for factor in MULTISCALE_FACTORS:
            scaled = images
            if factor != 1.0:
                scaled = F.interpolate(images, scale_factor=factor, mode="bicubic", align_corners=False)
            per_scale.append(self._forward(scaled))
        return F.normalize(torch.stack(per_scale).mean(dim=0), dim=-1).cpu()
