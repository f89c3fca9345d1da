"""lightly models, heads and transforms built from the recipes
(`smooth_infonce.integrations.recipes`).

``build_model(recipe)`` gives a lightly MoCo (query encoder + momentum key encoder) or SimCLR model,
``build_view_transform(recipe.views)`` lightly's multi-view (multi-crop) transform; the loss of a
recipe is `smooth_infonce.integrations.lightly.build_loss`.

Example:
    >>> import torch
    >>> from smooth_infonce.integrations.lightly import build_loss
    >>> from smooth_infonce.integrations.lightly_models import build_model
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
    from lightly.models.modules import MoCoProjectionHead, SimCLRProjectionHead
    from lightly.models.utils import (
        batch_shuffle_distributed,
        batch_unshuffle_distributed,
        deactivate_requires_grad,
        update_momentum,
    )
    from lightly.transforms.gaussian_blur import GaussianBlur
    from lightly.transforms.multi_view_transform import MultiViewTransform
    from lightly.transforms.solarize import RandomSolarization
    from lightly.transforms.torchvision_v2_compatibility import torchvision_transforms as T
    from lightly.utils import dist as lightly_dist
except ImportError as err:  # exercised by tests/test_demo.py with lightly blocked
    raise ImportError(f"smooth_infonce.integrations.lightly_models needs lightly: pip install "
                      f"'smooth-infonce[lightly]' ({err})") from err

from smooth_infonce.views import Weights

from .backbones import Backbone
from .lightly import SmoothNTXentLoss
from .recipes import CropSpec, Recipe, ViewSpec


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
    groups = [views.global_crops] * views.global_crops.count + [views.local_crops] * views.num_local
    return MultiViewTransform([build_crop_transform(crop, views, view) for view, crop in enumerate(groups)])


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
        >>> from smooth_infonce.integrations.lightly import SmoothNTXentLoss
        >>> from smooth_infonce.integrations.lightly_models import SimCLRModel
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

    def training_loss(self, views: Sequence[Tensor], criterion: NTXentLoss, weights: Weights = None) -> Tensor:
        """In-batch loss over all views (multi-crop when there are more than two)."""
        projections = encode_views(self, views)
        if weights is None:
            return criterion(*projections)
        return criterion(*projections, weights=weights)


class MoCoModel(nn.Module):
    """MoCo v2 with lightly's pieces: query encoder (backbone + MoCo head) and a momentum key
    encoder updated with `lightly.models.utils.update_momentum`.

    ``training_loss(views, criterion)``: the key is views[0] (global view 1) through the key
    encoder; every other view is a query (SSLight: global view 2 plus the local crops).
    ``symmetric_training_loss(views, criterion)``: light-moco's symmetric loss on two views. Call
    ``update_key_encoder()`` once per step before the loss, as in MoCo.

    Example:
        >>> import torch
        >>> from smooth_infonce.integrations.backbones import build_backbone
        >>> from smooth_infonce.integrations.lightly import SmoothNTXentLoss
        >>> from smooth_infonce.integrations.lightly_models import MoCoModel
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

    def training_loss(self, views: Sequence[Tensor], criterion: NTXentLoss, weights: Weights = None,
                      ids: Optional[Tensor] = None) -> Tensor:
        """MoCo loss: key = views[0], queries = views[1:], one weight per query view. ``ids`` (B,):
        the images' sample ids (dataset indices), for `SmoothNTXentLoss` to leave a query's own
        earlier keys out of its negatives. With ``symmetric`` set: `symmetric_training_loss`."""
        if self.symmetric is not None:
            if weights is not None:
                raise ValueError("the symmetric loss weighs its two directions by combine; pass weights=None")
            return self.symmetric_training_loss(views, criterion, combine=self.symmetric, ids=ids)
        if len(views) < 2:
            raise ValueError(f"MoCo needs at least 2 views (key, query), got {len(views)}")
        keys = self.forward_key(views[0])
        queries = encode_views(self, views[1:])
        extra = {} if ids is None else {"ids": ids}
        if weights is not None:
            extra["weights"] = weights
        return criterion(queries[0], keys, *queries[1:], **extra)

    def symmetric_training_loss(self, views: Sequence[Tensor], criterion: SmoothNTXentLoss, combine: str = "mean",
                                ids: Optional[Tensor] = None) -> Tensor:
        """light-moco's symmetric loss on two views: both go through the query and the key
        encoder, and `SmoothNTXentLoss.symmetric` scores query0 against key1 and query1 against
        key0, then enqueues both keys (``combine="sum"`` as the authors' code)."""
        if len(views) != 2:
            raise ValueError(f"the symmetric loss takes exactly 2 views, got {len(views)}")
        # one encoder pass per view, as the authors' code (batch-norm statistics per view)
        query0, query1 = self(views[0]), self(views[1])
        key0, key1 = self.forward_key(views[0]), self.forward_key(views[1])
        return criterion.symmetric(query0, key0, query1, key1, combine=combine, ids=ids)


def build_model(recipe: Recipe, backbone: Optional[Backbone] = None) -> Union[MoCoModel, SimCLRModel]:
    """The recipe's lightly model (``backbone`` defaults to ``recipe.backbone.build()``)."""
    backbone = recipe.backbone.build() if backbone is None else backbone
    head = recipe.head
    if recipe.framework == "moco":
        return MoCoModel(backbone, head.hidden_dim, head.output_dim, head.num_layers, head.batch_norm,
                         key_momentum=recipe.moco.key_momentum, shuffle_bn=recipe.moco.shuffle_bn,
                         symmetric=recipe.moco.symmetric)
    return SimCLRModel(backbone, head.hidden_dim, head.output_dim, head.num_layers, head.batch_norm)
