"""Local weight files for `--checkpoint`: reading them safely and loading them strictly."""
import logging
import pickle
from pathlib import Path

import torch
from torch import nn

_logger = logging.getLogger(__name__)

# containers that training scripts commonly wrap a state dict in
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")
_MAX_LISTED_KEYS = 10


class CheckpointError(Exception):
    """A checkpoint that cannot be read or does not fit the model; the message names the fix."""


def _unwrap(obj: object, path: Path) -> dict[str, torch.Tensor]:
    for key in _WRAPPER_KEYS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            _logger.info("using the %r entry of %s as the state dict", key, path)
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(
            f"--checkpoint {str(path)!r} does not contain a state dict (got {type(obj).__name__}); "
            "save the weights with torch.save(model.state_dict(), path)"
        )
    not_tensors = [key for key, value in obj.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(
            f"--checkpoint {str(path)!r} has entries that are not tensors, e.g. {not_tensors[:3]}; "
            "pass a plain state dict (parameter name -> tensor)"
        )

    # checkpoints saved from DistributedDataParallel prefix every key with 'module.'
    if all(key.startswith("module.") for key in obj):
        obj = {key[len("module.") :]: value for key, value in obj.items()}
    return obj


# Phrases of torch's weights_only unpickler (torch/_weights_only_unpickler.py, read in
# torch 2.14) when it meets an object it does not allow. Its other errors, such as
# "Unsupported operand", come from bytes that are not a torch pickle at all.
_FORBIDDEN_OBJECT_PHRASES = ("GLOBAL", "add_safe_globals", "Can only build", "Can only create")
_BOILERPLATE_PREFIXES = ("Weights only load failed", "Please file an issue", "Check the documentation", "(1)", "(2)")
# The text after this prefix names the rejected object.
_REASON_PREFIX = "WeightsUnpickler error:"


def explain_weights_only_error(error: pickle.UnpicklingError) -> tuple[bool, str]:
    """Classify an error of `torch.load(weights_only=True)` and pick its informative line.

    Returns whether the file contains objects that weights_only forbids (as opposed to
    bytes that are not a torch file), and the line of torch's message that gives the reason.
    """
    text = str(error)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    reason = next((line for line in lines if line.startswith(_REASON_PREFIX)), None)
    if reason is not None:
        # Keep the first sentence, because the rest advises allowlisting the object.
        detail = reason[len(_REASON_PREFIX):].strip().split(". ")[0].rstrip(".")
    else:
        detail = next((line for line in lines if not line.startswith(_BOILERPLATE_PREFIXES)), lines[-1] if lines else "")
    return any(phrase in text for phrase in _FORBIDDEN_OBJECT_PHRASES), detail


def _is_safetensors(path: Path) -> bool:
    """Return whether the file is named or starts as a safetensors file: an 8-byte header size, then JSON.

    torch.save files start with a zip or pickle signature, whose ninth byte is not '{'.
    """
    if path.suffix.lower() == ".safetensors":
        return True
    try:
        with open(path, "rb") as f:
            start = f.read(9)
    except OSError as e:
        raise CheckpointError(f"cannot read --checkpoint {str(path)!r}: {e}") from e
    return len(start) == 9 and start[8:9] == b"{"


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a torch.save file (`.pth`, `.pt`, `.bin`) or a safetensors file into a state dict.

    Safetensors files are recognised by their suffix in any case, or by their first bytes.

    Pickle files are read with `weights_only=True`, so a file that would run code when
    unpickled is rejected.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"--checkpoint {str(path)!r} is not a file; pass the path of a local weight file")

    if _is_safetensors(path):
        from safetensors.torch import load_file

        try:
            return _unwrap(load_file(str(path), device="cpu"), path)
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise CheckpointError(f"cannot read --checkpoint {str(path)!r} as safetensors: {e}") from e

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        forbidden, detail = explain_weights_only_error(e)
        if not forbidden:
            raise CheckpointError(
                f"cannot read --checkpoint {str(path)!r}: it is not a file written by torch.save, or it is "
                f"damaged ({detail})"
            ) from e
        raise CheckpointError(
            f"--checkpoint {str(path)!r} was rejected by torch.load(weights_only=True) because it "
            f"contains objects other than tensors ({detail}); re-save only the weights with "
            "torch.save(model.state_dict(), path)"
        ) from e
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise CheckpointError(f"cannot read --checkpoint {str(path)!r}: {e}") from e
    return _unwrap(obj, path)


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED_KEYS])
    more = len(keys) - _MAX_LISTED_KEYS
    return shown + (f" and {more} more" if more > 0 else "")


def load_state_dict_strict(
    module: nn.Module, state_dict: dict[str, torch.Tensor], ignored_prefixes: tuple[str, ...] = (), source: str = ""
) -> None:
    """Load `state_dict` into `module`, requiring every key and shape to match.

    Keys of the checkpoint that start with one of `ignored_prefixes` and that the module
    lacks (for example a classifier removed with num_classes=0) are dropped with a log line.
    Raises CheckpointError listing missing, unexpected and mis-shaped keys.
    """
    expected = module.state_dict()
    dropped = [
        key for key in state_dict if key not in expected and any(key.startswith(p) for p in ignored_prefixes)
    ]
    if dropped:
        _logger.info("ignoring %d checkpoint keys the model does not use: %s", len(dropped), _listing(dropped))
    state_dict = {key: value for key, value in state_dict.items() if key not in dropped}

    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mis_shaped = [
        f"{key} {tuple(state_dict[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in state_dict
        if key in expected and state_dict[key].shape != expected[key].shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {_listing(unexpected)}")
    if mis_shaped:
        problems.append(f"{len(mis_shaped)} keys with other shapes: {_listing(mis_shaped)}")
    if problems:
        raise CheckpointError(
            f"--checkpoint {source} does not match the model: " + "; ".join(problems)
            + ". Check that --framework and --model name the architecture the weights were trained "
            "with, and that the keys use that library's layout"
        )
    module.load_state_dict(state_dict, strict=True)
    # open_clip warns that a model built without a pretrained tag is random, so this line confirms the load
    _logger.info("loaded %d tensors from --checkpoint %s", len(state_dict), source)
