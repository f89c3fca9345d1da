"""The recipe as data: `Recipe`, a frozen dataclass tree holding everything a run needs (backbone,
projection head, loss, MoCo / DINO / SwAV settings, optimiser with its parameter-group rules and
lr scaling, view sampling, epochs), and the view-weighting rules the recipes share.

Plain data, toolkit-free: every integration reads the same objects, so a preset means the same run
in lightly, Lightning and solo-learn. The named presets are in `light_moco` and `sslight`, the
registry in `registry`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Tuple

from smooth_infonce.options import SYMMETRIC, LossOptions
from smooth_infonce.schedule import SmoothingSchedule
from smooth_infonce.validation import check_choice

from .backbones import Backbone, build_backbone
from .multicrop import PairWeights, check_loss_weights, pair_weights

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

FRAMEWORKS = ("moco", "simclr", "dino", "swav")
SMOOTHING_MODES = ("neighbors", "uniform")
OPTIMIZERS = ("sgd", "lars", "adamw")
LR_SCHEDULES = ("cosine", "constant")
INTERPOLATIONS = ("bilinear", "bicubic")

# Chosen values for what the papers and their public code leave unknown; justified where they are used.
DEFAULT_SMOOTHING = 0.1
DEFAULT_NEIGHBORS = 10
LIGHT_MOCO_WARMUP_EPOCHS = 3  # the authors' `--warm`: lr warm-up and alpha = 0 together


def _pair(name: str, value: Any) -> Tuple[float, float]:
    pair = tuple(float(v) for v in value)  # YAML gives lists; keep the dataclasses hashable
    if len(pair) != 2:
        raise ValueError(f"{name} must have two values, got {value!r}")
    return pair


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _view_probs(name: str, value: Any) -> Tuple[float, float, float]:
    """A probability per view group: (first global view, other global views, local views); one
    float applies to every view."""
    probs = (float(value),) * 3 if isinstance(value, (int, float)) else tuple(float(v) for v in value)
    _check(len(probs) == 3 and all(0.0 <= p <= 1.0 for p in probs),
           f"{name} is one probability or (first global, other globals, locals), each in [0, 1]; got {value!r}")
    return probs


def cosine_ramp(progress: float, start: float, end: float) -> float:
    """Half a cosine from ``start`` (progress 0) to ``end`` (progress 1): the lr, weight-decay and
    teacher-momentum schedules of the recipes."""
    progress = min(1.0, max(0.0, progress))
    return end + (start - end) * (1 + math.cos(math.pi * progress)) / 2


@dataclass(frozen=True)
class BackboneSpec:
    """Which network encodes the images (see `smooth_infonce.integrations.recipes.backbones`).

    Attributes:
        name: a registered backbone name or ``"timm:<model>"``.
        cifar_stem: stride-1 first convolution for small images; None keeps the network's default.
        kwargs: extra constructor arguments (e.g. ``{"width": 16}`` for ``tiny_cnn``).
    """

    name: str = "mobilenetv3_large_100"
    cifar_stem: Optional[bool] = None
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def build(self) -> Backbone:
        """The backbone (random init, no download); ``.num_features`` is its real output width."""
        return build_backbone(self.name, cifar_stem=self.cifar_stem, **dict(self.kwargs))


@dataclass(frozen=True)
class HeadSpec:
    """Projection MLP: ``num_layers`` linear layers, BatchNorm if asked, non-linearities between.

    The input width is the backbone's measured ``num_features``. MoCo v2, light-moco and SSLight's
    MoCo use Linear(width, 2048) -> ReLU -> Linear(2048, 128) without BatchNorm. DINO's head is
    lightly's `DINOProjectionHead` (3 layers, GELU: ``output_dim`` is its bottleneck, L2-normalised
    before the weight-normalised last layer of `DINOSpec.num_prototypes` outputs); SwAV's is
    lightly's `SwaVProjectionHead` (2 layers, BN, ReLU) followed by the prototypes.
    """

    hidden_dim: int = 2048
    output_dim: int = 128
    num_layers: int = 2
    batch_norm: bool = False

    def __post_init__(self) -> None:
        _check(self.hidden_dim >= 1 and self.output_dim >= 1, f"head widths must be >= 1, got {self}")
        _check(self.num_layers >= 1, f"num_layers must be >= 1, got {self.num_layers}")


@dataclass(frozen=True)
class LossSpec:
    """Smoothed InfoNCE settings of a recipe; `to_options` gives the core's `LossOptions`, which
    validates the values (the loss is defined in the docs/loss.md).

    Attributes:
        temperature: tau.
        smoothing: alpha, the target mass moved from the positive to the negatives (0: InfoNCE).
        mode: ``"neighbors"`` (the ``neighbors`` most similar negatives of each row get alpha;
            the authors' default strategy) or ``"uniform"`` (all negatives share alpha).
        neighbors: k for the neighbours mode.
        schedule: alpha per epoch: ``"constant"``, ``"warmup"`` (0 for ``warmup_epochs``) or
            ``"cosine"`` (ramp from 0 to alpha over the run), as in the authors' code.
        warmup_epochs: epochs at alpha = 0 before the schedule starts.
        wait_for_full_bank: MoCo: hold alpha at 0 until the queue has been filled once with real
            keys (after a start or a resume without a saved queue, neighbours in a random queue
            are meaningless).
    """

    temperature: float = 0.2
    smoothing: float = 0.0
    mode: str = "neighbors"
    neighbors: int = DEFAULT_NEIGHBORS
    schedule: str = "constant"
    warmup_epochs: int = 0
    wait_for_full_bank: bool = True

    def __post_init__(self) -> None:
        check_choice("mode", self.mode, SMOOTHING_MODES)
        # The core checks the values (neighbors also in the uniform mode, where it is unused).
        LossOptions(temperature=self.temperature, smoothing=self.smoothing, neighbors=self.neighbors)
        _check(self.neighbors is not None, "neighbors must be an int >= 1 (mode='uniform' ignores it)")
        self.smoothing_schedule(epochs=1)

    @property
    def neighbors_or_none(self) -> Optional[int]:
        """The ``neighbors`` argument of the loss: None means uniform smoothing."""
        return None if self.mode == "uniform" else self.neighbors

    def smoothing_schedule(self, epochs: int) -> SmoothingSchedule:
        """alpha per epoch for a run of ``epochs`` epochs (the cosine ramp spans the whole run)."""
        ramp = max(1, epochs - self.warmup_epochs) if self.schedule == "cosine" else None
        return SmoothingSchedule(self.smoothing, self.schedule, warmup_epochs=self.warmup_epochs, epochs=ramp)

    def to_options(self, epochs: int, **fields: Any) -> LossOptions:
        """The core's `LossOptions` for a run of ``epochs`` epochs (alpha scheduled per epoch; its
        ``initial_smoothing`` is the schedule's epoch-0 value). ``fields``: the options a recipe
        does not hold (``backend``, ``deterministic``, ``allow_tf32``, ``normalize``,
        ``reduction``, ``few_negatives``)."""
        return LossOptions(temperature=self.temperature, neighbors=self.neighbors_or_none,
                           schedule=self.smoothing_schedule(epochs), **fields)


@dataclass(frozen=True)
class MoCoSpec:
    """MoCo's key encoder and queue.

    Attributes:
        queue_size: K, negatives kept in the queue (memory bank).
        key_momentum: EMA factor of the key encoder (constant over the run).
        shuffle_bn: shuffle the key batch across GPUs before the key encoder (no effect on one
            device, where batch-norm statistics do not depend on the order).
        symmetric: None: the key is global view 1 and every other view queries it (MoCo v2,
            SSLight); ``"sum"`` or ``"mean"``: light-moco's symmetric loss on the two global views,
            each view's query against the other's key, both against the queue as it was before the
            step, the two directions summed (the authors' code) or averaged, both keys enqueued.
    """

    queue_size: int = 65536
    key_momentum: float = 0.999
    shuffle_bn: bool = True
    symmetric: Optional[str] = None

    def __post_init__(self) -> None:
        _check(self.queue_size >= 1, f"queue_size must be >= 1, got {self.queue_size}")
        _check(0.0 <= self.key_momentum <= 1.0, f"key_momentum must be in [0, 1], got {self.key_momentum}")
        check_choice("symmetric", self.symmetric, SYMMETRIC)


@dataclass(frozen=True)
class DINOSpec:
    """DINO's teacher and targets (the SSLight authors' values for CNNs; ViT-Tiny: see the presets).

    Attributes:
        num_prototypes: outputs of the head's weight-normalised last layer.
        norm_last_layer: keep its weight-norm gain fixed at 1 (CNNs); False lets it learn (ViT).
        student_temperature: tau_s of the student's log-softmax.
        teacher_temperature, warmup_teacher_temperature, warmup_teacher_temperature_epochs: tau_t
            rises linearly per epoch from the warm-up value to ``teacher_temperature`` over the
            warm-up epochs, then stays (DINO's schedule; lightly's and solo-learn's DINO losses
            compute the same).
        center_momentum: EMA of the centre (the batch mean of the teacher's outputs over every
            process), updated after the loss.
        teacher_momentum, teacher_momentum_end: the teacher's EMA factor, a per-iteration cosine
            from ``teacher_momentum`` to ``teacher_momentum_end`` over the run.
        freeze_last_layer_epochs: the last layer gets no update during these first epochs.
    """

    num_prototypes: int = 4096
    norm_last_layer: bool = True
    student_temperature: float = 0.1
    teacher_temperature: float = 0.07
    warmup_teacher_temperature: float = 0.04
    warmup_teacher_temperature_epochs: int = 50
    center_momentum: float = 0.9
    teacher_momentum: float = 0.996
    teacher_momentum_end: float = 1.0
    freeze_last_layer_epochs: int = 1

    def __post_init__(self) -> None:
        _check(self.num_prototypes >= 1, f"num_prototypes must be >= 1, got {self.num_prototypes}")
        for name in ("student_temperature", "teacher_temperature", "warmup_teacher_temperature"):
            _check(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("center_momentum", "teacher_momentum", "teacher_momentum_end"):
            _check(0.0 <= getattr(self, name) <= 1.0, f"{name} must be in [0, 1], got {getattr(self, name)}")
        _check(self.warmup_teacher_temperature_epochs >= 0 and self.freeze_last_layer_epochs >= 0,
               f"epoch counts must be >= 0, got {self}")

    def teacher_temperature_at(self, epoch: int) -> float:
        """tau_t in ``epoch`` (0-based): ``linspace(warm-up, final, warm-up epochs)[epoch]``, then final."""
        steps = self.warmup_teacher_temperature_epochs
        if epoch >= steps:
            return self.teacher_temperature
        if steps == 1:
            return self.warmup_teacher_temperature
        start, end = self.warmup_teacher_temperature, self.teacher_temperature
        return start + (end - start) * epoch / (steps - 1)

    def teacher_momentum_at(self, step: int, total_steps: int) -> float:
        """The teacher's EMA factor at iteration ``step`` of ``total_steps``."""
        return cosine_ramp(step / max(1, total_steps), self.teacher_momentum, self.teacher_momentum_end)


@dataclass(frozen=True)
class SwAVSpec:
    """SwAV's prototypes, codes and queue (the SSLight authors' values).

    Attributes:
        num_prototypes: prototype vectors (L2-normalised every step).
        temperature: of the softmax over prototype scores that predicts the codes.
        sinkhorn_iterations, sinkhorn_epsilon: Sinkhorn-Knopp on the global views' scores, over
            every process's batch.
        queue_size: nominal queue length over all processes; a run uses it trimmed to a multiple
            of its global batch (`queue_length`), split evenly over the processes, one queue per
            global view.
        queue_start_epoch: from this epoch on, the queue's scores join the Sinkhorn input.
        freeze_prototypes_epochs: the prototypes get no update during these first epochs.
    """

    num_prototypes: int = 3000
    temperature: float = 0.1
    sinkhorn_iterations: int = 3
    sinkhorn_epsilon: float = 0.05
    queue_size: int = 3840
    queue_start_epoch: int = 15
    freeze_prototypes_epochs: int = 1

    def __post_init__(self) -> None:
        _check(self.num_prototypes >= 1 and self.sinkhorn_iterations >= 1,
               f"num_prototypes and sinkhorn_iterations must be >= 1, got {self}")
        _check(self.temperature > 0 and self.sinkhorn_epsilon > 0,
               f"temperature and sinkhorn_epsilon must be > 0, got {self}")
        _check(self.queue_size >= 0 and self.queue_start_epoch >= 0 and self.freeze_prototypes_epochs >= 0,
               f"queue_size and the epoch counts must be >= 0, got {self}")

    def queue_length(self, global_batch: int) -> int:
        """The queue a run of ``global_batch`` images per step uses (SwAV's code: the nominal size
        minus its remainder modulo the global batch; 3840 -> 3072 at 1024)."""
        return self.queue_size - self.queue_size % global_batch


@dataclass(frozen=True)
class OptimizerSpec:
    """Optimiser, lr scaling and parameter-group rules.

    Learning rates are given per 256 images and scaled linearly with the total batch:
    ``lr = lr_per_256 * batch_size / 256`` (the same for ``min_lr_per_256`` and
    ``warmup_start_lr_per_256``). The schedule is per iteration: linear warm-up over
    ``warmup_epochs`` from the start lr at the first step to the peak at the last warm-up step (the
    ``np.linspace`` of DINO's and SwAV's code and solo-learn's scheduler), then cosine from lr to
    min_lr.

    Attributes:
        name: ``"sgd"`` (with momentum), ``"lars"`` (SGD with layer-wise trust ratio) or
            ``"adamw"`` (betas (0.9, 0.999), as DINO's ViTs).
        weight_decay_end: None: constant weight decay; else a per-iteration cosine from
            ``weight_decay`` to this value over the whole run (DINO's ViT: 0.04 -> 0.4), applied to
            the groups that decay.
        warmup_start_lr_per_256: the learning rate the warm-up starts from (SwAV's ``start_warmup``).
        exclude_bias_norm: no weight decay, and no LARS adaptation, on 1-D parameters (biases,
            norm scales and shifts).
        exclude_depthwise: no weight decay on depthwise convolution kernels (shape [C, 1, k, k]);
            LARS adaptation still applies to them.
        trust_coefficient: LARS eta.
    """

    name: str = "sgd"
    lr_per_256: float = 0.03
    min_lr_per_256: float = 0.0
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_epochs: int = 0
    lr_schedule: str = "cosine"
    exclude_bias_norm: bool = False
    exclude_depthwise: bool = False
    trust_coefficient: float = 1e-3
    weight_decay_end: Optional[float] = None
    warmup_start_lr_per_256: float = 0.0

    def __post_init__(self) -> None:
        _check(self.name in OPTIMIZERS, f"optimizer name must be one of {OPTIMIZERS}, got {self.name!r}")
        _check(self.weight_decay_end is None or self.weight_decay_end >= 0,
               f"weight_decay_end must be None or >= 0, got {self.weight_decay_end}")
        _check(self.warmup_start_lr_per_256 >= 0, f"warmup_start_lr_per_256 must be >= 0, got {self}")
        _check(self.lr_schedule in LR_SCHEDULES, f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        _check(self.lr_per_256 > 0 and self.min_lr_per_256 >= 0, f"learning rates must be positive, got {self}")
        _check(self.weight_decay >= 0 and self.momentum >= 0, f"weight_decay and momentum must be >= 0, got {self}")
        _check(self.warmup_epochs >= 0, f"warmup_epochs must be >= 0, got {self.warmup_epochs}")

    def scaled_lr(self, batch_size: int) -> float:
        """Peak learning rate for a total batch of ``batch_size`` images."""
        return round(self.lr_per_256 * batch_size / 256, 12)

    def learning_rate(self, step: int, *, steps_per_epoch: int, epochs: int, batch_size: int) -> float:
        """Learning rate at iteration ``step`` (0-based) of a run of ``epochs`` epochs."""
        peak = self.scaled_lr(batch_size)
        floor = self.min_lr_per_256 * batch_size / 256
        start = self.warmup_start_lr_per_256 * batch_size / 256
        warmup = self.warmup_epochs * steps_per_epoch
        if step < warmup:  # np.linspace(start, peak, warm-up steps), as DINO's, SwAV's and solo-learn's schedulers
            return start + (peak - start) * step / max(1, warmup - 1)
        if self.lr_schedule == "constant":
            return peak
        total = max(1, epochs * steps_per_epoch - warmup)
        return cosine_ramp((step - warmup) / total, peak, floor)

    def weight_decay_at(self, step: int, *, steps_per_epoch: int, epochs: int) -> float:
        """Weight decay of the decaying groups at iteration ``step`` (constant unless
        ``weight_decay_end`` is set)."""
        if self.weight_decay_end is None:
            return self.weight_decay
        return cosine_ramp(step / max(1, epochs * steps_per_epoch), self.weight_decay, self.weight_decay_end)


@dataclass(frozen=True)
class CropSpec:
    """``count`` random resized crops of ``size`` px covering ``scale`` of the image area."""

    count: int
    size: int
    scale: Tuple[float, float]

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", _pair("scale", self.scale))
        _check(self.count >= 0 and self.size >= 1, f"crop count must be >= 0 and size >= 1, got {self}")
        _check(0 < self.scale[0] <= self.scale[1] <= 1, f"crop scale must satisfy 0 < lo <= hi <= 1, got {self.scale}")


@dataclass(frozen=True)
class ViewSpec:
    """View sampling and augmentation.

    Views come out in the order: the global crops, then the local crops. In MoCo the first global
    view feeds the key encoder and every other view is a query (SSLight); with two global views and
    no locals that is plain MoCo v2.

    Attributes:
        global_crops, local_crops: the two crop groups (``local_crops=None``: none).
        loss_weights: (global, local) total loss weights of the query views. The global weight is
            shared by the global query views, the local weight by the local ones (SSLight:
            (0.4, 0.6): 0.4 for global view 2, 0.1 for each of 6 locals). None: every query
            view weighs the same (a plain mean).
        interpolation: of the random resized crop (SSLight: bicubic).
        hflip_prob, color_jitter (brightness, contrast, saturation, hue), color_jitter_prob,
            grayscale_prob, blur_sigmas: the same for every view (defaults: MoCo v2's).
        blur_prob, solarize_prob: Gaussian blur (sigma in ``blur_sigmas``) and solarisation
            (threshold 128), each one probability for every view or a triple (first global view,
            other global views, local views). MoCo v2: blur 0.5 everywhere, no solarisation. The
            SSLight authors' MoCo and DINO (BYOL's asymmetric views): blur (1.0, 0.1, 0.5),
            solarisation (0, 0.2, 0).
        mean, std: normalisation.
    """

    global_crops: CropSpec = CropSpec(2, 224, (0.2, 1.0))
    local_crops: Optional[CropSpec] = None
    loss_weights: Optional[Tuple[float, float]] = None
    interpolation: str = "bilinear"
    hflip_prob: float = 0.5
    color_jitter: Tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    color_jitter_prob: float = 0.8
    grayscale_prob: float = 0.2
    blur_prob: Tuple[float, float, float] = (0.5, 0.5, 0.5)
    blur_sigmas: Tuple[float, float] = (0.1, 2.0)
    solarize_prob: Tuple[float, float, float] = (0.0, 0.0, 0.0)
    mean: Tuple[float, float, float] = IMAGENET_MEAN
    std: Tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        for name in ("global_crops", "local_crops"):  # dicts from YAML / overrides
            value = getattr(self, name)
            if isinstance(value, Mapping):
                object.__setattr__(self, name, CropSpec(**value))
        if self.loss_weights is not None:
            object.__setattr__(self, "loss_weights", _pair("loss_weights", self.loss_weights))
        object.__setattr__(self, "blur_sigmas", _pair("blur_sigmas", self.blur_sigmas))
        object.__setattr__(self, "blur_prob", _view_probs("blur_prob", self.blur_prob))
        object.__setattr__(self, "solarize_prob", _view_probs("solarize_prob", self.solarize_prob))
        object.__setattr__(self, "color_jitter", tuple(float(v) for v in self.color_jitter))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        _check(self.global_crops.count >= 2, f"need at least 2 global crops, got {self.global_crops.count}")
        check_choice("interpolation", self.interpolation, INTERPOLATIONS)
        _check(len(self.color_jitter) == 4,
               f"color_jitter is (brightness, contrast, saturation, hue), got {self.color_jitter}")

    @property
    def num_local(self) -> int:
        return 0 if self.local_crops is None else self.local_crops.count

    @property
    def num_views(self) -> int:
        return self.global_crops.count + self.num_local

    def crop_groups(self) -> Tuple[CropSpec, ...]:
        """The crop groups that make views: the global crops, then the local ones if any."""
        return (self.global_crops,) + ((self.local_crops,) if self.num_local else ())

    def view_probs(self, probs: Tuple[float, float, float]) -> Tuple[float, ...]:
        """``probs`` (first global, other globals, locals; e.g. ``blur_prob``) per view, in view
        order."""
        first, other, local = probs
        return (first,) + (other,) * (self.global_crops.count - 1) + (local,) * self.num_local

    def query_weights(self) -> Tuple[float, ...]:
        """MoCo loss weight of each query view (every view but the first global one), in view
        order; they sum to 1. See `query_view_weights`."""
        return query_view_weights(self.global_crops.count, self.num_local, self.loss_weights)


def query_view_weights(num_global: int, num_local: int,
                       loss_weights: Optional[Tuple[float, float]]) -> Tuple[float, ...]:
    """MoCo loss weight of each query view: the ``num_global - 1`` global queries (global view 1
    is the key), then the ``num_local`` local ones; they sum to 1.

    ``loss_weights = (global, local)``: the global total is shared by the global queries, the
    local total by the locals (SSLight: (0.4, 0.6) with 6 locals gives 0.4, then 0.1 each). None,
    or no local views: every query view weighs the same (a plain mean).
    """
    num_global_queries = num_global - 1
    _check(num_global_queries >= 1 and num_local >= 0,
           f"need >= 2 global and >= 0 local views, got {num_global}, {num_local}")
    if loss_weights is None or num_local == 0:
        count = num_global_queries + num_local
        return (1.0 / count,) * count
    global_weight, local_weight = check_loss_weights(loss_weights)
    total = global_weight + local_weight
    return ((global_weight / total / num_global_queries,) * num_global_queries
            + (local_weight / total / num_local,) * num_local)


def view_loss_weights(framework: str, num_global: int, num_local: int,
                      loss_weights: Optional[Tuple[float, float]]) -> Optional[Tuple[float, ...]]:
    """Per-view weights to pass to the loss (``weights=``), or None when every view weighs the
    same (no ``loss_weights`` or no local views).

    - ``"moco"``: one weight per query view (`query_view_weights`).
    - ``"simclr"``: one weight per view in call order; the first global view, an anchor too in the
      in-batch layout, weighs as a global query view.
    """
    _check(framework in ("moco", "simclr"), f"per-view weights are for moco and simclr, not {framework!r} "
                                            "(dino and swav weigh pairs: `multicrop.pair_weights`)")
    if loss_weights is None or num_local == 0:
        return None
    weights = query_view_weights(num_global, num_local, loss_weights)
    return weights if framework == "moco" else (weights[0],) + weights


@dataclass(frozen=True)
class Recipe:
    """A complete pre-training recipe. Build pieces with ``recipe.backbone.build()``,
    ``recipe.loss.smoothing_schedule(recipe.epochs)``, `smooth_infonce.integrations.recipes.optim`
    (optimiser) and the toolkit integrations (models, transforms, losses).

    Attributes:
        framework: ``"moco"`` (key encoder + queue) or ``"simclr"`` (in-batch negatives), both with
            the smoothed InfoNCE of ``loss``; ``"dino"`` (``dino``) or ``"swav"`` (``swav``), with
            SSLight's pair-weighted multi-crop loss (`smooth_infonce.integrations.recipes.multicrop`;
            ``views.loss_weights`` are its (lambda_gg, lambda_gl)).
        batch_size: the recipe's total batch (learning rates scale from it per 256 images).
    """

    name: str
    framework: str = "moco"
    backbone: BackboneSpec = BackboneSpec()
    head: HeadSpec = HeadSpec()
    loss: LossSpec = LossSpec()
    moco: MoCoSpec = MoCoSpec()
    dino: DINOSpec = DINOSpec()
    swav: SwAVSpec = SwAVSpec()
    optimizer: OptimizerSpec = OptimizerSpec()
    views: ViewSpec = ViewSpec()
    epochs: int = 200
    batch_size: int = 256
    description: str = ""

    def __post_init__(self) -> None:
        _check(self.framework in FRAMEWORKS, f"framework must be one of {FRAMEWORKS}, got {self.framework!r}")
        _check(self.epochs >= 1 and self.batch_size >= 1,
               f"epochs and batch_size must be >= 1, got {self.epochs}, {self.batch_size}")
        if self.framework == "moco" and self.moco.symmetric is not None:
            _check(self.views.num_views == 2, "moco.symmetric needs exactly two views (two global crops, no "
                                              f"local crops), got {self.views.num_views}")
        # lightly's heads fix these: DINOProjectionHead is 3 layers, SwaVProjectionHead 2 with BN
        if self.framework == "dino":
            _check(self.head.num_layers == 3, f"DINO's head has 3 layers, got head.num_layers={self.head.num_layers}")
        if self.framework == "swav":
            _check(self.head.num_layers == 2 and self.head.batch_norm,
                   f"SwAV's head is Linear -> BN -> ReLU -> Linear, got {self.head}")
        if self.framework in ("dino", "swav"):
            _check(self.views.global_crops.count == 2,
                   f"{self.framework} takes targets from exactly 2 global crops, got {self.views.global_crops.count}")

    def view_weights(self) -> Optional[Tuple[float, ...]]:
        """The ``weights=`` argument of the smoothed InfoNCE loss for this recipe's views (see
        `view_loss_weights`); None for dino and swav, whose pairs are weighed by `pair_weights`."""
        if self.framework in ("dino", "swav"):
            return None
        return view_loss_weights(self.framework, self.views.global_crops.count, self.views.num_local,
                                 self.views.loss_weights)

    def pair_weights(self) -> PairWeights:
        """DINO / SwAV: the weight of each (global target, view) pair (`multicrop.pair_weights`)."""
        _check(self.framework in ("dino", "swav"), f"pair weights are for dino and swav, not {self.framework!r}")
        return pair_weights(self.views.global_crops.count, self.views.num_local, self.views.loss_weights)

    def override(self, **overrides: Any) -> "Recipe":
        """A copy with fields replaced; nested fields as ``section__field`` or a dict per section."""
        return _apply_overrides(self, overrides)

    def to_dict(self) -> Dict[str, Any]:
        """Plain nested dict (for logging, JSON and YAML)."""
        return dataclasses.asdict(self)


def _apply_overrides(obj: Any, overrides: Mapping[str, Any]) -> Any:
    names = {f.name for f in dataclasses.fields(obj)}
    direct: Dict[str, Any] = {}
    nested: Dict[str, Dict[str, Any]] = {}
    for key, value in overrides.items():
        head, _, rest = key.partition("__")
        if head not in names:
            raise ValueError(f"{type(obj).__name__} has no field {head!r} (fields: {sorted(names)})")
        current = getattr(obj, head)
        if rest:
            nested.setdefault(head, {})[rest] = value
        elif dataclasses.is_dataclass(current) and isinstance(value, Mapping):
            nested.setdefault(head, {}).update(value)
        else:
            direct[head] = value
    for head, sub in nested.items():
        current = direct.get(head, getattr(obj, head))
        if not dataclasses.is_dataclass(current):
            raise ValueError(f"{type(obj).__name__}.{head} is {current!r}, not a section: set it whole "
                             f"(e.g. {head}=dict(...)) instead of its fields {sorted(sub)}")
        direct[head] = _apply_overrides(current, sub)
    return dataclasses.replace(obj, **direct)
