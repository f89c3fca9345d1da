"""The solo-learn loss layouts and the MoCo queue, through the core's call forms.

Toolkit-free (torch only): the solo methods call these, and CI tests them against loop oracles
without solo-learn installed.

SimCLR (in-batch, `simclr_loss`): every crop of every image is an anchor; candidates are all other
crops in the batch (gathered over ranks); the crops of the same image are its positives. With two
crops and ``smoothing=0`` this is solo-learn's ``simclr_loss_func`` exactly. With more crops
(multi-crop) the two differ by design: solo-learn computes ``-log(sum_{p in P(i)} p_ip)``, the
smoothed loss is the cross-entropy against a target that shares ``1 - alpha`` equally over the
positives, ``-(1/|P(i)|) sum_{p in P(i)} log p_ip`` at alpha 0.

MoCo (`KeyQueue`, `moco_loss`, `moco_step`): one queue of past keys with the dataset index of
each key's image; see `moco_loss` for the layouts.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smooth_infonce import LossOptions
from smooth_infonce.options import SYMMETRIC
from smooth_infonce.views import multi_view_loss, symmetric_moco_loss

NO_ID = -1  # a queue entry whose image is unknown (the random initial keys): never masked


def simclr_loss(
    z: Tensor,
    indexes: Tensor,
    options: LossOptions,
    *,
    smoothing: Optional[float] = None,
    view_weights: Optional[Sequence[float]] = None,
    gather_distributed: bool = False,
    validate: bool = True,
) -> Tensor:
    """Smoothed SimCLR loss over solo-learn's crop-major batch.

    Args:
        z: (V*B, D) projections of V crops of B images, crop-major (crop 0 of every image, then
            crop 1, ...), as solo-learn's ``torch.cat(out["z"])``.
        indexes: (B,) solo-learn's dataset indexes of the B images.
        options: the loss options; ``smoothing`` overrides their alpha (the scheduled value).
        view_weights: None for the plain mean, or one weight per crop, in crop order (see
            `recipes.view_loss_weights`); the loss is sum_i w_i l_i / sum_i w_i.
        gather_distributed: compare with the crops of every rank (gradients flow back).
    """
    batch = indexes.shape[0]
    if batch == 0 or z.shape[0] % batch:
        raise ValueError(f"{z.shape[0]} rows do not split into crops of {batch} images")
    views = z.split(batch)
    if view_weights is not None and len(view_weights) != len(views):
        raise ValueError(f"view_weights needs one value per crop ({len(views)}), got {len(view_weights)}")
    view_weights = row_weights(view_weights, views[0])
    # positives by dataset index: unique across ranks, so they stay valid after gathering
    return multi_view_loss(views, options, smoothing=smoothing, labels=indexes, weights=view_weights,
                           gather_distributed=gather_distributed, validate=validate)


def row_weights(view_weights: Optional[Sequence[float]], like: Tensor) -> Optional[Tensor]:
    """One float per view of ``like`` (B, D) -> a per-row tensor for the core's call forms, in the
    embeddings' dtype when that is float64 (a float64 run stays float64 through the weighted mean)."""
    if view_weights is None:
        return None
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    return torch.as_tensor(list(view_weights), dtype=dtype, device=like.device).repeat_interleave(like.shape[0])


class KeyQueue(nn.Module):
    """MoCo's queue: a (K, D) ring buffer of past keys with the sample id of each key's image.

    Buffers (saved in checkpoints): ``keys`` (K, D), ``ids`` (K,) (-1: unknown, e.g. the random
    initial keys), ``ptr`` (the next slot) and ``filled`` (has every slot been written once?).
    `push` takes any number of keys (a short last batch, more keys than slots).
    """

    def __init__(self, size: int, dim: int):
        super().__init__()
        if size < 1 or dim < 1:
            raise ValueError(f"queue size and width must be >= 1, got {size}, {dim}")
        self.register_buffer("keys", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("ids", torch.full((size,), NO_ID, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.bool))

    @property
    def size(self) -> int:
        return self.keys.shape[0]

    @torch.no_grad()
    def push(self, keys: Tensor, ids: Optional[Tensor] = None) -> None:
        """Write ``keys`` (N, D) and their ``ids`` (N,) (None: unknown) at the pointer, wrapping."""
        count = keys.shape[0]
        ids = torch.full((count,), NO_ID, dtype=torch.long, device=keys.device) if ids is None else ids
        if ids.shape != (count,):
            raise ValueError(f"ids must be ({count},), got {tuple(ids.shape)}")
        ptr = int(self.ptr)
        if count > self.size:  # only the newest fit
            keys, ids = keys[-self.size:], ids[-self.size:]
        start = (ptr + count - keys.shape[0]) % self.size
        slots = (start + torch.arange(keys.shape[0], device=self.keys.device)) % self.size
        self.keys[slots] = keys.detach().to(self.keys.dtype)
        self.ids[slots] = ids.to(self.ids.device, torch.long)
        if ptr + count >= self.size:
            self.filled.fill_(True)
        self.ptr.fill_((ptr + count) % self.size)


def moco_loss(
    queries: Sequence[Tensor],
    keys: Sequence[Tensor],
    queue: Tensor,
    options: LossOptions,
    *,
    smoothing: Optional[float] = None,
    local_queries: Sequence[Tensor] = (),
    symmetric: Optional[str] = "mean",
    query_view_weights: Optional[Sequence[float]] = None,
    ids: Optional[Tensor] = None,
    queue_ids: Optional[Tensor] = None,
    validate: bool = True,
) -> Tensor:
    """Smoothed MoCo loss against one queue, two-crop or SSLight multi-query.

    Direction d uses the key of global view d (``keys[d]``, momentum encoder, no gradient) as the
    one positive of the query of the *other* global view and of every local query; the negatives
    are the whole ``queue`` (K, D) in every direction, as it was before this step.
    ``query_view_weights`` has one weight per query view of a direction, the global query first,
    then the locals (SSLight: 0.4, then 0.6 / L each; see `recipes.query_view_weights`).

    ``symmetric``:
        - ``None``: one direction, d = 0 (key = global view 1; queries = global view 2 plus the
          locals): the asymmetric MoCo v2 / SSLight layout.
        - ``"mean"``: the average of the two directions (solo-learn's convention; at smoothing 0
          and with solo-learn's two queues holding the same keys, its ``mocov2plus`` loss).
        - ``"sum"``: their sum, the light-moco authors' symmetric loss (twice the gradient).
        Two-crop, this is `smooth_infonce.views.symmetric_moco_loss`.

    ``ids`` (B,) and ``queue_ids`` (K,): sample ids of the batch's images and of the queue's
    entries (-1: unknown); an entry of the query's own image is not one of its negatives.
    """
    if symmetric not in SYMMETRIC:
        raise ValueError(f"symmetric must be one of {SYMMETRIC}, got {symmetric!r}")
    if len(queries) != 2:
        raise ValueError(f"expected the queries of the 2 global views, got {len(queries)}")
    directions = (0,) if symmetric is None else (0, 1)
    if len(keys) < len(directions):
        raise ValueError(f"{len(directions)} direction(s) need as many keys, got {len(keys)}")
    if query_view_weights is not None and len(query_view_weights) != 1 + len(local_queries):
        raise ValueError(f"query_view_weights needs {1 + len(local_queries)} values (global query, then "
                         f"each local), got {len(query_view_weights)}")
    common = dict(smoothing=smoothing, ids=ids, queue_ids=queue_ids, validate=validate)
    weights = row_weights(query_view_weights, queries[0])
    if symmetric is not None and not local_queries:
        return symmetric_moco_loss(queries[0], keys[0], queries[1], keys[1], queue, options,
                                   combine=symmetric, **common)
    # each direction is the core's MoCo call form: (query, key, *more queries) against the queue
    losses = [multi_view_loss((queries[1 - d], keys[d], *local_queries), options, queue=queue,
                              weights=weights, **common)
              for d in directions]
    total = sum(losses)
    return total / len(losses) if symmetric == "mean" else total


def moco_step(
    queue: KeyQueue,
    queries: Sequence[Tensor],
    keys: Sequence[Tensor],
    options: LossOptions,
    *,
    smoothing: Optional[float] = None,
    local_queries: Sequence[Tensor] = (),
    symmetric: Optional[str] = "mean",
    query_view_weights: Optional[Sequence[float]] = None,
    ids: Optional[Tensor] = None,
    mask_own: bool = True,
    gather: Callable[[Tensor], Tensor] = lambda t: t,
    validate: bool = True,
) -> Tensor:
    """One MoCo training step's loss and queue update, as the light-moco authors' code does it:
    the loss reads the queue as it was before the step (`moco_loss`), then the keys of every
    direction, gathered over ranks (``gather``), are enqueued in view order (key of view 1, then
    of view 2 when symmetric: 2B keys a step) with their ``ids``. ``mask_own`` leaves queue
    entries of a query's own image out of its negatives (needs ``ids``).
    """
    directions = 1 if symmetric is None else 2
    snapshot = queue.keys.clone()  # the enqueue below writes in place before backward reads it
    masked = mask_own and ids is not None
    loss = moco_loss(queries, keys, snapshot, options, smoothing=smoothing, local_queries=local_queries,
                     symmetric=symmetric, query_view_weights=query_view_weights,
                     ids=ids if masked else None, queue_ids=queue.ids.clone() if masked else None,
                     validate=validate)
    all_ids = None if ids is None else gather(ids)
    for d in range(directions):
        queue.push(gather(keys[d].detach()), all_ids)
    return loss
