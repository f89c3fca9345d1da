"""The exact reference op: smoothed InfoNCE in eager PyTorch, the oracle for the fused kernel.

The loss is defined once, in the README's section "The loss". In its notation, for row i with
valid set V(i), positives P(i), negatives Neg(i) and smoothing set S(i) (`smooth_infonce.layout`
says which pairs are which; the MoCo key logit z_i0 = <a_i, k_i> / tau is column 0 of V(i), P(i)):

    l_i = LSE_{j in V(i)} z_ij - sum_j y_ij z_ij,   y_ij = w_pos[i] on P(i), w_smooth[i] on S(i)
    dl_i / dz_ij = p_ij - y_ij  on V(i), 0 elsewhere

with the per-row weights of `smooth_infonce.ops.row_target_weights`, shared with the kernel. A row
with an empty V(i) (reachable only unchecked, ``validate=False``) has loss 0 and zero gradient in
both backends (its LSE over nothing would be -inf).

How it is computed, exactly (each step below is one line of the math):

- on the N x M similarities, formed once (-inf off V(i), in place): S(i) in neighbour mode, then
  z, LSE_i, and the target entries that live there, sum_j y_ij z_ij over P(i) (and S(i) with
  neighbours, a gather of k logits); they then turn, in place, into the gradient p_ij - y_ij for
  the backward (`_CrossEntropy`, its backward written out and gradchecked);
- uniform smoothing needs no N x M target: its term is linear in z,
  w_smooth[i] sum_{j in Neg(i)} z_ij = w_smooth[i] <a_i, sum_{j in Neg(i)} c_j> / tau, with the sum
  of the candidates in Neg(i) formed in O((N + M) D) (`negative_sums`); autograd differentiates it.

fwd + bwd holds one N x M tensor (the similarities, turned into z, then p - y) and one more at a
time, plus an N x M bool mask of the positives when the layout has ids. It reads nothing back from
the device. `smoothed_targets` builds the dense targets y, the written-out form of the same rule,
for tests. Use the Triton backend for anything large.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..layout import Pairs
from . import compute_dtype, row_target_weights


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
    """Per-row smoothed InfoNCE losses l_i (N,), float32 (float64 for float64 inputs).

    Inputs are used as given (normalise first if wanted); gradients flow to all three tensors.
    """
    w_pos, w_smooth = row_target_weights(pairs, smoothing, neighbors, compute_dtype(anchors, candidates,
                                                                                   positive_keys))
    return weighted_row_losses(anchors, candidates, positive_keys, pairs, w_pos, w_smooth, temperature=temperature,
                               neighbors=neighbors if smoothing > 0 else None,
                               uniform=smoothing > 0 and neighbors is None)


def weighted_row_losses(
    anchors: Tensor,
    candidates: Tensor,
    positive_keys: Optional[Tensor],
    pairs: Pairs,
    w_pos: Tensor,
    w_smooth: Tensor,
    *,
    temperature: float,
    neighbors: Optional[int],
    uniform: bool,
) -> Tensor:
    """`reference_row_losses` given its per-row targets (`row_target_weights`) instead of alpha: the
    form the fused op receives its arguments in, so its self-check fallback computes exactly this
    (`smooth_infonce.self_check`). ``neighbors``: k of the neighbour mode (None: no search);
    ``uniform``: add the uniform targets w_smooth[i] on all of Neg(i)."""
    dtype = compute_dtype(anchors, candidates, positive_keys)
    a, c = anchors.to(dtype), candidates.to(dtype)
    if c is a:  # in-batch: one tensor as both inputs; torch.compile traces apply() only with distinct ones
        c = a.view_as(a)
    key_logits = None  # MoCo: z_i0 = <a_i, k_i> / tau, the positive column 0
    if positive_keys is not None:
        key_logits = (a * positive_keys.to(dtype)).sum(dim=1) / temperature

    rows = _CrossEntropy.apply(a, c, key_logits, w_pos, w_smooth, pairs, temperature, neighbors)
    if uniform:  # - w_smooth[i] <a_i, sum_{j in Neg(i)} c_j> / tau
        rows = rows - w_smooth * (a * negative_sums(c, pairs)).sum(dim=1) / temperature
    return rows


class _CrossEntropy(torch.autograd.Function):
    """LSE_i - sum_j y_ij z_ij over the target entries that live on the logits: the positives P(i)
    and, with ``neighbors``, the k selected negatives S(i). z_ij = <a_i, c_j> / tau over V(i); the
    MoCo key logits z_i0 (N,), if given, are one more column of V(i) and P(i).

    The N x M similarities are formed once: with ``neighbors`` S(i) is selected on them, then they
    turn, in place, into z and then into dl_i/dz_ij = p_ij - y_ij, kept for the backward: with g_i
    the incoming gradient of row i and G_ij = g_i (p_ij - y_ij) / tau, dL/dA = G C, dL/dC = G^T A,
    dL/dz_i0 = g_i (p_i0 - w_pos[i]).
    """

    @staticmethod
    def forward(ctx, a, c, key_logits, w_pos, w_smooth, pairs: Pairs, temperature: float,
                neighbors: Optional[int]):
        similarities = torch.mm(a, c.T).to(a.dtype)  # <a_i, c_j> (autocast may round the product, never the rest)
        exclude_invalid_(similarities, pairs)  # -inf off V(i)
        positive = positive_mask(pairs, c.shape[0])  # P(i) among the candidates, or None
        if neighbors:  # selected on the similarities themselves (not on z: no ties made by rounding)
            columns, present = nearest_negatives(similarities, positive, pairs.num_negatives, neighbors)
        logits = similarities.div_(temperature)  # z_ij, in place
        target_logits = w_pos * (0.0 if positive is None else torch.where(positive, logits, 0.0).sum(dim=1))
        if key_logits is not None:
            target_logits = target_logits + w_pos * key_logits  # sum over P(i) of y_ij z_ij
        if neighbors:
            chosen = torch.where(present, logits.gather(1, columns), 0.0)  # z_ij, j in S(i)
            target_logits = target_logits + w_smooth * chosen.sum(dim=1)  # + sum over S(i)

        row_max = logits.amax(dim=1)  # m_i
        if key_logits is not None:
            row_max = torch.maximum(row_max, key_logits)
        # a row without any valid column (only unchecked, validate=False) has m_i = -inf: a finite
        # m_i gives it p = 0 instead of exp(-inf + inf) = NaN, and it gets loss 0 below
        row_max = row_max.clamp_min(torch.finfo(row_max.dtype).min)
        p = logits.sub_(row_max[:, None]).exp_()  # exp(z_ij - m_i), in place: the logits are used up
        key_p = None if key_logits is None else torch.exp(key_logits - row_max)  # exp(z_i0 - m_i)
        total = p.sum(dim=1) if key_p is None else p.sum(dim=1) + key_p  # sum over V(i): >= 1, or 0 if empty
        lse = row_max + torch.log(total)
        grad_logits = p.div_(total.clamp_min(1)[:, None])  # p_ij (0 on a row without columns)
        if positive is not None:
            grad_logits.addcmul_(positive, w_pos[:, None], value=-1)  # - y_ij on P(i)
        if neighbors:
            grad_logits.scatter_add_(1, columns, -w_smooth[:, None] * present)  # - y_ij on S(i)
        grad_key = None if key_p is None else key_p / total - w_pos  # p_i0 - y_i0

        ctx.save_for_backward(a, c, grad_logits, grad_key)
        ctx.temperature = temperature
        return torch.where(total == 0, 0.0, lse - target_logits)  # empty row: loss 0 (p - y = 0); NaN stays NaN

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_rows):
        a, c, grad_logits, grad_key = ctx.saved_tensors
        g = grad_logits * (grad_rows / ctx.temperature)[:, None]  # G_ij = g_i (p_ij - y_ij) / tau
        grad_a = g @ c if ctx.needs_input_grad[0] else None
        grad_c = g.T @ a if ctx.needs_input_grad[1] else None
        grad_key = grad_rows * grad_key if ctx.needs_input_grad[2] else None
        return grad_a, grad_c, grad_key, None, None, None, None, None


def exclude_invalid_(logits: Tensor, pairs: Pairs) -> Tensor:
    """Set the logits off V(i) to -inf, in place: the self column i + self_offset, and with
    ``ids_exclude`` every candidate with the row's id (the rule of `layout.dense_masks`)."""
    if pairs.self_offset is not None:
        logits.diagonal(pairs.self_offset).fill_(float("-inf"))
    if pairs.ids_exclude and pairs.anchor_ids is not None and pairs.candidate_ids is not None:
        logits.masked_fill_(pairs.anchor_ids[:, None] == pairs.candidate_ids[None, :], float("-inf"))
    return logits


def positive_mask(pairs: Pairs, num_candidates: int) -> Optional[Tensor]:
    """P(i) among the candidates (N x M bool): equal ids, minus the self column; None when no
    candidate can be a positive (no ids, or ids that exclude)."""
    if pairs.anchor_ids is None or pairs.candidate_ids is None or pairs.ids_exclude:
        return None
    positive = pairs.anchor_ids[:, None] == pairs.candidate_ids[None, :]
    if pairs.self_offset is not None:
        positive.diagonal(pairs.self_offset).fill_(False)
    return positive


@torch.no_grad()
def nearest_negatives(similarities: Tensor, positive: Optional[Tensor], num_negatives: Tensor,
                      k: int) -> tuple[Tensor, Tensor]:
    """S(i) for neighbour smoothing: the columns (N, k) of the min(k, |Neg(i)|) negatives with the
    largest similarity (-inf off V(i) already), ties to the lower column, and which of the k slots
    hold one (N, k) bool (a row with fewer negatives smooths onto all of them).

    Exact, without reading back from the device: the k-th largest negative similarity t_i, then a
    second top-k over the rank 2M sign(s_ij - t_i) + (M - j): every value above t_i first, then the
    ones equal to t_i by column (integers, exact in float32 for M < 2^22).
    """
    scores = similarities.clone() if positive is None else similarities.masked_fill(positive, float("-inf"))
    n, m = scores.shape  # scores: a copy, -inf off Neg(i)
    slots = min(k, m)
    kth = scores.topk(slots, dim=1).values[:, -1:]  # t_i; -inf with fewer than k negatives, then
    kth = kth.clamp_min(torch.finfo(scores.dtype).min)  # every negative is above it, every -inf below
    column_rank = torch.arange(m, 0, -1, device=scores.device, dtype=scores.dtype)  # M - j
    rank = scores.sub_(kth).sign_().mul_(2 * m).add_(column_rank)  # in place on the copy
    columns = rank.topk(slots, dim=1).indices  # best first: the real negatives take the first slots
    if slots < k:  # fewer candidates than k: empty slots
        columns = torch.cat([columns, columns.new_zeros(n, k - slots)], dim=1)
    present = torch.arange(k, device=columns.device) < num_negatives[:, None]
    return columns, present


def negative_sums(c: Tensor, pairs: Pairs) -> Tensor:
    """sum_{j in Neg(i)} c_j per row (N, D), in O((N + M) D) without N x M masks: all candidates,
    minus those with the row's id (its positives, or with ``ids_exclude`` its excluded ones), minus
    its own column i + self_offset when that has another id. The MoCo key column is not a candidate."""
    n, m = pairs.num_positives.shape[0], c.shape[0]
    negative = c.sum(dim=0, keepdim=True).expand(n, -1)
    has_ids = pairs.anchor_ids is not None and pairs.candidate_ids is not None
    if has_ids:
        negative = negative - same_id_sums(c, pairs.anchor_ids, pairs.candidate_ids)
    if pairs.self_offset is not None:
        columns = torch.arange(n, device=c.device) + pairs.self_offset
        other = (columns >= 0) & (columns < m)  # the own column exists ...
        columns = columns.clamp(0, max(m - 1, 0))
        if has_ids:  # ... and was not subtracted with the row's id
            other = other & (pairs.candidate_ids[columns] != pairs.anchor_ids)
        negative = negative - c[columns] * other[:, None]
    return negative


def same_id_sums(c: Tensor, anchor_ids: Tensor, candidate_ids: Tensor) -> Tensor:
    """sum_{j : candidate_ids[j] == anchor_ids[i]} c_j per anchor (N, D): each id's sum lands on its
    first position in the sorted candidate ids, then a binary search per anchor."""
    sorted_ids = torch.sort(candidate_ids).values
    per_id = torch.zeros_like(c).index_add(0, torch.searchsorted(sorted_ids, candidate_ids), c)
    where = torch.searchsorted(sorted_ids, anchor_ids).clamp_max(max(c.shape[0] - 1, 0))
    return per_id[where] * (sorted_ids[where] == anchor_ids)[:, None]


def top_negatives(similarities: Tensor, negative: Tensor, k: int) -> Tensor:
    """Mask of the min(k, |Neg(i)|) most similar negatives per row; among equal similarities the
    lower index wins. The dense form (N x M, for `smoothed_targets`): everything above the k-th
    largest value, then the lowest-index columns equal to it until k are taken."""
    scores = similarities.masked_fill(~negative, float("-inf"))
    kth = scores.topk(min(k, scores.shape[1]), dim=1).values[:, -1:]
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
    """The dense soft targets y (N x M'), each row summing to 1, from the dense masks: the written-out
    form of the rule the op uses (`row_target_weights`), for tests."""
    with torch.no_grad():
        dtype = similarities.dtype
        counts = SimpleNamespace(num_positives=positive.sum(1), num_negatives=negative.sum(1))
        w_pos, w_smooth = row_target_weights(counts, smoothing, neighbors, dtype)
        smoothing_set = negative if neighbors is None else top_negatives(similarities, negative, neighbors)
        return positive.to(dtype) * w_pos[:, None] + smoothing_set.to(dtype) * w_smooth[:, None]
