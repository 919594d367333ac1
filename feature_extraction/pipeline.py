"""The extraction run: list -> windows of decoded batches -> embeddings -> parts -> HDF5.

Finished windows are saved in `<output>.parts/` as they complete, and a rerun with the
same settings and list embeds only the missing ones. Once all windows are saved, the run
assembles the HDF5 file in `<output>.tmp`, writes `<output>.failed.txt` (or removes a
stale one), renames the temporary file to the final name and deletes the parts folder.
A window is batched the same way on every run, so a resumed run writes the same embeddings.
With `--overwrite true` an existing output stays in place until that rename replaces it,
and its failure report is copied into the parts folder first, so that a rerun can put it
back after a kill between the two renames.
"""
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from feature_extraction.allocator import keep_freed_memory_mapped
from feature_extraction.backbones import Backbone, build_backbone, canonical_framework, check_input_size
from feature_extraction.batchnorm_folding import fold_backbone_batchnorm
from feature_extraction.dataset import (
    ImageBatch,
    Window,
    WindowedImageDataset,
    auto_window_size,
    make_loader,
    resolve_worker_priority,
    split_windows,
)
from feature_extraction.embedding import Embedder, resolve_autocast, resolve_device
from feature_extraction.existing_output import (
    compare_output,
    kept_output_message,
    output_mismatch_error,
    warn_if_compression_differs,
)
from feature_extraction.hdf5_output import (
    assemble_hdf5,
    failures_path_for,
    publish,
    restore_replaced_report,
    save_replaced_report,
    temporary_path_for,
    write_failure_report,
)
from feature_extraction.image_list import (
    ListEntry,
    escape_id,
    file_sha256,
    paths_sha256,
    read_image_list,
    resolve_image_path,
    scan_image_dir,
)
from feature_extraction.images import DecodeOptions
from feature_extraction.interrupts import (
    Interrupted,
    interrupts_deferred,
    raise_if_signal_lost,
    raise_wrapped_interrupt,
    signals_raise_interrupted,
)
from feature_extraction.store import (
    PartStore,
    SavedRun,
    SettingsMismatchError,
    WindowPart,
    describe_differences,
    fingerprint_differences,
    list_change_note,
    parts_dir_for,
)
from feature_extraction.transforms import InferenceTransform, TransformName

_logger = logging.getLogger(__name__)

# 2: the fingerprint records the pretrained config, mean and std
FORMAT_VERSION = 2
# EfficientNet-Lite0 at 256 px on 2 CPU cores, forward only: batch 32 was as fast as 16 in
# float32 and 8% faster in bfloat16, but needed 0.2-0.4 GB more memory
DEFAULT_BATCH_SIZE = {"cpu": 16, "cuda": 128}
# failures logged one by one before the log switches to a count
MAX_LOGGED_FAILURES = 20
# a model that rejects this many batches, or returns only unusable embeddings for them, before
# embedding any is broken, not the images
MAX_FAILED_FIRST_BATCHES = 3
# grey level of the square image that separates a model failing on every input from one rejecting odd shapes
_PROBE_GREY = 128
# seconds to wait for a decode worker after SIGKILL, which it cannot ignore
_WORKER_KILL_TIMEOUT_SECONDS = 10
# seconds to wait for a decode worker to exit after the main process lost its connection
_WORKER_EXIT_WAIT_SECONDS = 1
# how DataLoader's errors about a dead worker start, in torch 2.x
_WORKER_DEATH_PREFIX = "DataLoader worker (pid"
# failure reasons of rows whose embedding is not finite or is all zeros; later rows of the run are kept
NON_FINITE_REASON = (
    "the model returned NaN or Inf values for this image; pass --comp_fp16 false if float16 overflowed"
)
ZERO_REASON = "the model returned an all-zero embedding for this image, which has no direction to normalise"
# how the reasons of images that were read but that the model failed on start
_MODEL_REASON_PREFIX = "the model "
# how the reasons of images of a shape the model raised an error on start
_SHAPE_REASON_PREFIX = "the model cannot embed a "


class ExtractionError(Exception):
    """A run that cannot complete (unreadable list, unwritable output, no readable image)."""


@dataclass
class ExtractionSummary:
    output: Path
    num_images: int = 0
    num_embedded: int = 0
    num_failed: int = 0
    seconds: float = 0.0
    rows_this_run: int = 0
    # rows with an embedding in the windows this run saved, so far
    embedded_this_run: int = 0
    embed_seconds: float = 0.0
    already_complete: bool = False


def output_path(hdf5_dir: str | Path, hdf5_name: str, partition: str) -> Path:
    """Return `<hdf5_dir>/<hdf5_name>_<partition>.hdf5`, the ILIAS file name."""
    return Path(hdf5_dir) / f"{hdf5_name}_{partition}.hdf5"


def load_entries(dataset_dir: str | Path, selected_ids: str | Path | None) -> tuple[list[ListEntry], str, str]:
    """Return the list entries, the SHA-256 identifying the list, and where the list came from."""
    if not Path(dataset_dir).is_dir():
        raise ExtractionError(
            f"--dataset_dir {str(dataset_dir)!r} is not a folder; pass the folder that the list paths are relative to"
        )
    if selected_ids is None:
        entries = scan_image_dir(dataset_dir)
        return entries, paths_sha256(entries), "all image files under --dataset_dir, sorted by path"
    if not Path(selected_ids).is_file():
        raise ExtractionError(f"--selected_ids {str(selected_ids)!r} is not a file; pass the image list")
    # resolved, so the recorded source names the file from any working folder
    return read_image_list(selected_ids), file_sha256(selected_ids), str(Path(selected_ids).resolve())


def library_versions() -> dict[str, str]:
    """Return the versions of the libraries that shape the embeddings and the file."""
    import h5py
    import open_clip
    import PIL
    import timm

    return {
        "torch_version": str(torch.__version__),
        "timm_version": str(timm.__version__),
        "open_clip_version": str(open_clip.__version__),
        "h5py_version": str(h5py.__version__),
        "numpy_version": str(np.__version__),
        "pillow_version": str(PIL.__version__),
    }


def _remove_stale_files(output: Path, store: PartStore) -> None:
    """Delete a leftover temporary file and a partial run; the complete output and its report stay."""
    temporary = temporary_path_for(output)
    if temporary.exists():
        _logger.info("--overwrite: removing %s", temporary)
        temporary.unlink()
    if store.directory.exists():
        # the partial run may have replaced the report of the output it was to replace
        restore_replaced_report(output, store.replaced_report_path)
        _logger.info("--overwrite: removing the partial run in %s", store.directory)
        store.remove()


def _unwritable_folder_error(folder: Path, error: OSError) -> ExtractionError:
    """Return the error for an output folder that cannot be created or written, naming a file in its place."""
    # os.path.exists returns False where Path.exists() raises, as inside a folder without search permission
    existing = next((path for path in (folder, *folder.parents) if os.path.exists(path)), None)
    if existing is not None and not os.path.isdir(existing):
        reason = "it is a file, not a folder" if existing == folder else f"{existing} is a file, not a folder"
    else:
        reason = str(error)
    return ExtractionError(f"cannot write in {folder}: {reason}; choose a writable --hdf5_dir")


def _complete_in_unwritable_folder(
    output: Path, store: PartStore, fingerprint: dict, entries: list[ListEntry], hdf5_compression: int
) -> bool:
    """Return True when `output` is complete with this command's settings and nothing else of a run lies beside it.

    For a folder where the lock cannot be taken, such as a shared read-only copy of the
    embeddings: a rerun that finds its output complete needs no write. Raises
    SettingsMismatchError when the output records other settings, or ids that contradict the list.
    """
    if not output.exists() or store.directory.exists() or temporary_path_for(output).exists():
        return False
    comparison = compare_output(output, fingerprint, entries)
    if comparison.differing:
        raise output_mismatch_error(output, comparison)
    warn_if_compression_differs(output, hdf5_compression)
    _logger.info("%s (its folder cannot be written, which this run does not need); pass --overwrite true in a "
                 "writable folder to extract again", kept_output_message(output, comparison))
    return True


def _keep_existing_output(
    output: Path, store: PartStore, fingerprint: dict, entries: list[ListEntry], hdf5_compression: int,
    saved_run: SavedRun | None, summary: ExtractionSummary,
) -> ExtractionSummary:
    """Leave the complete `output` untouched, or raise SettingsMismatchError when it records other settings.

    A file that records no list hash also raises when its ids contradict the list in `entries`.

    `saved_run` is the partial run in the parts folder, if any. When it is a run of
    --overwrite true, the caller has found that its settings differ from this command's.
    """
    replacement = saved_run if saved_run is not None and saved_run.replaces_output else None
    # A run of --overwrite true killed before its output's rename may have replaced the report and
    # left its temporary file. The old output stays, so its report comes back and the file goes.
    restore_replaced_report(output, store.replaced_report_path)
    temporary = temporary_path_for(output)
    if temporary.exists():
        _logger.info("removing %s, left by a run stopped before it could replace %s", temporary, output)
        temporary.unlink()
    comparison = compare_output(output, fingerprint, entries)
    differing, differences = comparison.differing, comparison.differences
    if replacement is None:
        if differing:
            raise output_mismatch_error(output, comparison)
    else:
        run_differing = fingerprint_differences(replacement.fingerprint, fingerprint)
        run_differences = describe_differences(run_differing, replacement.fingerprint, fingerprint,
                                               "in the partial run")
        if differing:
            raise SettingsMismatchError(
                f"{output} exists and was extracted with other settings (" + "; ".join(differences) + "), and "
                f"{store.directory} contains a partial run of --overwrite true that is to replace it, also with "
                f"other settings ({run_differences})." + list_change_note(differing + run_differing)
                + " Rerun with the flags and list of the partial run to resume it, pass --overwrite true to discard "
                "it and extract with these settings, or choose another --hdf5_dir or --hdf5_name"
            )

    warn_if_compression_differs(output, hdf5_compression)
    _logger.info("%s; pass --overwrite true to extract again", kept_output_message(output, comparison))
    if replacement is not None:
        # Kept, not deleted, because a command that lacks one flag of the stopped --overwrite run
        # would otherwise discard the windows that run saved.
        _logger.warning(
            "kept %s, a partial run of --overwrite true that is to replace %s with other settings (%s); rerun "
            "with its flags and list to resume it, or delete the folder to discard it",
            store.directory, output, run_differences,
        )
    elif store.directory.exists():
        _logger.info("removing %s, a partial run left beside the complete output", store.directory)
        store.remove()
    summary.already_complete = True
    return summary


def _list_line(entry: ListEntry) -> str:
    # entries scanned from --dataset_dir have no list line (line_no 0)
    return f" (list line {entry.line_no})" if entry.line_no else ""


def _log_failures(failed_rows: list[int], reasons: list[str], entries: list[ListEntry], state: dict, report: Path):
    for row, reason in zip(failed_rows, reasons):
        state["logged"] += 1
        if state["logged"] <= MAX_LOGGED_FAILURES:
            _logger.warning("skipping %s%s: %s", entries[row].path, _list_line(entries[row]), reason)
        elif state["logged"] == MAX_LOGGED_FAILURES + 1:
            _logger.warning("more images are skipped; they are not logged one by one but listed in %s", report)


def _describe_batch(shape: torch.Size) -> str:
    """Describe a (B, H, W, 3) uint8 batch as its image count and size."""
    count, height, width = shape[:3]
    return f"{count} {'image' if count == 1 else 'images'} of {height}x{width} pixels"


@dataclass
class _FirstFailures:
    """Batches and images that failed before any batch was embedded, to tell a broken model from odd images."""

    batch_size: int
    batches: int = 0
    # images of the batches the model raised an error on, and of those it returned only unusable embeddings for
    raised_images: int = 0
    unusable_images: int = 0
    # set once a batch, or the square probe image, is embedded; later failures are the images' own
    embedded: bool = False

    @property
    def images(self) -> int:
        return self.raised_images + self.unusable_images

    def add(self, shape: torch.Size, raised: bool) -> bool:
        """Count a failed batch. Returns True when no batch was embedded and the failures may mean a broken model."""
        if self.embedded:
            return False
        self.batches += 1
        if raised:
            self.raised_images += shape[0]
        else:
            self.unusable_images += shape[0]
        # a few odd images (panoramas, tiny crops) may come first, so a whole batch's worth must fail too
        return self.batches >= MAX_FAILED_FIRST_BATCHES and self.images >= self.batch_size


def _first_line(error: Exception) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def _usable_rows(vectors: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
    """Return a (B,) mask of usable embeddings (finite, not all zeros) and the reason for each row."""
    finite = torch.isfinite(vectors).all(dim=1)
    usable = finite & vectors.ne(0).any(dim=1)
    reasons = []
    for row_usable, row_finite in zip(usable.tolist(), finite.tolist()):
        if row_usable:
            reasons.append("")
        else:
            reasons.append(ZERO_REASON if row_finite else NON_FINITE_REASON)
    return usable, reasons


def _probe_square_input(embedder: Embedder) -> str | None:
    """Embed one grey image of --resolution x --resolution pixels.

    Returns None when the model gives a usable embedding, else what went wrong.
    """
    size = embedder.transform.resolution
    image = torch.full((1, size, size, 3), _PROBE_GREY, dtype=torch.uint8)
    try:
        vector = embedder.embed(image)
    except Exception as e:
        raise_wrapped_interrupt(e)
        return f"raised an error too ({_first_line(e)})"
    usable, reasons = _usable_rows(vector)
    if bool(usable.all()):
        return None
    return "returned NaN or Inf values" if reasons[0] == NON_FINITE_REASON else "returned an all-zero embedding"


def _input_size_advice(embedder: Embedder) -> str:
    """Return the flags to check when the model raised errors on the first batches and on a square image."""
    size = embedder.backbone.input_size
    configured = f" ({size[0]}x{size[1]} in its config)" if size else ""
    advice = f"Check --resolution and --transforms against the input size the model takes{configured}, then the weights"
    if embedder.multiscale:
        advice += ". --multiscale true also gives the model inputs rescaled by 0.707 and 1.414"
    return advice


def _check_first_failures(
    first_failures: _FirstFailures, shape: torch.Size, embedder: Embedder, error: Exception | None,
    non_finite: bool = False,
) -> None:
    """Count a batch the model raised `error` on, or returned only unusable embeddings for (`error` None).

    `non_finite` is True when some of those embeddings were NaN or Inf rather than all zeros.

    Raises ExtractionError when no batch was embedded yet and the failures mean a broken model.
    A model that raised errors is first tried on a grey square image, because a window made only
    of panoramas can fill the first batches.
    """
    if not first_failures.add(shape, raised=error is not None):
        return
    resolution = embedder.transform.resolution
    probe = _probe_square_input(embedder) if error is not None else None
    if error is not None and probe is None:
        _logger.info("the model failed on each of the first %d batches (%d images) but embeds a %dx%d input, so "
                     "their images are skipped as shapes it cannot embed", first_failures.batches,
                     first_failures.images, resolution, resolution)
        first_failures.embedded = True
        return

    parts = []
    if first_failures.raised_images:
        parts.append(f"raised an error on {first_failures.raised_images}")
    if first_failures.unusable_images:
        parts.append(f"returned NaN, Inf or all-zero embeddings for {first_failures.unusable_images}")
    last = f" ({_first_line(error)})" if error is not None else ""
    message = (f"the model failed on each of the first {first_failures.batches} batches: it {' and '.join(parts)} "
               f"of their {first_failures.images} images, last on {_describe_batch(shape)}{last}")
    if probe is not None:
        message += f". On a grey {resolution}x{resolution} image it {probe}"
    if probe is not None and probe.startswith("raised"):
        fix = _input_size_advice(embedder)
    else:
        fix = "Check the weights (--checkpoint)"
        if error is None and non_finite and embedder.autocast_dtype == torch.float16:
            fix += ", or pass --comp_fp16 false if float16 overflowed"
    raise ExtractionError(f"{message}. {fix}") from error


def _shape_failure_reason(
    error: Exception, shape: torch.Size, first_failures: _FirstFailures, embedder: Embedder
) -> str:
    """Return the skip reason for a batch the model rejected, or raise ExtractionError for a fatal error.

    Some architectures reject extreme shapes, e.g. when a feature map is pooled below one
    pixel, and those images are skipped like unreadable ones. Memory and CUDA errors, and a
    model that has failed on every batch so far (`first_failures`) and on a square grey
    image, end the run instead.
    """
    message = _first_line(error)
    if isinstance(error, AssertionError):
        # timm asserts the input size in models that take one size only, so skipping would drop every
        # image of another shape
        raise ExtractionError(
            f"the model rejected a batch of {_describe_batch(shape)} ({message}): it takes inputs of one size "
            "only. Pass --transforms RESIZE_SQUARE, RESIZE_CENTER or RESIZE_PAD with --resolution set to that size"
        ) from error
    # "an illegal memory access" is a faulting kernel, which a smaller batch does not fix
    if "memory" in message.lower() and "illegal memory access" not in message.lower():
        raise ExtractionError(
            f"the model failed on a batch of {_describe_batch(shape)}: {message}; lower --batch_size or --resolution"
        ) from error
    if "CUDA" in message:
        raise ExtractionError(f"the model failed on a batch of {_describe_batch(shape)}: {message}") from error
    _check_first_failures(first_failures, shape, embedder, error)
    height, width = shape[1:3]
    return f"{_SHAPE_REASON_PREFIX}{height}x{width} input ({message}); --min_size pads small sides"


def _embed_windows(
    *,
    loader,
    embedder: Embedder,
    store: PartStore,
    windows: dict[int, Window],
    store_dtype: np.dtype,
    entries: list[ListEntry],
    progress: tqdm,
    report: Path,
    batch_size: int,
    summary: ExtractionSummary,
) -> int:
    """Embed every batch the loader yields and save each window once all its rows are in.

    Returns the number of rows finished in this call, and counts the embedded rows of the
    saved windows in `summary.embedded_this_run` as they are saved.
    """
    collected: dict[int, tuple[list[np.ndarray], list[np.ndarray]]] = {}
    model_failures: dict[int, list[tuple[int, str]]] = {}
    first_failures = _FirstFailures(batch_size)
    failure_log = {"logged": 0}
    finished_rows = 0
    iterator = iter(loader)
    try:
        while True:
            # a signal stops the run between records, never while one is being received
            with interrupts_deferred():
                record = next(iterator, None)
            raise_if_signal_lost()
            if record is None:
                break
            if isinstance(record, ImageBatch):
                try:
                    vectors = embedder.embed(record.images)  # (B, D) float32, unit norm
                except torch.cuda.OutOfMemoryError as e:
                    raise ExtractionError(f"out of memory on a batch of {tuple(record.images.shape)} images: "
                                          f"{e}; lower --batch_size or --resolution") from e
                except Exception as e:
                    # torch raises RuntimeError for input shapes it rejects, timm's input checks AssertionError,
                    # and other model code any Exception. The first batches decide whether the model is broken.
                    # Signal exceptions, Interrupted (an Exception) included, are raised again.
                    raise_wrapped_interrupt(e)
                    if str(e).startswith(_WORKER_DEATH_PREFIX):
                        _raise_if_worker_died(e, iterator)
                    reason = _shape_failure_reason(e, record.images.shape, first_failures, embedder)
                    model_failures.setdefault(record.window, []).extend((row, reason) for row in record.rows.tolist())
                    continue
                usable, reasons = _usable_rows(vectors)  # (B,)
                if not bool(usable.any()):
                    _check_first_failures(first_failures, record.images.shape, embedder, None,
                                          non_finite=NON_FINITE_REASON in reasons)
                rows = record.rows[usable]
                model_failures.setdefault(record.window, []).extend(
                    (row, reason) for row, reason in zip(record.rows.tolist(), reasons) if reason
                )
                if len(rows) == 0:
                    continue
                first_failures.embedded = True
                rows_list, vectors_list = collected.setdefault(record.window, ([], []))
                rows_list.append(rows.numpy())
                vectors_list.append(vectors[usable].numpy().astype(store_dtype))
                progress.update(len(rows))
                continue

            # WindowEnd: every row of the window is now embedded or failed
            window = windows[record.window]
            rows_list, vectors_list = collected.pop(record.window, ([], []))
            rows = np.concatenate(rows_list) if rows_list else np.zeros(0, np.int64)
            vectors = np.concatenate(vectors_list) if vectors_list else np.zeros((0, 0), store_dtype)
            order = np.argsort(rows)
            failures = sorted(
                list(zip(record.failed_rows.tolist(), record.failed_reasons)) + model_failures.pop(record.window, [])
            )
            failed_rows = np.array([row for row, _ in failures], dtype=np.int64)
            failed_reasons = [reason for _, reason in failures]
            assert len(rows) + len(failed_rows) == window.stop - window.start, "window rows lost"

            store.write_window(window, WindowPart(rows[order], vectors[order], failed_rows, failed_reasons))
            summary.embedded_this_run += len(rows)
            finished_rows += window.stop - window.start
            progress.update(len(failed_rows))
            _log_failures(failed_rows.tolist(), failed_reasons, entries, failure_log, report)
    except (RuntimeError, OSError, EOFError) as e:
        _raise_if_worker_died(e, iterator)
        raise
    finally:
        _shut_down_workers(iterator)
    return finished_rows


def _raise_if_worker_died(error: Exception, iterator) -> None:
    """Raise ExtractionError if `error` comes from a decode worker that died, for example by the OOM killer.

    DataLoader reports a dead worker with a RuntimeError from next() or, through its SIGCHLD
    handler, at whatever line the main process is running. A batch that was being received
    from it fails instead with a connection or EOF error, so the workers' exit codes decide.
    """
    workers = getattr(iterator, "_workers", [])
    reported = str(error).startswith(_WORKER_DEATH_PREFIX)
    if not reported and not workers:
        return
    if not reported:
        # the error may arrive while the killed worker is still exiting
        for worker in workers:
            worker.join(timeout=_WORKER_EXIT_WAIT_SECONDS)
    codes = [worker.exitcode for worker in workers if worker.exitcode is not None]
    if not reported and not any(code != 0 for code in codes):
        return
    signals = sorted({signal.Signals(-code).name for code in codes if code < 0 and -code in signal.valid_signals()})
    cause = f"was killed by {', '.join(signals)}" if signals else "exited"
    raise ExtractionError(
        f"a decode worker process {cause} during the run ({str(error).splitlines()[0].strip()}). Rerun the same "
        "command, which resumes from the windows saved so far. A worker killed by SIGKILL often means that the "
        "machine ran out of memory, so also lower --num_workers or ask for more memory"
    ) from error


def _shut_down_workers(iterator) -> None:
    """Stop the loader's decode workers now, also when an error raised inside the loader keeps it referenced.

    The workers ignore SIGTERM (see dataset._init_worker), so DataLoader's terminate() cannot stop one
    that missed its stop message, and multiprocessing would then wait for it forever at exit.
    """
    workers = list(getattr(iterator, "_workers", []))
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    for worker in workers:
        if worker.is_alive():
            worker.kill()
            worker.join(timeout=_WORKER_KILL_TIMEOUT_SECONDS)


def _fingerprint(
    *, framework: str, backbone: Backbone, model: str, checkpoint_sha256: str, transform: InferenceTransform,
    pooling: str, multiscale: bool, store_dtype: np.dtype, autocast_dtype: torch.dtype | None,
    decode_options: DecodeOptions, list_sha256: str, list_paths_sha256: str, num_rows: int,
    window_size: int,
) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "framework": framework,
        "model": model.partition(".")[0],
        "pretrained": backbone.description.get("pretrained", ""),
        # the tag sets the preprocessing even when the weights come from --checkpoint
        "pretrained_cfg": backbone.pretrained_cfg,
        "mean": list(backbone.mean),
        "std": list(backbone.std),
        "checkpoint_sha256": checkpoint_sha256,
        "resolution": transform.resolution,
        "transforms": transform.name.value,
        "min_size": transform.min_size,
        "pooling": pooling,
        "multiscale": multiscale,
        "store_dtype": np.dtype(store_dtype).name,
        "autocast_dtype": str(autocast_dtype).removeprefix("torch.") if autocast_dtype else "float32",
        "max_image_pixels": decode_options.max_image_pixels,
        "jpeg_draft": decode_options.jpeg_draft,
        "list_sha256": list_sha256,
        "list_paths_sha256": list_paths_sha256,
        "num_rows": num_rows,
        "window_size": window_size,
    }


def _output_attributes(
    *, fingerprint: dict, model: str, store_dtype: np.dtype, checkpoint: str | None, list_source: str,
    backbone: Backbone, folded_layers: int,
) -> dict:
    """Return the HDF5 file attributes: the run settings, input conventions and library versions."""
    internal = ("format_version", "num_rows", "store_dtype")
    return {
        **{key: value for key, value in fingerprint.items() if key not in internal},
        "model": model,
        "dtype": store_dtype.name,
        "checkpoint": str(Path(checkpoint).resolve()) if checkpoint else "",
        "list_source": list_source,
        "mean": np.array(backbone.mean),
        "std": np.array(backbone.std),
        **library_versions(),
        # not in the resume fingerprint: folding is accepted only within 5e-5 relative error, less
        # than float16 storage rounding, so windows of folded and unfolded runs may be combined.
        # NOTE: after such a resume the attribute describes the last run only.
        "batchnorm_folded": folded_layers,
    }


def _saved_rows(store: PartStore, windows: list[Window]) -> int:
    """Return the rows of the windows whose part files are on disk."""
    return sum(window.stop - window.start for window in windows if store.part_path(window.index).exists())


def _first_failure(failures: list[tuple[int, str]], entries: list[ListEntry], dataset_dir: str | Path) -> str:
    """Return "<reason>, for <absolute path>" for the first failed row, the path read under `dataset_dir`."""
    row, reason = failures[0]
    # NOTE: a row of a window saved by an earlier run was read under that run's --dataset_dir,
    # which may differ from this one
    tried = resolve_image_path(dataset_dir, entries[row].path).absolute()
    return f"{reason}, for {tried}"


def _assemble_output(
    *, store: PartStore, windows: list[Window], entries: list[ListEntry], dataset_dir: str | Path, output: Path,
    store_dtype: np.dtype, hdf5_compression: int, attributes: dict,
) -> tuple[int, list[tuple[int, str]]]:
    """Write the HDF5 file under its temporary name, ready for the failure report and `publish`.

    Returns the number of embedded rows and the (row, reason) pairs of skipped ones, and
    copies the report of an existing output into the parts folder. When no row was
    embedded, deletes the parts folder and raises ExtractionError, and an existing output
    keeps its report.
    """
    report = failures_path_for(output)
    temporary = temporary_path_for(output)
    ids = [escape_id(entry.path) for entry in entries]
    num_embedded, failures = assemble_hdf5(store, windows, ids, temporary, store_dtype, hdf5_compression, attributes)
    failure_lines = [(entries[row].path, reason) for row, reason in failures]
    if num_embedded == 0:
        # nothing is worth resuming: a rerun with a corrected --dataset_dir starts afresh
        temporary.unlink(missing_ok=True)
        restore_replaced_report(output, store.replaced_report_path)
        store.remove()
        first_failure = _first_failure(failures, entries, dataset_dir)
        # Every image was read but the model failed on each, so the weights or the model are at fault.
        model_only = all(reason.startswith(_MODEL_REASON_PREFIX) for _, reason in failures)
        shapes_only = all(reason.startswith(_SHAPE_REASON_PREFIX) for _, reason in failures)
        problem = "could be embedded" if model_only else "could be read"
        if shapes_only:
            check = ("the model raised an error on each input size; pass --transforms RESIZE_SQUARE or RESIZE_PAD, "
                     "which give every image one size, or --min_size, and check the model and its weights")
        elif model_only:
            check = "check the model and its weights (--checkpoint, --pretrained)"
        else:
            check = f"check --dataset_dir {str(dataset_dir)!r} and the list paths"
        if output.exists():
            raise ExtractionError(
                f"none of the {len(entries)} images {problem} (first reason: {first_failure}), so {output} "
                f"and its failure report are left as they were; {check}"
            )
        write_failure_report(report, failure_lines)
        raise ExtractionError(
            f"none of the {len(entries)} images {problem} (first reason: {first_failure}; "
            f"all are listed in {report}); {check}"
        )
    if output.exists():
        save_replaced_report(output, store.replaced_report_path)
    return num_embedded, failures


def run_extraction(
    *,
    dataset_dir: str | Path,
    selected_ids: str | Path | None,
    output: str | Path,
    framework: str,
    model: str,
    pretrained: str | None,
    checkpoint: str | None,
    pooling: str,
    resolution: int,
    transforms: str,
    min_size: int,
    multiscale: bool,
    batch_size: int | None,
    num_workers: int,
    store_fp16: bool,
    comp_fp16: bool,
    amp_dtype: str,
    cpu_bf16: bool,
    device: str,
    window_size: int | None,
    max_image_pixels: int,
    jpeg_draft: bool,
    hdf5_compression: int,
    overwrite: bool,
    fold_batchnorm: bool = True,
    worker_priority: str = "auto",
) -> ExtractionSummary:
    """Extract embeddings for every listed image into `output`, resuming a partial run.

    Raises ExtractionError, ImageListError, BackboneError, CheckpointError, DeviceError,
    SettingsMismatchError or StoreError with a message that names the fix, and
    Interrupted on SIGINT/SIGTERM after logging how to resume.
    """
    start_time = time.monotonic()
    output = Path(output)
    store = PartStore(parts_dir_for(output))
    summary = ExtractionSummary(output=output)

    # inputs, device and model
    entries, list_sha256, list_source = load_entries(dataset_dir, selected_ids)
    torch_device = resolve_device(device)
    worker_priority = resolve_worker_priority(worker_priority, torch_device.type)
    batch_size = batch_size or DEFAULT_BATCH_SIZE[torch_device.type]
    autocast_dtype = resolve_autocast(torch_device, comp_fp16, amp_dtype, cpu_bf16)
    framework = canonical_framework(framework)
    if torch_device.type == "cpu":
        keep_freed_memory_mapped()
    # seeded so that --pretrained none gives the same random weights on every run
    torch.manual_seed(0)
    # NOTE: the model is built before an existing output is compared, because the compared settings
    # include its mean and std. So a rerun over a complete output also loads the weights, and exits 1
    # where pretrained weights are neither cached nor downloadable.
    backbone = build_backbone(framework, model, pretrained, checkpoint, pooling)
    transform = InferenceTransform(TransformName(transforms), resolution, min_size)
    check_input_size(backbone, transform, multiscale, model)
    folded_layers = 0
    if fold_batchnorm:
        backbone.module, folded_layers = fold_backbone_batchnorm(backbone.module, resolution)
    checkpoint_sha256 = file_sha256(checkpoint) if checkpoint else ""
    decode_options = DecodeOptions(transform, max_image_pixels=max_image_pixels, jpeg_draft=jpeg_draft)
    store_dtype = np.dtype(np.float16 if store_fp16 else np.float32)
    embedder = Embedder(backbone, transform, torch_device, autocast_dtype=autocast_dtype, multiscale=multiscale)
    _logger.info(
        "device %s, compute dtype %s, stored dtype %s, batch size %d, %d images (%s), mean %s, std %s, "
        "patch size %s, %s, decode worker priority %s",
        torch_device, autocast_dtype or torch.float32, store_dtype.name, batch_size, len(entries), list_source,
        backbone.mean, backbone.std, backbone.patch_size, backbone.description, worker_priority,
    )

    # resumable state
    window_size = window_size or auto_window_size(len(entries))
    fingerprint = _fingerprint(
        framework=framework, backbone=backbone, model=model, checkpoint_sha256=checkpoint_sha256,
        transform=transform, pooling=pooling, multiscale=multiscale, store_dtype=store_dtype,
        autocast_dtype=autocast_dtype, decode_options=decode_options, list_sha256=list_sha256,
        list_paths_sha256=paths_sha256(entries), num_rows=len(entries), window_size=window_size,
    )
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        # the lock comes first, so --overwrite never deletes the files of a run in progress
        store.lock()
    except OSError as e:
        if not overwrite and _complete_in_unwritable_folder(output, store, fingerprint, entries, hdf5_compression):
            summary.already_complete = True
            return summary
        raise _unwritable_folder_error(output.parent, e) from e
    try:
        return _extract_locked(
            store=store, summary=summary, start_time=start_time, overwrite=overwrite, fingerprint=fingerprint,
            info={
                "dataset_dir": str(Path(dataset_dir).resolve()),
                "list": list_source,
                "checkpoint": str(Path(checkpoint).resolve()) if checkpoint else "",
            },
            dataset_dir=dataset_dir, entries=entries, window_size=window_size, decode_options=decode_options,
            batch_size=batch_size, num_workers=num_workers, torch_device=torch_device,
            worker_priority=worker_priority, embedder=embedder, store_dtype=store_dtype,
            hdf5_compression=hdf5_compression, attributes=_output_attributes(
                fingerprint=fingerprint, model=model, store_dtype=store_dtype, checkpoint=checkpoint,
                list_source=list_source, backbone=backbone, folded_layers=folded_layers,
            ),
        )
    finally:
        store.close()


def _extract_locked(
    *, store: PartStore, summary: ExtractionSummary, start_time: float, overwrite: bool, fingerprint: dict,
    info: dict, dataset_dir: str | Path, entries: list[ListEntry], window_size: int, decode_options: DecodeOptions,
    batch_size: int, num_workers: int, torch_device: torch.device, worker_priority: str, embedder: Embedder,
    store_dtype: np.dtype, hdf5_compression: int, attributes: dict,
) -> ExtractionSummary:
    """Embed the pending windows and assemble the output, with the lock of `store` held."""
    output = summary.output
    # a finished output is final unless --overwrite, or unless this command resumes a partial run
    # of --overwrite true, which replaces the output once complete
    if output.exists() and not overwrite:
        saved_run = store.read_manifest()
        if not (saved_run is not None and saved_run.replaces_output
                and not fingerprint_differences(saved_run.fingerprint, fingerprint)):
            return _keep_existing_output(output, store, fingerprint, entries, hdf5_compression, saved_run, summary)
        _logger.info("resuming the partial run of --overwrite true in %s; %s stays as it is until the new "
                     "output replaces it", store.directory, output)
    replacing = output.exists()

    # a partial run that an earlier command saved is never removed here: it may replace the output
    started_here = overwrite or store.read_manifest() is None
    try:
        if overwrite:
            _remove_stale_files(output, store)
        store.open(fingerprint, info=info, replaces_output=overwrite)
    except OSError as e:
        raise _unwritable_folder_error(output.parent, e) from e

    windows = split_windows(len(entries), window_size)
    finished = store.finished_windows(windows)
    pending = [window for window in windows if window.index not in finished]
    done_rows = sum(window.stop - window.start for window in windows if window.index in finished)
    if finished:
        _logger.info("resuming: %d of %d windows (%d rows) are already saved in %s",
                     len(finished), len(windows), done_rows, store.directory)

    report = failures_path_for(output)
    temporary = temporary_path_for(output)
    kept_note = f"; {output} stays as it was until then" if replacing else ""
    published = False
    try:
        with signals_raise_interrupted():
            # embedding
            if pending:
                dataset = WindowedImageDataset(
                    dataset_dir, [entry.path for entry in entries], pending, decode_options, batch_size
                )
                # each worker decodes whole windows, so workers beyond the pending windows would stay idle
                workers = min(num_workers, len(pending))
                # a resumed run keeps its window size, so the advice applies to new runs only
                if workers < num_workers and not finished:
                    _logger.info("%d pending %s for --num_workers %d, so %d decode %s; a smaller --window_size "
                                 "spreads the rows over more workers", len(pending),
                                 "window" if len(pending) == 1 else "windows", num_workers, workers,
                                 "worker starts" if workers == 1 else "workers start")
                loader = make_loader(dataset, workers, pin_memory=torch_device.type == "cuda",
                                     worker_priority=worker_priority)
                with logging_redirect_tqdm(), tqdm(
                    total=len(entries), initial=done_rows, unit="img", desc="extracting", mininterval=1.0
                ) as progress:
                    embed_start = time.monotonic()
                    summary.rows_this_run = _embed_windows(
                        loader=loader, embedder=embedder, store=store, windows={w.index: w for w in pending},
                        store_dtype=store_dtype, entries=entries, progress=progress, report=report,
                        batch_size=batch_size, summary=summary,
                    )
                    summary.embed_seconds = time.monotonic() - embed_start

            # assembly of the final file
            num_embedded, failures = _assemble_output(
                store=store, windows=windows, entries=entries, dataset_dir=dataset_dir, output=output,
                store_dtype=store_dtype, hdf5_compression=hdf5_compression, attributes=attributes,
            )
            raise_if_signal_lost()
            # The report first, then the rename: a kill in between leaves the new report beside the
            # old output, never the reverse, and the next run puts the old report back or finishes
            # the replacement. A signal during both takes effect after `published` is set.
            with interrupts_deferred():
                write_failure_report(report, [(entries[row].path, reason) for row, reason in failures])
                publish(temporary, output)
                published = True
            store.remove()
    except Interrupted as e:
        temporary.unlink(missing_ok=True)
        if published:
            # without its manifest the folder is a leftover, which a rerun removes instead of resuming
            store.remove_manifest()
            _logger.warning("stopped by %s after %s was complete; a rerun removes the leftover %s",
                            e, output, store.directory)
            raise
        saved = _saved_rows(store, windows)
        # with --overwrite true, the same command would delete these parts again
        resume_command = "the same command without --overwrite true" if overwrite else "the same command"
        _logger.warning(
            "stopped by %s: %d of %d rows are saved in %s; rerun %s to resume%s",
            e, saved, len(entries), store.directory, resume_command, kept_note,
        )
        raise
    except BaseException as e:
        temporary.unlink(missing_ok=True)
        if isinstance(e, ExtractionError) and started_here and not published and summary.embedded_this_run == 0:
            # no embedding to resume, and the manifest would make a command with corrected settings exit 2
            if store.directory.exists():
                store.remove()
            raise
        # the error message advises a rerun, and with --overwrite true that rerun would delete the saved windows
        saved = _saved_rows(store, windows) if overwrite and not published else 0
        if saved:
            _logger.warning("%d of %d rows are saved in %s; after fixing the error below, rerun without "
                            "--overwrite true to resume from them%s",
                            saved, len(entries), store.directory, kept_note)
        raise

    summary.num_images = len(entries)
    summary.num_embedded = num_embedded
    summary.num_failed = len(failures)
    summary.seconds = time.monotonic() - start_time
    if failures:
        # with rows left out, a reader that pairs row i with list line i gives later rows wrong labels
        _logger.warning("%d of %d images were skipped (unreadable, a shape the model rejects, or NaN, Inf or "
                        "all-zero embeddings); their paths and reasons are in %s. The ILIAS trainer pairs rows with "
                        "list lines by position, so give it the list without these paths",
                        len(failures), len(entries), report)
    return summary
