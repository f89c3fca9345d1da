"""The fused Triton backend: smoothed InfoNCE row losses without any N x M tensor.

    triton_row_losses(anchors, candidates, positive_keys, pairs, *, temperature, smoothing,
                      neighbors, deterministic=False, allow_tf32=False) -> Tensor (N,)

Exactly the semantics of `reference.reference_row_losses` (loss.md):

    z_ij = <a_i, c_j> / tau,   l_i = LSE_{j in V(i)} z_ij - sum_j y_ij z_ij,   dl_i/dz_ij = p_ij - y_ij
    y_ij = (1 - alpha) / |P(i)| on P(i);  alpha / |S(i)| on S(i);  0 elsewhere

with S(i) = Neg(i) (``neighbors=None``, uniform) or the ``neighbors`` negatives of largest
similarity <a_i, c_j> (ties to the lower candidate index, selected without gradient).

Who does what (the kernels and their math: `smooth_infonce/ops/kernels.py`):

- Triton, O(N M D) work, O(N) memory: per row the log-sum-exp (online, over candidate tiles), the
  cross term sum_j y_ij s_ij for the positives and the uniform targets, and in neighbour mode the
  running top-k negatives (only their (N, k) indices are kept); in the backward dA and dC by
  recomputing the similarity tiles from the saved LSE.
- torch, O(N k D) or O(N D): the MoCo positive-key column z_i0 = <a_i, k_i> / tau (it joins the
  log-sum-exp, the cross term and the gradients outside the hot loop), and the neighbour targets
  alpha / k (a gather of k candidate rows per anchor, `embedding_bag`; for dC the transposed gather,
  built by a stable sort: deterministic, no atomics).

Backward modes. ``deterministic=False`` (default): when both anchors and candidates need gradients,
one kernel over candidate blocks recomputes each tile once and forms dC in registers and dA with
fp32 atomics (bitwise results may vary between runs). ``deterministic=True``: no atomics anywhere;
dA comes from a second kernel over anchor blocks (one more recompute of the tiles), and every
partial sum is reduced in a fixed order: results are bitwise reproducible. A frozen candidate set
(MoCo queue) never needs atomics.

Precision: dots accumulate in fp32 (fp64 for fp64 inputs); logits, softmax and statistics are fp32
(fp64). fp32 inputs use exact IEEE fp32 dots by default (about 1e-6 relative to an fp64 reference);
``allow_tf32=True`` uses TF32 tensor cores (about 1e-3). fp16 / bf16 inputs use tensor cores; the
gradient's dl/dz tile is rounded to the input dtype before its dot, as FlashAttention does.

Registered as the custom ops ``torch.ops.smooth_infonce.triton_row_losses`` (+ ``_backward``) with
fake (meta) kernels and an autograd formula, so torch.compile treats the loss as one opaque node.
Runs on CUDA tensors, or on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1`` set
before this module is imported; slow, for tests).
"""

import os
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..layout import Pairs
from . import compute_dtype

try:
    import triton
    import triton.language as tl

    from . import kernels as _kernels
except ImportError as _err:  # re-raised with a clear message; `functional.triton_available` sees it
    raise ImportError(
        "the fused backend needs the `triton` package (pip install triton; it ships with CUDA "
        f"builds of torch); use backend='reference' without it. Import error: {_err}"
    ) from _err

# Read at kernel-decoration time by Triton, so it is fixed for the life of this module.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

__all__ = ["triton_row_losses", "nearest_negatives", "INTERPRET"]


# --------------------------------------------------------------------------------------------
# Tile sizes and work splitting
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tiles:
    """Block sizes of one kernel launch."""

    rows: int  # BLOCK_N: anchors per tile
    cols: int  # BLOCK_M: candidates per tile
    d: int  # BLOCK_D: features per block (all of D when one_d_block)
    one_d_block: bool  # all of D (zero-padded) fits one block, held in registers
    num_warps: int
    num_stages: int


def _next_power_of_two(x: int) -> int:
    return 1 << max(0, x - 1).bit_length()


def choose_tiles(kernel: str, dim: int, dtype: torch.dtype, interpret: bool = INTERPRET) -> Tiles:
    """Block sizes for `kernel` in {"forward", "anchor_grad", "candidate_grad"}.

    GPU sizes are chosen for an H100 by reasoning (smem: operand tiles x stages <= ~200 KB;
    registers: the held block plus the fp32 accumulator); they are not autotuned. Every tl.dot
    dimension is a power of two >= 16. Under the interpreter, small tiles and a low one-block limit
    make the tests exercise ragged edges, several tiles and the multi-block D path cheaply.
    """
    padded = max(16, _next_power_of_two(dim))
    if interpret:
        one = padded <= 64
        return Tiles(32, 32, padded if one else 32, one, 4, 1)
    size = torch.empty((), dtype=dtype).element_size()
    one_block_limit, chunk = {2: (256, 128), 4: (128, 64), 8: (64, 32)}[size]
    one = padded <= one_block_limit
    block_d = padded if one else chunk
    if size == 8:  # fp64: no fast tensor-core path, keep tiles small
        return Tiles(32, 32, block_d, one, 4, 1)
    wide = block_d > 128 or size == 4
    if kernel == "forward":
        if size == 2 and not wide:
            return Tiles(128, 64, block_d, one, 8, 3)
        return Tiles(64, 64, block_d, one, 8 if one else 4, 2)
    if kernel == "anchor_grad":
        return Tiles(64, 32 if wide else 64, block_d, one, 8, 2 if not wide else 1)
    return Tiles(32 if wide else 64, 64, block_d, one, 8, 2 if not wide else 1)


_SM_COUNT = {}


def _target_programs(device: torch.device) -> int:
    """Enough programs to fill the GPU: two per SM. Under the interpreter a small number, so that
    the split path (and its merge) is exercised by small test problems."""
    if device.type != "cuda":
        return 8
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return 2 * _SM_COUNT[index]


def _split(blocks: int, tiles: int, device: torch.device) -> Tuple[int, int]:
    """(splits, tiles per split) of the inner loop: when there are too few blocks to fill the GPU
    (MoCo: few anchors, a long queue), the inner dimension is cut into contiguous splits whose
    partial results the host merges (as flash-decoding does)."""
    if tiles == 0:
        return 1, 0
    splits = max(1, min(tiles, -(-_target_programs(device) // max(blocks, 1))))
    per_split = -(-tiles // splits)
    return -(-tiles // per_split), per_split


# --------------------------------------------------------------------------------------------
# Shared preparation of the inputs
# --------------------------------------------------------------------------------------------

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _effective_neighbors(neighbors: Optional[int], smoothing: float) -> int:
    """k of the top-k search; 0 when there is nothing to search (uniform mode, or alpha = 0)."""
    return int(neighbors) if neighbors is not None and smoothing > 0 else 0


@dataclass
class _Problem:
    a: Tensor  # (N, D) anchors, contiguous, kernel dtype
    c: Tensor  # (M, D) candidates, same dtype
    keys: Optional[Tensor]  # (N, D) MoCo positive keys, accumulation dtype
    anchor_ids: Optional[Tensor]
    candidate_ids: Optional[Tensor]
    self_offset: Optional[int]
    acc: torch.dtype
    w_pos: Tensor  # (N,) (1 - alpha) / |P(i)|
    w_neg: Tensor  # (N,) alpha / |Neg(i)| (uniform) or 0 (neighbour mode)
    inv_tau: float
    inv_tau_tensor: Tensor  # (1,) acc dtype: the exact 1/tau for the kernels (a float arg is fp32)
    neighbors: int  # k of the top-k search, 0 if none
    smoothing: float
    precision: str  # tl.dot input_precision for fp32 operands
    upcast: bool  # bf16 under the interpreter: compute on fp32 copies of the tiles

    @property
    def kernel_flags(self) -> dict:
        return dict(
            HAS_IDS=self.anchor_ids is not None and self.candidate_ids is not None,
            HAS_SELF=self.self_offset is not None,
            UPCAST=self.upcast,
            PRECISION=self.precision,
            ACC_DTYPE=tl.float64 if self.acc == torch.float64 else tl.float32,
        )

    def ids(self) -> Tuple[Tensor, Tensor]:
        """Id pointers for the kernels (a placeholder tensor when there are none)."""
        if self.anchor_ids is None or self.candidate_ids is None:
            return self.w_pos, self.w_pos
        return self.anchor_ids, self.candidate_ids

    def wide(self, x: Tensor) -> Tensor:
        return x.to(self.acc)


def _prepare(anchors, candidates, positive_keys, anchor_ids, candidate_ids, self_offset,
             num_positives, num_negatives, temperature, smoothing, neighbors, allow_tf32) -> _Problem:
    for name, t in (("anchors", anchors), ("candidates", candidates), ("positive_keys", positive_keys)):
        if t is None:
            continue
        if t.dtype not in _KERNEL_DTYPES:
            raise TypeError(f"triton backend: {name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
        if t.device.type != "cuda" and not INTERPRET:
            raise RuntimeError(
                f"triton backend: {name} is on {t.device}; the kernels need CUDA tensors "
                "(or TRITON_INTERPRET=1 set before importing smooth_infonce, to run them slowly on CPU)")
    acc = compute_dtype(anchors, candidates, positive_keys)
    a, c = anchors, candidates
    if a.dtype != c.dtype or (acc == torch.float64 and a.dtype != torch.float64):
        a, c = a.to(acc), c.to(acc)  # mixed inputs: compute in the accumulation dtype
    a, c = a.contiguous(), c.contiguous()
    k = _effective_neighbors(neighbors, smoothing)
    w_pos = (1.0 - smoothing) / num_positives.clamp_min(1).to(acc)
    if neighbors is None:
        w_neg = smoothing / num_negatives.clamp_min(1).to(acc)
    else:
        w_neg = torch.zeros_like(w_pos)
    return _Problem(
        a=a, c=c,
        keys=None if positive_keys is None else positive_keys.to(acc),
        anchor_ids=None if anchor_ids is None else anchor_ids.contiguous(),
        candidate_ids=None if candidate_ids is None else candidate_ids.contiguous(),
        self_offset=self_offset, acc=acc,
        w_pos=w_pos.contiguous(), w_neg=w_neg.contiguous(),
        inv_tau=1.0 / temperature,
        inv_tau_tensor=torch.full((1,), 1.0 / temperature, dtype=acc, device=a.device),
        neighbors=k, smoothing=smoothing,
        precision="tf32" if allow_tf32 and a.dtype == torch.float32 else "ieee",
        upcast=INTERPRET and a.dtype == torch.bfloat16,
    )


def _device_guard(t: Tensor):
    return torch.cuda.device(t.device) if t.device.type == "cuda" else _NoGuard()


class _NoGuard:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _row_dot(x: Tensor, y: Tensor) -> Tensor:
    return (x * y).sum(dim=1)


# --------------------------------------------------------------------------------------------
# Neighbour targets (torch side): gather k candidate rows per anchor, and the transpose for dC
# --------------------------------------------------------------------------------------------


def _neighbor_sum(c_wide: Tensor, top_cols: Tensor) -> Tensor:
    """sum_t c_{top_cols[i, t]} per row (N, D); empty slots (index -1) count 0."""
    present = (top_cols >= 0).to(c_wide.dtype)
    return F.embedding_bag(top_cols.clamp_min(0), c_wide, mode="sum", per_sample_weights=present)


def _neighbor_scatter(a_wide: Tensor, top_cols: Tensor, row_coef: Tensor, num_candidates: int) -> Tensor:
    """sum over the rows i that chose column j of row_coef[i] a_i, per column (M, D).

    The (row, column) pairs are sorted by column (stable: rows ascending) and summed per column by
    `embedding_bag` with offsets: a fixed summation order, no atomics (deterministic on CUDA)."""
    k = top_cols.shape[1]
    flat = top_cols.reshape(-1)
    columns, order = torch.sort(flat.clamp_min(0), stable=True)
    rows = torch.div(order, k, rounding_mode="floor")
    weights = row_coef[rows] * (flat[order] >= 0).to(row_coef.dtype)
    starts = torch.searchsorted(columns, torch.arange(num_candidates, device=columns.device))
    return F.embedding_bag(rows, a_wide, starts, mode="sum", per_sample_weights=weights)


def _merge_top_k(split_sims: Tensor, split_cols: Tensor, k: int, ordered: bool = False) -> Tuple[Tensor, Tensor]:
    """Top-k over the splits' top-k lists (S, N, k): largest similarity, ties to the lower column.
    Returns (sims, cols) (N, k); sorted best first when `ordered` (always when S > 1)."""
    splits, n, _ = split_sims.shape
    sims = split_sims.permute(1, 0, 2).reshape(n, splits * k)
    cols = split_cols.permute(1, 0, 2).reshape(n, splits * k).long()
    if splits == 1 and not ordered:
        return sims, cols
    by_col = torch.sort(cols, dim=1, stable=True).indices  # then a stable sort by similarity
    sims, cols = sims.gather(1, by_col), cols.gather(1, by_col)
    best = torch.sort(sims, dim=1, descending=True, stable=True).indices[:, :k]
    return sims.gather(1, best), cols.gather(1, best)


# --------------------------------------------------------------------------------------------
# Forward and backward (the bodies of the custom ops)
# --------------------------------------------------------------------------------------------


def _forward_statistics(p: _Problem) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Run the forward kernel. Returns the per-split (max, sum exp, cross term) (S, N) folded
    into (log-sum-exp parts (S, N), cross (N,)), and the top-k (sims, cols) of each split."""
    (n, dim), m, device = p.a.shape, p.c.shape[0], p.a.device
    tiles = choose_tiles("forward", dim, p.a.dtype)
    row_blocks, col_tiles = triton.cdiv(n, tiles.rows), triton.cdiv(m, tiles.cols)
    splits, per_split = _split(row_blocks, col_tiles, device)
    split_max = torch.empty((splits, n), dtype=p.acc, device=device)
    split_sumexp = torch.empty_like(split_max)
    split_cross = torch.empty_like(split_max)
    k = p.neighbors
    split_top_sims = torch.empty((splits, n, max(k, 1)), dtype=p.acc, device=device)
    split_top_cols = torch.empty((splits, n, max(k, 1)), dtype=torch.int32, device=device)
    anchor_ids, candidate_ids = p.ids()
    with _device_guard(p.a):
        _kernels.forward_kernel[(row_blocks, splits)](
            p.a, p.c, anchor_ids, candidate_ids, p.w_pos, p.w_neg, p.inv_tau_tensor,
            split_max, split_sumexp, split_cross, split_top_sims, split_top_cols,
            n, m, dim, p.a.stride(0), p.c.stride(0), p.self_offset or 0, per_split,
            BLOCK_N=tiles.rows, BLOCK_M=tiles.cols, BLOCK_D=tiles.d, ONE_D_BLOCK=tiles.one_d_block,
            NEIGHBORS=k, NEIGHBORS_PAD=max(2, _next_power_of_two(k)), **p.kernel_flags,
            num_warps=tiles.num_warps, num_stages=tiles.num_stages,
        )
    log_parts = split_max + torch.log(split_sumexp)
    return log_parts, split_cross.sum(0), split_top_sims, split_top_cols


def _forward(p: _Problem) -> Tuple[Tensor, Tensor, Tensor]:
    """(row losses, row log-sum-exp, neighbour columns (N, k))."""
    n = p.a.shape[0]
    log_parts, cross, split_top_sims, split_top_cols = _forward_statistics(p)
    key_logits = None
    if p.keys is not None:  # MoCo: the positive column 0 joins the log-sum-exp as one more part
        key_logits = _row_dot(p.wide(p.a), p.keys) * p.inv_tau
        log_parts = torch.cat([key_logits[None], log_parts])
    lse = torch.logsumexp(log_parts, dim=0)
    losses = lse - cross * p.inv_tau
    if key_logits is not None:
        losses = losses - p.w_pos * key_logits
    top_cols = torch.empty((n, 0), dtype=torch.long, device=p.a.device)
    if p.neighbors:  # neighbour targets alpha / k on the k selected columns
        _, top_cols = _merge_top_k(split_top_sims, split_top_cols, p.neighbors)
        neighbor_sims = _row_dot(p.wide(p.a), _neighbor_sum(p.wide(p.c), top_cols))
        losses = losses - (p.smoothing / p.neighbors * p.inv_tau) * neighbor_sims
    return losses, lse, top_cols


def _backward(p: _Problem, grad: Tensor, lse: Tensor, top_cols: Tensor, deterministic: bool,
              need_anchor_grad: bool, need_candidate_grad: bool, need_key_grad: bool):
    (n, dim), m, device = p.a.shape, p.c.shape[0], p.a.device
    grad = grad.to(p.acc).contiguous()
    lse = lse.to(p.acc).contiguous()
    anchor_ids, candidate_ids = p.ids()
    # The kernels see g / scale with scale a power of two >= max |g| (exact): the dl/dz tiles they
    # round to fp16 then keep their range instead of underflowing when g is small (a mean over a
    # large batch); the kernel results are multiplied back by scale.
    scale = torch.exp2(torch.ceil(torch.log2(grad.abs().amax().clamp_min(1e-30)))) if n else grad.new_ones(())
    common = (p.a, p.c, anchor_ids, candidate_ids, p.w_pos, p.w_neg, p.inv_tau_tensor, lse, grad / scale)
    da = dc = dk = None

    if need_candidate_grad:  # kernel over candidate blocks; dA fused in with atomics unless deterministic
        tiles = choose_tiles("candidate_grad", dim, p.a.dtype)
        col_blocks, row_tiles = triton.cdiv(m, tiles.cols), triton.cdiv(n, tiles.rows)
        splits, per_split = _split(col_blocks, row_tiles, device)
        atomic = need_anchor_grad and not deterministic
        split_grad = torch.empty((splits, m, dim), dtype=p.acc, device=device)
        da = torch.zeros((n, dim), dtype=p.acc, device=device) if atomic else None
        with _device_guard(p.a):
            _kernels.candidate_grad_kernel[(col_blocks, splits, triton.cdiv(dim, tiles.d))](
                *common, split_grad, da if atomic else split_grad,
                n, m, dim, p.a.stride(0), p.c.stride(0), p.self_offset or 0, per_split,
                BLOCK_N=tiles.rows, BLOCK_M=tiles.cols, BLOCK_D=tiles.d, ONE_D_BLOCK=tiles.one_d_block,
                ATOMIC_ANCHOR_GRAD=atomic, GRAD_SPLIT=p.a.dtype == torch.bfloat16, **p.kernel_flags,
                num_warps=tiles.num_warps, num_stages=tiles.num_stages,
            )
        dc = (split_grad[0] if splits == 1 else split_grad.sum(0)) * scale
        da = None if da is None else da * scale

    if need_anchor_grad and da is None:  # kernel over anchor blocks, no atomics
        tiles = choose_tiles("anchor_grad", dim, p.a.dtype)
        row_blocks, col_tiles = triton.cdiv(n, tiles.rows), triton.cdiv(m, tiles.cols)
        splits, per_split = _split(row_blocks, col_tiles, device)
        split_grad = torch.empty((splits, n, dim), dtype=p.acc, device=device)
        with _device_guard(p.a):
            _kernels.anchor_grad_kernel[(row_blocks, splits, triton.cdiv(dim, tiles.d))](
                *common, split_grad,
                n, m, dim, p.a.stride(0), p.c.stride(0), p.self_offset or 0, per_split,
                BLOCK_N=tiles.rows, BLOCK_M=tiles.cols, BLOCK_D=tiles.d, ONE_D_BLOCK=tiles.one_d_block,
                GRAD_SPLIT=p.a.dtype == torch.bfloat16, **p.kernel_flags, num_warps=tiles.num_warps, num_stages=tiles.num_stages,
            )
        da = (split_grad[0] if splits == 1 else split_grad.sum(0)) * scale

    if p.keys is not None and (need_anchor_grad or need_key_grad):  # MoCo key column
        a_wide = p.wide(p.a)
        key_logits = _row_dot(a_wide, p.keys) * p.inv_tau
        dkey = grad * (torch.exp(key_logits - lse) - p.w_pos)  # dl/dz_i0 = g (p_i0 - y_i0)
        if need_anchor_grad:
            da = da + dkey[:, None] * p.keys * p.inv_tau
        if need_key_grad:
            dk = dkey[:, None] * a_wide * p.inv_tau

    if p.neighbors and (need_anchor_grad or need_candidate_grad):  # the -y part on the k neighbours
        coef = grad * (p.smoothing / p.neighbors * p.inv_tau)
        if need_anchor_grad:
            da = da - coef[:, None] * _neighbor_sum(p.wide(p.c), top_cols)
        if need_candidate_grad:
            dc = dc - _neighbor_scatter(p.wide(p.a), top_cols, coef, m)
    return da, dc, dk


# --------------------------------------------------------------------------------------------
# Custom ops (torch.compile sees one opaque node) and autograd
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("smooth_infonce::triton_row_losses", mutates_args=())
def _row_losses_op(
    anchors: Tensor, candidates: Tensor, positive_keys: Optional[Tensor],
    anchor_ids: Optional[Tensor], candidate_ids: Optional[Tensor], self_offset: Optional[int],
    num_positives: Tensor, num_negatives: Tensor,
    temperature: float, smoothing: float, neighbors: Optional[int],
    deterministic: bool, allow_tf32: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """(row losses (N,), row log-sum-exp (N,), neighbour columns (N, k) int64)."""
    n = anchors.shape[0]
    p = _prepare(anchors, candidates, positive_keys, anchor_ids, candidate_ids, self_offset,
                 num_positives, num_negatives, temperature, smoothing, neighbors, allow_tf32)
    if n == 0:
        empty = anchors.new_empty((0,), dtype=p.acc)
        return empty, empty.clone(), anchors.new_empty((0, p.neighbors), dtype=torch.long)
    return _forward(p)


@_row_losses_op.register_fake
def _row_losses_fake(anchors, candidates, positive_keys, anchor_ids, candidate_ids, self_offset,
                     num_positives, num_negatives, temperature, smoothing, neighbors,
                     deterministic, allow_tf32):
    n, acc = anchors.shape[0], compute_dtype(anchors, candidates, positive_keys)
    k = _effective_neighbors(neighbors, smoothing)
    return (anchors.new_empty((n,), dtype=acc), anchors.new_empty((n,), dtype=acc),
            anchors.new_empty((n, k), dtype=torch.long))


@torch.library.custom_op("smooth_infonce::triton_row_losses_backward", mutates_args=())
def _row_losses_backward_op(
    grad: Tensor, anchors: Tensor, candidates: Tensor, positive_keys: Optional[Tensor],
    anchor_ids: Optional[Tensor], candidate_ids: Optional[Tensor], self_offset: Optional[int],
    num_positives: Tensor, num_negatives: Tensor, log_normalizers: Tensor, neighbor_cols: Tensor,
    temperature: float, smoothing: float, neighbors: Optional[int],
    deterministic: bool, allow_tf32: bool,
    need_anchor_grad: bool, need_candidate_grad: bool, need_key_grad: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """(dA, dC, dK) in the inputs' dtypes; an empty tensor for a gradient not asked for."""
    p = _prepare(anchors, candidates, positive_keys, anchor_ids, candidate_ids, self_offset,
                 num_positives, num_negatives, temperature, smoothing, neighbors, allow_tf32)
    da = dc = dk = None
    if anchors.shape[0] > 0:
        da, dc, dk = _backward(p, grad, log_normalizers, neighbor_cols, deterministic,
                               need_anchor_grad, need_candidate_grad, need_key_grad)
    if need_candidate_grad and dc is None:
        dc = torch.zeros(candidates.shape, dtype=p.acc, device=candidates.device)

    def out(g, like, needed):
        if not needed:
            return like.new_empty((0,))
        return torch.zeros_like(like) if g is None else g.to(like.dtype)

    return (out(da, anchors, need_anchor_grad), out(dc, candidates, need_candidate_grad),
            out(dk, positive_keys if positive_keys is not None else anchors, need_key_grad))


@_row_losses_backward_op.register_fake
def _row_losses_backward_fake(grad, anchors, candidates, positive_keys, anchor_ids, candidate_ids,
                              self_offset, num_positives, num_negatives, log_normalizers,
                              neighbor_cols, temperature, smoothing, neighbors, deterministic,
                              allow_tf32, need_anchor_grad, need_candidate_grad, need_key_grad):
    keys = positive_keys if positive_keys is not None else anchors
    return tuple(torch.empty_like(t) if needed else t.new_empty((0,))
                 for t, needed in ((anchors, need_anchor_grad), (candidates, need_candidate_grad),
                                   (keys, need_key_grad)))


def _setup_context(ctx, inputs, output):
    (anchors, candidates, positive_keys, anchor_ids, candidate_ids, self_offset, num_positives,
     num_negatives, temperature, smoothing, neighbors, deterministic, allow_tf32) = inputs
    _, lse, neighbor_cols = output
    ctx.save_for_backward(anchors, candidates, positive_keys, anchor_ids, candidate_ids,
                          num_positives, num_negatives, lse, neighbor_cols)
    ctx.options = (self_offset, temperature, smoothing, neighbors, deterministic, allow_tf32)
    ctx.mark_non_differentiable(lse, neighbor_cols)


def _backward_formula(ctx, grad_losses, _grad_lse, _grad_cols):
    (anchors, candidates, positive_keys, anchor_ids, candidate_ids, num_positives, num_negatives,
     lse, neighbor_cols) = ctx.saved_tensors
    self_offset, temperature, smoothing, neighbors, deterministic, allow_tf32 = ctx.options
    need_a, need_c, need_k = ctx.needs_input_grad[:3]
    need_k = need_k and positive_keys is not None
    da, dc, dk = torch.ops.smooth_infonce.triton_row_losses_backward(
        grad_losses, anchors, candidates, positive_keys, anchor_ids, candidate_ids, self_offset,
        num_positives, num_negatives, lse, neighbor_cols, temperature, smoothing, neighbors,
        deterministic, allow_tf32, need_a, need_c, need_k)
    return (da if need_a else None, dc if need_c else None, dk if need_k else None) + (None,) * 10


_row_losses_op.register_autograd(_backward_formula, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------


def triton_row_losses(
    anchors: Tensor,
    candidates: Tensor,
    positive_keys: Optional[Tensor],
    pairs: Pairs,
    *,
    temperature: float,
    smoothing: float,
    neighbors: Optional[int],
    deterministic: bool = False,
    allow_tf32: bool = False,
) -> Tensor:
    """Per-row smoothed InfoNCE losses (N,), float32 (float64 for float64 inputs), by the fused
    Triton kernels. Same arguments and values as `reference_row_losses`; differentiable w.r.t.
    anchors, candidates and positive_keys (anchors may be the candidates tensor itself).

    Args:
        deterministic: no atomics in the backward; bitwise reproducible gradients (one more
            recompute of the similarity tiles when anchors and candidates both need gradients).
        allow_tf32: TF32 tensor-core dots for float32 inputs (default: exact IEEE fp32 dots).

    Rows with fewer than ``neighbors`` negatives are rejected by the public API
    (`smooth_infonce(validate=True)`); this op does not synchronise to check, and such a row
    gets its available negatives at alpha / k each.
    """
    if (positive_keys is not None) != pairs.has_positive_key:
        raise ValueError("positive_keys must be given exactly when pairs.has_positive_key")
    if neighbors is not None and neighbors < 1:
        raise ValueError(f"neighbors must be None or >= 1, got {neighbors}")
    losses, _, _ = torch.ops.smooth_infonce.triton_row_losses(
        anchors, candidates, positive_keys, pairs.anchor_ids, pairs.candidate_ids, pairs.self_offset,
        pairs.num_positives, pairs.num_negatives, float(temperature), float(smoothing),
        None if neighbors is None else int(neighbors), bool(deterministic), bool(allow_tf32))
    return losses


@torch.no_grad()
def nearest_negatives(anchors: Tensor, candidates: Tensor, pairs: Pairs, neighbors: int,
                      *, allow_tf32: bool = False) -> Tuple[Tensor, Tensor]:
    """The kernel's neighbour search alone: for each row the ``neighbors`` negatives of largest
    similarity <a_i, c_j>, best first, ties to the lower index. Returns (similarities, columns),
    both (N, k)."""
    p = _prepare(anchors, candidates, None, pairs.anchor_ids, pairs.candidate_ids, pairs.self_offset,
                 pairs.num_positives, pairs.num_negatives, 1.0, 0.5, neighbors, allow_tf32)
    _, _, split_sims, split_cols = _forward_statistics(p)
    return _merge_top_k(split_sims, split_cols, p.neighbors, ordered=True)
