"""Extract L2-normalised image embeddings with a timm or open_clip backbone into ILIAS-layout HDF5.

Example (ImageNet EfficientNet-Lite0 from a local checkpoint, on mini_uned):

    python feature_extraction/extract.py --dataset_dir data/mini_uned/images \\
        --selected_ids data/mini_uned/heldout_paths.txt --hdf5_dir outputs/lite0 \\
        --framework timm --model tf_efficientnet_lite0 --checkpoint lite0.pth --resolution 256

The output `<hdf5_dir>/<hdf5_name>_<partition>.hdf5` contains `features` (N x D) and `index`
(the list paths, non-ASCII characters escaped as `#Uxxxx`) in list order. Images that
cannot be read are left out and listed in `<output>.failed.txt` as `path,reason` lines.
"""
import argparse
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from feature_extraction.interrupts import exit_quietly_on_signals  # noqa: E402

if __name__ == "__main__":
    exit_quietly_on_signals()  # until the script's own handling starts, because importing torch takes seconds

from feature_extraction.backbones import (  # noqa: E402
    FRAMEWORK_ALIASES,
    FRAMEWORKS,
    POOLINGS,
    BackboneError,
    WeightsUnavailableError,
)
from feature_extraction.checkpoints import CheckpointError  # noqa: E402
from feature_extraction.dataset import MAX_AUTO_WINDOW_SIZE, WORKER_PRIORITIES  # noqa: E402
from feature_extraction.embedding import AMP_DTYPES, DeviceError  # noqa: E402
from feature_extraction.flags import bool_flag  # noqa: E402
from feature_extraction.image_list import ImageListError  # noqa: E402
from feature_extraction.images import DEFAULT_MAX_IMAGE_PIXELS  # noqa: E402
from feature_extraction.interrupts import Interrupted  # noqa: E402
from feature_extraction.pipeline import DEFAULT_BATCH_SIZE, ExtractionError, output_path, run_extraction  # noqa: E402
from feature_extraction.store import SettingsMismatchError, StoreError  # noqa: E402
from feature_extraction.transforms import TransformName  # noqa: E402

_logger = logging.getLogger("feature_extraction.extract")

PARTITIONS = ("uned", "image_queries", "positives")
EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2
MAX_INT64 = 2**63 - 1
# errors of run_extraction that mean invalid arguments (exit status 2) or a failed run (1)
USAGE_ERRORS = (BackboneError, DeviceError, SettingsMismatchError)
RUN_ERRORS = (ExtractionError, ImageListError, CheckpointError, StoreError, WeightsUnavailableError)
EXTRACTION_ERRORS = USAGE_ERRORS + RUN_ERRORS
# everything extraction_exit_status turns into an exit status
EXTRACTION_FAILURES = (Interrupted, *EXTRACTION_ERRORS, OSError)

EPILOG = """\
exit status:
  0    the output is complete (also when some images were skipped: they are listed in
       <output>.failed.txt and counted in the log), or it already existed with the same settings
       and was left untouched, also in a folder that cannot be written
  1    the run failed: unreadable list, dataset folder or checkpoint, pretrained weights
       that could not be downloaded, unwritable output folder, no readable image, NaN, Inf
       or all-zero embeddings from every image of the first batches, a fatal model error
       (out of memory, or errors on the first batches and on a square image), a decode
       worker that died (the saved windows are kept; rerun to resume), or another process
       extracting into the same output
  2    invalid arguments: a bad flag value, an unknown model or tag, transforms that give
       other input sizes than a fixed-size model takes, CUDA requested but
       absent, an output path that is a folder, or settings that differ from the partial
       run being resumed or from the existing output. For a file of the older ILIAS
       tools, which records no settings, ids that are not the list's in list order
       count as such a difference
  130  stopped by SIGINT (Ctrl-C); 143: stopped by SIGTERM; 129: stopped by SIGHUP (the
       terminal closed). Finished windows are kept in <output>.parts/ and rerunning the
       same command resumes from them. Drop --overwrite true from it first, because that
       flag deletes them. An output that the stopped run was to replace stays until then

A killed run (even SIGKILL) resumes the same way; the final file only ever appears complete.
"""

def default_num_workers() -> int:
    """Return min(8, the CPU cores this process may use)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not available on macOS
        cores = os.cpu_count() or 1
    return min(8, cores)


def get_args_parser() -> argparse.ArgumentParser:
    """Build the command-line parser; flag names follow the ILIAS extractor."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    data = parser.add_argument_group("images and output")
    data.add_argument("--dataset_dir", metavar="DIR", required=True,
                      help="folder the list paths are relative to (required)")
    data.add_argument("--selected_ids", metavar="FILE",
                      help="image list, one 'path,label,domain' or 'path' per line; output rows follow its "
                           "order (default: every image file under --dataset_dir, symlinked folders included, sorted "
                           "by path)")
    data.add_argument("--partition", metavar="NAME", choices=PARTITIONS,
                      help=f"partition name used in the output file name, one of {', '.join(PARTITIONS)} "
                           "(default: %(default)s)")
    data.add_argument("--hdf5_dir", metavar="DIR", required=True,
                      help="folder for the output file, created if missing (required)")
    data.add_argument("--hdf5_name", metavar="NAME",
                      help="output file stem: <hdf5_dir>/<hdf5_name>_<partition>.hdf5 (default: %(default)s)")
    data.add_argument("--hdf5_compression", metavar="LEVEL", type=int,
                      help="gzip level 1-9 for the features dataset, 0 for none (default: %(default)s)")
    data.add_argument("--store_fp16", metavar="BOOL", type=bool_flag,
                      help="store features as float16 instead of float32 (default: %(default)s)")
    data.add_argument("--overwrite", metavar="BOOL", type=bool_flag,
                      help="extract again although the output exists: delete a partial run and a leftover "
                           "temporary file first, and keep the existing output and its failure report until the "
                           "new output is complete and replaces them, so the old output, the parts and the "
                           "temporary file need disk space together. A stopped run resumes only when rerun "
                           "without this flag. Without it a complete output extracted with the same settings is "
                           "left untouched and one with other settings is an error (default: %(default)s)")

    backbone = parser.add_argument_group("model")
    backbone.add_argument("--framework", metavar="NAME", choices=FRAMEWORKS + tuple(FRAMEWORK_ALIASES),
                          help="model library: timm or openclip ('och' is an alias of openclip) "
                               "(default: %(default)s)")
    backbone.add_argument("--model", metavar="NAME",
                          help="timm model name, or open_clip model name; NAME.TAG also gives the "
                               "pretrained tag, e.g. RN50.openai (default: %(default)s)")
    backbone.add_argument("--pretrained", metavar="TAG",
                          help="pretrained weights tag, e.g. openai for open_clip or in1k for timm; 'none' "
                               "builds random weights for tests (default, also for an empty value: the tag in "
                               "--model, else timm's default tag; open_clip needs one unless --checkpoint is "
                               "given)")
    backbone.add_argument("--checkpoint", metavar="PATH",
                          help="local state dict (.pth/.pt/.bin via torch.load(weights_only=True), or "
                               ".safetensors) loaded strictly into the model instead of downloading weights "
                               "(default: none)")
    backbone.add_argument("--pooling", metavar="NAME", choices=POOLINGS,
                          help="embedding: head (model output, pre-logits for classifiers), cls (class "
                               "token, ViTs), gap (mean of patch tokens or feature map), gem (generalised "
                               "mean, p=3); cls, gap and gem are timm-only (default: %(default)s)")

    preprocessing = parser.add_argument_group("preprocessing")
    preprocessing.add_argument("--resolution", metavar="PIXELS", type=int,
                               help="target size in pixels for --transforms (default: %(default)s)")
    preprocessing.add_argument("--transforms", metavar="NAME", choices=[t.value for t in TransformName],
                               help="RESIZE_LARGE: longer side to --resolution, aspect kept, centre-padded "
                                    "to --min_size; RESIZE_SMALL: shorter side to --resolution; "
                                    "RESIZE_CENTER: shorter side, then centre crop; RESIZE_SQUARE: "
                                    "--resolution x --resolution; RESIZE_PAD: longer side, then centre-padded "
                                    "to a square (default: %(default)s)")
    preprocessing.add_argument("--min_size", metavar="PIXELS", type=int,
                               help="RESIZE_LARGE only: pad each side to at least this many pixels "
                                    "(default: %(default)s)")
    preprocessing.add_argument("--multiscale", metavar="BOOL", type=bool_flag,
                               help="average the unit-norm embeddings at scales 0.707, 1 and 1.414 and "
                                    "re-normalise (3x the compute) (default: %(default)s)")
    preprocessing.add_argument("--max_image_pixels", metavar="PIXELS", type=int,
                               help="skip images whose declared width x height is larger "
                                    "(decompression-bomb guard; 1 to 2**63 - 1) (default: %(default)s)")
    preprocessing.add_argument("--jpeg_draft", metavar="BOOL", type=bool_flag,
                               help="decode large JPEGs at a reduced scale (at least 2x the resized size) "
                                    "for speed. This changes the pixels of JPEGs at least 4x the resized size, and "
                                    "false gives the ILIAS extractor's pixels (default: %(default)s)")

    compute = parser.add_argument_group("compute")
    compute.add_argument("--device", metavar="NAME", choices=("auto", "cpu", "cuda"),
                         help="auto (CUDA when available), cpu or cuda (default: %(default)s)")
    compute.add_argument("--batch_size", metavar="IMAGES", type=int,
                         help="images per forward pass; a batch contains images of one shape, so some are "
                              f"smaller (default: {DEFAULT_BATCH_SIZE['cpu']} on CPU, "
                              f"{DEFAULT_BATCH_SIZE['cuda']} on CUDA)")
    compute.add_argument("--num_workers", metavar="PROCESSES", type=int,
                         help="image decoding processes, 0 decodes in the main process "
                              "(default: min(8, CPU cores) = %(default)s)")
    compute.add_argument("--comp_fp16", metavar="BOOL", type=bool_flag,
                         help="CUDA only: mixed precision (autocast) with --amp_dtype (default: %(default)s)")
    compute.add_argument("--amp_dtype", metavar="DTYPE", choices=tuple(AMP_DTYPES),
                         help="autocast dtype on CUDA: float16 or bfloat16 (default: %(default)s)")
    compute.add_argument("--cpu_bf16", metavar="BOOL", type=bool_flag,
                         help="CPU only: bfloat16 autocast when the CPU supports it natively, else "
                              "float32 with a warning (default: %(default)s)")
    compute.add_argument("--worker_priority", metavar="LEVEL", choices=WORKER_PRIORITIES,
                         help="scheduling of the decode workers: idle (Linux SCHED_IDLE, so they run only on "
                              "cores nothing else needs; niceness +10 where that policy is refused), low "
                              "(niceness +10), normal, or auto: idle when the model runs on the CPU, where a "
                              "busy decoder stalls its threads, and low on CUDA. No effect with --num_workers 0, where "
                              "the main process decodes (default: %(default)s)")
    compute.add_argument("--fold_batchnorm", metavar="BOOL", type=bool_flag,
                         help="fold each eval-mode BatchNorm that reads a convolution's output into that "
                              "convolution, so CNN backbones skip a pass over their activations. The folded "
                              "model is used only if its output on one test image is within 5e-5 (relative) "
                              "of the original's, less than float16 storage rounding; models without "
                              "BatchNorm are unaffected (default: %(default)s)")
    compute.add_argument("--window_size", metavar="ROWS", type=int,
                         help="consecutive list rows saved together; a killed run loses at most the "
                              "windows in progress. Each decode worker takes whole windows, so only as many "
                              "workers start as there are windows (default: list length / 8, between 128 and "
                              f"{MAX_AUTO_WINDOW_SIZE})")

    parser.set_defaults(
        partition="uned", hdf5_name="features", hdf5_compression=0, store_fp16=True, overwrite=False,
        framework="timm", model="vit_large_patch16_siglip_384.webli", pretrained=None, checkpoint=None,
        pooling="head", resolution=512, transforms=TransformName.RESIZE_LARGE.value, min_size=0,
        multiscale=False, max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS, jpeg_draft=True, device="auto",
        batch_size=None, num_workers=default_num_workers(), comp_fp16=True, amp_dtype="float16",
        cpu_bf16=False, fold_batchnorm=True, worker_priority="auto", window_size=None, selected_ids=None,
    )
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject flag values that parse but cannot work (calls parser.error, which exits with 2)."""
    positive = ("resolution", "batch_size", "window_size", "max_image_pixels")
    for name in positive:
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    # The output stores these settings as 64-bit HDF5 attributes, and torch sizes are 64-bit too.
    for name in ("resolution", "min_size", "window_size", "max_image_pixels"):
        if getattr(args, name) is not None and getattr(args, name) > MAX_INT64:
            parser.error(f"--{name} is {getattr(args, name)}; it must be at most 2**63 - 1 ({MAX_INT64})")
    if args.num_workers < 0:
        parser.error(f"--num_workers must be 0 or more, got {args.num_workers}")
    if args.min_size < 0:
        parser.error(f"--min_size must be 0 or more, got {args.min_size}")
    if not 0 <= args.hdf5_compression <= 9:
        parser.error(f"--hdf5_compression must be a gzip level from 0 (none) to 9, got {args.hdf5_compression}")
    if args.min_size and args.transforms != TransformName.RESIZE_LARGE.value:
        parser.error(f"--min_size applies to RESIZE_LARGE only, not to --transforms {args.transforms}")
    # An unset shell variable in a job script gives an empty value. An empty tag means the default
    # tag, but an empty model name or path has no meaning, and an empty folder would name the current one.
    for name, fix in (("dataset_dir", "pass the folder that the list paths are relative to"),
                      ("hdf5_dir", "pass the folder for the output file"),
                      ("hdf5_name", "omit it for the default stem 'features'"),
                      ("selected_ids", "omit it to extract every image under --dataset_dir, or pass the list")):
        if getattr(args, name) == "":
            parser.error(f"--{name} is empty; {fix}")
    if "/" in args.hdf5_name or os.sep in args.hdf5_name:
        parser.error(f"--hdf5_name {args.hdf5_name!r} contains a '/', but it is a file name stem; "
                     "give the folder with --hdf5_dir")
    output = output_path(args.hdf5_dir, args.hdf5_name, args.partition)
    if output.is_dir():
        parser.error(f"the output {str(output)!r} is a folder; remove it or choose another --hdf5_dir or --hdf5_name")
    if args.model == "":
        parser.error("--model is empty; pass a timm or open_clip model name")
    if args.model.endswith("."):
        parser.error(f"--model {args.model!r} ends with a dot; pass NAME or NAME.TAG")
    if args.pretrained == "":
        args.pretrained = None
    if args.checkpoint == "":
        parser.error("--checkpoint is empty; omit it or pass the path of a local weight file")


def setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )


def log_extraction_error(error: Exception) -> int:
    """Log an error that run_extraction raised and return its exit status: 2 for invalid arguments, else 1."""
    _logger.error("%s", error)
    return EXIT_USAGE if isinstance(error, USAGE_ERRORS) else EXIT_ERROR


def extraction_exit_status(error: Exception) -> int:
    """Return the exit status for one of EXTRACTION_FAILURES, logging the error.

    An interrupted run has already logged how to resume, so it gets its signal's status only.
    """
    if isinstance(error, Interrupted):
        return error.exit_code
    if isinstance(error, EXTRACTION_ERRORS):
        return log_extraction_error(error)
    _logger.error("extraction failed: %s", error)
    return EXIT_ERROR


def main(args: argparse.Namespace) -> int:
    """Run the extraction for parsed arguments; return the exit status."""
    _logger.info("configuration:\n%s", "\n".join(f"  {key}: {value}" for key, value in sorted(vars(args).items())))
    output = output_path(args.hdf5_dir, args.hdf5_name, args.partition)
    try:
        summary = run_extraction(
            dataset_dir=args.dataset_dir,
            selected_ids=args.selected_ids,
            output=output,
            framework=args.framework,
            model=args.model,
            pretrained=args.pretrained,
            checkpoint=args.checkpoint,
            pooling=args.pooling,
            resolution=args.resolution,
            transforms=args.transforms,
            min_size=args.min_size,
            multiscale=args.multiscale,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            store_fp16=args.store_fp16,
            comp_fp16=args.comp_fp16,
            amp_dtype=args.amp_dtype,
            cpu_bf16=args.cpu_bf16,
            fold_batchnorm=args.fold_batchnorm,
            worker_priority=args.worker_priority,
            device=args.device,
            window_size=args.window_size,
            max_image_pixels=args.max_image_pixels,
            jpeg_draft=args.jpeg_draft,
            hdf5_compression=args.hdf5_compression,
            overwrite=args.overwrite,
        )
    except EXTRACTION_FAILURES as e:
        return extraction_exit_status(e)

    if summary.already_complete:
        return EXIT_OK
    _logger.info(
        "done: %d images, %d embedded, %d skipped, %.1f s in total; wrote %s",
        summary.num_images, summary.num_embedded, summary.num_failed, summary.seconds, summary.output,
    )
    if summary.rows_this_run and summary.embed_seconds > 0:
        _logger.info(
            "this run decoded and embedded %d images in %.1f s: %.1f images/s",
            summary.rows_this_run, summary.embed_seconds, summary.rows_this_run / summary.embed_seconds,
        )
    return EXIT_OK


if __name__ == "__main__":
    setup_logging()
    parser = get_args_parser()
    parsed = parser.parse_args()
    check_args(parser, parsed)
    sys.exit(main(parsed))
