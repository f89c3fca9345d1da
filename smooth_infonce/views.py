"""The call forms: a toolkit's views (and queue) -> the anchors, candidates, ids and row weights of
one `smooth_infonce` call.

`SmoothInfoNCELoss`, the lightly drop-in, the solo-learn methods and the Lightning module all call
`multi_view_loss`, so each form is written once:

- in-batch multi-view (no queue): every view of image b is a positive of every other view of b, or
  every row of the same ``labels`` class (SupCon-style); all other rows are negatives;
- MoCo (a queue): ``views[1]`` holds the keys; ``views[0]`` and every further view are queries that
  share them as positives and the queue (no gradient) as negatives. With ``ids`` (B,) and
  ``queue_ids`` (K,) a queue entry of the query's own image is left out of its negatives;
- symmetric MoCo (`symmetric_moco_loss`): both directions read the same queue.

The views are checked here (named out0, out1, ..., queue, as the caller passed them) and the loss is
computed by the unchecked core: a call is validated once.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from . import distributed
from .functional import compute_loss
from .ops import compute_dtype
from .options import SYMMETRIC, LossOptions
from .validation import (
    check_choice,
    check_embeddings,
    check_finite,
    check_ids,
    check_logit_scale,
    check_same_device,
    check_weights,
)

Weights = Union[None, Sequence[float], Tensor]


def check_views(views: Sequence[Tensor], queue: Optional[Tensor] = None) -> None:
    """Shapes and devices: equal (B, D) views named out0, out1, ... and a (K, D) queue. Metadata
    only, no device synchronisation."""
    check_embeddings("out0", views[0])
    batch, width = views[0].shape
    for v, view in enumerate(views[1:], start=1):
        check_embeddings(f"out{v}", view, width=width, rows=batch)
    if queue is not None:
        check_embeddings("queue", queue, width=width)
    check_same_device(**{f"out{v}": view for v, view in enumerate(views)}, queue=queue)


def view_row_weights(weights: Weights, num_views: int, batch: int, device: torch.device,
                     *, dtype: torch.dtype = torch.float32, validate: bool = True) -> Optional[Tensor]:
    """One weight per anchor row from one float per view (rows of view v get weights[v], in
    ``dtype``: the loss's compute dtype, so float64 losses get float64 weights); a per-row tensor
    (num_views * batch,) passes through as given."""
    if weights is None:
        return None
    if isinstance(weights, Tensor):
        check_weights(weights, num_views * batch, validate=validate)
        return weights
    if len(weights) != num_views:
        raise ValueError(f"weights must give one value per anchor view ({num_views}), got {len(weights)}")
    row_weights = torch.as_tensor(list(weights), dtype=dtype, device=device).repeat_interleave(batch)
    check_weights(row_weights, num_views * batch, validate=validate)
    return row_weights


def multi_view_loss(
    views: Sequence[Tensor],
    options: LossOptions,
    *,
    smoothing: Optional[float] = None,
    queue: Optional[Tensor] = None,
    ids: Optional[Tensor] = None,
    queue_ids: Optional[Tensor] = None,
    weights: Weights = None,
    labels: Optional[Tensor] = None,
    gather_distributed: bool = False,
    validate: bool = True,
    queue_finite: bool = False,
    queue_normalized: bool = False,
    logit_scale: Optional[Tensor] = None,
) -> Tensor:
    """The loss of one call form (see the module docstring).

    Args:
        views: two or more (B, D) tensors: the views of B images (MoCo: queries, keys, more queries).
        options: the loss options; ``smoothing`` overrides their alpha (the scheduled value).
        queue: (K, D) MoCo negatives (detached here).
        ids: (B,) sample ids of the images (MoCo with ``queue_ids``: own-image queue entries are
            not negatives).
        queue_ids: (K,) the ids of the queue's entries, -1 for unknown (never excluded).
        weights: one float per anchor view, or a per-row tensor.
        labels: (B,) class labels: in-batch rows with equal labels are positives (SupCon-style).
        gather_distributed: in-batch: compare against the views of every rank.
        validate: the value checks (non-finite embeddings, ids, weights, too few negatives); they
            synchronise with the device (under ``torch.compile``: a data-dependent graph break,
            which ``fullgraph=True`` rejects). Shapes, dtypes and devices are always checked.
        queue_finite: the caller already knows every value of ``queue`` is finite (the lightly
            drop-in's bank: each key was checked on its way in, a restored or assigned bank once):
            ``validate`` then skips its O(K D) check of the queue.
        queue_normalized: the rows of ``queue`` are already unit vectors, normalised as
            ``options.normalize`` would (the drop-in's bank): they are not normalised again.
            Ignored with ``normalize=False``.
        logit_scale: a learnable temperature, s = 1 / tau as a one-element tensor (may require
            grad): logits s <a_i, c_j>, ``options.temperature`` unused (`smooth_infonce`).
    """
    check_views(views, queue)
    batch, device = views[0].shape[0], views[0].device
    if logit_scale is not None:
        logit_scale = check_logit_scale(logit_scale, device, validate=validate)
    dtype = compute_dtype(*views, queue)
    if validate:
        check_finite(**{f"out{v}": view for v, view in enumerate(views)}, queue=None if queue_finite else queue)

    if queue is not None:
        if labels is not None:
            raise ValueError("labels are not supported with a queue (MoCo has one positive per query)")
        if (ids is None) != (queue_ids is None):
            raise ValueError("pass both ids (B,) and queue_ids (K,) to leave a query's own image out of "
                             "its negatives, or neither")
        if ids is not None:
            check_ids("ids", ids, batch, validate=validate)
            check_ids("queue_ids", queue_ids, queue.shape[0], minimum=-1, validate=validate)
            check_same_device(out0=views[0], ids=ids, queue_ids=queue_ids)
        queries = (views[0], *views[2:])
        return compute_loss(
            torch.cat(queries), queue.detach(), positive_keys=views[1].repeat(len(queries), 1),
            ids=None if ids is None else ids.repeat(len(queries)), candidate_ids=queue_ids,
            weights=view_row_weights(weights, len(queries), batch, device, dtype=dtype, validate=validate),
            options=options, smoothing=smoothing, validate=validate, candidates_normalized=queue_normalized,
            logit_scale=logit_scale,
        )

    if ids is not None or queue_ids is not None:
        raise ValueError("ids / queue_ids apply to the MoCo form (with a queue); in-batch views of one "
                         "image are matched by position, classes by labels")
    if labels is not None:
        check_ids("labels", labels, batch, validate=validate)
        check_same_device(out0=views[0], labels=labels)
        row_ids = labels
    else:  # instance ids, unique across ranks so gathered candidates keep their identity
        first = distributed.rank() * batch if gather_distributed else 0
        row_ids = torch.arange(first, first + batch, device=device)
    return compute_loss(
        torch.cat(views), ids=row_ids.repeat(len(views)), gather_distributed=gather_distributed,
        weights=view_row_weights(weights, len(views), batch, device, dtype=dtype, validate=validate),
        options=options, smoothing=smoothing, validate=validate, logit_scale=logit_scale,
    )


def symmetric_moco_loss(
    query0: Tensor, key0: Tensor, query1: Tensor, key1: Tensor, queue: Tensor, options: LossOptions,
    *,
    combine: str = "mean",
    smoothing: Optional[float] = None,
    ids: Optional[Tensor] = None,
    queue_ids: Optional[Tensor] = None,
    validate: bool = True,
    queue_finite: bool = False,
    queue_normalized: bool = False,
    logit_scale: Optional[Tensor] = None,
) -> Tensor:
    """light-moco's symmetric MoCo loss: query0 against key1 and query1 against key0, both against
    the same queue as it was before this step, combined by ``"sum"`` (the authors' code) or
    ``"mean"``. The caller enqueues key0 then key1 afterwards.

    Both directions are one MoCo call with the queries stacked and the keys swapped, so the rows
    of the two directions share one pass over the queue: the mean over the 2B rows is the
    ``"mean"`` of the two directions, twice it their ``"sum"``. ``queue_finite`` /
    ``queue_normalized``, ``logit_scale``: as in `multi_view_loss`.
    """
    check_choice("combine", combine, tuple(s for s in SYMMETRIC if s is not None))
    check_views((query0, key0, query1, key1), queue)
    if options.reduction != "mean":
        raise ValueError(f"symmetric_moco_loss combines two mean losses; options.reduction must be 'mean', "
                         f"got {options.reduction!r}")
    loss = multi_view_loss((torch.cat([query0, query1]), torch.cat([key1, key0])), options,
                           smoothing=smoothing, queue=queue, validate=validate, queue_finite=queue_finite,
                           queue_normalized=queue_normalized, ids=None if ids is None else ids.repeat(2),
                           queue_ids=queue_ids, logit_scale=logit_scale)
    return 2 * loss if combine == "sum" else loss
