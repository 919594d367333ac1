"""Output files of a training run: the `.pth` state dict, a JSON record and a PNG plot.

All three are first written to temporary files in the output folder and fsynced. Then
they are renamed into place one after the other while SIGINT and SIGTERM are held back.
An interrupted or failed run therefore leaves either all three new files or none of
them. SIGKILL cannot be held back: between the renames it leaves the new `.pth` with
no `.json`, because older sidecars are removed first, so a `.json` beside a `.pth`
always describes it. The temporary files start with "." and end with ".tmp", and
SIGKILL can leave them behind.
"""
import io
import json
import logging
import math
import os
import signal
import tempfile
import threading
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from feature_extraction.interrupts import STOP_SIGNALS

_logger = logging.getLogger(__name__)


class OutputError(OSError):
    """An output path that cannot be written: the message names the path and the fix."""


def sidecar_paths(pth_path: str | os.PathLike) -> tuple[Path, Path]:
    """Return the JSON and PNG paths beside a `.pth` file: same name, other suffix."""
    pth_path = Path(pth_path)
    stem = pth_path.name[: -len(".pth")] if pth_path.name.endswith(".pth") else pth_path.name
    return pth_path.with_name(stem + ".json"), pth_path.with_name(stem + ".png")


def prepare_output_folder(pth_path: str | os.PathLike) -> Path | None:
    """Create the folder of `pth_path` if needed and check that a file can be written in it.

    Returns the topmost folder this call created (for removal if the run fails before
    writing), or None when the folder already existed.

    Raises:
        OutputError: the path is a folder, or the folder cannot be created or written.
    """
    pth_path = Path(pth_path)
    if pth_path.is_dir():
        raise OutputError(f"--save_dir {str(pth_path)!r} is a folder; give the path of the .pth file to write")
    folder = pth_path.parent

    created = None
    missing = [p for p in [folder, *folder.parents] if not p.exists()]
    if missing:
        created = missing[-1]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{pth_path.name}.", suffix=".tmp"):
            pass
    except OSError as e:
        remove_created_folder(created)
        raise OutputError(f"cannot write to the output folder {str(folder)!r} ({e}); choose a writable --save_dir") from e
    return created


def remove_created_folder(created: Path | None) -> None:
    """Remove the empty folders made by prepare_output_folder, innermost first; keep any that has files."""
    if created is None:
        return
    for path in sorted([p for p in created.rglob("*") if p.is_dir()] + [created], key=lambda p: -len(p.parts)):
        try:
            path.rmdir()
        except OSError:
            return


def to_jsonable(value):
    """Convert numpy scalars and arrays, tuples and non-string keys to JSON types; NaN and Inf become None."""
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, np.generic):
        return to_jsonable(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def state_dict_bytes(state_dict: Mapping[str, torch.Tensor]) -> bytes:
    """Serialise a state dict with torch.save, tensors contiguous and on the CPU."""
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, buffer)
    return buffer.getvalue()


def json_bytes(record: Mapping) -> bytes:
    """Serialise a record as indented, strictly valid JSON (no NaN)."""
    return (json.dumps(to_jsonable(record), indent=2, allow_nan=False) + "\n").encode("utf-8")


def plot_png_bytes(epochs: list[dict], title: str) -> bytes:
    """Plot the training loss and the validation mAP per epoch; return the PNG bytes.

    `epochs` contains one dict per epoch with "epoch", "loss" (None before training) and
    "val" (None without validation). Uses the Agg canvas directly, so no display and no
    global pyplot state are involved.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    loss_points = [(e["epoch"], e["loss"]) for e in epochs if e.get("loss") is not None]
    val_points = [(e["epoch"], e["val"]["map"], e["val"]["k"]) for e in epochs if e.get("val")]

    figure = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(figure)
    loss_axes, map_axes = figure.subplots(1, 2)

    if loss_points:
        loss_axes.plot(*zip(*loss_points), marker="o")
    loss_axes.set_xlabel("epoch")
    loss_axes.set_ylabel("mean training loss")
    loss_axes.set_title("training loss")
    loss_axes.grid(alpha=0.3)
    loss_axes.xaxis.set_major_locator(MaxNLocator(integer=True))

    if val_points:
        x, y, k = zip(*val_points)
        map_axes.plot(x, y, marker="o", color="tab:green")
        map_axes.axhline(y[0], color="grey", linestyle="--", linewidth=1, label="raw embeddings (epoch 0)")
        map_axes.set_ylabel(f"held-out mAP@{k[0]} (%)")
        map_axes.legend(loc="lower right")
    else:
        map_axes.text(0.5, 0.5, "no validation set", ha="center", va="center", transform=map_axes.transAxes)
    map_axes.set_xlabel("epoch")
    map_axes.set_title("held-out retrieval")
    map_axes.grid(alpha=0.3)
    map_axes.xaxis.set_major_locator(MaxNLocator(integer=True))

    figure.suptitle(title)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def default_file_mode() -> int:
    """Return the mode a new file gets from open() under the current umask (0644 under umask 022)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # not every platform can open a folder; the renames are done regardless
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def _deferred_signals():
    """Record SIGINT, SIGTERM and SIGHUP instead of acting on them, and yield the list they are recorded in.

    Python runs signal handlers in the main thread between bytecodes, so swapping the
    handlers keeps the block free of KeyboardInterrupt and handler exceptions. A signal
    mask would not, because the kernel can deliver a process signal to any other thread
    (torch's and faiss's OpenMP workers) that does not block it. Outside the main thread,
    where handlers cannot be changed, signals keep their handlers.
    """
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    # an ignored signal (SIGHUP under nohup) stays ignored
    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS
                if signal.getsignal(signum) is not signal.SIG_IGN}
    for signum in previous:
        signal.signal(signum, lambda number, frame: received.append(number))
    try:
        yield received
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


def write_files_atomically(contents: Mapping[Path, bytes]) -> int | None:
    """Write every file under a temporary name in its folder, then rename them all into place.

    Temporary files are removed if anything fails before the renames. A SIGINT, SIGTERM or
    SIGHUP that arrives during the renames is held back and its number returned, so the
    caller can stop after the complete write. Without such a signal it returns None.
    """
    staged: list[tuple[str, Path]] = []
    try:
        for path, data in contents.items():
            path = Path(path)
            try:
                fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
                staged.append((tmp_name, path))
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.chmod(tmp_name, default_file_mode())  # mkstemp creates 0600 files
            except OSError as e:
                # e.g. a full disk; nothing is renamed, so earlier outputs stay as they were
                raise OutputError(
                    f"cannot write {str(path)!r}: {e.strerror or e}; free space in {str(path.parent)!r} or "
                    "choose another --save_dir"
                ) from e

        with _deferred_signals() as received:
            # SIGKILL between two renames must not leave the new first file beside older
            # later ones (a .json describing the replaced .pth), so those are removed first
            for _, path in staged[1:]:
                path.unlink(missing_ok=True)
            for tmp_name, path in staged:
                os.replace(tmp_name, path)
            for folder in {path.parent for _, path in staged}:
                _fsync_folder(folder)
    finally:
        for tmp_name, _ in staged:
            if os.path.exists(tmp_name):
                os.remove(tmp_name)
    return received[-1] if received else None


def library_versions() -> dict[str, str]:
    """Return the versions of Python and of the libraries that shape the results."""
    import platform

    import faiss
    import h5py
    import matplotlib

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "h5py": h5py.__version__,
        "faiss": getattr(faiss, "__version__", "unknown"),
        "matplotlib": matplotlib.__version__,
        "platform": platform.platform(),
    }


def _epoch_dict(record) -> dict:
    return {
        "epoch": record.epoch,
        "loss": record.loss,
        "lr": record.lr,
        "steps": record.steps,
        "seconds": record.seconds,
        "steps_per_second": record.steps_per_second,
        "val": record.val,
        "val_seconds": record.val_seconds,
    }


def _join_dict(report) -> dict | None:
    if report is None:
        return None
    return {
        "missing_in_hdf5": len(report.missing_in_hdf5),
        "missing_in_list": len(report.missing_in_list),
        "duplicate_ids": len(report.duplicate_ids),
        "examples": {
            "missing_in_hdf5": report.missing_in_hdf5[:5],
            "missing_in_list": report.missing_in_list[:5],
            "duplicate_ids": report.duplicate_ids[:5],
        },
    }


def build_run_record(
    *,
    args: Mapping,
    result,
    train,
    validation,
    join_reports: Mapping,
    inputs: Mapping,
    output_paths: Mapping[str, Path],
    wall_seconds: float,
    embedding_space: Mapping,
) -> dict:
    """Assemble the JSON record of a training run.

    Args:
        args: The command-line arguments as a dict.
        result: The trainer's TrainResult.
        train: The LabelledEmbeddings trained on.
        validation: The LabelledEmbeddings validated on, or None.
        join_reports: JoinReport (or None) per input set name.
        inputs: {"path", "sha256"} per input flag name.
        output_paths: Paths of the written files per kind ("pth", "json", "png").
        wall_seconds: Seconds since the run started, up to writing the outputs.
        embedding_space: The extraction settings recorded in the training file (embedding_space.py),
            which the evaluator compares with the embeddings it applies the layer to.
    """
    import datetime

    weight = result.state_dict["layer.weight"]
    epochs = [_epoch_dict(r) for r in result.history]
    record = {
        "format_version": 1,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "outputs": {kind: str(path) for kind, path in output_paths.items()},
        "in_dim": int(weight.shape[1]),
        "out_dim": int(weight.shape[0]),
        "num_classes": result.num_classes,
        "num_images": train.num_images,
        "num_val_images": validation.num_images if validation is not None else 0,
        "device": result.device,
        "amp": result.amp,
        "optimizer": f"Adam ({result.optimizer_impl})",
        "torch_threads": torch.get_num_threads(),
        "kept_epoch": result.kept_epoch,
        "val_before": epochs[0]["val"],
        "val_kept": epochs[result.kept_epoch]["val"],
        "epochs": epochs,
        "train_seconds": result.train_seconds,
        "wall_seconds": wall_seconds,
        "args": dict(args),
        "inputs": dict(inputs),
        "embedding_space": dict(embedding_space),
        "join": {name: _join_dict(report) for name, report in join_reports.items()},
        "versions": library_versions(),
    }
    return record
