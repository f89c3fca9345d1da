"""`smooth_infonce`: the one public boundary every call form, module and integration goes through.

The path of a call: validate once (here) -> L2-normalise -> `layout.resolve_layout` (in-batch /
MoCo / two-tower, rank offsets) -> a backend's row losses (`ops/`, unchecked) -> row weights and
reduction. `compute_loss` is that path without the argument checks, for the call forms in
`views.py`, which check their own arguments under their own names.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .layout import NO_ID, check_counts, resolve_layout
from .ops.reference import reference_row_losses
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


def triton_available() -> bool:
    try:
        from .ops import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(options: LossOptions, device: torch.device) -> Callable[..., Tensor]:
    """'auto' takes the fused kernel for CUDA tensors and the reference op elsewhere.

    The reference is exact and deterministic already; the kernel options only reach the kernel.
    """
    backend = options.backend
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
    return partial(triton_row_losses, deterministic=options.deterministic, allow_tf32=options.allow_tf32)


def smooth_infonce(
    anchors: Tensor,
    candidates: Optional[Tensor] = None,
    *,
    ids: Optional[Tensor] = None,
    candidate_ids: Optional[Tensor] = None,
    positive_keys: Optional[Tensor] = None,
    weights: Optional[Tensor] = None,
    symmetric: Optional[str] = None,
    logit_scale: Optional[Tensor] = None,
    gather_distributed: bool = False,
    validate: bool = True,
    options: Optional[LossOptions] = None,
    **option_fields: Any,
) -> Tensor:
    """Smoothed InfoNCE (arXiv 2212.07158) for every layout (docs/loss.md).

    Layouts, chosen by which arguments are given:

    - **in-batch multi-view** (SimCLR / NT-Xent, multi-crop, SupCon): ``candidates=None``.
      Every row of ``anchors`` is compared with every other row; rows with equal ``ids`` are
      positives (instance ids for views of one image, class labels for supervised use).
    - **MoCo**: ``positive_keys`` (N x D) and ``candidates`` = the queue (K x D, no gradient
      needed). Row i's positive is <a_i, k_i> (column 0, as in lightly's memory bank); the queue
      rows are its negatives. Several query views against one key: repeat the keys. With sample
      ``ids`` (N,) and ``candidate_ids`` (K,) (-1: unknown), a queue entry with the row's own id
      is not one of its negatives (the query's own image from an earlier step).
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
        weights: (N,) row weights w_i >= 0 (SSLight's global / local weighting).
        symmetric: None, "mean" or "sum" (two-tower only; symmetric MoCo: `views.symmetric_moco_loss`).
        logit_scale: a learnable temperature: a one-element floating tensor s > 0 (shape () or
            (1,), on the anchors' device, may require grad), the logits then being
            s <a_i, c_j> instead of <a_i, c_j> / tau; the ``temperature`` option is not used.
            open_clip's ``logit_scale.exp()``; to learn tau itself pass ``1 / tau``. Both backends
            return dL/ds (docs/loss.md, "A learnable temperature"). None (default): the float
            ``temperature``, exactly as without this argument.
        gather_distributed: gather the candidates (in-batch and two-tower layouts) of all ranks,
            gradients flowing back to their owners. Needs the same batch size on every rank and
            ids that mean the same on every rank (the module's instance ids take care of this).
        validate: check values too (non-finite inputs, ids, weights, rows without positives, too
            few negatives, equal batch sizes across ranks). These synchronise with the device;
            ``validate=False`` reads nothing back from it (a training loop's hot path): bad values
            then give unspecified results, except that a row without any valid column (no
            positive and no negative) has loss 0 and zero gradient in both backends. Shapes,
            dtypes and devices are always checked. Under ``torch.compile`` the value checks are
            data-dependent: with ``validate=True``, ``fullgraph=True`` fails ("Could not guard on
            data-dependent expression") and a plain ``torch.compile`` breaks the graph at each
            check (they then run eagerly); ``validate=False`` compiles as one graph, with both
            backends (the Triton kernel is one opaque custom op).
        options: a `LossOptions`; the remaining keywords (``temperature``, ``smoothing``,
            ``neighbors``, ``reduction``, ``normalize``, ``backend``, ``deterministic``,
            ``allow_tf32``, ``few_negatives``) are its fields, given directly or overriding it.
            The loss itself and every option are defined in `SmoothInfoNCELoss`'s docstring.

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
    options = _merge_options(options, option_fields)
    check_choice("symmetric", symmetric, SYMMETRIC)
    check_embeddings("anchors", anchors)
    n, width = anchors.shape
    if candidates is not None:
        check_embeddings("candidates", candidates, width=width)
    if positive_keys is not None:
        check_embeddings("positive_keys", positive_keys, width=width, rows=n)
    check_same_device(anchors=anchors, candidates=candidates, positive_keys=positive_keys,
                      ids=ids, candidate_ids=candidate_ids, weights=weights)
    if ids is not None:
        check_ids("ids", ids, n, validate=validate)
    if candidate_ids is not None and candidates is not None:
        check_ids("candidate_ids", candidate_ids, candidates.shape[0], minimum=NO_ID, validate=validate)
    if weights is not None:
        if symmetric is not None:
            raise ValueError("weights apply to one direction; pass symmetric=None and combine the two calls")
        check_weights(weights, n, validate=validate)
    if logit_scale is not None:
        logit_scale = check_logit_scale(logit_scale, anchors.device, validate=validate)
    if validate:
        check_finite(anchors=anchors, candidates=candidates, positive_keys=positive_keys)
    return compute_loss(anchors, candidates, ids=ids, candidate_ids=candidate_ids, positive_keys=positive_keys,
                        weights=weights, symmetric=symmetric, gather_distributed=gather_distributed,
                        options=options, validate=validate, logit_scale=logit_scale)


def compute_loss(
    anchors: Tensor,
    candidates: Optional[Tensor] = None,
    *,
    options: LossOptions,
    smoothing: Optional[float] = None,
    ids: Optional[Tensor] = None,
    candidate_ids: Optional[Tensor] = None,
    positive_keys: Optional[Tensor] = None,
    weights: Optional[Tensor] = None,
    symmetric: Optional[str] = None,
    gather_distributed: bool = False,
    validate: bool = True,
    candidates_normalized: bool = False,
    logit_scale: Optional[Tensor] = None,
) -> Tensor:
    """`smooth_infonce` without the argument checks (the caller has made them). ``smoothing``
    overrides ``options.smoothing`` (an adapter's scheduled alpha); ``validate`` still decides the
    checks that need the resolved layout (per-row counts, equal batches across ranks).
    ``candidates_normalized``: the candidates' rows are unit vectors already (the lightly drop-in's
    bank, normalised when each key was enqueued), so ``normalize`` leaves them as they are instead
    of an O(M D) pass per call; the public `smooth_infonce` always normalises what it is given.
    ``logit_scale``: a checked 0-dim s (`validation.check_logit_scale`); each direction's backend
    then gets its own anchors scaled by s and temperature 1, so autograd gives dL/ds (docs/loss.md,
    "A learnable temperature"). None: the float temperature, the call unchanged."""
    smoothing = options.smoothing if smoothing is None else smoothing
    if options.normalize:
        anchors = _l2_normalize(anchors)
        if candidates is not None and not candidates_normalized:
            candidates = _l2_normalize(candidates)
        positive_keys = None if positive_keys is None else _l2_normalize(positive_keys)
    row_losses = resolve_backend(options, anchors.device)

    def one_direction(anchors, candidates, ids, candidate_ids, positive_keys):
        layout = resolve_layout(anchors, candidates, ids=ids, candidate_ids=candidate_ids,
                                positive_keys=positive_keys, gather_distributed=gather_distributed,
                                check_batch=validate)
        if validate:
            check_counts(layout.pairs, options.neighbors, options.few_negatives)
        if logit_scale is None:
            return row_losses(layout.anchors, layout.candidates, layout.positive_keys, layout.pairs,
                              temperature=options.temperature, smoothing=smoothing, neighbors=options.neighbors)
        # s <a_i, c_j> = <s a_i, c_j>: only the anchor role is scaled (in-batch, the candidates are
        # the unscaled anchors, local and gathered), the MoCo key logit <s a_i, k_i> with it
        return row_losses(_scale_rows(layout.anchors, logit_scale), layout.candidates, layout.positive_keys,
                          layout.pairs, temperature=1.0, smoothing=smoothing, neighbors=options.neighbors)

    if symmetric is None:
        return _reduce(one_direction(anchors, candidates, ids, candidate_ids, positive_keys),
                       weights, options.reduction)
    if candidates is None or positive_keys is not None:
        raise ValueError("symmetric applies to the two-tower layout: pass candidates and no positive_keys "
                         "(symmetric MoCo: smooth_infonce.views.symmetric_moco_loss)")
    forward = one_direction(anchors, candidates, ids, candidate_ids, None)
    backward = one_direction(candidates, anchors, candidate_ids, ids, None)
    if options.reduction == "none":
        return torch.cat([forward, backward])
    combined = _reduce(forward, None, options.reduction) + _reduce(backward, None, options.reduction)
    return combined / 2 if symmetric == "mean" else combined


def _merge_options(options: Optional[LossOptions], fields: dict) -> LossOptions:
    unknown = set(fields) - set(LossOptions.field_names())
    if unknown:
        raise TypeError(f"smooth_infonce got unexpected keyword argument(s) {sorted(unknown)}; "
                        f"the loss options are {LossOptions.field_names()}")
    if options is None:
        return LossOptions(**fields)
    if not isinstance(options, LossOptions):
        raise TypeError(f"options must be a LossOptions, got {type(options).__name__}")
    return options.replace(**fields) if fields else options


def _l2_normalize(x: Tensor) -> Tensor:
    """Unit rows, normalised in float32 (float64 stays float64) and returned in the input dtype."""
    wide = x if x.dtype == torch.float64 else x.float()
    return F.normalize(wide, dim=1).to(x.dtype)


def _scale_rows(x: Tensor, scale: Tensor) -> Tensor:
    """s x in x's dtype, multiplied in float32 or wider and rounded once: a half-precision x is not
    multiplied by an s rounded to its dtype first (what a CUDA bf16 x * float32 s would do)."""
    wide = torch.promote_types(torch.promote_types(x.dtype, scale.dtype), torch.float32)
    return (x.to(wide) * scale.to(wide)).to(x.dtype)


def _reduce(rows: Tensor, weights: Optional[Tensor], reduction: str) -> Tensor:
    if weights is not None:
        weighted = rows * weights.to(rows.dtype)
        if reduction == "mean":
            return weighted.sum() / weights.to(rows.dtype).sum()
        return weighted.sum() if reduction == "sum" else weighted
    if reduction == "mean":
        return rows.mean()
    return rows.sum() if reduction == "sum" else rows
