"""smooth-infonce-doctor: what this machine gives the fused kernel, and whether to trust it (issue 24).

    smooth-infonce-doctor [--json PATH] [--budget SECONDS] [--timing-seconds SECONDS] [--widths D,...]
                          [--all-kinds]
    python -m smooth_infonce.doctor ...

1. the environment: Python, torch, triton, CUDA, the NVIDIA driver, the GPUs, smooth-infonce, and
   lightly / lightning / solo-learn where installed;
2. the reference op against its written-out form (`layout.dense_masks`, `ops.reference.smoothed_targets`),
   loss and gradients in float64, every layout and smoothing mode;
3. the kernel's self-check (`smooth_infonce.self_check`) for every kind: each dtype, layout family,
   smoothing mode and backward mode, with the selected speed variants, at each head width of --widths
   (default 128; a head width names the compiled tile configuration), probed afresh (cached verdicts
   are not read; the new ones are written to the cache, so later processes skip their probes): a table
   of verdict, worst error and probe time, at most --budget seconds (kinds not reached are listed as
   not checked). Without CUDA: a few kinds under the Triton interpreter (all with --all-kinds), in a
   child process with TRITON_INTERPRET=1 (it must be set before triton is imported), or in this
   process when the interpreter is already on;
4. the kernel against the reference op and lightly's NTXentLoss (where installed), forward +
   backward, at a few sizes, at most --timing-seconds (without CUDA: the reference and lightly only);
5. everything in a JSON file (--json; default smooth-infonce-doctor-<device>-<date>.json here),
   rewritten after each step, so a run that is stopped still leaves what it found.

Exit code: 1 when any kind falls back to the reference op (a probe's mismatch, non-finite value or
exception; please report it with this output) or the reference op disagrees with its written-out
form; 0 otherwise (also without CUDA, once the reference and the interpreter probe pass).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Callable, List, Optional

import torch

from . import self_check
from .ops import padded_dim
from .self_check import LAYOUTS, SMOOTHING, TOLERANCES, Kind

OPTIONAL = ("lightly", "lightning", "pytorch-lightning", "solo-learn")
REFERENCE_TOLERANCE = 1e-10  # the reference op and the dense formula, both float64
GPU_WIDTHS = "128"  # --widths' default: the usual projection head (light-moco's, SimCLR's)
# Without CUDA, the interpreter probes these kinds at width 32 (about 0.2 s each): every layout and
# smoothing mode in float32, each other dtype once, and the deterministic backward once.
INTERPRETER_WIDTH = 32
INTERPRETER_KINDS = ([("float32", layout, smoothing, False) for layout in LAYOUTS for smoothing in SMOOTHING]
                     + [(dtype, "in_batch", "neighbors", False) for dtype in ("bfloat16", "float16", "float64")]
                     + [("float32", "moco_ids", "neighbors", True)])
GPU_TIMING_BATCHES = (512, 2048, 8192)  # images of two views each, D = 128, bfloat16
CPU_TIMING_BATCHES = (128, 512)  # float32


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="smooth-infonce-doctor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", metavar="PATH", help="where to write the report (default: "
                        "smooth-infonce-doctor-<device>-<date>.json in the current directory)")
    parser.add_argument("--budget", type=float, default=300.0, metavar="SECONDS",
                        help="the self-check table's limit: kinds not probed by then are listed as not checked "
                        "(default 300; a cold Triton cache compiles every kind's kernels)")
    parser.add_argument("--timing-seconds", type=float, default=30.0, metavar="SECONDS",
                        help="the timing's limit; 0 skips it (default 30)")
    parser.add_argument("--widths", default=GPU_WIDTHS, metavar="D,...",
                        help="with CUDA: the head widths (D) to probe every kind at, each rounded up to the "
                        f"kernels' padded width (default {GPU_WIDTHS})")
    parser.add_argument("--all-kinds", action="store_true",
                        help="without CUDA: probe every kind under the interpreter, not only a few")
    parser.add_argument("--interpreter-worker", metavar="JSON", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.budget <= 0:
        parser.error(f"--budget must be > 0 seconds, got {args.budget}")
    if args.timing_seconds < 0:
        parser.error(f"--timing-seconds must be >= 0, got {args.timing_seconds}")
    try:
        dims = [int(d) for d in args.widths.split(",")]
    except ValueError:
        dims = []
    if not dims or min(dims) < 1:
        parser.error(f"--widths must be positive integers separated by commas, got {args.widths!r}")
    widths = sorted({padded_dim(d) for d in dims})
    try:
        self_check.mode()
    except ValueError as err:  # the first kernel call would raise it: say it up front
        parser.error(str(err))
    if args.interpreter_worker:
        return _interpreter_worker(args.interpreter_worker, args.all_kinds, args.budget)

    cuda = torch.cuda.is_available()
    env = environment_report(cuda)
    path = Path(args.json or f"smooth-infonce-doctor-{_slug(env['gpus'][0]['name'] if cuda else 'cpu')}-"
                f"{datetime.date.today().isoformat()}.json")
    report = dict(created=datetime.datetime.now().isoformat(timespec="seconds"), argv=sys.argv[1:] if argv is None
                  else list(argv), environment=env, tolerances=TOLERANCES, probe=self_check.PROBE)

    def write():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1, default=str) + "\n")

    print_environment(env)
    write()

    report["reference_checks"] = checks = reference_checks()
    bad_reference = [c for c in checks if not c["ok"]]
    print(f"\n== reference op against its written-out form (float64, loss and gradients, tolerance "
          f"{REFERENCE_TOLERANCE:g}): {len(checks) - len(bad_reference)} of {len(checks)} agree")
    for c in bad_reference:
        print(f"   DISAGREES: {c['layout']} smoothing={c['smoothing']}: error {c['error']:.3g}")
    write()

    if cuda:
        device = torch.device("cuda", torch.cuda.current_device())
        print(f"\n== self-check of every kind on {env['gpus'][device.index]['name']} (probed afresh; at most "
              f"{args.budget:g} s)")
        kinds = [kind for width in widths
                 for kind in self_check.all_kinds(_target_name(device), width, env["kernel_variants"])]
        rows = check_kinds(kinds, device, args.budget,
                           on_row=lambda rows: (report.update(self_check_kinds=rows), write()))
    else:
        print("\n== no CUDA device: the kernel cannot run here on a GPU. Its probe runs under the Triton "
              "interpreter instead (the same kernel code, executed on the CPU)")
        rows = interpreter_kinds(args.all_kinds, args.budget, env["kernel_variants"])
    report["self_check_kinds"] = rows
    print_kinds(rows)
    write()

    limit = f"at most {args.timing_seconds:g} s" if args.timing_seconds else "skipped: --timing-seconds 0"
    print(f"\n== timing, forward + backward ({limit})")
    report["timing"] = timing(cuda, args.timing_seconds)
    print_timing(report["timing"])
    write()

    falls_back = [row["kind"] for row in rows if row["verdict"] == "falls back"]
    unchecked = [row["kind"] for row in rows if row["verdict"] == "not checked"]
    code = 1 if falls_back or bad_reference else 0
    report.update(falls_back=falls_back, not_checked=unchecked, exit_code=code)
    write()
    print()
    if falls_back:
        print(f"{len(falls_back)} kind(s) fall back to the reference op (slower, correct): please report them on "
              f"the project's issue tracker with this output and {path}")
    if bad_reference:
        print("the reference op disagrees with its written-out form: this installation of torch is not to be trusted")
    if unchecked:
        print(f"{len(unchecked)} kind(s) not checked in the time given (--budget); they are probed on first use")
    print(f"{'OK' if code == 0 else 'PROBLEMS FOUND'}: report written to {path} (exit code {code})")
    return code


# --------------------------------------------------------------------------------------------
# The environment
# --------------------------------------------------------------------------------------------


def environment_report(cuda: bool) -> dict:
    gpus = []
    if cuda:
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            gpus.append(dict(index=index, name=props.name, capability=f"sm_{props.major}{props.minor}",
                             memory_gib=round(props.total_memory / 2**30, 1), sms=props.multi_processor_count))
    optional = {}
    for name in OPTIONAL:
        try:
            optional[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            optional[name] = None
    try:
        from .ops.triton import current_kernel_variants

        variants = current_kernel_variants().text()
    except ImportError:
        variants = "default"
    return dict(
        python=platform.python_version(), platform=platform.platform(), torch=torch.__version__,
        cuda_runtime=torch.version.cuda, triton=self_check._triton_version(),
        driver=self_check.driver_version() if cuda else "none", gpus=gpus,
        smooth_infonce=self_check.package_version(), optional=optional, kernel_variants=variants,
        self_check_mode=os.environ.get(self_check.MODE_ENV, "1"), cache_dir=str(self_check.cache_dir()),
    )


def print_environment(env: dict) -> None:
    print("== environment")
    print(f"   python {env['python']} ({env['platform']})")
    print(f"   torch {env['torch']} (CUDA runtime {env['cuda_runtime']}), triton {env['triton']}, "
          f"smooth-infonce {env['smooth_infonce']}")
    print(f"   NVIDIA driver: {env['driver']}")
    if not env["gpus"]:
        print("   GPU: none (no CUDA device visible to torch)")
    for gpu in env["gpus"]:
        print(f"   GPU {gpu['index']}: {gpu['name']} {gpu['capability']}, {gpu['memory_gib']} GiB, {gpu['sms']} SMs")
    print("   " + ", ".join(f"{name} {version or 'not installed'}" for name, version in env["optional"].items()))
    print(f"   kernel variants: {env['kernel_variants']}; {self_check.MODE_ENV}={env['self_check_mode']}; "
          f"self-check cache: {env['cache_dir']}")


def _slug(text: str) -> str:
    return re.sub("[^a-z0-9]+", "-", text.lower()).strip("-")


def _target_name(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{10 * major + minor}"


# --------------------------------------------------------------------------------------------
# The reference op against its written-out form
# --------------------------------------------------------------------------------------------


def reference_checks() -> List[dict]:
    """Every layout and smoothing mode of the probe's problems, float64 on the CPU: the reference op's
    losses and gradients against the dense formula l_i = LSE_{V(i)} z_ij - sum_j y_ij z_ij."""
    from .layout import dense_masks
    from .ops.reference import reference_row_losses, smoothed_targets

    cpu, tau = torch.device("cpu"), self_check.PROBE["temperature"]
    rows = []
    for layout in LAYOUTS:
        for smoothing_mode in SMOOTHING:
            kind = Kind("cpu", "float64", layout, smoothing_mode, "default", False, INTERPRETER_WIDTH)
            problem, smoothing, neighbors = self_check.probe_problem(kind, cpu)
            keys = problem.keys
            tensors = [problem.anchors, problem.candidates] + ([] if keys is None else [keys])
            leaves = [t.detach().clone().requires_grad_() for t in tensors]
            a, c, k = leaves[0], leaves[1], (leaves[2] if keys is not None else None)
            got = reference_row_losses(a, c, k, problem.pairs, temperature=tau, smoothing=smoothing,
                                       neighbors=neighbors)
            got_grads = torch.autograd.grad((got * problem.row_grad).sum(), leaves)

            sims = a @ c.T
            if k is not None:
                sims = torch.cat([(a * k).sum(1, keepdim=True), sims], dim=1)
            valid, positive = dense_masks(problem.pairs, problem.n, problem.m, cpu)
            targets = smoothed_targets(sims.detach(), positive, valid & ~positive, smoothing, neighbors)
            z = sims / tau
            dense = (torch.logsumexp(z.masked_fill(~valid, float("-inf")), dim=1)
                     - (targets * z.masked_fill(~valid, 0)).sum(1))
            dense_grads = torch.autograd.grad((dense * problem.row_grad).sum(), leaves)
            got, dense = got.detach(), dense.detach()
            error = float((got - dense).abs().max() / dense.abs().max())
            for g, r in zip(got_grads, dense_grads):
                error = max(error, float((g - r).norm() / r.norm()))
            rows.append(dict(layout=layout, smoothing=smoothing_mode, error=error, ok=error <= REFERENCE_TOLERANCE))
    return rows


# --------------------------------------------------------------------------------------------
# The self-check table
# --------------------------------------------------------------------------------------------


def check_kinds(kinds: List[Kind], device: torch.device, budget: float,
                on_row: Optional[Callable[[list], None]] = None) -> List[dict]:
    """Probe each kind afresh (within ``budget`` seconds), store the verdicts in the cache, one row each."""
    deadline = time.monotonic() + budget
    env = self_check.environment(device)
    rows = []
    for kind in kinds:
        if time.monotonic() > deadline:
            rows.append(_row(kind, None))
            continue
        verdict = self_check.probe(kind, device)
        self_check.store(env, kind, verdict)
        rows.append(_row(kind, verdict))
        print(_row_text(rows[-1]), flush=True)
        if on_row is not None and len(rows) % 10 == 0:
            on_row(rows)
    return rows


def _row(kind: Kind, verdict: Optional[self_check.Verdict]) -> dict:
    row = dict(kind=kind.text(), fields=kind._asdict(), tolerance=TOLERANCES[kind.dtype])
    if verdict is None:
        return dict(row, verdict="not checked", worst="out of time (--budget)")
    return dict(row, verdict="ok" if verdict.ok else "falls back", loss_error=verdict.loss_error,
                grad_error=verdict.grad_error, worst=verdict.worst, probe_s=verdict.seconds)


def _row_text(row: dict) -> str:
    def number(value):
        return "-" if value is None else f"{value:.1e}"

    seconds = row.get("probe_s")
    return (f"   {row['kind']:<96} {row['verdict']:<12} loss {number(row.get('loss_error'))}  "
            f"grad {number(row.get('grad_error'))}  {'-' if seconds is None else '%.2f s' % seconds}"
            + (f"  {row['worst']}" if row["verdict"] != "ok" else ""))


def print_kinds(rows: List[dict]) -> None:
    counts = {verdict: sum(row["verdict"] == verdict for row in rows)
              for verdict in ("ok", "falls back", "not checked")}
    print(f"   {len(rows)} kinds: {counts['ok']} ok, {counts['falls back']} fall back, {counts['not checked']} not "
          "checked (errors: loss max |l - r| / (|r| + 1/tau), gradients ||g - r|| / ||r||, against the float64 "
          "reference; tolerances per dtype (loss, gradient): "
          + ", ".join(f"{dtype} {tol[0]:g} / {tol[1]:g}" for dtype, tol in TOLERANCES.items()) + ")")
    for row in rows:
        if row["verdict"] != "ok":
            print(_row_text(row))


def interpreter_kinds(all_kinds: bool, budget: float, variants: str) -> List[dict]:
    """The probe under the Triton interpreter: here if it is on in this process, else in a child
    process with TRITON_INTERPRET=1 and CUDA hidden. [] with a note when triton is not installed."""
    if self_check._triton_version() == "not installed":
        print("   triton is not installed: no interpreter probe (pip install triton)")
        return []
    if _interpreter_on_here():
        return _probe_interpreter_kinds(all_kinds, budget, variants)
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "kinds.json")
        package_root = str(Path(__file__).resolve().parent.parent)
        python_path = os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))
        env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=python_path)
        command = [sys.executable, "-m", "smooth_infonce.doctor", "--interpreter-worker", out,
                   "--budget", str(budget)] + (["--all-kinds"] if all_kinds else [])
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0 or not os.path.exists(out):
            print(f"   the interpreter probe's process failed (exit code {done.returncode}):\n"
                  + (done.stdout + done.stderr)[-3000:])
            return [dict(kind="interpreter (child process)", fields={}, verdict="falls back",
                         worst=f"the child process failed with exit code {done.returncode}: "
                         f"{(done.stdout + done.stderr).strip()[-500:]}")]
        print(done.stdout, end="")
        return json.loads(Path(out).read_text())


def _interpreter_on_here() -> bool:
    """Do this process's kernels run under the interpreter (TRITON_INTERPRET=1 before they were decorated)?"""
    host = sys.modules.get("smooth_infonce.ops.triton")
    if host is not None:
        return host.INTERPRET
    return os.environ.get("TRITON_INTERPRET") == "1"


def _probe_interpreter_kinds(all_kinds: bool, budget: float, variants: str) -> List[dict]:
    if all_kinds:
        kinds = self_check.all_kinds("interpreter", INTERPRETER_WIDTH, variants)
    else:
        kinds = [Kind("interpreter", dtype, layout, smoothing, variants, det, INTERPRETER_WIDTH)
                 for dtype, layout, smoothing, det in INTERPRETER_KINDS]
    return check_kinds(kinds, torch.device("cpu"), budget)


def _interpreter_worker(out: str, all_kinds: bool, budget: float) -> int:
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("--interpreter-worker needs TRITON_INTERPRET=1 (set before triton is imported)")
    from .ops.triton import current_kernel_variants

    rows = _probe_interpreter_kinds(all_kinds, budget, current_kernel_variants().text())
    Path(out).write_text(json.dumps(rows, default=str))
    return 0


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def timing(cuda: bool, seconds: float) -> List[dict]:
    """Forward + backward of two views of B images (D = 128, tau = 0.2, uniform alpha = 0.1): the kernel
    (GPU only), the reference op and lightly's NTXentLoss; the median of a few runs, within ``seconds``."""
    if seconds <= 0:
        return []
    from . import smooth_infonce

    device = torch.device("cuda") if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    providers = {}
    if cuda:
        providers["kernel"] = lambda v, ids: smooth_infonce(torch.cat(v), ids=ids, temperature=0.2, smoothing=0.1,
                                                            backend="triton", validate=False)
    providers["reference"] = lambda v, ids: smooth_infonce(torch.cat(v), ids=ids, temperature=0.2, smoothing=0.1,
                                                           backend="reference", validate=False)
    try:
        from lightly.loss import NTXentLoss

        ntxent = NTXentLoss(temperature=0.2)
        providers["lightly NTXentLoss"] = lambda v, ids: ntxent(v[0], v[1])
    except Exception as err:  # not installed, or broken: said so in the table
        lightly_note = f"not timed: lightly not importable ({type(err).__name__})"
    else:
        lightly_note = None
    deadline = time.monotonic() + seconds  # from here: importing lightly takes seconds of its own
    rows = []
    for batch in GPU_TIMING_BATCHES if cuda else CPU_TIMING_BATCHES:
        gen = torch.Generator().manual_seed(batch)
        views = [torch.randn(batch, 128, generator=gen).to(device, dtype) for _ in range(2)]
        ids = torch.arange(batch, device=device).repeat(2)
        row = dict(batch=batch, rows=2 * batch, dim=128, dtype=str(dtype).replace("torch.", ""), device=device.type)
        if not cuda:
            row["kernel"] = "not timed: no CUDA (the interpreter is no speed path)"
        if lightly_note:
            row["lightly NTXentLoss"] = lightly_note
        for name, loss_fn in providers.items():
            if time.monotonic() > deadline:
                row[name] = "not timed: out of time (--timing-seconds)"
                continue
            try:
                row[name] = _time_ms(loss_fn, views, ids, device, deadline)
            except Exception as err:  # out of memory at the largest size, say: recorded, not fatal
                row[name] = f"failed: {type(err).__name__}: {str(err)[:200]}"
            if cuda:
                torch.cuda.empty_cache()
        if cuda and isinstance(row.get("kernel"), float) and not _kernel_trusted(dtype):
            row["kernel"] = f"{row['kernel']} (the reference: this kind falls back)"
        rows.append(row)
    return rows


def _kernel_trusted(dtype: torch.dtype) -> bool:
    for kind, verdict in self_check.verdicts().items():
        if kind.dtype == str(dtype).replace("torch.", "") and kind.layout == "in_batch" and not verdict.ok:
            return False
    return True


def _time_ms(loss_fn, views, ids, device, deadline) -> float:
    def once():
        leaves = [v.detach().requires_grad_() for v in views]
        loss_fn(leaves, ids).backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    once()  # compile / warm up
    times = []
    while len(times) < 10 and (len(times) < 3 or sum(times) < 1.0) and time.monotonic() < deadline:
        start = time.perf_counter()
        once()
        times.append(time.perf_counter() - start)
    if not times:
        raise TimeoutError("out of time after the warm-up run")
    return round(1e3 * sorted(times)[len(times) // 2], 3)


def print_timing(rows: List[dict]) -> None:
    if not rows:
        return
    names = [key for key in rows[0] if key not in ("batch", "rows", "dim", "dtype", "device")]
    print("   " + f"{'batch (2 views)':<16}" + "".join(f"{name:>24}" for name in names) + "   (ms, median)")
    for row in rows:
        cells = []
        for name in names:
            value = row.get(name, "")
            cells.append(f"{value:>24.3f}" if isinstance(value, float) else f"{'-':>24}")
        print(f"   {row['batch']:<16}" + "".join(cells))
    notes = {value for row in rows for value in row.values() if isinstance(value, str) and (
        value.startswith("not timed") or value.startswith("failed") or "falls back" in value)}
    for note in sorted(notes):
        print(f"   - {note}")


if __name__ == "__main__":
    sys.exit(main())
