"""lightly integration: a drop-in for `lightly.loss.NTXentLoss`, and lightly models, heads and
transforms built from the recipes.

Swap one line and existing lightly code runs unchanged::

    # criterion = NTXentLoss(temperature=0.2, memory_bank_size=(4096, 128))
    criterion = SmoothNTXentLoss(temperature=0.2, memory_bank_size=(4096, 128), smoothing=0.1, neighbors=5)

The loss is computed by the core op `smooth_infonce.smooth_infonce` (the fused Triton kernel on
CUDA, the exact reference op elsewhere). Imports in this module are absolute: ``import lightly``
is the real lightly package, not this file.
"""

from __future__ import annotations

import copy
from typing import List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightly.loss import NTXentLoss
from lightly.models.modules import MoCoProjectionHead, SimCLRProjectionHead
from lightly.models.utils import (
    batch_shuffle_distributed,
    batch_unshuffle_distributed,
    deactivate_requires_grad,
    update_momentum,
)
from lightly.transforms.gaussian_blur import GaussianBlur
from lightly.transforms.multi_view_transform import MultiViewTransform
from lightly.transforms.torchvision_v2_compatibility import torchvision_transforms as T
from lightly.utils import dist as lightly_dist

from smooth_infonce.loss import check_views, multi_view_loss
from smooth_infonce.schedule import SmoothingSchedule
from smooth_infonce.validation import (
    BACKENDS,
    check_choice,
    check_neighbors,
    check_smoothing,
    check_temperature,
)

from .backbones import Backbone
from .recipes import CropSpec, Recipe, ViewSpec

ViewWeights = Union[None, Sequence[float], Tensor]


class SmoothNTXentLoss(NTXentLoss):
    """Smoothed InfoNCE as a drop-in subclass of lightly's `NTXentLoss`.

    Same constructor arguments and call as `NTXentLoss` (``isinstance(loss, NTXentLoss)`` holds),
    plus the smoothing. At ``smoothing=0`` it returns what `NTXentLoss` returns, in both modes:

    - in-batch (``memory_bank_size=0``, SimCLR): every other embedding of the batch is a
      negative, mean over the 2B rows;
    - memory bank (``memory_bank_size=(K, dim)``, MoCo): ``out0`` are the queries, ``out1`` the
      keys; logits ``[positive | K bank entries]``, positive at column 0, the bank read before it
      is updated with the (normalised) keys. As in lightly, the bank is only updated when
      ``out0.requires_grad`` (not under ``torch.no_grad()``, not for evaluation).

    With smoothing alpha, each row's target keeps 1 - alpha on its positive and spreads alpha over
    its ``neighbors`` most similar negatives (``neighbors=None``: over all negatives).

    Multi-view: ``loss(out0, out1, out2, ..., weights=...)``. In-batch, every view of an image is
    a positive of every other view (multi-crop). With a memory bank, ``out1`` is the key (global
    view 1, enqueued alone) and ``out0, out2, ...`` are queries that share it as positive and the
    bank as negatives (SSLight's MoCo). ``weights`` gives one float per anchor view (in-batch: per
    view in call order; bank: per query view, ``out0`` first), or one weight per row; the loss is
    the weighted mean of the row losses.

    Beyond lightly:

    - ``persistent_bank=True`` stores the bank, its pointer and its "filled" flag in the
      ``state_dict``, so a resumed run continues with its queue instead of a random one (off by
      default: state dicts then load into plain lightly models and back).
    - ``wait_for_full_bank=True`` holds alpha at 0 until every bank entry has been written once
      (the random initial bank has meaningless neighbours; a resume without a saved bank starts
      over).
    - ``schedule``: a `SmoothingSchedule`; call ``set_epoch(epoch)`` each epoch.

    Args:
        temperature: tau > 0.
        memory_bank_size: 0 (in-batch) or (K, dim), as in lightly.
        gather_distributed: in-batch: negatives from all ranks; bank: keys of all ranks enqueued.
        smoothing: alpha in [0, 1).
        neighbors: None (uniform smoothing over the negatives) or k >= 1.
        schedule: optional `SmoothingSchedule`.
        persistent_bank: keep the bank in the state_dict.
        wait_for_full_bank: alpha = 0 until the bank has been filled once.
        backend: "auto", "reference" or "triton" (see `smooth_infonce.smooth_infonce`).
        validate: value checks that synchronise with the device.

    Example:
        >>> import torch
        >>> from lightly.loss import NTXentLoss
        >>> from smooth_infonce.integrations.lightly import SmoothNTXentLoss
        >>> criterion = SmoothNTXentLoss(temperature=0.2, smoothing=0.1, neighbors=5)
        >>> isinstance(criterion, NTXentLoss)
        True
        >>> out0, out1 = torch.randn(16, 32, requires_grad=True), torch.randn(16, 32)
        >>> loss = criterion(out0, out1)                     # SimCLR
        >>> moco = SmoothNTXentLoss(0.2, memory_bank_size=(256, 32), smoothing=0.1, neighbors=5,
        ...                         persistent_bank=True)
        >>> loss = moco(out0, out1)                          # MoCo: out1 = keys, then enqueued
        >>> locals_ = [torch.randn(16, 32, requires_grad=True) for _ in range(2)]
        >>> loss = moco(out0, out1, *locals_, weights=(0.4, 0.3, 0.3))   # SSLight multi-query
        >>> sorted(k for k in moco.state_dict())
        ['bank_filled', 'memory_bank.bank', 'memory_bank.bank_ptr']
    """

    def __init__(
        self,
        temperature: float = 0.5,
        memory_bank_size: Union[int, Sequence[int]] = 0,
        gather_distributed: bool = False,
        smoothing: float = 0.0,
        neighbors: Optional[int] = None,
        *,
        schedule: Optional[SmoothingSchedule] = None,
        persistent_bank: bool = False,
        wait_for_full_bank: bool = True,
        backend: str = "auto",
        validate: bool = True,
    ) -> None:
        super().__init__(temperature=temperature, memory_bank_size=memory_bank_size,
                         gather_distributed=gather_distributed)
        check_temperature(temperature)  # lightly accepts negative temperatures; the op does not
        self.smoothing = check_smoothing(smoothing)
        self.neighbors = check_neighbors(neighbors)
        if schedule is not None and not isinstance(schedule, SmoothingSchedule):
            raise TypeError(f"schedule must be a SmoothingSchedule or None, got {type(schedule).__name__}")
        self.schedule = schedule
        self.wait_for_full_bank = wait_for_full_bank
        self.backend = check_choice("backend", backend, BACKENDS)
        self.validate = validate
        self.persistent_bank = persistent_bank and self.has_memory_bank
        if self.persistent_bank:
            # Re-registering an existing buffer only changes whether it is saved.
            self.memory_bank.register_buffer("bank", self.memory_bank.bank, persistent=True)
            self.memory_bank.register_buffer("bank_ptr", self.memory_bank.bank_ptr, persistent=True)
        # Saved exactly when the bank is: a bank restored from a checkpoint keeps its flag, a
        # fresh random bank starts unfilled.
        self.register_buffer("bank_filled", torch.zeros((), dtype=torch.bool), persistent=self.persistent_bank)

    @property
    def has_memory_bank(self) -> bool:
        return self.memory_bank.size[0] > 0

    def set_epoch(self, epoch: int) -> float:
        """Set ``smoothing`` from the schedule for this epoch and return it."""
        if self.schedule is None:
            raise RuntimeError("set_epoch needs a schedule: SmoothNTXentLoss(..., schedule=SmoothingSchedule(...))")
        self.smoothing = self.schedule(epoch)
        return self.smoothing

    @property
    def effective_smoothing(self) -> float:
        """The alpha the next call uses: 0 while a bank that was never filled is waited for."""
        if self.has_memory_bank and self.wait_for_full_bank and not bool(self.bank_filled):
            return 0.0
        return check_smoothing(self.smoothing)

    def forward(self, out0: Tensor, out1: Tensor, *more_views: Tensor, weights: ViewWeights = None) -> Tensor:
        views = (out0, out1, *more_views)
        check_views(views)  # before the bank sees the keys
        options = dict(temperature=check_temperature(self.temperature), smoothing=self.effective_smoothing,
                       neighbors=self.neighbors, backend=self.backend)
        if not self.has_memory_bank:
            return multi_view_loss(views, weights=weights, gather_distributed=self.gather_distributed,
                                   validate=self.validate, **options)
        # The bank stores unit keys, like lightly's; it is read (cloned) before the enqueue.
        keys = F.normalize(out1, dim=1)
        update = out0.requires_grad
        keys, bank = self.memory_bank(keys, update=update)
        if update:  # lightly resets the pointer to 0 exactly when a write reaches the bank's end
            self.bank_filled |= self.memory_bank.bank_ptr[0] == 0
        if self.memory_bank.feature_dim_first:
            bank = bank.t()
        return multi_view_loss((out0, keys, *more_views), queue=bank.to(device=out0.device, dtype=out0.dtype),
                               weights=weights, validate=self.validate, **options)

    def extra_repr(self) -> str:
        bank = f", memory_bank_size={tuple(self.memory_bank.size)}" if self.has_memory_bank else ""
        return (f"temperature={self.temperature}, smoothing={self.smoothing}, neighbors={self.neighbors}"
                f"{bank}, persistent_bank={self.persistent_bank}")


# --- recipes -> lightly ---------------------------------------------------------------------------

def build_loss(recipe: Recipe, **options) -> SmoothNTXentLoss:
    """The recipe's loss: a memory bank of ``moco.queue_size`` keys for MoCo, in-batch for SimCLR.
    ``options`` go to `SmoothNTXentLoss` (e.g. ``persistent_bank=True``, ``backend=...``)."""
    loss = recipe.loss
    bank = (recipe.moco.queue_size, recipe.head.output_dim) if recipe.framework == "moco" else 0
    options.setdefault("wait_for_full_bank", loss.wait_for_full_bank)
    return SmoothNTXentLoss(
        temperature=loss.temperature, memory_bank_size=bank, smoothing=loss.smoothing,
        neighbors=loss.neighbors_or_none, schedule=loss.smoothing_schedule(recipe.epochs), **options,
    )


def build_crop_transform(crop: CropSpec, views: ViewSpec) -> T.Compose:
    """One view: random resized crop of the group ``crop``, then ``views``' augmentations."""
    interpolation = T.InterpolationMode.BICUBIC if views.interpolation == "bicubic" else T.InterpolationMode.BILINEAR
    brightness, contrast, saturation, hue = views.color_jitter
    return T.Compose([
        T.RandomResizedCrop(crop.size, scale=crop.scale, interpolation=interpolation),
        T.RandomHorizontalFlip(p=views.hflip_prob),
        T.RandomApply([T.ColorJitter(brightness, contrast, saturation, hue)], p=views.color_jitter_prob),
        T.RandomGrayscale(p=views.grayscale_prob),
        GaussianBlur(prob=views.blur_prob, sigmas=views.blur_sigmas),
        T.ToTensor(),
        T.Normalize(mean=views.mean, std=views.std),
    ])


def build_view_transform(views: ViewSpec) -> MultiViewTransform:
    """lightly `MultiViewTransform`: image -> [global crops..., local crops...] (PIL input)."""
    crops = [build_crop_transform(views.global_crops, views)] * views.global_crops.count
    if views.local_crops is not None:
        crops += [build_crop_transform(views.local_crops, views)] * views.local_crops.count
    return MultiViewTransform(crops)


def encode_views(encoder: nn.Module, views: Sequence[Tensor]) -> List[Tensor]:
    """Run ``encoder`` once per group of consecutive same-sized views (globals together, locals
    together), as multi-crop implementations do, and return one output per view."""
    outputs: List[Tensor] = []
    start = 0
    while start < len(views):
        stop = start
        while stop < len(views) and views[stop].shape[1:] == views[start].shape[1:]:
            stop += 1
        encoded = encoder(torch.cat(views[start:stop]))
        outputs.extend(encoded.chunk(stop - start))
        start = stop
    return outputs


class SimCLRModel(nn.Module):
    """Backbone + lightly projection head; ``model(images)`` gives the projections.

    Example:
        >>> import torch
        >>> from smooth_infonce.integrations.backbones import build_backbone
        >>> from smooth_infonce.integrations.lightly import SimCLRModel, SmoothNTXentLoss
        >>> model = SimCLRModel(build_backbone("tiny_cnn", width=8), hidden_dim=64, output_dim=16)
        >>> views = [torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)]
        >>> loss = model.training_loss(views, SmoothNTXentLoss(0.2, smoothing=0.1, neighbors=3))
    """

    def __init__(self, backbone: Backbone, hidden_dim: int = 2048, output_dim: int = 128,
                 num_layers: int = 2, batch_norm: bool = True) -> None:
        super().__init__()
        self.backbone = backbone
        self.projection_head = SimCLRProjectionHead(backbone.num_features, hidden_dim, output_dim,
                                                    num_layers=num_layers, batch_norm=batch_norm)

    def forward(self, images: Tensor) -> Tensor:
        return self.projection_head(self.backbone(images))

    def training_loss(self, views: Sequence[Tensor], criterion: NTXentLoss, weights: ViewWeights = None) -> Tensor:
        """In-batch loss over all views (multi-crop when there are more than two)."""
        projections = encode_views(self, views)
        if weights is None:
            return criterion(*projections)
        return criterion(*projections, weights=weights)


class MoCoModel(nn.Module):
    """MoCo v2 with lightly's pieces: query encoder (backbone + MoCo head) and a momentum key
    encoder updated with `lightly.models.utils.update_momentum`.

    ``training_loss(views, criterion)``: the key is views[0] (global view 1) through the key
    encoder; every other view is a query (SSLight: global view 2 plus the local crops). Call
    ``update_key_encoder()`` once per step before the loss, as in MoCo.

    Example:
        >>> import torch
        >>> from smooth_infonce.integrations.backbones import build_backbone
        >>> from smooth_infonce.integrations.lightly import MoCoModel, SmoothNTXentLoss
        >>> model = MoCoModel(build_backbone("tiny_cnn", width=8), hidden_dim=64, output_dim=16)
        >>> criterion = SmoothNTXentLoss(0.2, memory_bank_size=(64, 16), smoothing=0.1, neighbors=3)
        >>> views = [torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16), torch.randn(8, 3, 8, 8)]
        >>> model.update_key_encoder()
        >>> loss = model.training_loss(views, criterion, weights=(0.4, 0.6))
    """

    def __init__(self, backbone: Backbone, hidden_dim: int = 2048, output_dim: int = 128,
                 num_layers: int = 2, batch_norm: bool = False, key_momentum: float = 0.999,
                 shuffle_bn: bool = True) -> None:
        super().__init__()
        self.backbone = backbone
        self.projection_head = MoCoProjectionHead(backbone.num_features, hidden_dim, output_dim,
                                                  num_layers=num_layers, batch_norm=batch_norm)
        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)
        self.key_momentum = key_momentum
        self.shuffle_bn = shuffle_bn

    def forward(self, images: Tensor) -> Tensor:
        return self.projection_head(self.backbone(images))

    @torch.no_grad()
    def forward_key(self, images: Tensor) -> Tensor:
        # Across GPUs, shuffling keeps batch-norm statistics from leaking the positive pairing;
        # on one device the statistics do not depend on the order, so nothing is done.
        shuffle = self.shuffle_bn and lightly_dist.world_size() > 1
        if shuffle:
            images, order = batch_shuffle_distributed(images)
        keys = self.projection_head_momentum(self.backbone_momentum(images))
        return batch_unshuffle_distributed(keys, order) if shuffle else keys

    def update_key_encoder(self, momentum: Optional[float] = None) -> None:
        m = self.key_momentum if momentum is None else momentum
        update_momentum(self.backbone, self.backbone_momentum, m)
        update_momentum(self.projection_head, self.projection_head_momentum, m)

    def training_loss(self, views: Sequence[Tensor], criterion: NTXentLoss, weights: ViewWeights = None) -> Tensor:
        """MoCo loss: key = views[0], queries = views[1:], one weight per query view."""
        if len(views) < 2:
            raise ValueError(f"MoCo needs at least 2 views (key, query), got {len(views)}")
        keys = self.forward_key(views[0])
        queries = encode_views(self, views[1:])
        if weights is None:
            return criterion(queries[0], keys, *queries[1:])
        return criterion(queries[0], keys, *queries[1:], weights=weights)


def build_model(recipe: Recipe, backbone: Optional[Backbone] = None) -> Union[MoCoModel, SimCLRModel]:
    """The recipe's lightly model (``backbone`` defaults to ``recipe.backbone.build()``)."""
    backbone = recipe.backbone.build() if backbone is None else backbone
    head = recipe.head
    if recipe.framework == "moco":
        return MoCoModel(backbone, head.hidden_dim, head.output_dim, head.num_layers, head.batch_norm,
                         key_momentum=recipe.moco.key_momentum, shuffle_bn=recipe.moco.shuffle_bn)
    return SimCLRModel(backbone, head.hidden_dim, head.output_dim, head.num_layers, head.batch_norm)
