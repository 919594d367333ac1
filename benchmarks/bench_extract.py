"""Benchmark feature extraction: end-to-end images/s against model-forward-only images/s, and peak memory.

The end-to-end run calls `run_extraction`, the function behind `feature_extraction/extract.py`,
on a list of N images: decode workers, shape-bucketed batches, the model, the resumable
parts and the final HDF5 file. Each end-to-end run starts in a new Python process
(`extract_round.py`), as an extract.py run does, and a thread there sums the memory of that
process and its decode workers. The forward-only run then feeds the model the same batch
shapes (same batch sizes, precision and channels_last layout) from tensors prepared in
advance, in this process, so their ratio is the share of the model's speed the pipeline keeps.

On a shared machine the speed of the cores drifts between runs, so one end-to-end run and
one forward-only run made a minute apart can differ by more than the pipeline's cost.
`--rounds N` alternates the two N times and reports the median of each and the median of
the per-round ratios.

    python benchmarks/bench_extract.py                      # mini_uned images, EfficientNet-Lite0 at 256 px
    python benchmarks/bench_extract.py --cpu_bf16 true
    python benchmarks/bench_extract.py --selected_ids heldout_paths.txt --num_images 0 --compare_precision true

Results go to stdout: a short table, then one `summary: {...}` JSON line (also saved with
--json). The run log goes to stderr.
"""
import argparse
import contextlib
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.cli import SummaryWriteError, check_json_writable, emit_summary  # noqa: E402
from benchmarks.machine import describe_machine, load_average  # noqa: E402
from feature_extraction.allocator import keep_freed_memory_mapped  # noqa: E402
from feature_extraction.backbones import FRAMEWORKS, NO_WEIGHTS, POOLINGS, build_backbone  # noqa: E402
from feature_extraction.batchnorm_folding import fold_backbone_batchnorm  # noqa: E402
from feature_extraction.dataset import (  # noqa: E402
    WORKER_PRIORITIES,
    ImageBatch,
    WindowedImageDataset,
    auto_window_size,
    split_windows,
)
from feature_extraction.embedding import AMP_DTYPES, Embedder, resolve_autocast, resolve_device  # noqa: E402
from feature_extraction.extract import EXIT_ERROR, EXTRACTION_ERRORS, log_extraction_error, setup_logging  # noqa: E402
from feature_extraction.flags import bool_flag  # noqa: E402
from feature_extraction.image_list import ListEntry, escape_id, read_image_list, scan_image_dir  # noqa: E402
from feature_extraction.images import DEFAULT_MAX_IMAGE_PIXELS, DecodeOptions  # noqa: E402
from feature_extraction.interrupts import EXIT_SIGINT, exit_status  # noqa: E402
from feature_extraction.pipeline import DEFAULT_BATCH_SIZE, run_extraction  # noqa: E402
from feature_extraction.transforms import InferenceTransform, TransformName, multiple_padding  # noqa: E402
from linear_adaptation.arg_checks import (  # noqa: E402
    HelpFormatter,
    check_at_least_one,
    check_input_files,
    check_not_an_input,
    check_output_file,
    same_file,
)
from linear_adaptation.features_io import load_hdf5_features  # noqa: E402
from linear_adaptation.knn import knn_search  # noqa: E402
from linear_adaptation.metrics import labelled_set_metrics  # noqa: E402

_logger = logging.getLogger("bench_extract")

REPO_ROOT = Path(__file__).resolve().parents[1]

# the files main() and compare_precision() write in the work folder, replacing any file of that name
LIST_NAME = "list.txt"
FEATURES_NAME = "features_uned.hdf5"
ROUND_REQUEST_NAME = "round_request.json"
ROUND_RESULT_NAME = "round_result.json"
WORK_DIR_MARKER = "bench_extract_work_dir.txt"
PRECISION_NAMES = ("precision_float32.hdf5", "precision_autocast.hdf5")
WORK_DIR_FILES = (LIST_NAME, FEATURES_NAME, ROUND_REQUEST_NAME, ROUND_RESULT_NAME, *PRECISION_NAMES, WORK_DIR_MARKER)
# run_extraction also writes and deletes files named after its output: OUTPUT.parts/, OUTPUT.parts.lock,
# OUTPUT.tmp and OUTPUT.failed.txt (feature_extraction/store.py and hdf5_output.py)
EXTRACTION_OUTPUTS = (FEATURES_NAME, *PRECISION_NAMES)
ROUND_SCRIPT = Path(__file__).resolve().with_name("extract_round.py")


def default_dataset_dir() -> Path:
    """Return the mini_uned images: $MINI_UNED_DIR/images, else shared/data/mini_uned/images beside the repository."""
    mini_uned = Path(os.environ.get("MINI_UNED_DIR", REPO_ROOT.parent / "shared" / "data" / "mini_uned"))
    return mini_uned / "images"


def get_args_parser() -> argparse.ArgumentParser:
    """Build the parser; model and compute flags follow feature_extraction/extract.py."""
    parser = argparse.ArgumentParser(
        description="Time extract.py's code path end to end against the model forward pass alone.",
        formatter_class=HelpFormatter,
    )
    data = parser.add_argument_group("images")
    data.add_argument("--dataset_dir", metavar="DIR",
                      help="folder of images (default: the mini_uned images, $MINI_UNED_DIR/images)")
    data.add_argument("--selected_ids", metavar="FILE",
                      help="image list relative to --dataset_dir, 'path' or 'path,label,domain' lines "
                           "(default: every image file under --dataset_dir)")
    data.add_argument("--num_images", metavar="N", type=int,
                      help="images to extract, spread evenly over the list; 0 takes them all")

    model = parser.add_argument_group("model")
    model.add_argument("--framework", metavar="NAME", choices=FRAMEWORKS, help="timm or openclip")
    model.add_argument("--model", metavar="NAME", help="model name as extract.py takes it")
    model.add_argument("--checkpoint", metavar="PATH",
                       help="local state dict, e.g. the output of misc/convert_efficientnet_lite0.py "
                            "(default: none, random weights; speed does not depend on the weight values)")
    model.add_argument("--pooling", metavar="NAME", choices=POOLINGS, help="embedding pooling, as extract.py")
    model.add_argument("--resolution", metavar="PIXELS", type=int, help="target size of the transform in pixels")
    model.add_argument("--transforms", metavar="NAME", choices=[t.value for t in TransformName],
                       help="inference transform, as extract.py")

    compute = parser.add_argument_group("compute")
    compute.add_argument("--device", metavar="NAME", choices=("auto", "cpu", "cuda"),
                         help="auto (CUDA when available), cpu or cuda")
    compute.add_argument("--batch_size", metavar="IMAGES", type=int,
                         help=f"images per forward pass (default: extract.py's, {DEFAULT_BATCH_SIZE['cpu']} on CPU, "
                              f"{DEFAULT_BATCH_SIZE['cuda']} on CUDA)")
    compute.add_argument("--num_workers", metavar="PROCESSES", type=int, help="image decoding processes")
    compute.add_argument("--window_size", metavar="ROWS", type=int,
                         help="list rows per window; each window is decoded by one worker, so a list needs at "
                              "least as many windows as workers to keep them all busy (default: extract.py's, an "
                              "eighth of the list, 128 to 2048 rows)")
    compute.add_argument("--worker_priority", metavar="LEVEL", choices=WORKER_PRIORITIES,
                         help="scheduling of the decode workers, as extract.py's flag")
    compute.add_argument("--fold_batchnorm", metavar="BOOL", type=bool_flag,
                         help="fold BatchNorm into the convolutions, in both timings, as extract.py's flag")
    compute.add_argument("--cpu_bf16", metavar="BOOL", type=bool_flag,
                         help="CPU only: bfloat16 autocast where the CPU supports it (true/false)")
    compute.add_argument("--comp_fp16", metavar="BOOL", type=bool_flag,
                         help="CUDA only: autocast with --amp_dtype, as extract.py does by default (true/false)")
    compute.add_argument("--amp_dtype", metavar="DTYPE", choices=tuple(AMP_DTYPES), help="autocast dtype on CUDA")
    compute.add_argument("--store_fp16", metavar="BOOL", type=bool_flag,
                         help="store the embeddings as float16, as extract.py does by default (true/false)")

    run = parser.add_argument_group("run")
    run.add_argument("--forward_passes", metavar="N", type=int,
                     help="timed forward-only passes over all batch shapes, after one warm-up batch per shape")
    run.add_argument("--rounds", metavar="N", type=int,
                     help="alternate the end-to-end run, each in a new process, and the forward-only passes "
                          "N times. The rates are the medians over the rounds and the ratio is the median of "
                          "the per-round ratios. Peak memory comes from the first end-to-end run")
    run.add_argument("--compare_precision", metavar="BOOL", type=bool_flag,
                     help="also extract the list twice with float32 storage, once in float32 and once with "
                          "the autocast of --cpu_bf16 true (CPU) or --comp_fp16 true (CUDA), and report "
                          "the cosine between the two embeddings of each image and, for a labelled list, "
                          "both mAP@--val_k (true/false)")
    run.add_argument("--val_k", metavar="K", type=int, help="ranking depth of the mAP@k in --compare_precision")
    run.add_argument("--profile_batches", metavar="N", type=int,
                     help="profile N forward-only batches with torch.profiler and print the operators that "
                          "take the most time; 0 means no profile")
    run.add_argument("--profile_rows", metavar="N", type=int, help="operators listed in the profile table")
    run.add_argument("--work_dir", metavar="DIR",
                     help="folder for the list, the HDF5 outputs and the files that pass each round's settings "
                          "and results (list.txt, features_uned.hdf5, round_request.json, round_result.json and, "
                          "with --compare_precision, precision_float32.hdf5 and precision_autocast.hdf5), kept "
                          "after the run. The benchmark marks the folder with bench_extract_work_dir.txt, and a "
                          "rerun with the same folder replaces these files. Any other folder that already holds "
                          "one of these files, or one that run_extraction keeps beside its output such as "
                          "features_uned.hdf5.parts, is rejected, because it may contain an extract.py run. A "
                          "folder with a round_request.json counts as the benchmark's own too, as earlier "
                          "versions left no marker (default: a temporary folder, deleted)")
    run.add_argument("--json", metavar="PATH", help="also write the summary to this JSON file (default: none)")

    parser.set_defaults(
        dataset_dir=None, selected_ids=None, num_images=1024, framework="timm", model="tf_efficientnet_lite0",
        checkpoint=None, pooling="head", resolution=256, transforms=TransformName.RESIZE_LARGE.value,
        device="auto", batch_size=None, num_workers=2, window_size=None, worker_priority="auto", fold_batchnorm=True, cpu_bf16=False, comp_fp16=True,
        amp_dtype="float16", store_fp16=True, forward_passes=1, rounds=1, compare_precision=False, val_k=100,
        profile_batches=0, profile_rows=15, work_dir=None, json=None,
    )
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Fill the defaults that depend on other flags and reject invalid values with parser.error."""
    if args.dataset_dir is None:
        args.dataset_dir = str(default_dataset_dir())
    if not Path(args.dataset_dir).is_dir():
        parser.error(f"--dataset_dir {args.dataset_dir!r} is not a folder; set MINI_UNED_DIR or pass --dataset_dir")
    check_at_least_one(
        parser, args, ("resolution", "forward_passes", "rounds", "val_k", "profile_rows", "batch_size", "window_size")
    )
    for name in ("num_images", "num_workers", "profile_batches"):
        if getattr(args, name) < 0:
            parser.error(f"--{name} is {getattr(args, name)}; it must be 0 or more")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was given but torch finds no CUDA device; use --device cpu or auto")
    if args.model == "":
        parser.error("--model is empty; pass a timm or open_clip model name")
    check_paths(parser, args)


def check_paths(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject missing inputs, a --work_dir that is a file, and a --json path that cannot be written or is an input."""
    inputs = {f"--{name}": [getattr(args, name)] for name in ("selected_ids", "checkpoint")
              if getattr(args, name) is not None}
    check_input_files(parser, inputs)
    if args.work_dir is not None and os.path.exists(args.work_dir) and not os.path.isdir(args.work_dir):
        parser.error(f"--work_dir {args.work_dir!r} is a file; give a folder for the list and HDF5 outputs")
    if args.json is not None:
        check_output_file(parser, "--json", args.json)
        check_not_an_input(parser, "--json", args.json, inputs)
        check_json_writable(parser, args.json)
    if args.work_dir is not None:
        check_not_a_work_dir_file(parser, args)
        check_work_dir_reusable(parser, args.work_dir)


def check_not_a_work_dir_file(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject an input or --json path that is one of the files the benchmark writes in --work_dir."""
    for flag in ("--selected_ids", "--checkpoint", "--json"):
        path = getattr(args, flag.removeprefix("--"))
        if path is None:
            continue
        for name in WORK_DIR_FILES:
            if same_file(path, os.path.join(args.work_dir, name)):
                parser.error(f"{flag} {path!r} is the {name} that the benchmark writes in --work_dir "
                             f"{args.work_dir!r}; choose another --work_dir")


def written_by_benchmark(name: str) -> bool:
    """Return whether the benchmark writes, replaces or deletes a file of this name in its work folder."""
    return name in WORK_DIR_FILES or any(name.startswith(output + ".") for output in EXTRACTION_OUTPUTS)


def check_work_dir_reusable(parser: argparse.ArgumentParser, work_dir: str) -> None:
    """Reject a --work_dir whose files the benchmark would replace, unless an earlier benchmark run made it.

    An earlier run leaves WORK_DIR_MARKER, or round_request.json before the marker existed.
    Any other folder with such files may contain an extract.py run's output or partial run.
    """
    if not os.path.isdir(work_dir):
        return
    try:
        names = set(os.listdir(work_dir))
    except OSError as e:
        parser.error(f"--work_dir {work_dir!r} cannot be read: {e.strerror or e}; choose another --work_dir")
    if WORK_DIR_MARKER in names or ROUND_REQUEST_NAME in names:
        return
    found = sorted(name for name in names if written_by_benchmark(name))
    if found:
        parser.error(
            f"--work_dir {work_dir!r} contains files that the benchmark would replace or delete ({', '.join(found)}) "
            f"and no {WORK_DIR_MARKER} from an earlier bench_extract.py run; choose an empty or new --work_dir"
        )


def select_entries(dataset_dir: str, selected_ids: str | None, num_images: int) -> list[ListEntry]:
    """Return `num_images` entries spread evenly over the list (or the folder scan); all for 0."""
    entries = read_image_list(selected_ids) if selected_ids is not None else scan_image_dir(dataset_dir)
    if num_images == 0 or num_images >= len(entries):
        return entries
    positions = np.linspace(0, len(entries) - 1, num_images).round().astype(np.int64)
    return [entries[i] for i in positions]


def mark_work_dir(work_dir: Path) -> None:
    """Write the marker that lets a rerun with this --work_dir replace the files of this run."""
    text = ("This folder is a --work_dir of benchmarks/bench_extract.py. "
            "A rerun with the same --work_dir replaces its files.\n")
    (work_dir / WORK_DIR_MARKER).write_text(text, encoding="utf-8")


def write_list(entries: list[ListEntry], path: Path) -> None:
    """Write entries as a list file, with labels when every entry has them."""
    labelled = all(entry.label is not None and entry.domain is not None for entry in entries)
    lines = [f"{e.path},{e.label},{e.domain}\n" if labelled else f"{e.path}\n" for e in entries]
    path.write_text("".join(lines), encoding="utf-8")


def extract(settings: dict, list_path: Path, output: Path, *, cpu_bf16: bool, comp_fp16: bool, store_fp16: bool):
    """Run run_extraction on the list into `output` (replacing it) and return its summary."""
    return run_extraction(
        selected_ids=str(list_path), output=output, cpu_bf16=cpu_bf16, comp_fp16=comp_fp16, store_fp16=store_fp16,
        overwrite=True, **settings,
    )


class RoundFailed(Exception):
    """An end-to-end round whose process failed, with the exit status that extract.py gives that failure.

    A process killed by a signal gets the shell's status for it, 128 + the signal number
    (130 for SIGINT, 137 for SIGKILL).
    """

    def __init__(self, returncode: int):
        if returncode < 0:
            name = signal.Signals(-returncode).name
            message = f"the end-to-end extraction process was killed by {name}"
            self.exit_status = exit_status(-returncode)
        else:
            message = f"the end-to-end extraction exited with status {returncode}; its log is above"
            self.exit_status = returncode
        super().__init__(message)


def extract_in_new_process(settings: dict, list_path: Path, output: Path, work_dir: Path, *, cpu_bf16: bool,
                           comp_fp16: bool, store_fp16: bool) -> dict:
    """Run run_extraction as `extract` does, but in a new Python process, and return its numbers.

    Returns the dict `extract_round.py` writes: the extraction's counts and seconds and the
    peak memory of that process and its decode workers. Raises RoundFailed when the process
    fails or is killed; its log goes to this process's stderr.
    """
    request = {**settings, "selected_ids": str(list_path), "output": str(output), "cpu_bf16": cpu_bf16,
               "comp_fp16": comp_fp16, "store_fp16": store_fp16, "overwrite": True}
    request_path, result_path = work_dir / ROUND_REQUEST_NAME, work_dir / ROUND_RESULT_NAME
    request_path.write_text(json.dumps(request), encoding="utf-8")
    result_path.unlink(missing_ok=True)
    process = subprocess.Popen([sys.executable, str(ROUND_SCRIPT), str(request_path), str(result_path)])
    try:
        returncode = process.wait()
    except KeyboardInterrupt:
        # Ctrl-C sends SIGINT to the whole foreground process group, so the round process got it
        # too and is stopping cleanly. Wait for it instead of killing it, as subprocess.run would.
        # NOTE: a SIGINT sent to this process alone lets the round run to its end first.
        process.wait()
        raise
    if returncode != 0:
        raise RoundFailed(returncode)
    return json.loads(result_path.read_text(encoding="utf-8"))


def decode_batches(dataset_dir: str, entries: list[ListEntry], decode_options: DecodeOptions, batch_size: int,
                   window_size: int) -> tuple[list[ImageBatch], float]:
    """Decode the list in this process into the batches the extraction forms; return them and the seconds taken."""
    windows = split_windows(len(entries), window_size)
    dataset = WindowedImageDataset(dataset_dir, [entry.path for entry in entries], windows, decode_options, batch_size)
    start = time.perf_counter()
    batches = [record for record in dataset if isinstance(record, ImageBatch)]
    return batches, time.perf_counter() - start


def model_input(embedder: Embedder, images_uint8: torch.Tensor) -> torch.Tensor:
    """Return the (B, 3, H, W) channels_last model input of a uint8 batch, as the embedder builds it."""
    images = embedder.prepare(images_uint8)
    patch_size = embedder.backbone.patch_size
    if patch_size is not None:
        top, bottom = multiple_padding(images.shape[-2], patch_size[0])
        left, right = multiple_padding(images.shape[-1], patch_size[1])
        images = F.pad(images, (left, right, top, bottom))
    return images.contiguous(memory_format=torch.channels_last)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(embedder: Embedder) -> contextlib.AbstractContextManager:
    if embedder.autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=embedder.device.type, dtype=embedder.autocast_dtype)


@torch.inference_mode()
def time_forward(embedder: Embedder, batches: list[ImageBatch], passes: int) -> dict:
    """Time the model alone, then the whole embedder, on the batches' shapes.

    The forward-only timing reuses one prepared input per distinct batch shape, since the
    speed does not depend on pixel values. One batch per shape runs first as a warm-up
    (oneDNN builds its kernels per shape) and is not timed.
    """
    inputs = {}
    for batch in batches:
        if batch.images.shape not in inputs:
            inputs[batch.images.shape] = model_input(embedder, batch.images)
    num_images = sum(len(batch.rows) for batch in batches)

    start = time.perf_counter()
    with _autocast(embedder):
        for x in inputs.values():
            embedder.backbone.module(x)
    _synchronize(embedder.device)
    warmup_seconds = time.perf_counter() - start

    start = time.perf_counter()
    for _ in range(passes):
        for batch in batches:
            with _autocast(embedder):
                features = embedder.backbone.module(inputs[batch.images.shape])
            F.normalize(features.float(), dim=-1)
    _synchronize(embedder.device)
    forward_seconds = (time.perf_counter() - start) / passes

    start = time.perf_counter()
    for batch in batches:
        embedder.embed(batch.images)
    embed_seconds = time.perf_counter() - start

    return {
        "distinct_shapes": len(inputs),
        "warmup_seconds": warmup_seconds,
        "forward_seconds": forward_seconds,
        "forward_images_per_second": num_images / forward_seconds,
        "embed_images_per_second": num_images / embed_seconds,
    }


@torch.inference_mode()
def profile_forward(embedder: Embedder, batches: list[ImageBatch], num_batches: int, rows: int) -> str:
    """Run `num_batches` batches through the model under torch.profiler; return the top-operator table."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    sort_by = "self_cpu_time_total"
    if embedder.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        sort_by = "self_cuda_time_total"
    inputs = [model_input(embedder, batch.images) for batch in batches[:num_batches]]
    with torch.profiler.profile(activities=activities) as profiler, _autocast(embedder):
        for x in inputs:
            embedder.backbone.module(x)
    return profiler.key_averages().table(sort_by=sort_by, row_limit=rows)


def retrieval_map(features: np.ndarray, labels: np.ndarray, domains: np.ndarray, k: int) -> float:
    """Return the mAP@k (percent) of every image querying all the others of the set."""
    _, ranked = knn_search(features, [features], k=k, device=torch.device("cpu"), exclude_self=True)
    return labelled_set_metrics(ranked, labels, domains, k)["map"]


def compare_precision(settings: dict, list_path: Path, entries: list[ListEntry], work_dir: Path, device: torch.device,
                      val_k: int) -> dict:
    """Extract twice with float32 storage, in float32 and with autocast, and compare the embeddings."""
    outputs = {}
    for name, reduced in (("float32", False), ("autocast", True)):
        output = work_dir / f"precision_{name}.hdf5"
        extract(settings, list_path, output, cpu_bf16=reduced and device.type == "cpu",
                comp_fp16=reduced and device.type == "cuda", store_fp16=False)
        outputs[name] = load_hdf5_features(output)

    (full, full_ids), (reduced, reduced_ids) = outputs["float32"], outputs["autocast"]
    if full_ids != reduced_ids:
        raise RuntimeError("the float32 and autocast runs embedded different images; compare their .failed.txt files")
    cosine = np.sum(full.astype(np.float64) * reduced.astype(np.float64), axis=1)
    result = {
        "images": int(cosine.shape[0]),
        "cosine_mean": float(cosine.mean()),
        "cosine_min": float(cosine.min()),
        "cosine_p01": float(np.quantile(cosine, 0.01)),
    }

    by_id = {escape_id(entry.path): entry for entry in entries}
    rows = [by_id[image_id] for image_id in full_ids]
    if all(entry.label is not None for entry in rows):
        labels = np.array([entry.label for entry in rows], dtype=np.int64)
        domains = np.array([entry.domain for entry in rows], dtype=np.int64)
        result["val_k"] = val_k
        result["map_float32"] = retrieval_map(full, labels, domains, val_k)
        result["map_autocast"] = retrieval_map(reduced, labels, domains, val_k)
        result["map_difference"] = result["map_autocast"] - result["map_float32"]
    return result


def prepare_forward_only(args: argparse.Namespace, settings: dict, entries: list[ListEntry], device: torch.device,
                         batch_size: int, window_size: int) -> tuple[Embedder, list[ImageBatch], float]:
    """Decode the list into the extraction's batches and build the same model, returning both and the decode seconds.

    On the CPU this process gets the malloc settings that run_extraction sets, without which
    the forward passes run at about half speed (feature_extraction/allocator.py).
    """
    if device.type == "cpu":
        keep_freed_memory_mapped()
    transform = InferenceTransform(TransformName(args.transforms), args.resolution, 0)
    decode_options = DecodeOptions(transform, max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS, jpeg_draft=True)
    batches, decode_seconds = decode_batches(args.dataset_dir, entries, decode_options, batch_size, window_size)
    autocast_dtype = resolve_autocast(device, args.comp_fp16, args.amp_dtype, args.cpu_bf16)
    torch.manual_seed(0)
    backbone = build_backbone(args.framework, args.model, settings["pretrained"], args.checkpoint, args.pooling)
    if args.fold_batchnorm:
        backbone.module, _ = fold_backbone_batchnorm(backbone.module, args.resolution)
    return Embedder(backbone, transform, device, autocast_dtype=autocast_dtype), batches, decode_seconds


def median_of_rounds(rounds: list[dict]) -> dict:
    """Return the median of every timing over the rounds. The ratio is the median of the per-round ratios."""
    medians = {key: statistics.median(r[key] for r in rounds) for key in rounds[0] if key != "distinct_shapes"}
    return {"distinct_shapes": rounds[0]["distinct_shapes"], **medians}


def _count(number: int, singular: str, plural: str) -> str:
    return f"{number} {singular if number == 1 else plural}"


def describe_workers(summary: dict) -> str:
    """Describe the decode workers the end-to-end run started, and why there are fewer than --num_workers."""
    windows = (f"{_count(summary['num_windows'], 'window', 'windows')} of up to "
               f"{summary['window_size']} rows")
    if summary["num_workers"] == 0:
        return f"0, decoding in the main process ({windows})"
    if summary["decode_workers"] < summary["num_workers"]:
        return (f"{summary['decode_workers']} of --num_workers {summary['num_workers']}, one per window "
                f"({windows}); lower --window_size to use more")
    return f"{summary['decode_workers']} ({windows})"


def format_results(summary: dict) -> str:
    """Return the main numbers as aligned `name: value` lines."""
    medians = f", median of {summary['rounds']} rounds" if summary["rounds"] > 1 else ""
    first_round = " (first round)" if summary["rounds"] > 1 else ""
    lines = [
        f"images:                      {summary['num_images']} in {summary['num_batches']} batches "
        f"({summary['distinct_shapes']} shapes), precision {summary['precision']}",
        f"end-to-end images/s:         {summary['end_to_end_images_per_second']:.2f} "
        f"({summary['wall_images_per_second']:.2f} counting model build and HDF5 assembly){medians}",
        f"forward-only images/s:       {summary['forward_images_per_second']:.2f} "
        f"(embedder with normalisation: {summary['embed_images_per_second']:.2f}){medians}",
        f"end-to-end / forward-only:   {summary['end_to_end_over_forward']:.3f}{medians}",
        f"decode images/s, 1 process:  {summary['decode_images_per_second']:.2f}{first_round}",
        f"decode workers:              {describe_workers(summary)}",
        f"peak memory, {_count(summary['max_processes'], 'process', 'processes')}{first_round}: "
        f"main RSS + workers' USS {summary['peak_rss_uss_mib']:.0f} MiB, "
        f"RSS sum {summary['peak_rss_mib']:.0f} MiB, PSS sum {summary['peak_pss_mib']:.0f} MiB",
    ]
    precision = summary.get("precision_check")
    if precision:
        line = (f"autocast vs float32 cosine:  mean {precision['cosine_mean']:.5f}, "
                f"min {precision['cosine_min']:.5f} over {precision['images']} images")
        if "map_float32" in precision:
            line += (f"; mAP@{precision['val_k']} {precision['map_float32']:.2f} (float32) vs "
                     f"{precision['map_autocast']:.2f} (autocast)")
        lines.append(line)
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """Extract end to end, time the forward pass on the same batches, and print the results."""
    # before any work of this run, so that it measures only the other jobs on the machine
    load_before = load_average()
    _logger.info("configuration: %s", ", ".join(f"{k}={v}" for k, v in sorted(vars(args).items())))
    device = resolve_device(args.device)
    batch_size = args.batch_size or DEFAULT_BATCH_SIZE[device.type]
    entries = select_entries(args.dataset_dir, args.selected_ids, args.num_images)
    window_size = args.window_size or auto_window_size(len(entries))
    num_windows = len(split_windows(len(entries), window_size))
    settings = dict(
        dataset_dir=args.dataset_dir, framework=args.framework, model=args.model,
        pretrained=None if args.checkpoint else NO_WEIGHTS, checkpoint=args.checkpoint, pooling=args.pooling,
        resolution=args.resolution, transforms=args.transforms, min_size=0, multiscale=False,
        batch_size=batch_size, num_workers=args.num_workers, amp_dtype=args.amp_dtype, device=args.device,
        window_size=window_size, max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS, jpeg_draft=True,
        hdf5_compression=0, fold_batchnorm=args.fold_batchnorm, worker_priority=args.worker_priority,
    )

    with contextlib.ExitStack() as stack:
        if args.work_dir is None:
            work_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_extract_")))
        else:
            work_dir = Path(args.work_dir)
            work_dir.mkdir(parents=True, exist_ok=True)
            mark_work_dir(work_dir)
        list_path = work_dir / LIST_NAME
        write_list(entries, list_path)

        # end to end in a new process (with the memory of that process and its decode workers), then
        # forward only on the same batches, alternated so that a drift of the machine's speed hits both
        rounds = []
        for round_index in range(args.rounds):
            extraction = extract_in_new_process(settings, list_path, work_dir / FEATURES_NAME, work_dir,
                                                cpu_bf16=args.cpu_bf16, comp_fp16=args.comp_fp16,
                                                store_fp16=args.store_fp16)
            if round_index == 0:
                first_round = extraction
                embedder, batches, decode_seconds = prepare_forward_only(
                    args, settings, entries, device, batch_size, window_size
                )
            forward = time_forward(embedder, batches, args.forward_passes)
            end_to_end = extraction["rows_this_run"] / extraction["embed_seconds"]
            rounds.append({
                "end_to_end_images_per_second": end_to_end,
                "wall_images_per_second": extraction["num_images"] / extraction["seconds"],
                **forward,
                "end_to_end_over_forward": end_to_end / forward["forward_images_per_second"],
            })
            if args.rounds > 1:
                _logger.info("round %d of %d: end to end %.2f images/s, forward only %.2f images/s, ratio %.3f",
                             round_index + 1, args.rounds, end_to_end, forward["forward_images_per_second"],
                             rounds[-1]["end_to_end_over_forward"])
        decoded = sum(len(batch.rows) for batch in batches)
        autocast_dtype = embedder.autocast_dtype

        summary = {
            "benchmark": "extract",
            "dataset_dir": args.dataset_dir,
            "model": args.model,
            "checkpoint": args.checkpoint,
            "resolution": args.resolution,
            "transforms": args.transforms,
            "device": device.type,
            "precision": str(autocast_dtype or torch.float32).removeprefix("torch."),
            "fold_batchnorm": args.fold_batchnorm,
            "worker_priority": args.worker_priority,
            "store_fp16": args.store_fp16,
            "batch_size": batch_size,
            "num_workers": args.num_workers,
            # run_extraction starts one worker per window at most
            "decode_workers": min(args.num_workers, num_windows),
            "num_windows": num_windows,
            "window_size": window_size,
            "num_images": len(entries),
            "num_embedded": extraction["num_embedded"],
            "num_batches": len(batches),
            **median_of_rounds(rounds),
            "rounds": args.rounds,
            "per_round": rounds,
            "decode_images_per_second": decoded / decode_seconds,
            "peak_rss_mib": round(first_round["peak_rss_mib"], 1),
            "peak_pss_mib": round(first_round["peak_pss_mib"], 1),
            "peak_rss_uss_mib": round(first_round["peak_rss_uss_mib"], 1),
            "rss_before_mib": round(first_round["start_rss_mib"], 1),
            "max_processes": first_round["max_processes"],
            "load_average_before": load_before,
            "load_average_after": load_average(),
            "machine": describe_machine(),
        }
        if args.profile_batches:
            print(f"torch.profiler, {min(args.profile_batches, len(batches))} forward-only batches:")
            print(profile_forward(embedder, batches, args.profile_batches, args.profile_rows))
        if args.compare_precision:
            summary["precision_check"] = compare_precision(settings, list_path, entries, work_dir, device, args.val_k)

    print(format_results(summary))
    emit_summary(summary, args.json)
    return 0


def run(argv: list[str] | None = None) -> int:
    """Parse and check the arguments, set up logging and run main.

    Returns extract.py's exit statuses: 2 for invalid arguments such as an unknown model,
    1 for a failed extraction or a --work_dir or --json file that cannot be written, 130 for Ctrl-C, and
    128 + the signal number for a round process killed by a signal.
    """
    parser = get_args_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    setup_logging()
    try:
        return main(args)
    except RoundFailed as e:
        _logger.error("%s", e)
        return e.exit_status
    except KeyboardInterrupt:
        _logger.warning("stopped by SIGINT")
        return EXIT_SIGINT
    except EXTRACTION_ERRORS as e:
        return log_extraction_error(e)
    except SummaryWriteError as e:
        _logger.error("%s", e)
        return EXIT_ERROR
    except OSError as e:
        _logger.error("benchmark failed: %s", e)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(run())
