import logging
import math

import numpy as np
import pytest
import torch

from linear_adaptation.lin_adapt import LinearAdapter
from linear_adaptation.model import CosineClassifier
from linear_adaptation.synthetic import make_synthetic_dataset
from linear_adaptation.trainer import (
    LabelledEmbeddings,
    TrainingError,
    class_index_first_appearance,
    evaluate_retrieval,
    imprint_class_means,
    lr_at_step,
    make_adam,
    train_linear_adapter,
)

from conftest import raise_wrapped_signal

# small enough to train in well under a second per run on two cores
DATA_ARGS = dict(
    num_train_images=2000,
    num_train_classes=200,
    num_heldout_images=400,
    num_heldout_classes=40,
    dim=64,
    nuisance_rank=8,
    nuisance_scale=0.4,
    noise_scale=1.0,
)
TRAIN_ARGS = dict(out_dim=64, batch_size=64, lr=3e-3, num_epochs=5, show_progress=False)


def as_labelled(split, order=None):
    rows = np.arange(len(split.ids)) if order is None else order
    return LabelledEmbeddings(split.features, rows, split.labels, split.domains)


@pytest.fixture(scope="module")
def synthetic():
    return make_synthetic_dataset(**DATA_ARGS, seed=1)


def test_classes_numbered_by_first_appearance():
    labels = np.array([5, 5, 0, 1, 0, 5])
    domains = np.array([1, 1, 0, 1, 1, 0])
    classes, pairs = class_index_first_appearance(labels, domains)
    assert classes.tolist() == [0, 0, 1, 2, 3, 4]
    assert pairs.tolist() == [[1, 5], [0, 0], [1, 1], [1, 0], [0, 5]]


def test_lr_schedules():
    assert lr_at_step(0, 100, 1.0, "constant", 0) == 1.0
    assert lr_at_step(0, 100, 1.0, "constant", 10) == pytest.approx(0.1)
    assert lr_at_step(9, 100, 1.0, "constant", 10) == pytest.approx(1.0)
    assert lr_at_step(10, 100, 1.0, "cosine", 10) == pytest.approx(1.0)
    assert lr_at_step(55, 100, 1.0, "cosine", 10) == pytest.approx(0.5)
    assert lr_at_step(100, 100, 1.0, "cosine", 10) == pytest.approx(0.0, abs=1e-12)
    assert lr_at_step(25, 50, 2.0, "cosine", 0) == pytest.approx(1.0)


def test_validation_map_rises_with_nuisance(synthetic):
    result = train_linear_adapter(
        as_labelled(synthetic.train), validation=as_labelled(synthetic.heldout), **TRAIN_ARGS
    )
    maps = [record.val["map"] for record in result.history]
    assert len(maps) == 6
    assert maps[0] < 55
    assert maps[-1] > maps[0] + 20
    assert result.history[-1].loss < result.history[1].loss
    assert result.num_classes == 200


def test_same_seed_same_weights(synthetic):
    first = train_linear_adapter(as_labelled(synthetic.train), seed=7, **TRAIN_ARGS)
    second = train_linear_adapter(as_labelled(synthetic.train), seed=7, **TRAIN_ARGS)
    other = train_linear_adapter(as_labelled(synthetic.train), seed=8, **TRAIN_ARGS)
    assert set(first.state_dict) == {"layer.weight", "layer.bias"}
    assert torch.equal(first.state_dict["layer.weight"], second.state_dict["layer.weight"])
    assert torch.equal(first.state_dict["layer.bias"], second.state_dict["layer.bias"])
    assert not torch.equal(first.state_dict["layer.weight"], other.state_dict["layer.weight"])


def test_shuffled_rows_give_same_layer(synthetic):
    ordered = as_labelled(synthetic.train)
    permutation = np.random.default_rng(0).permutation(ordered.num_images)
    # row permutation[i] of the shuffled matrix is row i of the ordered one
    shuffled_features = np.empty_like(ordered.features)
    shuffled_features[permutation] = ordered.features
    shuffled = LabelledEmbeddings(shuffled_features, permutation, ordered.labels, ordered.domains)

    first = train_linear_adapter(ordered, num_epochs=2, **{k: v for k, v in TRAIN_ARGS.items() if k != "num_epochs"})
    second = train_linear_adapter(shuffled, num_epochs=2, **{k: v for k, v in TRAIN_ARGS.items() if k != "num_epochs"})
    assert torch.equal(first.state_dict["layer.weight"], second.state_dict["layer.weight"])
    assert torch.equal(first.state_dict["layer.bias"], second.state_dict["layer.bias"])


def test_keep_best_returns_best_epoch(synthetic):
    train, heldout = as_labelled(synthetic.train), as_labelled(synthetic.heldout)
    # a high learning rate makes later epochs overfit, so best and last differ
    result = train_linear_adapter(
        train, validation=heldout, keep="best", **{**TRAIN_ARGS, "lr": 3e-2, "num_epochs": 4}
    )
    maps = [record.val["map"] for record in result.history[1:]]
    assert result.kept_epoch == int(np.argmax(maps)) + 1

    adapter = LinearAdapter(64, 64)
    adapter.load_state_dict(result.state_dict, strict=True)
    rescored = evaluate_retrieval(adapter, heldout, torch.from_numpy(heldout.features), k=100)
    assert rescored["map"] == pytest.approx(max(maps), abs=1e-6)


def test_keep_best_needs_validation(synthetic):
    with pytest.raises(ValueError, match="validation"):
        train_linear_adapter(as_labelled(synthetic.train), keep="best", **TRAIN_ARGS)


def test_float16_storage_trains_like_float32(synthetic):
    half = LabelledEmbeddings(
        synthetic.train.features.astype(np.float16),
        np.arange(len(synthetic.train.ids)),
        synthetic.train.labels,
        synthetic.train.domains,
    )
    heldout = as_labelled(synthetic.heldout)
    low = train_linear_adapter(half, validation=heldout, **TRAIN_ARGS)
    full = train_linear_adapter(as_labelled(synthetic.train), validation=heldout, **TRAIN_ARGS)
    assert abs(low.history[-1].val["map"] - full.history[-1].val["map"]) < 1.0


def test_bf16_autocast_runs_and_learns(synthetic):
    heldout = as_labelled(synthetic.heldout)
    result = train_linear_adapter(as_labelled(synthetic.train), validation=heldout, amp="bf16", **TRAIN_ARGS)
    assert result.amp == "bf16"
    assert all(math.isfinite(record.loss) for record in result.history[1:])
    assert result.history[-1].val["map"] > result.history[0].val["map"] + 20
    assert result.state_dict["layer.weight"].dtype == torch.float32


def test_fp16_rejected_on_cpu(synthetic):
    with pytest.raises(ValueError, match="fp16 autocast is supported on CUDA only"):
        train_linear_adapter(as_labelled(synthetic.train), amp="fp16", **TRAIN_ARGS)


class _RecordingScaler(torch.amp.GradScaler):
    """GradScaler that records its scale after every update."""

    scales: list[float] = []

    def update(self, new_scale=None):
        super().update(new_scale)
        _RecordingScaler.scales.append(self.get_scale())


@pytest.fixture
def fp16_on_cpu(monkeypatch):
    """Run the CUDA-only fp16 recipe (float16 autocast, GradScaler, fused Adam) on CPU tensors.

    The trainer rejects fp16 on the CPU, where it is slow, so the guard is bypassed here.
    """
    from linear_adaptation import trainer

    original = trainer.resolve_amp_dtype
    monkeypatch.setattr(
        trainer, "resolve_amp_dtype", lambda amp, device: torch.float16 if amp == "fp16" else original(amp, device)
    )
    monkeypatch.setattr(torch.amp, "GradScaler", _RecordingScaler)
    _RecordingScaler.scales = []
    return _RecordingScaler.scales


def test_fp16_loss_scaling_trains_like_float32(synthetic, fp16_on_cpu):
    heldout = as_labelled(synthetic.heldout)
    half = train_linear_adapter(as_labelled(synthetic.train), validation=heldout, amp="fp16", **TRAIN_ARGS)
    full = train_linear_adapter(as_labelled(synthetic.train), validation=heldout, **TRAIN_ARGS)

    # 5 epochs of 31 steps. At the default scale no float16 gradient overflows, so no step is skipped.
    assert len(fp16_on_cpu) == 155
    assert set(fp16_on_cpu) == {65536.0}
    assert half.amp == "fp16"
    for low, high in zip(half.history[1:], full.history[1:]):
        assert low.loss == pytest.approx(high.loss, rel=1e-3)
        assert abs(low.val["map"] - high.val["map"]) < 0.3
    assert half.state_dict["layer.weight"].dtype == torch.float32


def test_fp16_overflow_skips_steps(synthetic, fp16_on_cpu):
    # At logit scale 200 the scaled float16 gradients of the first steps overflow. GradScaler
    # must skip those steps and halve its scale, so that no Inf reaches the weights.
    heldout = as_labelled(synthetic.heldout)
    args = {**TRAIN_ARGS, "scale": 200.0}
    half = train_linear_adapter(as_labelled(synthetic.train), validation=heldout, amp="fp16", **args)
    full = train_linear_adapter(as_labelled(synthetic.train), validation=heldout, **args)

    assert fp16_on_cpu[0] == 32768.0
    assert min(fp16_on_cpu) < 65536.0 / 4
    for name, tensor in half.state_dict.items():
        assert torch.isfinite(tensor).all(), name
    assert all(math.isfinite(record.loss) for record in half.history[1:])
    assert abs(half.history[-1].val["map"] - full.history[-1].val["map"]) < 0.5


@pytest.mark.parametrize("loss_type,margin", [("normface", 0.0), ("cosface", 0.2), ("arcface", 0.2)])
def test_margin_losses_train(synthetic, loss_type, margin):
    result = train_linear_adapter(
        as_labelled(synthetic.train), loss_type=loss_type, margin=margin, **{**TRAIN_ARGS, "num_epochs": 2}
    )
    assert result.history[2].loss < result.history[1].loss


def test_single_class_rejected(synthetic):
    train = as_labelled(synthetic.train)
    one_class = LabelledEmbeddings(train.features, train.rows, np.zeros_like(train.labels), np.zeros_like(train.domains))
    with pytest.raises(ValueError, match="1 class"):
        train_linear_adapter(one_class, **TRAIN_ARGS)


def test_batch_larger_than_set_rejected(synthetic):
    small = as_labelled(synthetic.train).subset(np.arange(2000) % 40 == 0)  # 50 images of many classes
    with pytest.raises(ValueError, match="lower --batch_size"):
        train_linear_adapter(small, **TRAIN_ARGS)


def test_validation_dimension_mismatch_rejected(synthetic):
    heldout = as_labelled(synthetic.heldout)
    narrow = LabelledEmbeddings(heldout.features[:, :32].copy(), heldout.rows, heldout.labels, heldout.domains)
    with pytest.raises(ValueError, match="dimension 32 but training embeddings 64"):
        train_linear_adapter(as_labelled(synthetic.train), validation=narrow, **TRAIN_ARGS)


def test_imprint_class_means_sets_directions():
    torch.manual_seed(0)
    adapter = LinearAdapter(6, 4)
    with torch.no_grad():
        adapter.layer.bias.normal_()  # a bias, so the mean must be taken before the layer, not of the inputs alone
    classifier = CosineClassifier(4, 3)
    norms_before = classifier.weight.norm(dim=1).clone()
    features = torch.randn(7, 6)
    rows = torch.tensor([6, 0, 1, 2, 3, 4, 5])
    classes = torch.tensor([0, 0, 1, 2, 2, 2, 1])

    imprint_class_means(classifier, adapter, features, rows, classes, chunk_rows=3)

    with torch.no_grad():
        outputs = adapter.layer(features[rows])  # before the L2 normalisation
    for c in range(3):
        direction = torch.nn.functional.normalize(outputs[classes == c].mean(dim=0), dim=0)
        assert torch.allclose(classifier.weight[c] / classifier.weight[c].norm(), direction, atol=1e-6)
    assert torch.allclose(classifier.weight.norm(dim=1), norms_before, atol=1e-6)


def test_class_mean_init_starts_lower(synthetic):
    args = {**TRAIN_ARGS, "num_epochs": 1}
    random_init = train_linear_adapter(as_labelled(synthetic.train), **args)
    class_mean = train_linear_adapter(as_labelled(synthetic.train), classifier_init="class_mean", **args)
    assert class_mean.history[1].loss < random_init.history[1].loss - 0.5


def test_max_steps_ends_within_epoch(synthetic, caplog):
    # 2000 images in batches of 64 give 31 steps per epoch
    with caplog.at_level(logging.INFO, logger="linear_adaptation.trainer"):
        result = train_linear_adapter(
            as_labelled(synthetic.train), max_steps=40, lr_schedule="cosine", **{**TRAIN_ARGS, "num_epochs": 5}
        )
    assert [record.steps for record in result.history[1:]] == [31, 9]
    # Regression: the start line printed "2 epochs of 31 steps", 62 steps
    assert "40 steps (--max_steps): 1 epoch of 31 steps and 9 steps (batch 64)" in caplog.text
    assert result.kept_epoch == 2
    assert result.history[2].lr == pytest.approx(lr_at_step(39, 40, 3e-3, "cosine", 0))


def test_validation_searches_no_deeper_than_set(synthetic, monkeypatch):
    # Regression: val_k = 100000000 padded every ranked list to k places (112 GiB).
    from linear_adaptation import trainer

    heldout = as_labelled(synthetic.heldout)
    features = torch.from_numpy(heldout.features)
    depths = []
    original = trainer.knn_search
    monkeypatch.setattr(trainer, "knn_search", lambda *a, k, **kw: depths.append(k) or original(*a, k=k, **kw))

    deep = evaluate_retrieval(None, heldout, features, k=10**8)
    full = evaluate_retrieval(None, heldout, features, k=399)
    assert depths == [399, 399]
    assert deep["k"] == 10**8
    for name in ("map", "recall@1", "mmp@5"):
        assert deep[name] == pytest.approx(full[name])


def test_diverged_training_raises(synthetic):
    with pytest.raises(TrainingError, match="training diverged in epoch 1: the mean loss is nan"):
        train_linear_adapter(as_labelled(synthetic.train), **{**TRAIN_ARGS, "lr": 1e30})


def test_diverged_training_stops_within_epoch(synthetic, monkeypatch):
    # the running loss is checked every 20 steps, so a NaN stops an epoch of 31 steps after 20
    from linear_adaptation import trainer

    steps = []
    original = trainer.cosine_margin_loss

    def nan_loss(*args):
        steps.append(1)
        return original(*args) * float("nan")

    monkeypatch.setattr(trainer, "cosine_margin_loss", nan_loss)
    with pytest.raises(TrainingError, match="epoch 1"):
        train_linear_adapter(as_labelled(synthetic.train), **TRAIN_ARGS)
    assert len(steps) == 20


def test_on_train_start_runs_before_first_step(synthetic, monkeypatch):
    from linear_adaptation import trainer

    events = []
    original = trainer.cosine_margin_loss
    monkeypatch.setattr(trainer, "cosine_margin_loss", lambda *a: events.append("step") or original(*a))
    train_linear_adapter(as_labelled(synthetic.train), on_train_start=lambda: events.append("start"),
                         **{**TRAIN_ARGS, "max_steps": 2})
    assert events == ["start", "step", "step"]


def test_make_adam_falls_back_to_foreach(monkeypatch):
    original_adam = torch.optim.Adam

    def adam_without_fused(params, fused=False, **kwargs):
        if fused:
            raise RuntimeError("fused=True requires all the params to be on a supported device")
        return original_adam(params, **kwargs)

    monkeypatch.setattr(torch.optim, "Adam", adam_without_fused)
    _, implementation = make_adam([torch.nn.Parameter(torch.ones(3))], lr=1e-3, weight_decay=0.0)
    assert implementation == "foreach"


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit])
def test_make_adam_keeps_interrupt_wrapped_in_error(monkeypatch, interrupt):
    # A signal handler that raises during the optimizer's first, lazy imports can come out wrapped in
    # a RuntimeError ("Error calling __set_name__ ..."), which must not read as "fused Adam unavailable".
    def adam_interrupted(params, **kwargs):
        raise_wrapped_signal(interrupt())

    monkeypatch.setattr(torch.optim, "Adam", adam_interrupted)
    with pytest.raises(interrupt):
        make_adam([torch.nn.Parameter(torch.ones(3))], lr=1e-3, weight_decay=0.0)


def test_wrapped_interrupt_ignores_other_base_exceptions():
    from feature_extraction.interrupts import raise_wrapped_interrupt

    # an error raised in a generator's finally while the generator is closed has GeneratorExit as context
    try:
        try:
            raise GeneratorExit()
        except GeneratorExit:
            raise OSError("flush failed")
    except OSError as e:
        raise_wrapped_interrupt(e)  # returns: GeneratorExit is not a signal's exception
        error = e
    assert isinstance(error.__context__, GeneratorExit)
