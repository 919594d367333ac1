"""Helpers of the fault-injection tests: subprocess runs of the three commands and kill hooks.

A kill hook runs a command in a wrapper process that patches one function of the
product. The patched function makes the process send itself SIGKILL (or SIGTERM) at an
exact point, such as between writing the temporary HDF5 file and renaming it. A real
signal ends the real process there, so a rerun finds on disk what a pre-empted job
leaves behind.
"""
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
EXTRACT = REPO_ROOT / "feature_extraction" / "extract.py"
TRAIN = REPO_ROOT / "linear_adaptation" / "train_lin_adapt.py"
EVALUATE = REPO_ROOT / "linear_adaptation" / "evaluate.py"

# a timm test model with random weights: 64-dimensional embeddings, quick on a CPU
TINY_MODEL = ["--framework", "timm", "--model", "test_vit", "--pretrained", "none", "--resolution", "64",
              "--batch_size", "8", "--num_workers", "0"]
# embeddings are stored as float16, whose step is 2**-11 (about 5e-4) just below 1; this
# allows a few steps of difference, e.g. from another batch composition
FLOAT16_TOLERANCE = 2e-3
SUBPROCESS_TIMEOUT = 300

# Wrapper script. Its arguments are the repository, the script, the fault point ("none" for
# no signal), the call count at which the process signals itself, and the signal name, to
# which ":finalizer" adds that the signal is sent from inside a __del__ method.
# The rest goes to the script. The environment variable
# FAULT_DELAY_MS="write_window=60,read_window=30" slows these PartStore methods down, so
# that signals sent from outside land in a known stage.
_HOOKED_RUN = r"""
import os, runpy, signal, sys, time
repo, script, point, count, signal_name = sys.argv[1:6]
sys.path.insert(0, repo)
count = int(count)
calls = {"n": 0}

class SignalsWhenDropped:
    def __del__(self):
        os.kill(os.getpid(), getattr(signal, signal_name.split(":")[0]))
        time.sleep(0.05)  # the handler runs here, and Python prints its exception as "Exception ignored"

def reached():
    calls["n"] += 1
    if calls["n"] == count:
        if signal_name.endswith(":finalizer"):
            SignalsWhenDropped()
        else:
            os.kill(os.getpid(), getattr(signal, signal_name))

def wrap(owner, name, before=False):
    original = getattr(owner, name)
    def patched(*args, **kwargs):
        if before:
            reached()
            return original(*args, **kwargs)
        result = original(*args, **kwargs)
        reached()
        return result
    setattr(owner, name, patched)

if script.endswith("extract.py"):
    import feature_extraction.pipeline as pipeline
    import feature_extraction.store as store
    for item in filter(None, os.environ.get("FAULT_DELAY_MS", "").split(",")):
        method, milliseconds = item.split("=")
        def slowed(*args, _original=getattr(store.PartStore, method), _seconds=int(milliseconds) / 1000, **kwargs):
            time.sleep(_seconds)
            return _original(*args, **kwargs)
        setattr(store.PartStore, method, slowed)
    if point == "none":
        pass
    elif point == "decode":
        # inside load_image's error handling, as a signal during a decode with --num_workers 0 lands
        import feature_extraction.images as images
        wrap(images, "_to_rgb", before=True)
    elif point == "exif":
        import PIL.Image
        wrap(PIL.Image.Image, "getexif", before=True)
    elif point == "embed":
        import feature_extraction.embedding as embedding
        wrap(embedding.Embedder, "embed")
    elif point == "before_publish":
        wrap(pipeline, "publish", before=True)
    elif point == "after_publish":
        wrap(pipeline, "publish")
    elif point == "after_failure_report":
        wrap(pipeline, "write_failure_report")
    elif point == "assembly_read":
        wrap(store.PartStore, "read_window")
    elif point == "after_window_write":
        wrap(store.PartStore, "write_window")
    elif point == "part_before_rename":
        wrap(store.os, "replace", before=True)
    elif point == "removing_parts":
        original_rmtree = store.shutil.rmtree
        def rmtree(path, *args, **kwargs):
            # delete half of the parts, then die: a parts folder removed only in part
            for part in sorted(os.listdir(path))[::2]:
                os.unlink(os.path.join(path, part))
            reached()
            return original_rmtree(path, *args, **kwargs)
        store.shutil.rmtree = rmtree
    else:
        raise SystemExit(f"unknown fault point {point}")
else:
    import linear_adaptation.outputs as outputs
    if point == "knn_search":
        # patched where evaluate.py imports it from, because runpy runs the script as a new module
        import linear_adaptation.knn as knn
        wrap(knn, "knn_search")
    elif point == "training_step":
        import linear_adaptation.trainer as trainer
        wrap(trainer, "cosine_margin_loss")
    elif point == "output_rename":
        wrap(outputs.os, "replace")
    elif point == "output_fsync":
        wrap(outputs.os, "fsync")
    else:
        raise SystemExit(f"unknown fault point {point}")

sys.argv = [script, *sys.argv[6:]]
runpy.run_path(script, run_name="__main__")
"""


def command(script: Path, args: list) -> list[str]:
    return [sys.executable, str(script), *[str(a) for a in args]]


def hooked_command(script: Path, args: list, point: str, count: int = 1, signal_name: str = "SIGKILL") -> list[str]:
    """Return the argv running `script` with a signal sent at the `count`-th call of `point`.

    Set FAULT_DELAY_MS in the environment of the run to slow part writes or reads down.
    """
    return [sys.executable, "-c", _HOOKED_RUN, str(REPO_ROOT), str(script), point, str(count), signal_name,
            *[str(a) for a in args]]


def run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    """Run a command to its end from the repository root; capture its text output."""
    return subprocess.run(argv, capture_output=True, text=True, cwd=REPO_ROOT, timeout=SUBPROCESS_TIMEOUT, **kwargs)


def start(argv: list[str], **kwargs) -> subprocess.Popen:
    """Start a command with its stderr in a pipe that the caller reads with communicate()."""
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT,
                            **kwargs)


def wait_for(condition, process: subprocess.Popen, timeout: float = 120.0, interval: float = 0.005) -> bool:
    """Poll `condition()` until it is true (return True), or the process ends or the timeout passes (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if process.poll() is not None:
            return condition()
        time.sleep(interval)
    return False


def kill_and_reap(process: subprocess.Popen, signal_number: int = signal.SIGKILL) -> str:
    """Send a signal, wait for the process and return its stderr."""
    if process.poll() is None:
        process.send_signal(signal_number)
    _, stderr = process.communicate(timeout=SUBPROCESS_TIMEOUT)
    return stderr


def read_hdf5(path: Path) -> tuple[np.ndarray, list[str], dict]:
    """Return the features as float32, the ids and the attributes of an extraction output."""
    with h5py.File(path, "r") as f:
        return f["features"][()].astype(np.float32), [i.decode("ascii") for i in f["index"][()]], dict(f.attrs)


def assert_same_extraction(output: Path, reference: Path) -> None:
    """Check that two outputs hold the same ids in the same order and the same embeddings."""
    features, ids, _ = read_hdf5(output)
    reference_features, reference_ids, _ = read_hdf5(reference)
    assert ids == reference_ids
    assert features.shape == reference_features.shape
    np.testing.assert_allclose(features, reference_features, atol=FLOAT16_TOLERANCE, rtol=0)


def folder_listing(folder: Path) -> list[str]:
    """Return every path under `folder`, relative and sorted, folders included."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


def file_size_limit(max_bytes: int):
    """Return a preexec_fn capping the size of any file the child writes (a full disk for one file).

    SIGXFSZ is ignored so that a write past the limit fails with OSError EFBIG, as a
    write to a full disk fails with ENOSPC, instead of killing the process.
    """
    def apply() -> None:
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))

    return apply


class _CreatesMarker:
    """An object whose unpickling runs `touch <marker>`, as a hostile checkpoint would run any code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def marker_pickle(path: Path, marker: Path, legacy_format: bool = False) -> Path:
    """Write a torch checkpoint whose loading with weights_only=False would create `marker`.

    The hostile object sits among real tensors, where a state dict's entries are.
    """
    import torch

    state = {"layer.weight": torch.zeros(2, 4), "layer.bias": torch.zeros(2), "extra": _CreatesMarker(marker)}
    torch.save(state, path, _use_new_zipfile_serialization=not legacy_format)
    return path


def extract_in_process(*argv) -> int:
    """Run extract.py's parser checks and main() in this process; return the exit status."""
    from feature_extraction.extract import check_args, get_args_parser, main

    parser = get_args_parser()
    args = parser.parse_args([str(a) for a in argv])
    check_args(parser, args)
    return main(args)


def read_failure_report(path: Path) -> dict[str, str]:
    """Return {path: reason} from a `<output>.failed.txt` file (paths contain no commas)."""
    report = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        image_path, _, reason = line.partition(",")
        report[image_path] = reason
    return report


@contextlib.contextmanager
def file_size_limit_here(max_bytes: int):
    """Cap the size of files this process writes (soft RLIMIT_FSIZE) for the block; SIGXFSZ is ignored."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


@contextlib.contextmanager
def small_tmpfs(mount_point: Path, size: str):
    """Mount a tmpfs of `size` (e.g. "300k") at `mount_point`, a real full disk; skip the test if not permitted.

    Yields a function that resizes the mounted file system.
    """
    mount_point.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        import pytest

        pytest.skip(f"cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN): {result.stderr.strip()}")

    def resize(new_size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={new_size}", str(mount_point)], check=True)

    try:
        yield resize
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)
