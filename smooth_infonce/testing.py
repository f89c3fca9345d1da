"""Problem builders shared by the tests, the benchmarks and the compile report: one instance of
each layout, as a backend receives it (anchors, candidates, positive keys, `Pairs`).

    >>> from smooth_infonce.testing import make_problem
    >>> problem = make_problem("moco_ids", 8, 32, 16, seed=0)
    >>> problem.anchors.shape, problem.candidates.shape, problem.pairs.ids_exclude
    (torch.Size([8, 16]), torch.Size([32, 16]), True)
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .layout import Pairs, make_pairs

LAYOUTS = (
    "inbatch",  # SimCLR / multi-crop: `views` views of n // views instances, self excluded
    "supervised",  # class-label ids (each label at least twice), self excluded
    "moco",  # positive key column + a queue of negatives
    "moco_ids",  # MoCo with sample ids: about half the queue entries are earlier keys of the queries
    "twotower",  # row i's positive is column i; extra candidates (id -1 for some) are negatives
)


@dataclass
class Problem:
    """One layout instance. ``candidates is anchors`` in the in-batch layouts."""

    layout: str
    anchors: Tensor
    candidates: Tensor
    keys: Optional[Tensor]
    pairs: Pairs
    row_grad: Tensor  # an upstream gradient for the row losses (float64, in [0.5, 1.5))

    @property
    def same(self) -> bool:
        return self.candidates is self.anchors

    @property
    def n(self) -> int:
        return self.anchors.shape[0]

    @property
    def m(self) -> int:
        return self.candidates.shape[0]

    @property
    def dim(self) -> int:
        return self.anchors.shape[1]

    @property
    def leaves(self) -> list[Tensor]:
        """The inputs that need gradients (each once)."""
        tensors = [self.anchors] if self.same else [self.anchors, self.candidates]
        if self.keys is not None:
            tensors.append(self.keys)
        return [t for t in tensors if t.requires_grad]

    @property
    def useful_flops(self) -> float:
        """8 N M D for forward + backward with one recompute; 4 N M D with a frozen candidate set."""
        return (8 if self.candidates.requires_grad else 4) * self.n * self.m * self.dim

    def cast(self, dtype: torch.dtype) -> "Problem":
        """The same problem in another dtype, with fresh leaves."""
        anchors = self.anchors.detach().to(dtype).requires_grad_(self.anchors.requires_grad)
        candidates = anchors if self.same else (
            self.candidates.detach().to(dtype).requires_grad_(self.candidates.requires_grad))
        keys = None if self.keys is None else self.keys.detach().to(dtype).requires_grad_(self.keys.requires_grad)
        return replace(self, anchors=anchors, candidates=candidates, keys=keys)

    def row_losses(self, backend: Callable[..., Tensor], **options) -> Tensor:
        """``backend(anchors, candidates, keys, pairs, **options)``: any backend of `smooth_infonce.ops`."""
        return backend(self.anchors, self.candidates, self.keys, self.pairs, **options)


def make_problem(
    layout: str,
    n: int,
    m: int,
    dim: int,
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
    seed: int = 0,
    grads: Sequence[bool] = (True, True, True),
    shuffle: bool = True,
    classes: int = 3,
    views: int = 2,
    width: Optional[int] = None,
) -> Problem:
    """Unit-norm random inputs of ``layout`` (see `LAYOUTS`), drawn in float64 on the CPU from
    ``seed`` and cast to ``dtype`` on ``device``. ``grads`` says which of (anchors, candidates, keys)
    need gradients. ``shuffle`` permutes the in-batch ids (else view v of instance b is row
    v * (n // views) + b, the layout of ``torch.cat(views)``). In-batch layouts round n to a
    multiple of ``views`` and set m = n. ``width`` (>= dim): the vectors drawn in ``dim`` dimensions,
    then mapped into ``width`` by a random isometry (orthonormal columns, its own generator), so every
    inner product is kept and every coordinate is used: the same problem at another head width."""
    gen = torch.Generator().manual_seed(seed)
    if width is not None and width < dim:
        raise ValueError(f"width must be at least dim ({dim}), got {width}")
    isometry = None if width is None else torch.linalg.qr(
        torch.randn(width, dim, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64))[0]

    def unit(rows: int) -> Tensor:
        return F.normalize(torch.randn(rows, dim, generator=gen, dtype=torch.float64), dim=1)

    keys = anchor_ids = candidate_ids = self_offset = None
    has_key = exclude = same = False
    if layout in ("inbatch", "supervised"):
        if layout == "inbatch":
            n = max(1, n // views) * views
            ids = torch.arange(n // views).repeat(views)
        else:
            n = max(n, 2 * classes)
            extra = torch.randint(classes, (n - 2 * classes,), generator=gen)
            ids = torch.cat([torch.arange(classes).repeat(2), extra])
        if shuffle:
            ids = ids[torch.randperm(n, generator=gen)]
        m, same, self_offset = n, True, 0
        anchor_ids = candidate_ids = ids
        anchors = candidates = unit(n)
    elif layout in ("moco", "moco_ids"):
        anchors = unit(n)
        keys = F.normalize(anchors + 0.5 * torch.randn(n, dim, generator=gen, dtype=torch.float64), dim=1)
        candidates, has_key = unit(m), True
        if layout == "moco_ids":
            anchor_ids = torch.randperm(n + m, generator=gen)[:n]
            earlier = anchor_ids[torch.randint(0, n, (m,), generator=gen)]
            candidate_ids = torch.where(torch.rand(m, generator=gen) < 0.5, earlier, -1)
            exclude = True
    elif layout == "twotower":
        m = max(m, n)
        anchors, candidates = unit(n), unit(m)
        anchor_ids, candidate_ids = torch.arange(n), torch.arange(m)
        candidate_ids[n:] = torch.where(torch.rand(m - n, generator=gen) < 0.5, -1, candidate_ids[n:])
    else:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")

    def put(x: Tensor) -> Tensor:
        return (x if isometry is None else x @ isometry.T).to(device=device, dtype=dtype)

    def put_ids(x: Optional[Tensor]) -> Optional[Tensor]:
        return None if x is None else x.to(device)

    pairs = make_pairs(n, m, anchor_ids=put_ids(anchor_ids), candidate_ids=put_ids(candidate_ids),
                       self_offset=self_offset, has_positive_key=has_key, ids_exclude=exclude, device=device)
    anchors = put(anchors).requires_grad_(grads[0])
    candidates = anchors if same else put(candidates).requires_grad_(grads[1])
    keys = None if keys is None else put(keys).requires_grad_(grads[2])
    row_grad = (0.5 + torch.rand(n, generator=gen, dtype=torch.float64)).to(device)
    return Problem(layout, anchors, candidates, keys, pairs, row_grad)
