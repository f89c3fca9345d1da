#!/usr/bin/env bash
# The prepared GPU check: one command, from the repository root, on a machine with an H100 / H200
# and whatever torch and triton it has. It installs nothing and needs no network; the project need
# not be installed (a path shim maps the working tree's smooth_infonce/ and integrations/ to
# smooth_infonce and smooth_infonce.integrations, as pyproject's package-dir does) and lightly need
# not be there (what needs it is skipped with a note). At most 8 minutes, cold Triton cache included:
#   1. versions (GPU, driver, CUDA, python, torch, triton, the optional packages), the import check;
#   1b. the doctor (python -m smooth_infonce.doctor): the kernel's first-use self-check probed for every
#      kind (dtype x layout x smoothing x backward mode, at head width 128) it has time for, the
#      environment and a short timing, in -doctor.json before anything else can fail; its verdicts are
#      this run's self-check cache, so the later stages skip those probes (it compiles into a Triton
#      cache of its own: stage 2 still measures a cold compile);
#   2. compile: the Triton kernels of every benchmark shape compiled in parallel processes into a
#      fresh Triton cache, each task's compile time recorded apart from its run time;
#   3. the tests marked `gpu` (pytest -m gpu, the test files that use the marker);
#   4. the benchmark protocol (benchmarks/README.md: S0-S4 timed, S6 correctness), --quick, kernels
#      and the GEMM ceiling first at every shape, then the peers (the JSON is rewritten per shape);
#   4b. tile candidates: at S1 and S3, the table's tiles and a few neighbours per kernel that compile
#      with zero spills (checked offline first with the triton wheel's ptxas), each timed; the fastest
#      go into the benchmark's JSON and the summary prints the TILE_TABLE change they suggest;
#   4c. speed variants (smooth_infonce.ops.triton.KernelVariants): the default kernels and each
#      variant (topk=two_pass, atomics=red, splits=occupancy at S1, S3, S4; grad_d=one_block at S2),
#      bf16, uniform and k=5, each timed; the fastest per (shape, axis) go into the benchmark's JSON
#      and the summary prints which defaults to change;
#   5. issue 18's step memory (cached-gradient step vs single pass, bf16, 96 px) and
#   6. whole training steps (bf16 autocast, 224 px): both need lightly (the project's lightly models);
#   6b. the toolkit drop-ins against the losses they replace (benchmarks/contrastive_losses.py): open_clip's
#      ClipLoss vs SmoothClipLoss and sentence-transformers' MNRL vs SmoothMultipleNegativesRankingLoss,
#      fwd+bwd time and peak memory at 4k-64k pairs, D 512 (each family only where its library imports);
#   7. the summaries and each stage's time.
# Every file goes to benchmarks/results/<device>-<date>*: .json/.png (benchmark), -doctor.json, -compile.json,
# -pytest.txt/.xml, -tiles.json, -variants.json, -step_memory.*, -training_step.*, -contrastive_losses.*, -versions.txt,
# -stages.tsv, -log.txt.
#
#   bash benchmarks/gpu_check.sh                 # .venv/bin/python if present, else python3
#   PYTHON=/path/to/python bash benchmarks/gpu_check.sh
#   GPU_CHECK_SITE=/dir/with/lightly bash benchmarks/gpu_check.sh   # extra import path (e.g. an
#       unpacked lightly wheel: lightly is pure Python; with torchvision on the machine that is all it needs)
#   GPU_CHECK_SECONDS=480 (total), GPU_CHECK_WARM_CACHE=1 (keep Triton's usual cache instead of a fresh one)
#   bash benchmarks/gpu_check.sh --collect-only  # only the shim and `pytest -m gpu --collect-only` (no GPU needed)
#
# Time: each stage gets a share of what is left, in proportion to its weight among the stages still
# to run (time a stage does not use goes to the later ones); a stage whose share is below its
# minimum is skipped with a note. The benchmark stops starting providers in time to write its JSON.
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=$(command -v python3)
TOTAL=${GPU_CHECK_SECONDS:-480}
START=$(date +%s)
left() { local s=$(( TOTAL - ($(date +%s) - START) )); echo $(( s > 0 ? s : 0 )); }
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0

# --- the path shim: smooth_infonce and smooth_infonce.integrations from this working tree ---------
# A folder smooth_infonce/ of links to the tree's package files, plus integrations -> integrations/,
# first on PYTHONPATH. PYTHONSAFEPATH (python >= 3.11) keeps the current directory (the repository
# root, whose bare smooth_infonce/ has no integrations) off the front of sys.path for -c and -m.
SHIM=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_shim.XXXXXX")
trap 'rm -rf "$SHIM"' EXIT
mkdir "$SHIM/smooth_infonce"
for f in "$ROOT"/smooth_infonce/*; do
    case "$(basename "$f")" in __pycache__) ;; *) ln -s "$f" "$SHIM/smooth_infonce/" ;; esac
done
ln -s "$ROOT/integrations" "$SHIM/smooth_infonce/integrations"
export PYTHONPATH="$SHIM${GPU_CHECK_SITE:+:$GPU_CHECK_SITE}${PYTHONPATH:+:$PYTHONPATH}" PYTHONSAFEPATH=1

import_check() {
    "$PY" - "$ROOT" <<'EOF'
import importlib.util, os, sys
root = os.path.realpath(sys.argv[1])
if sys.version_info < (3, 11):
    print("warning: python < 3.11 ignores PYTHONSAFEPATH: the current directory may shadow the shim")
import smooth_infonce
import smooth_infonce.integrations
import smooth_infonce.cached_step
import smooth_infonce.integrations.recipes
for name, module in (("smooth_infonce", smooth_infonce), ("smooth_infonce.integrations", smooth_infonce.integrations)):
    where = os.path.realpath(module.__file__)
    assert where.startswith(root + os.sep), f"{name} comes from {where}, not from this tree ({root})"
spec = importlib.util.find_spec("smooth_infonce.integrations.lightning")
expected = os.path.join(root, "integrations", "lightning", "__init__.py")
assert spec is not None and os.path.realpath(spec.origin) == expected, (spec, expected)
try:
    import smooth_infonce.integrations.lightning  # noqa: F401
    note = "imports"
except ImportError as err:  # the mapping works; the module itself needs an optional package
    note = f"found, needs an optional package: {err}"
print("import check: smooth_infonce and smooth_infonce.integrations from", root,
      "| smooth_infonce.integrations.lightning", note)
EOF
}

# the test files that use the gpu marker; --continue-on-collection-errors: one that cannot be
# imported here (an optional package missing) does not stop the others
GPU_TEST_FILES=$(grep -l -E 'mark\.gpu\b' tests/test_*.py | tr '\n' ' ')
pytest_gpu() {
    # shellcheck disable=SC2086
    "$PY" -m pytest -m gpu -p no:cacheprovider --continue-on-collection-errors "$@" $GPU_TEST_FILES
}

if [ "${1:-}" = "--collect-only" ]; then  # no GPU needed: tests/conftest.py turns the interpreter on without CUDA
    unset TRITON_INTERPRET
    import_check || { echo "import check failed"; exit 3; }
    pytest_gpu --collect-only -q
    exit $?
fi

echo "== 1. versions"
VERSIONS=$SHIM/versions.txt
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "nvidia-smi: not found"
    echo "interpreter: $PY"
    echo "C compiler (Triton builds its launchers with it): $(command -v cc || command -v gcc || echo none)"
} | tee "$VERSIONS"
"$PY" - >"$SHIM/probe.txt" 2>&1 <<'EOF'
import importlib, platform, sys
import torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
import triton
print("triton", triton.__version__)
for module in ("lightly", "lightning", "pytorch_lightning", "torchmetrics", "timm", "torchvision", "sklearn",
               "hydra", "matplotlib", "hypothesis", "pytest", "numpy", "inf_cl", "memeff", "open_clip",
               "sentence_transformers"):
    try:  # imported, not looked up in the metadata: a package that is present but hidden counts as absent
        print(module, getattr(importlib.import_module(module), "__version__", "(no __version__)"))
    except Exception as err:
        print(module, "not importable:", type(err).__name__)
if not torch.cuda.is_available():
    sys.exit(1)
p = torch.cuda.get_device_properties(0)
print("device", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs", f"{p.total_memory / 2**30:.0f} GiB")
EOF
PROBE=$?
tee -a "$VERSIONS" <"$SHIM/probe.txt"
[ $PROBE -eq 0 ] || { echo "no usable CUDA device: stopping"; exit 2; }
import_check 2>&1 | tee -a "$VERSIONS"
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "the path shim does not give this tree's smooth_infonce.integrations: stopping"; exit 3; }

DEVICE=$("$PY" -c "import re, torch; print(re.sub('[^a-z0-9]+', '-', torch.cuda.get_device_name(0).lower()).strip('-'))")
OUT=benchmarks/results/$DEVICE-$(date +%Y-%m-%d)
mkdir -p benchmarks/results
cp "$VERSIONS" "$OUT-versions.txt"
exec > >(tee "$OUT-log.txt") 2>&1  # from here on everything is also in the log
TEE=$!
cat "$OUT-versions.txt"
echo "results: $OUT*"

DOCTOR_TRITON_CACHE=
if [ "${GPU_CHECK_WARM_CACHE:-0}" != 1 ]; then  # a fresh cache: stage 2 measures a cold compile
    export TRITON_CACHE_DIR="$SHIM/triton-cache"
    DOCTOR_TRITON_CACHE="$SHIM/doctor-triton-cache"
fi
export SMOOTH_INFONCE_CACHE_DIR="$SHIM/self-check-cache"  # this run's self-check verdicts, the doctor's first
HAVE_LIGHTLY=0
grep -q "^lightly [0-9]" "$SHIM/probe.txt" && HAVE_LIGHTLY=1

# stage name, weight, minimum seconds; the weights of the stages still to come
STAGES="doctor:1.5:40 compile:2:20 pytest:2:20 benchmark:4:45 tiles:1:60 variants:1:45"
if [ $HAVE_LIGHTLY = 1 ]; then
    STAGES="$STAGES step_memory:1.5:50 training_step:1.5:50"
fi
LOSS_PROVIDERS=  # the drop-ins' families whose library imports here (6b)
grep -q "^open_clip [0-9]" "$SHIM/probe.txt" && LOSS_PROVIDERS=clip,smooth_clip_0,smooth_clip_knn
grep -q "^sentence_transformers [0-9]" "$SHIM/probe.txt" && \
    LOSS_PROVIDERS=${LOSS_PROVIDERS:+$LOSS_PROVIDERS,}mnrl,smooth_mnrl_0,smooth_mnrl_knn
[ -n "$LOSS_PROVIDERS" ] && STAGES="$STAGES contrastive:1:40"
printf 'stage\tshare_s\tused_s\texit_code\tnote\n' >"$OUT-stages.tsv"
SHARE=0
stage_share() {  # sets SHARE for stage $1 (weight / sum of the remaining weights of what is left)
    SHARE=$(awk -v name="$1" -v left="$(left)" -v stages="$STAGES" 'BEGIN {
        n = split(stages, s, " "); total = 0; mine = 0; on = 0
        for (i = 1; i <= n; i++) { split(s[i], f, ":"); if (f[1] == name) { on = 1; mine = f[2] } if (on) total += f[2] }
        print (total > 0 ? int(left * mine / total) : 0) }')
}
stage_min() { local s; for s in $STAGES; do [ "${s%%:*}" = "$1" ] && { echo "${s##*:}"; return; }; done; echo 0; }
record() { printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" >>"$OUT-stages.tsv"; }
# run_stage NAME: runs the function NAME_stage in a child bash under `timeout $SHARE` (the whole
# process group is stopped at the limit), unless the share is below the stage's minimum
export PY OUT SHARE GPU_TEST_FILES DOCTOR_TRITON_CACHE LOSS_PROVIDERS
run_stage() {
    local name=$1
    stage_share "$name"
    local minimum; minimum=$(stage_min "$name")
    if [ "$SHARE" -lt "$minimum" ]; then
        echo "-- $name: skipped, out of time ($SHARE s left for it, needs $minimum s)"
        record "$name" "$SHARE" 0 - "skipped: out of time"
        return
    fi
    local t0; t0=$(date +%s)
    export -f "${name}_stage" pytest_gpu
    timeout --kill-after=10 "$SHARE" bash -c "${name}_stage"
    local rc=$?
    local used=$(( $(date +%s) - t0 ))
    echo "-- $name: exit code $rc in $used s of its $SHARE s$([ $rc -eq 124 ] && echo ' (stopped by the time limit)')"
    record "$name" "$SHARE" "$used" "$rc" "$([ $rc -eq 124 ] && echo 'stopped by the time limit')"
}

echo "== 1b. doctor: the kernel's self-check of every kind, a short timing ($(left) s left) -> $OUT-doctor.json"
doctor_stage() {  # kinds not probed 30 s before the share ends are listed as not checked; exit code 1: a kind falls back
    [ -n "$DOCTOR_TRITON_CACHE" ] && export TRITON_CACHE_DIR=$DOCTOR_TRITON_CACHE
    "$PY" -m smooth_infonce.doctor --json "$OUT-doctor.json" --budget $(( SHARE > 50 ? SHARE - 30 : SHARE / 2 )) \
        --timing-seconds 10
}
run_stage doctor

echo "== 2. compile: the Triton kernels of the benchmark's shapes ($(left) s left; cache ${TRITON_CACHE_DIR:-the default})"
compile_stage() {  # stops itself 15 s before its share to write the JSON
    "$PY" benchmarks/kernel_throughput.py --warmup --shapes S0,S1,S2,S3,S4,S6 --budget $(( SHARE > 30 ? SHARE - 15 : 15 )) \
        --out "$OUT-compile"
}
run_stage compile

echo "== 3. tests marked gpu ($(left) s left): $GPU_TEST_FILES"
pytest_stage() {
    pytest_gpu -q -rs --junitxml "$OUT-pytest.xml" 2>&1 | tee "$OUT-pytest.txt"
    return "${PIPESTATUS[0]}"
}
run_stage pytest

echo "== 4. benchmark S0-S4, S6 ($(left) s left) -> $OUT.json"
benchmark_stage() {  # providers not started 40 s before the share ends are skipped; the JSON is written per shape
    "$PY" benchmarks/kernel_throughput.py --quick --shapes S0,S1,S2,S3,S6,S4 \
        --budget $(( SHARE > 80 ? SHARE - 40 : SHARE / 2 )) --out "$OUT"
}
run_stage benchmark

echo "== 4b. tile candidates at S1, S3 ($(left) s left) -> $OUT-tiles.json"
tiles_stage() {  # candidates not started 20 s before the share ends are skipped; the offline compile gets half
    "$PY" benchmarks/kernel_throughput.py --tile-candidates --quick --shapes S1,S3 \
        --budget $(( SHARE > 40 ? SHARE - 20 : SHARE / 2 )) --out "$OUT-tiles" --record-in "$OUT.json"
}
run_stage tiles

echo "== 4c. speed variants at S1, S3, S4 (grad_d: S2) ($(left) s left) -> $OUT-variants.json"
variants_stage() {  # variants not started 15 s before the share ends are skipped; the JSON is written per shape
    "$PY" benchmarks/kernel_throughput.py --variants --quick \
        --budget $(( SHARE > 40 ? SHARE - 15 : SHARE / 2 )) --out "$OUT-variants" --record-in "$OUT.json"
}
run_stage variants

if [ $HAVE_LIGHTLY = 1 ]; then
    echo "== 5. step memory: cached-gradient step vs single pass, bf16, 96 px ($(left) s left)"
    step_memory_stage() {  # no --budget in step_memory.py (JSON at the end): sized to fit, a fresh process per point
        local batches=256,1024,4096
        [ "$SHARE" -lt 100 ] && batches=256,4096
        "$PY" benchmarks/step_memory.py --device gpu --bf16 --image-size 96 --batches "$batches" \
            --time-batch 512 --time-rounds 3 --out "$OUT-step_memory"
    }
    run_stage step_memory

    echo "== 6. whole training steps, bf16 autocast, 224 px ($(left) s left)"
    training_step_stage() {  # no --budget in training_step.py: sized to fit (one backbone when short of time)
        local backbones=mobilenetv3_large_100,efficientnet_b0
        [ "$SHARE" -lt 150 ] && backbones=mobilenetv3_large_100
        "$PY" benchmarks/training_step.py --backbones "$backbones" --repeats 5 --warmup 1 --out "$OUT-training_step"
    }
    run_stage training_step
else
    echo "== 5, 6. step memory and training steps: skipped, lightly is not importable here (both build the"
    echo "   project's lightly models; training_step.py also times lightly's NTXentLoss). To run them, put an"
    echo "   unpacked lightly wheel on GPU_CHECK_SITE (pure Python; it needs torchvision and pytorch_lightning)."
    record step_memory 0 0 - "skipped: lightly not importable"
    record training_step 0 0 - "skipped: lightly not importable"
fi

if [ -n "$LOSS_PROVIDERS" ]; then
    echo "== 6b. the drop-ins against ClipLoss / MNRL, fwd+bwd, D 512 ($(left) s left) -> $OUT-contrastive_losses.*"
    contrastive_stage() {  # the JSON is rewritten per point: a stage stopped by its limit keeps what it measured
        local batches=4096,16384,65536
        [ "$SHARE" -lt 90 ] && batches=4096,16384
        "$PY" benchmarks/contrastive_losses.py --device cuda --providers "$LOSS_PROVIDERS" --batches "$batches" \
            --repeats-cuda 10 --out "$OUT-contrastive_losses"
    }
    run_stage contrastive
else
    echo "== 6b. the drop-ins against ClipLoss / MNRL: skipped, neither open_clip nor sentence_transformers is"
    echo "   importable here (put unpacked wheels of either, with what they import, on GPU_CHECK_SITE)."
    record contrastive 0 0 - "skipped: open_clip / sentence_transformers not importable"
fi

echo "== 7. summary"
if [ -f "$OUT-compile.json" ]; then
    "$PY" -c "import json, sys; sys.path.insert(0, 'benchmarks'); import kernel_throughput as kt; \
print(kt.warmup_summary(json.load(open('$OUT-compile.json'))).splitlines()[-1])"
fi
if [ -f "$OUT.json" ]; then
    "$PY" benchmarks/kernel_throughput.py --summary "$OUT.json"
else
    echo "no $OUT.json: the benchmark did not write its results"
fi
if [ -f "$OUT-tiles.json" ] && [ ! -f "$OUT.json" ]; then  # else the benchmark's summary above has it
    "$PY" benchmarks/kernel_throughput.py --summary "$OUT-tiles.json"
fi
if [ -f "$OUT-variants.json" ] && [ ! -f "$OUT.json" ]; then
    "$PY" benchmarks/kernel_throughput.py --summary "$OUT-variants.json"
fi
[ -f "$OUT-pytest.txt" ] && echo "pytest -m gpu: $(tail -n 1 "$OUT-pytest.txt")"
[ -f "$OUT-contrastive_losses.md" ] && tail -n +4 "$OUT-contrastive_losses.md"
column -t -s "$(printf '\t')" "$OUT-stages.tsv" 2>/dev/null || cat "$OUT-stages.tsv"
echo "== done in $(( $(date +%s) - START )) s; files: $(ls "$OUT"* | tr '\n' ' ')"
exec >&- 2>&-
wait "$TEE" 2>/dev/null  # the log is complete before the script returns
