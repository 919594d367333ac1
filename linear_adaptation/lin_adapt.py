"""The linear adaptation layer: an `nn.Linear` whose output is L2-normalised.

Its state dict has exactly the keys `layer.weight` (out x in) and `layer.bias` (out),
the layout of the layers published with ILIAS, so either side can load the other's files.
"""
import os
import pickle
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from feature_extraction.checkpoints import explain_weights_only_error
from linear_adaptation.features_io import DataError

LAYER_KEYS = ("layer.weight", "layer.bias")


class LinearAdapter(nn.Module):
    """Linear map from backbone embeddings to adapted, L2-normalised embeddings."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.layer = nn.Linear(in_features, out_features)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.layer.weight)
        nn.init.zeros_(self.layer.bias)

    @property
    def in_features(self) -> int:
        return self.layer.in_features

    @property
    def out_features(self) -> int:
        return self.layer.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 1:
            x = x.unsqueeze(0)
        # HDF5 embeddings are float16 by default, and nn.Linear rejects inputs of another dtype
        x = x.to(self.layer.weight.dtype)
        return F.normalize(self.layer(x), p=2, dim=-1)


class LayerLoadError(DataError):
    """A layer file that cannot be used: the message names the file, the problem and the fix."""


def _check_tensor(path: str, state: Mapping, key: str, ndim: int) -> torch.Tensor:
    value = state[key]
    if not isinstance(value, torch.Tensor):
        raise LayerLoadError(f"{path!r}: '{key}' is a {type(value).__name__}, expected a tensor")
    if value.dim() != ndim:
        raise LayerLoadError(
            f"{path!r}: '{key}' has shape {tuple(value.shape)}, expected {ndim} dimension(s)"
        )
    if not value.is_floating_point():
        raise LayerLoadError(f"{path!r}: '{key}' has dtype {value.dtype}, expected a floating-point tensor")
    if not torch.isfinite(value).all():
        raise LayerLoadError(f"{path!r}: '{key}' contains NaN or Inf values; retrain or re-download the layer")
    return value


def load_lin_adapt_layer(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    expected_in_features: int | None = None,
) -> LinearAdapter:
    """Load a layer file with exactly the keys `layer.weight` and `layer.bias`.

    The file is read with `torch.load(weights_only=True)`, so a file containing pickled
    objects other than tensors and containers is rejected instead of run. Weights are
    cast to float32.

    Args:
        path: `.pth` state dict written by the trainer or published with ILIAS.
        device: Device of the returned module.
        expected_in_features: Dimension of the embeddings the layer will be applied to.
            Checked against the layer's input dimension when given.

    Returns:
        A LinearAdapter in eval mode without gradients, mapping embeddings to
        L2-normalised adapted embeddings.

    Raises:
        LayerLoadError: The file is missing, unreadable, rejected by `weights_only`, has
            other keys, tensors of the wrong shape, or an input dimension other than
            `expected_in_features`.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise LayerLoadError(f"layer file {path!r} not found; check --lin_adapt_path")

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message is long, and one line of it names what was rejected
        forbidden, detail = explain_weights_only_error(e)
        if not forbidden:
            raise LayerLoadError(f"cannot read {path!r} as a torch file ({detail}); was it written completely?") from e
        raise LayerLoadError(
            f"{path!r} was rejected by torch.load(weights_only=True) because it contains objects other than "
            f"tensors ({detail}); use a plain state dict with 'layer.weight' and 'layer.bias' from a trusted source"
        ) from e
    except Exception as e:  # noqa: BLE001
        # bytes that are not a torch file make the unpickler fail with almost any exception type
        raise LayerLoadError(f"cannot read {path!r} as a torch file ({e!r}); was it written completely?") from e

    if not isinstance(state, Mapping):
        raise LayerLoadError(
            f"{path!r} contains a {type(state).__name__}, expected a state dict with 'layer.weight' and 'layer.bias'"
        )
    keys = sorted(str(key) for key in state)
    if keys != sorted(LAYER_KEYS):
        raise LayerLoadError(
            f"{path!r} has keys {keys}, expected exactly {list(LAYER_KEYS)}; a full training checkpoint or a "
            "state dict of another module cannot be used, save LinearAdapter.state_dict() instead"
        )

    weight = _check_tensor(path, state, "layer.weight", ndim=2)  # (out, in)
    bias = _check_tensor(path, state, "layer.bias", ndim=1)  # (out,)
    out_features, in_features = weight.shape
    # an empty weight would map every embedding to the same empty vector, and every score would tie
    for size, side in ((out_features, "output"), (in_features, "input")):
        if size == 0:
            raise LayerLoadError(
                f"{path!r}: 'layer.weight' has shape {tuple(weight.shape)}, so the layer has no {side} "
                "dimension; the file is not a trained layer, retrain or re-download it"
            )
    if bias.shape[0] != out_features:
        raise LayerLoadError(
            f"{path!r}: 'layer.bias' has {bias.shape[0]} values but 'layer.weight' has {out_features} rows; "
            "the file mixes tensors of different layers"
        )
    if expected_in_features is not None and in_features != expected_in_features:
        raise LayerLoadError(
            f"{path!r} maps {in_features}-dimensional embeddings but the embeddings have {expected_in_features} "
            "dimensions; use the layer trained on embeddings of the same backbone"
        )

    adapter = LinearAdapter(in_features, out_features)
    adapter.load_state_dict({"layer.weight": weight.float(), "layer.bias": bias.float()}, strict=True)
    adapter.requires_grad_(False)
    return adapter.to(device).eval()


# Rows per matrix product when a layer adapts stored embeddings (see `adapt_rows`)
LAYER_BLOCK_ROWS = 1024


@torch.no_grad()
def adapt_rows(adapter: LinearAdapter, embeddings: torch.Tensor) -> torch.Tensor:
    """Return the adapted, L2-normalised float32 embeddings (N, D_out) of (N, D_in) embeddings.

    The rows go through the layer in products of exactly LAYER_BLOCK_ROWS rows, the last
    one padded with zero rows. A BLAS product rounds a row's result differently with the
    number of rows in the product (one row becomes a matrix-vector product, for instance),
    so copies of one image adapted in blocks of different sizes (a file's last block, another
    --chunk_rows) would come out a few ulps apart and be ranked by rounding instead of tying.
    With one shape, every copy gets the same vector wherever it is. This was checked on CPU
    with MKL and 1 to 16 threads, not on a GPU. Computing in float64 only makes that rarer.
    """
    num_rows = embeddings.shape[0]
    out = torch.empty((num_rows, adapter.out_features), dtype=torch.float32, device=embeddings.device)
    for start in range(0, num_rows, LAYER_BLOCK_ROWS):
        block = embeddings[start : start + LAYER_BLOCK_ROWS].float()
        rows = block.shape[0]
        if rows < LAYER_BLOCK_ROWS:
            block = torch.cat([block, block.new_zeros(LAYER_BLOCK_ROWS - rows, block.shape[1])])
        out[start : start + rows] = adapter(block)[:rows]
    return out


@torch.no_grad()
def apply_layer(
    adapter: LinearAdapter, embeddings: np.ndarray, batch_rows: int = 65536
) -> np.ndarray:
    """Map (N, D_in) embeddings of any float dtype to (N, D_out) adapted float32 embeddings.

    Rows are converted to float32 and moved to the adapter's device `batch_rows` at a
    time, and adapted by `adapt_rows`, so the result does not depend on `batch_rows`.
    """
    if embeddings.ndim != 2 or embeddings.shape[1] != adapter.in_features:
        raise ValueError(
            f"embeddings have shape {tuple(embeddings.shape)} but the layer expects (N, {adapter.in_features})"
        )
    device = adapter.layer.weight.device
    out = np.empty((embeddings.shape[0], adapter.out_features), dtype=np.float32)
    for start in range(0, embeddings.shape[0], batch_rows):
        block = torch.from_numpy(np.asarray(embeddings[start : start + batch_rows], dtype=np.float32))
        out[start : start + batch_rows] = adapt_rows(adapter, block.to(device)).cpu().numpy()
    return out
