"""Independent oracles: the loss restated row by row with plain Python, not with the code under test.

Each layout is written out as two predicates over (row i, column j) straight from docs/loss.md, and
every row's loss is torch's cross-entropy with a probability target built by a Python loop. The
neighbour set is a brute-force sort of Python floats.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True)


def loop_oracle(
    anchors: torch.Tensor,
    candidates: torch.Tensor,
    is_valid: Callable[[int, int], bool],
    is_positive: Callable[[int, int], bool],
    *,
    temperature: float,
    smoothing: float,
    neighbors: Optional[int],
    positive_keys: Optional[torch.Tensor] = None,
    normalize: bool = True,
) -> torch.Tensor:
    """Per-row smoothed InfoNCE losses, one Python loop iteration per row."""
    if normalize:
        anchors, candidates = unit(anchors), unit(candidates)
        positive_keys = None if positive_keys is None else unit(positive_keys)
    rows = []
    for i in range(anchors.shape[0]):
        columns = [j for j in range(candidates.shape[0]) if is_valid(i, j)]
        sims = [anchors[i] @ candidates[j] for j in columns]
        positive = [is_positive(i, j) for j in columns]
        if positive_keys is not None:  # MoCo: the key is an extra positive column
            sims.insert(0, anchors[i] @ positive_keys[i])
            positive.insert(0, True)
            columns.insert(0, -1)
        negatives = [c for c, p in enumerate(positive) if not p]
        if neighbors is None:
            smoothing_set = negatives
        else:  # brute force: most similar first, lower column index on ties
            ranked = sorted(negatives, key=lambda c: (-float(sims[c]), columns[c]))
            smoothing_set = ranked[:neighbors]
        num_pos = sum(positive)
        target = [0.0] * len(columns)
        for c in range(len(columns)):
            if positive[c]:
                target[c] += (1 - smoothing) / num_pos
            if c in smoothing_set:
                target[c] += smoothing / len(smoothing_set)
        logits = torch.stack(sims) / temperature
        target_t = torch.tensor(target, dtype=logits.dtype)
        rows.append(F.cross_entropy(logits[None], target_t[None]))
    return torch.stack(rows)


def nt_xent_oracle(views: list[torch.Tensor], **kw) -> torch.Tensor:
    """In-batch multi-view: row r = view r // B of image r % B; self excluded; same image = positive."""
    batch = views[0].shape[0]
    z = torch.cat(views)
    return loop_oracle(z, z, lambda i, j: i != j, lambda i, j: i % batch == j % batch, **kw)


def label_oracle(z: torch.Tensor, labels: list[int], **kw) -> torch.Tensor:
    """Supervised in-batch: every other row with the same label is a positive."""
    return loop_oracle(z, z, lambda i, j: i != j, lambda i, j: labels[i] == labels[j], **kw)


def moco_oracle(query: torch.Tensor, key: torch.Tensor, queue: torch.Tensor, **kw) -> torch.Tensor:
    """MoCo: the key is the positive, every queue row a negative."""
    return loop_oracle(query, queue, lambda i, j: True, lambda i, j: False, positive_keys=key, **kw)


def two_tower_oracle(x: torch.Tensor, y: torch.Tensor, **kw) -> torch.Tensor:
    """Two-tower, one direction: row i's positive is column i."""
    return loop_oracle(x, y, lambda i, j: True, lambda i, j: i == j, **kw)
