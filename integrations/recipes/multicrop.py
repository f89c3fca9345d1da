"""SSLight's pair-weighted multi-crop loss, for DINO and SwAV (toolkit-free: torch only); the loss
is stated in docs/loss.md, "SSLight's multi-crop loss (DINO, SwAV)". In brief:

Views come globals first, then locals: v = 0 .. G-1 are the G global crops, v = G .. V-1 the
local ones. Only global views give targets (DINO's teacher sees the globals only; SwAV assigns
codes to crops 0 and 1), a view is never its own target, and no pair has a local target:

    l(a, v) = mean over the batch b of  -sum_k target_a[b, k] * log p_v[b, k]
    L       = lambda_gg * mean_{a != v both global} l(a, v) + lambda_gl * mean_{a global, v local} l(a, v)

DINO: target_a = softmax((teacher(x_a) - centre) / tau_t), log p_v = log_softmax(student(x_v) / tau_s).
SwAV: target_a = the Sinkhorn codes of global view a, log p_v = log_softmax(prototype scores of v / tau).
``loss_weights = (lambda_gg, lambda_gl)`` (SSLight: (0.4, 0.6)); None is the plain mean over all
G (V - 1) pairs, which is what lightly's and solo-learn's DINO and SwAV losses compute (with
G = 2 and L locals that is (1 / (1 + L), L / (1 + L))). The toolkit adapters bring their own
centre, temperature schedule and Sinkhorn; this module holds only the weighting.

Example:
    >>> import torch
    >>> from smooth_infonce.integrations.recipes.multicrop import multicrop_cross_entropy, pair_weights
    >>> weights = pair_weights(num_global=2, num_local=6, loss_weights=(0.4, 0.6))
    >>> [round(w, 12) for w in weights[0][:3]], round(sum(map(sum, weights)), 12)  # 0.2 per global pair, 0.05 per local
    ([0.0, 0.2, 0.05], 1.0)
    >>> targets = [torch.softmax(torch.randn(4, 10), -1) for _ in range(2)]
    >>> log_probs = [torch.log_softmax(torch.randn(4, 10), -1) for _ in range(8)]
    >>> loss = multicrop_cross_entropy(targets, log_probs, weights)
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

PairWeights = Tuple[Tuple[float, ...], ...]
Views = Union[Tensor, Sequence[Tensor]]  # one (B, K) tensor per view, or all of them stacked (V, B, K)


def check_loss_weights(loss_weights: Optional[Sequence[float]], name: str = "loss_weights"
                       ) -> Optional[Tuple[float, float]]:
    """``loss_weights`` as a (global, local) pair of floats, or None; ValueError naming ``name``
    unless both are >= 0 and not both 0. The one check of the pair, wherever it is given (the
    losses, the recipes' MoCo view weights, solo-learn's ``method_kwargs``)."""
    if loss_weights is None:
        return None
    pair = tuple(float(w) for w in loss_weights)
    if len(pair) != 2 or min(pair) < 0 or sum(pair) <= 0:
        raise ValueError(f"{name} must be None or (global, local), both >= 0 and not both 0; got {loss_weights!r}")
    return pair  # type: ignore[return-value]


def pair_weights(num_global: int, num_local: int, loss_weights: Optional[Sequence[float]] = None) -> PairWeights:
    """Weight of each (target view a, predicting view v) pair: ``num_global`` rows (one per
    global target), ``num_global + num_local`` columns (every view), zero where v == a.

    ``loss_weights = (lambda_gg, lambda_gl)`` are shared by the global-global and the
    global-local pairs, normalised to sum to 1 (SSLight's (0.4, 0.6) with 2 globals and 6 locals:
    0.2 per global pair, 0.05 per local pair). None, or no local views: the plain mean over pairs.
    """
    if num_global < 2 or num_local < 0:
        raise ValueError(f"need >= 2 global and >= 0 local views, got {num_global} and {num_local}")
    global_pairs, local_pairs = num_global * (num_global - 1), num_global * num_local
    loss_weights = check_loss_weights(loss_weights)
    if loss_weights is None or num_local == 0:
        per_global = per_local = 1.0 / (global_pairs + local_pairs)
    else:
        lambda_gg, lambda_gl = loss_weights
        total = lambda_gg + lambda_gl
        per_global, per_local = lambda_gg / total / global_pairs, lambda_gl / total / local_pairs
    return tuple(
        tuple(0.0 if v == a else per_global if v < num_global else per_local for v in range(num_global + num_local))
        for a in range(num_global)
    )


def multicrop_cross_entropy(targets: Views, log_probs: Views, weights: Sequence[Sequence[float]]) -> Tensor:
    """``sum_{a, v} weights[a][v] * mean_b(-sum_k targets[a][b, k] * log_probs[v][b, k])``.

    Args:
        targets: one (B, K) distribution per global view (constants: detach them first), or
            them stacked (G, B, K) (taken as is, not copied).
        log_probs: one (B, K) log-distribution per view, globals first, or them stacked (V, B, K).
        weights: `pair_weights` (len(targets) rows, len(log_probs) columns).
    """
    if len(targets) < 1 or len(log_probs) < len(targets):
        raise ValueError(f"need >= 1 target and at least as many views, got {len(targets)} and {len(log_probs)}")
    shape = targets[0].shape
    if len(shape) != 2 or shape[0] == 0:
        raise ValueError(f"targets must be non-empty (B, K) tensors, got {tuple(shape)}")
    for name, tensors in (("targets", targets), ("log_probs", log_probs)):
        bad = [tuple(t.shape) for t in tensors if t.shape != shape]
        if bad:
            raise ValueError(f"every tensor of {name} must have the shape {tuple(shape)} of targets[0], got {bad}")
    weight = torch.as_tensor(weights, dtype=log_probs[0].dtype, device=log_probs[0].device)
    if weight.shape != (len(targets), len(log_probs)):
        raise ValueError(f"weights must be {len(targets)} x {len(log_probs)} (targets x views), "
                         f"got {tuple(weight.shape)}")
    # (targets x views) cross-entropies, each a mean over the batch; one contraction, no B x K x V copy
    cross_entropy = -torch.einsum("abk,vbk->av", _stacked(targets), _stacked(log_probs)) / shape[0]
    return (cross_entropy * weight).sum()


def _stacked(views: Views) -> Tensor:
    return views if isinstance(views, Tensor) else torch.stack(list(views))
