"""Flags of the older ILIAS extractor and trainer: kept with their defaults, or named in the README."""
import re
from pathlib import Path

import pytest

from feature_extraction.extract import get_args_parser as extract_parser
from linear_adaptation.train_lin_adapt import get_args_parser as train_parser

README = Path(__file__).resolve().parents[1] / "README.md"

# flag -> default in feature_extraction/extract.py of ilias-vrg/ilias
ILIAS_EXTRACT_DEFAULTS = {
    "dataset_dir": None, "partition": "image_queries", "hdf5_dir": None, "hdf5_name": "features",
    "hdf5_compression": 0, "overwrite": False, "framework": "timm",
    "model": "vit_large_patch16_siglip_384.webli", "pooling": "head", "webdl_batch_size": 128,
    "transforms": "RESIZE_LARGE", "resolution": 512, "min_size": 0, "multiscale": False, "multirotate": False,
    "masking": False, "crop_resize": False, "comp_fp16": True, "start_tar": 0, "total_tars": None,
    "tar_batch_size": 10, "store_fp16": True, "selected_ids": None,
}
# the help states the machine-dependent defaults of these two (16 or 128 images, min(8, cores) workers)
ILIAS_EXTRACT_MACHINE_DEFAULTS = ("batch_size", "num_workers")
ILIAS_EXTRACT_CHOICES = {
    "partition": ("image_queries", "text_queries", "positives", "distractors", "uned"),
    "framework": ("timm", "tv", "hf", "och", "fb", "cvn", "unc", "unicom", "text"),
    "pooling": ("head", "cls", "gap", "mac", "gem", "rmac", "rgem", "local"),
}
# flag -> default in linear_adaptation/train_lin_adapt.py of ilias-vrg/ilias
ILIAS_TRAIN_DEFAULTS = {
    "uned_features_path": None, "uned_info_path": None, "num_epochs": 5, "lr": 1e-3, "batch_size": 128,
    "adaptation_layer_dim": 512, "save_dir": None,
}


def not_carried_over_text() -> str:
    """Return the README's Limits bullet that lists what the ILIAS extractor has and this one lacks."""
    match = re.search(r"^- Not carried over.*?(?=^- |^#|\Z)", README.read_text(encoding="utf-8"), re.M | re.S)
    assert match, "README.md has no '- Not carried over' bullet under Limits"
    return " ".join(match.group(0).split())


def actions_by_flag(parser) -> dict:
    return {action.dest: action for action in parser._actions}


@pytest.mark.parametrize("flag", sorted(ILIAS_EXTRACT_DEFAULTS) + list(ILIAS_EXTRACT_MACHINE_DEFAULTS))
def test_ilias_extract_flag_kept_or_listed(flag):
    actions = actions_by_flag(extract_parser())
    if flag not in actions:
        assert f"`--{flag}`" in not_carried_over_text()
        return
    if flag in ILIAS_EXTRACT_MACHINE_DEFAULTS:
        return
    default, ilias_default = extract_parser().get_default(flag), ILIAS_EXTRACT_DEFAULTS[flag]
    if default != ilias_default:
        assert f"`--{flag}`" in not_carried_over_text(), f"--{flag} defaults to {default!r}, not {ilias_default!r}"


@pytest.mark.parametrize("flag", sorted(ILIAS_EXTRACT_CHOICES))
def test_ilias_extract_choices_kept_or_listed(flag):
    ours = set(actions_by_flag(extract_parser())[flag].choices)
    listed = not_carried_over_text()
    for value in ILIAS_EXTRACT_CHOICES[flag]:
        if value not in ours:
            assert f"`{value}`" in listed, f"--{flag} {value} is neither accepted nor listed in the README"


@pytest.mark.parametrize("flag", sorted(ILIAS_TRAIN_DEFAULTS))
def test_ilias_train_flag_kept(flag):
    assert train_parser().get_default(flag) == ILIAS_TRAIN_DEFAULTS[flag]

