"""Every loss the benchmark times, as setup(problem) -> loss function: the reference op and its peers
on CPU; on GPU the fused Triton kernel, the reference op (eager, bf16 autocast, torch.compile) and
the other libraries (lightly, Inf-CL, memeff), plus the same-run hardware ceilings (a bf16 GEMM and
SDPA of the same size). A provider that cannot run a problem raises Skip with the reason."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from smooth_infonce.ops.reference import reference_row_losses

from .problems import NEIGHBORS, SMOOTHING, TEMPERATURE, views
from .timing import bench_ms


class Skip(Exception):
    pass


# ================================================================================================
# CPU: fp32 CPU tensors
# ================================================================================================

def reference_loss(smoothing, neighbors, backend=reference_row_losses):
    """setup(problem) -> loss function: the mean row loss of ``backend`` on the problem as given."""
    def setup(problem):
        return lambda: problem.row_losses(backend, temperature=TEMPERATURE, smoothing=smoothing,
                                          neighbors=neighbors).mean()
    return setup


def lightly_in_batch(problem):
    from lightly.loss import NTXentLoss

    loss = NTXentLoss(temperature=TEMPERATURE)
    return lambda: loss(*views(problem))


def plain_cross_entropy(problem):
    """The usual SimCLR formulation: full logits, self masked, one positive per row."""
    x = problem.anchors
    n = x.shape[0]
    logits = (x @ x.T) / TEMPERATURE
    logits = logits.masked_fill(torch.eye(n, dtype=torch.bool, device=x.device), float("-inf"))
    target = (torch.arange(n, device=x.device) + n // 2) % n
    return F.cross_entropy(logits, target)


# name -> setup(problem) -> loss function (fp32 CPU tensors, differentiated w.r.t. problem.leaves)
CPU_PROVIDERS = {
    "reference-uniform": reference_loss(SMOOTHING, None),
    "reference-neighbors": reference_loss(SMOOTHING, NEIGHBORS),
    "reference-alpha0": reference_loss(0.0, None),
    "lightly-ntxent": lightly_in_batch,
    "plain-ce": lambda problem: lambda: plain_cross_entropy(problem),
}


def cpu_step(provider, problem):
    """One fwd+bwd of a CPU provider on `problem`, as a closure."""
    fn = CPU_PROVIDERS[provider](problem)
    return lambda: torch.autograd.grad(fn(), problem.leaves)


# ================================================================================================
# GPU: setup(problem) -> (loss function, the problem it runs on)
# ================================================================================================

def triton_loss(dtype, neighbors):
    """The fused kernel on the problem cast to ``dtype``; fp32 measures the exact path (IEEE dots,
    whatever torch's TF32 setting is)."""
    def setup(problem):
        from smooth_infonce.ops.triton import triton_row_losses

        p = problem.cast(dtype)
        return (lambda: p.row_losses(triton_row_losses, temperature=TEMPERATURE, smoothing=SMOOTHING,
                                     neighbors=neighbors, allow_tf32=False).mean()), p
    return setup


def reference_fp32(problem):
    p = problem.cast(torch.float32)
    return reference_loss(SMOOTHING, None)(p), p


def reference_bf16_autocast(problem):
    p = problem.cast(torch.float32)
    loss = reference_loss(SMOOTHING, None)(p)

    def fn():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return loss()

    return fn, p


def reference_compiled(problem):
    p = problem.cast(torch.float32)
    return reference_loss(SMOOTHING, None, backend=torch.compile(reference_row_losses))(p), p


def lightly_ntxent(problem):
    try:
        from lightly.loss import NTXentLoss
    except ImportError:
        raise Skip("lightly not importable (pip install 'smooth-infonce[lightly]')") from None

    p = problem.cast(torch.float32)
    if problem.layout == "inbatch":
        loss = NTXentLoss(temperature=TEMPERATURE)
        return (lambda: loss(*views(p))), p
    if problem.layout == "moco":
        loss = NTXentLoss(temperature=TEMPERATURE, memory_bank_size=(problem.m, problem.dim)).cuda()
        return (lambda: loss(p.anchors, p.keys)), p
    raise Skip("lightly has no two-tower mode")


def infcl(problem):
    try:
        from inf_cl import cal_inf_loss
    except ImportError:
        raise Skip("inf_cl not importable (pip install inf-cl==1.2.1)") from None
    if problem.n != problem.m or problem.layout == "moco":
        raise Skip("Inf-CL needs a square problem (one direction, labels = arange)")
    p = problem.cast(torch.float32)
    q, k = p.anchors, p.candidates  # in-batch: the same tensor on both sides, no self mask
    return (lambda: cal_inf_loss(q, k, scale=1.0 / TEMPERATURE, head_dim=problem.dim)), p


def memeff(problem):
    try:
        from memeff import MemoryEfficientCLIPLoss
    except ImportError:
        raise Skip("memeff not importable (pip install memeff==0.3.1)") from None
    if problem.n != problem.m or problem.layout == "moco":
        raise Skip("memeff is CLIP-style: a square problem")
    p = problem.cast(torch.float32)
    loss = MemoryEfficientCLIPLoss(temperature=TEMPERATURE, normalized_inputs=True, stable=False)
    return (lambda: loss(p.anchors, p.candidates)), p


# name -> setup(problem) -> (loss function, the problem it runs on), or raise Skip with the reason
GPU_PROVIDERS = {
    "triton-uniform": triton_loss(torch.bfloat16, None),
    "triton-neighbors": triton_loss(torch.bfloat16, NEIGHBORS),
    "triton-fp32": triton_loss(torch.float32, None),
    "reference-fp32": reference_fp32,
    "reference-bf16-autocast": reference_bf16_autocast,
    "reference-compiled": reference_compiled,
    "lightly-ntxent": lightly_ntxent,
    "infcl": infcl,
    "memeff": memeff,
}


def s6_triton_loss(p, tau, k):
    """The fused kernel's mean loss on an S6 problem at temperature `tau`, `k` neighbours (None: uniform)."""
    from smooth_infonce.ops.triton import triton_row_losses

    return triton_row_losses(p.anchors, p.candidates, None, p.pairs, temperature=tau, smoothing=SMOOTHING,
                             neighbors=k).mean()


CEILINGS = ("gemm-bf16", "sdpa-bf16")  # same-run hardware ceilings (`ceiling`)


def ceiling(provider, problem, quick):
    """Time of the bf16 GEMM (N x D @ D x M) or SDPA fwd+bwd at sequence N, head dim D."""
    n, m, d = problem.n, problem.m, problem.dim
    a = torch.randn(n, d, device="cuda", dtype=torch.bfloat16)
    c = torch.randn(m, d, device="cuda", dtype=torch.bfloat16)
    if provider == "gemm-bf16":
        ms, runs = bench_ms(lambda: a @ c.T, quick)
        return dict(fwdbwd_ms=ms, runs=runs, op_tflops=2 * n * m * d / ms / 1e9)
    q = a.view(1, 1, n, d).requires_grad_()
    k = c.view(1, 1, m, d).requires_grad_()
    v = torch.randn(1, 1, m, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad_out = torch.randn(1, 1, n, d, device="cuda", dtype=torch.bfloat16)

    def step():
        out = F.scaled_dot_product_attention(q, k, v)
        return torch.autograd.grad(out, (q, k, v), grad_out)

    ms, runs = bench_ms(step, quick)
    fwd_ms, _ = bench_ms(lambda: F.scaled_dot_product_attention(q, k, v), quick)
    return dict(fwdbwd_ms=ms, fwd_ms=fwd_ms, bwd_ms=ms - fwd_ms, runs=runs,
                op_tflops=(4 + 10) * n * m * d / ms / 1e9, note="attention flops: 4NMD fwd + 10NMD bwd")
