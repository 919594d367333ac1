"""Smoke tests of the benchmark scripts at tiny sizes: they run and print the documented fields."""
import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch

from benchmarks import bench_extract, bench_seeds, bench_train
from benchmarks.machine import usable_cores
from benchmarks.memory import PeakMemorySampler
from linear_adaptation.synthetic import make_synthetic_dataset, write_split

REPO_ROOT = Path(__file__).resolve().parents[1]

TINY_TRAIN = [
    "--num_images", "600", "--num_classes", "60", "--dim", "32", "--num_heldout_images", "120",
    "--num_heldout_classes", "12", "--out_dim", "16", "--batch_size", "64", "--epochs", "2", "--lr", "3e-3",
]
TINY_EXTRACT = [
    "--model", "test_vit", "--resolution", "48", "--num_workers", "1", "--window_size", "4", "--batch_size", "4",
    "--num_images", "0",
]
TRAIN_FIELDS = (
    "seconds_per_epoch", "steps_per_second", "train_seconds", "map_before", "map_after", "peak_rss_training_mib",
    "peak_rss_process_mib", "peak_gpu_allocated_mib", "load_average_before", "machine",
)
EXTRACT_FIELDS = (
    "end_to_end_images_per_second", "forward_images_per_second", "end_to_end_over_forward", "embed_images_per_second",
    "decode_images_per_second", "peak_rss_mib", "peak_pss_mib", "peak_rss_uss_mib", "max_processes", "precision", "machine",
)


def printed_summary(output: str) -> dict:
    lines = [line for line in output.splitlines() if line.startswith("summary: ")]
    assert len(lines) == 1
    return json.loads(lines[0].removeprefix("summary: "))


def stored_split_args(data, folder) -> list[str]:
    """Write the synthetic splits as HDF5 files and lists, and return the flags that name them."""
    write_split(data.train, folder / "train.hdf5", folder / "train.txt")
    write_split(data.heldout, folder / "heldout.hdf5", folder / "heldout.txt")
    return [
        "--train_features", str(folder / "train.hdf5"), "--train_list", str(folder / "train.txt"),
        "--val_features", str(folder / "heldout.hdf5"), "--val_list", str(folder / "heldout.txt"),
    ]


def test_train_bench_prints_summary(capsys, tmp_path):
    json_path = tmp_path / "train.json"
    assert bench_train.run([*TINY_TRAIN, "--json", str(json_path)]) == 0
    output = capsys.readouterr().out
    summary = printed_summary(output)

    for field in TRAIN_FIELDS:
        assert field in summary
    assert summary["data"]["num_images"] == 600
    assert summary["recipe"]["steps"] == 2 * (600 // 64)
    assert summary["seconds_per_epoch"] > 0
    assert summary["steps_per_second"] > 0
    assert 0 <= summary["map_before"] <= 100
    assert 0 <= summary["map_after"] <= 100
    assert summary["peak_rss_training_mib"] > 0
    assert summary["peak_gpu_allocated_mib"] is None  # CPU run
    assert "mAP@100" in output
    assert json.loads(json_path.read_text()) == summary


def test_train_bench_follows_trainer_defaults():
    args = bench_train.get_args_parser().parse_args([])
    assert (args.batch_size, args.lr, args.out_dim, args.weight_decay) == (128, 1e-3, 512, 1e-6)
    assert (args.epochs, args.lr_schedule, args.amp) == (5, "constant", "none")


def test_train_bench_reads_stored_embeddings(capsys, tmp_path):
    data = make_synthetic_dataset(num_train_images=300, num_train_classes=30, num_heldout_images=60,
                                  num_heldout_classes=6, dim=24, seed=1)
    argv = [
        *stored_split_args(data, tmp_path),
        "--out_dim", "8", "--batch_size", "32", "--epochs", "1", "--target_map", "0",
    ]
    # the synthetic size flags are ignored with stored embeddings, as their help text states
    assert bench_train.run([*argv, "--num_images", "0", "--dim", "0"]) == 0
    summary = printed_summary(capsys.readouterr().out)

    assert summary["data"]["source"] == "stored"
    assert summary["data"]["num_images"] == 300
    assert summary["recipe"]["steps"] == 300 // 32
    # every mAP reaches 0, so the target is met after the first epoch
    assert summary["seconds_to_target_map"] == pytest.approx(summary["train_seconds"])


def test_seed_bench_compares_both_runs(capsys, tmp_path):
    data = make_synthetic_dataset(num_train_images=400, num_train_classes=20, num_heldout_images=80,
                                  num_heldout_classes=8, dim=24, seed=2)
    argv = [
        *stored_split_args(data, tmp_path),
        "--seeds", "3", "--first_seed", "5", "--epochs", "1", "--threshold", "0", "--json", str(tmp_path / "s.json"),
    ]
    assert bench_seeds.run(argv) == 0
    output = capsys.readouterr().out
    summary = printed_summary(output)

    assert summary["seeds"] == [5, 7]
    assert [line.split()[0] for line in output.splitlines() if line[:4].strip().isdigit()] == ["5", "6", "7"]
    for name in ("trainer", "reference"):
        stats = summary[name]["all_queries"]
        assert 0 <= stats["min"] <= stats["mean"] <= stats["max"] <= 100
        assert stats["seeds_at_threshold"] == 3
        assert summary[name]["macro"]["sd"] >= 0
    assert json.loads((tmp_path / "s.json").read_text())["trainer"] == summary["trainer"]
    assert "3 of 3 seeds reach 0 over all queries" in output
    # the README promises the load average before and after the run in every summary
    assert len(summary["load_average_before"]) == 3
    assert len(summary["load_average_after"]) == 3


def test_train_bench_reports_median_of_repeats(capsys):
    assert bench_train.run([*TINY_TRAIN, "--epochs", "1", "--repeats", "3"]) == 0
    summary = printed_summary(capsys.readouterr().out)

    repeats = summary["train_seconds_repeats"]
    assert len(repeats) == 3
    assert summary["train_seconds"] == sorted(repeats)[1]


def test_train_bench_profiles_steps(capsys):
    argv = [*TINY_TRAIN, "--epochs", "1", "--untimed_steps", "2", "--profile_steps", "3", "--profile_rows", "5"]
    assert bench_train.run(argv) == 0
    output = capsys.readouterr().out
    assert "torch.profiler, 3 training steps" in output
    assert "Self CPU" in output
    assert printed_summary(output)["untimed_steps"] == 2


def test_train_bench_short_runs_keep_warmup_quiet(caplog):
    # The untimed and profiled runs are shorter than the recipe's warmup. Their learning rate does
    # not matter, so the trainer's "lower --warmup_steps" advice must come only from the timed run.
    argv = [*TINY_TRAIN, "--epochs", "1", "--warmup_steps", "5", "--untimed_steps", "2", "--profile_steps", "3"]
    assert bench_train.run(argv) == 0
    assert "lower --warmup_steps" not in caplog.text

    assert bench_train.run([*TINY_TRAIN, "--epochs", "1", "--warmup_steps", "9"]) == 0
    assert "--warmup_steps 9 is not below the 9 training steps" in caplog.text


def test_train_bench_rejects_zero_epochs(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_train.run(["--epochs", "0"])
    assert exit_info.value.code == 2
    assert "--epochs is 0" in capsys.readouterr().err


def test_train_bench_needs_both_stored_paths(capsys):
    with pytest.raises(SystemExit):
        bench_train.run(["--train_features", "train.hdf5"])
    assert "--train_features and --train_list must be given together" in capsys.readouterr().err


def test_extract_bench_prints_summary(capsys, tmp_path, sample_dataset):
    dataset_dir, list_path, paths = sample_dataset
    json_path = tmp_path / "extract.json"
    argv = [*TINY_EXTRACT, "--dataset_dir", str(dataset_dir), "--selected_ids", str(list_path),
            "--json", str(json_path)]
    assert bench_extract.run(argv) == 0
    output = capsys.readouterr().out
    summary = printed_summary(output)

    for field in EXTRACT_FIELDS:
        assert field in summary
    assert summary["num_images"] == len(paths)
    assert summary["num_embedded"] == len(paths)
    assert summary["end_to_end_images_per_second"] > 0
    assert summary["forward_images_per_second"] > 0
    ratio = summary["end_to_end_images_per_second"] / summary["forward_images_per_second"]
    assert summary["end_to_end_over_forward"] == pytest.approx(ratio)
    # the tiny run's decode worker can live less than one sampling interval, so it may be missed
    assert summary["max_processes"] >= 1
    assert summary["peak_rss_mib"] >= summary["peak_pss_mib"] > 0
    assert summary["peak_rss_mib"] >= summary["peak_rss_uss_mib"] > 0
    assert summary["precision"] == "float32"
    assert "end-to-end / forward-only" in output
    assert json.loads(json_path.read_text()) == summary


def test_memory_sampler_counts_child_processes():
    # a child that touches 64 MiB of its own and lives for a second, well past the sampling interval
    code = "import time; block = bytearray(64 * 2**20); block[::4096] = b'x' * len(block[::4096]); time.sleep(1)"
    pss_before_mib = psutil.Process().memory_full_info().pss / 2**20
    rss_before_mib = psutil.Process().memory_info().rss / 2**20
    with PeakMemorySampler(interval_s=0.02, pss_every=5) as memory:
        child = subprocess.Popen([sys.executable, "-c", code])
        child.wait(timeout=60)
    assert child.returncode == 0
    assert memory.max_processes >= 2
    assert memory.peak_rss_mib >= memory.start_rss_mib + 64
    assert memory.peak_pss_mib >= pss_before_mib + 60
    # The child's 64 MiB are its own pages, so its USS counts them. This process counts by its RSS.
    assert memory.peak_rss_uss_mib >= rss_before_mib + 60


def test_extract_bench_alternates_rounds(capsys, sample_dataset):
    dataset_dir, list_path, paths = sample_dataset
    argv = [*TINY_EXTRACT, "--dataset_dir", str(dataset_dir), "--selected_ids", str(list_path), "--rounds", "3"]
    assert bench_extract.run(argv) == 0
    output = capsys.readouterr().out
    summary = printed_summary(output)

    per_round = summary["per_round"]
    assert summary["rounds"] == 3
    assert len(per_round) == 3
    for entry in per_round:
        assert entry["end_to_end_over_forward"] == pytest.approx(
            entry["end_to_end_images_per_second"] / entry["forward_images_per_second"]
        )
    for key in ("end_to_end_images_per_second", "forward_images_per_second", "end_to_end_over_forward"):
        assert summary[key] == sorted(entry[key] for entry in per_round)[1]
    assert "median of 3 rounds" in output
    assert "(first round)" in output


def test_extract_bench_rounds_in_new_processes(monkeypatch, capsys, sample_dataset):
    # In-process rounds after the first were slower with decode workers (copy-on-write of the
    # pages the earlier rounds had written), so every end-to-end round starts a new process.
    def in_process(*args, **kwargs):
        raise AssertionError("an end-to-end round ran in the benchmark's process")

    monkeypatch.setattr(bench_extract, "run_extraction", in_process)
    monkeypatch.setattr(bench_extract, "extract", in_process)
    dataset_dir, list_path, paths = sample_dataset
    argv = [*TINY_EXTRACT, "--dataset_dir", str(dataset_dir), "--selected_ids", str(list_path), "--rounds", "2"]
    assert bench_extract.run(argv) == 0
    summary = printed_summary(capsys.readouterr().out)

    assert summary["num_embedded"] == len(paths)
    assert len(summary["per_round"]) == 2
    assert all(entry["end_to_end_images_per_second"] > 0 for entry in summary["per_round"])


def test_extract_bench_forward_sets_malloc(monkeypatch, capsys, sample_dataset):
    # Regression: with the end-to-end rounds in their own processes, this process never ran
    # run_extraction, which sets them, and the forward-only passes ran at about half speed.
    calls = []

    def record_call() -> bool:
        calls.append(True)
        return True

    monkeypatch.setattr(bench_extract, "keep_freed_memory_mapped", record_call)
    dataset_dir, list_path, _ = sample_dataset
    argv = [*TINY_EXTRACT, "--dataset_dir", str(dataset_dir), "--selected_ids", str(list_path), "--device", "cpu"]
    assert bench_extract.run(argv) == 0
    assert calls == [True]


# Runs extract_round.py with Embedder.embed patched to send signals after its first batch.
# Mode "self" sends SIGINT to the round process, and "parent" sends it to the benchmark's
# process too, as a terminal's Ctrl-C reaches both. Mode "kill" sends SIGKILL to the round process.
ROUND_WRAPPER = """
import os, runpy, signal, sys
sys.path.insert(0, {repo!r})
import feature_extraction.embedding as embedding
mode = {mode!r}
original = embedding.Embedder.embed
def embed_then_signal(self, *args, **kwargs):
    result = original(self, *args, **kwargs)
    if mode == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if mode == "parent":
        os.kill(os.getppid(), signal.SIGINT)
    os.kill(os.getpid(), signal.SIGINT)
    return result
embedding.Embedder.embed = embed_then_signal
sys.argv = [{script!r}, *sys.argv[1:]]
runpy.run_path({script!r}, run_name="__main__")
"""


def run_with_signalled_round(monkeypatch, tmp_path, sample_dataset, mode: str):
    """Run the benchmark with the round wrapper above; return the exit status, or the exception it raised."""
    wrapper = tmp_path / "round_wrapper.py"
    wrapper.write_text(ROUND_WRAPPER.format(repo=str(REPO_ROOT), mode=mode, script=str(bench_extract.ROUND_SCRIPT)))
    monkeypatch.setattr(bench_extract, "ROUND_SCRIPT", wrapper)
    dataset_dir, list_path, _ = sample_dataset
    argv = [*TINY_EXTRACT, "--dataset_dir", str(dataset_dir), "--selected_ids", str(list_path)]
    try:
        return bench_extract.run(argv)
    except KeyboardInterrupt as e:
        return e


def test_extract_bench_round_sigint_exit_130(monkeypatch, capfd, tmp_path, sample_dataset):
    # Regression: the round process printed an Interrupted traceback and exited with status 1.
    assert run_with_signalled_round(monkeypatch, tmp_path, sample_dataset, "self") == 130
    err = capfd.readouterr().err
    assert "stopped by SIGINT" in err
    assert "Traceback" not in err


def test_extract_bench_ctrl_c_waits_for_round(monkeypatch, capfd, caplog, tmp_path, sample_dataset):
    # Regression: with SIGINT in both processes, subprocess.run killed the round process 0.25 s
    # later and the benchmark ended in a KeyboardInterrupt traceback.
    assert run_with_signalled_round(monkeypatch, tmp_path, sample_dataset, "parent") == 130
    assert "stopped by SIGINT" in caplog.text
    err = capfd.readouterr().err
    assert "rows are saved in" in err  # the round process's own message on its way out
    assert "Traceback" not in err


def test_extract_bench_killed_round_exit_137(monkeypatch, caplog, tmp_path, sample_dataset):
    # Regression: a round process killed by SIGKILL (return code -9) gave exit status 247 (-9 & 0xFF)
    # and the message "exited with status -9; its log is above".
    assert run_with_signalled_round(monkeypatch, tmp_path, sample_dataset, "kill") == 137
    assert "the end-to-end extraction process was killed by SIGKILL" in caplog.text


def test_extract_bench_uncreatable_work_dir_exit_1(caplog, tmp_path, sample_dataset):
    # Regression: a --work_dir below a file ended in a NotADirectoryError traceback.
    dataset_dir, list_path, _ = sample_dataset
    (tmp_path / "file.txt").write_text("a file")
    work_dir = tmp_path / "file.txt" / "work"
    argv = [*TINY_EXTRACT, "--dataset_dir", str(dataset_dir), "--selected_ids", str(list_path),
            "--work_dir", str(work_dir)]
    assert bench_extract.run(argv) == 1
    assert f"benchmark failed: [Errno 20] Not a directory: {str(work_dir)!r}" in caplog.text


def test_extract_bench_even_rounds_keep_shape_count(capsys, sample_dataset):
    dataset_dir, list_path, _ = sample_dataset
    argv = [*TINY_EXTRACT, "--dataset_dir", str(dataset_dir), "--selected_ids", str(list_path), "--rounds", "2",
            "--num_workers", "0"]
    assert bench_extract.run(argv) == 0
    summary = printed_summary(capsys.readouterr().out)

    assert isinstance(summary["distinct_shapes"], int)
    assert summary["distinct_shapes"] == summary["per_round"][0]["distinct_shapes"]


def test_extract_bench_rejects_zero_rounds(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_extract.run(["--rounds", "0"])
    assert exit_info.value.code == 2
    assert "--rounds is 0" in capsys.readouterr().err


def test_extract_bench_compares_precision(capsys, sample_dataset):
    dataset_dir, list_path, paths = sample_dataset
    argv = [*TINY_EXTRACT, "--dataset_dir", str(dataset_dir), "--selected_ids", str(list_path),
            "--num_workers", "0", "--compare_precision", "true", "--val_k", "5"]
    assert bench_extract.run(argv) == 0
    check = printed_summary(capsys.readouterr().out)["precision_check"]

    assert check["images"] == len(paths)
    assert 0.9 < check["cosine_mean"] <= 1.0 + 1e-6
    assert check["cosine_min"] <= check["cosine_mean"]
    assert 0 <= check["map_float32"] <= 100
    assert check["map_difference"] == pytest.approx(check["map_autocast"] - check["map_float32"])


def test_extract_bench_spreads_selected_images(sample_dataset):
    dataset_dir, list_path, paths = sample_dataset
    entries = bench_extract.select_entries(str(dataset_dir), str(list_path), 4)
    assert [entry.path for entry in entries] == [paths[0], paths[3], paths[6], paths[9]]


def test_extract_bench_rejects_missing_folder(capsys, tmp_path):
    with pytest.raises(SystemExit):
        bench_extract.run(["--dataset_dir", str(tmp_path / "absent")])
    assert "is not a folder" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value, message", [
    # Regression: each of these ended in a traceback, --json only after the whole benchmark.
    ("--json", ".", "--json '.' is a folder"),
    ("--selected_ids", "absent.txt", "--selected_ids 'absent.txt' does not exist"),
    ("--checkpoint", "absent.pth", "--checkpoint 'absent.pth' does not exist"),
    ("--work_dir", "file.txt", "--work_dir 'file.txt' is a file"),
    ("--model", "", "--model is empty"),
])
def test_extract_bench_rejects_bad_flags(capsys, tmp_path, monkeypatch, sample_dataset, flag, value, message):
    dataset_dir, _, _ = sample_dataset
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file.txt").write_text("a file")
    with pytest.raises(SystemExit) as exit_info:
        bench_extract.run([*TINY_EXTRACT, "--dataset_dir", str(dataset_dir), flag, value])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_extract_bench_unknown_model_exit_2(capfd, caplog, sample_dataset):
    # Regression: an unknown model ended in a BackboneError traceback with exit status 1.
    # The end-to-end round runs in its own process, which logs the error to the shared stderr.
    dataset_dir, _, _ = sample_dataset
    assert bench_extract.run([*TINY_EXTRACT, "--dataset_dir", str(dataset_dir), "--model", "no_such_model"]) == 2
    assert "--model 'no_such_model' is not a timm model" in capfd.readouterr().err
    assert "the end-to-end extraction exited with status 2" in caplog.text


def test_extract_bench_profile_help_states_default_once():
    help_text = " ".join(bench_extract.get_args_parser().format_help().split())
    assert "0 means no profile (default: 0)" in help_text
    assert help_text.count("(default: 0, no profile)") == 0


def test_train_bench_runs_requested_steps_across_epochs(capsys, monkeypatch):
    # Regression: --profile_steps 50 and --untimed_steps 100 ran only the 9 steps of one epoch,
    # and the profile header still printed 50.
    steps_per_call = []
    original = bench_train.train_linear_adapter

    def counting(*args, **kwargs):
        result = original(*args, **kwargs)
        steps_per_call.append(sum(record.steps for record in result.history[1:]))
        return result

    monkeypatch.setattr(bench_train, "train_linear_adapter", counting)
    argv = [*TINY_TRAIN, "--epochs", "1", "--untimed_steps", "20", "--profile_steps", "25", "--profile_rows", "1000"]
    assert bench_train.run(argv) == 0
    output = capsys.readouterr().out
    assert steps_per_call == [20, 600 // 64, 25]
    assert "torch.profiler, 25 training steps" in output
    # nn.Linear's initialisation draws with uniform_, so its absence shows the model build is not profiled
    assert "aten::uniform_" not in output
    assert "aten::mm" in output or "mkldnn::_linear_pointwise" in output


def test_train_bench_even_repeats_one_run(capsys):
    # Regression: train_seconds was the mean of the two middle runs, while the seconds to the
    # target came from the faster one. Every number now comes from the faster middle run.
    assert bench_train.run([*TINY_TRAIN, "--epochs", "1", "--repeats", "2", "--target_map", "0"]) == 0
    summary = printed_summary(capsys.readouterr().out)

    assert summary["train_seconds"] == min(summary["train_seconds_repeats"])
    # every mAP reaches 0, so the target is met after the only epoch, at the end of that run's training
    assert summary["seconds_to_target_map"] == pytest.approx(summary["train_seconds"])


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--weight_decay=-1"], "--weight_decay is -1.0; it must be 0 or positive"),
        (["--weight_decay", "nan"], "--weight_decay is nan; it must be a finite number"),
        (["--lr", "inf"], "--lr is inf; it must be a finite number"),
        (["--num_classes", "5000"], "--num_images is 600 but --num_classes 5000 needs at least 10000"),
        (["--num_heldout_classes", "400"], "--num_heldout_images is 120 but --num_heldout_classes 400 needs"),
        (["--num_classes", "1", "--num_images", "600"], "--num_classes is 1; the classification loss needs at least 2"),
        (["--batch_size", "1000"], "--batch_size 1000 exceeds --num_images 600"),
        (["--dim", "8"], "--dim is 8 but the shared nuisance component of the synthetic data has rank 16"),
        (["--seed", "-1"], "--seed is -1; it must lie between 0 and 2**63 - 1"),
        (["--data_seed", str(10**23)], f"--data_seed is {10**23}"),
        (["--target_map", "nan"], "--target_map is nan; it must be a percentage from 0 to 100"),
        (["--target_map", "101"], "--target_map is 101.0"),
        (["--threads", "100000"], "--threads is 100000 but this process may use"),
        (["--train_features", "nope.hdf5", "--train_list", "nope.txt"], "--train_features 'nope.hdf5' does not exist"),
        (["--json", ""], "--json is empty; give the path of the file to write"),
    ],
)
def test_train_bench_rejects_bad_values(capsys, extra, message):
    # Regression: these values ended in tracebacks from torch or synthetic.py, or were accepted.
    with pytest.raises(SystemExit) as exit_info:
        bench_train.run([*TINY_TRAIN, *extra])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_train_bench_rejects_json_under_file(capsys, tmp_path):
    # Regression: the --json path failed only after the whole benchmark.
    (tmp_path / "base.txt").write_text("a file")
    with pytest.raises(SystemExit) as exit_info:
        bench_train.run([*TINY_TRAIN, "--json", str(tmp_path / "base.txt" / "x.json")])
    assert exit_info.value.code == 2
    assert f"--json {str(tmp_path / 'base.txt' / 'x.json')!r}: {str(tmp_path / 'base.txt')!r} is a file" in (
        capsys.readouterr().err
    )


def test_train_bench_target_map_needs_held_out_set(capsys, tmp_path):
    data = make_synthetic_dataset(num_train_images=300, num_train_classes=30, num_heldout_images=60,
                                  num_heldout_classes=6, dim=24, seed=1)
    argv = stored_split_args(data, tmp_path)[:4] + ["--target_map", "50"]
    with pytest.raises(SystemExit) as exit_info:
        bench_train.run(argv)
    assert exit_info.value.code == 2
    assert "--target_map needs a held-out set" in capsys.readouterr().err


def test_train_bench_list_mismatch_exit_1(capsys, caplog, tmp_path):
    # Regression: a list that did not match its HDF5 ended in a DataError traceback whose
    # advice named --allow_missing, which bench_train.py did not have.
    data = make_synthetic_dataset(num_train_images=300, num_train_classes=30, num_heldout_images=60,
                                  num_heldout_classes=6, dim=24, seed=1)
    argv = stored_split_args(data, tmp_path) + ["--out_dim", "8", "--batch_size", "32", "--epochs", "1"]
    with open(tmp_path / "train.txt", "a") as f:
        f.write("train/extra/not_extracted.jpg,0,0\n")
    assert bench_train.run(argv) == 1
    assert "1 list paths missing from the HDF5 index" in caplog.text
    assert bench_train.run([*argv, "--allow_missing"]) == 0
    assert printed_summary(capsys.readouterr().out)["data"]["num_images"] == 300


def test_train_bench_profile_help_states_default_once():
    help_text = " ".join(bench_train.get_args_parser().format_help().split())
    assert "0 means no profile (default: 0)" in help_text
    assert help_text.count("(default: 0, no profile)") == 0


@pytest.mark.parametrize("extra, message", [
    # Regression: each of these ended in a traceback, and --json only after every seed had run.
    (["--json", "."], "--json '.' is a folder"),
    (["--json", "base.txt/x.json"], "--json 'base.txt/x.json': "),
    (["--train_features", "absent.hdf5"], "--train_features 'absent.hdf5' does not exist"),
    (["--threads", "0"], "--threads is 0; it must be at least 1"),
    (["--first_seed", str(2**64)], f"--first_seed is {2**64}; it must lie between 0 and 2**63 - 1"),
    (["--first_seed", str(2**63 - 1), "--seeds", "2"], f"the last seed is {2**63}"),
    (["--first_seed", "-1"], "--first_seed is -1; it must lie between 0 and 2**63 - 1"),
    (["--threshold", "nan"], "--threshold is nan; it must be a percentage from 0 to 100"),
    (["--threshold", "101"], "--threshold is 101.0"),
    # one thread more than the cores, so that the run is harmless where the flag is accepted
    (["--threads", str(usable_cores() + 1)], f"--threads is {usable_cores() + 1} but this process may use"),
])
def test_seed_bench_rejects_bad_flags(capsys, tmp_path, monkeypatch, extra, message):
    data = make_synthetic_dataset(num_train_images=300, num_train_classes=30, num_heldout_images=60,
                                  num_heldout_classes=6, dim=24, seed=3)
    argv = stored_split_args(data, tmp_path)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "base.txt").write_text("a file")
    with pytest.raises(SystemExit) as exit_info:
        bench_seeds.run([*argv, "--seeds", "1", "--epochs", "1", *extra])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_seed_bench_json_keeps_input_list(capsys, tmp_path):
    # Regression: --json naming the training list overwrote the list with the summary.
    data = make_synthetic_dataset(num_train_images=300, num_train_classes=30, num_heldout_images=60,
                                  num_heldout_classes=6, dim=24, seed=3)
    argv = stored_split_args(data, tmp_path)
    list_text = (tmp_path / "train.txt").read_text()
    with pytest.raises(SystemExit) as exit_info:
        bench_seeds.run([*argv, "--seeds", "1", "--epochs", "1", "--json", str(tmp_path / "train.txt")])
    assert exit_info.value.code == 2
    assert "which is the --train_list input" in capsys.readouterr().err
    assert (tmp_path / "train.txt").read_text() == list_text


def test_seed_bench_list_mismatch_exit_1(caplog, capsys, tmp_path):
    # Regression: a list that did not match its HDF5 ended in a DataError traceback.
    data = make_synthetic_dataset(num_train_images=300, num_train_classes=30, num_heldout_images=60,
                                  num_heldout_classes=6, dim=24, seed=3)
    argv = stored_split_args(data, tmp_path)
    with open(tmp_path / "train.txt", "a") as f:
        f.write("train/extra/not_extracted.jpg,0,0\n")
    assert bench_seeds.run([*argv, "--seeds", "1", "--epochs", "1"]) == 1
    assert "1 list paths missing from the HDF5 index" in caplog.text
    # the message advises --allow_missing, so the seed benchmark must accept it
    assert bench_seeds.run([*argv, "--seeds", "1", "--epochs", "1", "--allow_missing",
                            "--json", str(tmp_path / "one_seed.json")]) == 0
    # the sample standard deviation of one seed is undefined, not 0
    summary = json.loads((tmp_path / "one_seed.json").read_text())
    assert summary["trainer"]["all_queries"]["sd"] is None
    assert summary["reference"]["macro"]["sd"] is None
    assert "(sd n/a," in capsys.readouterr().out


def test_seed_bench_small_set_batch_size(caplog, tmp_path):
    # Regression: a set smaller than one batch of 128 got the advice "lower --batch_size",
    # a flag bench_seeds.py did not have.
    data = make_synthetic_dataset(num_train_images=100, num_train_classes=10, num_heldout_images=30,
                                  num_heldout_classes=5, dim=24, seed=3)
    argv = [*stored_split_args(data, tmp_path), "--seeds", "1", "--epochs", "1"]
    assert bench_seeds.run(argv) == 1
    assert "lower --batch_size" in caplog.text
    assert bench_seeds.run([*argv, "--batch_size", "32"]) == 0


def test_train_bench_partial_epoch_no_epoch_time(capsys):
    # Regression: with --max_steps below one epoch (9 steps here), seconds_per_epoch was the time of the 4 steps run.
    assert bench_train.run([*TINY_TRAIN, "--epochs", "1", "--max_steps", "4"]) == 0
    summary = printed_summary(capsys.readouterr().out)

    assert summary["recipe"]["steps"] == 4
    assert summary["seconds_per_epoch"] is None
    assert summary["seconds_per_epoch_min"] is None
    assert summary["steps_per_second"] > 0


def test_train_bench_accepts_trainer_flag_names():
    # Regression: the trainer's advice "raise --num_epochs" and "lower --adaptation_layer_dim"
    # named flags that bench_train.py rejected as unrecognized.
    args = bench_train.get_args_parser().parse_args(["--num_epochs", "3", "--adaptation_layer_dim", "64"])
    assert args.epochs == 3
    assert args.out_dim == 64


@pytest.mark.parametrize("flag, name", [
    ("--selected_ids", "list.txt"),
    ("--json", "features_uned.hdf5"),
    ("--selected_ids", "round_request.json"),
    ("--json", "round_result.json"),
])
def test_extract_bench_rejects_work_dir_files(capsys, tmp_path, sample_dataset, flag, name):
    # Regression: --selected_ids work_dir/list.txt was replaced by the benchmark's selection of it.
    # sample_dataset writes its list as tmp_path/list.txt, so that case needs no file of its own.
    dataset_dir, _, _ = sample_dataset
    path = tmp_path / name
    if not path.exists():
        path.write_text("kept\n")
    text = path.read_text()
    argv = [*TINY_EXTRACT, "--dataset_dir", str(dataset_dir), "--work_dir", str(tmp_path), flag, str(path)]
    with pytest.raises(SystemExit) as exit_info:
        bench_extract.run(argv)
    assert exit_info.value.code == 2
    assert f"{flag} {str(path)!r} is the {name} that the benchmark writes in --work_dir" in capsys.readouterr().err
    assert path.read_text() == text


def test_extract_bench_work_dir_help_lists_files():
    # Regression: the help of --work_dir left out round_request.json and round_result.json.
    parser = bench_extract.get_args_parser()
    work_dir_help = next(action.help for action in parser._actions if "--work_dir" in action.option_strings)
    for name in bench_extract.WORK_DIR_FILES:
        assert name in work_dir_help


def run_gpu_script(tmp_path, dataset_dir, device="cpu", train_args=TINY_TRAIN, extract_args=TINY_EXTRACT,
                   python=sys.executable, results_arg=None, cwd=None):
    """Run benchmarks/run_gpu.sh with this interpreter; return the process and the results folder.

    `results_arg` replaces the absolute RESULTS_DIR argument, and `cwd` is the folder the script starts in.
    """
    results = tmp_path / "results"
    env = {
        **os.environ, "PYTHON": str(python), "DEVICE": device,
        "TRAIN_ARGS": " ".join(train_args), "EXTRACT_ARGS": " ".join(extract_args),
    }
    script = REPO_ROOT / "benchmarks" / "run_gpu.sh"
    arguments = [str(results) if results_arg is None else results_arg, str(dataset_dir)]
    process = subprocess.run(["bash", str(script), *arguments], env=env, cwd=cwd,
                             capture_output=True, text=True, timeout=600)
    return process, results


def test_gpu_script_writes_both_summaries(tmp_path, sample_dataset):
    dataset_dir, _, paths = sample_dataset
    process, results = run_gpu_script(tmp_path, dataset_dir)
    assert process.returncode == 0, process.stdout + process.stderr

    train = json.loads((results / "gpu_train.json").read_text())
    extract = json.loads((results / "gpu_extract.json").read_text())
    # the appended flags override the preset and the model of the prepared commands
    assert train["data"]["preset"] == "gpu"
    assert train["data"]["num_images"] == 600
    assert train["recipe"]["amp"] == "bf16"
    assert train["device"] == "cpu"
    assert extract["model"] == "test_vit"
    assert extract["dataset_dir"] == str(dataset_dir)
    assert extract["num_embedded"] == len(paths)
    assert "summary: " in (results / "gpu_train.log").read_text()
    assert "summary: " in (results / "gpu_extract.log").read_text()
    assert (results / "device.txt").read_text().startswith("torch ")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_script_without_cuda_stops(tmp_path, sample_dataset):
    dataset_dir, _, _ = sample_dataset
    process, results = run_gpu_script(tmp_path, dataset_dir, device="cuda")
    assert process.returncode == 1
    assert "torch finds no CUDA device" in process.stdout
    assert sorted(path.name for path in results.iterdir()) == ["device.txt"]


def test_gpu_script_failed_training_still_extracts(tmp_path, sample_dataset):
    dataset_dir, _, _ = sample_dataset
    process, results = run_gpu_script(tmp_path, dataset_dir, train_args=[*TINY_TRAIN, "--epochs", "0"])
    assert process.returncode == 2
    assert not (results / "gpu_train.json").exists()
    assert json.loads((results / "gpu_extract.json").read_text())["model"] == "test_vit"


def test_gpu_script_relative_paths(tmp_path, sample_dataset):
    # Regression: the script changed to the repository root before it used RESULTS_DIR, IMAGES_DIR
    # and PYTHON, so relative ones were resolved against it instead of the caller's working directory
    dataset_dir, _, paths = sample_dataset
    wrapper = tmp_path / "bin" / "python"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    wrapper.chmod(0o755)

    process, results = run_gpu_script(tmp_path, dataset_dir.relative_to(tmp_path), python="bin/python",
                                      results_arg="results", cwd=tmp_path)
    assert not (REPO_ROOT / "results").exists()
    assert process.returncode == 0, process.stdout + process.stderr
    extract = json.loads((results / "gpu_extract.json").read_text())
    assert extract["dataset_dir"] == str(dataset_dir)
    assert extract["num_embedded"] == len(paths)
    assert (results / "gpu_train.json").exists()


def test_gpu_script_does_not_glob_flags(tmp_path, sample_dataset):
    # "READM?.md" would match README.md in the repository root, where the script runs
    dataset_dir, _, _ = sample_dataset
    process, results = run_gpu_script(tmp_path, dataset_dir, train_args=[*TINY_TRAIN, "--lr", "READM?.md"])
    assert process.returncode == 2
    log = (results / "gpu_train.log").read_text()
    assert "'READM?.md'" in log
    assert "'README.md'" not in log


@pytest.mark.parametrize("name, is_folder", [
    ("features_uned.hdf5.parts", True),
    ("features_uned.hdf5", False),
    ("list.txt", False),
    ("features_uned.hdf5.failed.txt", False),
    ("precision_float32.hdf5.parts.lock", False),
])
def test_extract_bench_rejects_foreign_work_dir(capsys, tmp_path, sample_dataset, name, is_folder):
    # Regression: the benchmark deleted extract.py's partial run in --work_dir and replaced its output and list.
    dataset_dir, list_path, _ = sample_dataset
    work_dir = tmp_path / "work"
    existing_file = work_dir / name / "manifest.json" if is_folder else work_dir / name
    existing_file.parent.mkdir(parents=True)
    existing_file.write_text("kept\n")
    argv = [*TINY_EXTRACT, "--dataset_dir", str(dataset_dir), "--selected_ids", str(list_path),
            "--work_dir", str(work_dir)]
    with pytest.raises(SystemExit) as exit_info:
        bench_extract.run(argv)
    err = capsys.readouterr().err

    assert exit_info.value.code == 2
    assert f"--work_dir {str(work_dir)!r} contains files that the benchmark would replace or delete ({name})" in err
    assert "choose an empty or new --work_dir" in err
    assert existing_file.read_text() == "kept\n"


def test_extract_bench_reruns_in_own_work_dir(capsys, tmp_path, sample_dataset):
    dataset_dir, list_path, paths = sample_dataset
    work_dir = tmp_path / "work"
    argv = [*TINY_EXTRACT, "--dataset_dir", str(dataset_dir), "--selected_ids", str(list_path),
            "--work_dir", str(work_dir)]
    assert bench_extract.run(argv) == 0
    assert (work_dir / bench_extract.WORK_DIR_MARKER).is_file()
    capsys.readouterr()
    assert bench_extract.run(argv) == 0
    assert printed_summary(capsys.readouterr().out)["num_embedded"] == len(paths)

    # a folder of an earlier version, which wrote round_request.json but no marker, is the benchmark's own too
    older = tmp_path / "older"
    older.mkdir()
    (older / bench_extract.ROUND_REQUEST_NAME).write_text("{}")
    (older / bench_extract.FEATURES_NAME).write_text("from an earlier benchmark run")
    parser = bench_extract.get_args_parser()
    args = parser.parse_args([*argv[:-1], str(older)])
    bench_extract.check_args(parser, args)


def bench_argv(script: str, tmp_path: Path, sample_dataset) -> list[str]:
    """Return tiny-run arguments of one benchmark script ("train", "seeds" or "extract")."""
    if script == "train":
        return list(TINY_TRAIN)
    if script == "seeds":
        data = make_synthetic_dataset(num_train_images=300, num_train_classes=30, num_heldout_images=60,
                                      num_heldout_classes=6, dim=24, seed=3)
        return [*stored_split_args(data, tmp_path), "--seeds", "1", "--epochs", "1"]
    dataset_dir, list_path, _ = sample_dataset
    return [*TINY_EXTRACT, "--dataset_dir", str(dataset_dir), "--selected_ids", str(list_path)]


BENCHMARKS = {"train": bench_train, "seeds": bench_seeds, "extract": bench_extract}


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
@pytest.mark.parametrize("script", BENCHMARKS)
def test_bench_unwritable_json_exit_2(capsys, tmp_path, sample_dataset, script):
    # Regression: as root, os.access reports /proc writable, so the benchmark ran in full and then
    # ended in a FileNotFoundError traceback (bench_train.py, bench_seeds.py).
    argv = [*bench_argv(script, tmp_path, sample_dataset), "--json", "/proc/x.json"]
    with pytest.raises(SystemExit) as exit_info:
        BENCHMARKS[script].run(argv)
    captured = capsys.readouterr()

    assert exit_info.value.code == 2
    assert "--json '/proc/x.json'" in captured.err
    assert "summary: " not in captured.out


@pytest.mark.parametrize("script", BENCHMARKS)
def test_bench_json_write_failure_exit_1(monkeypatch, capsys, caplog, tmp_path, sample_dataset, script):
    # A --json file that turns unwritable during the run: the checks before it are skipped here.
    module = BENCHMARKS[script]
    monkeypatch.setattr(module, "check_output_file", lambda *args, **kwargs: None)
    monkeypatch.setattr(module, "check_json_writable", lambda *args, **kwargs: None)
    (tmp_path / "file.txt").write_text("a file")
    json_path = tmp_path / "file.txt" / "summary.json"
    assert module.run([*bench_argv(script, tmp_path, sample_dataset), "--json", str(json_path)]) == 1

    assert f"cannot write the summary to --json {str(json_path)!r}: " in caplog.text
    assert "The summary line printed on stdout above has the same content" in caplog.text
    printed_summary(capsys.readouterr().out)


def test_train_bench_json_check_leaves_nothing(capsys, tmp_path):
    # the writability check creates the folders and the file, and removes them before a later check fails
    json_path = tmp_path / "new" / "sub" / "summary.json"
    with pytest.raises(SystemExit) as exit_info:
        bench_train.run([*TINY_TRAIN, "--json", str(json_path), "--amp", "fp16", "--device", "cpu"])
    assert exit_info.value.code == 2
    assert "--amp fp16 needs CUDA" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()

    assert bench_train.run([*TINY_TRAIN, "--epochs", "1", "--json", str(json_path)]) == 0
    assert json.loads(json_path.read_text()) == printed_summary(capsys.readouterr().out)


def test_json_check_leaves_fifo_to_reader(tmp_path):
    # Regression: the check opened a FIFO, which waited for a reader and then gave it an early end of file
    import threading

    from benchmarks.cli import check_json_writable

    fifo = tmp_path / "summary.json"
    os.mkfifo(fifo)
    checker = threading.Thread(target=check_json_writable, args=(None, str(fifo)), daemon=True)
    checker.start()
    checker.join(timeout=10)
    assert not checker.is_alive()


def test_json_check_removes_file_made_through_symlink(tmp_path):
    # Regression: a dangling symlink's target, created by the check, was left behind
    from benchmarks.cli import check_json_writable

    (tmp_path / "link.json").symlink_to(tmp_path / "target.json")
    check_json_writable(None, str(tmp_path / "link.json"))
    assert not (tmp_path / "target.json").exists()
    assert (tmp_path / "link.json").is_symlink()


@pytest.mark.parametrize("extra", [["--dim", str(10**12)], ["--num_images", str(10**11)]])
def test_train_bench_rejects_data_beyond_memory(capsys, extra):
    # Regression: these sizes ended in numpy's _ArrayMemoryError traceback. Both need terabytes.
    with pytest.raises(SystemExit) as exit_info:
        bench_train.run([*TINY_TRAIN, *extra])
    err = capsys.readouterr().err

    assert exit_info.value.code == 2
    assert "the synthetic data need about" in err
    assert "GiB is available; lower --num_images, --num_heldout_images or --dim" in err


def test_train_bench_generation_memory_error_exit_1(monkeypatch, caplog):
    def out_of_memory(**kwargs):
        raise MemoryError("Unable to allocate 9.3 GiB for an array with shape (100000, 25000) and data type float32")

    monkeypatch.setattr(bench_train, "make_synthetic_dataset", out_of_memory)
    assert bench_train.run(TINY_TRAIN) == 1
    assert "generating the synthetic data ran out of memory (Unable to allocate 9.3 GiB" in caplog.text
    assert "lower --num_images, --num_heldout_images or --dim" in caplog.text


class DataStep(Exception):
    """Raised in place of the first data step, to end a run there."""


@pytest.mark.parametrize("script, data_step", [
    ("train", "synthetic_inputs"),
    ("seeds", "stored_inputs"),
    ("extract", "select_entries"),
])
def test_bench_reads_load_before_data(monkeypatch, tmp_path, sample_dataset, script, data_step):
    # Regression: bench_train.py read load_average_before after generating the data and the untimed
    # steps, so it counted the benchmark's own work.
    module = BENCHMARKS[script]
    calls = []

    def record_load():
        calls.append("load average")
        return [0.0, 0.0, 0.0]

    def record_data(*args, **kwargs):
        calls.append("data")
        raise DataStep

    monkeypatch.setattr(module, "load_average", record_load)
    monkeypatch.setattr(module, data_step, record_data)
    with pytest.raises(DataStep):
        module.run(bench_argv(script, tmp_path, sample_dataset))
    assert calls == ["load average", "data"]


@pytest.mark.parametrize("arguments", [[], [""]])
def test_gpu_script_usage_exit_2(arguments):
    # Regression: ${1:?} inside $(...) ended only the subshell, and mkdir then failed on ''.
    script = REPO_ROOT / "benchmarks" / "run_gpu.sh"
    process = subprocess.run(["bash", str(script), *arguments], capture_output=True, text=True, timeout=60)

    assert process.returncode == 2
    assert process.stderr == "usage: bash benchmarks/run_gpu.sh RESULTS_DIR [IMAGES_DIR]\n"
    assert process.stdout == ""


def test_readme_names_train_summary_fields():
    # The README's training figures come from the summary line, so it must name the fields it reports.
    readme = (REPO_ROOT / "benchmarks" / "README.md").read_text(encoding="utf-8")
    for field in ("seconds_per_epoch", "seconds_per_epoch_min", "steps_per_second", "train_seconds", "map_before",
                  "map_after", "peak_rss_training_mib", "peak_rss_process_mib", "rss_before_training_mib",
                  "peak_gpu_allocated_mib", "load_average_before"):
        assert f"`{field}`" in readme


@pytest.mark.parametrize("extra, decode_workers, windows, line", [
    (["--num_workers", "0"], 0, 3, "decode workers:              0, decoding in the main process (3 windows of up to 4 rows)"),
    (["--num_workers", "2", "--window_size", "16"], 1, 1,
     "decode workers:              1 of --num_workers 2, one per window (1 window of up to 16 rows)"),
])
def test_extract_bench_reports_decode_workers(capsys, sample_dataset, extra, decode_workers, windows, line):
    # Regression: the summary gave --num_workers where run_extraction starts one worker per window at
    # most, and the output read "peak memory, 1 processes".
    dataset_dir, list_path, _ = sample_dataset
    argv = [*TINY_EXTRACT, "--dataset_dir", str(dataset_dir), "--selected_ids", str(list_path), *extra]
    assert bench_extract.run(argv) == 0
    output = capsys.readouterr().out
    summary = printed_summary(output)

    assert summary["decode_workers"] == decode_workers
    assert summary["num_windows"] == windows
    assert line in output
    if summary["max_processes"] == 1:
        assert "peak memory, 1 process:" in output
