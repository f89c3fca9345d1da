#!/usr/bin/env bash
# The prepared GPU check: one command, from the repository root, on a machine with an H100 / H200
# and whatever torch and triton it has (no network: it installs nothing). At most 8 minutes:
#   1. versions (GPU, driver, CUDA, python, torch, triton, lightly / inf-cl / memeff if installed);
#   2. the tests marked `gpu` (pytest -m gpu);
#   3. the benchmark protocol (benchmarks/README.md: S0-S4 timed, S6 correctness) in GPU mode, --quick
#      (10 timed runs per number), written to benchmarks/results/<device>-<date>.json and .png;
#   4. its summary: time per shape, peers' time ratios, fraction of the bf16 GEMM roofline, memory.
#
#   bash benchmarks/gpu_check.sh                 # uses .venv/bin/python, else python3
#   PYTHON=/path/to/python bash benchmarks/gpu_check.sh
#
# Time: each stage gets what is left of the 8 minutes; benchmark providers not started in time are
# recorded as skipped (--budget), so the JSON is always written.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=$(command -v python3)
TOTAL=${GPU_CHECK_SECONDS:-480}
START=$(date +%s)
left() { local s=$(( TOTAL - ($(date +%s) - START) )); echo $(( s > 1 ? s : 1 )); }
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0

echo "== 1. versions"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "nvidia-smi: not found"
"$PY" - <<'EOF' || { echo "no usable CUDA device: stopping"; exit 2; }
import platform, sys
import torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
import triton
print("triton", triton.__version__)
for name in ("lightly", "inf-cl", "memeff"):
    try:
        from importlib.metadata import version
        print(name, version(name))
    except Exception:
        print(name, "not installed")
if not torch.cuda.is_available():
    sys.exit(1)
p = torch.cuda.get_device_properties(0)
print("device", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs", f"{p.total_memory / 2**30:.0f} GiB")
EOF
DEVICE=$("$PY" -c "import re, torch; print(re.sub('[^a-z0-9]+', '-', torch.cuda.get_device_name(0).lower()).strip('-'))")
OUT=benchmarks/results/$DEVICE-$(date +%Y-%m-%d)

echo "== 2. tests marked gpu ($(left) s left)"
timeout $(( $(left) * 2 / 5 )) "$PY" -m pytest -m gpu -q -p no:cacheprovider tests
echo "pytest -m gpu: exit code $? (124 = stopped by the time limit)"

echo "== 3. benchmark S0-S4, S6 ($(left) s left) -> $OUT.json / .png"
BUDGET=$(( $(left) > 90 ? $(left) - 60 : 30 ))
timeout $(( $(left) > 10 ? $(left) - 5 : 5 )) "$PY" benchmarks/kernel_throughput.py --quick --shapes S0,S1,S2,S3,S6,S4 \
    --budget "$BUDGET" --out "$OUT"
echo "benchmark: exit code $?"

echo "== 4. summary"
if [ -f "$OUT.json" ]; then
    "$PY" benchmarks/kernel_throughput.py --summary "$OUT.json"
else
    echo "no $OUT.json: the benchmark did not finish"
fi
echo "== done in $(( $(date +%s) - START )) s"
