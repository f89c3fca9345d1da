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

This file is the command: its arguments and their dispatch. The work is done in benchmarks/throughput/,
a package of one-job modules (problems, providers, timing, studies, benchmark, study_runs, reporting;
its __init__ says which does what).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch

# the package beside this file; explicit, since gpu_check.sh's PYTHONSAFEPATH=1 keeps a script's folder off sys.path
sys.path.insert(0, str(Path(__file__).resolve().parent))

# gpu_check.sh's summary imports warmup_summary from this command
from throughput import benchmark, reporting, study_runs, timing  # noqa: E402
from throughput.problems import CPU_SHAPES  # noqa: E402
from throughput.reporting import warmup_summary  # noqa: E402, F401
from throughput.studies import TILE_NEIGHBOURS, VARIANT_AXES, VARIANT_NEIGHBORS  # noqa: E402
from throughput.timing import CPU_QUICK_RUNS, CPU_RUNS, GPU_QUICK_RUNS, GPU_RUNS  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
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
    parser.add_argument("--summary", metavar="JSON",
                        help="print the summary of an earlier run (its JSON, any mode) and exit")
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
    return parser


def main(argv=None):
    from smooth_infonce.self_check import KernelFallbackWarning  # after throughput: it adds the tree's fallback

    # the benchmark times the kernel: a kind that fails its first-use self-check (smooth_infonce.self_check)
    # would run the reference op instead, so it is an error here (recorded per provider), never a timing
    warnings.simplefilter("error", KernelFallbackWarning)
    cli = build_parser()
    args = cli.parse_args(argv)
    if args.warmup_worker:
        benchmark.warmup_worker([tuple(t) for t in json.loads(args.warmup_worker)])
        return
    if args.tile_precheck_worker:
        study_runs.precheck_worker(json.loads(args.tile_precheck_worker))
        return
    if args.budget is not None:
        timing.set_budget(args.budget)
    if args.summary:
        print(reporting.summarize(json.loads(Path(args.summary).read_text())))
        return
    for flag, run in (("variants", study_runs.run_variants), ("tile_candidates", study_runs.run_tile_candidates),
                      ("warmup", benchmark.run_warmup)):
        if getattr(args, flag):
            if not torch.cuda.is_available():
                cli.error(f"--{flag.replace('_', '-')} needs a CUDA device")
            run(args)
            return
    if torch.cuda.is_available() and not args.cpu:
        benchmark.run_gpu(args)
    else:
        benchmark.run_cpu(args)


if __name__ == "__main__":
    main()
