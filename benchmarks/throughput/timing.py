"""How the benchmark measures: GPU time (triton.testing.do_bench median, L2 flushed before every
run), CPU time (median of round-robin runs in one process), peak extra memory (CUDA allocator; on
CPU the resident-set growth of one step in a fresh process), and the --budget deadline after which
the runs skip what they have not started."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from . import BENCHMARKS

GPU_RUNS, GPU_QUICK_RUNS, CPU_RUNS, CPU_QUICK_RUNS = 55, 10, 15, 3  # timed runs per number (at least, on GPU)


# ================================================================================================
# Time
# ================================================================================================

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


def cpu_median_s(steps: dict, repeats: int) -> dict:
    """name -> median seconds of `repeats` calls of each step after one warm-up call each, the steps
    interleaved round-robin so that a changing background load hits every one alike."""
    times = {name: [] for name in steps}
    for step in steps.values():
        step()  # warm-up
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: sorted(seconds)[repeats // 2] for name, seconds in times.items()}


# ================================================================================================
# Memory
# ================================================================================================

def peak_extra_bytes(step):
    """Bytes the CUDA allocator's peak rises above what was allocated before, during `step()`."""
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = step()
    torch.cuda.synchronize()
    del out
    return torch.cuda.max_memory_allocated() - before


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
    """Peak RSS growth (bytes) of one fwd+bwd of a CPU provider, measured in a fresh subprocess whose
    inputs and imports are already in place."""
    code = (
        f"import sys; sys.path.insert(0, {str(BENCHMARKS)!r})\n"
        "import torch\n"
        "from throughput.problems import CPU_SHAPES, build_problem\n"
        "from throughput.providers import cpu_step\n"
        "from throughput.timing import measure_peak_rss_growth\n"
        f"layout, n, m, d = CPU_SHAPES[{shape!r}]\n"
        "p = build_problem(layout, n, m, d, torch.float32, 'cpu')\n"
        f"print(measure_peak_rss_growth(cpu_step({provider!r}, p)))\n"
    )
    # A fixed mmap threshold makes glibc map every block >= 64 KiB on its own and unmap it when
    # freed, so resident memory follows the live tensors instead of a reused heap.
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    return int(out.stdout.strip().splitlines()[-1])


# ================================================================================================
# The --budget deadline
# ================================================================================================

_deadline = None  # time.monotonic() after which the runs skip what they have not started (--budget)


def set_budget(seconds) -> None:
    """From now, `seconds` until out_of_time() (None: no deadline)."""
    global _deadline
    _deadline = None if seconds is None else time.monotonic() + seconds


def out_of_time() -> bool:
    return _deadline is not None and time.monotonic() > _deadline


def seconds_left(default: float) -> float:
    """Seconds until the deadline (negative once past), `default` without one."""
    return default if _deadline is None else _deadline - time.monotonic()
