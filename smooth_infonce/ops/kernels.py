"""Tiled Triton kernels for the smoothed InfoNCE row losses (docs/loss.md), FlashAttention style.

Notation: s_ij = <a_i, c_j> (the similarity), z_ij = s_ij / tau (the logit), V(i) the valid columns
of row i, P(i) its positives, Neg(i) = V(i) minus P(i). The host passes two per-row target weights
(`smooth_infonce.ops.row_target_weights`)

    w_pos[i] = (1 - alpha_i) / |P(i)|
    w_neg[i] = alpha_i / |Neg(i)|   (uniform smoothing; 0 in neighbour mode, whose targets w_smooth[i]
                                     on the k selected columns are added by the host: an O(N k D) gather)

so that the in-kernel target is y_ij = w_pos[i] on P(i), w_neg[i] on Neg(i), 0 off V(i). That makes
uniform smoothing free: the target is two selects per element, and the cross term sum_j y_ij s_ij
is accumulated in the same pass as the log-sum-exp. Which pairs are valid and positive (`_tile_targets`):
column i + self_offset is not in V(i) (HAS_SELF, in-batch); with ids (HAS_IDS) an equal id marks a
positive, or with IDS_EXCLUDE (MoCo queue with sample ids) a column outside V(i): the row's own sample.

Nothing N x M is ever stored. Each program holds a block of rows (or of columns) in registers and
streams tiles of the other side, recomputing the similarity tile with tl.dot:

- `forward_kernel`, grid (row blocks, column splits): per row and split, the running max and sum of
  exp(z - max) (online log-sum-exp), the cross term, and in neighbour mode the running top-k
  negatives (largest s, ties to the lower column). The host merges the splits.
- `anchor_grad_kernel`, grid (row blocks, column splits, D blocks):
  dA_i = sum_j g_i (p_ij - y_ij) c_j / tau, one partial sum per split (no atomics).
- `candidate_grad_kernel`, grid (column blocks, row splits, D blocks):
  dC_j = sum_i g_i (p_ij - y_ij) a_i / tau, one partial sum per split; with ATOMIC_ANCHOR_GRAD it
  also adds dA with atomics (one recompute of the tile serves both gradients, like
  FlashAttention-2's dQ), else the host runs `anchor_grad_kernel` too (deterministic).

p_ij = exp(z_ij - LSE_i) comes from the saved per-row LSE. The feature dimension D is zero-padded to
a power of two >= 16. With ONE_D_BLOCK all of D is one block: the held block is loaded once and the
similarity tile is one dot. Otherwise the similarity is accumulated over D in chunks of BLOCK_K
features (nothing held), and the gradient kernels write output blocks of BLOCK_D features, one per
program along grid axis 2 (the tile register budget, not the math, decides between the two: see the
host's TILE_TABLE). Dots accumulate in ACC_DTYPE (fp32, fp64 for fp64 inputs); logits, softmax and
statistics are ACC_DTYPE too. UPCAST (bf16 under the Triton interpreter only) widens loaded tiles to
fp32, because the interpreter's bf16 dot is wrong.

Speed variants (the host's `KernelVariants`; the defaults launch exactly the kernels above):
- STATS (forward, default True): False skips steps 2) and 3), leaving a search-only pass. The host's
  topk="two_pass" runs the statistics with NEIGHBORS = 0 (no data-dependent insertion loop inside
  the column loop, so Triton can software-pipeline it) and then this search-only pass.
- RED (candidate_grad, default False): the fused dA adds as PTX `red.global.add.f32` (inline asm,
  `_add_to`) instead of tl.atomic_add, which compiles to `atom` although its result is unused.
- grad_d="one_block" and splits="occupancy" change only the host's tiles and grid, not this code.
"""

import triton
import triton.language as tl

INT32_MAX = tl.constexpr(2147483647)  # "no column" in min-reductions over column indices


@triton.jit
def _load_rows(ptr, stride, rows, n_rows, dims, D, UPCAST: tl.constexpr):
    """Rows `rows`, features `dims` of a row-major (n_rows x D) matrix; zeros outside."""
    offsets = rows.to(tl.int64)[:, None] * stride + dims[None, :]
    tile = tl.load(ptr + offsets, mask=(rows[:, None] < n_rows) & (dims[None, :] < D), other=0.0)
    if UPCAST:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def _grad_dot(acc, dlogits, rows, INPUT_DTYPE: tl.constexpr, SPLIT: tl.constexpr,
              UPCAST: tl.constexpr, PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """acc + dlogits @ rows, the dl/dz tile rounded to the input dtype for the tensor-core dot
    (a no-op for fp32 / fp64). With SPLIT (bf16: 8-bit mantissa) it is rounded as hi + lo, two bf16
    dots, which keeps the gradient as accurate as the eager op's; fp16's single rounding already is."""
    high = dlogits.to(INPUT_DTYPE)
    if SPLIT:
        low = (dlogits - high.to(ACC_DTYPE)).to(INPUT_DTYPE)
    if UPCAST:  # interpreter bf16: keep the roundings, multiply in fp32
        high = high.to(tl.float32)
        if SPLIT:
            low = low.to(tl.float32)
    acc = tl.dot(high, rows, acc, input_precision=PRECISION, out_dtype=ACC_DTYPE)
    if SPLIT:
        acc = tl.dot(low, rows, acc, input_precision=PRECISION, out_dtype=ACC_DTYPE)
    return acc


@triton.jit
def _similarities(x_held, x_ptr, x_stride, x_rows, n_x, y_held, y_ptr, y_stride, y_rows, n_y, D,
                  BLOCK_X: tl.constexpr, BLOCK_Y: tl.constexpr, BLOCK_K: tl.constexpr,
                  ONE_D_BLOCK: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                  ACC_DTYPE: tl.constexpr):
    """The BLOCK_X x BLOCK_Y tile <x_r, y_c>. With ONE_D_BLOCK the two operand tiles are already
    loaded (x_held, y_held); else they are streamed over D in chunks of BLOCK_K features."""
    if ONE_D_BLOCK:
        sims = tl.dot(x_held, tl.trans(y_held), input_precision=PRECISION, out_dtype=ACC_DTYPE)
    else:
        sims = tl.zeros((BLOCK_X, BLOCK_Y), dtype=ACC_DTYPE)
        for d0 in range(0, D, BLOCK_K):
            dims = d0 + tl.arange(0, BLOCK_K)
            x = _load_rows(x_ptr, x_stride, x_rows, n_x, dims, D, UPCAST)
            y = _load_rows(y_ptr, y_stride, y_rows, n_y, dims, D, UPCAST)
            sims = tl.dot(x, tl.trans(y), sims, input_precision=PRECISION, out_dtype=ACC_DTYPE)
    return sims


@triton.jit
def _tile_targets(rows, cols, row_ids, col_ids, w_pos, w_neg, N, M, self_offset,
                  HAS_IDS: tl.constexpr, HAS_SELF: tl.constexpr, IDS_EXCLUDE: tl.constexpr):
    """(valid, negative, y) of a tile. Arguments are broadcastable row / column tensors, so one
    helper serves the row-major tiles and the transposed tiles of the candidate kernel."""
    valid = (rows < N) & (cols < M)
    if HAS_SELF:  # the anchor itself (in-batch layout) is not a candidate
        valid = valid & (cols != rows + self_offset)
    if HAS_IDS and IDS_EXCLUDE:  # equal ids = the row's own sample (MoCo queue): not in V(i)
        valid = valid & (col_ids != row_ids)
    if HAS_IDS and not IDS_EXCLUDE:  # equal ids = a positive
        positive = valid & (col_ids == row_ids)
        negative = valid & (col_ids != row_ids)
        targets = tl.where(positive, w_pos, tl.where(valid, w_neg, 0.0))
    else:  # no in-matrix positive (MoCo queue): every valid column is a negative
        negative = valid
        targets = tl.where(valid, w_neg, 0.0)
    return valid, negative, targets


@triton.jit
def _add_to(ptrs, values, mask, RED: tl.constexpr):
    """*ptrs += values where mask, atomically (relaxed, GPU scope), result unused. RED (fp32 on a GPU
    only): a predicated PTX `red.global.add.f32` per element, the fire-and-forget reduction, where
    tl.atomic_add compiles to `atom` (which returns the old value: a round trip per element)."""
    if RED:
        tl.inline_asm_elementwise(
            "{ .reg .pred p_red; setp.ne.b32 p_red, $3, 0; @p_red red.global.add.f32 [$1], $2; mov.b32 $0, 0; }",
            "=r,l,f,r", [ptrs.to(tl.int64), values, mask.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1)
    else:
        tl.atomic_add(ptrs, values, mask=mask, sem="relaxed")


@triton.jit
def _logit_grads(sims, valid, targets, lse, grad, inv_tau):
    """dl/dz = g * (p - y) on V(i), 0 elsewhere; p = exp(z - LSE) from the saved row LSE."""
    probs = tl.exp(tl.where(valid, sims * inv_tau, float("-inf")) - lse)
    return grad * (probs - targets)


@triton.jit
def _update_top_k(top_sims, top_cols, kth_sim, sims, negative, cols):
    """Merge one tile into each row's top-k negatives (largest similarity; ties: lower column).

    Columns arrive in increasing order, so a column of this tile can only displace an entry if it is
    strictly more similar than the current k-th (`kth_sim`). Candidates are inserted one per row per
    pass, best first; after the first tiles most tiles need zero or one pass.
    """
    entering = negative & (sims > kth_sim[:, None])
    remaining = tl.sum(tl.sum(entering.to(tl.int32), axis=1), axis=0)
    while remaining > 0:
        # best entering column of each row (lowest column among equal similarities)
        best = tl.max(tl.where(entering, sims, float("-inf")), axis=1)
        best_col = tl.min(tl.where(entering & (sims == best[:, None]), cols, INT32_MAX), axis=1)
        has_best = best_col < INT32_MAX
        # it replaces the current k-th entry: least similar, ties -> the higher column
        worst = tl.min(top_sims, axis=1)
        worst_col = tl.max(tl.where(top_sims == worst[:, None], top_cols, -INT32_MAX), axis=1)
        replace = (top_cols == worst_col[:, None]) & has_best[:, None]
        top_sims = tl.where(replace, best[:, None], top_sims)
        top_cols = tl.where(replace, best_col[:, None], top_cols)
        kth_sim = tl.min(top_sims, axis=1)
        entering = entering & (cols != best_col[:, None]) & (sims > kth_sim[:, None])
        remaining = tl.sum(tl.sum(entering.to(tl.int32), axis=1), axis=0)
    return top_sims, top_cols, kth_sim


@triton.jit
def forward_kernel(
    A, C, anchor_ids, candidate_ids, w_pos_ptr, w_neg_ptr, inv_tau_ptr,
    split_max, split_sumexp, split_cross, split_top_sims, split_top_cols,
    N, M, D, stride_a, stride_c, self_offset, tiles_per_split,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
    ONE_D_BLOCK: tl.constexpr, HAS_IDS: tl.constexpr, HAS_SELF: tl.constexpr, IDS_EXCLUDE: tl.constexpr,
    NEIGHBORS: tl.constexpr, NEIGHBORS_PAD: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
    STATS: tl.constexpr = True,
):
    row_block = tl.program_id(0)
    split = tl.program_id(1)
    rows = row_block * BLOCK_N + tl.arange(0, BLOCK_N)
    row_in = rows < N
    inv_tau = tl.load(inv_tau_ptr)
    w_pos = tl.load(w_pos_ptr + rows, mask=row_in, other=0.0)
    w_neg = tl.load(w_neg_ptr + rows, mask=row_in, other=0.0)
    row_ids = rows  # placeholder when there are no ids
    if HAS_IDS:
        row_ids = tl.load(anchor_ids + rows, mask=row_in, other=-2)
    a_held = 0.0
    if ONE_D_BLOCK:  # the anchor block stays in registers for the whole sweep
        a_held = _load_rows(A, stride_a, rows, N, tl.arange(0, BLOCK_D), D, UPCAST)

    # Running row statistics over this split's columns. The max starts finite, so a tile
    # without any valid column rescales by exp(0) instead of exp(-inf - -inf).
    row_max = tl.full((BLOCK_N,), -1e30, dtype=ACC_DTYPE)
    sumexp = tl.zeros((BLOCK_N,), dtype=ACC_DTYPE)
    cross = tl.zeros((BLOCK_N,), dtype=ACC_DTYPE)
    if NEIGHBORS > 0:
        # k slots per row (padded to a power of two with +inf slots that are never replaced);
        # empty slots hold -inf and distinct negative columns.
        slots = tl.arange(0, NEIGHBORS_PAD)
        empty = tl.where(slots < NEIGHBORS, float("-inf"), float("inf")).to(ACC_DTYPE)
        top_sims = tl.zeros((BLOCK_N, NEIGHBORS_PAD), dtype=ACC_DTYPE) + empty[None, :]
        top_cols = tl.zeros((BLOCK_N, NEIGHBORS_PAD), dtype=tl.int32) - 1 - slots[None, :]
        kth_sim = tl.min(top_sims, axis=1)

    col_begin = split * tiles_per_split * BLOCK_M
    col_end = tl.minimum(col_begin + tiles_per_split * BLOCK_M, M)
    for col0 in range(col_begin, col_end, BLOCK_M):
        cols = col0 + tl.arange(0, BLOCK_M)
        col_ids = cols
        if HAS_IDS:
            col_ids = tl.load(candidate_ids + cols, mask=cols < M, other=-1)
        c_held = 0.0
        if ONE_D_BLOCK:
            c_held = _load_rows(C, stride_c, cols, M, tl.arange(0, BLOCK_D), D, UPCAST)
        # 1) similarity tile s = A_blk C_tile^T, and its masks / targets
        sims = _similarities(a_held, A, stride_a, rows, N, c_held, C, stride_c, cols, M, D,
                             BLOCK_N, BLOCK_M, BLOCK_K, ONE_D_BLOCK, UPCAST, PRECISION, ACC_DTYPE)
        valid, negative, targets = _tile_targets(
            rows[:, None], cols[None, :], row_ids[:, None], col_ids[None, :],
            w_pos[:, None], w_neg[:, None], N, M, self_offset, HAS_IDS, HAS_SELF, IDS_EXCLUDE)
        if STATS:
            # 2) online log-sum-exp of z = s / tau over V(i)
            logits = tl.where(valid, sims * inv_tau, float("-inf"))
            new_max = tl.maximum(row_max, tl.max(logits, axis=1))
            sumexp = sumexp * tl.exp(row_max - new_max) + tl.sum(tl.exp(logits - new_max[:, None]), axis=1)
            row_max = new_max
            # 3) cross term sum_j y_ij s_ij (positives and uniform smoothing in one sum)
            cross += tl.sum(targets * sims, axis=1)
        # 4) neighbour mode: running top-k negatives by similarity
        if NEIGHBORS > 0:
            top_sims, top_cols, kth_sim = _update_top_k(top_sims, top_cols, kth_sim, sims,
                                                        negative, cols[None, :])

    out = split * N + rows
    if STATS:
        tl.store(split_max + out, row_max, mask=row_in)
        tl.store(split_sumexp + out, sumexp, mask=row_in)
        tl.store(split_cross + out, cross, mask=row_in)
    if NEIGHBORS > 0:
        top_out = out.to(tl.int64)[:, None] * NEIGHBORS + slots[None, :]
        top_mask = row_in[:, None] & (slots[None, :] < NEIGHBORS)
        tl.store(split_top_sims + top_out, top_sims, mask=top_mask)
        tl.store(split_top_cols + top_out, top_cols, mask=top_mask)


@triton.jit
def anchor_grad_kernel(
    A, C, anchor_ids, candidate_ids, w_pos_ptr, w_neg_ptr, inv_tau_ptr, lse_ptr, grad_ptr,
    split_grad,
    N, M, D, stride_a, stride_c, self_offset, tiles_per_split,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
    ONE_D_BLOCK: tl.constexpr, HAS_IDS: tl.constexpr, HAS_SELF: tl.constexpr, IDS_EXCLUDE: tl.constexpr,
    GRAD_SPLIT: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    row_block = tl.program_id(0)
    split = tl.program_id(1)
    d_block = tl.program_id(2)
    rows = row_block * BLOCK_N + tl.arange(0, BLOCK_N)
    row_in = rows < N
    inv_tau = tl.load(inv_tau_ptr)
    w_pos = tl.load(w_pos_ptr + rows, mask=row_in, other=0.0)
    w_neg = tl.load(w_neg_ptr + rows, mask=row_in, other=0.0)
    lse = tl.load(lse_ptr + rows, mask=row_in, other=0.0)
    grad = tl.load(grad_ptr + rows, mask=row_in, other=0.0)
    row_ids = rows
    if HAS_IDS:
        row_ids = tl.load(anchor_ids + rows, mask=row_in, other=-2)
    a_held = 0.0
    if ONE_D_BLOCK:
        a_held = _load_rows(A, stride_a, rows, N, tl.arange(0, BLOCK_D), D, UPCAST)
    out_dims = d_block * BLOCK_D + tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=ACC_DTYPE)

    col_begin = split * tiles_per_split * BLOCK_M
    col_end = tl.minimum(col_begin + tiles_per_split * BLOCK_M, M)
    for col0 in range(col_begin, col_end, BLOCK_M):
        cols = col0 + tl.arange(0, BLOCK_M)
        col_ids = cols
        if HAS_IDS:
            col_ids = tl.load(candidate_ids + cols, mask=cols < M, other=-1)
        c_held = 0.0
        if ONE_D_BLOCK:
            c_held = _load_rows(C, stride_c, cols, M, tl.arange(0, BLOCK_D), D, UPCAST)
        # recompute the similarity tile, then dl/dz = g (p - y)
        sims = _similarities(a_held, A, stride_a, rows, N, c_held, C, stride_c, cols, M, D,
                             BLOCK_N, BLOCK_M, BLOCK_K, ONE_D_BLOCK, UPCAST, PRECISION, ACC_DTYPE)
        valid, negative, targets = _tile_targets(
            rows[:, None], cols[None, :], row_ids[:, None], col_ids[None, :],
            w_pos[:, None], w_neg[:, None], N, M, self_offset, HAS_IDS, HAS_SELF, IDS_EXCLUDE)
        dlogits = _logit_grads(sims, valid, targets, lse[:, None], grad[:, None], inv_tau)
        # dA_blk += dlogits C_tile (this program's D block)
        c_out = c_held
        if not ONE_D_BLOCK:
            c_out = _load_rows(C, stride_c, cols, M, out_dims, D, UPCAST)
        acc = _grad_dot(acc, dlogits, c_out, C.dtype.element_ty, GRAD_SPLIT, UPCAST, PRECISION, ACC_DTYPE)

    out = (split * N + rows).to(tl.int64)[:, None] * D + out_dims[None, :]
    tl.store(split_grad + out, acc * inv_tau, mask=row_in[:, None] & (out_dims[None, :] < D))


@triton.jit
def candidate_grad_kernel(
    A, C, anchor_ids, candidate_ids, w_pos_ptr, w_neg_ptr, inv_tau_ptr, lse_ptr, grad_ptr,
    split_grad, anchor_grad,
    N, M, D, stride_a, stride_c, self_offset, tiles_per_split,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
    ONE_D_BLOCK: tl.constexpr, HAS_IDS: tl.constexpr, HAS_SELF: tl.constexpr, IDS_EXCLUDE: tl.constexpr,
    ATOMIC_ANCHOR_GRAD: tl.constexpr, GRAD_SPLIT: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
    RED: tl.constexpr = False,
):
    col_block = tl.program_id(0)
    split = tl.program_id(1)
    d_block = tl.program_id(2)
    cols = col_block * BLOCK_M + tl.arange(0, BLOCK_M)
    col_in = cols < M
    inv_tau = tl.load(inv_tau_ptr)
    col_ids = cols
    if HAS_IDS:
        col_ids = tl.load(candidate_ids + cols, mask=col_in, other=-1)
    out_dims = d_block * BLOCK_D + tl.arange(0, BLOCK_D)
    c_held = 0.0
    c_out = 0.0
    if ONE_D_BLOCK:
        c_held = _load_rows(C, stride_c, cols, M, tl.arange(0, BLOCK_D), D, UPCAST)
        c_out = c_held
    elif ATOMIC_ANCHOR_GRAD:
        c_out = _load_rows(C, stride_c, cols, M, out_dims, D, UPCAST)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=ACC_DTYPE)

    row_begin = split * tiles_per_split * BLOCK_N
    row_end = tl.minimum(row_begin + tiles_per_split * BLOCK_N, N)
    for row0 in range(row_begin, row_end, BLOCK_N):
        rows = row0 + tl.arange(0, BLOCK_N)
        row_in = rows < N
        w_pos = tl.load(w_pos_ptr + rows, mask=row_in, other=0.0)
        w_neg = tl.load(w_neg_ptr + rows, mask=row_in, other=0.0)
        lse = tl.load(lse_ptr + rows, mask=row_in, other=0.0)
        grad = tl.load(grad_ptr + rows, mask=row_in, other=0.0)
        row_ids = rows
        if HAS_IDS:
            row_ids = tl.load(anchor_ids + rows, mask=row_in, other=-2)
        a_held = 0.0
        if ONE_D_BLOCK:
            a_held = _load_rows(A, stride_a, rows, N, tl.arange(0, BLOCK_D), D, UPCAST)
        # the transposed tile: s^T = C_blk A_tile^T, rows of the tile are candidates
        sims_t = _similarities(c_held, C, stride_c, cols, M, a_held, A, stride_a, rows, N, D,
                               BLOCK_M, BLOCK_N, BLOCK_K, ONE_D_BLOCK, UPCAST, PRECISION, ACC_DTYPE)
        valid, negative, targets = _tile_targets(
            rows[None, :], cols[:, None], row_ids[None, :], col_ids[:, None],
            w_pos[None, :], w_neg[None, :], N, M, self_offset, HAS_IDS, HAS_SELF, IDS_EXCLUDE)
        dlogits_t = _logit_grads(sims_t, valid, targets, lse[None, :], grad[None, :], inv_tau)
        # dC_blk += dlogits^T A_tile
        a_out = a_held
        if not ONE_D_BLOCK:
            a_out = _load_rows(A, stride_a, rows, N, out_dims, D, UPCAST)
        acc = _grad_dot(acc, dlogits_t, a_out, A.dtype.element_ty, GRAD_SPLIT, UPCAST, PRECISION, ACC_DTYPE)
        # fused dA: dA_tile += dlogits C_blk, accumulated across column blocks with atomics
        if ATOMIC_ANCHOR_GRAD:
            part = tl.zeros((BLOCK_N, BLOCK_D), dtype=ACC_DTYPE)
            part = _grad_dot(part, tl.trans(dlogits_t), c_out, C.dtype.element_ty, GRAD_SPLIT, UPCAST,
                             PRECISION, ACC_DTYPE)
            target = anchor_grad + rows.to(tl.int64)[:, None] * D + out_dims[None, :]
            _add_to(target, part * inv_tau, row_in[:, None] & (out_dims[None, :] < D), RED)

    out = (split * M + cols).to(tl.int64)[:, None] * D + out_dims[None, :]
    tl.store(split_grad + out, acc * inv_tau, mask=col_in[:, None] & (out_dims[None, :] < D))
