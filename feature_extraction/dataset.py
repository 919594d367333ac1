"""Windowed, shape-bucketed image loading for DataLoader workers.

The list is cut into windows of consecutive rows. Each worker takes whole windows,
decodes their images and groups them by exact (H, W) after resizing. A group is sent as
a batch when it reaches the batch size. The remaining groups follow at the end of the
window, and then a `WindowEnd` record with the rows that could not be read. Every batch
carries its row numbers, so the output order never depends on batching or on workers.
The batches of a window depend only on its images, so a resumed run forms the same ones.
"""
import functools
import inspect
import logging
import os
import signal
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from feature_extraction.image_list import resolve_image_path
from feature_extraction.images import DecodeOptions, ImageDecodeError, load_image
from feature_extraction.interrupts import STOP_SIGNALS

_logger = logging.getLogger(__name__)

# Buffered images per worker, in batches, above which the largest partial group is sent
# anyway. This bounds memory when a window has many distinct shapes.
MAX_BUFFERED_BATCHES = 4
# niceness added to decode workers of priority "low", and of "idle" where the SCHED_IDLE
# policy is not available (0-19, 19 is the lowest priority)
WORKER_NICENESS = 10
WORKER_PRIORITIES = ("auto", "idle", "low", "normal")


# DataLoader's in_order flag exists from torch 2.6; older releases keep worker order
_OUT_OF_ORDER = {"in_order": False} if "in_order" in inspect.signature(DataLoader).parameters else {}


class Window(NamedTuple):
    index: int
    start: int
    stop: int


class ImageBatch(NamedTuple):
    window: int
    rows: torch.Tensor  # (B,) int64 list rows
    images: torch.Tensor  # (B, H, W, 3) uint8, resized but not normalised


class WindowEnd(NamedTuple):
    window: int
    failed_rows: torch.Tensor  # (F,) int64
    failed_reasons: list[str]


MAX_AUTO_WINDOW_SIZE = 2048
MIN_AUTO_WINDOW_SIZE = 128


def auto_window_size(num_rows: int) -> int:
    """Pick a window size from the list length alone, so a resumed run gets the same windows.

    Each worker decodes whole windows, so a short list needs several windows to keep
    every worker busy; long lists use large windows for fuller shape buckets.
    """
    return int(min(MAX_AUTO_WINDOW_SIZE, max(MIN_AUTO_WINDOW_SIZE, -(-num_rows // 8))))


def split_windows(num_rows: int, window_size: int) -> list[Window]:
    """Cut rows [0, num_rows) into consecutive windows of `window_size` rows (the last may be shorter)."""
    return [
        Window(index, start, min(start + window_size, num_rows))
        for index, start in enumerate(range(0, num_rows, window_size))
    ]


def _make_batch(window: int, group: list[tuple[int, np.ndarray]]) -> ImageBatch:
    rows = torch.tensor([row for row, _ in group], dtype=torch.int64)
    images = torch.from_numpy(np.stack([pixels for _, pixels in group]))
    return ImageBatch(window, rows, images)


class WindowedImageDataset(IterableDataset):
    """Yield `ImageBatch` and `WindowEnd` records for the given windows of a list."""

    def __init__(
        self,
        dataset_dir: str | Path,
        paths: list[str],
        windows: list[Window],
        decode_options: DecodeOptions,
        batch_size: int,
    ) -> None:
        super().__init__()
        self.dataset_dir = Path(dataset_dir)
        self.paths = paths
        self.windows = windows
        self.decode_options = decode_options
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[ImageBatch | WindowEnd]:
        # load_image applies its own, configurable pixel limit before decoding
        Image.MAX_IMAGE_PIXELS = None

        worker = get_worker_info()
        windows = self.windows if worker is None else self.windows[worker.id :: worker.num_workers]
        for window in windows:
            yield from self._window_records(window)

    def _window_records(self, window: Window) -> Iterator[ImageBatch | WindowEnd]:
        groups: dict[tuple[int, ...], list[tuple[int, np.ndarray]]] = {}
        buffered = 0
        failed_rows: list[int] = []
        failed_reasons: list[str] = []

        for row in range(window.start, window.stop):
            try:
                path = resolve_image_path(self.dataset_dir, self.paths[row])
                pixels = load_image(path, self.decode_options)
            except ImageDecodeError as e:
                failed_rows.append(row)
                failed_reasons.append(" ".join(str(e).split()))  # one line per report entry
                continue

            group = groups.setdefault(pixels.shape, [])
            group.append((row, pixels))
            buffered += 1
            if len(group) == self.batch_size:
                yield _make_batch(window.index, groups.pop(pixels.shape))
                buffered -= self.batch_size
            elif buffered > MAX_BUFFERED_BATCHES * self.batch_size:
                largest = max(groups, key=lambda shape: len(groups[shape]))
                buffered -= len(groups[largest])
                yield _make_batch(window.index, groups.pop(largest))

        # largest first, so the common shapes reach the model before odd ones (see pipeline._FirstFailures)
        for group in sorted(groups.values(), key=len, reverse=True):
            yield _make_batch(window.index, group)
        yield WindowEnd(window.index, torch.tensor(failed_rows, dtype=torch.int64), failed_reasons)


def resolve_worker_priority(priority: str, device_type: str) -> str:
    """Map "auto" to "idle" when the model runs on the CPU and to "low" otherwise, and return other values unchanged.

    On the CPU the model's OpenMP threads wait for each other at every parallel region,
    so a decoder that occupies a core stalls them all, and under SCHED_IDLE they take the
    core back at once. On a GPU the decoders are usually what limits the speed, and
    SCHED_IDLE would leave them almost no CPU time beside other busy processes.
    """
    if priority not in WORKER_PRIORITIES:
        raise ValueError(f"worker priority {priority!r} is not one of {', '.join(WORKER_PRIORITIES)}")
    if priority == "auto":
        return "idle" if device_type == "cpu" else "low"
    return priority


def _init_worker(worker_id: int, priority: str = "idle") -> None:
    # Ctrl-C, a batch scheduler's cancel (SIGTERM) and a closed terminal (SIGHUP) reach the
    # whole process group. The main process alone handles them and shuts the workers down: a
    # worker that died first made the main process fail with "DataLoader worker is killed"
    # tracebacks, or exit 1.
    # A worker whose main process is gone stops by itself (DataLoader's parent check).
    for signal_number in STOP_SIGNALS:
        signal.signal(signal_number, signal.SIG_IGN)

    applied = lower_worker_priority(priority)
    if worker_id == 0:
        _logger.info("decode workers: priority %s, applied as %s", priority, applied)


def lower_worker_priority(priority: str) -> str:
    """Apply a resolved worker priority to the calling process and return what was applied.

    "idle" is Linux's SCHED_IDLE policy, or niceness +WORKER_NICENESS where the policy is
    missing or forbidden. "low" is that niceness, and "normal" changes nothing.
    """
    if priority == "normal":
        return "unchanged"
    if priority == "idle" and hasattr(os, "sched_setscheduler") and hasattr(os, "SCHED_IDLE"):
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            return "SCHED_IDLE"
        except OSError:
            pass  # a seccomp or container policy may forbid it, but raising niceness is always allowed
    os.nice(WORKER_NICENESS)
    return f"niceness +{WORKER_NICENESS}"


def make_loader(dataset: WindowedImageDataset, num_workers: int, pin_memory: bool, worker_priority: str = "idle") -> DataLoader:
    """Wrap the dataset in a DataLoader that passes its records through unbatched.

    `worker_priority` is a resolved priority ("idle", "low" or "normal") for the workers.

    Records of different workers arrive in whatever order they are ready, because each
    record names its window and rows. Each worker's own records keep their order, so a
    `WindowEnd` always follows the batches of its window.
    """
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        worker_init_fn=functools.partial(_init_worker, priority=worker_priority) if num_workers > 0 else None,
        prefetch_factor=2 if num_workers > 0 else None,
        **_OUT_OF_ORDER,
    )
