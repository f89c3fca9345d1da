"""The GPU check's two studies, run on the machine from the plans of studies.py: the tile candidates
(--tile-candidates: an offline compile check in a child process first, then each zero-spill
candidate timed with only its TILE_TABLE entry overridden) and the speed variants (--variants: the
default kernels, then each KernelVariants alternative with one axis changed). Each writes its JSON,
adds its outcome to the benchmark's JSON (--record-in) and prints the change its timings suggest."""

from __future__ import annotations

import datetime
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from environment import default_stem, gpu_environment, slug, write_json

from . import BENCHMARKS, COMMAND
from .problems import GPU_SHAPES, SMOOTHING, TEMPERATURE, build_problem
from .providers import GPU_PROVIDERS, Skip, triton_loss
from .reporting import record_outcome
from .studies import (
    TILE_MIN_SPEEDUP,
    TILE_NEIGHBOURS,
    TILE_PROVIDER,
    TILE_SHAPES,
    VARIANT_AXES,
    VARIANT_MIN_SPEEDUP,
    fastest_tiles,
    fastest_variants,
    tile_jobs,
    tile_override,
    tile_suggestion,
    tile_text,
    variant_jobs,
    variant_suggestion,
)
from .timing import bench_ms, out_of_time, seconds_left

# ================================================================================================
# Tile candidates (--tile-candidates): the table's tiles and zero-spill neighbours, timed
# ================================================================================================

def precheck_worker(spec):
    """Child process (no interpreter, no GPU needed): plan each job's launches with the real host
    code and compile them with the ptxas of the triton wheel, as benchmarks/compile_report.py does;
    prints one JSON line per job: its kernel's worst registers, spills, shared memory, dots on FMA."""
    sys.path.insert(0, str(BENCHMARKS))
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
        done = subprocess.run([sys.executable, str(COMMAND), "--tile-precheck-worker",
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
    checked = precheck(jobs, arch, procs, timeout=0.5 * seconds_left(600.0))
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
    stem = Path(args.out or default_stem(slug(environment["gpu"]), "tiles"))
    write_json(report, stem)
    record_outcome(args.record_in, "tile_candidates", stem, report["fastest"])
    print(tile_suggestion(report["fastest"]))


# ================================================================================================
# Speed variants (--variants): each KernelVariants alternative timed against the default
# ================================================================================================

def run_variants(args):
    """fwd+bwd (and fwd) of the bf16 fused loss per (shape, neighbour mode) with the default kernels
    and each alternative of the axes that matter there, in one process; every timing, the loss and
    gradient difference from the default, and the fastest per (shape, axis) go into the JSON."""
    from smooth_infonce.ops import triton as host

    start = time.monotonic()
    environment = gpu_environment()
    stem = Path(args.out or default_stem(slug(environment["gpu"]), "variants"))
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
