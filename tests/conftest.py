"""Shared fixtures: small generated images, image lists and the mini_uned location."""
import os
import signal
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]

# The signal tests check how the commands stop on SIGHUP and SIGINT. A suite started under nohup
# (SIGHUP ignored) or in the background of a script (SIGINT ignored) would pass the ignored signal
# on to the commands it runs, and they keep it ignored on purpose. So the suite restores the
# default actions before any test module imports the toolkit. Tests of the nohup case set SIG_IGN
# in their own child processes.
signal.signal(signal.SIGHUP, signal.SIG_DFL)
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def raise_wrapped_signal(exception: BaseException) -> None:
    """Raise `exception` wrapped in a RuntimeError, as Python 3.11 wraps one raised inside __set_name__.

    A signal handler that raises during a lazy import can hit a class body's __set_name__ call.
    """
    try:
        raise exception
    except BaseException as e:
        raise RuntimeError("Error calling __set_name__ on 'Field' instance 'field'") from e


def mini_uned_dir() -> Path:
    """Return the mini_uned folder: $MINI_UNED_DIR, else shared/data/mini_uned beside the repository."""
    return Path(os.environ.get("MINI_UNED_DIR", REPO_ROOT.parent / "shared" / "data" / "mini_uned"))


def write_image(path: Path, size: tuple[int, int], seed: int = 0, mode: str = "RGB", **save_options) -> Path:
    """Write a random-texture image of (width, height) in `mode`; the format follows the suffix."""
    rng = np.random.default_rng(seed)
    width, height = size
    # smooth gradients plus noise, so that resizing and JPEG coding keep images distinct
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255.0 / max(width, 1), y * 255.0 / max(height, 1), (x + y) % 256], axis=-1)
    pixels = np.clip(base + rng.normal(0, 40, (height, width, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    if mode != "RGB":
        image = image.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **save_options)
    return path


@pytest.fixture
def image_factory(tmp_path):
    """Return write_image bound to a folder under tmp_path: factory(relative_path, size, ...)."""
    root = tmp_path / "images"

    def factory(relative: str, size: tuple[int, int] = (48, 40), **kwargs) -> Path:
        return write_image(root / relative, size, **kwargs)

    factory.root = root
    return factory


# sizes with three aspect ratios and a repeated shape, so that batches of one shape form
SAMPLE_IMAGES = [
    ("a/landscape_0.jpg", (64, 48)),
    ("a/portrait_0.jpg", (48, 64)),
    ("a/square_0.png", (56, 56)),
    ("b/landscape_1.jpg", (64, 48)),
    ("b/wide.jpg", (90, 30)),
    ("b/portrait_1.jpg", (48, 64)),
    ("c/small.png", (20, 17)),
    ("c/landscape_2.jpg", (64, 48)),
    ("c/货架/苹果.jpg", (64, 48)),
    ("c/café.jpg", (40, 52)),
]


@pytest.fixture
def sample_dataset(tmp_path):
    """Ten images of several sizes (two with non-ASCII paths) and a labelled list of them.

    Returns (dataset_dir, list_path, relative paths in list order).
    """
    root = tmp_path / "images"
    for seed, (relative, size) in enumerate(SAMPLE_IMAGES):
        write_image(root / relative, size, seed=seed)
    paths = [relative for relative, _ in SAMPLE_IMAGES]
    # list order differs from sorted order, so order bugs show
    paths = paths[::2] + paths[1::2]
    list_path = tmp_path / "list.txt"
    list_path.write_text("".join(f"{p},{i % 3},{i % 2}\n" for i, p in enumerate(paths)), encoding="utf-8")
    return root, list_path, paths
