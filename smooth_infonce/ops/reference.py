"""The exact reference op: smoothed InfoNCE in eager PyTorch, the oracle for the fused kernel.

It materialises the N x M logits on purpose: every step below is one line of loss.md, so the
kernel can be checked against it. Use the Triton backend for anything large.

Row loss, for anchor i with valid set V(i), positives P(i) and smoothing set S(i) (loss.md):

    z_ij = <a_i, c_j> / tau
    y_ij = (1 - alpha) / |P(i)|  for j in P(i),   alpha / |S(i)|  for j in S(i),   0 elsewhere
    l_i  = logsumexp_{j in V(i)} z_ij - sum_j y_ij z_ij

S(i) is every negative (``neighbors=None``, uniform smoothing) or the ``neighbors`` negatives most
similar to a_i. Neighbour ties go to the lower candidate index, and the selection is
made without gradient: the targets are constants.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..layout import Pairs, dense_masks
from . import compute_dtype


def top_negatives(similarities: Tensor, negative: Tensor, k: int) -> Tensor:
    """Mask of the k most similar negatives per row; among equal similarities the lower index wins.

    Exact and O(N M): everything above the k-th largest value, then the lowest-index columns
    equal to it until k are taken (no full sort).
    """
    scores = similarities.masked_fill(~negative, float("-inf"))
    kth = scores.topk(k, dim=1).values[:, -1:]
    above = scores > kth
    tied = (scores == kth) & negative  # never a masked column, even with fewer than k negatives
    missing = k - above.sum(dim=1, keepdim=True)
    return above | (tied & (tied.cumsum(dim=1) <= missing))


def smoothed_targets(
    similarities: Tensor,
    positive: Tensor,
    negative: Tensor,
    smoothing: float,
    neighbors: Optional[int],
) -> Tensor:
    """The soft targets y (N x M'), each row summing to 1, from the dense masks."""
    with torch.no_grad():
        dtype = similarities.dtype
        targets = positive.to(dtype) * ((1.0 - smoothing) / positive.sum(1, keepdim=True).to(dtype))
        if neighbors is None:
            smoothing_set = negative
        else:
            smoothing_set = top_negatives(similarities, negative, neighbors)
        share = smoothing / smoothing_set.sum(1, keepdim=True).clamp_min(1).to(dtype)
        return targets + smoothing_set.to(dtype) * share


def reference_row_losses(
    anchors: Tensor,
    candidates: Tensor,
    positive_keys: Optional[Tensor],
    pairs: Pairs,
    *,
    temperature: float,
    smoothing: float,
    neighbors: Optional[int],
) -> Tensor:
    """Per-row smoothed InfoNCE losses (N,), float32 (float64 for float64 inputs).

    Inputs are used as given (normalise first if wanted); gradients flow to all three tensors.
    """
    dtype = compute_dtype(anchors, candidates, positive_keys)
    a, c = anchors.to(dtype), candidates.to(dtype)
    similarities = a @ c.T
    if positive_keys is not None:  # MoCo: the positive <q_i, k_i> is column 0
        own = (a * positive_keys.to(dtype)).sum(dim=1, keepdim=True)
        similarities = torch.cat([own, similarities], dim=1)
    logits = similarities / temperature

    valid, positive = dense_masks(pairs, a.shape[0], c.shape[0], a.device)
    negative = valid & ~positive
    targets = smoothed_targets(similarities.detach(), positive, negative, smoothing, neighbors)

    log_normaliser = torch.logsumexp(logits.masked_fill(~valid, float("-inf")), dim=1)
    # targets are 0 off V(i), where the logits are finite: no second masked copy needed
    return log_normaliser - (targets * logits).sum(dim=1)
