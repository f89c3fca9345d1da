"""A learnable temperature: ``logit_scale=s`` (issue 26, item 1; docs/loss.md, "A learnable temperature").

The logits are s <a_i, c_j>; the core hands each direction's backend its anchors scaled by s and
temperature 1, so autograd gives dL/ds = sum_i <dL/d(s a_i), a_i>. Checked here:

- fp64 gradcheck of the reference op w.r.t. anchors, candidates (keys) and s, every layout and
  smoothing mode;
- the value and the input gradients equal the float path at temperature 1 / s, and dL/ds equals two
  independent oracles: autograd through the Python-loop oracle (tests/oracles.py) with a tensor
  temperature 1 / s, and the analytic formula dl_i/ds = sum_j (p_ij - y_ij) <a_i, c_j> with the
  dense targets of `smoothed_targets` over masks written from the oracles' predicates;
- the Triton kernel (under the interpreter) against the reference, float32 and bf16, every layout;
- the module's and the views' call forms, a simulated second rank (gather_distributed), the float
  path untouched, no N x M tensor added, and the argument checks.
"""

import os

import torch

if not torch.cuda.is_available():  # must precede any import of the kernel module
    os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Callable, Optional  # noqa: E402

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from smooth_infonce import LossOptions, SmoothInfoNCELoss, distributed, functional, smooth_infonce  # noqa: E402
from smooth_infonce.ops.reference import smoothed_targets  # noqa: E402
from smooth_infonce.views import multi_view_loss, symmetric_moco_loss  # noqa: E402

from oracles import loop_oracle, moco_oracle, nt_xent_oracle, unit  # noqa: E402

interpreter = pytest.mark.interpreter
LAYOUTS = ["in_batch", "supervised", "moco", "moco_ids", "two_tower", "symmetric_mean", "symmetric_sum"]
SMOOTHING = [(0.0, None), (0.3, None), (0.3, 2)]  # plain InfoNCE, uniform, k neighbours
SMOOTHING_IDS = ["alpha0", "uniform", "neighbors"]
CLIP_SCALE = 1 / 0.07  # open_clip's initial logit_scale.exp()


@dataclass
class Direction:
    """One direction of a loss for the oracles: rows of ``anchors`` against ``candidates`` (indices
    into the case's leaves), the layout's predicates, and its share of the total loss."""

    anchors: str
    candidates: str
    is_valid: Callable[[int, int], bool]
    is_positive: Callable[[int, int], bool]
    keys: Optional[str] = None
    row_weights: Optional[torch.Tensor] = None  # None: the mean
    share: float = 1.0


@dataclass
class Case:
    leaves: dict  # name -> float64 leaf tensor
    call: Callable  # (leaves dict, **loss kwargs) -> loss
    directions: list


def make_case(layout: str, seed: int = 0, width: int = 5) -> Case:
    gen = torch.Generator().manual_seed(seed)

    def randn(rows):
        return torch.randn(rows, width, generator=gen, dtype=torch.float64)

    if layout in ("in_batch", "supervised"):
        ids = torch.arange(4).repeat(2) if layout == "in_batch" else torch.tensor([0, 1, 2, 0, 1, 2, 0, 2, 1])
        ids_list = ids.tolist()
        return Case({"x": randn(len(ids_list))}, lambda t, **kw: smooth_infonce(t["x"], ids=ids, **kw),
                    [Direction("x", "x", lambda i, j: i != j, lambda i, j: ids_list[i] == ids_list[j])])
    if layout in ("moco", "moco_ids"):
        leaves = {"q": randn(5), "k": randn(5), "queue": randn(11)}
        weights = torch.tensor([0.5, 1.0, 2.0, 1.5, 0.25], dtype=torch.float64)
        if layout == "moco":
            return Case(leaves, lambda t, **kw: smooth_infonce(t["q"], t["queue"], positive_keys=t["k"],
                                                               weights=weights, **kw),
                        [Direction("q", "queue", lambda i, j: True, lambda i, j: False, keys="k",
                                   row_weights=weights)])
        ids, queue_ids = torch.arange(5), torch.tensor([0, 3, -1, 1, 1, 2, 4, -1, 3, 0, 2])
        own = queue_ids.tolist()
        return Case(leaves, lambda t, **kw: smooth_infonce(t["q"], t["queue"], positive_keys=t["k"], ids=ids,
                                                           candidate_ids=queue_ids, **kw),
                    [Direction("q", "queue", lambda i, j: own[j] != i, lambda i, j: False, keys="k")])
    if layout == "two_tower":
        return Case({"x": randn(5), "y": randn(8)}, lambda t, **kw: smooth_infonce(t["x"], t["y"], **kw),
                    [Direction("x", "y", lambda i, j: True, lambda i, j: i == j)])
    combine = layout.split("_")[1]
    share = 0.5 if combine == "mean" else 1.0
    return Case({"x": randn(6), "y": randn(6)},
                lambda t, **kw: smooth_infonce(t["x"], t["y"], symmetric=combine, **kw),
                [Direction("x", "y", lambda i, j: True, lambda i, j: i == j, share=share),
                 Direction("y", "x", lambda i, j: True, lambda i, j: i == j, share=share)])


def fresh(case: Case, dtype=torch.float64) -> dict:
    return {name: t.detach().to(dtype).requires_grad_() for name, t in case.leaves.items()}


def loss_and_grads(case: Case, dtype=torch.float64, *, scale=None, **kw):
    """The loss and its gradients w.r.t. the leaves (and s, last, when ``scale`` is given)."""
    leaves = fresh(case, dtype)
    inputs = list(leaves.values())
    if scale is not None:
        s = torch.tensor(scale, dtype=dtype if dtype == torch.float64 else torch.float32, requires_grad=True)
        kw["logit_scale"] = s
        inputs.append(s)
    loss = case.call(leaves, **kw)
    return loss.detach(), [g.double() for g in torch.autograd.grad(loss, inputs)]


def oracle_loss(case: Case, temperature, smoothing, neighbors):
    """The loss from the Python-loop oracle; ``temperature`` may be a tensor (then differentiable)."""
    total = 0.0
    for d in case.directions:
        rows = loop_oracle(case.leaves[d.anchors], case.leaves[d.candidates], d.is_valid, d.is_positive,
                           temperature=temperature, smoothing=smoothing, neighbors=neighbors,
                           positive_keys=None if d.keys is None else case.leaves[d.keys])
        w = torch.ones_like(rows) if d.row_weights is None else d.row_weights
        total = total + d.share * (w * rows).sum() / w.sum()
    return total


def oracle_scale_grad_by_autograd(case: Case, scale, smoothing, neighbors):
    """dL/ds through the loop oracle itself, with its temperature the tensor 1 / s."""
    s = torch.tensor(scale, dtype=torch.float64, requires_grad=True)
    loss = oracle_loss(case, 1 / s, smoothing, neighbors)
    return loss.detach(), torch.autograd.grad(loss, s)[0]


def scale_grad_rows(a, c, is_valid, is_positive, scale, smoothing, neighbors, keys=None):
    """dl_i/ds = sum_{j in V(i)} (p_ij - y_ij) <a_i, c_j>, written out densely: masks from the layout's
    predicates, the targets from the project's dense target builder (`smoothed_targets`), p a softmax."""
    a, c = unit(a.detach()), unit(c.detach())
    n, m = a.shape[0], c.shape[0]
    valid = torch.tensor([[is_valid(i, j) for j in range(m)] for i in range(n)], dtype=torch.bool)
    positive = valid & torch.tensor([[is_positive(i, j) for j in range(m)] for i in range(n)], dtype=torch.bool)
    sims = a @ c.T
    if keys is not None:  # MoCo: the key is column 0, a positive
        sims = torch.cat([(a * unit(keys.detach())).sum(1, keepdim=True), sims], dim=1)
        first = torch.ones(n, 1, dtype=torch.bool)
        valid, positive = torch.cat([first, valid], 1), torch.cat([first, positive], 1)
    y = smoothed_targets(sims, positive, valid & ~positive, smoothing, neighbors)
    p = torch.softmax((scale * sims).masked_fill(~valid, float("-inf")), dim=1)
    return ((p - y) * sims.masked_fill(~valid, 0.0)).sum(dim=1)


def oracle_scale_grad_analytic(case: Case, scale, smoothing, neighbors):
    total = torch.zeros((), dtype=torch.float64)
    for d in case.directions:
        rows = scale_grad_rows(case.leaves[d.anchors], case.leaves[d.candidates], d.is_valid, d.is_positive,
                               scale, smoothing, neighbors, None if d.keys is None else case.leaves[d.keys])
        w = torch.ones_like(rows) if d.row_weights is None else d.row_weights
        total = total + d.share * (w * rows).sum() / w.sum()
    return total


# --- the reference op: gradcheck, float-path equality, the oracles --------------------------------

@pytest.mark.parametrize("smoothing,neighbors", SMOOTHING, ids=SMOOTHING_IDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradcheck_reference(layout, smoothing, neighbors):
    """fp64 gradcheck w.r.t. every embedding input and s (open_clip's range: s = 1 / 0.07)."""
    case = make_case(layout, seed=1)
    names = list(case.leaves)

    def fn(*inputs):
        *embeddings, s = inputs
        return case.call(dict(zip(names, embeddings)), logit_scale=s, smoothing=smoothing, neighbors=neighbors,
                         backend="reference")

    leaves = list(fresh(case).values())
    s = torch.tensor(CLIP_SCALE, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fn, (*leaves, s))


@pytest.mark.parametrize("smoothing,neighbors", SMOOTHING, ids=SMOOTHING_IDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_equals_float_path_and_oracles(layout, smoothing, neighbors):
    """logit_scale=s: the loss and input gradients of temperature=1/s, and dL/ds of both oracles."""
    case = make_case(layout, seed=2)
    scale = 7.5
    options = dict(smoothing=smoothing, neighbors=neighbors, backend="reference")
    got, got_grads = loss_and_grads(case, scale=scale, **options)
    want, want_grads = loss_and_grads(case, temperature=1 / scale, **options)
    torch.testing.assert_close(got, want, rtol=1e-13, atol=0)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-11, atol=1e-13)

    oracle, by_autograd = oracle_scale_grad_by_autograd(case, scale, smoothing, neighbors)
    analytic = oracle_scale_grad_analytic(case, scale, smoothing, neighbors)
    torch.testing.assert_close(got, oracle, rtol=1e-12, atol=0)
    torch.testing.assert_close(by_autograd, analytic, rtol=1e-10, atol=1e-13)  # the oracles agree
    torch.testing.assert_close(got_grads[-1], analytic, rtol=1e-10, atol=1e-13)
    assert abs(float(analytic)) > 1e-3  # a gradient that is there to be wrong


@settings(max_examples=20, deadline=None)
@given(layout=st.sampled_from(LAYOUTS), seed=st.integers(0, 2**16), scale=st.floats(0.2, 100.0),
       temperature=st.floats(0.05, 2.0), mode=st.sampled_from(SMOOTHING), normalize=st.booleans())
def test_any_scale_equals_float_path(layout, seed, scale, temperature, mode, normalize):
    """For any s (open_clip clamps it at 100) and whatever the ``temperature`` option says (it is not
    used), with or without normalisation: the float path at 1/s, and dL/ds = <dL/dA, A> / s over
    every anchor role (Euler: the loss depends on s only through s * anchors)."""
    case = make_case(layout, seed=seed)
    smoothing, neighbors = mode
    options = dict(smoothing=smoothing, neighbors=neighbors, normalize=normalize, backend="reference")
    got, got_grads = loss_and_grads(case, scale=scale, temperature=temperature, **options)
    want, _ = loss_and_grads(case, temperature=1 / scale, **options)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    analytic = oracle_scale_grad_analytic(case, scale, smoothing, neighbors) if normalize else None
    if analytic is not None:
        torch.testing.assert_close(got_grads[-1], analytic, rtol=1e-9, atol=1e-11)


def test_float_path_is_untouched(monkeypatch):
    """Without logit_scale the backend gets today's arguments: the very anchors tensor and the
    temperature option, and nothing scales them; with it, temperature 1 and scaled anchors."""
    seen, real = [], functional.reference_row_losses

    def spy(anchors, candidates, keys, pairs, *, temperature, smoothing, neighbors):
        seen.append((anchors, candidates, temperature))
        return real(anchors, candidates, keys, pairs, temperature=temperature, smoothing=smoothing,
                    neighbors=neighbors)

    def no_scaling(*args):
        raise AssertionError("the float path scaled the anchors")

    monkeypatch.setattr(functional, "reference_row_losses", spy)
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    with monkeypatch.context() as m:
        m.setattr(functional, "_scale_rows", no_scaling)
        smooth_infonce(x, y, temperature=0.3, normalize=False)
    assert seen[0][0] is x and seen[0][1] is y and seen[0][2] == 0.3
    seen.clear()
    s = torch.tensor(2.0, dtype=torch.float64)
    smooth_infonce(x, y, temperature=0.3, normalize=False, logit_scale=s)
    assert seen[0][2] == 1.0 and seen[0][1] is y
    torch.testing.assert_close(seen[0][0], 2 * x, rtol=0, atol=0)


def test_in_batch_scales_the_anchor_role_only():
    """In-batch the candidates are the anchors: scaling both would give s^2 logits."""
    x = torch.randn(8, 4, dtype=torch.float64)
    ids = torch.arange(4).repeat(2)
    for scale in (0.5, 3.0, 40.0):
        got = smooth_infonce(x, ids=ids, logit_scale=torch.tensor(scale, dtype=torch.float64))
        torch.testing.assert_close(got, smooth_infonce(x, ids=ids, temperature=1 / scale), rtol=1e-13, atol=0)
        assert not torch.allclose(got, smooth_infonce(x, ids=ids, temperature=1 / scale ** 2))


def test_half_precision_anchors_are_scaled_with_one_rounding():
    """bf16 / fp16 anchors: s * a is formed in float32 and rounded once (s itself is never rounded to
    the anchors' dtype first), and the gradient of s still flows."""
    from smooth_infonce.functional import _scale_rows

    x = torch.randn(64, 8)
    s = torch.tensor(CLIP_SCALE, requires_grad=True)
    for dtype in (torch.bfloat16, torch.float16):
        xh = x.to(dtype)
        scaled = _scale_rows(xh, s)
        assert scaled.dtype == dtype
        assert torch.equal(scaled, (xh.float() * CLIP_SCALE).to(dtype))
        rounded_s = xh.float() * s.detach().to(dtype).float()  # what an s rounded to the dtype would give
        assert not torch.equal(scaled.float(), rounded_s.to(dtype).float())
        (grad_s,) = torch.autograd.grad(scaled.float().sum(), s)
        torch.testing.assert_close(grad_s, xh.float().sum())


# --- the call forms: module, views, symmetric MoCo, a second rank ---------------------------------

def test_module_and_views_call_forms():
    """SmoothInfoNCELoss (two views, multi-crop, MoCo) and symmetric_moco_loss: the float path at
    1/s, and dL/ds of the loop oracle with a tensor temperature."""
    gen = torch.Generator().manual_seed(5)
    v0, v1, v2, queue = (torch.randn(rows, 6, generator=gen, dtype=torch.float64) for rows in (4, 4, 4, 9))
    scale = 12.0
    loss_fn = SmoothInfoNCELoss(0.5, 0.2, 2)

    def check(call, oracle):
        s = torch.tensor(scale, dtype=torch.float64, requires_grad=True)
        got = call(logit_scale=s)
        (grad_s,) = torch.autograd.grad(got, s)
        torch.testing.assert_close(got.detach(), call(temperature=1 / scale), rtol=1e-12, atol=0)
        t = torch.tensor(scale, dtype=torch.float64, requires_grad=True)
        want = oracle(1 / t)
        torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-12, atol=0)
        torch.testing.assert_close(grad_s, torch.autograd.grad(want, t)[0], rtol=1e-10, atol=1e-13)

    def module(*views, temperature=None, **kw):
        fn = loss_fn if temperature is None else SmoothInfoNCELoss(temperature, 0.2, 2)
        return fn(*views, **kw)

    kw = dict(smoothing=0.2, neighbors=2)
    check(lambda **k: module(v0, v1, **k), lambda tau: nt_xent_oracle([v0, v1], temperature=tau, **kw).mean())
    check(lambda **k: module(v0, v1, v2, **k), lambda tau: nt_xent_oracle([v0, v1, v2], temperature=tau, **kw).mean())
    check(lambda **k: module(v0, v1, queue=queue, **k),
          lambda tau: moco_oracle(v0, v1, queue, temperature=tau, **kw).mean())

    def sym(temperature=0.5, **k):
        return symmetric_moco_loss(v0, v1, v2, v0.flip(0), queue, LossOptions(temperature, 0.2, 2),
                                   combine="sum", **k)

    check(sym, lambda tau: (moco_oracle(v0, v0.flip(0), queue, temperature=tau, **kw).mean()
                            + moco_oracle(v2, v1, queue, temperature=tau, **kw).mean()))


def test_gather_distributed_scales_local_anchors_only(monkeypatch):
    """gather_distributed, simulated as rank 1 of 2 (the other rank's rows concatenated first): the
    gathered candidates, this rank's own rows among them, are not scaled."""
    gen = torch.Generator().manual_seed(6)
    other = F.normalize(torch.randn(6, 4, generator=gen, dtype=torch.float64), dim=1).requires_grad_()
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    monkeypatch.setattr(distributed, "check_equal_batch", lambda rows: None)
    monkeypatch.setattr(distributed, "gather_ids", lambda ids: torch.cat([ids - 3, ids]))
    monkeypatch.setattr(distributed, "gather_with_grad", lambda x: torch.cat([other, x]))
    out0, out1 = (torch.randn(3, 4, generator=gen, dtype=torch.float64) for _ in range(2))
    scale = 9.0

    def run(**kw):
        x0, x1 = out0.clone().requires_grad_(), out1.clone().requires_grad_()
        inputs = [x0, x1, other] + ([kw["logit_scale"]] if "logit_scale" in kw else [])
        loss = SmoothInfoNCELoss(kw.pop("temperature", 0.1), 0.2, 2, gather_distributed=True)(x0, x1, **kw)
        return loss.detach(), torch.autograd.grad(loss, inputs)

    s = torch.tensor(scale, dtype=torch.float64, requires_grad=True)
    got, got_grads = run(logit_scale=s)
    want, want_grads = run(temperature=1 / scale)
    torch.testing.assert_close(got, want, rtol=1e-13, atol=0)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-11, atol=1e-13)
    # the oracle: rows 6..11 of the gathered batch (this rank's) against all 12; the other rank's
    # rows have other ids (0..2), so this rank's positives are its own other views
    gathered = torch.cat([other.detach(), F.normalize(torch.cat([out0, out1]), dim=1)])
    rows = gathered[6:]
    t = torch.tensor(scale, dtype=torch.float64, requires_grad=True)
    want = loop_oracle(rows, gathered, lambda i, j: i + 6 != j, lambda i, j: j >= 6 and i % 3 == j % 3,
                       temperature=1 / t, smoothing=0.2, neighbors=2).mean()
    torch.testing.assert_close(got, want.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(got_grads[-1], torch.autograd.grad(want, t)[0], rtol=1e-10, atol=1e-13)


# --- the Triton kernel under the interpreter --------------------------------------------------------

def relative_error(got, want):
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def assert_kernel_matches(case, dtype, scale, smoothing, neighbors, *, loss_tol, grad_tol, scale_tol):
    """The kernel with logit_scale against the reference op in float64 on the same input values."""
    options = dict(smoothing=smoothing, neighbors=neighbors, logit_scale_value=scale)
    got, got_grads = kernel_or_reference(case, dtype, "triton", **options)
    want, want_grads = kernel_or_reference(case, dtype, "reference", **options)
    assert torch.isfinite(got) and all(torch.isfinite(g).all() for g in got_grads)
    assert abs(float(got) - float(want)) <= loss_tol * (abs(float(want)) + 1), (float(got), float(want))
    for name, g, w in zip([*case.leaves, "logit_scale"], got_grads, want_grads):
        tol = scale_tol if name == "logit_scale" else grad_tol
        assert relative_error(g, w) <= tol, f"{name}: relative error {relative_error(g, w):.3g} > {tol}"


def kernel_or_reference(case, dtype, backend, *, logit_scale_value, **options):
    """Leaves in ``dtype`` (the reference: those values in float64), s float32 (float64)."""
    leaves = {name: t.detach().to(dtype) for name, t in case.leaves.items()}
    wide = torch.float64 if backend == "reference" else dtype
    s_dtype = torch.float64 if backend == "reference" else torch.float32
    if backend == "reference":  # the kernel's input values, scaled exactly (the kernel rounds s * a to dtype)
        leaves = {name: t.to(wide) for name, t in leaves.items()}
    leaves = {name: t.requires_grad_() for name, t in leaves.items()}
    s = torch.tensor(logit_scale_value, dtype=s_dtype).requires_grad_()
    loss = case.call(leaves, logit_scale=s, backend=backend, **options)
    grads = torch.autograd.grad(loss, [*leaves.values(), s])
    return loss.detach().double(), [g.double() for g in grads]


@interpreter
@pytest.mark.parametrize("smoothing,neighbors", SMOOTHING, ids=SMOOTHING_IDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_kernel_matches_reference_float32(layout, smoothing, neighbors):
    case = make_case(layout, seed=3, width=17)
    assert_kernel_matches(case, torch.float32, CLIP_SCALE, smoothing, neighbors,
                          loss_tol=1e-6, grad_tol=2e-6, scale_tol=2e-6)


@interpreter
@pytest.mark.parametrize("layout", ["in_batch", "moco_ids", "symmetric_mean"])
def test_kernel_at_open_clips_largest_scale(layout):
    """s = 100 (open_clip's clamp), temperature 1 in the kernel: logits up to 100 stay exact."""
    case = make_case(layout, seed=4, width=17)
    assert_kernel_matches(case, torch.float32, 100.0, 0.3, 2, loss_tol=1e-6, grad_tol=2e-6, scale_tol=2e-6)


@interpreter
@pytest.mark.parametrize("layout", LAYOUTS)
def test_kernel_matches_reference_bf16(layout):
    """bf16 inputs: s * a rounded once to bf16 (as docs/loss.md bounds it) then the bf16 kernel;
    against the fp64 reference on the bf16 input values, at the bf16 kernel tests' gate."""
    case = make_case(layout, seed=5, width=17)
    assert_kernel_matches(case, torch.bfloat16, CLIP_SCALE, 0.3, 2, loss_tol=5e-3, grad_tol=2e-2, scale_tol=1e-2)


class ShapeRecorder(TorchDispatchMode):
    """The number of elements of every tensor an aten op outside the custom ops returns."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.sizes.append((str(func), t.numel()))
        return out


@interpreter
@pytest.mark.parametrize("layout", ["in_batch", "moco", "two_tower"])
def test_kernel_path_adds_nothing_n_by_m(layout):
    """fwd + bwd with the Triton backend: the ops that logit_scale adds around the custom op are
    O(N D); no tensor of N x M elements appears (sizes chosen so that N M > 2 (N + M) D)."""
    gen = torch.Generator().manual_seed(7)
    width, n, m = 4, 24, 40
    x = torch.randn(n, width, generator=gen).requires_grad_()
    y = torch.randn(m, width, generator=gen).requires_grad_()
    keys = torch.randn(n, width, generator=gen).requires_grad_()
    s = torch.tensor(CLIP_SCALE, requires_grad=True)
    call = {
        "in_batch": lambda **kw: smooth_infonce(x, ids=torch.arange(n // 2).repeat(2), **kw),
        "moco": lambda **kw: smooth_infonce(x, y, positive_keys=keys, **kw),
        "two_tower": lambda **kw: smooth_infonce(x, y, **kw),
    }[layout]
    largest = {}
    for name, kw in (("float", dict(temperature=1 / CLIP_SCALE)), ("scale", dict(logit_scale=s))):
        with ShapeRecorder() as recorder:
            loss = call(backend="triton", smoothing=0.3, neighbors=2, **kw)
            loss.backward()
        largest[name] = max(numel for op, numel in recorder.sizes if "smooth_infonce" not in op)
    assert largest["scale"] < n * m / 2, largest
    assert largest["scale"] <= max(largest["float"], n * width), largest
    assert s.grad is not None and torch.isfinite(s.grad)


# --- argument checks ----------------------------------------------------------------------------

BAD_VALUES = [
    (lambda: torch.tensor(0.0), ValueError, "finite and > 0"),
    (lambda: torch.tensor(-2.0), ValueError, "finite and > 0"),
    (lambda: torch.tensor(math.nan), ValueError, "finite and > 0"),
    (lambda: torch.tensor(math.inf), ValueError, "finite and > 0"),
]
BAD_STRUCTURE = [
    (lambda: torch.tensor([1.0, 2.0]), ValueError, "one element"),
    (lambda: torch.tensor([[3.0]]), ValueError, "one element"),
    (lambda: torch.tensor([]), ValueError, "one element"),
    (lambda: torch.tensor(3), TypeError, "floating-point"),
    (lambda: torch.tensor(True), TypeError, "floating-point"),
    (lambda: 14.0, TypeError, "torch.Tensor"),
    (lambda: torch.tensor(3.0, device="meta"), ValueError, "anchors' device"),
]


@pytest.mark.parametrize("make,error,message", BAD_VALUES + BAD_STRUCTURE)
def test_bad_logit_scale_is_rejected(make, error, message):
    x, y = torch.randn(4, 3), torch.randn(4, 3)
    with pytest.raises(error, match=r"logit_scale.*" + message):
        smooth_infonce(x, y, logit_scale=make())
    with pytest.raises(error, match=r"logit_scale.*" + message):  # the module's call forms check it too
        SmoothInfoNCELoss()(x, y, logit_scale=make())
    with pytest.raises(error, match=r"logit_scale.*" + message):
        multi_view_loss((x, y), LossOptions(), queue=torch.randn(6, 3), logit_scale=make())


@pytest.mark.parametrize("make,error,message", BAD_STRUCTURE)
def test_structure_is_checked_without_validate(make, error, message):
    """validate=False reads nothing back from the device, but shape, dtype and device are checked."""
    with pytest.raises(error, match=r"logit_scale.*" + message):
        smooth_infonce(torch.randn(4, 3), torch.randn(4, 3), logit_scale=make(), validate=False)


def test_values_are_not_read_without_validate():
    """validate=False: no device synchronisation, so a bad value is not caught (but a (1,) tensor works)."""
    x, y = torch.randn(4, 3), torch.randn(4, 3)
    assert torch.isnan(smooth_infonce(x, y, logit_scale=torch.tensor(math.nan), validate=False))
    torch.testing.assert_close(smooth_infonce(x, y, logit_scale=torch.tensor([2.0]), validate=False),
                               smooth_infonce(x, y, temperature=0.5))
