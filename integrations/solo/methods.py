"""solo-learn methods with the smoothed InfoNCE loss. Imports solo-learn: load it through
`smooth_infonce.integrations.solo.register`, never from the package's ``__init__``.

- ``smooth_simclr`` (`SmoothSimCLR`): solo-learn's SimCLR (projector, multi-crop forward,
  online classifier) with the loss of `losses.simclr_loss`.
- ``smooth_mocov2plus`` (`SmoothMoCoV2Plus`): solo-learn's MoCo V2+ (momentum backbone and
  projector, 2-layer MLP head) with the loss of `losses.moco_loss`: two-crop symmetric or
  asymmetric, and SSLight's multi-query layout when the config has small crops.

Both read the ``method_kwargs`` documented in `options`, and two keys solo-learn lacks:

- ``optimizer.exclude_depthwise_wd`` (bool, default false): no weight decay on depthwise kernels
  (SSLight), on top of solo-learn's ``optimizer.exclude_bias_n_norm_wd`` (1-D parameters).
- ``scheduler.min_lr_per_256`` (float or null, default null): the final lr per 256 images; when
  set it replaces ``scheduler.min_lr``, scaled like solo-learn scales ``optimizer.lr`` (batch
  size x devices x nodes / 256), so the recipe's lr floor follows the batch.
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence

import omegaconf
import torch
import torch.nn.functional as F
from solo.methods.base import BaseMethod, BaseMomentumMethod
from solo.methods.mocov2plus import MoCoV2Plus
from solo.methods.simclr import SimCLR
from solo.utils.misc import gather, omegaconf_select

from .losses import moco_loss, simclr_loss
from .options import MOCO_DEFAULTS, SMOOTHING_DEFAULTS, loss_options, symmetric_mode
from smooth_infonce.integrations.optim import split_no_decay
from smooth_infonce.integrations.recipes import OptimizerSpec, view_loss_weights

# Marks a class as ours, so registration can tell our entries from foreign ones.
METHOD_MARKER = "_smooth_infonce_method"


def _write_defaults(cfg: omegaconf.DictConfig, defaults: Dict[str, Any]) -> None:
    for key, default in defaults.items():
        cfg.method_kwargs[key] = omegaconf_select(cfg, f"method_kwargs.{key}", default)


class _SmoothedLoss:
    """Shared by both methods: config defaults, the per-epoch alpha and the recipes' no-decay
    rules."""

    smoothing: float

    @staticmethod
    def _add_loss_cfg(cfg: omegaconf.DictConfig, extra_defaults: Dict[str, Any]) -> None:
        _write_defaults(cfg, {**SMOOTHING_DEFAULTS, **extra_defaults})
        cfg.optimizer.exclude_depthwise_wd = omegaconf_select(cfg, "optimizer.exclude_depthwise_wd", False)
        min_lr_per_256 = omegaconf_select(cfg, "scheduler.min_lr_per_256", None)
        if min_lr_per_256 is not None:
            # solo-learn scales optimizer.lr by the total batch in parse_cfg, not min_lr; same
            # factor as there (len(devices): a list of GPU ids, or "1" on CPU)
            total_batch = cfg.optimizer.batch_size * len(cfg.devices) * omegaconf_select(cfg, "num_nodes", 1)
            cfg.scheduler.min_lr = float(min_lr_per_256) * total_batch / 256
        loss_options(cfg.method_kwargs, cfg.max_epochs)  # fail at start-up, not at epoch 1

    def _init_loss(self, cfg: omegaconf.DictConfig) -> None:
        self.loss_options = loss_options(cfg.method_kwargs, cfg.max_epochs)
        self.smoothing = self.loss_options.schedule(0)

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self.smoothing = self.loss_options.schedule(self.current_epoch)

    @property
    def learnable_params(self) -> List[Dict[str, Any]]:
        groups = super().learnable_params
        if not self.cfg.optimizer.exclude_depthwise_wd:
            return groups
        # solo-learn splits off the 1-D parameters itself afterwards when exclude_bias_n_norm_wd
        rules = OptimizerSpec(exclude_bias_norm=self.exclude_bias_n_norm_wd, exclude_depthwise=True)
        return split_no_decay(groups, self, rules)


class SmoothSimCLR(_SmoothedLoss, SimCLR):
    """SimCLR with smoothed InfoNCE; every crop (large and small) is an anchor."""

    def __init__(self, cfg: omegaconf.DictConfig):
        super().__init__(cfg)
        self._init_loss(cfg)
        self.view_weights = view_loss_weights(
            "simclr", self.num_large_crops, self.num_small_crops, self.loss_options.loss_weights)

    @staticmethod
    def add_and_assert_specific_cfg(cfg: omegaconf.DictConfig) -> omegaconf.DictConfig:
        cfg = SimCLR.add_and_assert_specific_cfg(cfg)
        _SmoothedLoss._add_loss_cfg(cfg, {})
        return cfg

    def training_step(self, batch: Sequence[Any], batch_idx: int) -> torch.Tensor:
        indexes = batch[0]
        out = BaseMethod.training_step(self, batch, batch_idx)  # forwards, online classifier
        nce_loss = simclr_loss(
            torch.cat(out["z"]), indexes.repeat(self.num_crops),
            temperature=self.temperature, smoothing=self.smoothing,
            neighbors=self.loss_options.neighbors, view_weights=self.view_weights,
            gather_distributed=True, backend=self.loss_options.backend,
        )
        self.log("train_nce_loss", nce_loss, on_epoch=True, sync_dist=True)
        self.log("train_smoothing", float(self.smoothing), on_epoch=True, on_step=False)
        return nce_loss + out["loss"]


class SmoothMoCoV2Plus(_SmoothedLoss, MoCoV2Plus):
    """MoCo V2+ with smoothed InfoNCE, symmetric or not, with SSLight's multi-query layout.

    Queue layout: ``queue`` is (directions, K, D) (solo-learn's MoCoV2Plus keeps (2, D, K)):
    ``queue[d]`` holds past keys of global view d, the negatives of direction d. It is a buffer,
    so it is saved in checkpoints, with ``queue_filled`` (has the queue wrapped around once?).
    """

    def __init__(self, cfg: omegaconf.DictConfig):
        super().__init__(cfg)
        self._init_loss(cfg)
        self.symmetric = symmetric_mode(cfg.method_kwargs)
        self.num_directions = 1 if self.symmetric is None else 2
        if self.num_large_crops != 2:
            raise ValueError(f"smooth_mocov2plus needs exactly 2 large crops, got {self.num_large_crops}")
        # per query view of one direction: the other global view, then the locals
        self.query_view_weights = view_loss_weights("moco", 2, self.num_small_crops, self.loss_options.loss_weights)
        queue = torch.randn(self.num_directions, self.queue_size, cfg.method_kwargs.proj_output_dim)
        self.register_buffer("queue", F.normalize(queue, dim=-1))  # replaces solo's (2, D, K) queue
        self.register_buffer("queue_filled", torch.zeros((), dtype=torch.bool))

    @staticmethod
    def add_and_assert_specific_cfg(cfg: omegaconf.DictConfig) -> omegaconf.DictConfig:
        cfg = MoCoV2Plus.add_and_assert_specific_cfg(cfg)
        _SmoothedLoss._add_loss_cfg(cfg, MOCO_DEFAULTS)
        symmetric_mode(cfg.method_kwargs)
        return cfg

    def multicrop_forward(self, X: torch.Tensor) -> Dict[str, Any]:
        # small crops are SSLight's extra queries: they need the (normalised) projection too
        out = super().multicrop_forward(X)
        out["z"] = F.normalize(self.projector(out["feats"]), dim=-1)
        return out

    @torch.no_grad()
    def _enqueue(self, keys: torch.Tensor) -> None:
        """keys: (directions, B, D), gathered over ranks."""
        batch = keys.shape[1]
        if self.queue_size % batch:
            raise ValueError(f"queue_size {self.queue_size} must be a multiple of the global batch {batch}")
        ptr = int(self.queue_ptr)
        self.queue[:, ptr:ptr + batch] = keys.to(self.queue.dtype)
        ptr = (ptr + batch) % self.queue_size
        if ptr == 0:
            self.queue_filled.fill_(True)
        self.queue_ptr[0] = ptr

    def current_smoothing(self) -> float:
        if self.loss_options.spec.wait_for_full_bank and not bool(self.queue_filled):
            return 0.0
        return self.smoothing

    def training_step(self, batch: Sequence[Any], batch_idx: int) -> torch.Tensor:
        out = BaseMomentumMethod.training_step(self, batch, batch_idx)  # forwards, classifiers
        queries, local_queries = out["z"][:2], out["z"][2:]
        keys = out["momentum_z"]
        smoothing = self.current_smoothing()
        # clone: the enqueue below writes the queue in place before backward reads it
        nce_loss = moco_loss(
            queries, keys, self.queue.clone(), local_queries=local_queries,
            temperature=self.temperature, smoothing=smoothing,
            neighbors=self.loss_options.neighbors, symmetric=self.symmetric,
            query_view_weights=self.query_view_weights, backend=self.loss_options.backend,
        )
        self._enqueue(torch.stack([gather(keys[d]) for d in range(self.num_directions)]))
        self.log("train_nce_loss", nce_loss, on_epoch=True, sync_dist=True)
        self.log("train_smoothing", float(smoothing), on_epoch=True, on_step=False)
        return nce_loss + out["loss"]


METHODS = {"smooth_simclr": SmoothSimCLR, "smooth_mocov2plus": SmoothMoCoV2Plus}
for _cls in METHODS.values():
    setattr(_cls, METHOD_MARKER, True)
