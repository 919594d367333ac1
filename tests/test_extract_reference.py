"""extract.py embeddings against a plain per-image pipeline written the way the ILIAS extractor works.

The reference opens each image alone, converts it with Pillow, applies the EXIF orientation,
runs the torchvision transform of --transforms, pads to the patch multiple, runs the timm
model and L2-normalises. extract.py must give the same rows in list order, although it
decodes in workers, batches by shape and folds BatchNorm.
"""
import math
import shutil

import h5py
import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torchvision import transforms as tv

from feature_extraction.image_list import escape_id

from conftest import mini_uned_dir, write_image
from test_extract_cli import run_cli

RESOLUTION = 48
NUM_PHOTOS = 8


def _photos(scratch) -> list[Image.Image]:
    """Return real photos from mini_uned when it is present, else textures generated in `scratch`."""
    listing = mini_uned_dir() / "heldout_paths.txt"
    if listing.is_file():
        paths = [line.split(",")[0] for line in listing.read_text().splitlines() if line]
        step = len(paths) // NUM_PHOTOS
        return [Image.open(mini_uned_dir() / "images" / path).convert("RGB") for path in paths[::step][:NUM_PHOTOS]]
    return [Image.open(write_image(scratch / f"{i}.png", (64 + 8 * i, 48), seed=i)) for i in range(NUM_PHOTOS)]


def _write_dataset(root) -> list[str]:
    """Write the photos and odd variants of them, and return the list paths in list order."""
    photos = _photos(root.parent / "generated")
    portrait = next((photo for photo in photos if photo.width != photo.height), photos[0].crop((0, 0, 40, 60)))
    names = []

    def save(name, image, **options):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        image.save(root / name, **options)
        names.append(name)

    for i, photo in enumerate(photos):
        save(f"photos/{i}.jpg", photo, quality=90)
    for orientation in (3, 6, 8):
        exif = Image.Exif()
        exif[0x0112] = orientation
        save(f"odd/exif_{orientation}.jpg", portrait, exif=exif, quality=90)
    save("odd/grey.jpg", photos[0].convert("L"))
    save("odd/cmyk.jpg", photos[1].convert("CMYK"))
    rgba = np.asarray(photos[2].convert("RGBA")).copy()
    rgba[..., 3] = np.linspace(0, 255, rgba.shape[1]).astype(np.uint8)
    save("odd/alpha.png", Image.fromarray(rgba))
    save("odd/palette.png", photos[3].convert("P", palette=Image.Palette.ADAPTIVE, colors=32))
    save("odd/tiny.png", photos[4].resize((3, 5)))
    save("odd/wide.jpg", photos[5].crop((0, 10, photos[5].width, 14)))
    save("odd/tall.png", photos[6].crop((10, 0, 13, photos[6].height)))
    save("odd/large.jpg", photos[7].resize((photos[7].width * 4, photos[7].height * 4)), quality=90)
    return names


def _centre_pad(tensor: torch.Tensor, height: int, width: int) -> torch.Tensor:
    extra_height = max(height - tensor.shape[-2], 0)
    extra_width = max(width - tensor.shape[-1], 0)
    return F.pad(tensor, (extra_width // 2, extra_width - extra_width // 2,
                          extra_height // 2, extra_height - extra_height // 2))


def _reference_input(path, transform: str, mean, std, min_size: int) -> torch.Tensor:
    """Return the (3, H, W) model input of one image, before the patch padding."""
    image = ImageOps.exif_transpose(Image.open(path).convert("RGB"))
    to_tensor = tv.Compose([tv.ToTensor(), tv.Normalize(mean, std)])
    if transform in ("RESIZE_LARGE", "RESIZE_PAD"):
        aspect = image.height / image.width
        height = max(1, int(RESOLUTION * aspect) if aspect <= 1 else RESOLUTION)
        width = max(1, int(RESOLUTION / aspect) if aspect > 1 else RESOLUTION)
        tensor = to_tensor(image.resize((width, height)))  # Pillow's default filter, bicubic
        target = RESOLUTION if transform == "RESIZE_PAD" else min_size
        return _centre_pad(tensor, target, target)
    steps = {
        "RESIZE_SMALL": [tv.Resize(RESOLUTION)],
        "RESIZE_CENTER": [tv.Resize(RESOLUTION), tv.CenterCrop(RESOLUTION)],
        "RESIZE_SQUARE": [tv.Resize((RESOLUTION, RESOLUTION))],
    }[transform]
    return to_tensor(tv.Compose(steps)(image))


def _reference_embeddings(root, names, model_name, transform, min_size, multiscale) -> np.ndarray:
    torch.manual_seed(0)  # extract.py seeds 0 before it builds a model with random weights
    try:
        model = timm.create_model(model_name, pretrained=False, num_classes=0, dynamic_img_size=True)
    except TypeError:
        model = timm.create_model(model_name, pretrained=False, num_classes=0)
    model.eval()
    config = timm.data.resolve_data_config({}, model=model)
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)

    rows = []
    with torch.inference_mode():
        for name in names:
            image = _reference_input(root / name, transform, config["mean"], config["std"], min_size)[None]
            vectors = []
            for scale in (0.707, 1.0, 1.414) if multiscale else (1.0,):
                scaled = image if scale == 1.0 else F.interpolate(image, scale_factor=scale, mode="bicubic")
                if patch is not None:
                    height = math.ceil(scaled.shape[-2] / patch[0]) * patch[0]
                    width = math.ceil(scaled.shape[-1] / patch[1]) * patch[1]
                    scaled = _centre_pad(scaled, height, width)
                vectors.append(F.normalize(model(scaled), dim=-1))
            rows.append(F.normalize(torch.stack(vectors).mean(dim=0), dim=-1)[0].numpy())
    return np.stack(rows)


@pytest.fixture(scope="module")
def reference_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("reference") / "images"
    names = _write_dataset(root)
    list_path = root.parent / "list.txt"
    list_path.write_text("".join(f"{name},0,0\n" for name in names[::-1]))  # not in folder order
    yield root, list_path, names[::-1]
    shutil.rmtree(root.parent)


@pytest.mark.parametrize(
    "model_name, transform, min_size, multiscale",
    [
        ("test_vit", "RESIZE_LARGE", 0, False),
        ("test_vit", "RESIZE_SMALL", 0, False),
        ("test_vit", "RESIZE_CENTER", 0, False),
        ("test_vit", "RESIZE_SQUARE", 0, False),
        ("test_vit", "RESIZE_PAD", 0, False),
        ("test_vit", "RESIZE_LARGE", 40, True),
        ("resnet10t", "RESIZE_LARGE", 0, False),
    ],
)
def test_embeddings_match_per_image_reference(reference_dataset, tmp_path, model_name, transform, min_size, multiscale):
    root, list_path, names = reference_dataset
    code = run_cli(
        "--dataset_dir", root, "--selected_ids", list_path, "--hdf5_dir", tmp_path, "--framework", "timm",
        "--model", model_name, "--pretrained", "none", "--resolution", RESOLUTION, "--transforms", transform,
        "--min_size", min_size, "--multiscale", multiscale, "--jpeg_draft", "false", "--store_fp16", "false",
        "--device", "cpu", "--num_workers", "2", "--batch_size", "3", "--window_size", "5",
    )
    assert code == 0
    with h5py.File(tmp_path / "features_uned.hdf5", "r") as f:
        features = f["features"][:]
        ids = [image_id.decode("ascii") for image_id in f["index"][:]]

    assert ids == [escape_id(name) for name in names]
    expected = _reference_embeddings(root, names, model_name, transform, min_size, multiscale)
    errors = np.linalg.norm(features - expected, axis=1)
    assert errors.max() < 1e-4, f"largest difference {errors.max():.2e} for {names[int(errors.argmax())]}"
    # the reference rows of different images are far apart, so a wrong pixel or row order shows
    distances = np.linalg.norm(expected[:NUM_PHOTOS, None] - expected[None, :NUM_PHOTOS], axis=-1)
    assert distances[~np.eye(NUM_PHOTOS, dtype=bool)].min() > 1e-2
