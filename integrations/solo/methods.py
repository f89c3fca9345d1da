"""solo-learn methods with the smoothed InfoNCE loss. Imports solo-learn: load it through
`smooth_infonce.integrations.solo.register`, never from the package's ``__init__``.

- ``smooth_simclr`` (`SmoothSimCLR`): SimCLR on solo-learn's `BaseMethod` (solo-learn's SimCLR
  projector, multi-crop forward, online classifier) with the loss of `losses.simclr_loss`.
- ``smooth_mocov2plus`` (`SmoothMoCoV2Plus`): MoCo V2+ on solo-learn's `BaseMomentumMethod`
  (momentum backbone and projector, 2-layer MLP head without BN) with one `losses.KeyQueue` and
  `losses.moco_step`: symmetric (the authors' one shared queue) or asymmetric, and SSLight's
  multi-query layout when the config has small crops.

Both extend solo-learn through its extension points only: they subclass its base classes, call
their ``training_step`` and add the loss on top; the MoCo queue is this package's own module
(``key_queue``), so solo-learn's ``mocov2plus`` buffers are never redefined. The options are the
``method_kwargs`` of `options` (one `LossOptions`), plus the optimiser keys solo-learn lacks
(`optimizer_cfg`: ``optimizer.exclude_depthwise_wd``, ``scheduler.min_lr_per_256``,
``scheduler.warmup_start_lr_per_256``).

SSLight's DINO and SwAV (``sslight_dino``, ``sslight_swav``) are in `multicrop_methods`.
"""

from __future__ import annotations

import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import omegaconf
import torch
import torch.nn.functional as F
from solo.methods.base import BaseMethod, BaseMomentumMethod
from solo.utils.misc import concat_all_gather_no_grad, omegaconf_select
from solo.utils.momentum import initialize_momentum_params
from torch import nn

from smooth_infonce.integrations.recipes import OptimizerSpec, view_loss_weights
from smooth_infonce.integrations.recipes.optim import split_no_decay

from .losses import KeyQueue, moco_step, simclr_loss
from .optimizer_cfg import add_optimizer_cfg
from .options import METHOD_DEFAULTS, MOCO_DEFAULTS, loss_options, moco_settings, validate_flag, weight_pair

# Marks a class as ours, so registration can tell our entries from foreign ones.
METHOD_MARKER = "_smooth_infonce_method"


def _projector(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """solo-learn's SimCLR / MoCo V2+ head: Linear -> ReLU -> Linear, no BatchNorm."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, out_dim))


def _require(cfg: omegaconf.DictConfig, *keys: str) -> None:
    for key in keys:
        if omegaconf.OmegaConf.is_missing(cfg, key) or omegaconf_select(cfg, key, None) is None:
            raise ValueError(f"{key} is required")


def train_dataset_size(trainer) -> Optional[int]:
    """Number of training samples (all ranks together), or None when the loader has no sized
    dataset."""
    loader = getattr(trainer, "train_dataloader", None)
    loaders = loader.values() if isinstance(loader, dict) else loader if isinstance(loader, (list, tuple)) else [loader]
    sizes = []
    for item in loaders:
        try:
            sizes.append(len(item.dataset))
        except (AttributeError, TypeError):
            return None
    return sum(sizes) if sizes else None


class _SmoothedLoss:
    """Shared by both methods: config defaults, the options, the per-epoch alpha and the recipes'
    no-decay rules."""

    smoothing: float

    @staticmethod
    def _add_loss_cfg(cfg: omegaconf.DictConfig, extra_defaults: Dict[str, Any]) -> None:
        _require(cfg, "method_kwargs.proj_output_dim", "method_kwargs.proj_hidden_dim", "method_kwargs.temperature")
        options = loss_options(cfg.method_kwargs, cfg.max_epochs)  # fail at start-up, not at epoch 1
        weight_pair(omegaconf_select(cfg, "method_kwargs.loss_weights", None))
        validate_flag(cfg.method_kwargs)
        for key, default in {**METHOD_DEFAULTS, **extra_defaults}.items():
            if key not in cfg.method_kwargs:
                cfg.method_kwargs[key] = default
        if extra_defaults:
            moco_settings(cfg.method_kwargs, options)
        add_optimizer_cfg(cfg)  # exclude_depthwise_wd, the per-256 lr floor and warm-up start

    def _init_loss(self, cfg: omegaconf.DictConfig) -> None:
        self.loss_options = loss_options(cfg.method_kwargs, cfg.max_epochs)
        self.loss_weights = weight_pair(cfg.method_kwargs.get("loss_weights"))
        self.validate = validate_flag(cfg.method_kwargs)
        self.smoothing = self.loss_options.initial_smoothing

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self.smoothing = self.loss_options.smoothing_at(self.current_epoch)

    @property
    def learnable_params(self) -> List[Dict[str, Any]]:
        groups = super().learnable_params + [{"name": "projector", "params": self.projector.parameters()}]
        if not self.cfg.optimizer.exclude_depthwise_wd:
            return groups
        # solo-learn splits off the 1-D parameters itself afterwards when exclude_bias_n_norm_wd
        rules = OptimizerSpec(exclude_bias_norm=self.exclude_bias_n_norm_wd, exclude_depthwise=True)
        return split_no_decay(groups, self, rules)


class SmoothSimCLR(_SmoothedLoss, BaseMethod):
    """SimCLR with smoothed InfoNCE; every crop (large and small) is an anchor."""

    def __init__(self, cfg: omegaconf.DictConfig):
        super().__init__(cfg)
        kwargs = cfg.method_kwargs
        self.projector = _projector(self.features_dim, kwargs.proj_hidden_dim, kwargs.proj_output_dim)
        self._init_loss(cfg)
        self.view_weights = view_loss_weights("simclr", self.num_large_crops, self.num_small_crops, self.loss_weights)

    @staticmethod
    def add_and_assert_specific_cfg(cfg: omegaconf.DictConfig) -> omegaconf.DictConfig:
        cfg = super(SmoothSimCLR, SmoothSimCLR).add_and_assert_specific_cfg(cfg)
        _SmoothedLoss._add_loss_cfg(cfg, {})
        return cfg

    def forward(self, X: torch.Tensor) -> Dict[str, Any]:
        out = super().forward(X)
        out["z"] = self.projector(out["feats"])
        return out

    def multicrop_forward(self, X: torch.Tensor) -> Dict[str, Any]:
        out = super().multicrop_forward(X)
        out["z"] = self.projector(out["feats"])
        return out

    def training_step(self, batch: Sequence[Any], batch_idx: int) -> torch.Tensor:
        out = super().training_step(batch, batch_idx)  # forwards every crop, online classifier
        nce_loss = simclr_loss(torch.cat(out["z"]), batch[0], self.loss_options, smoothing=self.smoothing,
                               view_weights=self.view_weights, gather_distributed=True, validate=self.validate)
        self.log("train_nce_loss", nce_loss, on_epoch=True, sync_dist=True)
        self.log("train_smoothing", float(self.smoothing), on_epoch=True, on_step=False)
        return nce_loss + out["loss"]


class SmoothMoCoV2Plus(_SmoothedLoss, BaseMomentumMethod):
    """MoCo V2+ with smoothed InfoNCE and one queue that knows its samples.

    ``key_queue`` (`losses.KeyQueue`, checkpointed): K past keys with solo-learn's dataset index
    of each key's image. Every step the loss reads it as it was before the step, then the keys
    are enqueued: both global views' keys when symmetric (2B a step, as the light-moco authors),
    global view 1's otherwise. With ``mask_own_queue_entries`` (default) a queue entry of the
    query's own image is not one of its negatives.
    """

    def __init__(self, cfg: omegaconf.DictConfig):
        super().__init__(cfg)
        kwargs = cfg.method_kwargs
        if self.num_large_crops != 2:
            raise ValueError(f"smooth_mocov2plus needs exactly 2 large crops, got {self.num_large_crops}")
        self.projector = _projector(self.features_dim, kwargs.proj_hidden_dim, kwargs.proj_output_dim)
        self.momentum_projector = _projector(self.features_dim, kwargs.proj_hidden_dim, kwargs.proj_output_dim)
        initialize_momentum_params(self.projector, self.momentum_projector)
        self._init_loss(cfg)
        self.moco = moco_settings(kwargs, self.loss_options)
        self.queue_size = int(kwargs.queue_size)
        self.key_queue = KeyQueue(self.queue_size, kwargs.proj_output_dim)
        # per query view of one direction: the other global view, then the locals
        self.query_view_weights = view_loss_weights("moco", 2, self.num_small_crops, self.loss_weights)

    @staticmethod
    def add_and_assert_specific_cfg(cfg: omegaconf.DictConfig) -> omegaconf.DictConfig:
        cfg = super(SmoothMoCoV2Plus, SmoothMoCoV2Plus).add_and_assert_specific_cfg(cfg)
        cfg.method_kwargs.queue_size = omegaconf_select(cfg, "method_kwargs.queue_size", 65536)
        _SmoothedLoss._add_loss_cfg(cfg, MOCO_DEFAULTS)
        return cfg

    @property
    def momentum_pairs(self) -> List[Tuple[Any, Any]]:
        return super().momentum_pairs + [(self.projector, self.momentum_projector)]

    def forward(self, X: torch.Tensor) -> Dict[str, Any]:
        out = super().forward(X)
        out["z"] = F.normalize(self.projector(out["feats"]), dim=-1)
        return out

    def multicrop_forward(self, X: torch.Tensor) -> Dict[str, Any]:
        # small crops are SSLight's extra queries: they need the (normalised) projection too
        out = super().multicrop_forward(X)
        out["z"] = F.normalize(self.projector(out["feats"]), dim=-1)
        return out

    @torch.no_grad()
    def momentum_forward(self, X: torch.Tensor) -> Dict[str, Any]:
        out = super().momentum_forward(X)
        out["z"] = F.normalize(self.momentum_projector(out["feats"]), dim=-1)
        return out

    def on_train_start(self) -> None:
        super().on_train_start()
        size = train_dataset_size(self.trainer)
        if size is not None and self.queue_size > size:
            masked = ("entries of a query's own image are masked (mask_own_queue_entries), so the queue "
                      "holds several keys of each image but never the query's own as a negative"
                      if self.moco.mask_own_queue_entries else
                      "every query meets its own image's earlier keys among its negatives; set "
                      "method_kwargs.mask_own_queue_entries=true or a smaller queue_size")
            warnings.warn(f"method_kwargs.queue_size={self.queue_size} is larger than the training set "
                          f"({size} images): {masked}", stacklevel=2)

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        """Resume from a checkpoint of an earlier version of this method (``queue`` (V, K, D),
        ``queue_ptr``, ``queue_filled``): its queue of global view 1's keys becomes ``key_queue``
        with unknown indexes (never masked); the queue counts as filled only if it was."""
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("state_dict", {})
        if "key_queue.keys" in state or "queue" not in state:
            return
        old = state.pop("queue")
        ptr, filled = state.pop("queue_ptr", None), state.pop("queue_filled", None)
        if old.dim() != 3 or old.shape[1:] != self.key_queue.keys.shape:
            raise ValueError(f"checkpoint queue of shape {tuple(old.shape)} does not fit key_queue "
                             f"{tuple(self.key_queue.keys.shape)} (a solo-learn mocov2plus checkpoint?)")
        state["key_queue.keys"] = old[0].clone()
        state["key_queue.ids"] = torch.full_like(self.key_queue.ids, -1)
        state["key_queue.ptr"] = (torch.zeros((), dtype=torch.long) if ptr is None else ptr.reshape(()).long())
        state["key_queue.filled"] = (torch.zeros((), dtype=torch.bool) if filled is None else filled.reshape(()).bool())
        warnings.warn("checkpoint of an earlier smooth_mocov2plus: its queue was loaded without the images' "
                      "indexes (no own-image masking until those entries are replaced)", stacklevel=2)

    def current_smoothing(self) -> float:
        if self.moco.wait_for_full_bank and not bool(self.key_queue.filled):
            return 0.0
        return self.smoothing

    def training_step(self, batch: Sequence[Any], batch_idx: int) -> torch.Tensor:
        out = super().training_step(batch, batch_idx)  # forwards, momentum forwards, classifiers
        smoothing = self.current_smoothing()
        nce_loss = moco_step(
            self.key_queue, out["z"][:2], out["momentum_z"], self.loss_options, smoothing=smoothing,
            local_queries=out["z"][2:], symmetric=self.moco.symmetric, query_view_weights=self.query_view_weights,
            ids=batch[0], mask_own=self.moco.mask_own_queue_entries, gather=concat_all_gather_no_grad,
            validate=self.validate,
        )
        self.log("train_nce_loss", nce_loss, on_epoch=True, sync_dist=True)
        self.log("train_smoothing", float(smoothing), on_epoch=True, on_step=False)
        return nce_loss + out["loss"]


METHODS = {"smooth_simclr": SmoothSimCLR, "smooth_mocov2plus": SmoothMoCoV2Plus}
for _cls in METHODS.values():
    setattr(_cls, METHOD_MARKER, True)
