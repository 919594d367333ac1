import logging
import pickle

import pytest
import torch
import torch.nn.functional as F

from feature_extraction.backbones import (
    BackboneError,
    TimmPooled,
    _timm_keeps_head,
    build_backbone,
    check_input_size,
    gem_pool,
    split_model_tag,
)
from feature_extraction.checkpoints import CheckpointError, load_state_dict_strict, read_state_dict
from feature_extraction.embedding import Embedder
from feature_extraction.positional_embeddings import resize_positional_embedding
from feature_extraction.transforms import InferenceTransform, TransformName

VIT = "vit_tiny_patch16_224"
CNN = "resnet10t"


def _images(height=32, width=48, batch=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, height, width, generator=generator)


@pytest.fixture(scope="module")
def vit_head():
    torch.manual_seed(0)
    return build_backbone("timm", VIT, "none", None, "head")


@pytest.fixture(scope="module")
def vit_poolings(vit_head):
    """The same ViT weights wrapped with every pooling."""
    return {pooling: TimmPooled(vit_head.module.model, pooling).eval() for pooling in ("head", "cls", "gap", "gem")}


def test_vit_poolings_give_distinct_vectors(vit_poolings):
    with torch.inference_mode():
        outputs = {pooling: module(_images()) for pooling, module in vit_poolings.items()}
    for pooling, vectors in outputs.items():
        assert tuple(vectors.shape) == (2, 192), pooling
    assert not torch.allclose(outputs["cls"], outputs["gap"])
    assert not torch.allclose(outputs["gap"], outputs["gem"])
    # head pooling of a token-pooled ViT without classifier is the normed class token
    assert torch.allclose(outputs["head"], outputs["cls"], atol=1e-5)


def test_vit_cls_pooling_accepted():
    backbone = build_backbone("timm", VIT, "none", None, "cls")
    assert backbone.module.pooling == "cls"


def test_vit_gap_is_mean_of_patch_tokens(vit_poolings):
    module = vit_poolings["gap"]
    with torch.inference_mode():
        tokens = module.model.forward_features(_images())
        pooled = module(_images())
    assert torch.allclose(pooled, tokens[:, 1:].mean(dim=1), atol=1e-6)


def test_vit_patch_size_and_mean_from_config(vit_head):
    backbone = vit_head
    assert backbone.patch_size == (16, 16)
    assert backbone.mean == (0.5, 0.5, 0.5)


@pytest.mark.parametrize("pooling", ["head", "gap", "gem"])
def test_cnn_poolings_shape(pooling):
    backbone = build_backbone("timm", CNN, "none", None, pooling)
    with torch.inference_mode():
        vectors = backbone.module(_images(48, 40))
    assert tuple(vectors.shape) == (2, 512)
    assert backbone.patch_size is None


def test_cnn_gap_equals_head_average_pool():
    # resnet's head is global average pooling, so both must agree
    backbone_head = build_backbone("timm", CNN, "none", None, "head")
    backbone_gap = build_backbone("timm", CNN, "none", None, "gap")
    backbone_gap.module.load_state_dict(backbone_head.module.state_dict())
    with torch.inference_mode():
        assert torch.allclose(backbone_head.module(_images()), backbone_gap.module(_images()), atol=1e-5)


def test_cls_pooling_rejected_for_cnn():
    with pytest.raises(BackboneError, match="--pooling cls needs a transformer with a class token"):
        build_backbone("timm", CNN, "none", None, "cls")


def test_gem_matches_plain_gem_for_nonnegative():
    tokens = torch.rand(3, 10, 4) + 0.1
    expected = tokens.pow(3).mean(dim=1).pow(1 / 3)
    assert torch.allclose(gem_pool(tokens), expected, atol=1e-6)


def test_gem_shift_keeps_order_of_negative_channels():
    tokens = torch.tensor([[[-2.0], [-1.0], [0.0]]])
    pooled = gem_pool(tokens)
    assert -2.0 < pooled.item() < 0.0
    assert pooled.item() > tokens.mean().item()  # p=3 leans towards the largest value


def test_unknown_timm_model_rejected():
    with pytest.raises(BackboneError, match="is not a timm model"):
        build_backbone("timm", "no_such_model_xyz", "none", None, "head")


def test_unknown_timm_tag_rejected():
    with pytest.raises(BackboneError, match="tag 'nonexistent' is unknown"):
        build_backbone("timm", CNN, "nonexistent", None, "head")


def test_timm_clip_style_keeps_projection_head():
    assert _timm_keeps_head("vit_base_patch16_clip_224", 512)
    assert _timm_keeps_head("vit_so400m_patch14_siglip_384", 1152)
    assert not _timm_keeps_head("vit_base_patch16_clip_224", 1000)  # fine-tuned classifier
    assert not _timm_keeps_head("vit_base_patch16_siglip_224", 0)
    assert not _timm_keeps_head("resnet50", 1000)


@pytest.mark.parametrize(
    "model, pretrained, expected",
    [
        ("RN50.openai", None, ("RN50", "openai")),
        ("RN50", "openai", ("RN50", "openai")),
        ("RN50.openai", "openai", ("RN50", "openai")),
        ("resnet10t", None, ("resnet10t", None)),
    ],
)
def test_split_model_tag(model, pretrained, expected):
    assert split_model_tag(model, pretrained) == expected


def test_split_model_tag_conflict_rejected():
    with pytest.raises(BackboneError, match="give the tag in one place only"):
        split_model_tag("RN50.openai", "yfcc15m")


def test_open_clip_needs_weights_source():
    with pytest.raises(BackboneError, match="needs weights: pass --model RN50.TAG"):
        build_backbone("openclip", "RN50", None, None, "head")


def test_open_clip_rejects_non_head_pooling():
    with pytest.raises(BackboneError, match="timm models only"):
        build_backbone("och", "RN50", "none", None, "gap")


@pytest.fixture(scope="module")
def open_clip_vit():
    torch.manual_seed(0)
    return build_backbone("och", "ViT-S-32", "none", None, "head")


@pytest.mark.parametrize("model, dim", [("RN50", 1024), ("ViT-S-32", 384)])
def test_open_clip_takes_non_square_inputs(model, dim, open_clip_vit):
    torch.manual_seed(0)
    backbone = open_clip_vit if model == "ViT-S-32" else build_backbone("och", model, "none", None, "head")
    transform = InferenceTransform(TransformName.RESIZE_LARGE, 64)
    embedder = Embedder(backbone, transform, torch.device("cpu"))
    landscape = embedder.embed(torch.randint(0, 256, (2, 48, 64, 3), dtype=torch.uint8))
    portrait = embedder.embed(torch.randint(0, 256, (2, 64, 40, 3), dtype=torch.uint8))
    assert tuple(landscape.shape) == tuple(portrait.shape) == (2, dim)
    assert torch.allclose(landscape.norm(dim=1), torch.ones(2), atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("model", [CNN, "ViT-S-32"])
def test_autocast_embeddings_close_to_float32(model, dtype, open_clip_vit):
    # float16 autocast is the CUDA default (--comp_fp16). CPU autocast runs the same Embedder code,
    # although torch's lists of ops cast to the lower precision differ between CPU and CUDA.
    torch.manual_seed(0)
    backbone = open_clip_vit if model == "ViT-S-32" else build_backbone("timm", model, "none", None, "gem")
    transform = InferenceTransform(TransformName.RESIZE_LARGE, 64)
    pixels = torch.randint(0, 256, (4, 48, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))

    full = Embedder(backbone, transform, torch.device("cpu")).embed(pixels)
    low = Embedder(backbone, transform, torch.device("cpu"), autocast_dtype=dtype).embed(pixels)

    assert low.dtype == torch.float32
    assert not torch.equal(low, full)  # the products did run in the lower precision
    assert (low * full).sum(dim=1).min() > 0.999
    torch.testing.assert_close(low.norm(dim=1), torch.ones(4))


def test_open_clip_native_size_unchanged_by_dynamic_positions(open_clip_vit):
    # the same weights in a plain open_clip tower, which only takes its native 224 px input
    import open_clip

    reference = open_clip.create_model("ViT-S-32", pretrained=None).visual.eval()
    state = dict(open_clip_vit.module.visual.state_dict())
    state["positional_embedding"] = open_clip_vit.module.visual.positional_embedding_source
    reference.load_state_dict(state)
    images = _images(224, 224, batch=1)
    with torch.inference_mode():
        assert torch.allclose(open_clip_vit.module(images), reference(images), atol=1e-5)


def test_resize_positional_embedding_keeps_class_position():
    embedding = torch.randn(1 + 4 * 4, 8)
    resized = resize_positional_embedding(embedding, (4, 4), (2, 6))
    assert tuple(resized.shape) == (1 + 12, 8)
    assert torch.equal(resized[0], embedding[0])
    assert resize_positional_embedding(embedding, (4, 4), (4, 4)) is embedding


# ---------------------------------------------------------------------------- checkpoints


def _save_resnet_state(path, seed, with_classifier=True, wrap=None, prefix=""):
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(CNN, pretrained=False, num_classes=1000 if with_classifier else 0)
    state = {prefix + key: value for key, value in model.state_dict().items()}
    torch.save({wrap: state} if wrap else state, path)
    return model


def test_checkpoint_loaded_and_classifier_dropped(tmp_path):
    reference = _save_resnet_state(tmp_path / "w.pth", seed=3)
    backbone = build_backbone("timm", CNN, None, str(tmp_path / "w.pth"), "head")
    images = _images()
    reference.reset_classifier(0)
    with torch.inference_mode():
        assert torch.allclose(backbone.module(images), reference.eval()(images), atol=1e-5)
    assert backbone.description["pretrained"] == ""


def test_checkpoint_with_levit_head_loads(tmp_path, caplog):
    # Regression: LeViT's head keeps a BatchNorm beside its classifier ("head.bn"), whose keys were
    # rejected as unexpected in a plain timm state dict
    timm = pytest.importorskip("timm")
    torch.save(timm.create_model("levit_128s").state_dict(), tmp_path / "levit.pth")
    with caplog.at_level(logging.INFO, logger="feature_extraction.checkpoints"):
        backbone = build_backbone("timm", "levit_128s", None, str(tmp_path / "levit.pth"), "head")
    assert "ignoring 14 checkpoint keys the model does not use: " in caplog.text
    with torch.inference_mode():
        assert backbone.module(_images(224, 224)).shape[-1] == 384


def test_checkpoint_load_logged(tmp_path, caplog):
    # open_clip logs "Model initialized randomly" before the checkpoint loads, so the load needs its own line
    model = _save_resnet_state(tmp_path / "w.pth", seed=3)
    with caplog.at_level(logging.INFO, logger="feature_extraction.checkpoints"):
        build_backbone("timm", CNN, None, str(tmp_path / "w.pth"), "head")
    model.reset_classifier(0)
    expected = f"loaded {len(model.state_dict())} tensors from --checkpoint {str(tmp_path / 'w.pth')!r}"
    assert expected in caplog.text


@pytest.mark.parametrize("wrap, prefix", [("state_dict", ""), ("model", ""), (None, "module.")])
def test_checkpoint_wrappers_accepted(tmp_path, wrap, prefix):
    _save_resnet_state(tmp_path / "w.pth", seed=1, wrap=wrap, prefix=prefix)
    state = read_state_dict(tmp_path / "w.pth")
    assert "conv1.0.weight" in state


# the format is read from the file, so an upper-case or another suffix does not matter
@pytest.mark.parametrize("name", ["w.safetensors", "W.SAFETENSORS", "w.bin"])
def test_safetensors_checkpoint_read(tmp_path, name):
    from safetensors.torch import save_file

    save_file({"module.weight": torch.ones(2, 3), "module.bias": torch.zeros(2)}, str(tmp_path / name))
    state = read_state_dict(tmp_path / name)
    assert sorted(state) == ["bias", "weight"]
    assert torch.equal(state["weight"], torch.ones(2, 3))


def test_checkpoint_with_code_rejected(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("this must not run",))

    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"weight": Payload()}, f, protocol=2)
    with pytest.raises(CheckpointError, match=r"weights_only=True"):
        read_state_dict(tmp_path / "evil.pth")


def test_checkpoint_missing_file_rejected(tmp_path):
    with pytest.raises(CheckpointError, match="is not a file"):
        read_state_dict(tmp_path / "absent.pth")


def test_checkpoint_wrong_keys_listed(tmp_path):
    state = {"conv1.0.weight": torch.zeros(24, 3, 3, 3), "extra.weight": torch.zeros(1)}
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match=r"missing keys: .*; 1 unexpected keys: extra.weight"):
        build_backbone("timm", CNN, None, str(tmp_path / "partial.pth"), "head")


def test_checkpoint_wrong_shape_listed():
    module = torch.nn.Linear(4, 2)
    state = {"weight": torch.zeros(3, 4), "bias": torch.zeros(2)}
    with pytest.raises(CheckpointError, match=r"weight \(3, 4\) vs model \(2, 4\)"):
        load_state_dict_strict(module, state, source="'x.pth'")


def test_checkpoint_changes_embedding(tmp_path):
    _save_resnet_state(tmp_path / "a.pth", seed=1)
    _save_resnet_state(tmp_path / "b.pth", seed=2)
    images = _images()
    with torch.inference_mode():
        a = F.normalize(build_backbone("timm", CNN, None, str(tmp_path / "a.pth"), "head").module(images))
        a_again = F.normalize(build_backbone("timm", CNN, None, str(tmp_path / "a.pth"), "head").module(images))
        b = F.normalize(build_backbone("timm", CNN, None, str(tmp_path / "b.pth"), "head").module(images))
    assert torch.allclose(a, a_again)
    assert (a * b).sum(dim=1).max() < 0.999


# ---------------------------------------------------------------------------- open_clip towers built on timm

# the smallest open_clip config with a timm ViT trunk (an Eva at 384 px), and the one config
# whose trunk (a VisionTransformerRelPos) has no dynamic_img_size option
TIMM_VIT_TOWER = "PE-Core-T-16-384"
FIXED_TRUNK_TOWER = "vit_relpos_medium_patch16_cls_224"


@pytest.fixture(scope="module")
def open_clip_timm_vit():
    torch.manual_seed(0)
    return build_backbone("och", TIMM_VIT_TOWER, "none", None, "head")


def test_open_clip_timm_vit_takes_other_sizes(open_clip_timm_vit):
    backbone = open_clip_timm_vit
    transform = InferenceTransform(TransformName.RESIZE_LARGE, 64)
    embedder = Embedder(backbone, transform, torch.device("cpu"))
    landscape = embedder.embed(torch.randint(0, 256, (2, 48, 64, 3), dtype=torch.uint8))
    portrait = embedder.embed(torch.randint(0, 256, (2, 64, 40, 3), dtype=torch.uint8))  # 40 is no multiple of 16

    assert backbone.fixed_input_size is None
    assert backbone.patch_size == (16, 16)
    assert tuple(landscape.shape) == tuple(portrait.shape) == (2, 512)
    assert torch.isfinite(landscape).all()
    assert torch.isfinite(portrait).all()


def test_open_clip_timm_vit_native_size_unchanged(open_clip_timm_vit):
    # the same weights in the tower as open_clip builds it, which only takes its native 384 px input
    import open_clip

    reference = open_clip.create_model(TIMM_VIT_TOWER, pretrained=None).visual.eval()
    reference.load_state_dict(open_clip_timm_vit.module.visual.state_dict())
    assert not reference.trunk.dynamic_img_size
    assert open_clip_timm_vit.module.visual.trunk.dynamic_img_size
    images = _images(384, 384, batch=1)
    with torch.inference_mode():
        torch.testing.assert_close(open_clip_timm_vit.module(images), reference(images), rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def pe_core_trunks():
    """A random timm PE-Core tiny trunk as open_clip builds it, and the same weights built with dynamic_img_size."""
    import timm

    name = "vit_pe_core_tiny_patch16_384"
    torch.manual_seed(0)
    trunk = timm.create_model(name, pretrained=False, num_classes=0).eval()
    reference = timm.create_model(name, pretrained=False, num_classes=0, dynamic_img_size=True).eval()
    reference.load_state_dict(trunk.state_dict())
    return trunk, reference


@pytest.mark.parametrize("buffers", ["kept", "missing"])
def test_dynamic_trunk_copy_equals_timm_build(pe_core_trunks, buffers):
    # The copy is built on the meta device and takes the trunk's buffers, or is built again with
    # initialised tensors when the trunk lacks one (rope.bands is not in the state dict).
    import copy

    from feature_extraction.positional_embeddings import dynamic_img_size_copy

    trunk, reference = pe_core_trunks
    trunk = copy.deepcopy(trunk)
    if buffers == "missing":
        del trunk.rope._buffers["bands"]

    dynamic = dynamic_img_size_copy(trunk)

    assert dynamic.dynamic_img_size
    assert not any(tensor.is_meta for tensor in [*dynamic.parameters(), *dynamic.buffers()])
    images = _images(128, 96, batch=1)
    with torch.inference_mode():
        torch.testing.assert_close(dynamic.eval()(images), reference(images), rtol=0, atol=1e-5)


def test_dynamic_trunk_copy_unavailable_for_relpos_vit():
    import timm

    from feature_extraction.positional_embeddings import dynamic_img_size_copy

    trunk = timm.create_model("vit_relpos_small_patch16_224", pretrained=False, num_classes=0)
    assert dynamic_img_size_copy(trunk) is None


@pytest.mark.parametrize("model, dim", [("convnext_tiny", 1024), ("MobileCLIP-S1", 512)])
def test_open_clip_timm_cnn_towers_take_any_size(model, dim, caplog):
    torch.manual_seed(0)
    with caplog.at_level(logging.WARNING, logger="feature_extraction.backbones"):
        backbone = build_backbone("och", model, "none", None, "head")
    assert "input size" not in caplog.text
    assert backbone.fixed_input_size is None

    embedder = Embedder(backbone, InferenceTransform(TransformName.RESIZE_LARGE, 64), torch.device("cpu"))
    vectors = embedder.embed(torch.randint(0, 256, (2, 40, 64, 3), dtype=torch.uint8))
    assert tuple(vectors.shape) == (2, dim)


@pytest.fixture(scope="module")
def open_clip_fixed_trunk():
    torch.manual_seed(0)
    return build_backbone("och", FIXED_TRUNK_TOWER, "none", None, "head")


def test_open_clip_fixed_trunk_records_its_size(open_clip_fixed_trunk):
    assert open_clip_fixed_trunk.fixed_input_size == (224, 224)
    vectors = open_clip_fixed_trunk.module(_images(224, 224, batch=1))
    assert tuple(vectors.shape) == (1, 512)


@pytest.mark.parametrize(
    "transforms, resolution, min_size, multiscale",
    [
        ("RESIZE_LARGE", 128, 0, False),
        ("RESIZE_SQUARE", 128, 0, False),
        ("RESIZE_SMALL", 224, 0, False),
        ("RESIZE_LARGE", 224, 0, False),
        ("RESIZE_SQUARE", 224, 0, True),
    ],
)
def test_open_clip_fixed_trunk_rejects_other_sizes(open_clip_fixed_trunk, transforms, resolution, min_size,
                                                   multiscale):
    transform = InferenceTransform(TransformName(transforms), resolution, min_size)
    with pytest.raises(BackboneError) as info:
        check_input_size(open_clip_fixed_trunk, transform, multiscale, FIXED_TRUNK_TOWER)
    message = str(info.value)
    assert "takes only 224x224 inputs" in message
    assert "--resolution 224" in message
    assert "RESIZE_SQUARE" in message
    assert ("--multiscale false" in message) == multiscale


@pytest.mark.parametrize(
    "transforms, resolution, min_size",
    [("RESIZE_SQUARE", 224, 0), ("RESIZE_CENTER", 224, 0), ("RESIZE_PAD", 224, 0), ("RESIZE_LARGE", 200, 224)],
)
def test_open_clip_fixed_trunk_accepts_its_size(open_clip_fixed_trunk, transforms, resolution, min_size):
    transform = InferenceTransform(TransformName(transforms), resolution, min_size)
    check_input_size(open_clip_fixed_trunk, transform, False, FIXED_TRUNK_TOWER)


def test_any_size_backbone_passes_size_check(open_clip_vit):
    check_input_size(open_clip_vit, InferenceTransform(TransformName.RESIZE_LARGE, 50), True, "ViT-S-32")


# ---------------------------------------------------------------------------- open_clip tags and checkpoints


@pytest.mark.parametrize("pretrained", [None, "nonexistent"])
def test_open_clip_model_without_tags_message(pretrained):
    with pytest.raises(BackboneError) as info:
        build_backbone("openclip", "ViT-S-32", pretrained, None, "head")
    message = str(info.value)
    assert "open_clip lists no pretrained tags for it" in message
    assert "known tags" not in message
    assert "--pretrained none for random weights" in message
    assert "--checkpoint PATH" in message


def test_open_clip_needs_weights_lists_tags():
    with pytest.raises(BackboneError) as info:
        build_backbone("openclip", "RN50", None, None, "head")
    message = str(info.value)
    assert "known tags: openai, yfcc15m" in message
    assert "--pretrained none for random weights" in message


@pytest.fixture(scope="module")
def open_clip_state(tmp_path_factory):
    """The state dict of a random ViT-S-32 CLIP model saved in several layouts; returns {layout: path}."""
    import open_clip

    torch.manual_seed(5)
    state = open_clip.create_model("ViT-S-32", pretrained=None).state_dict()
    visual = {key: value for key, value in state.items() if key.startswith("visual.")}
    layouts = {
        "full": state,
        "visual_prefixed": visual,
        "visual": {key.removeprefix("visual."): value for key, value in visual.items()},
        "module_full": {"module." + key: value for key, value in state.items()},
        "module_visual_prefixed": {"module." + key: value for key, value in visual.items()},
    }
    folder = tmp_path_factory.mktemp("open_clip_state")
    paths = {}
    for layout, tensors in layouts.items():
        paths[layout] = folder / f"{layout}.pth"
        torch.save(tensors, paths[layout])
    return paths


@pytest.fixture(scope="module")
def open_clip_full_state_embeddings(open_clip_state):
    """Embeddings of `_images(64, 64)` by ViT-S-32 with the whole model's state dict loaded."""
    with torch.inference_mode():
        return build_backbone("och", "ViT-S-32", None, str(open_clip_state["full"]), "head").module(_images(64, 64))


@pytest.mark.parametrize("layout", ["visual_prefixed", "visual", "module_full", "module_visual_prefixed"])
def test_open_clip_checkpoint_layouts_equal_full(open_clip_state, open_clip_full_state_embeddings, layout):
    with torch.inference_mode():
        embeddings = build_backbone("och", "ViT-S-32", None, str(open_clip_state[layout]), "head").module(
            _images(64, 64)
        )
    assert torch.equal(embeddings, open_clip_full_state_embeddings)


def test_open_clip_partial_text_tower_rejected(open_clip_state, tmp_path):
    # a dict with some text-tower keys is loaded into the whole model, so the other text keys are missing
    state = torch.load(open_clip_state["full"], weights_only=True)
    partial = {key: value for key, value in state.items() if key.startswith("visual.") or key == "logit_scale"}
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match=r"missing keys: .*token_embedding.weight"):
        build_backbone("och", "ViT-S-32", None, str(tmp_path / "partial.pth"), "head")
