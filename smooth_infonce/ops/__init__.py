"""Backends: each computes the per-row losses of one resolved layout, unchecked.

Every backend has the same contract, `(anchors, candidates, positive_keys, pairs, *, temperature,
smoothing, neighbors, **backend_options) -> row losses (N,)`:

- `reference.py`: the literal math in eager PyTorch (materialises N x M), the oracle;
- `triton.py`: the fused backend's host side (tile table, launches, custom op, autograd, and the
  speed variants `KernelVariants` that the GPU check times against the default launches);
- `kernels.py`: its @triton.jit kernels, nothing else.

The arguments were validated by `smooth_infonce.functional`; backends do no checks that read
values back from the device.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def padded_dim(dim: int) -> int:
    """The D the fused kernels are compiled for: ``dim`` rounded up to a power of two, at least 16
    (their tile choice, `ops.triton.tiles`, and a self-check kind's head width)."""
    return max(16, 1 << max(0, dim - 1).bit_length())


def compute_dtype(*tensors: Optional[Tensor]) -> torch.dtype:
    """float64 if any input is float64, else float32: logits are never formed in half precision."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def row_target_weights(pairs, smoothing: float, neighbors: Optional[int], dtype: torch.dtype):
    """Per-row target weights shared by every backend: (w_pos, w_smooth), each (N,).

    y_ij = w_pos[i] on P(i) and w_smooth[i] on S(i), with |S(i)| = |Neg(i)| (uniform) or
    min(k, |Neg(i)|) (neighbours: a row with fewer than k negatives smooths onto all of them).
    A row without negatives has an empty S(i): it keeps all the mass on its positives (alpha_i = 0),
    so its loss is the one plain InfoNCE gives. Strict callers reject both cases before this point
    (`smooth_infonce(validate=True)` with the default ``few_negatives="raise"``).
    """
    negatives = pairs.num_negatives
    set_size = negatives if neighbors is None else negatives.clamp_max(int(neighbors))
    alpha = torch.full(set_size.shape, smoothing, dtype=dtype, device=set_size.device) * (set_size > 0)
    w_pos = (1.0 - alpha) / pairs.num_positives.clamp_min(1).to(dtype)
    w_smooth = alpha / set_size.clamp_min(1).to(dtype)
    return w_pos, w_smooth
