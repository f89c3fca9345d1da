"""`SmoothInfoNCELoss`: the nn.Module over the functional op, with lightly's call forms."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from . import distributed
from .functional import smooth_infonce
from .schedule import SmoothingSchedule
from .validation import (
    BACKENDS,
    REDUCTIONS,
    check_choice,
    check_embeddings,
    check_finite,
    check_neighbors,
    check_same_device,
    check_smoothing,
    check_temperature,
)

Weights = Union[None, Sequence[float], Tensor]


class SmoothInfoNCELoss(nn.Module):
    """Smoothed InfoNCE loss ("Establishing a stronger baseline for lightweight contrastive
    models", arXiv 2212.07158).

    For anchor i with logits z_ij = <a_i, c_j> / tau over its valid candidates V(i), positives
    P(i) and smoothing set S(i) (all negatives, or the ``neighbors`` most similar ones):

        y_ij = (1 - alpha) / |P(i)| on P(i),   alpha / |S(i)| on S(i),   0 elsewhere
        l_i  = logsumexp_{j in V(i)} z_ij - sum_j y_ij z_ij

    and the loss is the (weighted) mean of l_i. ``smoothing=0`` is plain InfoNCE / NT-Xent.

    Call forms:

    - ``loss(out0, out1)``: two views (B x D each) of B images, in-batch negatives, self excluded,
      mean over the 2B rows; equals lightly's ``NTXentLoss(temperature)`` at smoothing 0.
    - ``loss(out0, out1, out2, ...)``: multi-crop; every view of image b is a positive of every
      other view of b. ``labels=`` (B,) makes all rows of one class positives (SupCon-style).
    - ``loss(query, key, queue=Q)``: MoCo. Row i's positive is key i, the queue rows (K x D, no
      gradient) its negatives; mean over the B rows.
    - ``loss(query, key, *more_queries, queue=Q, weights=(0.4, 0.1, ...))``: SSLight's
      multi-query MoCo: every query view shares the key's positive and the queue's negatives.

    ``weights`` is one float per anchor view (rows of view v get weights[v]; the loss is
    sum_i w_i l_i / sum_i w_i) or a tensor with one weight per row.

    Args:
        temperature: tau > 0.
        smoothing: alpha in [0, 1).
        neighbors: None for uniform smoothing over all negatives; k >= 1 to smooth onto the k most
            similar negatives of each row (the authors' default strategy).
        schedule: optional `SmoothingSchedule`; ``set_epoch(e)`` then sets ``smoothing``.
        normalize: L2-normalise the embeddings inside the loss.
        gather_distributed: compare against the in-batch candidates of every rank.
        reduction: "mean", "sum" or "none".
        backend: "auto" (the fused Triton kernel on CUDA, the reference op elsewhere),
            "reference" or "triton".
        deterministic: Triton backend: bitwise-reproducible gradients (no atomics).
        allow_tf32: Triton backend, float32 inputs: TF32 dots instead of exact IEEE float32.
        validate: value checks that synchronise with the device (non-finite inputs, too few
            negatives); shape, dtype and device checks always run.

    Example:
        >>> import torch
        >>> from smooth_infonce import SmoothInfoNCELoss
        >>> loss_fn = SmoothInfoNCELoss(temperature=0.2, smoothing=0.1, neighbors=5)
        >>> out0, out1 = torch.randn(32, 128), torch.randn(32, 128)
        >>> loss = loss_fn(out0, out1)
        >>> queue = torch.randn(4096, 128)
        >>> loss = loss_fn(out0, out1, queue=queue)   # MoCo: out0 queries, out1 keys
    """

    def __init__(
        self,
        temperature: float = 0.1,
        smoothing: float = 0.0,
        neighbors: Optional[int] = None,
        *,
        schedule: Optional[SmoothingSchedule] = None,
        normalize: bool = True,
        gather_distributed: bool = False,
        reduction: str = "mean",
        backend: str = "auto",
        deterministic: bool = False,
        allow_tf32: bool = False,
        validate: bool = True,
    ) -> None:
        super().__init__()
        self.temperature = check_temperature(temperature)
        self.smoothing = check_smoothing(smoothing)
        self.neighbors = check_neighbors(neighbors)
        if schedule is not None and not isinstance(schedule, SmoothingSchedule):
            raise TypeError(f"schedule must be a SmoothingSchedule or None, got {type(schedule).__name__}")
        self.schedule = schedule
        self.normalize = normalize
        self.gather_distributed = gather_distributed
        self.reduction = check_choice("reduction", reduction, REDUCTIONS)
        self.backend = check_choice("backend", backend, BACKENDS)
        self.deterministic = deterministic
        self.allow_tf32 = allow_tf32
        self.validate = validate

    def set_epoch(self, epoch: int) -> float:
        """Set ``smoothing`` from the schedule for this epoch and return it."""
        if self.schedule is None:
            raise RuntimeError("set_epoch needs a schedule: SmoothInfoNCELoss(..., schedule=SmoothingSchedule(...))")
        self.smoothing = self.schedule(epoch)
        return self.smoothing

    def forward(
        self,
        out0: Tensor,
        out1: Tensor,
        *more_views: Tensor,
        queue: Optional[Tensor] = None,
        weights: Weights = None,
        labels: Optional[Tensor] = None,
    ) -> Tensor:
        return multi_view_loss(
            (out0, out1, *more_views), queue=queue, weights=weights, labels=labels,
            gather_distributed=self.gather_distributed, validate=self.validate,
            temperature=self.temperature, smoothing=check_smoothing(self.smoothing), neighbors=self.neighbors,
            reduction=self.reduction, normalize=self.normalize, backend=self.backend,
            deterministic=self.deterministic, allow_tf32=self.allow_tf32,
        )

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, smoothing={self.smoothing}, neighbors={self.neighbors}, "
                f"backend={self.backend!r}")


def check_views(views: Sequence[Tensor], queue: Optional[Tensor] = None) -> None:
    """Shapes and devices of the call forms: equal (B, D) views named out0, out1, ... and a
    (K, D) queue. Metadata only, no device synchronisation."""
    check_embeddings("out0", views[0])
    batch, width = views[0].shape
    for v, view in enumerate(views[1:], start=1):
        check_embeddings(f"out{v}", view, width=width, rows=batch)
    if queue is not None:
        check_embeddings("queue", queue, width=width)
    check_same_device(**{f"out{v}": view for v, view in enumerate(views)}, queue=queue)


def view_row_weights(weights: Weights, num_views: int, batch: int, device: torch.device) -> Optional[Tensor]:
    """One weight per anchor row from one float per view (rows of view v get weights[v]); a
    per-row tensor passes through as given."""
    if weights is None or isinstance(weights, Tensor):
        return weights
    if len(weights) != num_views:
        raise ValueError(f"weights must give one value per anchor view ({num_views}), got {len(weights)}")
    return torch.as_tensor(list(weights), dtype=torch.float32, device=device).repeat_interleave(batch)


def multi_view_loss(
    views: Sequence[Tensor],
    *,
    queue: Optional[Tensor] = None,
    weights: Weights = None,
    labels: Optional[Tensor] = None,
    gather_distributed: bool = False,
    validate: bool = True,
    **options,
) -> Tensor:
    """The call forms of `SmoothInfoNCELoss` (and of the toolkit drop-ins) on a sequence of views.

    Without a queue: in-batch multi-view, every view of image b a positive of every other view of
    b (or every row of the same ``labels`` class). With a queue: MoCo, ``views[1]`` holds the keys
    and every other view is a query sharing them as positives and the queue (no gradient) as
    negatives. ``weights``: one float per anchor view, or a per-row tensor. ``options`` go to
    `smooth_infonce`.
    """
    check_views(views, queue)
    if validate:  # named after the caller's arguments; the functional op would only say "anchors"
        check_finite(**{f"out{v}": view for v, view in enumerate(views)}, queue=queue)
    batch, device = views[0].shape[0], views[0].device

    if queue is not None:
        if labels is not None:
            raise ValueError("labels are not supported with a queue (MoCo has one positive per query)")
        queries = (views[0], *views[2:])
        return smooth_infonce(
            torch.cat(queries), queue.detach(), positive_keys=views[1].repeat(len(queries), 1),
            weights=view_row_weights(weights, len(queries), batch, device), validate=validate, **options,
        )

    if labels is not None:
        if labels.shape != (batch,):
            raise ValueError(f"labels must have shape ({batch},), one per image, got {tuple(labels.shape)}")
        ids = labels
    else:  # instance ids, unique across ranks so gathered candidates keep their identity
        first = distributed.rank() * batch if gather_distributed else 0
        ids = torch.arange(first, first + batch, device=device)
    return smooth_infonce(
        torch.cat(views), ids=ids.repeat(len(views)), gather_distributed=gather_distributed,
        weights=view_row_weights(weights, len(views), batch, device), validate=validate, **options,
    )
