"""SSLight's DINO and SwAV inside solo-learn: subclasses of solo-learn's own ``DINO`` and ``SwAV``.
Imports solo-learn: load it through `smooth_infonce.integrations.solo.register`.

- ``sslight_dino`` (`SSLightDINO`): solo-learn's DINO (student and EMA teacher with its
  ``DINOHead``, teacher-temperature schedule, centre and its update, last-layer freezing, its
  ``training_step``) with two changes: the small crops go through the student head too (solo's
  DINO leaves them out of the loss), and its loss module is `PairWeightedDINOLoss`, a subclass of
  solo-learn's ``DINOLoss`` that keeps its schedule and centre and weights the pairs.
- ``sslight_swav`` (`SSLightSwAV`): solo-learn's SwAV (projector, prototypes and their freezing,
  ``SinkhornKnopp``, the queue read by its ``get_assignments``) with the pairs weighted. The queue
  is also a buffer from the start, so solo-learn's checkpoints restore it (solo's SwAV creates it
  in ``on_train_start``, after a resume would have loaded it).

What is ours is only SSLight's pair weighting (`smooth_infonce.integrations.recipes.multicrop`):

    L = lambda_gg * mean(global-global pairs) + lambda_gl * mean(global-local pairs)

with ``method_kwargs.loss_weights: [lambda_gg, lambda_gl]``; ``null`` is the plain mean over the
2 (V - 1) pairs, which is solo-learn's ``DINOLoss`` (chunked into all V crops) and its
``swav_loss_func`` exactly. Both methods also take the recipes' optimiser keys (`optimizer_cfg`).
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence

import omegaconf
import torch
import torch.nn.functional as F
from solo.losses.dino import DINOLoss
from solo.methods.base import BaseMethod
from solo.methods.dino import DINO
from solo.methods.swav import SwAV
from torch import Tensor

from smooth_infonce.integrations.recipes.multicrop import multicrop_cross_entropy, pair_weights

from .methods import METHOD_MARKER
from .optimizer_cfg import RecipeOptimizer, add_optimizer_cfg, total_batch
from .options import weight_pair

NUM_GLOBAL = 2  # solo-learn's large crops, the only targets of DINO's teacher and SwAV's codes


def _add_weights_cfg(cfg: omegaconf.DictConfig) -> None:
    if cfg.data.num_large_crops != NUM_GLOBAL:
        raise ValueError(f"{cfg.method} takes its targets from exactly {NUM_GLOBAL} large crops, "
                         f"got {cfg.data.num_large_crops}")
    cfg.method_kwargs.loss_weights = omegaconf.OmegaConf.select(cfg, "method_kwargs.loss_weights", default=None)
    weight_pair(cfg.method_kwargs.loss_weights)  # fail at start-up
    add_optimizer_cfg(cfg)


def method_pair_weights(method: BaseMethod) -> tuple:
    """The (2 x V) pair weights of a method's crops and its ``loss_weights``."""
    weights = weight_pair(method.cfg.method_kwargs.loss_weights)
    return pair_weights(method.num_large_crops, method.num_small_crops, weights)


class PairWeightedDINOLoss(DINOLoss):
    """solo-learn's ``DINOLoss`` over every crop, pairs weighted by ``weights`` (`pair_weights`).

    Its ``teacher_temp_schedule``, ``epoch``, ``center`` and ``update_center`` are solo-learn's;
    the student input is the V crops' logits stacked crop-major (V B, K), the teacher's the two
    global crops' (2 B, K). Built with ``num_large_crops=V``: solo-learn's own forward then chunks
    the student into every crop, which is the plain mean the baseline weights reproduce.
    """

    def __init__(self, weights: Sequence[Sequence[float]], **kwargs: Any):
        super().__init__(num_large_crops=len(weights[0]), **kwargs)
        self.weights = tuple(tuple(float(w) for w in row) for row in weights)

    def forward(self, student_output: Tensor, teacher_output: Tensor) -> Tensor:
        # crop-major (V B, K) -> (V, B, K) views of the same memory: no per-crop copies
        log_probs = F.log_softmax(student_output.unflatten(0, (len(self.weights[0]), -1)) / self.student_temp, dim=-1)
        temperature = float(self.teacher_temp_schedule[self.epoch])
        targets = F.softmax((teacher_output - self.center) / temperature, dim=-1).detach()
        targets = targets.unflatten(0, (len(self.weights), -1))
        loss = multicrop_cross_entropy(targets, log_probs, self.weights)
        self.update_center(teacher_output)
        return loss


class SSLightDINO(RecipeOptimizer, DINO):
    """solo-learn's DINO with every crop in the student and SSLight's pair weights.

    ``method_kwargs``: solo-learn's DINO keys (``proj_hidden_dim``, ``proj_output_dim``,
    ``num_prototypes``, ``use_bn_in_head``, ``norm_last_layer``, ``student_temperature``,
    ``teacher_temperature``, ``warmup_teacher_temperature``,
    ``warmup_teacher_temperature_epochs``, ``clip_grad``, ``freeze_last_layer``) plus
    ``loss_weights`` and ``center_momentum`` (solo-learn's DINOLoss default 0.9, which its DINO
    does not expose). The teacher EMA is solo-learn's ``momentum.base_tau`` -> ``final_tau``.
    """

    def __init__(self, cfg: omegaconf.DictConfig):
        super().__init__(cfg)
        kwargs = cfg.method_kwargs
        self.dino_loss_func = PairWeightedDINOLoss(
            method_pair_weights(self),
            num_prototypes=kwargs.num_prototypes,
            student_temp=kwargs.student_temperature,
            warmup_teacher_temp=kwargs.warmup_teacher_temperature,
            teacher_temp=kwargs.teacher_temperature,
            warmup_teacher_temp_epochs=kwargs.warmup_teacher_temperature_epochs,
            num_epochs=self.max_epochs,
            center_momentum=kwargs.center_momentum,
        )

    @staticmethod
    def add_and_assert_specific_cfg(cfg: omegaconf.DictConfig) -> omegaconf.DictConfig:
        cfg = super(SSLightDINO, SSLightDINO).add_and_assert_specific_cfg(cfg)
        cfg.method_kwargs.center_momentum = float(
            omegaconf.OmegaConf.select(cfg, "method_kwargs.center_momentum", default=0.9))
        warmup = int(cfg.method_kwargs.warmup_teacher_temperature_epochs)
        if warmup > cfg.max_epochs:  # solo-learn's schedule would fail on a negative length
            raise ValueError(f"method_kwargs.warmup_teacher_temperature_epochs={warmup} exceeds max_epochs="
                             f"{cfg.max_epochs}: solo-learn's DINO schedule needs the warm-up inside the run")
        _add_weights_cfg(cfg)
        return cfg

    def on_train_start(self) -> None:
        super().on_train_start()
        # solo-learn's MomentumUpdater starts from base_tau and is not in the checkpoint: a resumed
        # run takes the teacher momentum of its step, as the uninterrupted run would
        self.momentum_updater.update_tau(cur_step=self.trainer.global_step,
                                         max_steps=self.trainer.estimated_stepping_batches)

    def multicrop_forward(self, X: Tensor) -> Dict[str, Any]:
        # solo-learn's DINO stops at the features of the small crops; SSLight's student sees them
        out = super().multicrop_forward(X)
        out["z"] = self.head(out["feats"])
        return out


class SSLightSwAV(RecipeOptimizer, SwAV):
    """solo-learn's SwAV with SSLight's pair weights.

    ``method_kwargs``: solo-learn's SwAV keys (``proj_hidden_dim``, ``proj_output_dim``,
    ``num_prototypes``, ``temperature``, ``sk_iters``, ``sk_epsilon``, ``queue_size`` (over all
    processes), ``epoch_queue_starts``, ``freeze_prototypes_epochs``) plus ``loss_weights``.
    """

    def __init__(self, cfg: omegaconf.DictConfig):
        super().__init__(cfg)
        self.pair_weights = method_pair_weights(self)
        if self.queue_size > 0:
            # the buffer solo-learn's on_train_start creates, present from the start so that a
            # checkpoint restores it (per process: queue_size / world size, as solo-learn)
            world_size = len(cfg.devices) * int(omegaconf.OmegaConf.select(cfg, "num_nodes", default=1) or 1)
            self.register_buffer("queue", torch.zeros(NUM_GLOBAL, self.queue_size // world_size, self.proj_output_dim))

    @staticmethod
    def add_and_assert_specific_cfg(cfg: omegaconf.DictConfig) -> omegaconf.DictConfig:
        cfg = super(SSLightSwAV, SSLightSwAV).add_and_assert_specific_cfg(cfg)
        _add_weights_cfg(cfg)
        queue, batch = int(cfg.method_kwargs.queue_size), total_batch(cfg)
        if queue and queue < batch:
            raise ValueError(f"method_kwargs.queue_size={queue} is smaller than the global batch {batch}")
        return cfg

    def on_train_start(self) -> None:
        restored = getattr(self, "queue", None)
        restored = None if restored is None else restored.clone()
        super().on_train_start()  # solo-learn's Sinkhorn for this world size, and a zero queue
        if restored is not None and restored.shape == self.queue.shape:
            self.queue = restored  # a resumed run keeps the checkpoint's queue (and a float64 model its dtype)

    @torch.no_grad()
    def enqueue(self, z: List[Tensor]) -> None:
        """Newest first: the global crops' projections of this batch, then the older entries."""
        keys = torch.stack([t.detach() for t in z]).to(self.queue.dtype)
        self.queue.copy_(torch.cat([keys, self.queue], dim=1)[:, :self.queue.shape[1]])

    def training_step(self, batch: Sequence[Any], batch_idx: int) -> Tensor:
        out = BaseMethod.training_step(self, batch, batch_idx)  # every crop, online classifier
        preds = out["p"]
        codes = self.get_assignments(preds[:self.num_large_crops])  # solo-learn's Sinkhorn and queue
        log_probs = [F.log_softmax(p / self.temperature, dim=1) for p in preds]
        swav_loss = multicrop_cross_entropy(codes, log_probs, self.pair_weights)
        if self.queue_size > 0:
            self.enqueue(out["z"][:self.num_large_crops])
        self.log("train_swav_loss", swav_loss, on_epoch=True, sync_dist=True)
        return swav_loss + out["loss"]


MULTICROP_METHODS = {"sslight_dino": SSLightDINO, "sslight_swav": SSLightSwAV}
for _cls in MULTICROP_METHODS.values():
    setattr(_cls, METHOD_MARKER, True)
