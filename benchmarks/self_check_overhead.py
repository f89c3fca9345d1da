"""What the first-use self-check adds to a call of the fused op once its kind is verified: the
kind of the call (`ops.triton.kind_of`) and one dictionary lookup (`self_check.kernel_verified`),
against the op's own host preparation for scale. Host time only, so the CPU measures it.

    .venv/bin/python benchmarks/self_check_overhead.py --out benchmarks/results/self_check_overhead_cpu.json
"""

import argparse
import datetime
import os
import sys
import timeit
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: the host code runs on CPU tensors
# environment.py beside this file, also when a test loads this file by path or PYTHONSAFEPATH=1 is set
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from environment import machine, write_json  # noqa: E402

from smooth_infonce import __version__, self_check  # noqa: E402
from smooth_infonce.ops import triton as host  # noqa: E402
from smooth_infonce.testing import make_problem  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    problem = make_problem("moco_ids", 256, 4096, 128, dtype=torch.bfloat16, seed=0)
    x = host.row_loss_inputs(problem.anchors.detach(), problem.candidates.detach(), problem.keys.detach(),
                             problem.pairs, temperature=0.2, smoothing=0.1, neighbors=5)
    kind = host.kind_of(x)
    self_check._VERDICTS[kind] = True  # as after a passed probe
    cases = {
        "kind_of": (lambda: host.kind_of(x), 200_000),
        "verdict_lookup": (lambda: self_check.kernel_verified(kind, x.anchors.device), 200_000),
        "added_per_call": (lambda: self_check.kernel_verified(host.kind_of(x), x.anchors.device), 200_000),
        "empty_call": (lambda: None, 200_000),
        "host_preparation": (lambda: host._problem(x), 5_000),
    }
    microseconds = {name: min(timeit.repeat(stmt, number=reps, repeat=5)) / reps * 1e6
                    for name, (stmt, reps) in cases.items()}
    result = {"benchmark": "self_check_overhead", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "machine": machine("cpu"), "smooth_infonce": __version__, "problem": "moco_ids 256 x 4096, D 128, bf16",
              "timing": "best of 5 repeats, per call", "microseconds": microseconds}
    write_json(result, args.out.with_suffix(""))
    for name, value in microseconds.items():
        print(f"{name:20s} {value:8.3f} us")


if __name__ == "__main__":
    main()
