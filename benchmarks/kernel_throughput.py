"""Kernel throughput benchmark, following the protocol stated in benchmarks/README.md.

GPU (CUDA available): shapes S0..S4 timed, S6 correctness only. Providers side by side in one
process: the fused Triton kernel (uniform and neighbour smoothing, bf16; fp32 IEEE), the reference
op eager (fp32 and bf16 autocast) and under torch.compile (compile time reported separately),
lightly's NTXentLoss (S1, S2; memory-bank mode at S3), Inf-CL and memeff when importable, and the
ceilings of the same run: a bf16 GEMM of the same size and PyTorch's SDPA (flash attention)
fwd+bwd at sequence N, head dim D. Metrics: median fwd and fwd+bwd time (triton.testing.do_bench,
>= 50 runs after warm-up, L2 flushed before every run: cold L2), bwd = fwd+bwd - fwd, peak extra
memory, TFLOP/s with the useful count 8NMD (4NMD for the frozen MoCo queue) charged to every
provider alike, the fraction of the same-run GEMM rate, and accuracy against an fp64 reference
where that fits in memory.

CPU (no CUDA): the reference op against lightly's NTXentLoss and a plain cross-entropy
formulation at SSL sizes (2 x 256 and 2 x 1024 views, D = 128, fp32), fwd+bwd. Time: median of
repeated runs in one process, the providers interleaved round-robin. Memory: peak resident-set
growth (VmHWM - VmRSS) of one fwd+bwd in a fresh subprocess whose inputs and imports are already in
place, with glibc told to mmap every block >= 64 KiB (MALLOC_MMAP_THRESHOLD_), so that resident
memory follows the live tensors.

Writes <out>.json and <out>.png. Without --out, a run never touches the committed results: it goes
to benchmarks/runs/<device-slug>-<date-time>.* (git-ignored); pass --out
benchmarks/results/<name> to record a run.

    .venv/bin/python benchmarks/kernel_throughput.py          # GPU if present, else CPU mode
    .venv/bin/python benchmarks/kernel_throughput.py --quick  # 10 timed runs per number (GPU), 3 (CPU)
    .venv/bin/python benchmarks/kernel_throughput.py --shapes S1,S3 --providers triton-uniform,reference-fp32
    .venv/bin/python benchmarks/kernel_throughput.py --warmup --budget 120 --out DIR/name-compile  # compile only
    .venv/bin/python benchmarks/kernel_throughput.py --tile-candidates --quick --out DIR/name-tiles  # tile table
    .venv/bin/python benchmarks/kernel_throughput.py --variants --quick --out DIR/name-variants  # speed variants

GPU order: the kernels and the GEMM ceiling at every shape first, S6 with them, then the peers, then
torch.compile's reference (the longest compile) last, so a run stopped by --budget keeps what
matters most. The JSON is rewritten after every shape (``"partial": true`` until the run ends).

--warmup compiles the Triton kernels of the benchmark's shapes (every kernel provider at S0-S4 and
every S6 configuration) in parallel processes sharing Triton's on-disk cache, and records per task
the first fwd+bwd (compile + run) and the second (run only): the compile cost of a cold cache,
apart from the run cost the benchmark then measures.

--tile-candidates times, at S1 and S3, the tile table's choice and a few neighbours per kernel that
compile with zero spills (checked offline first, as compile_report.py does), each with only that
kernel's TILE_TABLE entry replaced in-process, and prints the table change the fastest suggest.

--variants times the default kernels and each speed variant (smooth_infonce.ops.triton.KernelVariants:
topk, atomics, splits at S1, S3, S4; grad_d at S2, the D it changes) for the bf16 fused loss, uniform
and k = 5 neighbours where the variant matters, one axis changed at a time, and prints which defaults
to change (at least VARIANT_MIN_SPEEDUP faster at every shape and mode timed).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
# last on the path: an installed smooth_infonce (or gpu_check.sh's path shim, which maps
# smooth_infonce.integrations too) comes first; the bare tree is only a fallback for the core package
sys.path.append(str(ROOT))

from smooth_infonce.ops.reference import reference_row_losses  # noqa: E402
from smooth_infonce.self_check import KernelFallbackWarning  # noqa: E402
from smooth_infonce.testing import make_problem  # noqa: E402

TEMPERATURE = 0.1
SMOOTHING = 0.1
NEIGHBORS = 10
RESULTS = ROOT / "benchmarks" / "results"  # committed runs (only with --out)
RUNS = ROOT / "benchmarks" / "runs"  # default output folder, git-ignored
GPU_RUNS, GPU_QUICK_RUNS, CPU_RUNS, CPU_QUICK_RUNS = 55, 10, 15, 3


def default_stem(device_slug: str) -> Path:
    return RUNS / f"{device_slug}-{datetime.datetime.now():%Y%m%d-%H%M%S}"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


# ================================================================================================
# Problems
# ================================================================================================

GPU_SHAPES = {
    # id: (layout, N, M, D); in-batch layouts have M = N (2 views, self excluded)
    "S0": ("twotower", 4096, 4096, 128),
    "S1": ("inbatch", 8192, 8192, 128),
    "S2": ("inbatch", 8192, 8192, 256),
    "S3": ("moco", 256, 65536, 128),
    "S4": ("inbatch", 65536, 65536, 128),
}
CPU_SHAPES = {
    "ssl-2x256": ("inbatch", 512, 512, 128),
    "ssl-2x1024": ("inbatch", 2048, 2048, 128),
}


def build_problem(layout, n, m, dim, dtype, device, seed=0):
    """One benchmark problem from the project's problem builder (`smooth_infonce.testing`): in-batch
    rows in view order (out0's rows, then out1's), gradients for what a training step
    differentiates (the MoCo keys and queue are frozen)."""
    return make_problem(layout, n, m, dim, dtype=dtype, device=device, seed=seed, shuffle=False,
                        grads=(True, layout == "twotower", False))


def views(problem):
    """(out0, out1) of the in-batch layout: rows with ids b and b + n/2 are two views."""
    half = problem.n // 2
    return problem.anchors[:half], problem.anchors[half:]


def plain_cross_entropy(problem):
    """The usual SimCLR formulation: full logits, self masked, one positive per row."""
    x = problem.anchors
    n = x.shape[0]
    logits = (x @ x.T) / TEMPERATURE
    logits = logits.masked_fill(torch.eye(n, dtype=torch.bool, device=x.device), float("-inf"))
    target = (torch.arange(n, device=x.device) + n // 2) % n
    return F.cross_entropy(logits, target)


# ================================================================================================
# CPU mode
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


# name -> setup(problem) -> loss function (fp32 CPU tensors, differentiated w.r.t. problem.leaves)
CPU_PROVIDERS = {
    "reference-uniform": reference_loss(SMOOTHING, None),
    "reference-neighbors": reference_loss(SMOOTHING, NEIGHBORS),
    "reference-alpha0": reference_loss(0.0, None),
    "lightly-ntxent": lightly_in_batch,
    "plain-ce": lambda problem: lambda: plain_cross_entropy(problem),
}


def cpu_step(provider, problem):
    fn = CPU_PROVIDERS[provider](problem)
    return lambda: torch.autograd.grad(fn(), problem.leaves)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def measure_peak_rss_growth(step) -> int:
    """Bytes by which this process's peak resident set (VmHWM) exceeds its resident set before
    `step()`; writing 5 to /proc/self/clear_refs first resets the peak to the current RSS."""
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kib("VmRSS")
    step()
    return 1024 * (_status_kib("VmHWM") - before)


def cpu_peak_memory(shape: str, provider: str) -> int:
    """Peak RSS growth (bytes) of one fwd+bwd, measured in a fresh subprocess."""
    code = (
        "import sys; sys.argv = ['x']\n"
        f"sys.path.insert(0, {str(ROOT / 'benchmarks')!r})\n"
        "import kernel_throughput as kt, torch\n"
        f"layout, n, m, d = kt.CPU_SHAPES[{shape!r}]\n"
        "p = kt.build_problem(layout, n, m, d, torch.float32, 'cpu')\n"
        f"print(kt.measure_peak_rss_growth(kt.cpu_step({provider!r}, p)))\n"
    )
    # A fixed mmap threshold makes glibc map every block >= 64 KiB on its own and unmap it when
    # freed, so resident memory follows the live tensors instead of a reused heap.
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    return int(out.stdout.strip().splitlines()[-1])


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_cpu(args):
    shapes = args.shapes or list(CPU_SHAPES)
    providers = args.providers or list(CPU_PROVIDERS)
    repeats = CPU_QUICK_RUNS if args.quick else CPU_RUNS
    results = []
    for shape in shapes:
        layout, n, m, d = CPU_SHAPES[shape]
        problem = build_problem(layout, n, m, d, torch.float32, "cpu")
        steps = {provider: cpu_step(provider, problem) for provider in providers}
        times = {provider: [] for provider in providers}
        for step in steps.values():
            step()  # warm-up
        for _ in range(repeats):  # round-robin, so a changing background load hits every provider alike
            for provider, step in steps.items():
                start = time.perf_counter()
                step()
                times[provider].append(time.perf_counter() - start)
        for provider in providers:
            row = dict(shape=shape, provider=provider, N=n, M=m, D=d, dtype="float32",
                       fwdbwd_ms=1e3 * sorted(times[provider])[repeats // 2], runs=repeats,
                       peak_extra_mib=cpu_peak_memory(shape, provider) / 2**20)
            results.append(row)
            print(f"{shape:11s} {provider:20s} {row['fwdbwd_ms']:9.2f} ms  {row['peak_extra_mib']:8.1f} MiB",
                  flush=True)
        base = next((r for r in results if r["shape"] == shape and r["provider"] == "lightly-ntxent"), None)
        for r in results:
            if r["shape"] == shape and base:
                r["time_vs_lightly"] = r["fwdbwd_ms"] / base["fwdbwd_ms"]
                r["memory_vs_lightly"] = r["peak_extra_mib"] / max(base["peak_extra_mib"], 1e-9)
    name = cpu_name()
    report = dict(
        mode="cpu", date=datetime.datetime.now().isoformat(timespec="seconds"), cpu=name,
        cores=os.cpu_count(), torch_threads=torch.get_num_threads(), python=platform.python_version(),
        load_average_at_end=os.getloadavg(),  # other work on the machine inflates absolute times
        torch=torch.__version__, lightly=_version("lightly"),
        settings=dict(temperature=TEMPERATURE, smoothing=SMOOTHING, neighbors=NEIGHBORS, dtype="float32",
                      timing=f"median of {repeats} fwd+bwd runs after one warm-up, one process, "
                             "providers interleaved round-robin",
                      memory="peak RSS growth (VmHWM after clear_refs, minus VmRSS) of one fwd+bwd in a fresh "
                             "subprocess, MALLOC_MMAP_THRESHOLD_=65536"),
        results=results,
    )
    stem = args.out or default_stem(f"cpu-{slug(name)}")
    write(report, Path(stem), plot_cpu)


def plot_cpu(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({r["shape"] for r in report["results"]}, key=list(CPU_SHAPES).index)
    fig, axes = plt.subplots(2, len(shapes), figsize=(5.5 * len(shapes), 6), squeeze=False)
    for col, shape in enumerate(shapes):
        rows = [r for r in report["results"] if r["shape"] == shape]
        names = [r["provider"] for r in rows]
        for row_i, (key, label) in enumerate((("fwdbwd_ms", "fwd+bwd ms"), ("peak_extra_mib", "peak extra MiB"))):
            ax = axes[row_i][col]
            ax.barh(names, [r[key] for r in rows], color="tab:blue")
            ax.set_xlabel(label)
            ax.set_title(f"{shape} (N=M={rows[0]['N']}, D={rows[0]['D']})" if row_i == 0 else "")
            ax.invert_yaxis()
    fig.suptitle(f"CPU: {report['cpu']} -- torch {report['torch']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ================================================================================================
# GPU mode
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
CEILINGS = ("gemm-bf16", "sdpa-bf16")  # same-run hardware ceilings (`ceiling`)


class Skip(Exception):
    pass


def bench_ms(fn, quick):
    """Median ms over >= 55 runs (>= 10 with --quick); do_bench flushes L2 before each run."""
    import triton

    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    estimate = 1e3 * (time.perf_counter() - start)
    runs = GPU_QUICK_RUNS if quick else GPU_RUNS
    rep = max(100.0, runs * estimate)
    return triton.testing.do_bench(fn, warmup=max(25.0, 3 * estimate), rep=rep, return_mode="median"), max(
        runs, int(rep / max(estimate, 1e-3)))


def peak_extra_bytes(step):
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = step()
    torch.cuda.synchronize()
    del out
    return torch.cuda.max_memory_allocated() - before


def fp64_reference(problem, neighbors):
    """(mean loss, grads) of the fp64 reference op, or None when the N x M matrices do not fit."""
    free, _ = torch.cuda.mem_get_info()
    if 8 * 8 * problem.n * problem.m > 0.8 * free:
        return None
    p = problem.cast(torch.float64)
    loss = p.row_losses(reference_row_losses, temperature=TEMPERATURE, smoothing=SMOOTHING, neighbors=neighbors).mean()
    return loss.detach(), [g.detach() for g in torch.autograd.grad(loss, p.leaves)]


def accuracy(loss, grads, reference):
    ref_loss, ref_grads = reference
    out = dict(loss_rel_err=abs(loss.double().item() - ref_loss.item()) / abs(ref_loss.item()))
    g = torch.cat([x.double().flatten() for x in grads])
    r = torch.cat([x.flatten() for x in ref_grads])
    out["grad_rel_err"] = ((g - r).norm() / r.norm()).item()
    out["grad_cosine"] = F.cosine_similarity(g, r, dim=0).item()
    return out


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


DEADLINE = None  # time.monotonic() after which providers are skipped (--budget)


def out_of_time() -> bool:
    return DEADLINE is not None and time.monotonic() > DEADLINE


def run_gpu_shape(shape, providers, quick):
    layout, n, m, d = GPU_SHAPES[shape]
    problem = build_problem(layout, n, m, d, torch.bfloat16, "cuda")
    rows = []
    references = {}
    for provider in providers:
        row = dict(shape=shape, provider=provider, layout=layout, N=n, M=m, D=d)
        try:
            if out_of_time():
                raise Skip("time budget (--budget) spent")
            if provider in CEILINGS:
                row.update(ceiling(provider, problem, quick))
                row["status"] = "ok"
                rows.append(row)
                continue
            if provider == "triton-fp32" and shape == "S4":
                raise Skip("fp32 IEEE dots (no tensor cores) at S4 would take minutes per run")
            if provider.startswith("reference") and 4 * 6 * n * m > torch.cuda.mem_get_info()[0]:
                raise Skip("oom (estimated: the eager op keeps several N x M fp32 matrices)")
            fn, p = GPU_PROVIDERS[provider](problem)
            row["dtype"] = str(p.anchors.dtype).replace("torch.", "")

            def step(fn=fn, p=p):
                return torch.autograd.grad(fn(), p.leaves)

            if provider == "reference-compiled":
                start = time.perf_counter()
                step()
                torch.cuda.synchronize()
                row["compile_s"] = time.perf_counter() - start
            start = time.perf_counter()
            row["peak_extra_mib"] = peak_extra_bytes(step) / 2**20
            # the first fwd+bwd of this provider here: includes compiling its kernels where the
            # Triton cache does not have them yet (gpu_check.sh's warm-up stage fills it first)
            row["first_call_s"] = time.perf_counter() - start
            row["fwdbwd_ms"], row["runs"] = bench_ms(step, quick)
            with torch.enable_grad():
                row["fwd_ms"], _ = bench_ms(fn, quick)
            row["bwd_ms"] = row["fwdbwd_ms"] - row["fwd_ms"]
            row["useful_tflops"] = problem.useful_flops / row["fwdbwd_ms"] / 1e9
            if provider.startswith(("triton", "reference")):
                k = NEIGHBORS if provider == "triton-neighbors" else None
                if k not in references:
                    references[k] = fp64_reference(problem, k)
                if references[k] is not None:
                    loss = fn()
                    row.update(accuracy(loss, torch.autograd.grad(loss, p.leaves), references[k]))
            row["status"] = "ok"
        except Skip as why:
            row.update(status="skipped", note=str(why))
        except torch.cuda.OutOfMemoryError:
            row.update(status="oom")
        except Exception as err:  # keep the other providers going; the error is recorded
            row.update(status="error", note=f"{type(err).__name__}: {err}"[:500])
        gc.collect()
        torch.cuda.empty_cache()
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def add_gemm_fractions(rows):
    """Each row's useful TFLOP/s over the same shape's bf16 GEMM rate of this run."""
    for r in rows:
        gemm = next((g for g in rows if g["shape"] == r["shape"] and g["provider"] == "gemm-bf16"
                     and g.get("status") == "ok"), None)
        if gemm and "useful_tflops" in r:
            r["fraction_of_gemm_ceiling"] = r["useful_tflops"] / gemm["op_tflops"]


S6_DIMS = (64, 96, 384, 768)
S6_DTYPES = (torch.float32, torch.bfloat16, torch.float64)


def s6_base(d):
    return build_problem("twotower", 1000, 3001, d, torch.float64, "cuda", seed=d)


def s6_triton_loss(p, tau, k):
    from smooth_infonce.ops.triton import triton_row_losses

    return triton_row_losses(p.anchors, p.candidates, None, p.pairs, temperature=tau, smoothing=SMOOTHING,
                             neighbors=k).mean()


def run_s6(quick):
    """S6: ragged 1000 x 3001 (two-tower), D in 64/96/384/768, tau 0.01..1: correctness only."""
    gates = {"float32": 1e-5, "bfloat16": 3e-3, "float64": 1e-9}
    rows = []
    for d in S6_DIMS:
        for tau in ((0.01, 1.0) if quick else (0.01, 0.1, 1.0)):
            for k in (None, NEIGHBORS):
                if out_of_time():
                    print(f"S6: time budget spent, D={d} tau={tau} k={k} not checked", flush=True)
                    continue
                base = s6_base(d)
                ref = base.cast(torch.float64)
                ref_loss = reference_row_losses(ref.anchors, ref.candidates, None, ref.pairs, temperature=tau,
                                                smoothing=SMOOTHING, neighbors=k).mean()
                ref_grads = torch.autograd.grad(ref_loss, ref.leaves)
                for dtype in S6_DTYPES:
                    p = base.cast(dtype)
                    # the fp64 reference of exactly these (rounded) inputs
                    exact = p.cast(torch.float64)
                    exact_loss = reference_row_losses(exact.anchors, exact.candidates, None, exact.pairs,
                                                      temperature=tau, smoothing=SMOOTHING, neighbors=k).mean()
                    exact_grads = torch.autograd.grad(exact_loss, exact.leaves)
                    loss = s6_triton_loss(p, tau, k)
                    grads = torch.autograd.grad(loss, p.leaves)
                    row = dict(shape="S6", N=1000, M=3001, D=d, temperature=tau, neighbors=k,
                               dtype=str(dtype).replace("torch.", ""),
                               **accuracy(loss, grads, (exact_loss.detach(), exact_grads)))
                    row["finite"] = bool(torch.isfinite(loss).item())
                    row["gate"] = gates[row["dtype"]]
                    row["pass"] = row["finite"] and row["loss_rel_err"] <= row["gate"] and row["grad_rel_err"] <= max(
                        row["gate"], 3e-3 if dtype == torch.bfloat16 else 0)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                del ref_grads
    return rows


# The order of a GPU run: what matters most first, so that a run stopped by --budget keeps it. Phase
# 1: the kernels and the GEMM ceiling at every shape (and S6); phase 2: the peers; phase 3:
# torch.compile's reference, whose cold compile takes the longest.
PHASES = (("triton-uniform", "triton-neighbors", "gemm-bf16"), None, ("reference-compiled",))


def provider_phases(providers):
    first, last = PHASES[0], PHASES[2]
    return [[p for p in providers if p in first], [p for p in providers if p not in first and p not in last],
            [p for p in providers if p in last]]


def gpu_environment() -> dict:
    import triton

    props = torch.cuda.get_device_properties(0)
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True).stdout.strip().splitlines()[0]
    except (OSError, IndexError):
        driver = "unknown"
    return dict(gpu=props.name, sm_count=props.multi_processor_count, memory_gib=props.total_memory / 2**30,
                driver=driver, cuda=torch.version.cuda, torch=torch.__version__, triton=triton.__version__,
                python=platform.python_version())


def run_gpu(args):
    shapes = args.shapes or list(GPU_SHAPES) + ["S6"]
    providers = args.providers or [*GPU_PROVIDERS, *CEILINGS]
    environment = gpu_environment()
    stem = Path(args.out or default_stem(slug(environment["gpu"])))
    results, s6 = [], []

    def report(partial):
        add_gemm_fractions(results)
        return dict(
            mode="gpu", date=datetime.datetime.now().isoformat(timespec="seconds"), partial=partial,
            **environment, lightly=_version("lightly"), inf_cl=_version("inf_cl"), memeff=_version("memeff"),
            settings=dict(temperature=TEMPERATURE, smoothing=SMOOTHING, neighbors=NEIGHBORS,
                          timing=f"triton.testing.do_bench median, >= {GPU_QUICK_RUNS if args.quick else GPU_RUNS} "
                                 "runs after warm-up; L2 flushed before each run (cold L2); bwd = fwd+bwd - fwd; "
                                 "first_call_s: the provider's first fwd+bwd in this process (includes compiling "
                                 "what the Triton cache lacks)",
                          order="phase 1: triton-uniform, triton-neighbors, gemm-bf16 at every shape, and S6; "
                                "phase 2: the other providers; phase 3: reference-compiled",
                          budget_s=args.budget,
                          memory="torch.cuda.max_memory_allocated during one fwd+bwd minus allocated before",
                          useful_flops="8NMD (4NMD for the frozen MoCo queue, S3), charged to every provider",
                          inputs="triton-uniform / -neighbors: bf16; triton-fp32: fp32 IEEE dots; reference, "
                                 "lightly, Inf-CL, memeff: fp32 inputs (reference-bf16-autocast: fp32 under "
                                 "bf16 autocast)",
                          semantics="Inf-CL (one direction) and memeff (CLIP, both directions) run their own "
                                    "losses on the same-sized square problem; at S1/S2 they do not mask self"),
            results=results, correctness_s6=s6,
        )

    for index, phase in enumerate(provider_phases(providers)):
        for shape in shapes:
            if shape == "S6":
                if index == 0:
                    s6 = run_s6(args.quick)
            elif phase:
                results += run_gpu_shape(shape, phase, args.quick)
            else:
                continue
            write_json(report(partial=True), stem)  # a run stopped from outside keeps what it measured
    write(report(partial=False), stem, plot_gpu)
    print(summary(report(partial=False)))


# ================================================================================================
# Compile warm-up (--warmup): the Triton compile cost of the benchmark's shapes, apart from the run
# ================================================================================================

def warmup_tasks(shapes, providers):
    """(shape, what) pairs: every Triton kernel provider at the timed shapes, and every S6
    configuration (D, neighbours, dtype): the launches the benchmark makes, hence its kernels."""
    tasks = []
    for shape in shapes:
        if shape == "S6":
            tasks += [("S6", f"{d}:{k or 0}:{str(dtype).replace('torch.', '')}")
                      for d in S6_DIMS for k in (None, NEIGHBORS) for dtype in S6_DTYPES]
            continue
        for provider in providers:
            if provider.startswith("triton") and not (provider == "triton-fp32" and shape == "S4"):
                tasks.append((shape, provider))
    return tasks


def warm_task(shape, what):
    """The first fwd+bwd of one task (compile + run) and a second (run only), in seconds."""
    if shape == "S6":
        d, k, dtype = what.split(":")
        p = s6_base(int(d)).cast(getattr(torch, dtype))

        def step():
            return torch.autograd.grad(s6_triton_loss(p, 0.1, int(k) or None), p.leaves)
    else:
        layout, n, m, d = GPU_SHAPES[shape]
        fn, p = GPU_PROVIDERS[what](build_problem(layout, n, m, d, torch.bfloat16, "cuda"))

        def step():
            return torch.autograd.grad(fn(), p.leaves)
    seconds = []
    for _ in range(2):
        torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return dict(first_s=seconds[0], second_s=seconds[1], compile_s=max(0.0, seconds[0] - seconds[1]))


def warmup_worker(tasks):
    """Child process: its share of the tasks, one JSON line each."""
    start = time.perf_counter()
    x = torch.randn(64, 64, device="cuda", requires_grad=True)  # CUDA context, cuBLAS, autograd
    torch.autograd.grad((x @ x).sum(), x)
    torch.cuda.synchronize()
    print(json.dumps(dict(init_s=time.perf_counter() - start)), flush=True)
    for shape, what in tasks:
        row = dict(shape=shape, task=what)
        try:
            row.update(warm_task(shape, what), status="ok")
        except Exception as err:  # a kernel that does not compile or launch here: recorded, the others go on
            row.update(status="error", note=f"{type(err).__name__}: {err}"[:800])
        gc.collect()
        torch.cuda.empty_cache()
        print(json.dumps(row), flush=True)


def triton_cache_dir() -> Path:
    return Path(os.environ.get("TRITON_CACHE_DIR") or Path.home() / ".triton" / "cache")


def count_cubins(cache: Path) -> int:
    return sum(1 for _ in cache.rglob("*.cubin")) if cache.is_dir() else 0


def run_warmup(args):
    shapes = args.shapes or list(GPU_SHAPES) + ["S6"]
    providers = args.providers or list(GPU_PROVIDERS)
    tasks = warmup_tasks(shapes, providers)
    jobs = max(1, min(args.jobs or min(8, max(1, (os.cpu_count() or 2) // 2)), len(tasks)))
    cache = triton_cache_dir()
    before = count_cubins(cache)
    start = time.monotonic()
    deadline = start + (args.budget if args.budget is not None else 3600)
    shares = [tasks[i::jobs] for i in range(jobs)]
    # stderr to files: a pipe nobody reads while another process is waited for could fill and block
    errors = [tempfile.TemporaryFile(mode="w+") for _ in shares]
    procs = [subprocess.Popen([sys.executable, __file__, "--warmup-worker", json.dumps(share)],
                              stdout=subprocess.PIPE, stderr=error, text=True) for share, error in zip(shares, errors)]
    rows, inits, stopped = [], [], False
    for proc, share, error in zip(procs, shares, errors):
        why, timed_out = None, False
        try:
            out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            stopped = timed_out = True
            why = "time budget (--budget) spent"
        if proc.returncode != 0 and not timed_out:
            error.seek(0)
            why = f"warm-up process exited with code {proc.returncode}: {error.read()[-600:]}"
        error.close()
        for line in out.splitlines():
            if line.startswith("{"):
                row = json.loads(line)
                (inits if "init_s" in row else rows).append(row)
        done = {(r["shape"], r["task"]) for r in rows}
        rows += [dict(shape=s, task=t, status="skipped" if timed_out else "error", note=why or "no result")
                 for s, t in share if (s, t) not in done]
    wall = time.monotonic() - start
    ok = [r for r in rows if r["status"] == "ok"]
    environment = gpu_environment()
    report = dict(
        mode="warmup", date=datetime.datetime.now().isoformat(timespec="seconds"), **environment,
        jobs=jobs, wall_s=wall, stopped_by_budget=stopped, triton_cache=str(cache), cubins_before=before,
        cubins_after=count_cubins(cache), cold_cache=before == 0,
        worker_init_s=[r["init_s"] for r in inits],
        compile_s_sum=sum(r["compile_s"] for r in ok), run_s_sum=sum(r["second_s"] for r in ok),
        settings=dict(tasks="every Triton kernel provider at S0-S4 (triton-fp32 not at S4) and every S6 "
                            "configuration (D, neighbours, dtype), the benchmark's launches",
                      timing="per task: first fwd+bwd (compile + run) and second (run); compile_s = first - "
                             "second; tasks spread over `jobs` processes sharing the Triton cache, so the "
                             "stage's wall time is below the sum of compile times and each task's compile "
                             "time includes waiting for CPU with the other processes"),
        results=rows,
    )
    stem = Path(args.out or default_stem(slug(environment["gpu"]) + "-compile"))
    write_json(report, stem)
    print(warmup_summary(report))


def warmup_summary(report) -> str:
    lines = [f"{'shape':5s} {'task':22s} {'compile s':>9s} {'run ms':>9s}  status"]
    for r in report["results"]:
        if r["status"] == "ok":
            lines.append(f"{r['shape']:5s} {r['task']:22s} {r['compile_s']:9.2f} {1e3 * r['second_s']:9.2f}  ok")
        else:
            lines.append(f"{r['shape']:5s} {r['task']:22s} {'-':>9s} {'-':>9s}  {r['status']}: {r.get('note', '')}")
    ok = sum(r["status"] == "ok" for r in report["results"])
    lines.append(f"Triton compile: {report['cubins_after'] - report['cubins_before']} new kernels "
                 f"({'cold' if report['cold_cache'] else 'warm'} cache {report['triton_cache']}), "
                 f"{report['wall_s']:.1f} s wall in {report['jobs']} processes, sum of per-task compile "
                 f"{report['compile_s_sum']:.1f} s; {ok}/{len(report['results'])} tasks ok; process start "
                 f"{max(report['worker_init_s'] or [0]):.1f} s")
    return "\n".join(lines)


# ================================================================================================
# Tile candidates (--tile-candidates): a few zero-spill neighbours of the table's tiles, timed
# ================================================================================================

# Shapes timed with candidates, the compile-report configuration that plans the same launches
# (benchmarks/compile_report.py: layout, D, dtype, mode, deterministic) and the kernels of
# TILE_TABLE that the shape's bf16 uniform fwd+bwd (provider triton-uniform) launches: the in-batch
# default backward is candidate_grad (dC + atomic dA), the frozen MoCo queue needs dA only.
TILE_SHAPES = {
    "S1": (("inbatch", 128, "bf16", "uniform", False), ("forward", "candidate_grad")),
    "S3": (("moco", 128, "bf16", "uniform", False), ("forward", "anchor_grad")),
}
TILE_PROVIDER = "triton-uniform"
TILE_NEIGHBOURS = 4  # timed neighbours per kernel at most (besides the table's choice)
TILE_MIN_SPEEDUP = 1.03  # a candidate must beat the table's choice by this to be suggested (noise)


def table_key(dim: int, dtype: torch.dtype, precision: str = "ieee", arch: int = 90):
    """The TILE_TABLE key (arch family, dot kind, D range) that `choose_tiles` reads for D = `dim`."""
    from smooth_infonce.ops import triton as host

    padded = max(16, host._next_power_of_two(dim))
    family = "sm90" if arch >= 90 else "sm80"
    kind = host._dot_kind(dtype, precision)
    return family, kind, min(k[2] for k in host.TILE_TABLE if k[:2] == (family, kind) and k[2] >= padded)


@contextlib.contextmanager
def tile_override(overrides):
    """Within the block, launches use other tiles: `overrides` maps (TILE_TABLE key, kernel) to a
    table entry (dict as `_t` makes; missing fields keep the table's). The table dict is patched
    in-process (the host reads it at every launch) and restored on exit, exception or not."""
    from smooth_infonce.ops import triton as host

    saved = []
    try:
        for (key, kernel), tile in overrides.items():
            entry = host.TILE_TABLE[tuple(key)]
            saved.append((entry, kernel, entry[kernel]))
            entry[kernel] = {**entry[kernel], **tile}
        yield
    finally:
        for entry, kernel, old in reversed(saved):
            entry[kernel] = old


def _valid_tile(tile) -> bool:
    """Every tl.dot dimension a power of two >= 16, a tile of at most 128 x 128 (256 x 64), 4 or 8
    warps, 1 to 4 pipeline stages; a streamed D chunk of >= 16 features."""
    def pow2(x):
        return x >= 16 and x & (x - 1) == 0

    return (pow2(tile["rows"]) and pow2(tile["cols"]) and tile["rows"] <= 256 and tile["cols"] <= 256
            and tile["rows"] * tile["cols"] <= 128 * 128 and tile["warps"] in (4, 8) and 1 <= tile["stages"] <= 4
            and (tile["chunk"] is None or pow2(tile["chunk"])) and (tile["out"] is None or pow2(tile["out"])))


def tile_candidates(current, limit=None):
    """The table's entry first, then its valid neighbours, most promising first: one more / one
    fewer pipeline stage, double / half the candidate columns (BLOCK_M), double / half the anchor
    rows (BLOCK_N), the other warp count. At most `limit` neighbours (None: all)."""
    current = dict(current)
    moves = [("stages", lambda v: v + 1), ("stages", lambda v: v - 1), ("cols", lambda v: 2 * v),
             ("cols", lambda v: v // 2), ("rows", lambda v: 2 * v), ("rows", lambda v: v // 2),
             ("warps", lambda v: 4 if v == 8 else 8)]
    out = [current]
    for field, move in moves:
        tile = {**current, field: move(current[field])}
        if _valid_tile(tile) and tile not in out:
            out.append(tile)
    return out[:1 + limit] if limit is not None else out


def tile_text(tile) -> str:
    """The entry as TILE_TABLE's source writes it: _t(rows, cols, warps, stages[, chunk, out])."""
    extra = "" if tile["chunk"] is None and tile["out"] is None else f", chunk={tile['chunk']}, out={tile['out']}"
    return f"_t({tile['rows']}, {tile['cols']}, {tile['warps']}, {tile['stages']}{extra})"


def tile_jobs(arch: int, limit=None):
    """Every (shape, TILE_TABLE key, kernel, candidate) of the tile stage, the table's choice first."""
    from smooth_infonce.ops import triton as host

    jobs = []
    for shape, (config, kernels) in TILE_SHAPES.items():
        key = table_key(config[1], getattr(torch, DTYPE_NAMES[config[2]]), "ieee", arch)
        for kernel in kernels:
            for i, tile in enumerate(tile_candidates(host.TILE_TABLE[key][kernel], limit)):
                jobs.append(dict(shape=shape, key=list(key), kernel=kernel, tile=tile, current=i == 0))
    return jobs


DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16"}


def precheck_worker(spec):
    """Child process (no interpreter, no GPU needed): plan each job's launches with the real host
    code and compile them with the ptxas of the triton wheel, as benchmarks/compile_report.py does;
    prints one JSON line per job: its kernel's worst registers, spills, shared memory, dots on FMA."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import compile_report as cr

    arch, jobs = spec["arch"], spec["jobs"]
    planned = []
    for job in jobs:
        with tile_override({(tuple(job["key"]), job["kernel"]): job["tile"]}):
            launches = cr.capture(arch, [tuple(TILE_SHAPES[job["shape"]][0])])
        planned.append([launch for launch in launches if launch["kernel"] == job["kernel"] + "_kernel"])
    unique = {}
    for launches in planned:
        for launch in launches:
            unique.setdefault(cr.compile_key(launch, arch), launch)
    todo = [(key, launch, arch, 600) for key, launch in unique.items()]
    if spec.get("procs", 1) > 1 and len(todo) > 1:
        from multiprocessing import get_context

        with get_context("spawn").Pool(min(spec["procs"], len(todo))) as pool:
            compiled = {r["key"]: r for r in pool.imap_unordered(cr.compile_one, todo)}
    else:
        compiled = {r["key"]: r for r in map(cr.compile_one, todo)}
    for job, launches in zip(jobs, planned):
        results = [compiled[cr.compile_key(launch, arch)] for launch in launches]
        row = dict(shape=job["shape"], kernel=job["kernel"], tile=job["tile"], launches=len(results),
                   compiled=bool(results) and all(r["ok"] for r in results))
        if row["compiled"]:
            row.update(n_regs=max(r["n_regs"] or 0 for r in results),
                       n_spills=max(r["n_spills"] if r["n_spills"] is not None else 10**9 for r in results),
                       shared_bytes=max(r["shared_bytes"] for r in results),
                       dots_fma=sum(r["dots_fma"] for r in results))
            row["zero_spill"] = (row["n_spills"] == 0 and row["shared_bytes"] <= cr.SMEM_LIMIT[arch]
                                 and row["dots_fma"] == 0)
        else:
            row.update(zero_spill=False, error=next((r["error"] for r in results if r["error"]), "no launch")[:400])
        print(json.dumps(row), flush=True)


def precheck(jobs, arch, procs, timeout):
    """{(shape, kernel, tile json): precheck row} from a child process; {} when it fails."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    try:
        done = subprocess.run([sys.executable, __file__, "--tile-precheck-worker",
                               json.dumps(dict(arch=arch, jobs=jobs, procs=procs))],
                              capture_output=True, text=True, env=env, timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        print("tile candidates: the offline compile ran out of time", flush=True)
        return {}
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0:
        print(f"tile candidates: the offline compile exited with {done.returncode}: {done.stderr[-800:]}", flush=True)
    return {(r["shape"], r["kernel"], json.dumps(r["tile"], sort_keys=True)): r for r in rows}


def run_tile_candidates(args):
    """S1, S3: the table's tiles and up to TILE_NEIGHBOURS zero-spill neighbours per kernel, each
    timed (fwd+bwd of triton-uniform, bench_ms) with only that kernel's entry overridden."""
    from smooth_infonce.ops import triton as host

    start = time.monotonic()
    major, minor = torch.cuda.get_device_capability()
    arch = 10 * major + minor
    shapes = [s for s in (args.shapes or list(TILE_SHAPES)) if s in TILE_SHAPES]
    jobs = [j for j in tile_jobs(arch) if j["shape"] in shapes]
    procs = args.jobs or min(8, max(1, (os.cpu_count() or 2) // 2))
    left = (DEADLINE - time.monotonic()) if DEADLINE is not None else 600.0
    checked = precheck(jobs, arch, procs, timeout=0.5 * left)
    check_s = time.monotonic() - start
    rows = []
    for shape in shapes:
        layout, n, m, d = GPU_SHAPES[shape]
        problem = build_problem(layout, n, m, d, torch.bfloat16, "cuda")
        fn, p = GPU_PROVIDERS[TILE_PROVIDER](problem)

        def step(fn=fn, p=p):
            return torch.autograd.grad(fn(), p.leaves)

        timed = {}
        for job in (j for j in jobs if j["shape"] == shape):
            pre = checked.get((shape, job["kernel"], json.dumps(job["tile"], sort_keys=True)))
            row = dict(shape=shape, key=job["key"], kernel=job["kernel"], tile=job["tile"], current=job["current"],
                       tile_text=tile_text(job["tile"]),
                       **{k: pre[k] for k in ("n_regs", "n_spills", "shared_bytes") if pre and k in pre})
            try:
                if out_of_time():
                    raise Skip("time budget (--budget) spent")
                if not job["current"] and not (pre and pre.get("zero_spill")):
                    raise Skip("not known to compile without spills" if pre is None
                               else f"offline compile: {pre.get('error') or 'spills / shared memory / FMA dots'}")
                if not job["current"] and timed.get(job["kernel"], 0) >= TILE_NEIGHBOURS:
                    raise Skip(f"{TILE_NEIGHBOURS} neighbours timed already")
                with tile_override({(tuple(job["key"]), job["kernel"]): job["tile"]}):
                    t0 = time.perf_counter()
                    step()
                    torch.cuda.synchronize()
                    row["first_call_s"] = time.perf_counter() - t0
                    row["fwdbwd_ms"], row["runs"] = bench_ms(step, args.quick)
                    if job["kernel"] == "forward":
                        with torch.enable_grad():
                            row["fwd_ms"], _ = bench_ms(fn, args.quick)
                if not job["current"]:
                    timed[job["kernel"]] = timed.get(job["kernel"], 0) + 1
                row["status"] = "ok"
            except Skip as why:
                row.update(status="skipped", note=str(why))
            except Exception as err:  # a candidate that fails to launch here is recorded; the others go on
                row.update(status="error", note=f"{type(err).__name__}: {err}"[:500])
            gc.collect()
            torch.cuda.empty_cache()
            rows.append(row)
            print(json.dumps(row), flush=True)
    assert all(host.TILE_TABLE[tuple(j["key"])][j["kernel"]] == j["tile"] for j in jobs if j["current"])
    environment = gpu_environment()
    report = dict(mode="tile-candidates", date=datetime.datetime.now().isoformat(timespec="seconds"), **environment,
                  arch=arch, provider=TILE_PROVIDER, precheck_s=check_s, wall_s=time.monotonic() - start,
                  settings=dict(candidates="the table's entry and up to %d valid neighbours per kernel (stages +-1, "
                                "BLOCK_M x2 / /2, BLOCK_N x2 / /2, the other warp count) that compile for this "
                                "arch with zero spills, within shared memory and with tensor-core dots (offline, "
                                "ptxas of the triton wheel, benchmarks/compile_report.py's capture and compile)"
                                % TILE_NEIGHBOURS,
                                timing="fwd+bwd of %s with only that kernel's TILE_TABLE entry overridden "
                                       "in-process; bench_ms as the benchmark (%s)" % (
                                           TILE_PROVIDER, "--quick" if args.quick else "full"),
                                min_speedup=TILE_MIN_SPEEDUP),
                  results=rows, fastest=fastest_tiles(rows))
    stem = Path(args.out or default_stem(slug(environment["gpu"]) + "-tiles"))
    write_json(report, stem)
    record_outcome(args.record_in, "tile_candidates", stem, report["fastest"])
    print(tile_suggestion(report["fastest"]))


def record_outcome(record_in, key, stem, fastest):
    """The benchmark's results JSON (`record_in`, when it exists) gets a study's outcome too, under
    `key`: its own results file and the fastest choices."""
    if record_in and Path(record_in).is_file():
        main_report = json.loads(Path(record_in).read_text())
        main_report[key] = dict(file=str(stem.with_suffix(".json")), fastest=fastest)
        write_json(main_report, Path(record_in).with_suffix(""))


def fastest_tiles(rows):
    """Per (TILE_TABLE key, kernel): every candidate's time per shape, the fastest candidate (the
    geometric mean of its speedup over the table's choice across the shapes that timed both) and
    its speedup per shape."""
    groups = {}
    for r in rows:
        if r.get("status") != "ok":
            continue
        g = groups.setdefault((tuple(r["key"]), r["kernel"]), dict(current=None, times={}))
        text = tile_text(r["tile"])
        if r["current"]:
            g["current"] = r["tile"]
        g["times"].setdefault(text, dict(tile=r["tile"], ms={}))["ms"][r["shape"]] = r["fwdbwd_ms"]
    out = []
    for (key, kernel), g in groups.items():
        if g["current"] is None:
            continue
        base = g["times"][tile_text(g["current"])]["ms"]
        best, best_score, best_speedups = g["current"], 1.0, {s: 1.0 for s in base}
        for cand in g["times"].values():
            speedups = {s: base[s] / ms for s, ms in cand["ms"].items() if s in base}
            if not speedups:
                continue
            score = statistics.geometric_mean(speedups.values())
            if score > best_score:
                best, best_score, best_speedups = cand["tile"], score, speedups
        out.append(dict(key=list(key), kernel=kernel, current=g["current"], fastest=best, speedup=best_score,
                        speedup_per_shape=best_speedups,
                        times_ms={text: c["ms"] for text, c in g["times"].items()}))
    return out


def tile_suggestion(fastest, min_speedup=TILE_MIN_SPEEDUP) -> str:
    """The TILE_TABLE change the timings suggest, one line per entry: old -> new, speedup."""
    if not fastest:
        return "tile candidates: nothing timed"
    lines = [f"Suggested TILE_TABLE change (fastest candidate, speedup over the table's choice; at least "
             f"{min_speedup:.2f}x to count):"]
    for f in fastest:
        where = f"TILE_TABLE[{', '.join(repr(k) for k in f['key'])}][{f['kernel']!r}]"
        shapes = ", ".join(f"{s} {v:.2f}x" for s, v in sorted(f["speedup_per_shape"].items()))
        if f["fastest"] != f["current"] and f["speedup"] >= min_speedup:
            lines.append(f"- {where}: {tile_text(f['current'])} -> {tile_text(f['fastest'])}  "
                         f"{f['speedup']:.2f}x ({shapes})")
        else:
            lines.append(f"  {where}: keep {tile_text(f['current'])} ({len(f['times_ms']) - 1} candidates timed"
                         + ("" if f["fastest"] == f["current"] else
                            f"; best {tile_text(f['fastest'])} only {f['speedup']:.2f}x") + ")")
    return "\n".join(lines)


# ================================================================================================
# Speed variants (--variants): each KernelVariants alternative timed against the default
# ================================================================================================

# axis: (alternatives, shapes, neighbour modes). Where the variant can matter: the top-k only with
# neighbours; no atomics at S3 (frozen queue: dA only, no fused atomics); grad_d changes nothing at
# D 128 bf16 (D is held in registers, one output block already), so it is timed at S2 (D 256),
# where the table writes two output blocks.
VARIANT_NEIGHBORS = 5
VARIANT_AXES = {
    "topk": (("two_pass",), ("S1", "S3", "S4"), (VARIANT_NEIGHBORS,)),
    "atomics": (("red",), ("S1", "S4"), (None, VARIANT_NEIGHBORS)),
    "splits": (("occupancy",), ("S1", "S3", "S4"), (None, VARIANT_NEIGHBORS)),
    "grad_d": (("one_block",), ("S2",), (None,)),
}
VARIANT_SHAPE_ORDER = ("S1", "S3", "S2", "S4")  # cheapest first: a run stopped by --budget keeps most
VARIANT_MIN_SPEEDUP = 1.03  # an alternative must beat the default by this at every shape timed (noise)


def variant_jobs(axes=None, shapes=None):
    """(shape, neighbors) -> the axes timed there, in VARIANT_SHAPE_ORDER."""
    jobs = {}
    for axis, (_, axis_shapes, modes) in VARIANT_AXES.items():
        if axes and axis not in axes:
            continue
        for shape in axis_shapes:
            if shapes and shape not in shapes:
                continue
            for k in modes:
                jobs.setdefault((shape, k), []).append(axis)
    return sorted(jobs.items(), key=lambda item: (VARIANT_SHAPE_ORDER.index(item[0][0]), item[0][1] or 0))


def run_variants(args):
    """fwd+bwd (and fwd) of the bf16 fused loss per (shape, neighbour mode) with the default kernels
    and each alternative of the axes that matter there, in one process; every timing, the loss and
    gradient difference from the default, and the fastest per (shape, axis) go into the JSON."""
    from smooth_infonce.ops import triton as host

    start = time.monotonic()
    environment = gpu_environment()
    stem = Path(args.out or default_stem(slug(environment["gpu"]) + "-variants"))
    rows = []

    def report(partial):
        return dict(mode="variants", date=datetime.datetime.now().isoformat(timespec="seconds"), **environment,
                    partial=partial, wall_s=time.monotonic() - start,
                    settings=dict(dtype="bfloat16", temperature=TEMPERATURE, smoothing=SMOOTHING,
                                  timing="bench_ms as the benchmark (%s); default first, then each alternative "
                                  "with only that axis changed (smooth_infonce.ops.triton.kernel_variants)"
                                  % ("--quick" if args.quick else "full"),
                                  axes={a: dict(alternatives=v[0], shapes=v[1], neighbors=v[2])
                                        for a, v in VARIANT_AXES.items()},
                                  min_speedup=VARIANT_MIN_SPEEDUP),
                    results=rows, fastest=fastest_variants(rows))

    for (shape, k), axes in variant_jobs(args.variant_axes, args.shapes):
        layout, n, m, d = GPU_SHAPES[shape]
        mode = "uniform" if k is None else f"k{k}"
        try:
            problem = build_problem(layout, n, m, d, torch.bfloat16, "cuda")
            fn, p = triton_loss(torch.bfloat16, k)(problem)
        except Exception as err:  # noqa: BLE001 - recorded, the other shapes go on
            rows.append(dict(shape=shape, mode=mode, status="error", note=f"{type(err).__name__}: {err}"[:300]))
            continue

        def step(fn=fn, p=p):
            return torch.autograd.grad(fn(), p.leaves)

        baseline = None
        for axis, value in [(None, "default")] + [(a, v) for a in axes for v in VARIANT_AXES[a][0]]:
            variants = "default" if axis is None else f"{axis}={value}"
            row = dict(shape=shape, layout=layout, N=n, M=m, D=d, mode=mode, neighbors=k or 0,
                       axis=axis or "default", variant=value, variants=variants)
            try:
                if out_of_time():
                    raise Skip("time budget (--budget) spent")
                if axis is not None and baseline is None:
                    raise Skip("the default was not timed")
                with host.kernel_variants(variants):
                    t0 = time.perf_counter()
                    loss = fn()
                    grads = torch.autograd.grad(loss, p.leaves)
                    torch.cuda.synchronize()
                    row["first_call_s"] = time.perf_counter() - t0
                    if baseline is None:
                        baseline = (loss.detach().double(), [g.double() for g in grads])
                    else:
                        ref_loss, ref_grads = baseline
                        g = torch.cat([x.double().flatten() for x in grads])
                        r = torch.cat([x.flatten() for x in ref_grads])
                        row["loss_rel_diff"] = abs(loss.double().item() - ref_loss.item()) / abs(ref_loss.item())
                        row["grad_rel_diff"] = ((g - r).norm() / r.norm()).item()
                    del loss, grads
                    row["fwdbwd_ms"], row["runs"] = bench_ms(step, args.quick)
                    with torch.enable_grad():
                        row["fwd_ms"], _ = bench_ms(fn, args.quick)
                row["bwd_ms"] = row["fwdbwd_ms"] - row["fwd_ms"]
                row["status"] = "ok"
            except Skip as why:
                row.update(status="skipped", note=str(why))
            except Exception as err:  # noqa: BLE001 - a variant that fails here is recorded; the others go on
                row.update(status="error", note=f"{type(err).__name__}: {err}"[:500])
            gc.collect()
            torch.cuda.empty_cache()
            rows.append(row)
            print(json.dumps(row), flush=True)
        del problem, fn, p
        write_json(report(True), stem)
    final = report(False)
    write_json(final, stem)
    record_outcome(args.record_in, "variants", stem, final["fastest"])
    print(variant_suggestion(final["fastest"]))


def fastest_variants(rows):
    """Per (shape, axis): the default's and each alternative's fwd+bwd time per neighbour mode, the
    fastest (geometric mean of the speedup over the default across the modes timed) and its speedup."""
    from smooth_infonce.ops.triton import VARIANT_CHOICES  # the defaults: each axis's first choice

    times = {}
    for r in rows:
        if r.get("status") == "ok":
            times[(r["shape"], r["mode"], r["axis"], r["variant"])] = r["fwdbwd_ms"]
    out = []
    for axis, (alternatives, shapes, _) in VARIANT_AXES.items():
        for shape in shapes:
            modes = sorted({mode for (s, mode, a, _) in times if s == shape and a == axis})
            if not modes:
                continue
            default = VARIANT_CHOICES[axis][0]
            entry = dict(shape=shape, axis=axis, default=default, fastest=None, speedup=1.0, times_ms={})
            for mode in modes:
                base = times.get((shape, mode, "default", "default"))
                entry["times_ms"][mode] = {"default": base,
                                           **{v: times.get((shape, mode, axis, v)) for v in alternatives}}
            best, best_score = default, 1.0
            for v in alternatives:
                ratios = [t["default"] / t[v] for t in entry["times_ms"].values() if t["default"] and t.get(v)]
                if not ratios:
                    continue
                score = statistics.geometric_mean(ratios)
                entry.setdefault("speedup_of", {})[v] = score
                entry.setdefault("worst_speedup_of", {})[v] = min(ratios)
                if score > best_score:
                    best, best_score = v, score
            entry.update(fastest=best, speedup=best_score)
            out.append(entry)
    return out


def variant_suggestion(fastest, min_speedup=VARIANT_MIN_SPEEDUP) -> str:
    """What to change, one line per axis: a new default where an alternative is at least
    `min_speedup` faster at every shape (and mode) timed, else keep, with the numbers."""
    if not fastest:
        return "speed variants: nothing timed"
    lines = [f"Speed variants (fwd+bwd speedup over the default, geometric mean over the modes timed; a new "
             f"default needs >= {min_speedup:.2f}x at every shape and mode):"]
    for axis, (alternatives, _, _) in VARIANT_AXES.items():
        entries = [f for f in fastest if f["axis"] == axis]
        if not entries:
            continue
        for v in alternatives:
            per_shape = {f["shape"]: (f.get("speedup_of", {}).get(v), f.get("worst_speedup_of", {}).get(v))
                         for f in entries}
            timed = {s: x for s, x in per_shape.items() if x[0] is not None}
            text = ", ".join(f"{s} {mean:.2f}x (worst mode {worst:.2f}x)" for s, (mean, worst) in timed.items())
            if timed and all(worst >= min_speedup for _, worst in timed.values()):
                lines.append(f"- {axis}: make {v!r} the default (KernelVariants.{axis} = {v!r} in "
                             f"smooth_infonce/ops/triton.py): {text}")
            else:
                lines.append(f"  {axis}: keep {entries[0]['default']!r} ({v}: {text or 'not timed'})")
    return "\n".join(lines)


PEERS = ["reference-fp32", "reference-bf16-autocast", "reference-compiled", "lightly-ntxent", "infcl", "memeff"]


def summary(report) -> str:
    """Per shape and kernel provider: fwd+bwd time, time ratio of each peer that ran (> 1: the
    peer is slower), fraction of the same-run bf16 GEMM rate, peak extra memory; S6 gate results."""
    lines = [f"{report['gpu']}, torch {report['torch']}, triton {report['triton']}, {report['date']}",
             f"{'shape':5s} {'provider':17s} {'fwd+bwd ms':>10s} {'% of bf16 GEMM':>14s} {'peak MiB':>9s}  "
             "peer time / this time"]
    for shape in GPU_SHAPES:
        rows = {r["provider"]: r for r in report["results"] if r["shape"] == shape}
        for name, row in rows.items():
            if not name.startswith("triton") or row.get("status") != "ok":
                if name.startswith("triton") and row.get("status") != "ok":
                    lines.append(f"{shape:5s} {name:17s} {row.get('status')}: {row.get('note', '')}")
                continue
            peers = []
            for peer in PEERS:
                other = rows.get(peer)
                if other is None:
                    continue
                if other.get("status") == "ok":
                    peers.append(f"{peer} {other['fwdbwd_ms'] / row['fwdbwd_ms']:.2f}x")
                else:
                    peers.append(f"{peer} {other.get('status')}")
            fraction = row.get("fraction_of_gemm_ceiling")
            lines.append(f"{shape:5s} {name:17s} {row['fwdbwd_ms']:10.3f} "
                         f"{'-' if fraction is None else f'{100 * fraction:.1f}':>14s} "
                         f"{row.get('peak_extra_mib', float('nan')):9.1f}  {', '.join(peers) or '-'}")
    if report.get("tile_candidates"):
        lines.append(tile_suggestion(report["tile_candidates"]["fastest"]))
    if report.get("variants"):
        lines.append(variant_suggestion(report["variants"]["fastest"]))
    s6 = report.get("correctness_s6") or []
    if s6:
        failed = [r for r in s6 if not r["pass"]]
        lines.append(f"S6 correctness: {len(s6) - len(failed)}/{len(s6)} within the gates"
                     + "".join(f"\n  FAIL D={r['D']} tau={r['temperature']} k={r['neighbors']} {r['dtype']}: "
                               f"loss {r['loss_rel_err']:.2e}, grad {r['grad_rel_err']:.2e}" for r in failed))
    return "\n".join(lines)


def plot_gpu(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = [s for s in GPU_SHAPES if any(r["shape"] == s for r in report["results"])]
    if not shapes:
        return
    fig, axes = plt.subplots(1, len(shapes), figsize=(4.2 * len(shapes), 5), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        rows = [r for r in report["results"] if r["shape"] == shape and r.get("fwdbwd_ms")]
        names = [r["provider"] for r in rows]
        times = [r["fwdbwd_ms"] for r in rows]
        colors = ["tab:green" if n.startswith("triton") else "tab:gray" if n in ("gemm-bf16", "sdpa-bf16")
                  else "tab:blue" for n in names]
        ax.barh(names, times, color=colors)
        ax.set_xscale("log")
        ax.invert_yaxis()
        layout, n, m, d = GPU_SHAPES[shape]
        ax.set_title(f"{shape}: {layout} N={n} M={m} D={d}", fontsize=8)
        ax.set_xlabel("fwd+bwd ms (log)")
        for y, r in enumerate(rows):
            if "fraction_of_gemm_ceiling" in r:
                ax.text(r["fwdbwd_ms"], y, f" {100 * r['fraction_of_gemm_ceiling']:.0f}%", va="center", fontsize=6)
    fig.suptitle(f"{report['gpu']} -- torch {report['torch']}, triton {report['triton']} "
                 "(% = useful TFLOP/s over the same-run bf16 GEMM rate)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ================================================================================================


def _version(module):
    try:
        from importlib.metadata import version

        return version(module.replace("_", "-"))
    except Exception:
        return None


def write_json(report, stem: Path):
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1, default=float) + "\n")


def write(report, stem: Path, plot):
    write_json(report, stem)
    json_path, png_path = stem.with_suffix(".json"), stem.with_suffix(".png")
    try:
        plot(report, png_path)
    except ImportError as err:  # the GPU image may have no matplotlib: the JSON holds everything
        print(f"wrote {json_path}; no plot ({err}): plot it elsewhere from the JSON")
        return
    print(f"wrote {json_path} and {png_path}")


def main(argv=None):
    # the benchmark times the kernel: a kind that fails its first-use self-check (smooth_infonce.self_check)
    # would run the reference op instead, so it is an error here (recorded per provider), never a timing
    warnings.simplefilter("error", KernelFallbackWarning)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", type=lambda s: s.split(","), help="comma list (GPU: S0..S4,S6; CPU: %s)"
                        % ",".join(CPU_SHAPES))
    parser.add_argument("--providers", type=lambda s: s.split(","), help="comma list (default: all)")
    parser.add_argument("--out", help="output path without suffix, e.g. benchmarks/results/<device> to record a "
                        "run (default: benchmarks/runs/<device>-<date-time>, git-ignored: committed results are "
                        "never overwritten)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke test: {GPU_QUICK_RUNS} timed runs per number on GPU (default >= {GPU_RUNS}), "
                        f"{CPU_QUICK_RUNS} on CPU (default {CPU_RUNS})")
    parser.add_argument("--summary", metavar="JSON", help="print the summary table of an earlier GPU run and exit")
    parser.add_argument("--cpu", action="store_true", help="CPU mode even if CUDA is available")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds: providers not started by then are recorded as skipped (GPU mode; with "
                        "--warmup: the stage's limit)")
    parser.add_argument("--warmup", action="store_true",
                        help="GPU: only compile the kernels of the benchmark's shapes, in parallel processes, and "
                        "record each task's compile time apart from its run time (JSON at --out)")
    parser.add_argument("--jobs", type=int, default=None, help="--warmup processes (default: min(8, cores / 2))")
    parser.add_argument("--warmup-worker", help=argparse.SUPPRESS)
    parser.add_argument("--tile-candidates", action="store_true",
                        help="GPU: at S1 and S3 time the table's tiles and up to %d zero-spill neighbours per kernel "
                        "(checked offline first with the triton wheel's ptxas), write them to --out and print the "
                        "TILE_TABLE change they suggest" % TILE_NEIGHBOURS)
    parser.add_argument("--record-in", metavar="JSON",
                        help="--tile-candidates / --variants: also add the fastest to this results JSON (if it exists)")
    parser.add_argument("--variants", action="store_true",
                        help="GPU: time the default kernels and each speed variant (smooth_infonce.ops.triton."
                        "KernelVariants) at S1, S3, S4 (grad_d at S2), bf16, uniform and k=%d neighbours where the "
                        "variant matters; write every timing and the fastest per (shape, axis) to --out and print "
                        "what to change" % VARIANT_NEIGHBORS)
    parser.add_argument("--variant-axes", type=lambda s: s.split(","), default=None,
                        help="--variants: only these axes (comma list of %s)" % ",".join(VARIANT_AXES))
    parser.add_argument("--tile-precheck-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.warmup_worker:
        warmup_worker([tuple(t) for t in json.loads(args.warmup_worker)])
        return
    if args.tile_precheck_worker:
        precheck_worker(json.loads(args.tile_precheck_worker))
        return
    if args.budget is not None:
        global DEADLINE
        DEADLINE = time.monotonic() + args.budget
    if args.summary:
        report = json.loads(Path(args.summary).read_text())
        if report.get("mode") == "tile-candidates":
            print(tile_suggestion(report["fastest"]))
        elif report.get("mode") == "variants":
            print(variant_suggestion(report["fastest"]))
        else:
            print(summary(report))
        return
    if args.variants:
        if not torch.cuda.is_available():
            parser.error("--variants needs a CUDA device")
        run_variants(args)
    elif args.tile_candidates:
        if not torch.cuda.is_available():
            parser.error("--tile-candidates needs a CUDA device")
        run_tile_candidates(args)
    elif args.warmup:
        if not torch.cuda.is_available():
            parser.error("--warmup needs a CUDA device")
        run_warmup(args)
    elif torch.cuda.is_available() and not args.cpu:
        run_gpu(args)
    else:
        run_cpu(args)


if __name__ == "__main__":
    main()
