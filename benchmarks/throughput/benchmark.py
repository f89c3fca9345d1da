"""The benchmark itself, run on the machine: the CPU mode (the reference op against its peers at SSL
sizes), the GPU mode (S0-S4 per provider in the phases of studies.py, S6 for correctness; the JSON
rewritten after every shape, so a run stopped from outside keeps what it measured) and the compile
warm-up of its Triton kernels (--warmup, in parallel worker processes). A row per measurement is
printed as it comes."""

from __future__ import annotations

import datetime
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from environment import default_stem, machine, slug, write_json

from smooth_infonce.ops.reference import reference_row_losses

from . import COMMAND
from .problems import (
    CPU_SHAPES,
    GPU_SHAPES,
    NEIGHBORS,
    S6_DIMS,
    S6_DTYPES,
    S6_M,
    S6_N,
    SMOOTHING,
    TEMPERATURE,
    build_problem,
    s6_base,
)
from .providers import CEILINGS, CPU_PROVIDERS, GPU_PROVIDERS, Skip, ceiling, cpu_step, s6_triton_loss
from .reporting import cpu_row_line, plot_cpu, plot_gpu, summary, warmup_summary, write
from .studies import provider_phases, warmup_tasks
from .timing import (
    CPU_QUICK_RUNS,
    CPU_RUNS,
    GPU_QUICK_RUNS,
    GPU_RUNS,
    bench_ms,
    cpu_median_s,
    cpu_peak_memory,
    out_of_time,
    peak_extra_bytes,
)

# ================================================================================================
# CPU mode
# ================================================================================================

def run_cpu(args):
    shapes = args.shapes or list(CPU_SHAPES)
    providers = args.providers or list(CPU_PROVIDERS)
    repeats = CPU_QUICK_RUNS if args.quick else CPU_RUNS
    results = []
    for shape in shapes:
        layout, n, m, d = CPU_SHAPES[shape]
        problem = build_problem(layout, n, m, d, torch.float32, "cpu")
        median_s = cpu_median_s({provider: cpu_step(provider, problem) for provider in providers}, repeats)
        for provider in providers:
            row = dict(shape=shape, provider=provider, N=n, M=m, D=d, dtype="float32",
                       fwdbwd_ms=1e3 * median_s[provider], runs=repeats,
                       peak_extra_mib=cpu_peak_memory(shape, provider) / 2**20)
            results.append(row)
            print(cpu_row_line(row), flush=True)
        base = next((r for r in results if r["shape"] == shape and r["provider"] == "lightly-ntxent"), None)
        for r in results:
            if r["shape"] == shape and base:
                r["time_vs_lightly"] = r["fwdbwd_ms"] / base["fwdbwd_ms"]
                r["memory_vs_lightly"] = r["peak_extra_mib"] / max(base["peak_extra_mib"], 1e-9)
    report = dict(
        mode="cpu", date=datetime.datetime.now().isoformat(timespec="seconds"), **machine("cpu", ["lightly"]),
        torch_threads=torch.get_num_threads(),
        load_average_at_end=os.getloadavg(),  # other work on the machine inflates absolute times
        settings=dict(temperature=TEMPERATURE, smoothing=SMOOTHING, neighbors=NEIGHBORS, dtype="float32",
                      timing=f"median of {repeats} fwd+bwd runs after one warm-up, one process, "
                             "providers interleaved round-robin",
                      memory="peak RSS growth (VmHWM after clear_refs, minus VmRSS) of one fwd+bwd in a fresh "
                             "subprocess, MALLOC_MMAP_THRESHOLD_=65536"),
        results=results,
    )
    stem = args.out or default_stem("cpu", slug(report["cpu"]))
    write(report, Path(stem), plot_cpu)


# ================================================================================================
# GPU mode
# ================================================================================================

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
                    row = dict(shape="S6", N=S6_N, M=S6_M, D=d, temperature=tau, neighbors=k,
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


def run_gpu(args):
    shapes = args.shapes or list(GPU_SHAPES) + ["S6"]
    providers = args.providers or [*GPU_PROVIDERS, *CEILINGS]
    environment = machine("cuda", ["lightly", "inf_cl", "memeff"])
    stem = Path(args.out or default_stem(slug(environment["gpu"])))
    results, s6 = [], []

    def report(partial):
        add_gemm_fractions(results)
        return dict(
            mode="gpu", date=datetime.datetime.now().isoformat(timespec="seconds"), partial=partial,
            **environment,
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
    procs = [subprocess.Popen([sys.executable, str(COMMAND), "--warmup-worker", json.dumps(share)],
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
    environment = machine("cuda")
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
    stem = Path(args.out or default_stem(slug(environment["gpu"]), "compile"))
    write_json(report, stem)
    print(warmup_summary(report))
