"""`smooth_infonce`: the functional op every layout, module and integration goes through.

It checks the arguments, L2-normalises, resolves the layout into a `Pairs` description, gathers
across ranks if asked, runs a backend for the per-row losses and applies the row weights and the
reduction. The backends only ever see (anchors, candidates, positive keys, pairs).
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import distributed
from .layout import NO_ID, Pairs, make_pairs
from .ops.reference import reference_row_losses
from .validation import (
    BACKENDS,
    REDUCTIONS,
    check_choice,
    check_embeddings,
    check_finite,
    check_ids,
    check_neighbors,
    check_same_device,
    check_smoothing,
    check_temperature,
    check_weights,
)

SYMMETRIC = (None, "mean", "sum")


def triton_available() -> bool:
    try:
        from .ops import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device: torch.device, *, deterministic: bool = False,
                    allow_tf32: bool = False) -> Callable[..., Tensor]:
    """'auto' takes the fused kernel for CUDA tensors and the reference op elsewhere.

    The reference is exact and deterministic already; the kernel options only reach the kernel.
    """
    check_choice("backend", backend, BACKENDS)
    if backend == "auto":
        backend = "triton" if device.type == "cuda" and triton_available() else "reference"
    if backend == "reference":
        return reference_row_losses
    try:
        from .ops.triton import triton_row_losses
    except ImportError as err:
        raise RuntimeError(
            f"backend='triton' needs the Triton kernel, which could not be imported ({err}); "
            "install triton or use backend='reference'"
        ) from err
    return partial(triton_row_losses, deterministic=deterministic, allow_tf32=allow_tf32)


def smooth_infonce(
    anchors: Tensor,
    candidates: Optional[Tensor] = None,
    *,
    ids: Optional[Tensor] = None,
    candidate_ids: Optional[Tensor] = None,
    positive_keys: Optional[Tensor] = None,
    temperature: float = 0.1,
    smoothing: float = 0.0,
    neighbors: Optional[int] = None,
    weights: Optional[Tensor] = None,
    symmetric: Optional[str] = None,
    reduction: str = "mean",
    normalize: bool = True,
    gather_distributed: bool = False,
    backend: str = "auto",
    deterministic: bool = False,
    allow_tf32: bool = False,
    validate: bool = True,
) -> Tensor:
    """Smoothed InfoNCE (arXiv 2212.07158) for every layout of loss.md.

    Layouts, chosen by which arguments are given:

    - **in-batch multi-view** (SimCLR / NT-Xent, multi-crop, SupCon): ``candidates=None``.
      Every row of ``anchors`` is compared with every other row; rows with equal ``ids`` are
      positives (instance ids for views of one image, class labels for supervised use).
    - **MoCo**: ``positive_keys`` (N x D) and ``candidates`` = the queue (K x D, no gradient
      needed). Row i's positive is <a_i, k_i> (column 0, as in lightly's memory bank); the queue
      rows are its negatives. Several query views against one key: repeat the keys.
    - **two-tower** (CLIP-style): ``candidates`` (M x D) without ``positive_keys``. Row i's
      positive is column i unless ``ids`` / ``candidate_ids`` say otherwise (a candidate id -1 is
      never a positive: append extra negatives that way). ``symmetric="mean"`` averages this with
      the candidates-to-anchors direction (MoCo v3 / CLIP), ``"sum"`` adds them (light-moco).

    Args:
        anchors: (N, D) float tensor, the rows the loss is computed for.
        candidates: (M, D) tensor, or None for the in-batch layout.
        ids: (N,) int ids of the anchors (>= 0).
        candidate_ids: (M,) int ids of the candidates, -1 for "never a positive".
        positive_keys: (N, D) MoCo keys, one positive per row.
        temperature: tau > 0.
        smoothing: alpha in [0, 1), the target mass moved from the positives to the negatives.
        neighbors: None for uniform smoothing over all negatives, or k >= 1 to smooth onto the k
            most similar negatives of each row (ties: lower candidate index first).
        weights: (N,) row weights w_i >= 0 (SSLight's global / local weighting).
        symmetric: None, "mean" or "sum" (two-tower only).
        reduction: "mean" (sum_i w_i l_i / sum_i w_i), "sum" (sum_i w_i l_i) or "none"
            (w_i l_i per row; with ``symmetric`` the N rows of the first direction then the M of
            the second).
        normalize: L2-normalise anchors, candidates and keys first (gradient flows through it).
        gather_distributed: gather the candidates (in-batch and two-tower layouts) of all ranks,
            gradients flowing back to their owners. Needs the same batch size on every rank and
            ids that mean the same on every rank (the module's instance ids take care of this).
        backend: "auto" (Triton kernel for CUDA tensors, reference elsewhere), "reference" or
            "triton".
        deterministic: Triton backend: no atomics in the backward, bitwise-reproducible
            gradients (one more recompute of the similarity tiles).
        allow_tf32: Triton backend, float32 inputs: TF32 tensor-core dots (about 1e-3 relative)
            instead of exact IEEE float32 dots (the default).
        validate: check values too (non-finite inputs, rows without positives, k larger than the
            negatives). This synchronises with the device; shape, dtype and device checks always run.

    Returns:
        The loss, float32 (float64 for float64 inputs); per row with ``reduction="none"``.

    Example:
        >>> import torch
        >>> from smooth_infonce import smooth_infonce
        >>> views = torch.randn(2 * 8, 32)                  # two views of 8 images
        >>> ids = torch.arange(8).repeat(2)                  # view v of image b has id b
        >>> loss = smooth_infonce(views, ids=ids, temperature=0.2, smoothing=0.1, neighbors=3)
        >>> loss.shape
        torch.Size([])
    """
    temperature = check_temperature(temperature)
    smoothing = check_smoothing(smoothing)
    neighbors = check_neighbors(neighbors)
    check_choice("reduction", reduction, REDUCTIONS)
    check_choice("symmetric", symmetric, SYMMETRIC)
    check_embeddings("anchors", anchors)
    n, width = anchors.shape
    if candidates is not None:
        check_embeddings("candidates", candidates, width=width)
    if positive_keys is not None:
        check_embeddings("positive_keys", positive_keys, width=width, rows=n)
        if candidates is None:
            raise ValueError("positive_keys (MoCo layout) needs candidates: the queue of negatives (K x D)")
    check_same_device(anchors=anchors, candidates=candidates, positive_keys=positive_keys,
                      ids=ids, candidate_ids=candidate_ids, weights=weights)
    if ids is not None:
        check_ids("ids", ids, n)
    if candidate_ids is not None:
        if candidates is None:
            raise ValueError("candidate_ids needs candidates; the in-batch layout uses ids for both sides")
        check_ids("candidate_ids", candidate_ids, candidates.shape[0], minimum=NO_ID)
    if weights is not None:
        if symmetric is not None:
            raise ValueError("weights apply to one direction; pass symmetric=None and combine the two calls")
        check_weights(weights, n)
    if validate:
        check_finite(anchors=anchors, candidates=candidates, positive_keys=positive_keys)

    if normalize:
        anchors = _l2_normalize(anchors)
        candidates = None if candidates is None else _l2_normalize(candidates)
        positive_keys = None if positive_keys is None else _l2_normalize(positive_keys)

    row_losses = resolve_backend(backend, anchors.device, deterministic=deterministic, allow_tf32=allow_tf32)
    options = dict(temperature=temperature, smoothing=smoothing, neighbors=neighbors)
    if symmetric is None:
        rows = _one_direction(row_losses, anchors, candidates, ids, candidate_ids, positive_keys,
                              gather_distributed, validate, options)
        return _reduce(rows, weights, reduction)

    if candidates is None or positive_keys is not None:
        raise ValueError("symmetric applies to the two-tower layout: pass candidates and no positive_keys")
    forward = _one_direction(row_losses, anchors, candidates, ids, candidate_ids, None,
                             gather_distributed, validate, options)
    backward = _one_direction(row_losses, candidates, anchors, candidate_ids, ids, None,
                              gather_distributed, validate, options)
    if reduction == "none":
        return torch.cat([forward, backward])
    combined = _reduce(forward, None, reduction) + _reduce(backward, None, reduction)
    return combined / 2 if symmetric == "mean" else combined


def _l2_normalize(x: Tensor) -> Tensor:
    """Unit rows, normalised in float32 (float64 stays float64) and returned in the input dtype."""
    wide = x if x.dtype == torch.float64 else x.float()
    return F.normalize(wide, dim=1).to(x.dtype)


def _one_direction(row_losses, anchors, candidates, ids, candidate_ids, positive_keys,
                   gather_distributed, validate, options) -> Tensor:
    n, device = anchors.shape[0], anchors.device
    self_offset = None
    positional_ids = False  # two-tower default: row i's positive is column i
    if candidates is None:  # in-batch: the anchors are the candidates, minus each row itself
        if ids is None:
            raise ValueError("the in-batch layout (candidates=None) needs ids: which rows are views of one instance")
        candidates, candidate_ids, self_offset = anchors, ids, 0
    elif positive_keys is not None:
        if ids is not None or candidate_ids is not None:
            raise ValueError("the MoCo layout (positive_keys) takes no ids: each row's positive is its key")
    elif (ids is None) != (candidate_ids is None):
        raise ValueError("pass both ids and candidate_ids, or neither (then row i's positive is column i)")
    elif ids is None:
        positional_ids = True
        ids = torch.arange(n, device=device)
        candidate_ids = torch.arange(candidates.shape[0], device=device)

    # Gather the candidates of all ranks (MoCo's queue is already global). Local row i is then
    # global row rank * n + i: positional ids and the self column shift with it.
    if gather_distributed and distributed.world_size() > 1 and positive_keys is None:
        distributed.check_equal_batch(candidates.shape[0])
        shift = distributed.rank() * candidates.shape[0]
        if self_offset is not None:
            self_offset = shift
        if positional_ids:
            ids = ids + shift
            candidate_ids = candidate_ids + shift
        candidate_ids = distributed.gather_ids(candidate_ids)
        candidates = distributed.gather_with_grad(candidates)

    pairs = make_pairs(n, candidates.shape[0], anchor_ids=ids, candidate_ids=candidate_ids,
                       self_offset=self_offset, has_positive_key=positive_keys is not None,
                       device=device)
    if validate:
        _check_counts(pairs, options["neighbors"])
    return row_losses(anchors, candidates, positive_keys, pairs, **options)


def _check_counts(pairs: Pairs, neighbors: Optional[int]) -> None:
    no_positive = (pairs.num_positives == 0).nonzero().flatten()
    if no_positive.numel():
        raise ValueError(
            f"{no_positive.numel()} anchor row(s) have no positive (first: row {int(no_positive[0])}); "
            "every row needs another view / a matching id"
        )
    fewest = int(pairs.num_negatives.min())
    if fewest == 0:
        raise ValueError("a row has no negatives (batch of one instance?): InfoNCE needs at least one negative per row")
    if neighbors is not None and neighbors > fewest:
        raise ValueError(f"neighbors={neighbors} is larger than the {fewest} negatives available to some row")


def _reduce(rows: Tensor, weights: Optional[Tensor], reduction: str) -> Tensor:
    if weights is not None:
        weighted = rows * weights.to(rows.dtype)
        if reduction == "mean":
            return weighted.sum() / weights.to(rows.dtype).sum()
        return weighted.sum() if reduction == "sum" else weighted
    if reduction == "mean":
        return rows.mean()
    return rows.sum() if reduction == "sum" else rows
