"""Boolean flag values read the same way by every command."""
import pytest

from feature_extraction.extract import get_args_parser as extract_parser
from linear_adaptation.evaluate import get_args_parser as evaluate_parser
from linear_adaptation.train_lin_adapt import get_args_parser as train_parser

EXTRACT_REQUIRED = ["--dataset_dir", "d", "--hdf5_dir", "h"]
TRAIN_REQUIRED = ["--uned_features_path", "f.hdf5", "--uned_info_path", "l.txt", "--save_dir", "l.pth"]
EVALUATE_REQUIRED = ["--features_path", "f.hdf5", "--info_path", "l.txt"]


@pytest.mark.parametrize("word, expected", [
    ("true", True), ("Yes", True), ("on", True), ("1", True), ("y", True), ("T", True),
    ("false", False), ("NO", False), ("off", False), ("0", False), ("n", False), ("f", False),
])
def test_bool_words_same_in_every_command(word, expected):
    extract_args = extract_parser().parse_args([*EXTRACT_REQUIRED, "--overwrite", word])
    train_args = train_parser().parse_args([*TRAIN_REQUIRED, "--progress", word, "--allow_missing", word])
    evaluate_args = evaluate_parser().parse_args([*EVALUATE_REQUIRED, "--allow_missing", word])
    assert extract_args.overwrite is expected
    assert train_args.progress is expected
    assert train_args.allow_missing is expected
    assert evaluate_args.allow_missing is expected


@pytest.mark.parametrize("parser, required, flag", [
    (extract_parser, EXTRACT_REQUIRED, "--overwrite"),
    (train_parser, TRAIN_REQUIRED, "--progress"),
    (evaluate_parser, EVALUATE_REQUIRED, "--allow_missing"),
])
def test_bool_flag_rejects_other_words(parser, required, flag, capsys):
    with pytest.raises(SystemExit) as info:
        parser().parse_args([*required, flag, "maybe"])
    assert info.value.code == 2
    assert "invalid boolean 'maybe'; use true/false, on/off, 1/0 or yes/no" in capsys.readouterr().err
