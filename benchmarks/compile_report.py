"""Offline compile report of the fused kernels: every launch the host code makes, compiled for real
GPU targets with the ptxas inside the triton wheel. No GPU needed.

    .venv/bin/python benchmarks/compile_report.py --arch 90 80 --out DIR     # the issue-8 grid
    .venv/bin/python benchmarks/compile_report.py --arch 90 --set representative --out DIR
    .venv/bin/python benchmarks/compile_report.py --arch 90 80 --set variants --out DIR   # speed variants
    .venv/bin/python benchmarks/compile_report.py --arch 90 80 --capture-only --out DIR
    /path/to/other-triton/python benchmarks/compile_report.py --replay DIR --arch 90 80 --out DIR2

Writes DIR/compile_sm<arch>.json (a list of records, one per (configuration, launch): kernel,
layout, N, M, D, dtype, allow_tf32, mode, k, deterministic, ok, error, n_regs, n_spills,
shared_bytes, mma, and the tiles / warps / stages / grid / compile time), DIR/compile_sm<arch>.md
(readable tables) and DIR/launches_sm<arch>.json (the captured launches, for --replay).

Where the launches come from: the real host code. For each configuration the public
`smooth_infonce.ops.triton.triton_row_losses` runs forward and backward on zero-filled CPU tensors
of the real shapes, with two substitutions: `_target` (what the launches are planned for) returns
the GPU being compiled for (arch, SM count), and the kernel module is a recorder that writes down
each launch (kernel, grid, arguments) instead of running it. Tile choice, work splitting, flags and
every argument are therefore the host's own.

How a launch is compiled: its arguments are rebuilt as light stand-ins (a tensor becomes an object
with the same dtype and pointer alignment), bound by Triton's own binder (the same specialisation a
GPU run computes: pointer alignment, integers divisible by 16 or equal to 1), packed by
`JITFunction._pack_args` and compiled by `triton.compile(ASTSource(...), target=GPUTarget("cuda",
arch, 32))`. ptxas's `-v` log gives registers and the stack frame (n_spills = stack bytes / 4, the
number Triton reports as `n_spills` on a GPU); shared memory is Triton's `metadata.shared`; the MMA
kind is read from the PTX (`wgmma.mma_async` / `mma.sync` / neither = FMA), and every dot of the
TTGIR is checked for a tensor-core layout. The compile step needs only triton (and numpy), so a
capture made here can be compiled by another triton version (`--replay`), e.g. triton 3.6, the
version torch 2.11 brings. Unset TRITON_INTERPRET: this compiles for real GPUs.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KERNELS_FILE = ROOT / "smooth_infonce" / "ops" / "kernels.py"
# environment.py beside this file, also when a test loads this file by path or PYTHONSAFEPATH=1 is set
sys.path.insert(0, str(ROOT / "benchmarks"))

from environment import default_stem  # noqa: E402

SM_COUNT = {90: 132, 80: 108}  # H100 / H200 SXM, A100 SXM: what the host's work splitting sees
SMEM_LIMIT = {90: 232448, 80: 166912}  # max dynamic shared memory per block (227 KiB, 163 KiB)

# The issue-8 grid (see `configurations`)
DIMS = (17, 64, 100, 128, 256)
DTYPES = {  # name: (torch dtype, allow_tf32)
    "fp16": ("float16", None), "bf16": ("bfloat16", None),
    "fp32-tf32": ("float32", True), "fp32": ("float32", False),
}
MODES = {  # name: (smoothing, neighbors)
    "alpha0": (0.0, None), "uniform": (0.1, None),
    "k1": (0.1, 1), "k5": (0.1, 5), "k10": (0.1, 10), "k32": (0.1, 32),
}
LAYOUTS = {  # name: (N, M)
    "inbatch": (8192, 8192),  # SimCLR 2 x 4096 views, self excluded, ids
    "moco": (256, 65536),  # queue frozen, positive key column
    "moco_ids": (256, 65536),  # the same with sample ids: a row's own sample leaves the queue
    "twotower": (8192, 8192),  # CLIP-style one direction, both sides need gradients
}
# The compile test's set (tests/test_compile_report.py): bf16 forward and both backward kinds at
# D 128 and 256, the fp32 default at D 128, MoCo bf16, neighbours k = 10.
REPRESENTATIVE = (
    [("inbatch", d, "bf16", mode, det) for d in (128, 256) for mode in ("uniform", "k10") for det in (False, True)]
    + [("inbatch", 128, "fp32", "uniform", det) for det in (False, True)]
    + [("moco", 128, "bf16", mode, False) for mode in ("uniform", "k10")]
    + [("moco_ids", 128, "bf16", "k10", False)]
)


# The speed variants (smooth_infonce.ops.triton.KernelVariants; --set variants): each variant's
# launches beside the default's for the same configuration. splits="occupancy" changes only the grid
# (the split count), not a binary, so it has no row here.
VARIANT_SET = (
    [(layout, d, "bf16", "k5", False, v) for layout, d in (("inbatch", 128), ("inbatch", 256), ("moco", 128))
     for v in ("default", "topk=two_pass")]
    + [("moco_ids", 128, "bf16", "k10", False, v) for v in ("default", "topk=two_pass")]
    + [("inbatch", 128, "fp32", "k5", False, v) for v in ("default", "topk=two_pass")]
    + [("inbatch", d, "bf16", "uniform", det, v) for d in (256, 768) for det in (False, True)
       for v in ("default", "grad_d=one_block")]
    + [("moco", 256, "bf16", "uniform", False, v) for v in ("default", "grad_d=one_block")]
    + [("inbatch", 128, "fp32-tf32", "uniform", det, v) for det in (False, True)
       for v in ("default", "grad_d=one_block")]
    + [(layout, 128, dtype, "uniform", False, v) for layout, dtype in (("inbatch", "bf16"), ("twotower", "bf16"),
                                                                       ("inbatch", "fp32"))
       for v in ("default", "atomics=red")]
    + [("inbatch", 256, "bf16", "k5", False, "topk=two_pass,grad_d=one_block,atomics=red")]
)


def configurations(which: str):
    """(layout, D, dtype, mode, deterministic[, variants]) tuples."""
    if which == "representative":
        return list(REPRESENTATIVE)
    if which == "variants":
        return list(VARIANT_SET)
    return [(layout, d, dtype, mode, det) for layout in LAYOUTS for d in DIMS for dtype in DTYPES
            for mode in MODES for det in (False, True)]


# ------------------------------------------------------------------------------------------------
# Capture: run the real host code with a recorder instead of the kernels (needs torch)
# ------------------------------------------------------------------------------------------------


def _describe(value):
    """A JSON form of one kernel argument that keeps what Triton specialises on."""
    import torch
    import triton.language as tl

    if isinstance(value, torch.Tensor):
        return {"tensor": str(value.dtype).replace("torch.", ""), "aligned16": value.data_ptr() % 16 == 0}
    if isinstance(value, tl.dtype):
        return {"tl_dtype": value.name}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot describe a kernel argument of type {type(value)}")


def capture(arch: int, configs) -> list:
    """Launches of every configuration, planned for `arch`: a list of
    {"config": {...}, "kernel", "grid", "args", "kwargs"}."""
    import torch

    sys.path.insert(0, str(ROOT))
    import smooth_infonce.ops.triton as host
    from smooth_infonce import self_check
    from smooth_infonce.layout import make_pairs

    assert not host.INTERPRET, "TRITON_INTERPRET must be unset"
    recorded = []

    class Recorder:
        """Stands for one @triton.jit kernel: `kernel[grid](*args, **kwargs)` records the launch
        and fills the outputs the host reads back (zeros; top-k columns -1 = empty slots)."""

        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                names = [p.name for p in self.fn.params]
                for name, value in zip(names, args):
                    if isinstance(value, torch.Tensor) and (name.startswith("split_") or name == "anchor_grad"):
                        value.fill_(-1 if name == "split_top_cols" else 0)
                recorded.append(dict(kernel=self.fn.__name__, grid=list(grid),
                                     args=[_describe(a) for a in args],
                                     kwargs={k: _describe(v) for k, v in kwargs.items()}))
            return launch

    class Kernels:
        forward_kernel = Recorder(host._kernels.forward_kernel)
        anchor_grad_kernel = Recorder(host._kernels.anchor_grad_kernel)
        candidate_grad_kernel = Recorder(host._kernels.candidate_grad_kernel)

    saved = host._kernels, host._target
    host._kernels, host._target = Kernels, (lambda device: host.Target(arch, SM_COUNT[arch]))
    launches, undecided = [], contextlib.ExitStack()
    undecided.enter_context(self_check.suspended())  # the stand-in kernels compute nothing: no first-use probe
    try:
        for layout, d, dtype_name, mode, det, *variants in configs:
            variants = variants[0] if variants else "default"
            n, m = LAYOUTS[layout]
            dtype, allow_tf32 = DTYPES[dtype_name]
            dtype = getattr(torch, dtype)
            smoothing, k = MODES[mode]
            anchors = torch.zeros(n, d, dtype=dtype, requires_grad=True)
            keys = None
            if layout == "inbatch":
                candidates, ids = anchors, torch.arange(n // 2).repeat(2)
                pairs = make_pairs(n, n, anchor_ids=ids, candidate_ids=ids, self_offset=0)
            elif layout == "twotower":
                candidates = torch.zeros(m, d, dtype=dtype, requires_grad=True)
                pairs = make_pairs(n, m, anchor_ids=torch.arange(n), candidate_ids=torch.arange(m))
            else:  # MoCo: queue and keys frozen (momentum encoder)
                candidates, keys = torch.zeros(m, d, dtype=dtype), torch.zeros(n, d, dtype=dtype)
                ids = {}
                if layout == "moco_ids":
                    ids = dict(anchor_ids=torch.arange(n), candidate_ids=torch.arange(m) % (4 * n) - 1,
                               ids_exclude=True)
                pairs = make_pairs(n, m, has_positive_key=True, **ids)
            del recorded[:]
            with host.kernel_variants(variants):
                losses = host.triton_row_losses(anchors, candidates, keys, pairs, temperature=0.1,
                                                smoothing=smoothing, neighbors=k, deterministic=det,
                                                allow_tf32=allow_tf32)
                leaves = [anchors] + ([candidates] if candidates is not anchors and candidates.requires_grad else [])
                torch.autograd.grad(losses.sum(), leaves)
            config = dict(layout=layout, N=n, M=m, D=d, dtype=dtype_name.split("-")[0],
                          allow_tf32=dtype_name == "fp32-tf32", mode=mode, k=k or 0, deterministic=det)
            if variants != "default":  # records of the default launches keep their old form
                config["variants"] = host.KernelVariants.parse(variants).text()
            launches += [dict(config=config, **launch) for launch in recorded]
    finally:
        host._kernels, host._target = saved
        undecided.close()
    return launches


# ------------------------------------------------------------------------------------------------
# Compile (needs only triton): rebuild the arguments, bind, pack, compile
# ------------------------------------------------------------------------------------------------


class _Dtype:
    def __init__(self, name):
        self.name = name

    def __str__(self):
        return "torch." + self.name


_DTYPES = {}  # one object per dtype name, alive for the whole run: Triton caches by the dtype object


class _TensorStandIn:
    """What Triton's binder reads from a tensor argument: its dtype and data pointer."""

    def __init__(self, dtype, aligned16):
        self.dtype = _DTYPES.setdefault(dtype, _Dtype(dtype))
        self._ptr = 1 << 20 if aligned16 else (1 << 20) + 8

    def data_ptr(self):
        return self._ptr


def _rebuild(value):
    import triton.language as tl

    if isinstance(value, dict) and "tensor" in value:
        return _TensorStandIn(value["tensor"], value["aligned16"])
    if isinstance(value, dict) and "tl_dtype" in value:
        return {tl.float32.name: tl.float32, tl.float64.name: tl.float64}[value["tl_dtype"]]
    return value


_KERNEL_MODULE = None


def _kernel(name):
    """The @triton.jit function `name` of smooth_infonce/ops/kernels.py, loaded without the package
    (which needs torch)."""
    global _KERNEL_MODULE
    if _KERNEL_MODULE is None:
        spec = importlib.util.spec_from_file_location("smooth_infonce_kernels", KERNELS_FILE)
        _KERNEL_MODULE = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(_KERNEL_MODULE)
    return getattr(_KERNEL_MODULE, name)


def _bind(launch, arch):
    """(fn, backend, bound args, specialization, options) as JITFunction.run computes them."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = _kernel(launch["kernel"])
    backend = make_backend(GPUTarget("cuda", arch, 32))
    args = [_rebuild(a) for a in launch["args"]]
    kwargs = {k: _rebuild(v) for k, v in launch["kwargs"].items()}
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    if hasattr(knobs.compilation, "instrumentation_mode"):
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, _ = binder(*args, **kwargs)
    return fn, backend, bound, specialization, kwargs


def compile_key(launch, arch) -> str:
    """Launches with equal keys compile to the same binary."""
    fn, _, _, specialization, kwargs = _bind(launch, arch)
    options = {k: v for k, v in kwargs.items() if k not in fn.arg_names}
    return json.dumps([launch["kernel"], arch, [[str(x) for x in s] for s in specialization],
                       sorted(options.items())])


def _alarm(signum, frame):
    raise TimeoutError("compile took longer than --timeout")


def compile_one(job):
    """Compile one launch for one arch; returns the measurements (or the error)."""
    key, launch, arch, timeout = job
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    knobs.nvidia.dump_ptxas_log = True  # ptxas -v output, printed by the NVIDIA backend
    knobs.compilation.always_compile = True
    out = dict(key=key, ok=False, error=None)
    log = io.StringIO()
    start = time.time()
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(timeout)
    try:
        fn, backend, bound, specialization, kwargs = _bind(launch, arch)
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization,
                                                              backend.parse_options(kwargs))
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs),
                                      target=GPUTarget("cuda", arch, 32), options=options.__dict__)
        out.update(ok=True, **_measure(compiled, log.getvalue()))
    except Exception as err:  # noqa: BLE001 - a failed compile is a result
        cause = err
        while cause.__cause__ is not None or cause.__context__ is not None:  # the root cause last
            cause = cause.__cause__ or cause.__context__
        out["error"] = (f"{type(err).__name__}: {err}"[:3000]
                        + ("" if cause is err else f"\ncaused by {type(cause).__name__}: {cause}"[:1000]))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    out["compile_s"] = round(time.time() - start, 2)
    return out


def _measure(compiled, ptxas_log):
    md = compiled.metadata
    res = dict(num_warps=md.num_warps, num_stages=md.num_stages, shared_bytes=md.shared)
    found = re.search(r"Used (\d+) registers", ptxas_log)
    res["n_regs"] = int(found.group(1)) if found else None
    found = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", ptxas_log)
    stack, stores, loads = (int(x) for x in found.groups()) if found else (None, None, None)
    res.update(stack_bytes=stack, spill_store_bytes=stores, spill_load_bytes=loads)
    # Triton's n_spills on a GPU is the function's local memory (the ptxas stack frame) / 4
    res["n_spills"] = None if stack is None else stack // 4
    ptx, ttgir = compiled.asm.get("ptx", ""), compiled.asm.get("ttgir", "")
    res["mma"] = "wgmma" if "wgmma.mma_async" in ptx else "mma" if "mma.sync" in ptx else "fma"
    # every dot of the TTGIR: a tensor-core one (warp_group_dot, or a dot into an #mma layout) or not
    dots = [line for line in ttgir.splitlines() if re.search(r"= (tt\.dot|ttng\.warp_group_dot) ", line)]
    # atomics (`atom` returns the old value, `red` does not) and asynchronous copies (cp.async on
    # sm_80, also TMA's cp.async.bulk on sm_90: the software pipeline's loads) in the PTX
    res["ptx_atom"] = len(re.findall(r"\batom\.", ptx))
    res["ptx_red"] = len(re.findall(r"\bred\.", ptx))
    res["ptx_async"] = len(re.findall(r"\bcp\.async\b", ptx))
    res["dots"] = len(dots)
    res["dots_fma"] = sum(1 for line in dots if "warp_group_dot" not in line and
                          not re.search(r"-> tensor<[^>]*#mma", line))
    return res


# ------------------------------------------------------------------------------------------------
# Driver and report
# ------------------------------------------------------------------------------------------------


def expects_tensor_cores(record) -> bool:
    return record["dtype"] in ("fp16", "bf16") or (record["dtype"] == "fp32" and record["allow_tf32"])


def problems_of(record, arch) -> list:
    """What is wrong with one record against the static bars
    (compiled, no spills, tensor cores, shared memory in bounds)."""
    if not record["ok"]:
        return ["FAIL"]
    bad = []
    if record["n_spills"] is None or record["n_spills"] > 0 or record.get("spill_store_bytes"):
        bad.append("spills")
    if expects_tensor_cores(record) and (record["mma"] != ("wgmma" if arch >= 90 else "mma")
                                         or record.get("dots_fma")):
        bad.append("no tensor cores")
    if record["shared_bytes"] > SMEM_LIMIT[arch]:
        bad.append("shared memory")
    if ("atomics=red" in record.get("variants", "") and record.get("atomic_anchor_grad")
            and record["dtype"] != "fp64" and (record.get("ptx_atom") or not record.get("ptx_red"))):
        bad.append("atom, not red")
    return bad


_MEASURED = ("ok", "error", "n_regs", "n_spills", "shared_bytes", "mma", "stack_bytes", "spill_store_bytes",
             "spill_load_bytes", "dots", "dots_fma", "ptx_atom", "ptx_red", "ptx_async", "compile_s")


def kernels_digest() -> str:
    import hashlib

    return hashlib.sha256(KERNELS_FILE.read_bytes()).hexdigest()[:16]


def earlier_results(folder: Path, arch: int) -> dict:
    """compile key -> measurements, from an earlier run of the same kernels source and triton
    version in `folder` (its launches_sm<arch>.json and compile_sm<arch>.json, records in launch
    order): a tile-table change then recompiles only the launches it changed."""
    import triton

    try:
        launches = json.loads((folder / f"launches_sm{arch}.json").read_text())
        records = json.loads((folder / f"compile_sm{arch}.json").read_text())
    except FileNotFoundError:
        return {}
    if len(launches) != len(records):
        return {}
    found = {}
    for launch, record in zip(launches, records):
        if record.get("kernels_sha") != kernels_digest() or record.get("triton") != triton.__version__:
            continue
        found[compile_key(launch, arch)] = {name: record.get(name) for name in _MEASURED}
    return found


def run_arch(arch, launches, jobs, timeout, out_dir: Path, reuse=None):
    import triton

    keys = [compile_key(launch, arch) for launch in launches]
    unique = {}
    for key, launch in zip(keys, launches):
        unique.setdefault(key, launch)
    results = {}
    if reuse is not None:
        results = {k: dict(v, key=k) for k, v in earlier_results(reuse, arch).items() if k in unique}
    print(f"sm_{arch}: {len(launches)} launches, {len(unique)} distinct kernels, {len(unique) - len(results)} "
          f"to compile (triton {triton.__version__}, {jobs} jobs)", flush=True)
    start = time.time()
    reused = len(results)
    todo = [(key, launch, arch, timeout) for key, launch in unique.items() if key not in results]
    if jobs > 1:
        from multiprocessing import get_context

        with get_context("spawn").Pool(jobs, maxtasksperchild=16) as pool:
            stream = pool.imap_unordered(compile_one, todo)
            for i, res in enumerate(stream):
                results[res["key"]] = res
                _progress(arch, i, len(todo), start, unique[res["key"]], res)
    else:
        for i, job in enumerate(todo):
            res = compile_one(job)
            results[res["key"]] = res
            _progress(arch, i, len(todo), start, unique[res["key"]], res)
    records = []
    digest = kernels_digest()
    for key, launch in zip(keys, launches):
        res = results[key]
        kw = launch["kwargs"]
        record = dict(launch["config"], kernel=launch["kernel"], arch=arch, triton=triton.__version__,
                      kernels_sha=digest, **{name: res.get(name) for name in _MEASURED},
                      block_n=kw.get("BLOCK_N"), block_m=kw.get("BLOCK_M"), block_d=kw.get("BLOCK_D"),
                      block_k=kw.get("BLOCK_K"),
                      one_d_block=kw.get("ONE_D_BLOCK"), num_warps=kw.get("num_warps"),
                      num_stages=kw.get("num_stages"), atomic_anchor_grad=kw.get("ATOMIC_ANCHOR_GRAD"),
                      grid=launch["grid"])
        for name, flag in (("neighbors", "NEIGHBORS"), ("stats", "STATS"), ("red", "RED")):
            if flag in kw:  # the speed variants' flags (absent from the default launches but NEIGHBORS)
                record[name] = kw[flag]
        record["problems"] = problems_of(record, arch)
        records.append(record)
    (out_dir / f"compile_sm{arch}.json").write_text("[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]\n")
    (out_dir / f"compile_sm{arch}.md").write_text(markdown(arch, records, len(unique), time.time() - start, reused))
    bad = [r for r in records if r["problems"]]
    print(f"sm_{arch}: {len(records)} launches, {len(unique)} kernels, {len(bad)} launches with problems; "
          f"wrote {out_dir / f'compile_sm{arch}.json'} and .md ({time.time() - start:.0f} s)", flush=True)
    return records


def _progress(arch, i, total, start, launch, res):
    c = launch["config"]
    what = f"{launch['kernel']} {c['layout']} D{c['D']} {c['dtype']}{'-tf32' if c['allow_tf32'] else ''} {c['mode']}"
    status = (f"regs {res['n_regs']} spills {res['n_spills']} smem {res['shared_bytes']} {res['mma']}"
              if res["ok"] else res["error"].splitlines()[0][:160])
    print(f"[sm_{arch} {i + 1}/{total} {time.time() - start:.0f}s] {what}: {status} ({res['compile_s']} s)",
          flush=True)


def _role(r):
    if r["kernel"] == "forward_kernel":
        return f"fwd k={r['k']}" if r["k"] else "fwd"
    if r["kernel"] == "anchor_grad_kernel":
        return "dA"
    return "dC+dA atomic" if r["atomic_anchor_grad"] else "dC"


ROLES = ["fwd", "fwd k=1", "fwd k=5", "fwd k=10", "fwd k=32", "dC+dA atomic", "dC", "dA"]


def markdown(arch, records, n_kernels, seconds, reused=0) -> str:
    ver = records[0]["triton"] if records else "?"
    bad = [r for r in records if r["problems"]]
    configs = {(r["layout"], r["D"], r["dtype"], r["allow_tf32"], r["mode"], r["deterministic"], r.get("variants"))
               for r in records}
    lines = [
        f"# Offline compile report: sm_{arch}, triton {ver}",
        "",
        f"{len(records)} launches ({len(configs)} configurations), {n_kernels} distinct kernels, "
        f"compiled in {seconds:.0f} s" + (f" ({reused} results reused from an earlier run of the same kernels "
                                          "source, `--reuse`)" if reused else "") + ". "
        f"Compiled: {sum(r['ok'] for r in records)}/{len(records)}; with spills: "
        f"{sum('spills' in r['problems'] for r in records)}; missing tensor cores: "
        f"{sum('no tensor cores' in r['problems'] for r in records)}; over the shared-memory limit "
        f"({SMEM_LIMIT[arch]} B): {sum('shared memory' in r['problems'] for r in records)}.",
        f"Max registers {max((r['n_regs'] or 0) for r in records) if records else '-'}, "
        f"max shared memory {max((r['shared_bytes'] or 0) for r in records) if records else '-'} B.",
        "",
        "Cell: registers / n_spills (ptxas stack bytes / 4) / shared KiB / MMA kind, over every launch of that",
        "role (the worst one when they differ); `!` marks a problem. fwd = forward (k = neighbours), dC+dA atomic =",
        "the default backward, dC and dA = the deterministic one (a frozen MoCo queue needs dA only).",
        "Tiles: BLOCK_N x BLOCK_M x D held in registers, or `D/K->B`: D streamed in chunks of K features into",
        "gradient output blocks of B features (w = warps, s = pipeline stages).",
        "",
        "| layout | D | dtype | " + " | ".join(ROLES) + " | tiles (fwd; dC; dA) |",
        "|---|---|---|" + "---|" * len(ROLES) + "---|",
    ]
    groups = {}
    for r in records:
        dt = r["dtype"] + ("-tf32" if r["allow_tf32"] else ("-ieee" if r["dtype"] == "fp32" else ""))
        layout = r["layout"] + (f" [{r['variants']}]" if r.get("variants") else "")
        groups.setdefault((layout, r["D"], dt), []).append(r)
    for (layout, d, dt), rows in sorted(groups.items(), key=lambda x: (
            list(LAYOUTS).index(x[0][0].split()[0]) if x[0][0].split()[0] in LAYOUTS else 9, x[0][1], x[0][2],
            x[0][0])):
        cells = []
        for role in ROLES:
            these = [r for r in rows if _role(r) == role]
            if not these:
                cells.append("-")
                continue
            worst = max(these, key=lambda r: (bool(r["problems"]), r["n_spills"] or 0, r["n_regs"] or 0))
            if not worst["ok"]:
                cells.append("FAIL!")
                continue
            cells.append(f"{worst['n_regs']}/{worst['n_spills']}/{worst['shared_bytes'] // 1024}/{worst['mma']}"
                         + ("!" if worst["problems"] else ""))
        tiles = []
        for kernel in ("forward_kernel", "candidate_grad_kernel", "anchor_grad_kernel"):
            r = next((r for r in rows if r["kernel"] == kernel), None)
            tiles.append("-" if r is None else f"{r['block_n']}x{r['block_m']}"
                         + (f"x{r['block_d']}" if r["one_d_block"] else
                            f" D/{r['block_k']}" + ("" if kernel == "forward_kernel" else f"->{r['block_d']}"))
                         + f" w{r['num_warps']}s{r['num_stages']}")
        lines.append(f"| {layout} | {d} | {dt} | " + " | ".join(cells) + " | " + "; ".join(tiles) + " |")
    if any(r.get("variants") for r in records):
        lines += ["", "## Speed variants: PTX counts per launch", "",
                  "`atom` / `red`: atomic instructions in the PTX (the fused dA adds); `cp.async`: asynchronous "
                  "copies (the software pipeline's loads). Same configuration, default launch first.", "",
                  "| kernel | layout | D | dtype | mode | det | variants | regs | spills | shared KiB | MMA | atom "
                  "| red | cp.async | tiles |", "|---" * 15 + "|"]
        for r in records:
            lines.append(
                f"| {r['kernel'].replace('_kernel', '')}{' +dA' if r['atomic_anchor_grad'] else ''} | {r['layout']} | "
                f"{r['D']} | {r['dtype']}{'-tf32' if r['allow_tf32'] else ''} | {r['mode']} | "
                f"{'y' if r['deterministic'] else 'n'} | {r.get('variants', 'default')} | {r['n_regs']} | "
                f"{r['n_spills']} | {(r['shared_bytes'] or 0) // 1024} | {r['mma']} | {r.get('ptx_atom')} | "
                f"{r.get('ptx_red')} | {r.get('ptx_async')} | {r['block_n']}x{r['block_m']} "
                f"{'D' if r['one_d_block'] else 'D/%s->%s' % (r['block_k'], r['block_d'])} "
                f"w{r['num_warps']}s{r['num_stages']} grid {r['grid']} |" + (" !" if r["problems"] else ""))
    if bad:
        lines += ["", "## Problems", ""]
        seen = set()
        for r in bad:
            what = (r["kernel"], r["layout"], r["D"], r["dtype"], r["allow_tf32"], r["k"], r["atomic_anchor_grad"])
            if what in seen:
                continue
            seen.add(what)
            lines.append(f"- {r['kernel']} {r['layout']} D={r['D']} {r['dtype']} tf32={r['allow_tf32']} "
                         f"k={r['k']}: {', '.join(r['problems'])}"
                         + (f" ({r['error'].splitlines()[0][:300]})" if r["error"] else
                            f" (regs {r['n_regs']}, n_spills {r['n_spills']}, mma {r['mma']}, "
                            f"fma dots {r['dots_fma']})"))
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], choices=sorted(SM_COUNT))
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: benchmarks/runs/compile-triton<version>-<time>, git-ignored)")
    parser.add_argument("--set", dest="which", choices=("grid", "representative", "variants"), default="grid",
                        help="grid: issue 8's full grid (default); representative: the compile test's set; "
                        "variants: the speed variants (KernelVariants) beside the default launches")
    parser.add_argument("--jobs", type=int, default=2, help="compile processes (default 2)")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per kernel compile")
    parser.add_argument("--capture-only", action="store_true", help="only write launches_sm<arch>.json")
    parser.add_argument("--replay", type=Path, default=None,
                        help="folder with launches_sm<arch>.json from an earlier capture (no torch needed)")
    parser.add_argument("--reuse", type=Path, default=None,
                        help="folder of an earlier run (same kernels source and triton): reuse its results for "
                        "launches that compile to the same kernel")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("unset TRITON_INTERPRET: this compiles for real GPUs")
    import triton

    out = args.out or default_stem(f"compile-triton{triton.__version__}")
    out.mkdir(parents=True, exist_ok=True)
    cache = tempfile.mkdtemp(prefix="compile_report_cache_")
    os.environ["TRITON_CACHE_DIR"] = cache  # the workers inherit it; nothing lands in ~/.triton
    failed = 0
    try:
        for arch in args.arch:
            if args.replay:
                launches = json.loads((args.replay / f"launches_sm{arch}.json").read_text())
            else:
                start = time.time()
                launches = capture(arch, configurations(args.which))
                (out / f"launches_sm{arch}.json").write_text(json.dumps(launches) + "\n")
                print(f"sm_{arch}: captured {len(launches)} launches of "
                      f"{len(Counter(json.dumps(x['config']) for x in launches))} configurations "
                      f"in {time.time() - start:.0f} s", flush=True)
            if args.capture_only:
                continue
            records = run_arch(arch, launches, args.jobs, args.timeout, out, args.reuse)
            failed += sum(1 for r in records if r["problems"])
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
