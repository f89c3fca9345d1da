"""First use of the fused kernel: a self-check with a safe fallback (issue 24).

A GPU the kernel has never met cannot give a user a wrong gradient. The first time a process sends
the fused op a problem of a new `Kind` (what the launches are planned for, the kernels' dtype, the
layout family, the smoothing mode, the selected speed variants `KernelVariants`, the backward mode
and the padded head width that picks the compiled tiles), the op first runs a small probe of that
kind through the same functions it launches with
(`ops.triton._kernel_forward` / `_kernel_backward`) and compares the loss and every gradient with the
reference op in float64 on the same input values, within `TOLERANCES`. On a mismatch, a non-finite
value or any exception (a compile error, out of resources, a launch failure), the process warns once
(`KernelFallbackWarning`: the GPU, the versions, the kind, the worst error or the exception) and uses
the reference op for that kind from then on: slower, never wrong.

The verdicts are cached on disk per environment (GPU name and capability, driver, torch, triton,
smooth-infonce version and a digest of the kernel's sources: an edited kernel is checked again), in
$SMOOTH_INFONCE_CACHE_DIR, else $XDG_CACHE_HOME/smooth_infonce, else ~/.cache/smooth_infonce, so later
processes skip the probe. SMOOTH_INFONCE_SELF_CHECK: "1" (default), "0" (trust the kernel, no probe),
"always" (probe in every process, ignoring the cached verdicts). Under torch.distributed every rank
takes the same decision for a kind: the verdicts are all-reduced (MIN) at the kind's first call that
computes gradients, so if any rank's probe fails, all ranks use the reference for that kind
(`kernel_verified`; every rank must meet that call, as data-parallel training does, and read the
same SMOOTH_INFONCE_SELF_CHECK).

Where the decision lives, and why there: in the body of the custom op
``torch.ops.smooth_infonce.triton_row_losses`` (and its backward op). That body runs eagerly, also
inside a graph compiled with torch.compile(fullgraph=True), where the tracer only sees the op's fake
kernel; so the probe (launches, file I/O, a collective, a warning) never has to be traced, and a
compiled graph cannot bake in a decision taken before the verdict existed. On every call the body
forms the call's kind (`ops.triton.kind_of`, a few attribute reads) and looks it up in a dict
(`kernel_verified`); only a kind not seen before in this process goes further. Deciding at the Python
boundary (`functional.resolve_backend`) would have put the probe inside the traced code.

The fallback computes `ops.reference.weighted_row_losses` from the op's own arguments (the same
targets the kernel got), and its gradients by autograd in a short-lived thread (`_outside_the_op`):
the op's body runs below torch's autograd dispatch keys, where even ``torch.enable_grad`` records no
graph; a new thread starts without that thread-local state.

Not covered: `ops.triton.nearest_negatives` (the neighbour search alone, not a loss). The doctor
(`python -m smooth_infonce.doctor`, ``smooth-infonce-doctor``) probes every kind and reports them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import tempfile
import threading
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence

import torch

MODE_ENV = "SMOOTH_INFONCE_SELF_CHECK"
CACHE_ENV = "SMOOTH_INFONCE_CACHE_DIR"
MODES = {
    "1": "check each new kind once, verdicts cached on disk (the default)",
    "0": "trust the kernel: no probe",
    "always": "probe each new kind in every process, ignoring the cached verdicts",
}
REPORT = "report it on the project's issue tracker with the output of smooth-infonce-doctor"

DTYPES = ("bfloat16", "float16", "float32", "float32-tf32", "float64")  # float32-tf32: fp32 inputs, TF32 dots
LAYOUTS = ("in_batch", "moco", "moco_ids", "two_tower")  # moco_ids: the queue with sample ids
SMOOTHING = ("none", "uniform", "neighbors")

# The probe's tolerances against the float64 reference op on the same (rounded) input values, per
# kernel dtype: (loss, gradient). Loss error: max_i |l_i - r_i| / (|r_i| + 1 / tau) (logits are
# O(1 / tau)); gradient error: ||g - r|| / ||r|| for each gradient tensor. About ten times what a
# correct kernel gives (tests/test_triton_kernel.py's TOLERANCE; TF32 rounds the inputs to 10-bit
# mantissas), and far below what a wrong one gives: at the probe's alpha = 0.2 a dropped smoothing
# term is an error of order 0.1, a wrong sign or a lost mask one of order 1.
TOLERANCES: Dict[str, tuple] = {
    "float64": (1e-9, 1e-8),
    "float32": (1e-4, 1e-3),
    "float32-tf32": (1e-2, 5e-2),
    "float16": (1e-3, 2e-2),
    "bfloat16": (1e-3, 5e-2),
}

# The probe: one small problem per layout (in-batch: 8 instances x 2 views; MoCo: 16 queries and a
# queue of 48; two-tower: 16 anchors, 48 candidates) at the kind's head width, tau = 0.2, alpha = 0.2,
# k = 3. Its vectors are drawn in 32 dimensions (16 for the narrowest width) and mapped into the
# kind's width by a random isometry (`make_problem(width=...)`), so the kernels compiled for that
# width are the ones probed while every similarity stays the drawn one. The seeds are chosen so that
# in every layout each row's k-th and (k+1)-th negative similarities differ by more than 2^-9 at every
# width and dtype (tests/test_self_check.py): TF32 rounding moves a similarity of unit vectors by at
# most 2^-10, so the kernel and the reference pick the same neighbours. The backward runs once with
# every input needing a gradient and, outside the in-batch layout, once for the anchors alone (the
# frozen MoCo queue): between them every backward kernel of the mode is launched.
PROBE = dict(n=16, m=48, temperature=0.2, smoothing=0.2, neighbors=3, seeds={32: 88, 16: 38})  # drawn dim: seed
_PROBLEM_LAYOUT = {"in_batch": "inbatch", "moco": "moco", "moco_ids": "moco_ids", "two_tower": "twotower"}
class KernelFallbackWarning(RuntimeWarning):
    """The fused kernel failed its self-check for a kind: this process uses the reference op for it."""


class Kind(NamedTuple):
    """What one self-check verdict covers."""

    target: str  # what the launches are planned for: "sm_90", or "interpreter" (CPU tensors, TRITON_INTERPRET=1)
    dtype: str  # one of DTYPES: the kernels' dtype (mixed inputs: the accumulation dtype)
    layout: str  # one of LAYOUTS
    smoothing: str  # one of SMOOTHING
    variants: str  # the selected KernelVariants, as KernelVariants.text() writes them ("default")
    deterministic: bool  # the backward mode
    width: int  # the head width the kernels are compiled for: D padded to a power of two, at least 16

    def text(self) -> str:
        return (f"{self.target} {self.dtype} {self.layout} width={self.width} smoothing={self.smoothing} "
                f"variants={self.variants} {'deterministic' if self.deterministic else 'atomic'}")


@dataclass(frozen=True)
class Verdict:
    """A kind's verdict: ok, the probe's worst errors (None when it raised), what failed, its time."""

    ok: bool
    loss_error: Optional[float] = None
    grad_error: Optional[float] = None
    worst: str = ""  # the failure: "gradient of candidates: 3.1e-01 > 5e-02", or the exception
    seconds: Optional[float] = None  # the probe's wall time
    source: str = "probe"  # "probe", "cache" (an earlier process), "trusted" (mode "0"), "another rank"

    def to_json(self) -> dict:
        return {key: value for key, value in asdict(self).items() if key != "source"}

    @classmethod
    def from_json(cls, data: dict) -> "Verdict":
        fields = {key: data[key] for key in ("ok", "loss_error", "grad_error", "worst", "seconds") if key in data}
        if not isinstance(fields.get("ok"), bool):
            raise ValueError("a cached verdict needs a bool 'ok'")
        return cls(**fields, source="cache")


# --------------------------------------------------------------------------------------------
# In-process state: the fast path is one dict lookup
# --------------------------------------------------------------------------------------------

_VERDICTS: Dict[Kind, bool] = {}  # the final verdicts, read on every call of the op
_LOCAL: Dict[Kind, Verdict] = {}  # this rank's own verdicts (final unless the ranks have still to agree)
_DETAILS: Dict[Kind, Verdict] = {}
_WARNED: set = set()
_ENVIRONMENTS: Dict[str, dict] = {}
_LOCK = threading.RLock()  # DataParallel calls the op from several threads: one probe per kind
_SUSPENDED = 0
_PROBING = 0


def kernel_verified(kind: Kind, device: torch.device, agree: bool = True) -> bool:
    """May the kernel run this kind? One dict lookup once the kind is decided; the first call of a
    kind decides it (the cache, or a probe on ``device``; a failure warns once).

    Under torch.distributed the ranks agree on a kind's verdict (an all-reduce, MIN of the ok
    flags) at its first call with ``agree``: a call that computes gradients, which in data-parallel
    training every rank makes at the same step. A call without gradients (an evaluation, perhaps on
    one rank only, which must not wait for the others) uses its own rank's verdict until a call with
    gradients meets the kind."""
    verdict = _VERDICTS.get(kind)
    return _decide(kind, device, agree) if verdict is None else verdict


def reset() -> None:
    """Forget every in-process verdict and environment (tests; a later call decides again)."""
    with _LOCK:
        for state in (_VERDICTS, _LOCAL, _DETAILS, _ENVIRONMENTS, _WARNED):
            state.clear()


def verdicts() -> Dict[Kind, Verdict]:
    """The verdicts this process has taken so far."""
    with _LOCK:
        return dict(_DETAILS)


@contextlib.contextmanager
def suspended():
    """Kinds first met inside run the kernel undecided (no probe, nothing recorded): for the offline
    launch recorders (benchmarks/compile_report.py), whose stand-in kernels compute nothing."""
    global _SUSPENDED
    with _LOCK:
        _SUSPENDED += 1
    try:
        yield
    finally:
        with _LOCK:
            _SUSPENDED -= 1


def probing() -> bool:
    """Is a probe running? (Tests that record a call's launches leave out the probe's.)"""
    return _PROBING > 0


def mode() -> str:
    """SMOOTH_INFONCE_SELF_CHECK, checked: "1" (default), "0" or "always"."""
    value = os.environ.get(MODE_ENV, "1").strip()
    if value not in MODES:
        allowed = "; ".join(f"{key!r}: {meaning}" for key, meaning in MODES.items())
        raise ValueError(f"{MODE_ENV}={value!r} is not one of the allowed values ({allowed})")
    return value


def _decide(kind: Kind, device: torch.device, agree: bool) -> bool:
    from . import distributed

    with _LOCK:
        if kind in _VERDICTS:
            return _VERDICTS[kind]
        if _SUSPENDED:
            return True
        if kind not in _LOCAL:
            _LOCAL[kind] = _local_verdict(kind, device)
        verdict, final = _LOCAL[kind], True
        if verdict.source != "trusted" and distributed.is_distributed():
            final = agree
            if agree and _agree_across_ranks(verdict.ok, device) != verdict.ok:
                verdict = replace(verdict, ok=False, source="another rank",
                                  worst="this rank's probe passed, another rank's failed; every rank uses the "
                                  "reference op for this kind")
        if final:
            _VERDICTS[kind] = verdict.ok
        _DETAILS[kind] = verdict
        warn = not verdict.ok and kind not in _WARNED
        _WARNED.add(kind)
    if warn:  # after recording: a warning turned into an error still leaves the verdict decided
        warnings.warn(fallback_message(kind, verdict, environment(device)), KernelFallbackWarning, stacklevel=2)
    return verdict.ok


def _local_verdict(kind: Kind, device: torch.device) -> Verdict:
    """This rank's verdict: trusted (mode "0"), cached (mode "1"), or a probe's (stored in the cache)."""
    chosen = mode()
    if chosen == "0":
        return Verdict(True, source="trusted")
    env = environment(device)
    verdict = read_cache(env).get(kind.text()) if chosen == "1" else None
    if verdict is None:
        verdict = probe(kind, device)
        store(env, kind, verdict)
    return verdict


def fallback_message(kind: Kind, verdict: Verdict, env: dict) -> str:
    where = {"cache": f" (verdict of an earlier process, cached in {cache_path(env)})",
             "another rank": " (on another rank)"}.get(verdict.source, "")
    return (f"smooth_infonce: the fused Triton kernel failed its self-check{where} for kind '{kind.text()}' on "
            f"{env['gpu']} ({env['capability']}, driver {env['driver']}; torch {env['torch']}, triton "
            f"{env['triton']}, smooth-infonce {env['smooth_infonce']}): {verdict.worst}. This process uses the "
            f"exact reference op for this kind from now on (correct, slower, N x M memory); please {REPORT}. "
            f"{MODE_ENV}=always checks again, {MODE_ENV}=0 trusts the kernel.")


def _agree_across_ranks(ok: bool, device: torch.device) -> bool:
    """MIN of the ranks' ok flags when torch.distributed is initialised (every rank meets a kind's
    first call at the same step, as every rank computes the same loss)."""
    from . import distributed

    if not distributed.is_distributed():
        return ok
    import torch.distributed as dist

    flag = torch.tensor([int(ok)], dtype=torch.int32)
    if dist.get_backend() == "nccl":
        flag = flag.to(device if device.type == "cuda" else torch.device("cuda", torch.cuda.current_device()))
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


# --------------------------------------------------------------------------------------------
# The environment a verdict holds for, and the cache on disk
# --------------------------------------------------------------------------------------------


def environment(device: torch.device) -> dict:
    """What a verdict holds for on ``device``: GPU name and capability, driver, torch, triton, and
    smooth-infonce's version with a digest of the sources the kernel and the probe are made of."""
    device = torch.device(device)
    key = str(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        key = f"cuda:{index}"
    if key not in _ENVIRONMENTS:
        if device.type == "cuda":
            props = torch.cuda.get_device_properties(index)
            gpu, capability, driver = props.name, f"sm_{props.major}{props.minor}", driver_version()
        else:
            gpu, capability, driver = f"none ({device.type}: the Triton interpreter)", "none", "none"
        _ENVIRONMENTS[key] = dict(gpu=gpu, capability=capability, driver=driver, torch=torch.__version__,
                                  triton=_triton_version(), smooth_infonce=package_version())
    return _ENVIRONMENTS[key]


def driver_version() -> str:
    """The NVIDIA driver's version (from /proc/driver/nvidia/version), else the CUDA driver API's."""
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
        found = re.search(r"Kernel Module(?: for \S+)?\s+(\d+(?:\.\d+)+)", text)
        if found:
            return found.group(1)
    except OSError:
        pass
    get = getattr(torch._C, "_cuda_getDriverVersion", None)
    if get is not None and torch.cuda.is_available():
        version = get()
        return f"CUDA driver API {version // 1000}.{version % 1000 // 10}"
    return "unknown"


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "not installed"
    return triton.__version__


_SOURCES = ("ops/__init__.py", "ops/kernels.py", "ops/triton.py", "ops/reference.py", "layout.py", "testing.py",
            "self_check.py")


def package_version() -> str:
    """smooth-infonce's version + a digest of the kernel's, the reference's and the probe's sources."""
    from . import __version__

    digest = hashlib.sha256()
    root = Path(__file__).resolve().parent
    for name in _SOURCES:
        try:
            digest.update((root / name).read_bytes())
        except OSError:
            digest.update(name.encode())
    return f"{__version__}+{digest.hexdigest()[:12]}"


def cache_dir() -> Path:
    """$SMOOTH_INFONCE_CACHE_DIR, else $XDG_CACHE_HOME/smooth_infonce, else ~/.cache/smooth_infonce."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "smooth_infonce"


def cache_path(env: dict) -> Path:
    """One file per environment: a new version of any field is a new file (checked again)."""
    digest = hashlib.sha256(json.dumps(env, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / f"self-check-{digest}.json"


def read_cache(env: dict) -> Dict[str, Verdict]:
    """The cached verdicts of ``env`` by kind text; {} for a missing, unreadable or corrupt file
    (or one written for another environment)."""
    try:
        data = json.loads(cache_path(env).read_text())
        if data.get("environment") != env:
            return {}
        return {text: Verdict.from_json(entry) for text, entry in data["kinds"].items()}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return {}


def store(env: dict, kind: Kind, verdict: Verdict) -> None:
    """Add a kind's verdict to the cache: written to a temporary file, then os.replace'd over the
    old one (readers never see half a file). A cache that cannot be written only costs a probe."""
    path = cache_path(env)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        kinds = {text: v.to_json() for text, v in read_cache(env).items()}
        kinds[kind.text()] = verdict.to_json()
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        with os.fdopen(fd, "w") as out:
            json.dump({"environment": env, "kinds": kinds}, out, indent=1, sort_keys=True)
        os.replace(tmp, path)
        tmp = None
    except OSError:
        pass
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


# --------------------------------------------------------------------------------------------
# The probe
# --------------------------------------------------------------------------------------------


def all_kinds(target: str, width: int, variants: str = "default", dtypes: Sequence[str] = DTYPES,
              deterministic: Sequence[bool] = (False, True)) -> List[Kind]:
    """Every kind of a target at one head width (the doctor's table), the non-deterministic backward first."""
    return [Kind(target, dtype, layout, smoothing, variants, det, width) for det in deterministic
            for dtype in dtypes for layout in LAYOUTS for smoothing in SMOOTHING]


def probe_problem(kind: Kind, device: torch.device):
    """The probe's `smooth_infonce.testing.Problem` for a kind, and its (smoothing, neighbors)."""
    from .testing import make_problem

    drawn = min(32, kind.width)
    problem = make_problem(_PROBLEM_LAYOUT[kind.layout], PROBE["n"], PROBE["m"], drawn, width=kind.width,
                           dtype=getattr(torch, kind.dtype.removesuffix("-tf32")), device=device,
                           seed=PROBE["seeds"][drawn])
    smoothing = 0.0 if kind.smoothing == "none" else PROBE["smoothing"]
    return problem, smoothing, PROBE["neighbors"] if kind.smoothing == "neighbors" else None


def probe(kind: Kind, device: torch.device) -> Verdict:
    """Run the kind's probe through the op's launch functions on ``device`` and judge it against the
    reference op. Never raises for a kernel failure: an exception is a failed verdict."""
    global _PROBING
    start = time.perf_counter()
    _PROBING += 1
    try:
        loss_error, grad_error, worst = _run_probe(kind, torch.device(device))
    except Exception as err:  # a compile error, out of resources, a launch failure: the kernel is not usable
        return Verdict(False, worst=f"the probe raised {type(err).__name__}: {str(err).strip()[:400]}",
                       seconds=time.perf_counter() - start)
    finally:
        _PROBING -= 1
    seconds = time.perf_counter() - start
    loss_tol, grad_tol = TOLERANCES[kind.dtype]
    ok = loss_error <= loss_tol and grad_error <= grad_tol  # False for NaN
    return Verdict(ok, loss_error, grad_error, "" if ok else worst, seconds)


def _run_probe(kind: Kind, device: torch.device):
    from .ops import triton as host
    from .ops.reference import reference_row_losses

    problem, smoothing, neighbors = probe_problem(kind, device)
    temperature = PROBE["temperature"]
    a = problem.anchors.detach()
    c = a if problem.same else problem.candidates.detach()
    k = None if problem.keys is None else problem.keys.detach()
    with host.kernel_variants(kind.variants):
        x = host.row_loss_inputs(a, c, k, problem.pairs, temperature=temperature, smoothing=smoothing,
                                 neighbors=neighbors, deterministic=kind.deterministic,
                                 allow_tf32=kind.dtype == "float32-tf32")
        losses, lse, cols = host._kernel_forward(x)
        grad = problem.row_grad.to(device=device, dtype=losses.dtype)
        requests = [(True, True, k is not None)] + ([] if problem.same else [(True, False, False)])
        results = [(needs, host._kernel_backward(host.BackwardRequest(grad, lse, cols, *needs), x))
                   for needs in requests]
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # an asynchronous launch failure surfaces here, inside the try

    def reference():
        with torch.enable_grad():
            leaves = [t.detach().double().requires_grad_() for t in (a, c) + (() if k is None else (k,))]
            rows = reference_row_losses(leaves[0], leaves[1], None if k is None else leaves[2], problem.pairs,
                                        temperature=temperature, smoothing=smoothing, neighbors=neighbors)
            return rows.detach(), torch.autograd.grad((rows * problem.row_grad.to(rows.dtype)).sum(), leaves)

    ref_losses, ref_grads = _outside_the_op(reference, device)
    errors = {"loss": _loss_error(losses, ref_losses, temperature)}
    names = ("anchors", "candidates", "positive_keys")
    for needs, grads in results:
        suffix = "" if all(needs[:2]) else " (anchors alone)"
        for name, needed, got, ref in zip(names, needs, grads, ref_grads + (None,)):
            if needed:
                errors[f"gradient of {name}{suffix}"] = _grad_error(got, ref)
    loss_tol, grad_tol = TOLERANCES[kind.dtype]
    over = {name: err / (loss_tol if name == "loss" else grad_tol) for name, err in errors.items()}
    worst = max(over, key=lambda name: over[name] if not math.isnan(over[name]) else math.inf)
    tolerance = loss_tol if worst == "loss" else grad_tol
    grad_error = max((e for n, e in errors.items() if n != "loss"), key=lambda e: math.inf if math.isnan(e) else e)
    return errors["loss"], grad_error, f"{worst}: error {errors[worst]:.3g} > {tolerance:g}"


def _loss_error(got: torch.Tensor, ref: torch.Tensor, temperature: float) -> float:
    if got is None or got.shape != ref.shape or not torch.isfinite(got).all():
        return math.inf
    return float(((got.double() - ref).abs() / (ref.abs() + 1 / temperature)).max())


def _grad_error(got: Optional[torch.Tensor], ref: torch.Tensor) -> float:
    if got is None or got.shape != ref.shape or not torch.isfinite(got).all():
        return math.inf
    return float((got.double() - ref).norm() / ref.norm().clamp_min(1e-300))


# --------------------------------------------------------------------------------------------
# The fallback: the reference op on the fused op's own arguments
# --------------------------------------------------------------------------------------------


def _reference_rows(x, anchors, candidates, keys):
    from .layout import make_pairs
    from .ops.reference import weighted_row_losses

    pairs = make_pairs(anchors.shape[0], candidates.shape[0], anchor_ids=x.anchor_ids, candidate_ids=x.candidate_ids,
                       self_offset=x.self_offset, has_positive_key=keys is not None, ids_exclude=x.ids_exclude,
                       device=anchors.device)
    return weighted_row_losses(anchors, candidates, keys, pairs, x.w_pos, x.w_smooth, temperature=x.temperature,
                               neighbors=x.neighbors or None, uniform=not x.neighbors and x.smoothed)


def reference_forward(x):
    """The forward op's outputs for a kind that failed its self-check (``x``: `RowLossInputs`): the
    reference op's row losses; the log-sum-exp and neighbour columns are placeholders that only this
    module's `reference_backward` receives."""
    with torch.no_grad():
        losses = _reference_rows(x, x.anchors, x.candidates, x.positive_keys)
    n = losses.shape[0]
    return losses, torch.zeros_like(losses), torch.zeros((n, x.neighbors), dtype=torch.long, device=losses.device)


def reference_backward(r, x):
    """(dA, dC, dK) of the reference op for the backward op's request ``r`` (`BackwardRequest`),
    None where not asked for. The anchors and candidates are separate leaves even when they are one
    tensor (in-batch), as the kernel's backward returns them."""
    def grads():
        with torch.enable_grad():
            a = x.anchors.detach().requires_grad_(r.need_anchor_grad)
            c = x.candidates.detach().requires_grad_(r.need_candidate_grad)
            k = None if x.positive_keys is None else x.positive_keys.detach().requires_grad_(r.need_key_grad)
            inputs = (a, c, k)
            leaves = [t for t in inputs if t is not None and t.requires_grad]
            if not leaves:
                return None, None, None
            rows = _reference_rows(x, a, c, k)
            found = iter(torch.autograd.grad((rows * r.grad.to(rows.dtype)).sum(), leaves, allow_unused=True))
            return tuple(next(found) if t is not None and t.requires_grad else None for t in inputs)

    return _outside_the_op(grads, x.anchors.device)


def _outside_the_op(fn: Callable, device: torch.device):
    """fn() in a fresh thread, its result returned (its exception re-raised). The custom op's body
    runs below torch's autograd dispatch keys (torch.library), where no graph is recorded even under
    ``torch.enable_grad``; a new thread starts without that thread-local state (and without autocast).
    The caller's CUDA stream is carried over, so the work stays ordered with the kernels around it."""
    stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
    box = {}

    def run():
        try:
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                box["value"] = fn()
        except BaseException as err:  # re-raised in the caller's thread
            box["error"] = err

    worker = threading.Thread(target=run, name="smooth_infonce-reference", daemon=True)
    worker.start()
    worker.join()
    if "error" in box:
        raise box["error"]
    return box["value"]
