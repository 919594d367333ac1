"""Benchmark the linear adaptation trainer: seconds per epoch, steps/s, peak memory and held-out mAP.

Training runs through `train_linear_adapter`, the function `linear_adaptation/train_lin_adapt.py`
calls, with that script's defaults (512-d layer, batch 128, Adam lr 1e-3, weight decay 1e-6,
5 epochs, constant learning rate) unless a flag overrides them. The embeddings are
synthetic UnED-like ones from `linear_adaptation.synthetic` at a preset or custom size, or
real ones from HDF5 files and lists as train_lin_adapt.py reads them.

    python benchmarks/bench_train.py --preset cpu --epochs 1
    python benchmarks/bench_train.py --preset cpu --amp bf16
    python benchmarks/bench_train.py --preset gpu --device cuda --amp bf16

Results go to stdout: a table of epochs, then one `summary: {...}` JSON line (also saved
with --json). The run log goes to stderr. Exit status: 0 on success, 1 for unusable
stored embeddings, a diverged run, synthetic data that ran out of memory or a --json file
that could not be written, 2 for invalid arguments.
"""
import argparse
import logging
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.cli import SummaryWriteError, check_json_writable, check_threads, emit_summary  # noqa: E402
from benchmarks.machine import describe_machine, load_average  # noqa: E402
from benchmarks.memory import PeakMemorySampler, available_memory_bytes, max_rss_mib  # noqa: E402
from feature_extraction.flags import bool_flag  # noqa: E402
from feature_extraction.image_list import ImageListError  # noqa: E402
from linear_adaptation import train_lin_adapt  # noqa: E402
from linear_adaptation.arg_checks import (  # noqa: E402
    HelpFormatter,
    check_at_least_one,
    check_finite,
    check_input_files,
    check_not_an_input,
    check_output_file,
    check_seed,
)
from linear_adaptation.features_io import DataError  # noqa: E402
from linear_adaptation.synthetic import DEFAULT_NUISANCE_RANK, estimate_memory, make_synthetic_dataset  # noqa: E402
from linear_adaptation.trainer import (  # noqa: E402
    AMP_MODES,
    CLASSIFIER_INITS,
    LR_SCHEDULES,
    LabelledEmbeddings,
    TrainingError,
    TrainResult,
    seed_everything,
    train_linear_adapter,
)
from linear_adaptation.training_data import load_training_inputs  # noqa: E402

_logger = logging.getLogger("bench_train")

# Synthetic data sizes. The held-out split has other classes of the same domains, about
# a tenth of the training images, so that scoring it stays cheap beside an epoch.
PRESETS = {
    "cpu": dict(num_images=100_000, num_classes=10_000, dim=768, num_heldout_images=10_000,
                num_heldout_classes=1_000, storage_dtype="float32"),
    "gpu": dict(num_images=1_000_000, num_classes=150_000, dim=1024, num_heldout_images=50_000,
                num_heldout_classes=7_500, storage_dtype="float16"),
}
SIZE_FLAGS = tuple(PRESETS["cpu"])
DEVICES = ("auto", "cpu", "cuda")
STORED_FLAGS = ("train_features", "train_list", "val_features", "val_list")
_MIB = 1024 * 1024
_GIB = 1024 * _MIB
_MIN_CLASS_SIZE = 2  # make_synthetic_dataset's default, so that every image has a positive

# the trainer script's own defaults, so the benchmark follows them if they change
_TRAINER_DEFAULTS = train_lin_adapt.get_args_parser()


class SyntheticDataError(Exception):
    """The synthetic embeddings could not be generated; the message names the flags to lower."""


def _trainer_default(name: str):
    return _TRAINER_DEFAULTS.get_default(name)


def get_args_parser() -> argparse.ArgumentParser:
    """Build the parser; recipe defaults are those of linear_adaptation/train_lin_adapt.py."""
    parser = argparse.ArgumentParser(
        description="Time the linear adaptation trainer on synthetic or stored embeddings.",
        formatter_class=HelpFormatter,
    )
    data = parser.add_argument_group("synthetic data (ignored with --train_features)")
    data.add_argument("--preset", metavar="NAME", choices=tuple(PRESETS),
                      help="data size: cpu (100k x 768, 10k classes, float32) or gpu (1M x 1024, 150k classes, "
                           "float16); the size flags below override single values")
    data.add_argument("--num_images", metavar="N", type=int, help="training images (default: from --preset)")
    data.add_argument("--num_classes", metavar="N", type=int, help="training classes (default: from --preset)")
    data.add_argument("--dim", metavar="D", type=int, help="embedding dimension (default: from --preset)")
    data.add_argument("--num_heldout_images", metavar="N", type=int,
                      help="held-out images, of classes not in training (default: from --preset)")
    data.add_argument("--num_heldout_classes", metavar="N", type=int, help="held-out classes (default: from --preset)")
    data.add_argument("--storage_dtype", metavar="DTYPE", choices=("float32", "float16"),
                      help="dtype the embeddings are stored and kept in (default: from --preset)")
    data.add_argument("--data_seed", metavar="N", type=int,
                      help="seed of the synthetic data generator (0 to 2**63 - 1)")

    stored = parser.add_argument_group("stored embeddings instead of synthetic ones")
    stored.add_argument("--train_features", metavar="HDF5", help="training embeddings (ILIAS-layout HDF5) (default: none, synthetic data)")
    stored.add_argument("--train_list", metavar="LIST", help="training 'path,label,domain' list, with --train_features")
    stored.add_argument("--val_features", metavar="HDF5", help="held-out embeddings (default: none, no validation)")
    stored.add_argument("--val_list", metavar="LIST", help="held-out 'path,label,domain' list, with --val_features")
    stored.add_argument("--allow_missing", metavar="BOOL", type=bool_flag, nargs="?", const=True,
                        help="use the ids present in both list and HDF5 instead of stopping when they differ, as "
                             "train_lin_adapt.py does (true/false; the flag alone means true)")

    # --num_epochs and --adaptation_layer_dim are train_lin_adapt.py's names, which the trainer's
    # warnings and errors give as advice
    recipe = parser.add_argument_group("recipe (defaults: train_lin_adapt.py's)")
    recipe.add_argument("--epochs", "--num_epochs", dest="epochs", metavar="N", type=int,
                        help="passes over the training images")
    recipe.add_argument("--max_steps", metavar="N", type=int,
                        help="stop after N optimisation steps; the schedule spans them (default: none)")
    recipe.add_argument("--batch_size", metavar="N", type=int, help="images per step")
    recipe.add_argument("--lr", metavar="LR", type=float, help="Adam learning rate (peak value with a schedule)")
    recipe.add_argument("--lr_schedule", metavar="NAME", choices=LR_SCHEDULES,
                        help="constant, or cosine decay that would reach 0 one step after the last step")
    recipe.add_argument("--warmup_steps", metavar="N", type=int, help="steps of linear learning-rate warmup")
    recipe.add_argument("--weight_decay", metavar="WD", type=float, help="Adam L2 weight decay (finite, >= 0)")
    recipe.add_argument("--out_dim", "--adaptation_layer_dim", dest="out_dim", metavar="N", type=int,
                        help="output dimension of the layer")
    recipe.add_argument("--classifier_init", metavar="HOW", choices=CLASSIFIER_INITS,
                        help="class weights at the start: random or class_mean")
    recipe.add_argument("--amp", metavar="MODE", choices=AMP_MODES,
                        help="autocast of the matrix products: none (float32), bf16, or fp16 (CUDA only)")
    recipe.add_argument("--seed", metavar="N", type=int,
                        help="seed of the initialisation and batch order (0 to 2**63 - 1)")
    recipe.add_argument("--val_k", metavar="K", type=int, help="ranking depth of the held-out mAP@k")

    run = parser.add_argument_group("run")
    run.add_argument("--device", metavar="DEV", choices=DEVICES, help="auto (CUDA when available), cpu or cuda")
    run.add_argument("--threads", metavar="N", type=int,
                     help="torch intra-op threads, at most the usable cores (default: torch's choice, one per "
                          "usable core)")
    run.add_argument("--untimed_steps", metavar="N", type=int,
                     help="first run N training steps of the same recipe untimed, over as many epochs as they "
                          "need, so that one-time costs of a fresh process (thread start-up, oneDNN kernel "
                          "generation, first-touch page faults) are left out of the timed run; 0 times a fresh "
                          "process as a user runs it")
    run.add_argument("--repeats", metavar="N", type=int,
                     help="train N times in this process and report the median run by training seconds (for an "
                          "even N, the faster of the two middle runs): its epoch table, training seconds, seconds "
                          "per epoch, steps/s and seconds to --target_map. train_seconds_repeats lists the "
                          "training seconds of all N runs. For small sets, where one run takes well under a "
                          "second and its time varies by tens of percent")
    run.add_argument("--target_map", metavar="MAP", type=float,
                     help="also report the training seconds until the held-out mAP@k first reaches MAP "
                          "(percent, 0 to 100, checked after each epoch; needs a held-out set) (default: none)")
    run.add_argument("--profile_steps", metavar="N", type=int,
                     help="after the timed run, profile N more steps with torch.profiler, over as many epochs "
                          "as they need and without building the model, and print the operators that take the "
                          "most time; 0 means no profile")
    run.add_argument("--profile_rows", metavar="N", type=int, help="operators listed in the profile table")
    run.add_argument("--json", metavar="PATH", help="also write the summary to this JSON file (default: none)")

    parser.set_defaults(
        preset="cpu", num_images=None, num_classes=None, dim=None, num_heldout_images=None,
        num_heldout_classes=None, storage_dtype=None, data_seed=0,
        train_features=None, train_list=None, val_features=None, val_list=None, allow_missing=False,
        epochs=_trainer_default("num_epochs"), max_steps=None, batch_size=_trainer_default("batch_size"),
        lr=_trainer_default("lr"), lr_schedule=_trainer_default("lr_schedule"),
        warmup_steps=_trainer_default("warmup_steps"), weight_decay=_trainer_default("weight_decay"),
        out_dim=_trainer_default("adaptation_layer_dim"), classifier_init=_trainer_default("classifier_init"),
        amp=_trainer_default("amp"), seed=_trainer_default("seed"), val_k=_trainer_default("val_k"),
        device="auto", threads=None, untimed_steps=0, repeats=1, target_map=None, profile_steps=0, profile_rows=15, json=None,
    )
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Fill the size flags from the preset and reject invalid values with parser.error."""
    for name, value in PRESETS[args.preset].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    check_at_least_one(
        parser, args, ("epochs", "batch_size", "out_dim", "val_k", "profile_rows", "repeats", "max_steps", "threads")
    )
    for name in ("profile_steps", "warmup_steps", "untimed_steps"):
        if getattr(args, name) < 0:
            parser.error(f"--{name} is {getattr(args, name)}; it must be 0 or positive")
    check_recipe_numbers(parser, args)

    stored = [getattr(args, name) for name in STORED_FLAGS]
    if any(path is not None for path in stored):
        if args.train_features is None or args.train_list is None:
            parser.error("--train_features and --train_list must be given together")
        if (args.val_features is None) != (args.val_list is None):
            parser.error("--val_features and --val_list must be given together")
        if args.target_map is not None and args.val_features is None:
            parser.error("--target_map needs a held-out set; give --val_features and --val_list")
    else:
        check_synthetic_sizes(parser, args)
    check_paths(parser, args)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was given but torch finds no CUDA device; use --device cpu or auto")
    if args.amp == "fp16" and resolve_device(args.device).type != "cuda":
        parser.error("--amp fp16 needs CUDA; use --amp bf16 on the CPU")


def check_recipe_numbers(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject seeds, rates and targets out of range, and more threads than usable cores."""
    check_seed(parser, "--seed", args.seed)
    check_seed(parser, "--data_seed", args.data_seed)
    for name in ("lr", "weight_decay"):
        check_finite(parser, f"--{name}", getattr(args, name))
    if not args.lr > 0:
        parser.error(f"--lr is {args.lr}; it must be positive")
    if args.weight_decay < 0:
        parser.error(f"--weight_decay is {args.weight_decay}; it must be 0 or positive")
    if args.target_map is not None and not 0 <= args.target_map <= 100:
        parser.error(f"--target_map is {args.target_map}; it must be a percentage from 0 to 100")
    check_threads(parser, args.threads)


# checked only for synthetic data, because the help text states that --train_features ignores them
SYNTHETIC_SIZE_FLAGS = ("num_images", "num_classes", "dim", "num_heldout_images", "num_heldout_classes")


def check_synthetic_sizes(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject synthetic sizes that cannot give every class two images or one full batch."""
    check_at_least_one(parser, args, SYNTHETIC_SIZE_FLAGS)
    for images, classes in (("num_images", "num_classes"), ("num_heldout_images", "num_heldout_classes")):
        needed = _MIN_CLASS_SIZE * getattr(args, classes)
        if getattr(args, images) < needed:
            parser.error(
                f"--{images} is {getattr(args, images)} but --{classes} {getattr(args, classes)} needs at least "
                f"{needed} ({_MIN_CLASS_SIZE} images per class); raise --{images} or lower --{classes}"
            )
    if args.num_classes < 2:
        parser.error(f"--num_classes is {args.num_classes}; the classification loss needs at least 2")
    if args.batch_size > args.num_images:
        parser.error(f"--batch_size {args.batch_size} exceeds --num_images {args.num_images}; lower --batch_size")
    if args.dim < DEFAULT_NUISANCE_RANK:
        parser.error(f"--dim is {args.dim} but the shared nuisance component of the synthetic data has rank "
                     f"{DEFAULT_NUISANCE_RANK}; give --dim {DEFAULT_NUISANCE_RANK} or more")
    check_synthetic_memory(parser, args)


def check_synthetic_memory(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject synthetic sizes whose embeddings and generation need more memory than is available now."""
    estimate = estimate_memory(args.num_images, args.num_classes, args.num_heldout_images, args.num_heldout_classes,
                               args.dim, args.storage_dtype)
    available = available_memory_bytes()
    if estimate.total <= available:
        return
    advice = "lower --num_images, --num_heldout_images or --dim"
    if args.storage_dtype != "float16":
        advice += ", or use --storage_dtype float16"
    parser.error(
        f"the synthetic data need about {estimate.total / _GIB:.1f} GiB of memory: "
        f"{estimate.train_features / _GIB:.1f} GiB of training embeddings ({args.num_images} x {args.dim} "
        f"{args.storage_dtype}), {estimate.heldout_features / _GIB:.1f} GiB of held-out embeddings "
        f"({args.num_heldout_images} x {args.dim}) and about {estimate.generation / _GIB:.1f} GiB to generate them. "
        f"Only {available / _GIB:.1f} GiB is available; {advice}"
    )


def check_paths(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject stored inputs that do not exist and a --json path that cannot be written or is an input."""
    inputs = {f"--{name}": [getattr(args, name)] for name in STORED_FLAGS if getattr(args, name) is not None}
    check_input_files(parser, inputs)
    if args.json is not None:
        check_output_file(parser, "--json", args.json)
        check_not_an_input(parser, "--json", args.json, inputs)
        check_json_writable(parser, args.json)


def resolve_device(device: str) -> torch.device:
    """Map auto/cpu/cuda to a torch device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def synthetic_inputs(
    *, num_images: int, num_classes: int, dim: int, num_heldout_images: int, num_heldout_classes: int,
    storage_dtype: str, seed: int,
) -> tuple[LabelledEmbeddings, LabelledEmbeddings]:
    """Generate the training and held-out sets as the trainer takes them, rows in list order.

    Raises SyntheticDataError when memory runs out, which check_synthetic_memory's estimate
    can miss when other processes allocate memory in the meantime.
    """
    try:
        data = make_synthetic_dataset(
            num_train_images=num_images,
            num_train_classes=num_classes,
            num_heldout_images=num_heldout_images,
            num_heldout_classes=num_heldout_classes,
            dim=dim,
            dtype=storage_dtype,
            seed=seed,
        )
    except MemoryError as e:
        raise SyntheticDataError(
            f"generating the synthetic data ran out of memory ({e}); lower --num_images, --num_heldout_images or --dim"
        ) from e
    splits = []
    for split in (data.train, data.heldout):
        rows = np.arange(split.features.shape[0], dtype=np.int64)
        splits.append(LabelledEmbeddings(split.features, rows, split.labels, split.domains))
    return splits[0], splits[1]


def stored_inputs(
    *, train_features: str, train_list: str, val_features: str | None, val_list: str | None, batch_size: int,
    val_k: int, seed: int, allow_missing: bool = False,
) -> tuple[LabelledEmbeddings, LabelledEmbeddings | None]:
    """Load and join HDF5 embeddings and lists with train_lin_adapt.py's loader."""
    inputs = load_training_inputs(
        features_path=train_features, list_path=train_list, val_features_path=val_features,
        val_list_path=val_list, val_fraction=None, allow_missing=allow_missing, seed=seed, batch_size=batch_size,
        val_k=val_k,
    )
    return inputs.train, inputs.validation


def seconds_to_target(result: TrainResult, target_map: float) -> float | None:
    """Return the training seconds (class-mean initialisation included) until the held-out mAP reaches the target.

    Returns None when no epoch reaches it or there is no validation set.
    """
    elapsed = result.train_seconds - sum(record.seconds for record in result.history[1:])  # initialisation
    for record in result.history[1:]:
        elapsed += record.seconds
        if record.val is not None and record.val["map"] >= target_map:
            return elapsed
    return None


def recipe_for_steps(recipe: dict, num_images: int, steps: int) -> dict:
    """Return the recipe changed to run exactly `steps` steps, over as many epochs as they need.

    The warmup is cut to fit. These runs only warm caches or time steps, and their learning
    rate changes neither.
    """
    steps_per_epoch = num_images // recipe["batch_size"]
    warmup_steps = min(recipe["warmup_steps"], steps - 1)
    num_epochs = math.ceil(steps / steps_per_epoch)
    return {**recipe, "num_epochs": num_epochs, "max_steps": steps, "warmup_steps": warmup_steps}


def profile_steps(
    train: LabelledEmbeddings, recipe: dict, steps: int, rows: int, device: torch.device
) -> tuple[str, int]:
    """Run `steps` training steps under torch.profiler, started after the model is built.

    Returns the table of the most expensive operators and the number of steps profiled.
    """
    activities = [torch.profiler.ProfilerActivity.CPU]
    sort_by = "self_cpu_time_total"
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        sort_by = "self_cuda_time_total"
    profiler = torch.profiler.profile(activities=activities)
    result = train_linear_adapter(train, validation=None, show_progress=False, on_train_start=profiler.start,
                                  **recipe_for_steps(recipe, train.num_images, steps))
    profiler.stop()
    profiled = sum(record.steps for record in result.history[1:])
    return profiler.key_averages().table(sort_by=sort_by, row_limit=rows), profiled


def format_epochs(result: TrainResult, val_k: int) -> str:
    """Return a table of per-epoch loss, time, steps/s and held-out mAP."""
    lines = [f"{'epoch':>5} {'loss':>8} {'steps':>6} {'seconds':>8} {'steps/s':>8} {f'mAP@{val_k}':>8}"]
    for record in result.history:
        map_text = f"{record.val['map']:8.2f}" if record.val is not None else f"{'-':>8}"
        if record.epoch == 0:
            lines.append(f"{0:>5} {'-':>8} {'-':>6} {'-':>8} {'-':>8} {map_text}")
            continue
        lines.append(
            f"{record.epoch:>5} {record.loss:8.4f} {record.steps:>6} {record.seconds:8.2f} "
            f"{record.steps_per_second or 0:8.2f} {map_text}"
        )
    return "\n".join(lines)


def summarise(result: TrainResult, *, args: argparse.Namespace, data: dict, memory: PeakMemorySampler,
              gpu_peak: dict | None, load_before: list[float]) -> dict:
    """Collect the measured numbers into one JSON-ready dict."""
    epochs = result.history[1:]
    # A full epoch has num_images // batch_size steps because the trainer drops the last partial
    # batch. --max_steps can end any epoch early, the first one included.
    steps_per_epoch = data["num_images"] // args.batch_size
    full_epochs = [record for record in epochs if record.steps == steps_per_epoch]
    seconds = [record.seconds for record in full_epochs]
    total_steps = sum(record.steps for record in epochs)
    total_epoch_seconds = sum(record.seconds for record in epochs)
    val_before = result.history[0].val
    val_after = epochs[-1].val if epochs else None
    summary = {
        "benchmark": "train",
        "data": data,
        "recipe": {
            "epochs": len(epochs), "steps": total_steps, "batch_size": args.batch_size, "lr": args.lr,
            "lr_schedule": args.lr_schedule, "warmup_steps": args.warmup_steps, "weight_decay": args.weight_decay,
            "out_dim": args.out_dim, "classifier_init": args.classifier_init, "amp": args.amp, "seed": args.seed,
        },
        "untimed_steps": args.untimed_steps,
        "device": result.device,
        "optimizer": result.optimizer_impl,
        "seconds_per_epoch": float(np.mean(seconds)) if seconds else None,
        "seconds_per_epoch_min": float(np.min(seconds)) if seconds else None,
        "steps_per_second": total_steps / total_epoch_seconds if total_epoch_seconds > 0 else None,
        "train_seconds": result.train_seconds,
        "map_before": val_before["map"] if val_before else None,
        "map_after": val_after["map"] if val_after else None,
        "val_k": args.val_k,
        "peak_rss_training_mib": round(memory.peak_rss_mib, 1),
        "rss_before_training_mib": round(memory.start_rss_mib, 1),
        "peak_rss_process_mib": round(max_rss_mib(), 1),
        "peak_gpu_allocated_mib": gpu_peak["allocated"] if gpu_peak else None,
        "peak_gpu_reserved_mib": gpu_peak["reserved"] if gpu_peak else None,
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "machine": describe_machine(),
    }
    if args.target_map is not None:
        summary["target_map"] = args.target_map
        summary["seconds_to_target_map"] = seconds_to_target(result, args.target_map)
    return summary


def main(args: argparse.Namespace) -> int:
    """Generate or load the embeddings, train with timing, optionally profile, and print the results."""
    # before any work of this run, so that it measures only the other jobs on the machine
    load_before = load_average()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    _logger.info("configuration: %s", ", ".join(f"{k}={v}" for k, v in sorted(vars(args).items())))

    # data
    start = time.perf_counter()
    if args.train_features is not None:
        train, validation = stored_inputs(
            train_features=args.train_features, train_list=args.train_list, val_features=args.val_features,
            val_list=args.val_list, batch_size=args.batch_size, val_k=args.val_k, seed=args.seed,
            allow_missing=args.allow_missing,
        )
        data = {"source": "stored", "train_features": args.train_features, "val_features": args.val_features}
    else:
        train, validation = synthetic_inputs(
            num_images=args.num_images, num_classes=args.num_classes, dim=args.dim,
            num_heldout_images=args.num_heldout_images, num_heldout_classes=args.num_heldout_classes,
            storage_dtype=args.storage_dtype, seed=args.data_seed,
        )
        data = {"source": "synthetic", "preset": args.preset, "num_classes": args.num_classes,
                "num_heldout_images": args.num_heldout_images, "num_heldout_classes": args.num_heldout_classes,
                "seed": args.data_seed}
    data.update(num_images=train.num_images, dim=train.dim, storage_dtype=str(train.features.dtype))
    _logger.info("embeddings ready in %.1f s: %d x %d %s for training, %s held-out", time.perf_counter() - start,
                 train.num_images, train.dim, train.features.dtype,
                 validation.num_images if validation is not None else "no")

    recipe = dict(
        out_dim=args.out_dim, num_epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, lr_schedule=args.lr_schedule, warmup_steps=args.warmup_steps,
        seed=args.seed, device=device, amp=args.amp, classifier_init=args.classifier_init,
        max_steps=args.max_steps,
    )

    if args.untimed_steps:
        seed_everything(args.seed)
        train_linear_adapter(train, validation=None, show_progress=False,
                             **recipe_for_steps(recipe, train.num_images, args.untimed_steps))

    # timed training, as train_lin_adapt.py runs it
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    runs = []
    with PeakMemorySampler() as memory:
        for _ in range(args.repeats):
            seed_everything(args.seed)
            runs.append(train_linear_adapter(train, validation=validation, val_k=args.val_k, show_progress=False,
                                             **recipe))
    # every per-run number comes from this one run, so that they describe the same training
    result = sorted(runs, key=lambda run: run.train_seconds)[(len(runs) - 1) // 2]  # the (lower) middle run
    gpu_peak = None
    if device.type == "cuda":
        gpu_peak = {"allocated": round(torch.cuda.max_memory_allocated(device) / _MIB, 1),
                    "reserved": round(torch.cuda.max_memory_reserved(device) / _MIB, 1)}
    summary = summarise(result, args=args, data=data, memory=memory, gpu_peak=gpu_peak, load_before=load_before)
    summary["train_seconds_repeats"] = [run.train_seconds for run in runs]

    print(format_epochs(result, args.val_k))
    if args.profile_steps:
        table, profiled = profile_steps(train, recipe, args.profile_steps, args.profile_rows, device)
        print(f"\ntorch.profiler, {profiled} training steps:")
        print(table)
    emit_summary(summary, args.json)
    return 0


def run(argv: list[str] | None = None) -> int:
    """Parse and check the arguments, set up logging and run main; return the exit status."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    train_lin_adapt.setup_logging()
    try:
        return main(args)
    except (DataError, ImageListError, TrainingError, SyntheticDataError, SummaryWriteError) as e:
        _logger.error("%s", e)
        return 1


if __name__ == "__main__":
    sys.exit(run())
