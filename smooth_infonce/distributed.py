"""Gathering candidates across ranks with gradients flowing back to their owners."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


class _GatherWithGrad(torch.autograd.Function):
    """all_gather in the forward; in the backward each rank receives the sum over ranks of the
    gradients of its own slice, so every rank's loss contributes to every rank's embeddings."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        rows = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * rows : (dist.get_rank() + 1) * rows]


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` (same shape on every rank) from all ranks in rank order, differentiably.

    With every rank averaging its own loss, each rank's gradient is ``world_size`` times that of
    the global mean; DDP's gradient averaging then gives exactly the single-process gradient.
    """
    if world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def gather_ids(ids: Tensor) -> Tensor:
    """Concatenate integer ids from all ranks (no gradient)."""
    if world_size() == 1:
        return ids
    parts = [torch.empty_like(ids) for _ in range(world_size())]
    dist.all_gather(parts, ids.contiguous())
    return torch.cat(parts, dim=0)


def check_equal_batch(rows: int) -> None:
    """all_gather needs the same batch size on every rank; say so instead of hanging or garbling."""
    if world_size() == 1:
        return
    sizes = torch.tensor([rows], dtype=torch.long)
    if dist.get_backend() == "nccl":
        sizes = sizes.cuda()
    all_sizes = [torch.empty_like(sizes) for _ in range(world_size())]
    dist.all_gather(all_sizes, sizes)
    found = [int(s) for s in all_sizes]
    if len(set(found)) != 1:
        raise ValueError(f"gather_distributed needs the same batch size on every rank, got {found}")
