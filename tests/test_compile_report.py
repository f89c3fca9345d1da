"""The fused kernels compile for an H100 (sm_90) with zero spills and tensor cores, checked offline.

No GPU needed: `benchmarks/compile_report.py --set representative` plans the launches with the real
host code (smooth_infonce/ops/triton.py, its tile table included) and compiles each one with the
ptxas inside the triton wheel. The set: bf16 forward and both backward kinds (atomic dA and
deterministic) at D 128 and 256, the fp32 default (IEEE dots) at D 128, MoCo bf16 with and without
sample ids, neighbours k = 10. It runs in a subprocess because this test session runs the kernels
under the Triton interpreter (TRITON_INTERPRET=1, tests/conftest.py), and the compile needs the real
JIT. The whole issue-8 grid, for sm_90 and sm_80: benchmarks/results/compile_*.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parent.parent


def _ptxas():
    try:
        from triton import knobs

        path = knobs.nvidia.ptxas.path
    except Exception:  # noqa: BLE001 - no NVIDIA backend or no bundled ptxas
        return None
    return path if path and os.path.exists(path) else None


@pytest.mark.skipif(_ptxas() is None, reason="this triton wheel ships no ptxas")
def test_representative_launches_compile_for_sm90_without_spills(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    start = time.time()
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "compile_report.py"), "--arch", "90", "--set", "representative",
         "--jobs", "2", "--out", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    seconds = time.time() - start
    records = json.loads((tmp_path / "compile_sm90.json").read_text()) if done.returncode in (0, 1) else []
    assert records, done.stdout[-3000:] + done.stderr[-3000:]

    # the set the issue names is really there
    roles = {(r["kernel"], r["layout"], r["D"], r["dtype"], r["k"], bool(r["atomic_anchor_grad"])) for r in records}
    for d in (128, 256):
        assert ("forward_kernel", "inbatch", d, "bf16", 0, False) in roles
        assert ("forward_kernel", "inbatch", d, "bf16", 10, False) in roles
        assert ("candidate_grad_kernel", "inbatch", d, "bf16", 0, True) in roles  # dC + atomic dA
        assert ("candidate_grad_kernel", "inbatch", d, "bf16", 0, False) in roles  # deterministic dC
        assert ("anchor_grad_kernel", "inbatch", d, "bf16", 0, False) in roles  # deterministic dA
    assert any(r["dtype"] == "fp32" and not r["allow_tf32"] and r["D"] == 128 for r in records)
    assert {"moco", "moco_ids"} <= {r["layout"] for r in records}

    for r in records:
        what = f"{r['kernel']} {r['layout']} D={r['D']} {r['dtype']} tf32={r['allow_tf32']} k={r['k']}"
        assert r["ok"], f"{what} does not compile: {r['error']}"
        assert r["n_spills"] == 0 and not r["spill_store_bytes"], f"{what} spills: {r['n_regs']} registers"
        if r["dtype"] in ("fp16", "bf16") or r["allow_tf32"]:
            assert r["mma"] == "wgmma" and r["dots_fma"] == 0, f"{what}: dots without tensor cores ({r['mma']})"
        assert r["shared_bytes"] <= 232448, f"{what}: {r['shared_bytes']} B of shared memory"
    assert done.returncode == 0, done.stdout[-3000:]
    print(f"compiled {len(records)} launches for sm_90 in {seconds:.0f} s")
