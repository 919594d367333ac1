"""Training loop of the linear adaptation layer, with held-out retrieval validation.

The embeddings stay in their stored dtype in one tensor on the training device. Each step
gathers its batch rows by index and converts only those to float32. Batches follow a
random permutation of the list positions (not of the HDF5 rows) drawn from a generator
seeded by `seed`, so the same list and seed give the same layer whatever the HDF5 row order.
"""
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from feature_extraction.interrupts import raise_if_signal_lost, raise_wrapped_interrupt
from linear_adaptation.knn import knn_search
from linear_adaptation.lin_adapt import LinearAdapter, adapt_rows
from linear_adaptation.metrics import labelled_set_metrics, search_depth
from linear_adaptation.model import LOSS_TYPES, CosineClassifier, cosine_margin_loss

_logger = logging.getLogger(__name__)

AMP_MODES = ("none", "bf16", "fp16")
LR_SCHEDULES = ("constant", "cosine")
KEEP_MODES = ("last", "best")
CLASSIFIER_INITS = ("random", "class_mean")

_EMBED_CHUNK_ROWS = 65536
_POSTFIX_EVERY_STEPS = 20  # also how often the running loss is checked for NaN and Inf
_MAX_TENSOR_ROWS = 2**31 - 1  # out_dim above this cannot be a torch size on every platform


class TrainingError(RuntimeError):
    """Training that cannot finish with a usable layer: the message names the cause and the fix."""


@dataclass
class LabelledEmbeddings:
    """Labelled images as rows of an embedding matrix.

    `features` may hold more rows than are used, in any order; `rows` picks the used
    ones in list order, and `labels`/`domains` follow that order.
    """

    features: np.ndarray  # (N, D) in the stored dtype
    rows: np.ndarray  # (M,) int64 row numbers into `features`
    labels: np.ndarray  # (M,) int64
    domains: np.ndarray  # (M,) int64

    @property
    def num_images(self) -> int:
        return int(self.rows.shape[0])

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    def subset(self, mask: np.ndarray) -> "LabelledEmbeddings":
        """Return the entries where `mask` (M,) is True, sharing the feature matrix."""
        return LabelledEmbeddings(self.features, self.rows[mask], self.labels[mask], self.domains[mask])


@dataclass
class EpochRecord:
    """Loss, learning rate, timing and validation metrics of one epoch; epoch 0 is before training."""

    epoch: int
    loss: float | None = None
    lr: float | None = None
    steps: int = 0
    seconds: float = 0.0
    steps_per_second: float | None = None
    val: dict | None = None
    val_seconds: float | None = None


@dataclass
class TrainResult:
    """Kept adapter weights with the per-epoch history and run details."""

    state_dict: dict[str, torch.Tensor]  # `layer.weight` (out, in) and `layer.bias` (out), on CPU
    history: list[EpochRecord]
    kept_epoch: int
    class_pairs: np.ndarray  # (C, 2) (domain, label) of each class, in first-appearance order
    device: str
    amp: str
    optimizer_impl: str
    train_seconds: float

    @property
    def num_classes(self) -> int:
        return int(self.class_pairs.shape[0])


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def class_index_first_appearance(labels: np.ndarray, domains: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Number each distinct (domain, label) pair in order of first appearance.

    Returns the class index of every entry (M,) and the (domain, label) pair of every class (C, 2).
    """
    pairs = np.stack([np.asarray(domains, np.int64), np.asarray(labels, np.int64)], axis=1)
    unique_pairs, first_position, inverse = np.unique(pairs, axis=0, return_index=True, return_inverse=True)
    order = np.argsort(first_position, kind="stable")  # sorted-pair number -> first-appearance rank
    rank_of_sorted = np.empty_like(order)
    rank_of_sorted[order] = np.arange(order.shape[0])
    return rank_of_sorted[inverse.reshape(-1)], unique_pairs[order]


def lr_at_step(step: int, total_steps: int, base_lr: float, schedule: str, warmup_steps: int) -> float:
    """Return the learning rate of optimisation step `step` (0-based).

    A linear warmup from base_lr / warmup_steps reaches base_lr after `warmup_steps` steps;
    then "constant" keeps base_lr and "cosine" decays it to 0 at `total_steps`.
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"learning rate schedule {schedule!r} is not one of {', '.join(LR_SCHEDULES)}")
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def resolve_amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """Return the autocast dtype for `amp` on `device`, or None for float32.

    Raises ValueError for fp16 on CPU, where it brings no speed-up and no loss scaling is set up.
    """
    if amp not in AMP_MODES:
        raise ValueError(f"amp mode {amp!r} is not one of {', '.join(AMP_MODES)}")
    if amp == "none":
        return None
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("fp16 autocast is supported on CUDA only; use bf16 on CPU")
    if amp == "bf16" and device.type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        _logger.warning("this CPU has no native bfloat16 support; bf16 matmuls will be slower than float32")
    return torch.bfloat16 if amp == "bf16" else torch.float16


def make_adam(params: list[torch.nn.Parameter], lr: float, weight_decay: float) -> tuple[torch.optim.Adam, str]:
    """Build Adam with the fused kernel where this torch build has one for the device, else foreach."""
    try:
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=True), "fused"
    except (RuntimeError, ValueError) as e:
        # The first fused Adam imports torch._dynamo (1.5 s on a 2-core machine). A signal handler that
        # raises meanwhile can come out wrapped in a RuntimeError, and the run must still stop.
        raise_wrapped_interrupt(e)
        _logger.info("fused Adam is not available here (%s); using the foreach implementation", e)
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, foreach=True), "foreach"


def _to_device_tensor(features: np.ndarray, device: torch.device) -> torch.Tensor:
    """Wrap the array without copying on CPU; copy it once, in its stored dtype, to a GPU."""
    tensor = torch.from_numpy(np.ascontiguousarray(features))
    return tensor.to(device) if device.type != "cpu" else tensor


@torch.no_grad()
def embed_rows(
    adapter: LinearAdapter | None, features: torch.Tensor, rows: np.ndarray, chunk_rows: int = _EMBED_CHUNK_ROWS
) -> np.ndarray:
    """Return L2-normalised float32 embeddings (M, D') of the given rows, adapted when `adapter` is set.

    The raw embeddings are normalised too, so they are compared by cosine like the adapted ones.
    The layer goes through `adapt_rows`, as in evaluate.py, so both get the same vectors.
    """
    device = features.device
    rows_t = torch.from_numpy(rows).to(device)
    chunks = []
    for start in range(0, rows_t.shape[0], chunk_rows):
        batch = features[rows_t[start : start + chunk_rows]].float()
        out = adapt_rows(adapter, batch) if adapter is not None else torch.nn.functional.normalize(batch, dim=-1)
        chunks.append(out.float().cpu().numpy())
    return np.concatenate(chunks, axis=0)


def evaluate_retrieval(
    adapter: LinearAdapter | None, data: LabelledEmbeddings, features: torch.Tensor, k: int
) -> dict:
    """Score retrieval where every image queries all other images of `data`.

    `features` is `data.features` as a tensor on the evaluation device. Returns
    labelled_set_metrics' result: mAP@k, recall@1 and mMP@5 in percent, per domain and
    averaged over domains.
    """
    was_training = adapter.training if adapter is not None else False
    if adapter is not None:
        adapter.eval()
    embeddings = embed_rows(adapter, features, data.rows)
    if adapter is not None:
        adapter.train(was_training)

    # a query ranks at most the other images, and mAP@k is the same for every k above that
    search_k = search_depth(k, data.num_images - 1)
    _, ranked = knn_search(embeddings, [embeddings], k=search_k, device=features.device, exclude_self=True)
    return labelled_set_metrics(ranked, data.labels, data.domains, k)


@torch.no_grad()
def imprint_class_means(
    classifier: CosineClassifier,
    adapter: LinearAdapter,
    features: torch.Tensor,
    rows: torch.Tensor,
    classes: torch.Tensor,
    chunk_rows: int = _EMBED_CHUNK_ROWS,
) -> None:
    """Point each class weight at the initial layer's output for the class's mean embedding, keeping the row norms.

    The layer is linear, so this is the direction of the mean of its (unnormalised) outputs
    over the class's images, found without passing every image through it. Only the
    directions change, so the learning rate acts on weights of the same size as with
    nn.Linear's initialisation. Every class must have at least one image.
    """
    num_classes = classifier.weight.shape[0]
    sums = torch.zeros(num_classes, features.shape[1], dtype=torch.float32, device=features.device)  # (C, in)
    for start in range(0, rows.shape[0], chunk_rows):
        batch = features[rows[start : start + chunk_rows]].float()
        sums.index_add_(0, classes[start : start + chunk_rows], batch)
    counts = torch.bincount(classes, minlength=num_classes).clamp_min(1).unsqueeze(1)
    directions = adapter.layer(sums / counts)  # (C, out)
    norms = classifier.weight.norm(dim=1, keepdim=True)
    classifier.weight.copy_(torch.nn.functional.normalize(directions, dim=1) * norms)


def describe_metrics(metrics: dict) -> str:
    """Format mAP@k and recall@1, averaged and per domain, for a log line."""
    per_domain = ", ".join(f"{d}: {m['map']:.2f}" for d, m in metrics["per_domain"].items())
    return (
        f"mAP@{metrics['k']} {metrics['map']:.2f}, recall@1 {metrics['recall@1']:.2f} "
        f"(mAP per domain {per_domain})"
    )


@dataclass
class _StepRunner:
    """Modules, optimizer and settings that every optimisation step uses."""

    adapter: LinearAdapter
    classifier: CosineClassifier
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    autocast_dtype: torch.dtype | None
    features: torch.Tensor  # (N, D) stored dtype, on the training device
    batch_size: int
    loss_type: str
    margin: float
    scale: float
    lr: float
    lr_schedule: str
    warmup_steps: int
    total_steps: int

    def run_epoch(self, epoch_rows: torch.Tensor, epoch_classes: torch.Tensor, first_step: int, num_steps: int,
                  bar: tqdm) -> tuple[float, float, int]:
        """Run up to `num_steps` steps over consecutive batches of the epoch order.

        Returns the mean loss, the last learning rate and the steps run. The epoch stops
        early when the running loss becomes NaN or Inf, checked every
        `_POSTFIX_EVERY_STEPS` steps, where the progress bar synchronises anyway.
        """
        device_type = self.features.device.type
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.features.device)
        current_lr = self.lr
        for i in range(num_steps):
            raise_if_signal_lost()
            batch_slice = slice(i * self.batch_size, (i + 1) * self.batch_size)
            batch = self.features[epoch_rows[batch_slice]].float()  # (B, D)
            targets = epoch_classes[batch_slice]  # (B,)

            current_lr = lr_at_step(first_step + i, self.total_steps, self.lr, self.lr_schedule, self.warmup_steps)
            for group in self.optimizer.param_groups:
                group["lr"] = current_lr

            with torch.autocast(device_type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
                embedded = self.adapter(batch)
                loss = cosine_margin_loss(
                    embedded, self.classifier.weight, targets, self.loss_type, self.margin, self.scale
                )

            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                loss.backward()
                self.optimizer.step()

            # summed on the device, so CUDA runs are not synchronised every step
            loss_sum += loss.detach()
            bar.update(1)
            if (i + 1) % _POSTFIX_EVERY_STEPS == 0:
                mean_loss = loss_sum.item() / (i + 1)
                bar.set_postfix(loss=f"{mean_loss:.4f}", refresh=False)
                if not math.isfinite(mean_loss):
                    return mean_loss, current_lr, i + 1
        return loss_sum.item() / num_steps, current_lr, num_steps


def _plan_steps(steps_per_epoch: int, num_epochs: int, max_steps: int | None, warmup_steps: int, lr: float
                ) -> tuple[int, int]:
    """Return the total steps and the epochs to run, warning about a --max_steps or warmup that cannot take effect."""
    epoch_steps = steps_per_epoch * num_epochs
    total_steps = epoch_steps
    if max_steps is not None:
        if max_steps < 1:
            raise ValueError(f"max_steps is {max_steps}; it must be at least 1")
        if max_steps > epoch_steps:
            _logger.warning(
                "--max_steps %d exceeds the %d steps of %d %s, so training stops after %d steps; "
                "raise --num_epochs to run more", max_steps, epoch_steps, num_epochs, _plural(num_epochs, "epoch"),
                epoch_steps,
            )
        total_steps = min(epoch_steps, max_steps)
        num_epochs = math.ceil(total_steps / steps_per_epoch)
    if warmup_steps >= total_steps:
        peak = lr * total_steps / warmup_steps
        _logger.warning(
            "--warmup_steps %d is not below the %d training steps, so warmup takes the whole run and the learning "
            "rate peaks at %g (--lr is %g) on the last step; lower --warmup_steps", warmup_steps, total_steps, peak, lr,
        )
    return total_steps, num_epochs


def describe_schedule(total_steps: int, num_epochs: int, steps_per_epoch: int) -> str:
    """Describe the steps to run, e.g. "5 epochs of 24 steps" or "30 steps (--max_steps): 1 epoch of 24 steps and 6 steps"."""
    epochs = f"{num_epochs} {_plural(num_epochs, 'epoch')} of {steps_per_epoch} steps"
    if total_steps == num_epochs * steps_per_epoch:
        return epochs
    full_epochs, last = divmod(total_steps, steps_per_epoch)
    if full_epochs == 0:
        return f"{total_steps} steps (--max_steps) of an epoch of {steps_per_epoch}"
    return (f"{total_steps} steps (--max_steps): {full_epochs} {_plural(full_epochs, 'epoch')} of {steps_per_epoch} "
            f"steps and {last} {_plural(last, 'step')}")


def _plural(count: int, noun: str) -> str:
    return noun if count == 1 else noun + "s"


def _build_models(in_dim: int, out_dim: int, num_classes: int, device: torch.device
                  ) -> tuple[LinearAdapter, CosineClassifier]:
    """Create the layer and the classifier on `device`; raise TrainingError naming the size when memory runs out."""
    # weights, gradients and Adam's two moments: four float32 values per parameter
    num_parameters = in_dim * out_dim + out_dim + num_classes * out_dim
    size = (
        f"the layer ({out_dim} x {in_dim}) and the classifier ({num_classes} classes x {out_dim}) need about "
        f"{16 * num_parameters / 2**30:.1f} GiB on {device} for weights, gradients and Adam state; "
        "lower --adaptation_layer_dim"
    )
    if out_dim > _MAX_TENSOR_ROWS:
        raise TrainingError(f"output dimension {out_dim} is too large: {size}")
    # NOTE: with Linux memory overcommit an allocation somewhat above free memory can succeed, and the
    # kernel then kills the process while the weights are initialised, before this message can be given.
    try:
        return LinearAdapter(in_dim, out_dim).to(device), CosineClassifier(out_dim, num_classes).to(device)
    except (RuntimeError, MemoryError) as e:
        # torch raises OutOfMemoryError on CUDA and a RuntimeError from its allocator on the CPU
        if not isinstance(e, (MemoryError, torch.OutOfMemoryError)) and "allocate" not in str(e):
            raise
        raise TrainingError(f"cannot allocate the model: {size}") from e


def _check_finite(epoch: int, loss: float, modules: tuple[torch.nn.Module, ...], lr: float) -> None:
    """Raise TrainingError when the epoch's loss or any weight is NaN or Inf."""
    weights_finite = all(bool(torch.isfinite(p).all()) for module in modules for p in module.parameters())
    if math.isfinite(loss) and weights_finite:
        return
    state = "" if weights_finite else " and the weights contain NaN or Inf"
    raise TrainingError(
        f"training diverged in epoch {epoch}: the mean loss is {loss:.4g}{state}, so no layer is saved; "
        f"lower --lr (now {lr:g})"
    )


def _check_training_set(train: LabelledEmbeddings, num_classes: int, batch_size: int) -> None:
    if train.num_images == 0:
        raise ValueError("the training set is empty")
    if num_classes < 2:
        raise ValueError(
            f"the training set has {num_classes} class; the classification loss needs at least 2 (domain, label) pairs"
        )
    if batch_size > train.num_images:
        raise ValueError(
            f"batch size {batch_size} exceeds the {train.num_images} training images, so an epoch has no full "
            "batch; lower --batch_size"
        )


def train_linear_adapter(
    train: LabelledEmbeddings,
    *,
    validation: LabelledEmbeddings | None = None,
    out_dim: int = 512,
    num_epochs: int = 5,
    batch_size: int = 128,
    lr: float = 1e-3,
    loss_type: str = "cosface",
    margin: float = 0.0,
    scale: float = 16.0,
    weight_decay: float = 1e-6,
    lr_schedule: str = "constant",
    warmup_steps: int = 0,
    seed: int = 0,
    device: str | torch.device = "cpu",
    amp: str = "none",
    val_k: int = 100,
    keep: str = "last",
    classifier_init: str = "random",
    max_steps: int | None = None,
    show_progress: bool = True,
    on_train_start: Callable[[], None] | None = None,
) -> TrainResult:
    """Train a LinearAdapter with a cosine classifier over the (domain, label) classes of `train`.

    Each epoch draws a random permutation of the training entries and takes full batches
    of `batch_size` in that order (the last partial batch is dropped). When `validation`
    is given, retrieval on it is scored before training (raw embeddings) and after every
    epoch. `keep="best"` returns the epoch with the highest validation mAP, else the last.
    `max_steps` is an upper bound: training ends after that many steps, within an epoch
    if need be, or after `num_epochs`, whichever comes first, and the learning rate
    schedule spans the steps run. `on_train_start` is called once just before the first
    step, after the model, the optimizer and the validation before training.

    Raises:
        ValueError: an empty or single-class training set, a batch larger than the set,
            a dimension mismatch with `validation`, or an unknown option value.
        TrainingError: the model does not fit in memory, or the loss or the weights
            became NaN or Inf (checked every 20 steps and after every epoch).
    """
    device = torch.device(device)
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss type {loss_type!r} is not one of {', '.join(LOSS_TYPES)}")
    if keep not in KEEP_MODES:
        raise ValueError(f"keep mode {keep!r} is not one of {', '.join(KEEP_MODES)}")
    if classifier_init not in CLASSIFIER_INITS:
        raise ValueError(f"classifier init {classifier_init!r} is not one of {', '.join(CLASSIFIER_INITS)}")
    if keep == "best" and validation is None:
        raise ValueError("keep='best' needs a validation set")
    if validation is not None and validation.dim != train.dim:
        raise ValueError(
            f"validation embeddings have dimension {validation.dim} but training embeddings {train.dim}; "
            "extract both with the same backbone"
        )
    amp_dtype = resolve_amp_dtype(amp, device)

    classes, class_pairs = class_index_first_appearance(train.labels, train.domains)
    num_classes = int(class_pairs.shape[0])
    _check_training_set(train, num_classes, batch_size)
    steps_per_epoch = train.num_images // batch_size
    total_steps, num_epochs = _plan_steps(steps_per_epoch, num_epochs, max_steps, warmup_steps, lr)

    # data on the device: stored dtype, no float32 copy of the whole matrix
    features_t = _to_device_tensor(train.features, device)
    rows_t = torch.from_numpy(train.rows).to(device)
    classes_t = torch.from_numpy(classes).to(device)
    val_features_t = None
    if validation is not None:
        same_matrix = validation.features is train.features
        val_features_t = features_t if same_matrix else _to_device_tensor(validation.features, device)

    # model, in the published recipe's creation order so the seed gives the same start
    torch.manual_seed(seed)
    adapter, classifier = _build_models(train.dim, out_dim, num_classes, device)
    init_seconds = 0.0
    if classifier_init == "class_mean":
        start = time.perf_counter()
        imprint_class_means(classifier, adapter, features_t, rows_t, classes_t)
        init_seconds = time.perf_counter() - start
    params = list(adapter.parameters()) + list(classifier.parameters())
    optimizer, optimizer_impl = make_adam(params, lr=lr, weight_decay=weight_decay)
    runner = _StepRunner(
        adapter=adapter,
        classifier=classifier,
        optimizer=optimizer,
        scaler=torch.amp.GradScaler(device.type) if amp == "fp16" else None,
        autocast_dtype=amp_dtype,
        features=features_t,
        batch_size=batch_size,
        loss_type=loss_type,
        margin=margin,
        scale=scale,
        lr=lr,
        lr_schedule=lr_schedule,
        warmup_steps=warmup_steps,
        total_steps=total_steps,
    )
    batch_generator = torch.Generator().manual_seed(seed)

    _logger.info(
        "training on %s: %d images, %d classes, %d -> %d, %s (batch %d), "
        "loss %s (scale %g, margin %g), Adam lr %g (%s, warmup %d steps), weight decay %g, amp %s, optimizer %s",
        device, train.num_images, num_classes, train.dim, out_dim,
        describe_schedule(total_steps, num_epochs, steps_per_epoch), batch_size,
        loss_type, scale, margin, lr, lr_schedule, warmup_steps, weight_decay, amp, optimizer_impl,
    )

    history = [EpochRecord(epoch=0)]
    if validation is not None:
        start = time.perf_counter()
        history[0].val = evaluate_retrieval(None, validation, val_features_t, val_k)
        history[0].val_seconds = time.perf_counter() - start
        _logger.info("held-out before training (raw embeddings): %s", describe_metrics(history[0].val))

    kept_state = None
    kept_epoch = num_epochs
    best_map = -math.inf
    step = 0
    train_seconds = init_seconds  # the class-mean pass is part of the training time

    if on_train_start is not None:
        on_train_start()
    for epoch in range(1, num_epochs + 1):
        epoch_steps = min(steps_per_epoch, total_steps - step)
        record = EpochRecord(epoch=epoch, steps=epoch_steps)
        adapter.train()
        classifier.train()
        start = time.perf_counter()

        perm = torch.randperm(train.num_images, generator=batch_generator).to(device)
        epoch_rows = rows_t[perm]  # (M,) HDF5 rows in this epoch's order
        epoch_classes = classes_t[perm]
        bar = tqdm(
            total=epoch_steps,
            desc=f"epoch {epoch}/{num_epochs}",
            unit="step",
            disable=None if show_progress else True,
            leave=False,
        )
        record.loss, record.lr, steps_run = runner.run_epoch(epoch_rows, epoch_classes, step, epoch_steps, bar)
        bar.close()
        _check_finite(epoch, record.loss, (adapter, classifier), lr)
        step += steps_run

        if device.type == "cuda":
            torch.cuda.synchronize(device)
        record.seconds = time.perf_counter() - start
        train_seconds += record.seconds
        record.steps_per_second = epoch_steps / record.seconds if record.seconds > 0 else None

        message = (
            f"epoch {epoch}/{num_epochs}: loss {record.loss:.4f}, {epoch_steps} steps in "
            f"{record.seconds:.2f} s ({record.steps_per_second or 0:.1f} steps/s), lr {record.lr:.3g}"
        )
        if validation is not None:
            start = time.perf_counter()
            record.val = evaluate_retrieval(adapter, validation, val_features_t, val_k)
            record.val_seconds = time.perf_counter() - start
            delta = record.val["map"] - history[0].val["map"]
            message += f"; held-out {describe_metrics(record.val)}, {delta:+.2f} mAP vs raw"
            if keep == "best" and record.val["map"] > best_map:
                best_map = record.val["map"]
                kept_epoch = epoch
                kept_state = {k: v.detach().cpu().clone() for k, v in adapter.state_dict().items()}
        _logger.info(message)
        history.append(record)

    if kept_state is None:
        kept_epoch = num_epochs
        kept_state = {k: v.detach().cpu().clone() for k, v in adapter.state_dict().items()}
    if keep == "best":
        _logger.info("keeping epoch %d, the best held-out mAP@%d (%.2f)", kept_epoch, val_k, best_map)
        if best_map < history[0].val["map"]:
            _logger.warning(
                "no epoch beat the raw embeddings on the held-out set (%.2f < %.2f mAP@%d)",
                best_map, history[0].val["map"], val_k,
            )

    return TrainResult(
        state_dict=kept_state,
        history=history,
        kept_epoch=kept_epoch,
        class_pairs=class_pairs,
        device=str(device),
        amp=amp,
        optimizer_impl=optimizer_impl,
        train_seconds=train_seconds,
    )
