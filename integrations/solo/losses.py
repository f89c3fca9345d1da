"""The two solo-learn loss layouts, computed through the core op `smooth_infonce`.

Toolkit-free (torch only): the solo methods call these, and CI tests them against oracles of
solo-learn's own formulas without solo-learn installed.

SimCLR (in-batch): every crop of every image is an anchor; candidates are all other crops in the
batch (gathered over ranks); the crops of the same image are its positives. With two crops and
``smoothing=0`` this is solo-learn's ``simclr_loss_func`` exactly. With more crops (multi-crop)
the two differ by design: solo-learn computes ``-log(sum_{p in P(i)} p_ip)``, while the smoothed
loss is the cross-entropy against a target that shares ``1 - alpha`` equally over the positives,
``-(1/|P(i)|) sum_{p in P(i)} log p_ip`` at alpha 0 (the only form a soft target can take).

MoCo v2+ (queue): see `moco_loss`.
"""

from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor

from smooth_infonce import LossOptions, smooth_infonce
from smooth_infonce.views import multi_view_loss, view_row_weights

SYMMETRIC_MODES = (None, "mean", "sum")


def simclr_loss(
    z: Tensor,
    indexes: Tensor,
    *,
    temperature: float,
    smoothing: float = 0.0,
    neighbors: Optional[int] = None,
    view_weights: Optional[Sequence[float]] = None,
    gather_distributed: bool = False,
    backend: str = "auto",
) -> Tensor:
    """Smoothed SimCLR loss over solo-learn's crop-major batch.

    Args:
        z: (V*B, D) projections of V crops of B images, crop-major (crop 0 of every image, then
            crop 1, ...), as solo-learn's ``torch.cat(out["z"])``.
        indexes: (V*B,) instance ids, solo-learn's dataset indexes repeated per crop. Dataset
            indexes are unique across ranks, so they stay valid after gathering.
        temperature, smoothing, neighbors, backend: as in `smooth_infonce`.
        view_weights: None for the plain mean, or one weight per crop, in crop order (see
            `recipes.view_loss_weights`); the loss is sum_i w_i l_i / sum_i w_i.
        gather_distributed: compare with the crops of every rank (gradients flow back).
    """
    weights = None
    if view_weights is not None:
        num_crops = len(view_weights)
        if z.shape[0] % num_crops:
            raise ValueError(f"{z.shape[0]} rows do not split into {num_crops} crops")
        weights = view_row_weights(view_weights, num_crops, z.shape[0] // num_crops, z.device)
    return smooth_infonce(
        z, ids=indexes, temperature=temperature, smoothing=smoothing, neighbors=neighbors,
        weights=weights, gather_distributed=gather_distributed, backend=backend,
    )


def moco_loss(
    queries: Sequence[Tensor],
    keys: Sequence[Tensor],
    queues: Tensor,
    *,
    local_queries: Sequence[Tensor] = (),
    temperature: float,
    smoothing: float = 0.0,
    neighbors: Optional[int] = None,
    symmetric: Optional[str] = "mean",
    query_view_weights: Optional[Sequence[float]] = None,
    backend: str = "auto",
) -> Tensor:
    """Smoothed MoCo v2+ loss, two-crop or SSLight multi-query.

    Direction d uses the key of global view d (``keys[d]``, momentum encoder, no gradient) as the
    one positive of the query of the *other* global view and of every local query; its negatives
    are ``queues[d]``, the past keys of global view d. ``query_view_weights`` has one weight per
    query view of a direction, the global query first, then the locals (SSLight: 0.4, then
    0.6 / L for each of L locals; see `recipes.query_view_weights`); each direction's loss is
    sum_i w_i l_i / sum_i w_i. None is the plain mean over all query rows.

    Symmetric convention (``symmetric``):
        - ``None``: one direction, d = 0 (key = global view 1; queries = global view 2 plus the
          locals), the asymmetric MoCo v2 / SSLight layout; only ``queues[0]`` is read.
        - ``"mean"`` (default): the average of directions 0 and 1. Two-crop at smoothing 0 this is
          solo-learn's ``mocov2plus`` loss exactly.
        - ``"sum"``: their sum, the light-moco authors' symmetric loss (twice the gradient at the
          same learning rate).

    Args:
        queries: the two global-view queries (B x D each).
        keys: the momentum keys of the global views: two, or one (``keys[0]``) when
            ``symmetric`` is None.
        queues: (V, K, D) past keys, ``queues[d]`` for key view d (V = number of directions).
        local_queries: the small-crop queries (B x D each), SSLight's multi-query.
    """
    if symmetric not in SYMMETRIC_MODES:
        raise ValueError(f"symmetric must be one of {SYMMETRIC_MODES}, got {symmetric!r}")
    if len(queries) != 2:
        raise ValueError(f"expected the queries of the 2 global views, got {len(queries)}")
    directions = (0,) if symmetric is None else (0, 1)
    if len(keys) < len(directions) or queues.shape[0] < len(directions):
        raise ValueError(f"{len(directions)} direction(s) need as many keys and queues, got "
                         f"{len(keys)} keys and {queues.shape[0]} queues")
    if query_view_weights is not None and len(query_view_weights) != 1 + len(local_queries):
        raise ValueError(f"query_view_weights needs {1 + len(local_queries)} values (global query, then "
                         f"each local), got {len(query_view_weights)}")

    options = LossOptions(temperature=temperature, smoothing=smoothing, neighbors=neighbors, backend=backend)
    # each direction is the module's MoCo call form: (query, key, *more queries) against a queue
    losses = [
        multi_view_loss((queries[1 - d], keys[d], *local_queries), options, queue=queues[d],
                        weights=query_view_weights)
        for d in directions
    ]
    total = sum(losses)
    return total / len(losses) if symmetric == "mean" else total
