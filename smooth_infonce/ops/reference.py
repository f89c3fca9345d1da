"""The exact reference op: smoothed InfoNCE in eager PyTorch, the oracle for the fused kernel.

The loss (arXiv 2212.07158, every layout): anchors a_1..a_N, candidates c_1..c_M, for row i the
valid set V(i) (the candidates row i is compared with), the positives P(i) within V(i), the
negatives Neg(i) = V(i) minus P(i), and the smoothing set S(i) within Neg(i):

    z_ij = <a_i, c_j> / tau                                      (the logits)
    p_ij = exp(z_ij) / sum_{l in V(i)} exp(z_il)                 (softmax over V(i) only)
    y_ij = w_pos[i] on P(i),  w_smooth[i] on S(i),  0 elsewhere  (soft target, rows sum to 1)
    l_i  = LSE_i - sum_j y_ij z_ij,   LSE_i = log sum_{j in V(i)} exp(z_ij)
    L    = sum_i w_i l_i / sum_i w_i   (row weights and reduction: `smooth_infonce.functional`)

    dl_i / dz_ij = p_ij - y_ij  on V(i), 0 elsewhere.

w_pos = (1 - alpha) / |P(i)| and w_smooth = alpha / |S(i)| (`smooth_infonce.ops.row_target_weights`).
S(i) is every negative (``neighbors=None``, uniform smoothing) or the min(k, |Neg(i)|) negatives
most similar to a_i (``neighbors=k``; ties to the lower candidate index; selected without gradient:
the targets are constants). A row without negatives keeps all the mass on its positives (plain
InfoNCE: 0 with a single valid column). The MoCo layout adds the positive key logit
z_i0 = <a_i, k_i> / tau as column 0 of V(i) and P(i). Which pairs are valid or positive is the
layout's `Pairs` (`smooth_infonce.layout`).

How it is computed, exactly, in two parts of l_i (each step below is one line of the math):

    l_i = [LSE_i - w_pos[i] sum_{j in P(i)} z_ij]  -  w_smooth[i] <a_i, sum_{j in S(i)} c_j> / tau

- the bracket, InfoNCE with the positives' share of the target, on the N x M logits formed once
  (-inf off V(i), in place), with its gradient p_ij - y_ij written out (`_PositivePart`);
- the smoothing term is linear in z, so it needs no N x M target: the sum of the candidate rows in
  S(i), O((N + M) D): all candidates minus the excluded and the positive ones (uniform), or a
  gather of the k selected rows (neighbours); autograd differentiates it.

fwd + bwd holds the logits (turned into p - y in place) and one more N x M tensor at a time (plus
an N x M bool mask of the positives when the layout has ids, and with neighbours the selection's
two bool masks). It reads nothing back from the device. `smoothed_targets` builds the dense
targets y, the written-out form of the same rule, for tests. Use the Triton backend for anything
large.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Optional

import torch
import torch.nn.functional as F
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
    dtype = compute_dtype(anchors, candidates, positive_keys)
    a, c = anchors.to(dtype), candidates.to(dtype)
    w_pos, w_smooth = row_target_weights(pairs, smoothing, neighbors, dtype)
    key_logits = None  # MoCo: z_i0 = <a_i, k_i> / tau, the positive column 0
    if positive_keys is not None:
        key_logits = (a * positive_keys.to(dtype)).sum(dim=1) / temperature
    select = neighbors if smoothing > 0 else None  # neighbour mode: S(i) is read off the logits

    rows, columns, present = _PositivePart.apply(a, c, key_logits, w_pos, pairs, temperature, select)
    if smoothing == 0:
        return rows
    if neighbors is None:
        smoothing_sum = negative_sums(c, pairs)  # sum_{j in Neg(i)} c_j
    else:  # sum_{j in S(i)} c_j: the selected rows, empty slots weighted 0
        smoothing_sum = F.embedding_bag(columns, c, per_sample_weights=present.to(dtype), mode="sum")
    return rows - w_smooth * (a * smoothing_sum).sum(dim=1) / temperature


class _PositivePart(torch.autograd.Function):
    """LSE_i - w_pos[i] sum_{j in P(i)} z_ij, with z_ij = <a_i, c_j> / tau over V(i); the MoCo key
    logits z_i0 (N,), if given, are one more column of V(i) and P(i).

    The N x M similarities are formed once: with ``neighbors`` the smoothing sets S(i) are read off
    them (returned as `nearest_negatives` gives them, no gradient), then they turn, in place, into z and
    dl_i/dz_ij = p_ij - w_pos[i] [j in P(i)], kept for the backward: with g_i the incoming gradient
    of row i and G_ij = g_i (p_ij - w_pos[i] [j in P(i)]) / tau, dL/dA = G C and dL/dC = G^T A;
    dL/dz_i0 = g_i (p_i0 - w_pos[i]).
    """

    @staticmethod
    def forward(ctx, a, c, key_logits, w_pos, pairs: Pairs, temperature: float, neighbors: Optional[int]):
        similarities = exclude_invalid_(torch.mm(a, c.T), pairs)  # <a_i, c_j>, -inf off V(i)
        positive = positive_mask(pairs, c.shape[0])  # P(i) among the candidates, or None
        columns, present = (None, None)
        if neighbors:  # selected on the similarities themselves (not on z: no ties made by rounding)
            columns, present = nearest_negatives(similarities, positive, pairs.num_negatives, neighbors)
        logits = similarities.div_(temperature)  # z_ij, in place
        positive_logits = 0.0 if positive is None else torch.where(positive, logits, 0.0).sum(dim=1)
        if key_logits is not None:
            positive_logits = positive_logits + key_logits  # sum_{j in P(i)} z_ij

        row_max = logits.amax(dim=1)  # m_i
        if key_logits is not None:
            row_max = torch.maximum(row_max, key_logits)
        p = logits.sub_(row_max[:, None]).exp_()  # exp(z_ij - m_i), in place: the logits are used up
        key_p = None if key_logits is None else torch.exp(key_logits - row_max)  # exp(z_i0 - m_i)
        total = p.sum(dim=1) if key_p is None else p.sum(dim=1) + key_p  # sum over V(i)
        lse = row_max + torch.log(total)
        grad_logits = p.div_(total[:, None])  # p_ij
        if positive is not None:
            grad_logits.addcmul_(positive, w_pos[:, None], value=-1)  # p_ij - y_ij on P(i)
        grad_key = None if key_p is None else key_p / total - w_pos  # p_i0 - y_i0

        ctx.save_for_backward(a, c, grad_logits, grad_key)
        ctx.temperature = temperature
        ctx.mark_non_differentiable(*(t for t in (columns, present) if t is not None))
        return lse - w_pos * positive_logits, columns, present

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_rows, _grad_columns, _grad_present):
        a, c, grad_logits, grad_key = ctx.saved_tensors
        g = grad_logits * (grad_rows / ctx.temperature)[:, None]  # G_ij = g_i (p_ij - y_ij) / tau
        grad_a = g @ c if ctx.needs_input_grad[0] else None
        grad_c = g.T @ a if ctx.needs_input_grad[1] else None
        grad_key = grad_rows * grad_key if ctx.needs_input_grad[2] else None
        return grad_a, grad_c, grad_key, None, None, None, None


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
    second top-k over a rank that puts every value above t_i first and the ones equal to t_i by column.
    """
    scores = similarities if positive is None else similarities.masked_fill(positive, float("-inf"))  # off Neg(i)
    n, m = scores.shape
    slots = min(k, m)
    kth = scores.topk(slots, dim=1).values[:, -1:]  # t_i (-inf with fewer than k negatives)
    above, below = scores > kth, scores < kth
    rank = scores if positive is not None else torch.empty_like(scores)  # reuse the masked copy
    rank.copy_(torch.arange(m, 0, -1, device=scores.device, dtype=scores.dtype).expand(n, m))  # M - j
    rank.masked_fill_(below, -1.0).masked_fill_(above, 2.0 * m)  # above t_i, then ties by column (exact: M < 2^24)
    columns = rank.topk(slots, dim=1).indices  # best first: the real negatives take the first slots
    if slots < k:  # fewer candidates than k: empty slots
        columns = torch.cat([columns, columns.new_zeros(n, k - slots)], dim=1)
    present = torch.arange(k, device=columns.device) < num_negatives[:, None]
    return columns, present


def negative_sums(c: Tensor, pairs: Pairs) -> Tensor:
    """sum_{j in Neg(i)} c_j per row (N, D), in O((N + M) D) without N x M masks: all candidates,
    minus the excluded ones (the own column; the same id with ``ids_exclude``), minus P(i) (the same
    id, without the own column). The MoCo key column is a positive, not a candidate."""
    n, m = pairs.num_positives.shape[0], c.shape[0]
    zero = c.new_zeros(n, c.shape[1])
    has_ids = pairs.anchor_ids is not None and pairs.candidate_ids is not None
    same_id = same_id_sums(c, pairs.anchor_ids, pairs.candidate_ids) if has_ids else zero
    own, own_same_id = zero, zero  # c_{i + self_offset} (0 when outside), and the same if its id is i's
    if pairs.self_offset is not None:
        columns = torch.arange(n, device=c.device) + pairs.self_offset
        inside = (columns >= 0) & (columns < m)
        columns = columns.clamp(0, max(m - 1, 0))
        own = c[columns] * inside[:, None]
        if has_ids:
            own_same_id = own * (pairs.candidate_ids[columns] == pairs.anchor_ids)[:, None]
    if pairs.ids_exclude:
        positive, excluded = zero, own + same_id - own_same_id
    else:
        positive, excluded = same_id - own_same_id, own
    return c.sum(dim=0) - excluded - positive


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
