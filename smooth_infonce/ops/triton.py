"""The fused Triton backend: smoothed InfoNCE row losses without any N x M tensor.

    triton_row_losses(anchors, candidates, positive_keys, pairs, *, temperature, smoothing,
                      neighbors, deterministic=False, allow_tf32=None) -> Tensor (N,)

Exactly the semantics of `reference.reference_row_losses` (README, "The loss"):

    z_ij = <a_i, c_j> / tau,   l_i = LSE_{j in V(i)} z_ij - sum_j y_ij z_ij,   dl_i/dz_ij = p_ij - y_ij
    y_ij = w_pos[i] on P(i);  w_smooth[i] on S(i);  0 elsewhere

with the per-row weights of `smooth_infonce.ops.row_target_weights` (shared with the reference) and
S(i) = Neg(i) (``neighbors=None``, uniform) or the ``neighbors`` negatives of largest similarity
<a_i, c_j> (ties to the lower candidate index, selected without gradient; all of Neg(i) when it has
fewer).

Who does what (the kernels and their math: `smooth_infonce/ops/kernels.py`):

- Triton, O(N M D) work, O(N) memory: per row the log-sum-exp (online, over candidate tiles), the
  cross term sum_j y_ij s_ij for the positives and the uniform targets, and in neighbour mode the
  running top-k negatives (only their (N, k) indices are kept); in the backward dA and dC by
  recomputing the similarity tiles from the saved LSE.
- torch, O(N k D) or O(N D): the MoCo positive-key column z_i0 = <a_i, k_i> / tau (it joins the
  log-sum-exp, the cross term and the gradients outside the hot loop), and the neighbour targets
  w_smooth[i] on the k selected columns (a gather of k candidate rows per anchor, `embedding_bag`;
  for dC the transposed gather, built by a stable sort: deterministic, no atomics).

Backward modes. ``deterministic=False`` (default): when both anchors and candidates need gradients,
one kernel over candidate blocks recomputes each tile once and forms dC in registers and dA with
fp32 atomics (bitwise results may vary between runs). ``deterministic=True``: no atomics anywhere;
dA comes from a second kernel over anchor blocks (one more recompute of the tiles), and every
partial sum is reduced in a fixed order: results are bitwise reproducible. A frozen candidate set
(MoCo queue) never needs atomics.

Precision: dots accumulate in fp32 (fp64 for fp64 inputs); logits, softmax and statistics are fp32
(fp64). For fp32 inputs ``allow_tf32=None`` (default) follows torch's own switch for fp32 matmuls,
``torch.backends.cuda.matmul.allow_tf32`` (``torch.set_float32_matmul_precision("high")`` turns it
on), so the loss gets the precision the eager loss would get: exact IEEE fp32 dots by default (about
1e-6 relative to an fp64 reference, no tensor cores), TF32 tensor cores (about 1e-3) when torch
allows them; True / False override it (`resolve_allow_tf32`). fp16 / bf16 inputs always use tensor
cores; the gradient's dl/dz tile is rounded to the input dtype before its dot, as FlashAttention
does (split into two bf16 terms for bf16), after scaling it so that its largest possible entry is
2^14 (`GRAD_TILE_HEADROOM`): small entries, such as the uniform targets alpha / |Neg(i)| of a long
queue, then stay out of fp16's subnormal range, where their rounding error was large and had one
sign (undone exactly on the host: powers of two).

A row without any valid column (reachable only unchecked, ``validate=False``) has loss 0 and zero
gradient, as in the reference op.

Tile sizes come from one table per (GPU architecture, dot kind, D range), `TILE_TABLE`, chosen so
that every launch compiles for sm_90 and sm_80 without register spills (checked offline with the
ptxas of the triton wheel: `benchmarks/compile_report.py`, and `tests/test_compile_report.py`).

Speed variants (`KernelVariants`, issue 16 item 9): four choices that only a GPU timing can settle,
each selectable from the host, defaults = the launches described above. ``topk`` ("fused" /
"two_pass": the neighbour search in its own pass, so the statistics loop is pipelined), ``grad_d``
("table" / "one_block": one recompute of the similarity tile for the gradients of a streamed D),
``atomics`` ("atom" / "red": fire-and-forget PTX reductions for the fused dA), ``splits``
("two_per_sm" / "occupancy": the split count from the compiled kernel's registers and shared
memory). Select them with ``with kernel_variants(topk="two_pass"): ...``, `set_kernel_variants`, or
the environment variable SMOOTH_INFONCE_KERNEL_VARIANTS="topk=two_pass,atomics=red" (read at import).
`benchmarks/kernel_throughput.py --variants` times each against the default (the GPU check's
`variants` stage); `benchmarks/compile_report.py --set variants` compiles them offline.

Registered as the custom ops ``torch.ops.smooth_infonce.triton_row_losses`` (+ ``_backward``) with
fake (meta) kernels and an autograd formula, so torch.compile treats the loss as one opaque node.
The ops' bodies consult the first-use self-check (`smooth_infonce.self_check`): the first call of a
new kind (`kind_of`) probes the kernel against the reference op; a kind that fails runs the reference.
Runs on CUDA tensors, or on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1`` set
before this module is imported; slow, for tests).
"""

import contextlib
import inspect
import os
from dataclasses import dataclass
from typing import Dict, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import self_check
from ..layout import Pairs
from . import compute_dtype, padded_dim, row_target_weights

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

__all__ = ["triton_row_losses", "nearest_negatives", "resolve_allow_tf32", "TILE_TABLE", "INTERPRET",
           "KernelVariants", "kernel_variants", "set_kernel_variants", "current_kernel_variants"]


def resolve_allow_tf32(allow_tf32: Optional[bool]) -> bool:
    """TF32 dots for fp32 inputs? ``None`` follows torch's fp32 matmul setting
    (``torch.backends.cuda.matmul.allow_tf32``, i.e. ``torch.get_float32_matmul_precision() !=
    "highest"``), so the loss is as precise as an eager ``a @ c.T`` would be; True / False force it."""
    if allow_tf32 is None:
        return bool(torch.backends.cuda.matmul.allow_tf32)
    return bool(allow_tf32)


# --------------------------------------------------------------------------------------------
# Speed variants (issue 16, item 9): selectable from the host, defaults = the launches above
# --------------------------------------------------------------------------------------------

VARIANT_CHOICES: Dict[str, Tuple[str, ...]] = {  # field: (default, other choices...)
    "topk": ("fused", "two_pass"),
    "grad_d": ("table", "one_block"),
    "atomics": ("atom", "red"),
    "splits": ("two_per_sm", "occupancy"),
}
VARIANTS_ENV = "SMOOTH_INFONCE_KERNEL_VARIANTS"


@dataclass(frozen=True)
class KernelVariants:
    """Which implementation of four speed-relevant choices the launches use. Each default is the
    behaviour before the variants existed (the same launches, bit for bit); each alternative answers
    a speed risk that only a GPU run can settle (benchmarks/kernel_throughput.py --variants times them):

    - ``topk``: "fused" (default) keeps the neighbour search in the forward kernel's column loop; its
      data-dependent insertion loop (`kernels._update_top_k`) keeps Triton from software-pipelining
      that loop. "two_pass": the statistics pass is the uniform-mode kernel (no search: pipelined),
      then a search-only pass (STATS=False: no exp / log-sum-exp work) finds the top-k; the
      similarity tiles are formed twice.
    - ``grad_d``: "table" (default) writes the gradients of a streamed D in TILE_TABLE's output
      blocks, one program per block along grid axis 2, each recomputing the similarity tile (twice
      at D 256 bf16, six times at D 768). "one_block": one output block as wide as `ONE_BLOCK_GRAD`
      allows (all of D up to 256 for 16-bit inputs, 128 for TF32), with smaller tiles that compile
      without spills: one recompute up to that D, one per 256 features beyond (D 768: three).
    - ``atomics``: "atom" (default): the fused dA adds are tl.atomic_add, which compiles to PTX `atom`
      (returns the old value). "red": an inline-PTX predicated `red.global.add.f32`, fire and forget
      (fp32 on a GPU; under the interpreter and for fp64 it stays tl.atomic_add).
    - ``splits``: "two_per_sm" (default): `_split` plans for two programs per SM. "occupancy": the
      kernel is compiled first (JIT warmup) and its registers, shared memory and warps give the
      programs per SM (cached per compiled configuration, so the split count is fixed before the
      first launch and deterministic mode stays bitwise reproducible across calls; the interpreter
      pretends one program per SM).
    """

    topk: str = "fused"
    grad_d: str = "table"
    atomics: str = "atom"
    splits: str = "two_per_sm"

    def __post_init__(self):
        for name, allowed in VARIANT_CHOICES.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"kernel variant {name}={value!r} is not one of {', '.join(allowed)}")

    @classmethod
    def parse(cls, text: str) -> "KernelVariants":
        """From "topk=two_pass,atomics=red" (the form of SMOOTH_INFONCE_KERNEL_VARIANTS); empty or
        "default": the defaults."""
        fields = {}
        for item in filter(None, (part.strip() for part in (text or "").split(","))):
            if item == "default":
                continue
            name, sep, value = item.partition("=")
            name, value = name.strip(), value.strip()
            if not sep or name not in VARIANT_CHOICES:
                raise ValueError(f"kernel variants {text!r}: {item!r} is not field=value with a field among "
                                 f"{', '.join(VARIANT_CHOICES)}")
            fields[name] = value
        return cls(**fields)

    def text(self) -> str:
        """The non-default fields as parse() reads them ("default" when there are none)."""
        changed = [f"{name}={getattr(self, name)}" for name, allowed in VARIANT_CHOICES.items()
                   if getattr(self, name) != allowed[0]]
        return ",".join(changed) or "default"


_VARIANTS = KernelVariants.parse(os.environ.get(VARIANTS_ENV, ""))
_VARIANTS_TEXT = _VARIANTS.text()  # the self-check's kinds name it on every call: formed once per selection


def current_kernel_variants() -> KernelVariants:
    return _VARIANTS


def set_kernel_variants(variants=None, **fields) -> KernelVariants:
    """Select the variants of later launches (a KernelVariants, a string as `KernelVariants.parse`
    reads, and / or fields); fields not named keep their defaults. Returns the previous selection."""
    global _VARIANTS, _VARIANTS_TEXT
    if isinstance(variants, str):
        variants = KernelVariants.parse(variants)
    base = dict((variants or KernelVariants()).__dict__)
    base.update(fields)
    previous, _VARIANTS = _VARIANTS, KernelVariants(**base)
    _VARIANTS_TEXT = _VARIANTS.text()
    return previous


@contextlib.contextmanager
def kernel_variants(variants=None, **fields):
    """``with kernel_variants(topk="two_pass"): ...``: the launches inside use these variants."""
    previous = set_kernel_variants(variants, **fields)
    try:
        yield _VARIANTS
    finally:
        set_kernel_variants(previous)


# --------------------------------------------------------------------------------------------
# The device, tile sizes and work splitting
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """What the launches are planned for."""

    arch: Optional[int]  # CUDA compute capability as 10 * major + minor (90 = H100); None = interpreter
    sm_count: int  # streaming multiprocessors (the interpreter pretends 4)


_TARGETS: Dict[int, Target] = {}


def _target(device: torch.device) -> Target:
    """The target of tensors on `device`: the Triton interpreter for CPU tensors when it is on,
    the GPU's architecture and SM count for CUDA tensors. (benchmarks/compile_report.py replaces
    this function to plan launches for a GPU that is not there.)"""
    if INTERPRET:
        return Target(None, 4)
    if device.type != "cuda":
        raise RuntimeError(
            f"triton backend: the tensors are on {device}; the kernels need CUDA tensors "
            "(or TRITON_INTERPRET=1 set before importing smooth_infonce, to run them slowly on CPU)")
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _TARGETS:
        props = torch.cuda.get_device_properties(index)
        _TARGETS[index] = Target(10 * props.major + props.minor, props.multi_processor_count)
    return _TARGETS[index]


# Every launch allows ptxas the whole register file of a thread (.maxnreg 255): left to its own
# occupancy heuristic, ptxas capped some kernels (the MoCo forward with top-k) at 128 registers and
# spilled, where 146 registers suffice.
MAX_REGISTERS = 255


@dataclass(frozen=True)
class Tiles:
    """Block sizes of one kernel launch."""

    rows: int  # BLOCK_N: anchors per tile
    cols: int  # BLOCK_M: candidates per tile
    d: int  # BLOCK_D: features per gradient output block (grid axis 2 of the gradient kernels)
    k: int  # BLOCK_K: features per step of the similarity dot when D is streamed
    one_d_block: bool  # all of D (zero-padded) is one block, held in registers: BLOCK_D = BLOCK_K = D
    num_warps: int
    num_stages: int


def _t(rows, cols, warps, stages, chunk=None, out=None):
    """A table entry. chunk = None: all of D is held in registers (one dot per tile); else the
    similarity is accumulated over D in chunks of `chunk` features, and the gradient kernels write
    output blocks of `out` features (None: all of D; fewer means one more recompute per block)."""
    return dict(rows=rows, cols=cols, warps=warps, stages=stages, chunk=chunk, out=out)


# TILE_TABLE[(arch family, dot kind, D range)] = {kernel: _t(BLOCK_N, BLOCK_M, warps, stages, chunk, out)}
#
#   arch family: "sm90" (Hopper and newer: wgmma), "sm80" (Ampere / Ada: mma.sync);
#   dot kind:    "16bit" (fp16 / bf16 inputs), "tf32" (fp32 inputs, TF32 allowed), "ieee" (fp32
#                inputs, exact fp32 dots on the FMA units), "fp64";
#   D range:     the entry serves padded D (D rounded up to a power of two >= 16) up to this value;
#   kernels:     "forward", "anchor_grad" (dA, deterministic backward), "candidate_grad" (dC, and
#                dA with atomics in the default backward).
#
# How they were chosen: no GPU has measured them yet, so nothing is autotuned. Each entry started
# from the tile an H100 FlashAttention-style kernel would use (128 x 64 forward, 64 x 64 backward,
# operands held in registers) and was shrunk (rows first, then pipeline stages, then holding D ->
# streaming it) until ptxas (the one in the triton wheel, triton 3.8 and 3.6) reported zero spills
# for every launch of the issue-8 grid (D in {17, 64, 100, 128, 256}; fp16, bf16, fp32-TF32,
# fp32-IEEE; alpha = 0, uniform, k in {1, 5, 10, 32}; both backward kinds; in-batch 8192, MoCo
# 256 x 65536 with and without ids, two-tower) with every tensor-core dot compiled to wgmma
# (sm_90) or mma (sm_80) and shared memory within the limit: where zero spills needed it, the
# smaller tile was taken. IEEE fp32 dots run on the FMA units, whose Triton lowering keeps a whole
# K slice of both operands in registers per thread: they always stream D, 16 features at a time.
# benchmarks/compile_report.py shows every launch (committed: benchmarks/results/compile_*).
TILE_TABLE: Dict[Tuple[str, str, int], Dict[str, dict]] = {}
_KERNEL_NAMES = ("forward", "anchor_grad", "candidate_grad")


def _fill_table():
    for arch in ("sm90", "sm80"):
        # fp16 / bf16: tensor cores, 2-byte operands. The default backward's kernel (dC + atomic dA)
        # holds two accumulators: 32 anchor rows per step. D = 256: the held operands and the
        # accumulators no longer fit the registers, so D is streamed and the gradients are
        # written in two 128-wide blocks (the similarity tile is recomputed once more).
        # sm_80: 128 forward rows left no register headroom for the k = 32 running top-k (244-254),
        # and the deterministic dA spilled 2 words at 64 x 64 with triton 3.6.
        for d_max in (64, 128):
            TILE_TABLE[arch, "16bit", d_max] = dict(
                forward=_t(128 if arch == "sm90" else 64, 64, 8, 3),
                anchor_grad=_t(64, 64 if arch == "sm90" else 32, 8, 2), candidate_grad=_t(32, 64, 8, 2))
        TILE_TABLE[arch, "16bit", 256] = dict(
            forward=_t(64, 64, 8, 2), anchor_grad=_t(64, 64, 8, 1, chunk=64, out=128),
            candidate_grad=_t(64, 64, 8, 1, chunk=64, out=128))
        TILE_TABLE[arch, "16bit", 1 << 30] = dict(
            forward=_t(64, 64, 8, 2, chunk=64), anchor_grad=_t(64, 64, 8, 1, chunk=64, out=128),
            candidate_grad=_t(64, 64, 8, 1, chunk=64, out=128))
        # fp32 inputs with TF32 tensor cores, 4-byte operands: half the tile of 16-bit. dC + atomic dA
        # with D held reached 255 registers: D is streamed (sm_80: 250 registers with one output
        # block, so two 64-wide ones).
        for d_max in (64, 128):
            TILE_TABLE[arch, "tf32", d_max] = dict(
                forward=_t(64, 64, 8, 2), anchor_grad=_t(64, 32, 8, 1),
                candidate_grad=_t(32, 64, 8, 1, chunk=32) if arch == "sm90" else _t(32, 64, 8, 1, chunk=64, out=64))
        TILE_TABLE[arch, "tf32", 1 << 30] = dict(
            forward=_t(64, 64, 8, 2, chunk=64), anchor_grad=_t(64, 32, 8, 1, chunk=64, out=64),
            candidate_grad=_t(32, 64, 8, 1, chunk=64, out=64))
        # fp32 inputs with IEEE dots (FMA units): D always streamed, 16 features per step; 64-row
        # forward tiles spilled a few words with the running top-k, and ptxas keeps the gradient
        # kernels at 128 registers, so their inner tile is 16 wide
        TILE_TABLE[arch, "ieee", 1 << 30] = dict(
            forward=_t(32, 64, 8, 2, chunk=16), anchor_grad=_t(64, 16, 8, 1, chunk=16, out=64),
            candidate_grad=_t(16, 64, 8, 1, chunk=16, out=64))
        # fp64 (not a GPU-speed path; outside the compile grid): small tiles
        TILE_TABLE[arch, "fp64", 64] = {name: _t(32, 32, 4, 1) for name in _KERNEL_NAMES}
        TILE_TABLE[arch, "fp64", 1 << 30] = {name: _t(32, 32, 4, 1, chunk=32, out=32) for name in _KERNEL_NAMES}


_fill_table()

# The grad_d="one_block" variant (KernelVariants): gradient tiles of the entries that stream D, with
# one output block of up to max_d features (all of D up to that). Smaller tiles than TILE_TABLE's, as
# the accumulators grow with the block: chosen so that ptxas reports zero spills on sm_90 and sm_80
# (benchmarks/compile_report.py --set variants). Dot kinds not listed keep the table's blocks.
# Why 256 and not all of a wider D: at D 768 (padded 1024) on sm_90, bf16, a 512-wide block spilled
# 934-956 words at 8 warps and 366-394 at 16 (the fp32 accumulator alone is 128 registers a thread
# at 64 x 512), and a 1024-wide one spilled about 4,500 words and needed 256 KiB of shared memory
# (above the 227 KiB limit). So D 768 takes three 256-wide blocks (three recomputes, not six).
ONE_BLOCK_GRAD: Dict[Tuple[str, str], dict] = {}
for _arch in ("sm90", "sm80"):
    ONE_BLOCK_GRAD[_arch, "16bit"] = dict(max_d=256, anchor_grad=_t(64, 32, 8, 1, chunk=64),
                                          candidate_grad=_t(32, 64, 8, 1, chunk=64))
    ONE_BLOCK_GRAD[_arch, "tf32"] = dict(max_d=128, anchor_grad=_t(64, 32, 8, 1, chunk=32),
                                         candidate_grad=_t(32, 64, 8, 1, chunk=32))


def _next_power_of_two(x: int) -> int:
    return 1 << max(0, x - 1).bit_length()


def _dot_kind(dtype: torch.dtype, precision: str) -> str:
    if dtype == torch.float64:
        return "fp64"
    if dtype == torch.float32:
        return precision  # "tf32" or "ieee"
    return "16bit"


def choose_tiles(kernel: str, dim: int, dtype: torch.dtype, precision: str = "ieee",
                 arch: Optional[int] = None, grad_d: str = "table") -> Tiles:
    """Block sizes of `kernel` ("forward", "anchor_grad", "candidate_grad") for D = `dim` features
    of `dtype` on `arch` (None: the interpreter), from `TILE_TABLE`.

    Under the interpreter, small tiles make the tests exercise ragged edges, several tiles and
    splits cheaply, and the three D paths: D <= 32 held in one block, D <= 64 streamed in chunks
    into one output block, larger D streamed into several output blocks. Every tl.dot dimension is
    a power of two >= 16.

    grad_d="one_block" (`KernelVariants`): where the gradient kernels would write a streamed D in
    several output blocks, one block (of at most ONE_BLOCK_GRAD's max_d) with ONE_BLOCK_GRAD's
    tiles; under the interpreter: all of D in one block."""
    padded = padded_dim(dim)
    one_block = grad_d == "one_block" and kernel != "forward"
    if arch is None:
        if padded <= 32:
            return Tiles(32, 32, padded, padded, True, 4, 1)
        return Tiles(32, 32, padded if padded <= 64 or one_block else 32, 32, False, 4, 1)
    family = "sm90" if arch >= 90 else "sm80"
    kind = _dot_kind(dtype, precision)
    d_max = min(key[2] for key in TILE_TABLE if key[:2] == (family, kind) and key[2] >= padded)
    e = TILE_TABLE[family, kind, d_max][kernel]
    if e["chunk"] is None:
        return Tiles(e["rows"], e["cols"], padded, padded, True, e["warps"], e["stages"])
    out = min(padded, e["out"] or padded)
    wide = ONE_BLOCK_GRAD.get((family, kind))
    if one_block and wide is not None and out < min(padded, wide["max_d"]):
        e = wide[kernel]
        out = min(padded, wide["max_d"])
    return Tiles(e["rows"], e["cols"], out, min(padded, e["chunk"]), False, e["warps"], e["stages"])


def _split(blocks: int, tiles: int, target: Target, per_sm: int = 2) -> Tuple[int, int]:
    """(splits, tiles per split) of the inner loop: when there are too few blocks to fill the GPU
    (`per_sm` programs per SM, two unless the splits="occupancy" variant computed it; MoCo: few
    anchors, a long queue), the inner dimension is cut into contiguous splits whose partial results
    the host merges (as flash-decoding does)."""
    if tiles == 0:
        return 1, 0
    programs = per_sm * target.sm_count
    splits = max(1, min(tiles, -(-programs // max(blocks, 1))))
    per_split = -(-tiles // splits)
    return -(-tiles // per_split), per_split


REGISTERS_PER_SM = 65536  # sm_70 and newer
_PROGRAMS_PER_SM: Dict[tuple, int] = {}


def _occupancy_key(kernel, args, kwargs) -> tuple:
    """What decides a launch's binary (and so its resources): the kernel, the dtypes of its tensor
    arguments and its options; not the sizes."""
    return (getattr(kernel, "__name__", getattr(getattr(kernel, "fn", None), "__name__", str(kernel))),
            tuple(str(a.dtype) if isinstance(a, Tensor) else None for a in args),
            tuple(sorted((k, str(v)) for k, v in kwargs.items())))


def _programs_per_sm(kernel, grid, args, kwargs, device: torch.device) -> int:
    """Programs of this launch that fit on one SM at once (the splits="occupancy" variant): the
    kernel is compiled without running (the JIT's warmup) and its registers per thread (allocated
    per warp in units of 256), shared memory (plus the 1 KiB the driver reserves per block) and
    warps are set against the SM's register file, shared memory and thread slots. Cached per
    compiled configuration: later calls plan the same splits. The interpreter has no binary: one."""
    key = _occupancy_key(kernel, args, kwargs) + (str(device),)
    if key in _PROGRAMS_PER_SM:
        return _PROGRAMS_PER_SM[key]
    if INTERPRET or not hasattr(kernel, "warmup") or device.type != "cuda":
        per_sm = 1 if INTERPRET else 2
    else:
        compiled = kernel.warmup(*args, grid=grid, **kwargs)
        compiled._init_handles()
        props = torch.cuda.get_device_properties(device)
        warps = compiled.metadata.num_warps
        warp_regs = -(-max(compiled.n_regs, 1) * 32 // 256) * 256
        by_regs = (REGISTERS_PER_SM // warp_regs) // warps
        by_threads = getattr(props, "max_threads_per_multi_processor", 2048) // (32 * warps)
        smem = getattr(props, "shared_memory_per_multiprocessor", 0) or (233472 if props.major >= 9 else 167936)
        by_smem = smem // (compiled.metadata.shared + 1024)
        per_sm = max(1, min(by_regs, by_threads, by_smem))
    _PROGRAMS_PER_SM[key] = per_sm
    return per_sm


def _planned_split(p: "_Problem", kernel, blocks: int, tiles: int, launch) -> Tuple[int, int]:
    """(splits, tiles per split) for `kernel`; `launch(splits, per_split)` gives the (grid, args,
    kwargs) of that split (only read by the occupancy variant, to compile the kernel first)."""
    splits, per_split = _split(blocks, tiles, p.target)
    if p.variants.splits != "occupancy":
        return splits, per_split
    grid, args, kwargs = launch(splits, per_split)
    return _split(blocks, tiles, p.target, _programs_per_sm(kernel, grid, args, kwargs, p.a.device))


# --------------------------------------------------------------------------------------------
# Shared preparation of the inputs
# --------------------------------------------------------------------------------------------

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# The kernels see D rounded up to a multiple of 16 (zero features, a copy of the inputs when D is
# not): rows aligned to 16 elements load as vectors; ragged D (D = 100) cost up to 255 registers
# and a few spills in the gradient kernels for its element-wise masks and scalar loads.
_D_ALIGN = 16
# The backward kernels' dl/dz tiles are scaled so that their largest possible entry is this (see
# `_backward`): a power of two, 4x below fp16's largest finite value (65504), so the tile never
# overflows when rounded to fp16, while alpha / |Neg| targets of a 2^20-entry queue stay normal.
GRAD_TILE_HEADROOM = 2.0 ** 14


@dataclass
class _Problem:
    a: Tensor  # (N, D') anchors, contiguous, kernel dtype, D' = D zero-padded to a multiple of 16
    c: Tensor  # (M, D') candidates, same dtype
    keys: Optional[Tensor]  # (N, D') MoCo positive keys, accumulation dtype
    dim: int  # D, the features of the inputs
    anchor_ids: Optional[Tensor]
    candidate_ids: Optional[Tensor]
    self_offset: Optional[int]
    ids_exclude: bool  # equal ids: not a candidate (instead of a positive)
    acc: torch.dtype
    w_pos: Tensor  # (N,) y on each positive
    w_neg: Tensor  # (N,) y on each negative in the kernels: w_smooth (uniform) or 0 (neighbours)
    w_smooth: Tensor  # (N,) y on each member of S(i)
    inv_tau: float
    inv_tau_tensor: Tensor  # (1,) acc dtype: the exact 1/tau for the kernels (a float arg is fp32)
    neighbors: int  # k of the top-k search, 0 if none
    deterministic: bool  # no atomics in the backward
    precision: str  # tl.dot input_precision for fp32 operands
    target: Target
    upcast: bool  # bf16 under the interpreter: compute on fp32 copies of the tiles
    variants: KernelVariants  # the speed variants selected when the op was called

    @property
    def kernel_flags(self) -> dict:
        return dict(
            HAS_IDS=self.anchor_ids is not None and self.candidate_ids is not None,
            HAS_SELF=self.self_offset is not None,
            IDS_EXCLUDE=self.ids_exclude,
            UPCAST=self.upcast,
            PRECISION=self.precision,
            ACC_DTYPE=tl.float64 if self.acc == torch.float64 else tl.float32,
        )

    def tiles(self, kernel: str) -> Tiles:
        return choose_tiles(kernel, self.a.shape[1], self.a.dtype, self.precision, self.target.arch,
                            self.variants.grad_d)

    def ids(self) -> Tuple[Tensor, Tensor]:
        """Id pointers for the kernels (a placeholder tensor when there are none)."""
        if self.anchor_ids is None or self.candidate_ids is None:
            return self.w_pos, self.w_pos
        return self.anchor_ids, self.candidate_ids

    def wide(self, x: Tensor) -> Tensor:
        return x.to(self.acc)


def _prepare(anchors: Tensor, candidates: Tensor, positive_keys: Optional[Tensor],
             anchor_ids: Optional[Tensor], candidate_ids: Optional[Tensor],
             w_pos: Optional[Tensor], w_smooth: Optional[Tensor], self_offset: Optional[int],
             ids_exclude: bool, temperature: Optional[float], neighbors: int, deterministic: bool,
             allow_tf32: bool) -> _Problem:
    """The kernels' view of the inputs (the fields of `RowLossInputs`). Without targets and
    temperature (`nearest_negatives`: the search alone) the row statistics the forward kernel also
    forms are not used, so the targets are 0 and the logits unscaled."""
    for name, t in (("anchors", anchors), ("candidates", candidates), ("positive_keys", positive_keys)):
        if t is not None and t.dtype not in _KERNEL_DTYPES:
            raise TypeError(f"triton backend: {name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    target = _target(anchors.device)
    acc = compute_dtype(anchors, candidates, positive_keys)
    a, c = anchors, candidates
    if a.dtype != c.dtype or (acc == torch.float64 and a.dtype != torch.float64):
        a, c = a.to(acc), c.to(acc)  # mixed inputs: compute in the accumulation dtype
    keys = None if positive_keys is None else positive_keys.to(acc)
    dim = a.shape[1]
    if dim % _D_ALIGN:  # zero features change no dot product; aligned rows let the kernels load in vectors
        pad = (0, _D_ALIGN - dim % _D_ALIGN)
        a, c = F.pad(a, pad), F.pad(c, pad)
        keys = None if keys is None else F.pad(keys, pad)
    a, c = a.contiguous(), c.contiguous()
    if w_pos is None or w_smooth is None:
        w_pos = w_smooth = torch.zeros(a.shape[0], dtype=acc, device=a.device)
    w_pos, w_smooth = w_pos.to(acc).contiguous(), w_smooth.to(acc).contiguous()
    inv_tau = 1.0 if temperature is None else 1.0 / temperature
    return _Problem(
        a=a, c=c,
        keys=keys, dim=dim,
        anchor_ids=None if anchor_ids is None else anchor_ids.contiguous(),
        candidate_ids=None if candidate_ids is None else candidate_ids.contiguous(),
        self_offset=self_offset, ids_exclude=bool(ids_exclude), acc=acc,
        w_pos=w_pos, w_neg=torch.zeros_like(w_smooth) if neighbors else w_smooth, w_smooth=w_smooth,
        inv_tau=inv_tau, inv_tau_tensor=torch.full((1,), inv_tau, dtype=acc, device=a.device),
        neighbors=int(neighbors), deterministic=bool(deterministic),
        precision="tf32" if allow_tf32 and a.dtype == torch.float32 else "ieee",
        target=target,
        upcast=target.arch is None and a.dtype == torch.bfloat16,
        variants=_VARIANTS,
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
    if c_wide.shape[0] == 0:  # no candidates: every slot is empty
        return c_wide.new_zeros((top_cols.shape[0], c_wide.shape[1]))
    present = (top_cols >= 0).to(c_wide.dtype)
    return F.embedding_bag(top_cols.clamp_min(0), c_wide, mode="sum", per_sample_weights=present)


def _neighbor_scatter(a_wide: Tensor, top_cols: Tensor, row_coef: Tensor, num_candidates: int) -> Tensor:
    """sum over the rows i that chose column j of row_coef[i] a_i, per column (M, D).

    The (row, column) pairs are sorted by column (stable: rows ascending) and summed per column by
    `embedding_bag` with offsets: a fixed summation order, no atomics (deterministic on CUDA)."""
    k = top_cols.shape[1]
    if num_candidates == 0:
        return a_wide.new_zeros((0, a_wide.shape[1]))
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


def _forward_statistics(p: _Problem, stats: bool = True) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Run the forward kernel. Returns the per-split (max, sum exp, cross term) (S, N) folded
    into (log-sum-exp parts (S, N), cross (N,)), and the top-k (sims, cols) of each split.

    topk="two_pass" (`KernelVariants`): the statistics come from the uniform-mode launch (no search)
    and the top-k from a search-only launch (STATS=False); `stats=False` (the search alone,
    `nearest_negatives`) skips the statistics pass there (the parts are then None)."""
    (n, dim), m = p.a.shape, p.c.shape[0]
    tiles = p.tiles("forward")
    row_blocks, col_tiles = triton.cdiv(n, tiles.rows), triton.cdiv(m, tiles.cols)
    anchor_ids, candidate_ids = p.ids()
    kernel = _kernels.forward_kernel

    def make(splits, per_split, k, extra):
        outputs = [torch.empty((splits, n), dtype=p.acc, device=p.a.device) for _ in range(3)]
        outputs += [torch.empty((splits, n, max(k, 1)), dtype=dtype, device=p.a.device)
                    for dtype in (p.acc, torch.int32)]
        args = (p.a, p.c, anchor_ids, candidate_ids, p.w_pos, p.w_neg, p.inv_tau_tensor, *outputs,
                n, m, dim, p.a.stride(0), p.c.stride(0), p.self_offset or 0, per_split)
        kwargs = dict(BLOCK_N=tiles.rows, BLOCK_M=tiles.cols, BLOCK_D=tiles.d, BLOCK_K=tiles.k,
                      ONE_D_BLOCK=tiles.one_d_block,
                      NEIGHBORS=k, NEIGHBORS_PAD=max(2, _next_power_of_two(k)), **p.kernel_flags,
                      num_warps=tiles.num_warps, num_stages=tiles.num_stages, maxnreg=MAX_REGISTERS, **extra)
        return (row_blocks, splits), args, kwargs

    def launch(k, **extra):  # the outputs (max, sum exp, cross, top sims, top cols)
        splits, per_split = _planned_split(p, kernel, row_blocks, col_tiles,
                                           lambda s, per: make(s, per, k, extra))
        grid, args, kwargs = make(splits, per_split, k, extra)
        kernel[grid](*args, **kwargs)
        return args[7:12]

    with _device_guard(p.a):
        if p.neighbors and p.variants.topk == "two_pass":
            split_max = split_sumexp = split_cross = None
            if stats:
                split_max, split_sumexp, split_cross, _, _ = launch(0)
            _, _, _, split_top_sims, split_top_cols = launch(p.neighbors, STATS=False)
        else:
            split_max, split_sumexp, split_cross, split_top_sims, split_top_cols = launch(p.neighbors)
    if split_max is None:
        return None, None, split_top_sims, split_top_cols
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
    # A row without any valid column (possible only unchecked, validate=False): loss 0 and zero
    # gradient, as the reference gives. Its LSE over nothing is -inf; it is kept as +inf for the
    # backward, so that p = exp(-inf - LSE) = 0 there instead of NaN.
    empty = torch.isneginf(lse)
    losses = torch.where(empty, 0.0, losses)
    lse = torch.where(empty, float("inf"), lse)
    top_cols = torch.empty((n, 0), dtype=torch.long, device=p.a.device)
    if p.neighbors:  # neighbour targets w_smooth[i] on the (up to) k selected columns
        _, top_cols = _merge_top_k(split_top_sims, split_top_cols, p.neighbors)
        neighbor_sims = _row_dot(p.wide(p.a), _neighbor_sum(p.wide(p.c), top_cols))
        losses = losses - p.w_smooth * p.inv_tau * neighbor_sims
    return losses, lse, top_cols


def _backward(p: _Problem, grad: Tensor, lse: Tensor, top_cols: Tensor,
              need_anchor_grad: bool, need_candidate_grad: bool, need_key_grad: bool):
    (n, dim), m, device = p.a.shape, p.c.shape[0], p.a.device
    grad = grad.to(p.acc).contiguous()
    lse = lse.to(p.acc).contiguous()
    anchor_ids, candidate_ids = p.ids()
    # The kernels see g * GRAD_TILE_HEADROOM / scale, scale a power of two >= max |g|: every entry
    # of a dl/dz tile, g_i (p_ij - y_ij) with |p_ij - y_ij| <= 1, lies within 2^14 (fp16 holds up to
    # 65504), and the small ones stay out of fp16's subnormals (below 2^-14) when the tile is rounded
    # to fp16: a tiny g (a mean over a large batch) or a tiny target alpha / |Neg(i)| (uniform
    # smoothing over a long queue). Powers of two: exact; the results are multiplied back.
    scale = torch.exp2(torch.ceil(torch.log2(grad.abs().amax().clamp_min(1e-30)))) if n else grad.new_ones(())
    scale = scale / GRAD_TILE_HEADROOM
    common = (p.a, p.c, anchor_ids, candidate_ids, p.w_pos, p.w_neg, p.inv_tau_tensor, lse, grad / scale)
    grad_split = p.a.dtype == torch.bfloat16  # dl/dz as hi + lo bf16 terms (kernels._grad_dot)
    da = dc = dk = None

    if need_candidate_grad and m == 0:
        dc = torch.zeros((0, dim), dtype=p.acc, device=device)
    if need_candidate_grad and m > 0:  # kernel over candidate blocks; dA fused in with atomics unless deterministic
        tiles = p.tiles("candidate_grad")
        col_blocks, row_tiles = triton.cdiv(m, tiles.cols), triton.cdiv(n, tiles.rows)
        atomic = need_anchor_grad and not p.deterministic
        da = torch.zeros((n, dim), dtype=p.acc, device=device) if atomic else None
        extra = {}
        if atomic and p.variants.atomics == "red" and p.acc == torch.float32 and not INTERPRET:
            extra["RED"] = True  # kernels._add_to: PTX red instead of atom (the interpreter cannot run PTX)

        def make(splits, per_split):
            split_grad = torch.empty((splits, m, dim), dtype=p.acc, device=device)
            args = (*common, split_grad, da if atomic else split_grad,
                    n, m, dim, p.a.stride(0), p.c.stride(0), p.self_offset or 0, per_split)
            kwargs = dict(BLOCK_N=tiles.rows, BLOCK_M=tiles.cols, BLOCK_D=tiles.d, BLOCK_K=tiles.k,
                          ONE_D_BLOCK=tiles.one_d_block,
                          ATOMIC_ANCHOR_GRAD=atomic, GRAD_SPLIT=grad_split, **p.kernel_flags,
                          num_warps=tiles.num_warps, num_stages=tiles.num_stages, maxnreg=MAX_REGISTERS, **extra)
            return (col_blocks, splits, triton.cdiv(dim, tiles.d)), args, kwargs

        with _device_guard(p.a):
            splits, per_split = _planned_split(p, _kernels.candidate_grad_kernel, col_blocks, row_tiles, make)
            grid, args, kwargs = make(splits, per_split)
            _kernels.candidate_grad_kernel[grid](*args, **kwargs)
        split_grad = args[len(common)]
        dc = (split_grad[0] if splits == 1 else split_grad.sum(0)) * scale
        da = None if da is None else da * scale

    if need_anchor_grad and da is None:  # kernel over anchor blocks, no atomics
        tiles = p.tiles("anchor_grad")
        row_blocks, col_tiles = triton.cdiv(n, tiles.rows), triton.cdiv(m, tiles.cols)

        def make(splits, per_split):
            split_grad = torch.empty((splits, n, dim), dtype=p.acc, device=device)
            args = (*common, split_grad, n, m, dim, p.a.stride(0), p.c.stride(0), p.self_offset or 0, per_split)
            kwargs = dict(BLOCK_N=tiles.rows, BLOCK_M=tiles.cols, BLOCK_D=tiles.d, BLOCK_K=tiles.k,
                          ONE_D_BLOCK=tiles.one_d_block,
                          GRAD_SPLIT=grad_split, **p.kernel_flags,
                          num_warps=tiles.num_warps, num_stages=tiles.num_stages, maxnreg=MAX_REGISTERS)
            return (row_blocks, splits, triton.cdiv(dim, tiles.d)), args, kwargs

        with _device_guard(p.a):
            splits, per_split = _planned_split(p, _kernels.anchor_grad_kernel, row_blocks, col_tiles, make)
            grid, args, kwargs = make(splits, per_split)
            _kernels.anchor_grad_kernel[grid](*args, **kwargs)
        split_grad = args[len(common)]
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
        coef = grad * p.w_smooth * p.inv_tau
        if need_anchor_grad:
            da = da - coef[:, None] * _neighbor_sum(p.wide(p.c), top_cols)
        if need_candidate_grad:
            dc = dc - _neighbor_scatter(p.wide(p.a), top_cols, coef, m)
    return tuple(None if g is None else g[:, :p.dim].contiguous() for g in (da, dc, dk))


# --------------------------------------------------------------------------------------------
# Custom ops (torch.compile sees one opaque node) and autograd
# --------------------------------------------------------------------------------------------


class RowLossInputs(NamedTuple):
    """The arguments of the custom op ``smooth_infonce::triton_row_losses``, in order. The op's
    schema, its fake kernel, the autograd context and the backward op are all derived from this
    one definition."""

    anchors: Tensor
    candidates: Tensor
    positive_keys: Optional[Tensor]
    anchor_ids: Optional[Tensor]
    candidate_ids: Optional[Tensor]
    w_pos: Tensor  # (N,) target on each positive (`row_target_weights`)
    w_smooth: Tensor  # (N,) target on each member of the smoothing set
    self_offset: Optional[int]
    ids_exclude: bool
    temperature: float
    neighbors: int  # k of the neighbour search; 0: uniform smoothing (or alpha = 0)
    deterministic: bool
    allow_tf32: bool  # resolved (`resolve_allow_tf32`)
    # read by the self-check only (`kind_of`, `smooth_infonce.self_check.kernel_verified`):
    smoothed: bool = True  # alpha > 0: names the kind (the targets themselves are w_pos / w_smooth)
    needs_grad: bool = True  # the call computes gradients: under torch.distributed the ranks agree on its kind


_CHECK_ONLY = ("smoothed", "needs_grad")


class BackwardRequest(NamedTuple):
    """The backward op's arguments before the forward's (`RowLossInputs`)."""

    grad: Tensor  # (N,) upstream gradient of the row losses
    log_normalizers: Tensor  # (N,) the forward's row log-sum-exp
    neighbor_cols: Tensor  # (N, k) the forward's neighbour columns
    need_anchor_grad: bool
    need_candidate_grad: bool
    need_key_grad: bool


_TENSOR_FIELDS = tuple(name for name, kind in RowLossInputs.__annotations__.items()
                       if kind in (Tensor, Optional[Tensor]))
_OPTION_FIELDS = tuple(name for name in RowLossInputs._fields if name not in _TENSOR_FIELDS)


def _with_signature(*structures, returns):
    """Give an ``fn(*args)`` the typed signature of the structures' fields, with their defaults
    (custom_op reads the op schema from it)."""
    def wrap(fn):
        fn.__signature__ = inspect.Signature(
            [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=kind,
                               default=s._field_defaults.get(name, inspect.Parameter.empty))
             for s in structures for name, kind in s.__annotations__.items()],
            return_annotation=returns)
        return fn
    return wrap


_THREE_TENSORS = Tuple[Tensor, Tensor, Tensor]


KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


_KINDS: Dict[tuple, "self_check.Kind"] = {}


def kind_of(x: RowLossInputs) -> self_check.Kind:
    """The self-check's kind of a call (`smooth_infonce.self_check.Kind`): what the launches are
    planned for, the kernels' dtype (as `_prepare` casts), the layout family, the smoothing mode, the
    speed variants selected now, the backward mode and the padded head width (which picks the
    compiled tile configuration). It runs on every call: the facts that decide
    the kind (the planner `_target` among them: the offline tools replace it) are read and looked up,
    and the kind is formed only the first time."""
    keys = x.positive_keys
    facts = (x.anchors.dtype, x.candidates.dtype, None if keys is None else keys.dtype, x.allow_tf32,
             x.anchors.device, x.anchor_ids is None, x.ids_exclude, x.self_offset is None, x.neighbors > 0,
             x.smoothed, x.deterministic, _VARIANTS_TEXT, _target, x.anchors.shape[-1])
    kind = _KINDS.get(facts)
    if kind is None:
        kind = _KINDS[facts] = _new_kind(x)
    return kind


def _new_kind(x: RowLossInputs) -> self_check.Kind:
    for name in ("anchors", "candidates", "positive_keys"):
        t = getattr(x, name)
        if t is not None and t.dtype not in KERNEL_DTYPES:
            raise TypeError(f"triton backend: {name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    acc = compute_dtype(x.anchors, x.candidates, x.positive_keys)
    dtype = acc if acc == torch.float64 or x.anchors.dtype != x.candidates.dtype else x.anchors.dtype
    dtype_name = str(dtype).removeprefix("torch.") + ("-tf32" if dtype == torch.float32 and x.allow_tf32 else "")
    if x.positive_keys is not None:
        layout = "moco_ids" if x.ids_exclude and x.anchor_ids is not None else "moco"
    else:
        layout = "two_tower" if x.self_offset is None else "in_batch"
    smoothing = "neighbors" if x.neighbors else ("uniform" if x.smoothed else "none")
    arch = _target(x.anchors.device).arch
    return self_check.Kind("interpreter" if arch is None else f"sm_{arch}", dtype_name, layout, smoothing,
                           _VARIANTS_TEXT, bool(x.deterministic), padded_dim(x.anchors.shape[-1]))


def _problem(x: RowLossInputs) -> _Problem:
    return _prepare(**{name: value for name, value in x._asdict().items() if name not in _CHECK_ONLY})


def _kernel_forward(x: RowLossInputs) -> Tuple[Tensor, Tensor, Tensor]:
    """The forward op's body when the kernel is trusted: the launches. (Also what the self-check's
    probe runs; tests replace this function to plant a wrong kernel, tests/test_self_check.py.)"""
    p = _problem(x)
    if x.anchors.shape[0] == 0:
        empty = x.anchors.new_empty((0,), dtype=p.acc)
        return empty, empty.clone(), x.anchors.new_empty((0, p.neighbors), dtype=torch.long)
    return _forward(p)


def _kernel_backward(r: BackwardRequest, x: RowLossInputs):
    """The backward op's body when the kernel is trusted: (dA, dC, dK) in the accumulation dtype,
    None where not computed. (Also what the probe runs; tests replace it to plant a wrong kernel.)"""
    p = _problem(x)
    da = dc = dk = None
    if x.anchors.shape[0] > 0:
        da, dc, dk = _backward(p, r.grad, r.log_normalizers, r.neighbor_cols,
                               r.need_anchor_grad, r.need_candidate_grad, r.need_key_grad)
    if r.need_candidate_grad and dc is None:
        dc = torch.zeros(x.candidates.shape, dtype=p.acc, device=x.candidates.device)
    return da, dc, dk


@torch.library.custom_op("smooth_infonce::triton_row_losses", mutates_args=())
@_with_signature(RowLossInputs, returns=_THREE_TENSORS)
def _row_losses_op(*args):
    """(row losses (N,), row log-sum-exp (N,) (+inf for a row without valid columns, so that its
    backward has p = 0), neighbour columns (N, k) int64).

    The self-check decides here, in the op's body, which runs eagerly even inside a compiled graph:
    the kernel for a verified kind (one dict lookup), the reference op for a kind that failed its
    probe (`smooth_infonce.self_check`: the first call of a new kind runs the probe)."""
    x = RowLossInputs(*args)
    if self_check.kernel_verified(kind_of(x), x.anchors.device, x.needs_grad):
        return _kernel_forward(x)
    return self_check.reference_forward(x)


@_row_losses_op.register_fake
def _row_losses_fake(*args):
    x = RowLossInputs(*args)
    n, acc = x.anchors.shape[0], compute_dtype(x.anchors, x.candidates, x.positive_keys)
    return (x.anchors.new_empty((n,), dtype=acc), x.anchors.new_empty((n,), dtype=acc),
            x.anchors.new_empty((n, x.neighbors), dtype=torch.long))


@torch.library.custom_op("smooth_infonce::triton_row_losses_backward", mutates_args=())
@_with_signature(BackwardRequest, RowLossInputs, returns=_THREE_TENSORS)
def _row_losses_backward_op(*args):
    """(dA, dC, dK) in the inputs' dtypes; an empty tensor for a gradient not asked for. The kernel
    or, for a kind that failed its self-check, the reference op's gradients (as the forward op)."""
    r, x = BackwardRequest(*args[:len(BackwardRequest._fields)]), RowLossInputs(*args[len(BackwardRequest._fields):])
    if self_check.kernel_verified(kind_of(x), x.anchors.device):
        da, dc, dk = _kernel_backward(r, x)
    else:
        da, dc, dk = self_check.reference_backward(r, x)

    def out(g, like, needed):  # contiguous whatever the input's strides (the fake kernel says so)
        if not needed:
            return like.new_empty((0,))
        return like.new_zeros(like.shape) if g is None else g.to(like.dtype).contiguous()

    keys = x.positive_keys if x.positive_keys is not None else x.anchors
    return (out(da, x.anchors, r.need_anchor_grad), out(dc, x.candidates, r.need_candidate_grad),
            out(dk, keys, r.need_key_grad))


@_row_losses_backward_op.register_fake
def _row_losses_backward_fake(*args):
    r, x = BackwardRequest(*args[:len(BackwardRequest._fields)]), RowLossInputs(*args[len(BackwardRequest._fields):])
    keys = x.positive_keys if x.positive_keys is not None else x.anchors
    # contiguous gradients, as the real op returns them: not empty_like, which copies the strides
    # of a non-contiguous (say transposed) input and made compiled graphs fail their stride asserts
    return tuple(t.new_empty(t.shape) if needed else t.new_empty((0,))
                 for t, needed in ((x.anchors, r.need_anchor_grad), (x.candidates, r.need_candidate_grad),
                                   (keys, r.need_key_grad)))


def _setup_context(ctx, inputs, output):
    x = RowLossInputs(*inputs)
    _, lse, neighbor_cols = output
    ctx.save_for_backward(*(getattr(x, name) for name in _TENSOR_FIELDS), lse, neighbor_cols)
    ctx.options = {name: getattr(x, name) for name in _OPTION_FIELDS}
    ctx.mark_non_differentiable(lse, neighbor_cols)


def _backward_formula(ctx, grad_losses, _grad_lse, _grad_cols):
    *tensors, lse, neighbor_cols = ctx.saved_tensors
    x = RowLossInputs(**dict(zip(_TENSOR_FIELDS, tensors)), **ctx.options)
    need_a, need_c, need_k = ctx.needs_input_grad[:3]  # anchors, candidates, positive_keys
    need_k = need_k and x.positive_keys is not None
    request = BackwardRequest(grad_losses, lse, neighbor_cols, need_a, need_c, need_k)
    da, dc, dk = torch.ops.smooth_infonce.triton_row_losses_backward(*request, *x)
    grads = (da if need_a else None, dc if need_c else None, dk if need_k else None)
    return grads + (None,) * (len(RowLossInputs._fields) - len(grads))


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
    allow_tf32: Optional[bool] = None,
) -> Tensor:
    """Per-row smoothed InfoNCE losses (N,), float32 (float64 for float64 inputs), by the fused
    Triton kernels. Same arguments and values as `reference_row_losses`; differentiable w.r.t.
    anchors, candidates and positive_keys (anchors may be the candidates tensor itself).

    Args:
        deterministic: no atomics in the backward; bitwise reproducible gradients (one more
            recompute of the similarity tiles when anchors and candidates both need gradients).
        allow_tf32: TF32 tensor-core dots for float32 inputs. None (default) follows torch's
            ``torch.backends.cuda.matmul.allow_tf32`` (off unless
            ``torch.set_float32_matmul_precision("high")``); True / False force it.

    Rows with fewer than ``neighbors`` negatives smooth onto all of them and rows without
    negatives keep all the mass on their positives (`row_target_weights`); the public API rejects
    both unless told otherwise (`smooth_infonce(validate=True)`).
    """
    if (positive_keys is not None) != pairs.has_positive_key:
        raise ValueError("positive_keys must be given exactly when pairs.has_positive_key")
    if neighbors is not None and neighbors < 1:
        raise ValueError(f"neighbors must be None or >= 1, got {neighbors}")
    inputs = row_loss_inputs(anchors, candidates, positive_keys, pairs, temperature=temperature,
                             smoothing=smoothing, neighbors=neighbors, deterministic=deterministic,
                             allow_tf32=allow_tf32)
    losses, _, _ = torch.ops.smooth_infonce.triton_row_losses(*inputs)
    return losses


def row_loss_inputs(anchors: Tensor, candidates: Tensor, positive_keys: Optional[Tensor], pairs: Pairs, *,
                    temperature: float, smoothing: float, neighbors: Optional[int], deterministic: bool = False,
                    allow_tf32: Optional[bool] = None) -> RowLossInputs:
    """The custom op's arguments for a `triton_row_losses` call (the self-check's probe builds its
    own the same way)."""
    acc = compute_dtype(anchors, candidates, positive_keys)
    w_pos, w_smooth = row_target_weights(pairs, float(smoothing), neighbors, acc)
    search = int(neighbors) if neighbors is not None and smoothing > 0 else 0  # nothing to search at alpha 0
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                 for t in (anchors, candidates, positive_keys))
    return RowLossInputs(
        anchors, candidates, positive_keys, pairs.anchor_ids, pairs.candidate_ids,
        w_pos.to(anchors.device), w_smooth.to(anchors.device), pairs.self_offset, bool(pairs.ids_exclude),
        float(temperature), search, bool(deterministic), resolve_allow_tf32(allow_tf32), smoothing > 0, needs_grad)


@torch.no_grad()
def nearest_negatives(anchors: Tensor, candidates: Tensor, pairs: Pairs, neighbors: int,
                      *, allow_tf32: Optional[bool] = None) -> Tuple[Tensor, Tensor]:
    """The kernel's neighbour search alone: for each row the ``neighbors`` negatives of largest
    similarity <a_i, c_j>, best first, ties to the lower index. Returns (similarities, columns),
    both (N, k); a row with fewer negatives has empty slots (similarity -inf, column < 0) last."""
    p = _prepare(anchors=anchors, candidates=candidates, positive_keys=None, anchor_ids=pairs.anchor_ids,
                 candidate_ids=pairs.candidate_ids, w_pos=None, w_smooth=None, self_offset=pairs.self_offset,
                 ids_exclude=pairs.ids_exclude, temperature=None, neighbors=int(neighbors), deterministic=True,
                 allow_tf32=resolve_allow_tf32(allow_tf32))
    _, _, split_sims, split_cols = _forward_statistics(p, stats=False)
    return _merge_top_k(split_sims, split_cols, p.neighbors, ordered=True)
