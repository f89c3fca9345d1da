"""The kernel throughput benchmark (benchmarks/kernel_throughput.py, the command) as modules of one job each.

- problems: the loss settings every provider shares, the shapes (GPU S0-S4, CPU, S6) and their inputs
- providers: every loss timed (the fused kernel, the reference op, the peers) and the GEMM / SDPA ceilings
- timing: GPU and CPU timing, peak-memory measurement, the --budget deadline
- studies: what each stage plans (provider order, compile tasks, tile candidates, speed variants) and
  what its timings conclude (fastest, suggested change); no GPU needed
- benchmark: the CPU and GPU benchmark runs (S6 included) and the compile warm-up of their kernels
- study_runs: the tile-candidate and speed-variant studies, run on the machine
- reporting: the JSON with its plot, the summaries (the machine record, output stems and JSON writer
  every benchmark shares: benchmarks/environment.py)

The command puts benchmarks/ on sys.path (it is the script's folder), which makes this package
importable as ``throughput``; importing it adds the repository root last, as a fallback for
smooth_infonce.
"""

import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent
ROOT = BENCHMARKS.parent
COMMAND = BENCHMARKS / "kernel_throughput.py"  # the entry point; its hidden worker flags run child processes

# last on the path: an installed smooth_infonce (or gpu_check.sh's path shim, which maps
# smooth_infonce.integrations too) comes first; the bare tree is only a fallback for the core package
sys.path.append(str(ROOT))
