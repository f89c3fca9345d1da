"""Cached-gradient steps of the project's lightly models (`smooth_infonce.cached_step` explains the
step): the pieces of one model and loss, and the whole step in one call.

    >>> import torch
    >>> from smooth_infonce.integrations.lightly import SmoothNTXentLoss
    >>> from smooth_infonce.integrations.lightly.models import MoCoModel
    >>> from smooth_infonce.integrations.lightly.steps import cached_training_loss
    >>> from smooth_infonce.integrations.recipes.backbones import build_backbone
    >>> moco = MoCoModel(build_backbone("tiny_cnn", width=4), hidden_dim=32, output_dim=16)
    >>> bank = SmoothNTXentLoss(0.2, memory_bank_size=(128, 16), smoothing=0.1, neighbors=3)
    >>> views = [torch.randn(24, 3, 8, 8), torch.randn(24, 3, 8, 8)]   # key view, query view
    >>> moco.update_key_encoder()
    >>> loss = cached_training_loss(moco, views, bank, chunk_size=8, ids=torch.arange(24))
    >>> int(bank.bank_enqueued)                         # the 24 keys, enqueued once
    24
"""

from __future__ import annotations

from typing import Callable, ContextManager, Optional, Sequence

from torch import Tensor, nn

from smooth_infonce.cached_step import Backward, StepParts, cached_step


def lightly_step_parts(model: nn.Module, views: Sequence[Tensor], criterion: nn.Module, *, weights=None,
                       ids: Optional[Tensor] = None, key_chunk_size: Optional[int] = None) -> StepParts:
    """The cached-step pieces of the project's lightly models (`models.SimCLRModel`,
    `models.MoCoModel`, their ``step_parts``: the same call of the loss as their
    ``training_loss``) with the lightly drop-in loss (`loss.SmoothNTXentLoss`, or lightly's
    `NTXentLoss`): SimCLR and multi-crop in-batch; MoCo with its keys from the momentum encoder,
    now, without a graph, ``key_chunk_size`` images at a time, the queries the cached part (SSLight:
    one weight per query view); symmetric MoCo. The loss (and so the queue's read and enqueue) runs
    once, on the whole batch."""
    return model.step_parts(views, criterion, weights=weights, ids=ids, key_chunk_size=key_chunk_size)


def cached_training_loss(model: nn.Module, views: Sequence[Tensor], criterion: nn.Module,
                         chunk_size: Optional[int], *, weights=None, ids: Optional[Tensor] = None,
                         no_sync: Optional[Callable[[], ContextManager]] = None,
                         backward: Optional[Backward] = None) -> Tensor:
    """`cached_step` of a project lightly model (`lightly_step_parts`: SimCLR, multi-crop, MoCo
    with a queue and ids, SSLight's weights, symmetric MoCo): the step's loss, detached, with the
    parameter gradients accumulated. MoCo keys are computed ``chunk_size`` images at a time too.
    Call ``model.update_key_encoder()`` before, as for ``model.training_loss``."""
    parts = lightly_step_parts(model, views, criterion, weights=weights, ids=ids, key_chunk_size=chunk_size)
    return cached_step(parts.embed, parts.inputs, parts.loss_of, chunk_size, modules=model, no_sync=no_sync,
                       backward=backward)
