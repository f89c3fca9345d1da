"""lightly models, heads and transforms built from the recipes
(`smooth_infonce.integrations.recipes`).

``build_model(recipe)`` gives a lightly MoCo (query encoder + momentum key encoder), SimCLR, DINO
(student + EMA teacher, `DINOModel`) or SwAV (prototypes + queue, `SwAVModel`) model,
``build_view_transform(recipe.views)`` lightly's multi-view (multi-crop) transform; the loss of a
recipe is `smooth_infonce.integrations.lightly.build_loss` (for DINO and SwAV the pair-weighted
subclasses of lightly's losses in `smooth_infonce.integrations.lightly.multicrop`).

Example:
    >>> import torch
    >>> from smooth_infonce.integrations.lightly import build_loss
    >>> from smooth_infonce.integrations.lightly.models import build_model
    >>> from smooth_infonce.integrations.recipes import get_preset
    >>> recipe = get_preset("light_moco", backbone__name="tiny_cnn", moco__queue_size=64)
    >>> model, criterion = build_model(recipe), build_loss(recipe)
    >>> criterion.smoothing   # the preset's warm-up epochs start at alpha 0
    0.0
    >>> model.update_key_encoder()
    >>> views = [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)]
    >>> loss = model.training_loss(views, criterion, recipe.view_weights())
"""

from __future__ import annotations

import copy
from typing import List, Optional, Sequence, Union

import torch
from torch import Tensor, nn

try:
    from lightly.loss import NTXentLoss
    from lightly.models.modules import (
        DINOProjectionHead,
        MoCoProjectionHead,
        SimCLRProjectionHead,
        SwaVProjectionHead,
        SwaVPrototypes,
    )
    from lightly.models.utils import (
        batch_shuffle_distributed,
        batch_unshuffle_distributed,
        concat_all_gather,
        deactivate_requires_grad,
        update_momentum,
    )
    from lightly.transforms.gaussian_blur import GaussianBlur
    from lightly.transforms.multi_view_transform import MultiViewTransform
    from lightly.transforms.solarize import RandomSolarization
    from lightly.transforms.torchvision_v2_compatibility import torchvision_transforms as T
    from lightly.utils import dist as lightly_dist
except ImportError as err:  # exercised by tests/test_demo.py with lightly blocked
    raise ImportError(f"smooth_infonce.integrations.lightly.models needs lightly: pip install "
                      f"'smooth-infonce[lightly]' ({err})") from err

from smooth_infonce.cached_step import StepParts, embed_in_chunks
from smooth_infonce.integrations.recipes import CropSpec, Recipe, ViewSpec
from smooth_infonce.integrations.recipes.backbones import Backbone
from smooth_infonce.views import Weights

from .loss import SmoothNTXentLoss
from .multicrop import SSLightDINOLoss, SSLightSwaVLoss


def build_crop_transform(crop: CropSpec, views: ViewSpec, view: int = 0) -> T.Compose:
    """View number ``view`` (globals first): random resized crop of the group ``crop``, then
    ``views``' augmentations with that view's blur and solarisation probabilities."""
    interpolation = T.InterpolationMode.BICUBIC if views.interpolation == "bicubic" else T.InterpolationMode.BILINEAR
    brightness, contrast, saturation, hue = views.color_jitter
    steps = [
        T.RandomResizedCrop(crop.size, scale=crop.scale, interpolation=interpolation),
        T.RandomHorizontalFlip(p=views.hflip_prob),
        T.RandomApply([T.ColorJitter(brightness, contrast, saturation, hue)], p=views.color_jitter_prob),
        T.RandomGrayscale(p=views.grayscale_prob),
        GaussianBlur(prob=views.view_probs(views.blur_prob)[view], sigmas=views.blur_sigmas),
    ]
    solarize = views.view_probs(views.solarize_prob)[view]
    if solarize > 0:  # only where asked: lightly's solarisation draws a random number even at p = 0
        steps.append(RandomSolarization(prob=solarize))
    return T.Compose(steps + [T.ToTensor(), T.Normalize(mean=views.mean, std=views.std)])


def build_view_transform(views: ViewSpec) -> MultiViewTransform:
    """lightly `MultiViewTransform`: image -> [global crops..., local crops...] (PIL input), each
    view with its own blur and solarisation probability (`ViewSpec.view_probs`)."""
    per_view = [crop for crop in views.crop_groups() for _ in range(crop.count)]
    return MultiViewTransform([build_crop_transform(crop, views, view) for view, crop in enumerate(per_view)])


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
        >>> from smooth_infonce.integrations.recipes.backbones import build_backbone
        >>> from smooth_infonce.integrations.lightly import SmoothNTXentLoss
        >>> from smooth_infonce.integrations.lightly.models import SimCLRModel
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

    def step_parts(self, views: Sequence[Tensor], criterion: NTXentLoss, weights: Weights = None,
                   ids: Optional[Tensor] = None, key_chunk_size: Optional[int] = None) -> StepParts:
        """The step as `cached_step.StepParts`: every view through the model, same-sized views
        together (`encode_views`); the loss ``criterion(*views, weights=weights)``."""
        if ids is not None:
            raise ValueError("ids apply to MoCo (a memory bank); in-batch views of one image are matched by position")
        extra = {} if weights is None else {"weights": weights}
        return StepParts(lambda chunk: encode_views(self, chunk), list(views), lambda z: criterion(*z, **extra))

    def training_loss(self, views: Sequence[Tensor], criterion: NTXentLoss, weights: Weights = None) -> Tensor:
        """In-batch loss over all views (multi-crop when there are more than two)."""
        return self.step_parts(views, criterion, weights).loss()


class MoCoModel(nn.Module):
    """MoCo v2 with lightly's pieces: query encoder (backbone + MoCo head) and a momentum key
    encoder updated with `lightly.models.utils.update_momentum`.

    ``training_loss(views, criterion)``: the key is views[0] (global view 1) through the key
    encoder; every other view is a query (SSLight: global view 2 plus the local crops).
    ``symmetric_training_loss(views, criterion)``: light-moco's symmetric loss on two views. Call
    ``update_key_encoder()`` once per step before the loss, as in MoCo.

    Example:
        >>> import torch
        >>> from smooth_infonce.integrations.recipes.backbones import build_backbone
        >>> from smooth_infonce.integrations.lightly import SmoothNTXentLoss
        >>> from smooth_infonce.integrations.lightly.models import MoCoModel
        >>> model = MoCoModel(build_backbone("tiny_cnn", width=8), hidden_dim=64, output_dim=16)
        >>> criterion = SmoothNTXentLoss(0.2, memory_bank_size=(64, 16), smoothing=0.1, neighbors=3)
        >>> views = [torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16), torch.randn(8, 3, 8, 8)]
        >>> model.update_key_encoder()
        >>> loss = model.training_loss(views, criterion, weights=(0.4, 0.6), ids=torch.arange(8))
        >>> loss = model.symmetric_training_loss(views[:2], criterion, combine="sum")
    """

    def __init__(self, backbone: Backbone, hidden_dim: int = 2048, output_dim: int = 128,
                 num_layers: int = 2, batch_norm: bool = False, key_momentum: float = 0.999,
                 shuffle_bn: bool = True, symmetric: Optional[str] = None) -> None:
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
        self.symmetric = symmetric  # None, or "sum" / "mean": training_loss is the symmetric loss

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

    def step_parts(self, views: Sequence[Tensor], criterion: NTXentLoss, weights: Weights = None,
                   ids: Optional[Tensor] = None, key_chunk_size: Optional[int] = None) -> StepParts:
        """The step as `cached_step.StepParts`: the keys of ``views[0]`` from the key encoder, now,
        without a graph (``key_chunk_size`` images at a time), the queries ``views[1:]`` the part
        with a graph, the loss ``criterion(query, keys, *more_queries, weights=, ids=)``; with
        ``symmetric`` set, `symmetric_step_parts`."""
        if self.symmetric is not None:
            if weights is not None:
                raise ValueError("the symmetric loss weighs its two directions by combine; pass weights=None")
            return self.symmetric_step_parts(views, criterion, self.symmetric, ids, key_chunk_size)
        if len(views) < 2:
            raise ValueError(f"MoCo needs at least 2 views (key, query), got {len(views)}")
        keys = embed_in_chunks(self.forward_key, views[0], key_chunk_size)
        extra = {} if ids is None else {"ids": ids}
        if weights is not None:
            extra["weights"] = weights
        return StepParts(lambda chunk: encode_views(self, chunk), list(views[1:]),
                         lambda q: criterion(q[0], keys, *q[1:], **extra))

    def symmetric_step_parts(self, views: Sequence[Tensor], criterion: SmoothNTXentLoss, combine: str = "mean",
                             ids: Optional[Tensor] = None, key_chunk_size: Optional[int] = None) -> StepParts:
        """light-moco's symmetric loss as `cached_step.StepParts`: both views through the key
        encoder (now, without a graph) and the query encoder, one pass per view, as the authors'
        code (batch-norm statistics per view); `SmoothNTXentLoss.symmetric` scores query0 against
        key1 and query1 against key0, then enqueues both keys."""
        if len(views) != 2:
            raise ValueError(f"the symmetric loss takes exactly 2 views, got {len(views)}")
        key0, key1 = (embed_in_chunks(self.forward_key, v, key_chunk_size) for v in views)
        return StepParts(lambda chunk: [self(chunk[0]), self(chunk[1])], list(views),
                         lambda q: criterion.symmetric(q[0], key0, q[1], key1, combine=combine, ids=ids))

    def training_loss(self, views: Sequence[Tensor], criterion: NTXentLoss, weights: Weights = None,
                      ids: Optional[Tensor] = None) -> Tensor:
        """MoCo loss: key = views[0], queries = views[1:], one weight per query view. ``ids`` (B,):
        the images' sample ids (dataset indices), for `SmoothNTXentLoss` to leave a query's own
        earlier keys out of its negatives. With ``symmetric`` set: `symmetric_training_loss`."""
        return self.step_parts(views, criterion, weights, ids).loss()

    def symmetric_training_loss(self, views: Sequence[Tensor], criterion: SmoothNTXentLoss, combine: str = "mean",
                                ids: Optional[Tensor] = None) -> Tensor:
        """light-moco's symmetric loss on two views (``combine="sum"`` as the authors' code; see
        `symmetric_step_parts`)."""
        return self.symmetric_step_parts(views, criterion, combine, ids).loss()


def encode_multicrop(backbone: nn.Module, head: nn.Module, views: Sequence[Tensor]) -> List[Tensor]:
    """``head(backbone(view))`` for every view: the backbone once per resolution group
    (`encode_views`), the head once on all views' features together, as DINO's and SwAV's
    multi-crop wrappers do (a batch-norm head sees the statistics of every view at once)."""
    features = encode_views(backbone, views)
    return list(head(torch.cat(features)).chunk(len(views)))


def _without_drop_path(module: nn.Module) -> nn.Module:
    """Switch off stochastic depth (timm's ``DropPath``) in ``module``: DINO builds its teacher
    without drop path; only the student is regularised."""
    for layer in module.modules():
        if hasattr(layer, "drop_prob"):
            layer.drop_prob = 0.0
    return module


class DINOModel(nn.Module):
    """DINO with lightly's pieces: a student (backbone + `DINOProjectionHead`) and a teacher of the
    same architecture, updated only by `update_teacher` (`lightly.models.utils.update_momentum`).

    ``training_loss(views, criterion, epoch)``: the teacher encodes the ``num_global`` global views
    (views[:num_global]), the student every view; both run the backbone once per resolution group
    and the head once (`encode_multicrop`); ``criterion`` is a lightly `DINOLoss` or
    `SSLightDINOLoss` (tau_t picked by ``epoch``). Per step: the loss, backward,
    ``cancel_last_layer_gradients(epoch)`` (the last layer is frozen during the first
    ``freeze_last_layer_epochs`` epochs), the optimiser step, then ``update_teacher(momentum)``.

    Example:
        >>> import torch
        >>> from smooth_infonce.integrations.recipes.backbones import build_backbone
        >>> from smooth_infonce.integrations.lightly.models import DINOModel
        >>> from smooth_infonce.integrations.lightly.multicrop import SSLightDINOLoss
        >>> model = DINOModel(build_backbone("tiny_cnn", width=8), hidden_dim=32, bottleneck_dim=16,
        ...                   num_prototypes=64, batch_norm=True, freeze_last_layer_epochs=1)
        >>> criterion = SSLightDINOLoss(output_dim=64, warmup_teacher_temp_epochs=50, teacher_temp=0.07,
        ...                             loss_weights=(0.4, 0.6))
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> views = [torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)] + [torch.randn(8, 3, 8, 8)] * 4
        >>> loss = model.training_loss(views, criterion, epoch=0)
        >>> loss.backward()
        >>> model.cancel_last_layer_gradients(epoch=0)
        >>> model.head.last_layer.weight_v.grad is None   # frozen in epoch 0
        True
        >>> optimizer.step()
        >>> model.update_teacher(0.996)
    """

    def __init__(self, backbone: Backbone, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 num_prototypes: int = 65536, batch_norm: bool = False, freeze_last_layer_epochs: int = 1,
                 norm_last_layer: bool = True, num_global: int = 2) -> None:
        super().__init__()
        if num_global < 2:
            raise ValueError(f"num_global must be >= 2 (the teacher's views), got {num_global}")
        head_args = dict(input_dim=backbone.num_features, hidden_dim=hidden_dim, bottleneck_dim=bottleneck_dim,
                         output_dim=num_prototypes, batch_norm=batch_norm, freeze_last_layer=freeze_last_layer_epochs,
                         norm_last_layer=norm_last_layer)
        self.num_global = num_global
        self.backbone = backbone
        self.head = DINOProjectionHead(**head_args)
        self.teacher_backbone = _without_drop_path(copy.deepcopy(backbone))
        # A weight-normalised layer cannot be deep-copied once it has run (torch's weight_norm keeps
        # a computed weight): the teacher's head is a second head loaded with the student's weights.
        self.teacher_head = DINOProjectionHead(**head_args)
        self.teacher_head.load_state_dict(self.head.state_dict())
        deactivate_requires_grad(self.teacher_backbone)
        deactivate_requires_grad(self.teacher_head)

    def forward(self, images: Tensor) -> Tensor:
        """The student's outputs (B, num_prototypes)."""
        return self.head(self.backbone(images))

    @torch.no_grad()
    def forward_teacher(self, views: Sequence[Tensor]) -> List[Tensor]:
        """The teacher's outputs, one per view."""
        return encode_multicrop(self.teacher_backbone, self.teacher_head, views)

    def training_loss(self, views: Sequence[Tensor], criterion: SSLightDINOLoss, epoch: Optional[int] = None,
                      teacher_temp: Optional[float] = None) -> Tensor:
        """The DINO loss of the views (globals first, then locals); ``epoch`` / ``teacher_temp``
        pick tau_t as in lightly's `DINOLoss`. The criterion updates its centre."""
        if len(views) < self.num_global:
            raise ValueError(f"views must hold the {self.num_global} global views first, got {len(views)} view(s)")
        teacher_out = self.forward_teacher(views[: self.num_global])
        student_out = encode_multicrop(self.backbone, self.head, views)
        return criterion(teacher_out, student_out, teacher_temp=teacher_temp, epoch=epoch)

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """teacher = momentum * teacher + (1 - momentum) * student, parameter by parameter."""
        update_momentum(self.backbone, self.teacher_backbone, momentum)
        update_momentum(self.head, self.teacher_head, momentum)

    def cancel_last_layer_gradients(self, epoch: int) -> None:
        """Drop the last layer's gradients (after backward, before the optimiser step) during the
        first ``freeze_last_layer_epochs`` epochs (lightly's `DINOProjectionHead` hook)."""
        self.head.cancel_last_layer_gradients(epoch)


class SwAVModel(nn.Module):
    """SwAV with lightly's pieces: backbone + `SwaVProjectionHead` (Linear -> BN -> ReLU -> Linear),
    L2 normalisation, `SwaVPrototypes`; a queue of earlier global-view projections.

    ``training_loss(views, criterion, epoch)``: normalises the prototypes (every step, as SwAV),
    encodes every view (backbone once per resolution group, head once), scores them against the
    prototypes and calls ``criterion`` (lightly `SwaVLoss` or `SSLightSwaVLoss`) with the global
    views as high-resolution outputs; once the queue is in use its scores go in as
    ``queue_outputs``. Then it enqueues the global views' detached projections.

    The queue (SwAV's): one per global view, FIFO, newest first, in the buffers ``queue``
    (num_global, length, output_dim) and ``queue_filled`` (so it is in the state_dict and in
    checkpoints). ``set_queue_length(length)`` sizes it for a run (length over all processes, a
    multiple of the global batch: `SwAVSpec.queue_length`); it is filled from epoch
    ``queue_start_epoch`` on and its scores are used once it is full. Under DDP every process
    keeps the whole queue (the projections of every process, gathered) and feeds its own 1 /
    world_size share of it to the (distributed) Sinkhorn, so the queue is split evenly over the
    processes as in SwAV, yet identical on every process: DDP's buffer broadcast and a checkpoint
    written by rank 0 both keep it right.

    Example:
        >>> import torch
        >>> from smooth_infonce.integrations.recipes.backbones import build_backbone
        >>> from smooth_infonce.integrations.lightly.models import SwAVModel
        >>> from smooth_infonce.integrations.lightly.multicrop import SSLightSwaVLoss
        >>> model = SwAVModel(build_backbone("tiny_cnn", width=8), hidden_dim=32, output_dim=16,
        ...                   num_prototypes=30, queue_start_epoch=0)
        >>> model.set_queue_length(16)
        >>> criterion = SSLightSwaVLoss(loss_weights=(0.4, 0.6))
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> for step in range(3):
        ...     views = [torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16), torch.randn(8, 3, 8, 8)]
        ...     loss = model.training_loss(views, criterion, epoch=0)
        ...     loss.backward()
        ...     model.cancel_prototype_gradients(epoch=1)
        ...     optimizer.step()
        ...     optimizer.zero_grad()
        >>> int(model.queue_filled), model.queue_in_use(epoch=0)   # two batches of 8 filled it
        (16, True)
    """

    def __init__(self, backbone: Backbone, hidden_dim: int = 2048, output_dim: int = 128, num_prototypes: int = 3000,
                 freeze_prototypes_epochs: int = 1, queue_start_epoch: int = 15, num_global: int = 2) -> None:
        super().__init__()
        if num_global < 2:
            raise ValueError(f"num_global must be >= 2 (the views that get codes), got {num_global}")
        self.num_global = num_global
        self.freeze_prototypes_epochs = freeze_prototypes_epochs
        self.queue_start_epoch = queue_start_epoch
        self.backbone = backbone
        self.projection_head = SwaVProjectionHead(backbone.num_features, hidden_dim, output_dim)
        self.prototypes = SwaVPrototypes(output_dim, num_prototypes)
        # SwAV's prototypes are a bias-free linear map (the scores are cosine similarities between
        # unit vectors); lightly's layer has a bias, which is dropped here.
        for layer in self.prototypes.heads:
            layer.bias = None
        self.queue: Tensor
        self.queue_filled: Tensor
        self.register_buffer("queue", torch.zeros(num_global, 0, output_dim))
        self.register_buffer("queue_filled", torch.zeros((), dtype=torch.long))

    # --- encoding ----------------------------------------------------------------------------------

    def project(self, images: Tensor) -> Tensor:
        """The L2-normalised projections (B, output_dim)."""
        return nn.functional.normalize(self.projection_head(self.backbone(images)), dim=1)

    def forward(self, images: Tensor) -> Tensor:
        """The prototype scores (B, num_prototypes)."""
        return self.prototypes(self.project(images))

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        """Put every prototype back on the unit sphere (before each step's forward, as SwAV)."""
        self.prototypes.normalize()

    def cancel_prototype_gradients(self, epoch: int) -> None:
        """Drop the prototypes' gradients (after backward, before the optimiser step) during the
        first ``freeze_prototypes_epochs`` epochs."""
        if epoch < self.freeze_prototypes_epochs:
            for param in self.prototypes.parameters():
                param.grad = None

    # --- the queue -----------------------------------------------------------------------------

    @property
    def queue_length(self) -> int:
        return self.queue.shape[1]

    def set_queue_length(self, length: int) -> None:
        """Size the queue for a run: ``length`` rows per global view over all processes (0: no
        queue). A queue of that length already there (restored from a checkpoint) is kept;
        otherwise it starts empty."""
        if length < 0:
            raise ValueError(f"length must be >= 0, got {length}")
        if length != self.queue_length:
            self.queue = self.queue.new_zeros(self.num_global, length, self.queue.shape[2])
            self.queue_filled.zero_()

    def queue_active(self, epoch: Optional[int]) -> bool:
        """Whether this epoch's projections go into the queue (from ``queue_start_epoch`` on)."""
        return self.queue_length > 0 and epoch is not None and epoch >= self.queue_start_epoch

    def queue_in_use(self, epoch: Optional[int]) -> bool:
        """Whether the queue's scores join the Sinkhorn input: it is active and full."""
        return self.queue_active(epoch) and int(self.queue_filled) >= self.queue_length

    @torch.no_grad()
    def queue_scores(self) -> List[Tensor]:
        """The prototype scores of this process's share of each global view's queue."""
        rank, world = lightly_dist.rank(), lightly_dist.world_size()
        if self.queue_length % world:
            raise ValueError(f"the queue length {self.queue_length} does not split over {world} processes")
        return [self.prototypes(queue[rank::world]) for queue in self.queue]

    @torch.no_grad()
    def enqueue(self, projections: Sequence[Tensor]) -> None:
        """Push the global views' projections (every process's, gathered) to the front of their
        queues; the oldest rows fall off the end."""
        if len(projections) != self.num_global:
            raise ValueError(f"enqueue takes the projections of the {self.num_global} global views, "
                             f"got {len(projections)}")
        if lightly_dist.world_size() > 1:
            projections = [concat_all_gather(p.detach().contiguous()) for p in projections]
        new = torch.stack([p.detach() for p in projections]).to(self.queue.dtype)[:, : self.queue_length]
        count = new.shape[1]
        self.queue[:, count:] = self.queue[:, : self.queue_length - count].clone()
        self.queue[:, :count] = new
        self.queue_filled.copy_(torch.clamp(self.queue_filled + count, max=self.queue_length))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        # A saved queue has the run's length: resize the empty buffer to it before loading.
        saved = state_dict.get(prefix + "queue")
        if saved is not None and saved.shape != self.queue.shape and saved.ndim == 3 \
                and (saved.shape[0], saved.shape[2]) == (self.queue.shape[0], self.queue.shape[2]):
            self.queue = self.queue.new_zeros(saved.shape)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    # --- the step ------------------------------------------------------------------------------

    def training_loss(self, views: Sequence[Tensor], criterion: SSLightSwaVLoss, epoch: Optional[int] = None) -> Tensor:
        """The SwAV loss of the views (globals first, then locals) in ``epoch`` (None: no queue)."""
        if len(views) < self.num_global:
            raise ValueError(f"views must hold the {self.num_global} global views first, got {len(views)} view(s)")
        self.normalize_prototypes()
        projections = [nn.functional.normalize(p, dim=1)
                       for p in encode_multicrop(self.backbone, self.projection_head, views)]
        scores = list(self.prototypes(torch.cat(projections)).chunk(len(views)))
        queue_outputs = self.queue_scores() if self.queue_in_use(epoch) else None
        loss = criterion(scores[: self.num_global], scores[self.num_global:], queue_outputs=queue_outputs)
        if self.queue_active(epoch) and torch.is_grad_enabled():
            self.enqueue(projections[: self.num_global])
        return loss


ModelForRecipe = Union[MoCoModel, SimCLRModel, DINOModel, SwAVModel]


def build_model(recipe: Recipe, backbone: Optional[Backbone] = None) -> ModelForRecipe:
    """The recipe's lightly model (``backbone`` defaults to ``recipe.backbone.build()``)."""
    backbone = recipe.backbone.build() if backbone is None else backbone
    head = recipe.head
    num_global = recipe.views.global_crops.count
    if recipe.framework == "dino":
        dino = recipe.dino
        return DINOModel(backbone, head.hidden_dim, head.output_dim, dino.num_prototypes, head.batch_norm,
                         freeze_last_layer_epochs=dino.freeze_last_layer_epochs,
                         norm_last_layer=dino.norm_last_layer, num_global=num_global)
    if recipe.framework == "swav":
        swav = recipe.swav
        return SwAVModel(backbone, head.hidden_dim, head.output_dim, swav.num_prototypes,
                         freeze_prototypes_epochs=swav.freeze_prototypes_epochs,
                         queue_start_epoch=swav.queue_start_epoch, num_global=num_global)
    if recipe.framework == "moco":
        return MoCoModel(backbone, head.hidden_dim, head.output_dim, head.num_layers, head.batch_norm,
                         key_momentum=recipe.moco.key_momentum, shuffle_bn=recipe.moco.shuffle_bn,
                         symmetric=recipe.moco.symmetric)
    return SimCLRModel(backbone, head.hidden_dim, head.output_dim, head.num_layers, head.batch_norm)
