"""Backbones from timm and open_clip, wrapped to map a normalised batch to one vector per image.

timm models are built with `num_classes=0`, so `head` pooling returns the pre-logits
embedding, except CLIP-style models (name containing 'clip' or 'siglip') whose default
head is an image-text projection rather than a classifier: they keep it. ViT-style
models get `dynamic_img_size=True` so non-square inputs work. open_clip models use
`encode_image` without its normalisation (the caller L2-normalises), and their image
towers are adapted to any input size where the architecture allows
(`positional_embeddings.enable_dynamic_input_size`). A tower that keeps a fixed size
records it in `Backbone.fixed_input_size`, and `check_input_size` rejects transforms that
give other sizes.

Weights: a pretrained tag (downloaded or taken from the local cache by timm/open_clip),
a local `--checkpoint` state dict loaded into the model built without weights, or
`--pretrained none` for random weights (tests and smoke runs only).
"""
import logging
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from feature_extraction.checkpoints import load_state_dict_strict, read_state_dict
from feature_extraction.interrupts import raise_wrapped_interrupt
from feature_extraction.transforms import InferenceTransform

_logger = logging.getLogger(__name__)

FRAMEWORKS = ("timm", "openclip")
FRAMEWORK_ALIASES = {"och": "openclip"}
POOLINGS = ("head", "cls", "gap", "gem")
NO_WEIGHTS = "none"
GEM_POWER = 3.0
GEM_EPS = 1e-6

# Class counts of ImageNet-1k/12k/22k classifiers. A CLIP-style timm tag whose head has
# one of these sizes was fine-tuned for classification, so its head is removed too.
_CLASSIFIER_SIZES = (1000, 11821, 21841, 21843)


class BackboneError(Exception):
    """A model request that cannot be built; the message names the flag to change."""


class WeightsUnavailableError(Exception):
    """Pretrained weights that could not be downloaded or found in the cache (an environment failure)."""


def _weights_unavailable(model_name: str, error: Exception) -> WeightsUnavailableError:
    detail = str(error).strip().rstrip(".") or type(error).__name__
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        advice = ("HF_HUB_OFFLINE is set, so only the Hugging Face cache was searched: put the weights "
                  "there, or pass --checkpoint PATH with a local state dict")
    else:
        advice = ("Without internet access, pass --checkpoint PATH with a local state dict, or put the "
                  "weights in the Hugging Face cache and set HF_HUB_OFFLINE=1 so that no download is tried")
    return WeightsUnavailableError(f"could not load the pretrained weights of {model_name}: {detail}. {advice}")


@dataclass
class Backbone:
    """A model that maps (B, 3, H, W) normalised images to (B, D) features, with its input conventions."""

    module: nn.Module
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    patch_size: tuple[int, int] | None
    description: dict[str, str] = field(default_factory=dict)
    # NAME.TAG of the pretrained config whose preprocessing applies, also with --checkpoint
    pretrained_cfg: str = ""
    # the only (height, width) input the model accepts, or None for a model that takes any size
    fixed_input_size: tuple[int, int] | None = None
    # the (height, width) input size of the model's config, or None when the config gives none
    input_size: tuple[int, int] | None = None


def canonical_framework(framework: str) -> str:
    """Map a --framework value (with aliases such as 'och') to 'timm' or 'openclip'."""
    return FRAMEWORK_ALIASES.get(framework, framework)


def split_model_tag(model: str, pretrained: str | None) -> tuple[str, str | None]:
    """Split 'NAME.TAG' and reconcile the tag with --pretrained.

    Raises BackboneError when both give a tag and they differ.
    """
    name, dot, tag = model.partition(".")
    tag = tag if dot else None
    if tag and pretrained and pretrained != tag:
        raise BackboneError(
            f"--model {model!r} names the pretrained tag {tag!r} but --pretrained is {pretrained!r}; "
            "give the tag in one place only"
        )
    return name, tag or pretrained


# ---------------------------------------------------------------------------- pooling


def gem_pool(tokens: torch.Tensor, p: float = GEM_POWER, eps: float = GEM_EPS) -> torch.Tensor:
    """Generalised-mean pooling of (B, N, C) tokens over N.

    Each channel is shifted by its minimum when that is negative (transformer tokens) and
    shifted back after pooling. For non-negative CNN maps this is plain GeM.
    """
    tokens = tokens.float()
    shift = tokens.amin(dim=1, keepdim=True).clamp(max=0)  # (B, 1, C)
    pooled = (tokens - shift).clamp(min=eps).pow(p).mean(dim=1).pow(1.0 / p)  # (B, C)
    return pooled + shift.squeeze(1)


class TimmPooled(nn.Module):
    """A timm model followed by the requested pooling."""

    def __init__(self, model: nn.Module, pooling: str):
        super().__init__()
        self.model = model
        self.pooling = pooling
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0))
        self.num_features = int(getattr(model, "num_features", 0))

    def _tokens(self, features: torch.Tensor) -> torch.Tensor:
        """Return (B, N, C) patch tokens or feature-map positions."""
        if features.ndim == 3:  # (B, L, C) transformer tokens
            return features[:, self.num_prefix_tokens :]
        if features.ndim == 4 and features.shape[1] == self.num_features:  # (B, C, H, W)
            return features.flatten(2).transpose(1, 2)
        if features.ndim == 4 and features.shape[-1] == self.num_features:  # (B, H, W, C), e.g. Swin
            return features.flatten(1, 2)
        raise BackboneError(
            f"cannot pool forward_features output of shape {tuple(features.shape)} "
            f"(num_features {self.num_features}); use --pooling head"
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.pooling == "head":
            return self.model(images)
        features = self.model.forward_features(images)
        if self.pooling == "cls":
            return features[:, 0]
        tokens = self._tokens(features)
        if self.pooling == "gap":
            return tokens.float().mean(dim=1)
        return gem_pool(tokens)


class OpenClipImageEncoder(nn.Module):
    """The image tower of an open_clip model (`encode_image` without normalisation)."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual(images)


# ---------------------------------------------------------------------------- timm


def _height_width(size) -> tuple[int, int] | None:
    """Return (height, width) from a config size: an int, (height, width) or timm's (channels, height, width)."""
    if isinstance(size, int):
        return size, size
    if isinstance(size, (tuple, list)) and len(size) in (2, 3) and all(isinstance(v, int) for v in size):
        return int(size[-2]), int(size[-1])
    return None


def _timm_keeps_head(name: str, default_num_classes: int | None) -> bool:
    is_clip_style = "clip" in name or "siglip" in name
    return is_clip_style and bool(default_num_classes) and default_num_classes not in _CLASSIFIER_SIZES


def _create_timm(full_name: str, pretrained: bool, kwargs: dict) -> nn.Module:
    import timm

    try:
        return timm.create_model(full_name, pretrained=pretrained, dynamic_img_size=True, **kwargs)
    except TypeError as e:
        # only ViT-style classes take dynamic_img_size; CNNs accept any size anyway
        if "dynamic_img_size" not in str(e):
            raise
    return timm.create_model(full_name, pretrained=pretrained, **kwargs)


def _timm_patch_size(net: nn.Module) -> tuple[int, int] | None:
    """Return the patch size of a timm model's patch embedding, or None for a model without one."""
    patch_embed = getattr(net, "patch_embed", None)
    if patch_embed is None or getattr(patch_embed, "patch_size", None) is None:
        return None
    return tuple(int(s) for s in patch_embed.patch_size)


def build_timm(model: str, pretrained: str | None, checkpoint: str | None, pooling: str) -> Backbone:
    """Build a timm model, load its weights and wrap it with the pooling."""
    import timm
    from timm.models import get_pretrained_cfg

    name, tag = split_model_tag(model, pretrained)
    if not timm.is_model(name):
        raise BackboneError(
            f"--model {name!r} is not a timm model; list the names with "
            "python -c \"import timm; print(timm.list_models('*pattern*'))\""
        )
    random_weights = tag == NO_WEIGHTS
    full_name = name if tag in (None, NO_WEIGHTS) else f"{name}.{tag}"

    try:
        pretrained_cfg = get_pretrained_cfg(full_name, allow_unregistered=True)
    except RuntimeError:  # timm's error for a tag the architecture does not have
        pretrained_cfg = None
    if pretrained_cfg is None and tag not in (None, NO_WEIGHTS):
        raise BackboneError(
            f"--pretrained tag {tag!r} is unknown for timm model {name!r}; known tags: "
            + ", ".join(n.partition(".")[2] for n in timm.list_pretrained(f"{name}.*"))
        )
    default_num_classes = pretrained_cfg.num_classes if pretrained_cfg else None
    keep_head = _timm_keeps_head(name, default_num_classes)
    kwargs = {} if keep_head else {"num_classes": 0}

    download = checkpoint is None and not random_weights
    try:
        net = _create_timm(full_name, download, kwargs)
    except Exception as e:  # hub and network errors vary; all mean the weights are not at hand
        raise_wrapped_interrupt(e)
        if not download:
            raise
        raise _weights_unavailable(f"timm model {full_name!r}", e) from e

    description = {
        "pretrained": NO_WEIGHTS if random_weights else (net.pretrained_cfg.get("tag") or ""),
        "head": "kept (image-text projection)" if keep_head else "removed (num_classes=0)",
    }
    if checkpoint is not None:
        description["pretrained"] = ""
        classifier = net.pretrained_cfg.get("classifier") or ()
        classifier = (classifier,) if isinstance(classifier, str) else tuple(classifier)
        # a classifier such as LeViT's "head.linear" sits in a head module with other layers ("head.bn"),
        # which num_classes=0 removes too; only keys the model lacks are dropped
        heads = {c.rpartition(".")[0] for c in classifier if "." in c}
        ignored = () if keep_head else tuple(f"{c}." for c in (*classifier, *sorted(heads)))
        load_state_dict_strict(net, read_state_dict(checkpoint), ignored_prefixes=ignored, source=repr(checkpoint))
    elif random_weights:
        _logger.warning("timm model %s has random weights (--pretrained none): embeddings are meaningless", name)

    if pooling == "cls" and not (getattr(net, "cls_token", None) is not None and getattr(net, "num_prefix_tokens", 0)):
        raise BackboneError(
            f"--pooling cls needs a transformer with a class token, and {name!r} has none; "
            "use --pooling head, gap or gem"
        )

    cfg = net.pretrained_cfg
    return Backbone(
        module=TimmPooled(net, pooling),
        mean=tuple(float(v) for v in cfg["mean"]),
        std=tuple(float(v) for v in cfg["std"]),
        patch_size=_timm_patch_size(net),
        description=description,
        pretrained_cfg=f"{name}.{cfg['tag']}" if cfg.get("tag") else name,
        input_size=_height_width(cfg.get("input_size")),
    )


# ---------------------------------------------------------------------------- open_clip


def _missing_weights_error(name: str, tag: str | None, known_tags: list[str]) -> BackboneError:
    """Return the error for an open_clip model given without a tag, or with a tag open_clip does not list."""
    fallback = "--checkpoint PATH with a local state dict, or --pretrained none for random weights"
    if tag is None and known_tags:
        return BackboneError(
            f"open_clip model {name!r} needs weights: pass --model {name}.TAG or --pretrained TAG "
            f"(known tags: {', '.join(known_tags)}), {fallback}"
        )
    if tag is None:
        return BackboneError(
            f"open_clip model {name!r} needs weights, and open_clip lists no pretrained tags for it; pass {fallback}"
        )
    if known_tags:
        return BackboneError(
            f"--pretrained tag {tag!r} is unknown for open_clip model {name!r}; known tags: {', '.join(known_tags)}"
        )
    return BackboneError(
        f"--pretrained tag {tag!r} is unknown for open_clip model {name!r}, and open_clip lists no pretrained "
        f"tags for it; pass {fallback}"
    )


def _load_open_clip_checkpoint(clip: nn.Module, checkpoint: str) -> None:
    """Load a state dict of the whole CLIP model, or of its image tower with or without the 'visual.' prefix."""
    state_dict = read_state_dict(checkpoint)
    visual_keys = [key for key in state_dict if key.startswith("visual.")]
    if visual_keys and len(visual_keys) == len(state_dict):
        # the image tower's entries of a whole model's state dict
        state_dict = {key.removeprefix("visual."): value for key, value in state_dict.items()}
        load_state_dict_strict(clip.visual, state_dict, source=repr(checkpoint))
    elif visual_keys:
        load_state_dict_strict(clip, state_dict, source=repr(checkpoint))
    else:
        load_state_dict_strict(clip.visual, state_dict, source=repr(checkpoint))


def _adapt_input_size(visual: nn.Module, name: str) -> tuple[int, int] | None:
    """Let an open_clip image tower take any input size.

    Returns None, or the (height, width) that a tower keeps where it cannot take other sizes.
    """
    from open_clip.timm_model import TimmModel

    from feature_extraction.positional_embeddings import enable_dynamic_input_size

    if enable_dynamic_input_size(visual):
        return None
    if isinstance(visual, TimmModel):
        trunk = visual.trunk
        # the size the trunk checks its input against, which can differ from the open_clip config's image_size
        size = getattr(getattr(trunk, "patch_embed", None), "img_size", None) or visual.image_size
        size = (int(size[0]), int(size[1]))
        _logger.info("open_clip model %s takes only %dx%d inputs: its timm trunk %s cannot be built with "
                     "dynamic_img_size", name, size[0], size[1], type(trunk).__name__)
        return size
    _logger.warning(
        "open_clip image tower %s of %s is a type that this toolkit does not adapt to other input sizes, so "
        "inputs other than %s may fail", type(visual).__name__, name, getattr(visual, "image_size", "its own"),
    )
    return None


def build_open_clip(model: str, pretrained: str | None, checkpoint: str | None, pooling: str) -> Backbone:
    """Build an open_clip image tower, load its weights and allow any input size where possible."""
    import open_clip
    from open_clip.timm_model import TimmModel

    if pooling != "head":
        raise BackboneError(f"--pooling {pooling} is available for timm models only; use --pooling head with open_clip")
    name, tag = split_model_tag(model, pretrained)
    if name not in open_clip.list_models():
        raise BackboneError(
            f"--model {name!r} is not an open_clip model; list the names with "
            "python -c \"import open_clip; print(open_clip.list_models())\""
        )
    known_tags = open_clip.list_pretrained_tags_by_model(name)
    if (tag is None and checkpoint is None) or (tag not in (None, NO_WEIGHTS) and tag not in known_tags):
        raise _missing_weights_error(name, tag, known_tags)

    # the tag's mean/std apply even when the weights come from --checkpoint
    force_preprocess = {}
    if tag not in (None, NO_WEIGHTS):
        tag_cfg = open_clip.get_pretrained_cfg(name, tag)
        force_preprocess = {key: tag_cfg[key] for key in ("mean", "std") if key in tag_cfg}
    download = checkpoint is None and tag != NO_WEIGHTS
    try:
        clip = open_clip.create_model(
            name, pretrained=tag if download else None, force_preprocess_cfg=force_preprocess
        )
    except Exception as e:  # download and hub errors vary; all mean the weights are not at hand
        raise_wrapped_interrupt(e)
        if not download:
            raise
        raise _weights_unavailable(f"open_clip model {name}.{tag}", e) from e

    description = {"pretrained": tag or ""}
    if checkpoint is not None:
        description["pretrained"] = ""
        _load_open_clip_checkpoint(clip, checkpoint)
    elif tag == NO_WEIGHTS:
        _logger.warning("open_clip model %s has random weights (--pretrained none): embeddings are meaningless", name)

    visual = clip.visual
    del clip  # the text tower is not needed
    preprocess = getattr(visual, "preprocess_cfg", {}) or {}
    mean = tuple(float(v) for v in preprocess.get("mean", open_clip.OPENAI_DATASET_MEAN))
    std = tuple(float(v) for v in preprocess.get("std", open_clip.OPENAI_DATASET_STD))

    fixed_input_size = _adapt_input_size(visual, name)
    if isinstance(visual, TimmModel):
        patch_size = _timm_patch_size(visual.trunk)
    else:
        patch_size = tuple(int(s) for s in visual.patch_size) if hasattr(visual, "patch_size") else None
    return Backbone(
        module=OpenClipImageEncoder(visual),
        mean=mean,
        std=std,
        patch_size=patch_size,
        description=description,
        pretrained_cfg=f"{name}.{tag}" if force_preprocess else name,
        fixed_input_size=fixed_input_size,
        input_size=_height_width(getattr(visual, "image_size", None)),
    )


def check_input_size(backbone: Backbone, transform: InferenceTransform, multiscale: bool, model: str) -> None:
    """Raise BackboneError when the model takes one input size and the transform or --multiscale gives others."""
    if backbone.fixed_input_size is None:
        return
    height, width = backbone.fixed_input_size
    output_size = transform.fixed_output_size()
    if output_size == (height, width) and not multiscale:
        return

    if height != width:
        raise BackboneError(
            f"--model {model!r} takes only {height}x{width} inputs, and every --transforms gives square or "
            "variable sizes; choose another --model"
        )
    if output_size == (height, width):
        problem = "--multiscale true rescales them"
    else:
        transform_flags = f"--transforms {transform.name.value} with --resolution {transform.resolution}"
        if transform.min_size:
            transform_flags += f" and --min_size {transform.min_size}"
        problem = f"{transform_flags} gives other sizes"
    fix = f"--transforms RESIZE_SQUARE, RESIZE_CENTER or RESIZE_PAD with --resolution {height}"
    if multiscale:
        fix += ", and --multiscale false"
    raise BackboneError(f"--model {model!r} takes only {height}x{width} inputs, but {problem}; pass {fix}")


def build_backbone(
    framework: str, model: str, pretrained: str | None, checkpoint: str | None, pooling: str
) -> Backbone:
    """Build the model of `framework` in eval mode, without gradients.

    Raises BackboneError for an unknown model, tag or pooling, and CheckpointError for a
    checkpoint that cannot be read or does not match.
    """
    framework = canonical_framework(framework)
    if pooling not in POOLINGS:
        raise BackboneError(f"--pooling {pooling!r} is not one of {', '.join(POOLINGS)}")
    if framework == "timm":
        backbone = build_timm(model, pretrained, checkpoint, pooling)
    elif framework == "openclip":
        backbone = build_open_clip(model, pretrained, checkpoint, pooling)
    else:
        raise BackboneError(f"--framework {framework!r} is not one of timm, openclip, och")
    backbone.module.eval().requires_grad_(False)
    return backbone
