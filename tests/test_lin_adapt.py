"""Loading adaptation layers: our state dicts, the ILIAS key layout, and rejected files."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from linear_adaptation.lin_adapt import LayerLoadError, LinearAdapter, apply_layer, load_lin_adapt_layer


def _create_marker(path: str) -> None:
    with open(path, "w") as f:
        f.write("code ran")


class _RunsCodeWhenUnpickled:
    """Pickles to a call of _create_marker, as a malicious checkpoint would to any callable."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (_create_marker, (self.marker,))


def _save_random_layer(tmp_path, in_features: int, out_features: int):
    """Save a seeded layer with a nonzero bias as the trainer does, and return it with its path."""
    torch.manual_seed(0)
    adapter = LinearAdapter(in_features, out_features)
    torch.nn.init.normal_(adapter.layer.bias)
    path = tmp_path / "lin_adapt.pth"
    torch.save(adapter.state_dict(), path)
    return adapter, path


def test_loads_trainer_state_dict(tmp_path):
    adapter, path = _save_random_layer(tmp_path, 8, 4)

    loaded = load_lin_adapt_layer(path, expected_in_features=8)
    assert not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    x = torch.randn(5, 8)
    torch.testing.assert_close(loaded(x), adapter(x))


def test_loads_ilias_layout_by_hand(tmp_path):
    weight, bias = torch.randn(3, 6), torch.randn(3)
    path = tmp_path / "ilias.pth"
    torch.save({"layer.weight": weight, "layer.bias": bias}, path)

    loaded = load_lin_adapt_layer(str(path))
    x = torch.randn(4, 6)
    torch.testing.assert_close(loaded(x), F.normalize(x @ weight.T + bias, dim=-1))
    assert loaded.in_features == 6
    assert loaded.out_features == 3
    assert torch.linalg.norm(loaded(x), dim=1).allclose(torch.ones(4))


def test_loads_gpu_saved_layer_on_cpu(tmp_path, monkeypatch):
    # The ILIAS trainer (--use_gpu true by default) saves tensors with a cuda:0 location.
    # Patching the location tag writes such a file on a machine without a GPU.
    weight, bias = torch.randn(3, 6), torch.randn(3)
    path = tmp_path / "gpu.pth"
    with monkeypatch.context() as patch:
        patch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save({"layer.weight": weight, "layer.bias": bias}, path)

    loaded = load_lin_adapt_layer(path, expected_in_features=6)
    assert loaded.layer.weight.device.type == "cpu"
    torch.testing.assert_close(loaded.layer.weight, weight)
    torch.testing.assert_close(loaded.layer.bias, bias)


def test_half_precision_weights_become_float32(tmp_path):
    path = tmp_path / "half.pth"
    torch.save({"layer.weight": torch.randn(2, 3).half(), "layer.bias": torch.zeros(2).half()}, path)
    assert load_lin_adapt_layer(path).layer.weight.dtype == torch.float32


def test_missing_file(tmp_path):
    with pytest.raises(LayerLoadError, match="not found"):
        load_lin_adapt_layer(tmp_path / "absent.pth")


def test_weights_only_rejects_code(tmp_path):
    marker = tmp_path / "marker.txt"
    path = tmp_path / "evil.pth"
    torch.save({"layer.weight": _RunsCodeWhenUnpickled(str(marker)), "layer.bias": torch.zeros(1)}, path)

    with pytest.raises(LayerLoadError, match=r"rejected by torch.load\(weights_only=True\)"):
        load_lin_adapt_layer(path)
    assert not marker.exists()

    # the same file does run code through a full unpickler, so the check above is meaningful
    torch.load(path, weights_only=False)
    assert marker.exists()


class _PickledModule(torch.nn.Module):
    pass


def test_weights_only_error_names_class(tmp_path):
    path = tmp_path / "module.pth"
    torch.save(_PickledModule(), path)

    with pytest.raises(LayerLoadError) as excinfo:
        load_lin_adapt_layer(path)
    message = str(excinfo.value)
    # torch's message opens with advice to set weights_only=False, but the reason is the class
    assert "_PickledModule" in message
    assert "weights_only` set to `False`" not in message
    assert "In PyTorch 2.6" not in message


@pytest.mark.parametrize(
    "state",
    [
        {"weight": torch.zeros(2, 3), "bias": torch.zeros(2)},
        {"layer.weight": torch.zeros(2, 3)},
        {"layer.weight": torch.zeros(2, 3), "layer.bias": torch.zeros(2), "epoch": torch.tensor(3)},
        {"module.layer.weight": torch.zeros(2, 3), "module.layer.bias": torch.zeros(2)},
    ],
    ids=["plain_linear", "no_bias", "extra_key", "prefixed"],
)
def test_wrong_keys(tmp_path, state):
    path = tmp_path / "layer.pth"
    torch.save(state, path)
    with pytest.raises(LayerLoadError, match=r"expected exactly \['layer.weight', 'layer.bias'\]"):
        load_lin_adapt_layer(path)


@pytest.mark.parametrize(
    ("weight", "bias", "message"),
    [
        (torch.zeros(6), torch.zeros(6), "'layer.weight' has shape \\(6,\\), expected 2"),
        (torch.zeros(2, 3), torch.zeros(3), "'layer.bias' has 3 values but 'layer.weight' has 2 rows"),
        (torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2), "expected a floating-point tensor"),
        (torch.full((2, 3), float("nan")), torch.zeros(2), "NaN or Inf"),
        (torch.zeros(0, 3), torch.zeros(0), "'layer.weight' has shape \\(0, 3\\), so the layer has no output"),
        (torch.zeros(2, 0), torch.zeros(2), "'layer.weight' has shape \\(2, 0\\), so the layer has no input"),
    ],
    ids=["weight_1d", "bias_length", "integer_weight", "nan_weight", "no_outputs", "no_inputs"],
)
def test_bad_tensors(tmp_path, weight, bias, message):
    path = tmp_path / "layer.pth"
    torch.save({"layer.weight": weight, "layer.bias": bias}, path)
    with pytest.raises(LayerLoadError, match=message):
        load_lin_adapt_layer(path)


def test_dimension_mismatch(tmp_path):
    path = tmp_path / "layer.pth"
    torch.save(LinearAdapter(1024, 512).state_dict(), path)
    with pytest.raises(LayerLoadError, match="maps 1024-dimensional embeddings but the embeddings have 768"):
        load_lin_adapt_layer(path, expected_in_features=768)


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), path)
    with pytest.raises(LayerLoadError, match="contains a Tensor, expected a state dict"):
        load_lin_adapt_layer(path)


def test_unreadable_file(tmp_path):
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"this is not a torch file")
    with pytest.raises(LayerLoadError, match="cannot read"):
        load_lin_adapt_layer(path)


def test_apply_layer_matches_module():
    adapter = LinearAdapter(5, 3).eval()
    embeddings = np.random.default_rng(0).standard_normal((7, 5)).astype(np.float16)
    adapted = apply_layer(adapter, embeddings, batch_rows=3)
    assert adapted.dtype == np.float32
    expected = adapter(torch.from_numpy(embeddings.astype(np.float32))).detach().numpy()
    np.testing.assert_allclose(adapted, expected, rtol=1e-6, atol=1e-6)


def test_apply_layer_rejects_dimension():
    with pytest.raises(ValueError, match=r"the layer expects \(N, 5\)"):
        apply_layer(LinearAdapter(5, 3), np.zeros((2, 4), dtype=np.float32))


def test_apply_layer_adapts_copies_identically():
    # Regression: the layer ran on blocks of --chunk_rows rows, and BLAS rounds a row differently
    # with the number of rows in the product. Copies of one image in blocks of other sizes (a
    # file's last block, another --chunk_rows) got vectors a few ulps apart and stopped tying.
    torch.manual_seed(0)
    adapter = LinearAdapter(256, 128).eval()
    torch.nn.init.normal_(adapter.layer.bias)
    rng = np.random.default_rng(0)
    embeddings = rng.standard_normal((1500, 256)).astype(np.float16)
    copies = [0, 1, 2, 511, 1023, 1024, 1100, 1499]
    embeddings[copies] = embeddings[0]

    reference = apply_layer(adapter, embeddings[:1])[0]
    for batch_rows in (1, 2, 3, 7, 100, 1024, 65536):
        adapted = apply_layer(adapter, embeddings, batch_rows=batch_rows)
        for row in copies:
            assert adapted[row].tobytes() == reference.tobytes(), (batch_rows, row)
    np.testing.assert_allclose(
        adapted, adapter(torch.from_numpy(embeddings.astype(np.float32))).detach().numpy(), rtol=1e-5, atol=1e-6
    )


def test_module_accepts_float16_embeddings(tmp_path):
    # The extractor stores float16 by default, so a caller's first try is the layer on those rows.
    _, path = _save_random_layer(tmp_path, 6, 4)
    layer = load_lin_adapt_layer(path)

    embeddings = F.normalize(torch.randn(5, 6), dim=1).half()
    adapted = layer(embeddings)

    assert adapted.dtype == torch.float32
    torch.testing.assert_close(adapted, layer(embeddings.float()), rtol=0, atol=0)
