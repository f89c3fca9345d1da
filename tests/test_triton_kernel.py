"""The fused Triton backend against the exact reference op.

Tests marked `interpreter` run the kernels on CPU tensors under the Triton interpreter (exact numpy
execution of the same kernel code, with small tiles so that a few dozen rows already span several
tiles and splits): in this process without CUDA, in a child process with CUDA
(tests/test_interpreter_subprocess.py). The interpreter does not check GPU compile rules, so tests
marked `gpu` repeat the important checks on a real device (bf16 at larger shapes, memory,
determinism, S6-style ragged shapes).
"""

import os

import torch

if not torch.cuda.is_available():  # must precede the import of the kernel module
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402,F401  # a core dependency on Linux: a broken install fails, never skips
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from smooth_infonce import self_check, testing  # noqa: E402
from smooth_infonce.layout import make_pairs  # noqa: E402
from smooth_infonce.ops import row_target_weights  # noqa: E402
from smooth_infonce.ops.reference import reference_row_losses  # noqa: E402
from smooth_infonce.ops.triton import (  # noqa: E402
    INTERPRET,
    RowLossInputs,
    nearest_negatives,
    resolve_allow_tf32,
    triton_row_losses,
)
from smooth_infonce.testing import Problem  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not INTERPRET:
    pytest.skip("no CUDA and the Triton interpreter is off (TRITON_INTERPRET=1 was set too late)",
                allow_module_level=True)
gpu = pytest.mark.gpu
# CPU tensors through the kernels: needs the interpreter (on a CUDA machine such tests run in a child
# process, tests/conftest.py and tests/test_interpreter_subprocess.py)
interpreter = pytest.mark.interpreter
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# Tolerances against an fp64 reference on the same input values: per-row loss |diff| <=
# rtol |l| + atol / tau (logits are O(1 / tau)), gradients ||diff|| / ||ref|| <= grad_rel.
TOLERANCE = {  # dtype: (loss rtol, loss atol * tau, gradient relative error)
    torch.float64: (1e-10, 1e-10, 1e-9),
    torch.float32: (1e-5, 2e-6, 2e-5),
    torch.float16: (1e-5, 2e-6, 2e-3),
    torch.bfloat16: (1e-5, 2e-6, 3e-3),
}


def unit(rows, dim, gen):
    return F.normalize(torch.randn(rows, dim, generator=gen, dtype=torch.float64), dim=1)


def make_problem(layout, n, m, dim, dtype, seed, grads=(True, True, True), classes=3, views=2):
    """The project's one problem builder (`smooth_infonce.testing`), with dtype and seed positional."""
    return testing.make_problem(layout, n, m, dim, dtype=dtype, seed=seed, grads=grads, classes=classes,
                                views=views)


def leaves(prob):
    out = [prob.anchors] if prob.same else [prob.anchors, prob.candidates]
    if prob.keys is not None:
        out.append(prob.keys)
    return out


def run(fn, prob, to=None, **options):
    """Row losses and gradients of sum_i g_i l_i w.r.t. the leaves (None where no grad)."""
    src = leaves(prob)
    inputs = [t.detach().to(to or t.dtype).requires_grad_(t.requires_grad) for t in src]
    anchors = inputs[0]
    candidates = anchors if prob.same else inputs[1]
    keys = inputs[-1] if prob.keys is not None else None
    with torch.enable_grad():
        losses = fn(anchors, candidates, keys, prob.pairs, **options)
        needs = [t for t in inputs if t.requires_grad]
        grads = torch.autograd.grad((losses * prob.row_grad.to(losses.dtype)).sum(), needs) if needs else []
    it = iter(grads)
    return losses.detach(), [next(it) if t.requires_grad else None for t in inputs]


def assert_matches_reference(prob, temperature, smoothing, neighbors, dtype, deterministic=False):
    """Losses and gradients within TOLERANCE of the fp64 reference on the same input values.

    Gradients come back in the input dtype, so for fp16 / bf16 their rounding alone can reach the
    gate on tiny or cancelling cases; there the bound is also met if the kernel is no less accurate
    than the eager reference op run in that dtype (within 1.5x)."""
    options = dict(temperature=temperature, smoothing=smoothing, neighbors=neighbors)
    got, got_grads = run(triton_row_losses, prob, deterministic=deterministic, **options)
    ref, ref_grads = run(reference_row_losses, prob, to=torch.float64, **options)
    eager_grads = ref_grads
    if dtype in (torch.float16, torch.bfloat16):
        _, eager_grads = run(reference_row_losses, prob, **options)
    rtol, atol, grad_rel = TOLERANCE[dtype]
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), ref, rtol=rtol, atol=atol / temperature)
    # dl/dz = g (p - y) is a difference of O(g) terms scaled by 1 / tau: when p is within rounding
    # of y (a confident row at small tau) the gradient itself is rounding noise, so the relative
    # gate gets an absolute floor of a few ulps of those terms
    ulp = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    for g, r, e in zip(got_grads, ref_grads, eager_grads):
        assert (g is None) == (r is None)
        if g is not None:
            assert g.dtype == dtype and torch.isfinite(g).all()
            floor = 16 * ulp * float(prob.row_grad.abs().max()) / temperature * r.numel() ** 0.5
            err = (g.double() - r).norm() / r.norm().clamp_min(floor / grad_rel)
            eager_err = (e.double() - r).norm() / r.norm().clamp_min(floor / grad_rel)
            assert err <= max(grad_rel, 1.5 * eager_err), (
                f"gradient relative error {err:.3g} > {grad_rel} (eager op in {dtype}: {eager_err:.3g})")


# --- values and gradients against the reference, every layout --------------------------------

layouts = st.sampled_from(["inbatch", "supervised", "moco", "moco_ids", "twotower"])


FULL_PRECISION_DTYPES = st.sampled_from([torch.float64, torch.float32, torch.float16])


@st.composite
def problems(draw, dtypes=FULL_PRECISION_DTYPES):
    layout = draw(layouts)
    dtype = draw(dtypes)
    spec = dict(
        layout=layout, n=draw(st.integers(1, 72)), m=draw(st.integers(1, 80)),
        dim=draw(st.sampled_from([3, 17, 33, 64, 100])), dtype=dtype, seed=draw(st.integers(0, 2**20)),
        grads=(True, draw(st.booleans()), draw(st.booleans())),
        classes=draw(st.integers(2, 6)), views=draw(st.integers(2, 4)),
    )
    if layout in ("inbatch", "supervised"):
        spec["n"] = max(spec["n"], 2)
    prob = make_problem(**spec)
    temperature = draw(st.floats(0.01, 1.0))
    smoothing = draw(st.sampled_from([0.0, 0.1, 0.5, 0.9]) | st.floats(0.0, 0.9))
    max_k = int(prob.pairs.num_negatives.min())
    neighbors = None
    if max_k >= 1 and draw(st.booleans()):
        neighbors = draw(st.integers(1, min(max_k, 7)))
    return prob, temperature, smoothing, neighbors, dtype, draw(st.booleans())


@interpreter
@settings(max_examples=25, deadline=None)
@given(case=problems())
def test_matches_reference(case):
    prob, temperature, smoothing, neighbors, dtype, deterministic = case
    assert_matches_reference(prob, temperature, smoothing, neighbors, dtype, deterministic)


@interpreter
@settings(max_examples=6, deadline=None)
@given(case=problems(dtypes=st.just(torch.bfloat16)))
def test_matches_reference_bf16(case):
    """bf16 inputs (under the interpreter: the upcast path, dl/dz still rounded to bf16)."""
    prob, temperature, smoothing, neighbors, dtype, deterministic = case
    assert_matches_reference(prob, temperature, smoothing, neighbors, dtype, deterministic)


@interpreter
@pytest.mark.parametrize("neighbors", [None, 4])
def test_larger_in_batch_case(neighbors):
    """~200 rows: many tiles per row block and several splits; D = 100 takes the multi-block-D path."""
    prob = make_problem("inbatch", 200, 200, 100, torch.float32, seed=7, views=4)
    assert_matches_reference(prob, 0.05, 0.3, neighbors, torch.float32)


@interpreter
@pytest.mark.parametrize("layout", ["inbatch", "moco", "twotower"])
def test_alpha_zero_is_plain_infonce(layout):
    """alpha = 0 is cross-entropy on the positives, whatever the mode."""
    prob = make_problem(layout, 24, 40, 17, torch.float64, seed=3)
    plain, _ = run(reference_row_losses, prob, temperature=0.2, smoothing=0.0, neighbors=None)
    for neighbors in (None, 3):
        got, _ = run(triton_row_losses, prob, temperature=0.2, smoothing=0.0, neighbors=neighbors)
        torch.testing.assert_close(got, plain, rtol=1e-12, atol=1e-12)


@interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_small_upstream_gradient_half_precision(dtype):
    """A mean over a large batch makes g tiny; the fp16 dl/dz tiles must not underflow."""
    prob = make_problem("twotower", 60, 90, 33, dtype, seed=8)
    prob.row_grad = prob.row_grad * 2e-4
    assert_matches_reference(prob, 0.5, 0.1, None, dtype)


def shared_direction_moco(n, m, dim, seed, spread=0.5):
    """MoCo in fp16 where the queries, keys and queue entries share one direction (a collapsed or
    early embedding): at small tau every queue entry has p_ij ~ 0, so each one's dl/dz is about
    -g_i alpha / |Neg(i)|, and because the entries point the same way their rounding errors add up
    in dA instead of cancelling as they do for isotropic data."""
    gen = torch.Generator().manual_seed(seed)
    u = unit(1, dim, gen)
    anchors = F.normalize(u + spread * unit(n, dim, gen), dim=1).half()
    queue = F.normalize(u + spread * unit(m, dim, gen), dim=1).half()
    return anchors, anchors.clone(), queue, make_pairs(n, m, has_positive_key=True)


def fp16_anchor_grad_row_errors(n=32, m=4096, dim=16, temperature=0.01, smoothing=0.1):
    """Per-row relative error of the fp16 kernel's dA against the fp64 reference (same inputs),
    row gradients g_i from 0.25 to 1 (a weighted loss), uniform smoothing."""
    anchors, keys, queue, pairs = shared_direction_moco(n, m, dim, seed=0)
    row_grad = torch.linspace(0.25, 1.0, n, dtype=torch.float64)
    options = dict(temperature=temperature, smoothing=smoothing, neighbors=None)

    def anchor_grad(fn, dtype):
        x = anchors.to(dtype).requires_grad_()
        losses = fn(x, queue.to(dtype), keys.to(dtype), pairs, **options)
        return torch.autograd.grad((losses * row_grad.to(losses.dtype)).sum(), x)[0].double()

    got, ref = anchor_grad(triton_row_losses, torch.float16), anchor_grad(reference_row_losses, torch.float64)
    return (got - ref).norm(dim=1) / ref.norm(dim=1)


@interpreter
def test_fp16_gradient_unbiased_when_uniform_targets_are_tiny():
    """Uniform smoothing over a long queue: alpha / |Neg| = 0.1 / 4096 = 2.4e-5 is below fp16's
    smallest normal number (6.1e-5), and smaller still times g_i < 1. Rounding the dl/dz tile to
    fp16 there (before its tensor-core dot) left per-row errors of 0.14% (median) to 0.6% (max),
    one sign per row; the tile is now scaled into fp16's normal range first (GRAD_TILE_HEADROOM):
    0.03% / 0.07%, the level of fp16 rounding of the result itself."""
    errors = fp16_anchor_grad_row_errors()
    assert errors.median() <= 6e-4, f"median per-row error {errors.median():.3g}"
    assert errors.max() <= 2e-3, f"max per-row error {errors.max():.3g}"


@interpreter
@pytest.mark.parametrize("headroom,in_range", [(None, True), (2.0 ** 16, False)])
def test_fp16_gradient_tile_keeps_its_largest_values(monkeypatch, headroom, in_range):
    """The scaled dl/dz tile's largest possible entry, |g| (p - y) with p ~ 1 and y = 0 on the row
    with the largest g, is GRAD_TILE_HEADROOM = 2^14: within fp16 (65504). The case reaches that
    bound: with a headroom of 2^16 the same tile overflows to inf."""
    import smooth_infonce.ops.triton as host

    if headroom is not None:
        monkeypatch.setattr(host, "GRAD_TILE_HEADROOM", headroom)
    gen = torch.Generator().manual_seed(3)
    anchors = unit(8, 16, gen)
    queue = torch.cat([anchors[:4], unit(28, 16, gen)])  # rows 0-3: a queue entry equal to the anchor
    keys = F.normalize(anchors + 2.0 * unit(8, 16, gen), dim=1)  # ... and a key far from it: p ~ 1 there
    prob = Problem("moco", anchors.half().requires_grad_(), queue.half().requires_grad_(),
                   keys.half().requires_grad_(), make_pairs(8, 32, has_positive_key=True),
                   torch.ones(8, dtype=torch.float64))
    if in_range:
        assert_matches_reference(prob, 0.01, 0.0, None, torch.float16)
    else:
        _, grads = run(triton_row_losses, prob, temperature=0.01, smoothing=0.0, neighbors=None)
        assert not torch.isfinite(grads[0]).all()


@interpreter
def test_small_temperature_does_not_overflow():
    prob = make_problem("moco", 40, 70, 33, torch.float32, seed=5)
    assert_matches_reference(prob, 0.01, 0.2, 3, torch.float32)
    got, _ = run(triton_row_losses, prob, temperature=0.001, smoothing=0.2, neighbors=None)
    assert torch.isfinite(got).all()


# --- per-row target weights: too few negatives, own-sample exclusion ---------------------------

SMOOTHING_MODES = [(0.0, None), (0.3, None), (0.3, 2), (0.3, 10)]  # alpha 0, uniform, k <= / > |Neg(i)|


def moco_with_own_samples(queue_ids, n=6, dim=17, seed=0):
    """MoCo with sample ids 0..n-1 and a queue (leaf, with gradient) whose entry j holds sample
    queue_ids[j] (-1: unknown): entries of row i's own sample are not in V(i)."""
    gen = torch.Generator().manual_seed(seed)
    anchors = unit(n, dim, gen).requires_grad_()
    keys = F.normalize(anchors.detach() + 0.5 * torch.randn(n, dim, generator=gen, dtype=torch.float64),
                       dim=1).requires_grad_()
    queue = unit(len(queue_ids), dim, gen).requires_grad_()
    ids, queue_ids = torch.arange(n), torch.tensor(queue_ids)
    pairs = make_pairs(n, len(queue_ids), anchor_ids=ids, candidate_ids=queue_ids, has_positive_key=True,
                       ids_exclude=True)
    return anchors, keys, queue, ids, queue_ids, pairs


@interpreter
@pytest.mark.parametrize("smoothing,neighbors", SMOOTHING_MODES)
@pytest.mark.parametrize("queue_ids", [
    [0, 3, -1, 1, 1, 5, 2, -1, 3, 3, 4, 0],  # 0-2 own entries per row; k = 10 exceeds |Neg(i)|
    [0, 0, 0, 0, 0],  # row 0: every queue entry is its own, no negatives at all
], ids=["mixed", "row_without_negatives"])
def test_moco_own_samples_masked_equals_deleted(smoothing, neighbors, queue_ids):
    """Masking row i's own queue entries (ids_exclude) gives exactly the loss and gradients of
    deleting them from row i's queue, in every smoothing mode, and matches the reference."""
    anchors, keys, queue, ids, queue_ids, pairs = moco_with_own_samples(queue_ids)
    options = dict(temperature=0.2, smoothing=smoothing, neighbors=neighbors)
    g = 0.5 + torch.arange(len(ids), dtype=torch.float64) / len(ids)
    leaves = (anchors, keys, queue)

    masked = triton_row_losses(anchors, queue, keys, pairs, **options)
    masked_grads = torch.autograd.grad((masked * g).sum(), leaves)

    deleted = []
    for i in range(len(ids)):
        keep = queue_ids != ids[i]
        one = make_pairs(1, int(keep.sum()), has_positive_key=True)
        deleted.append(triton_row_losses(anchors[i:i + 1], queue[keep], keys[i:i + 1], one, **options))
    deleted = torch.cat(deleted)
    deleted_grads = torch.autograd.grad((deleted * g).sum(), leaves)
    torch.testing.assert_close(masked, deleted, rtol=1e-12, atol=1e-12)
    for got, expected in zip(masked_grads, deleted_grads):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)

    reference = reference_row_losses(anchors, queue, keys, pairs, **options)
    reference_grads = torch.autograd.grad((reference * g).sum(), leaves)
    torch.testing.assert_close(masked, reference, rtol=1e-12, atol=1e-12)
    for got, expected in zip(masked_grads, reference_grads):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    if (queue_ids == 0).all():  # row 0 without negatives: alpha_0 = 0, only the key is valid: loss 0
        torch.testing.assert_close(masked[0], masked.new_zeros(()), rtol=0, atol=1e-12)


@interpreter
@pytest.mark.parametrize("smoothing,neighbors", SMOOTHING_MODES)
def test_rows_with_few_or_no_negatives_match_reference(smoothing, neighbors):
    """Rows with fewer negatives than k (S(i) = all of them) and rows with none (alpha_i = 0: the
    mass stays on the positives), in-batch with label ids and two-tower."""
    gen = torch.Generator().manual_seed(1)

    def inbatch(labels):
        x = unit(len(labels), 17, gen).requires_grad_()
        pairs = make_pairs(len(labels), len(labels), anchor_ids=labels, candidate_ids=labels, self_offset=0)
        return Problem("supervised", x, x, None, pairs,
                       0.5 + torch.rand(len(labels), generator=gen, dtype=torch.float64))

    few = inbatch(torch.tensor([0, 0, 1, 0, 0, 0, 0, 1, 0, 0]))  # label 0 rows: 2 negatives
    none = inbatch(torch.zeros(6, dtype=torch.long))  # one label: no row has a negative
    # two-tower: row 0 has three positives and one negative, row 1 one positive and three negatives
    twotower = Problem("twotower", unit(2, 17, gen).requires_grad_(), unit(4, 17, gen).requires_grad_(), None,
                       make_pairs(2, 4, anchor_ids=torch.tensor([0, 1]), candidate_ids=torch.tensor([0, 0, 0, 1])),
                       torch.ones(2, dtype=torch.float64))
    for prob in (few, none, twotower):
        for deterministic in (False, True):
            assert_matches_reference(prob, 0.2, smoothing, neighbors, torch.float64, deterministic)
    if smoothing == 0:
        return
    # no negatives: exactly plain InfoNCE; too few: the same loss as k = |Neg(i)|
    plain, _ = run(triton_row_losses, none, temperature=0.2, smoothing=0.0, neighbors=None)
    got, _ = run(triton_row_losses, none, temperature=0.2, smoothing=smoothing, neighbors=neighbors)
    torch.testing.assert_close(got, plain, rtol=1e-12, atol=1e-12)
    if neighbors == 10:
        all_negatives, _ = run(triton_row_losses, few, temperature=0.2, smoothing=smoothing, neighbors=None)
        got, _ = run(triton_row_losses, few, temperature=0.2, smoothing=smoothing, neighbors=neighbors)
        torch.testing.assert_close(got, all_negatives, rtol=1e-12, atol=1e-12)


@interpreter
def test_allow_tf32_follows_torch(monkeypatch):
    """allow_tf32=None takes torch's fp32 matmul setting; True / False override it; the resolved
    precision reaches the kernels (fp32 inputs only)."""
    import smooth_infonce.ops.triton as host

    precision, flag = torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32
    seen = []
    real = host._forward_statistics

    def spy(p):  # the calls' own launches, not those of the self-check's probe of a kind met first here
        if not self_check.probing():
            seen.append(p.precision)
        return real(p)

    monkeypatch.setattr(host, "_forward_statistics", spy)
    prob = make_problem("twotower", 8, 8, 17, torch.float32, seed=0)
    try:
        for setting, expected in (("highest", False), ("high", True), ("medium", True)):
            torch.set_float32_matmul_precision(setting)
            assert resolve_allow_tf32(None) is expected
            assert torch.backends.cuda.matmul.allow_tf32 is expected
            assert resolve_allow_tf32(True) is True and resolve_allow_tf32(False) is False
            seen.clear()
            run(triton_row_losses, prob, temperature=0.2, smoothing=0.1, neighbors=None)
            run(triton_row_losses, prob, temperature=0.2, smoothing=0.1, neighbors=None, allow_tf32=False)
            run(triton_row_losses, prob, temperature=0.2, smoothing=0.1, neighbors=None, allow_tf32=True)
            assert seen == ["tf32" if expected else "ieee", "ieee", "tf32"]
        torch.set_float32_matmul_precision("high")
        seen.clear()
        run(triton_row_losses, make_problem("twotower", 8, 8, 17, torch.float16, seed=0), temperature=0.2,
            smoothing=0.1, neighbors=None)
        assert seen == ["ieee"]  # fp16 operands: the precision setting does not apply
    finally:
        torch.set_float32_matmul_precision(precision)
        torch.backends.cuda.matmul.allow_tf32 = flag


# --- determinism, gradcheck -------------------------------------------------------------------

class LaunchSpy:
    """Stands in for one @triton.jit kernel of `smooth_infonce.ops.kernels`: records the kernel's
    name and the keyword arguments named in `fields` (by default its ATOMIC_ANCHOR_GRAD flag) at
    each ``kernel[grid](...)`` launch, then launches it (the launches of the self-check's probe of a
    kind met first here are not recorded)."""

    def __init__(self, kernel, name, launches, fields=("ATOMIC_ANCHOR_GRAD",)):
        self.kernel, self.name, self.launches, self.fields = kernel, name, launches, fields

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def recorded(*args, **kwargs):
            if not self_check.probing():
                self.launches.append((self.name, *(kwargs.get(field) for field in self.fields)))
            return launch(*args, **kwargs)

        return recorded

    def __getattr__(self, name):  # anything else (warmup, fn, __name__): the kernel's
        return getattr(self.kernel, name)


def record_gradient_launches(monkeypatch) -> list:
    """(kernel, ATOMIC_ANCHOR_GRAD) of every launch of the two backward kernels, in order:
    "candidate_grad" (dC, plus dA with atomics when the flag is True) and "anchor_grad" (dA over
    anchor blocks, no atomics)."""
    from smooth_infonce.ops import kernels

    launches = []
    for name in ("candidate_grad", "anchor_grad"):
        kernel = f"{name}_kernel"
        monkeypatch.setattr(kernels, kernel, LaunchSpy(getattr(kernels, kernel), name, launches))
    return launches


def assert_backward_path(launches, deterministic):
    """Both dA and dC were needed: deterministic mode forms dA in the anchor-block kernel and
    launches the candidate-block kernel without atomics; the default mode fuses dA into the
    candidate-block kernel with atomics and never launches the anchor-block one."""
    if deterministic:
        assert launches == [("candidate_grad", False), ("anchor_grad", None)], launches
    else:
        assert launches == [("candidate_grad", True)], launches


@interpreter
@pytest.mark.parametrize("layout,neighbors", [("inbatch", 3), ("twotower", None)])
def test_deterministic_mode_launches_no_atomics_and_agrees_with_the_atomic_mode(layout, neighbors, monkeypatch):
    """What the interpreter can show of the two backward modes: which launch path each takes, and
    that they agree to rounding. The interpreter runs atomics in order, so it cannot tell them
    apart by bitwise reproducibility; `test_gpu_deterministic_bitwise` checks that on a device."""
    launches = record_gradient_launches(monkeypatch)
    prob = make_problem(layout, 48, 60, 33, torch.float32, seed=11)
    options = dict(temperature=0.1, smoothing=0.2, neighbors=neighbors, deterministic=True)
    first, first_grads = run(triton_row_losses, prob, **options)
    assert_backward_path(launches, deterministic=True)
    second, second_grads = run(triton_row_losses, prob, **options)
    assert torch.equal(first, second)
    for a, b in zip(first_grads, second_grads):
        assert (a is None and b is None) or torch.equal(a, b)
    # the default (atomic) mode agrees to rounding
    launches.clear()
    third, third_grads = run(triton_row_losses, prob, **{**options, "deterministic": False})
    assert_backward_path(launches, deterministic=False)
    torch.testing.assert_close(third, first)
    for a, b in zip(third_grads, first_grads):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout,neighbors,deterministic", [
    ("inbatch", 2, False), ("moco", None, True), ("twotower", 1, True), ("supervised", None, False)])
@interpreter
def test_gradcheck_fp64(layout, neighbors, deterministic):
    prob = make_problem(layout, 6, 7, 5, torch.float64, seed=2)
    inputs = [t.detach().clone().requires_grad_() for t in leaves(prob)]

    def losses(*xs):
        anchors = xs[0]
        candidates = anchors if prob.same else xs[1]
        keys = xs[-1] if prob.keys is not None else None
        return triton_row_losses(anchors, candidates, keys, prob.pairs, temperature=0.3, smoothing=0.4,
                                 neighbors=neighbors, deterministic=deterministic)

    assert torch.autograd.gradcheck(losses, inputs, eps=1e-6, atol=1e-7, rtol=1e-6)


# --- the neighbour search ---------------------------------------------------------------------

@interpreter
def test_neighbor_ties_resolved_like_reference():
    """Duplicate candidates (exactly equal similarities): the lower column wins, as the reference's
    stable sort. Coordinates are multiples of 1/4, so every dot product is exact in any order."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randint(-4, 5, (9, 8), generator=gen).double() / 4
    base[base.abs().sum(1) == 0, 0] = 1.0
    candidates = base[torch.randint(0, 9, (70,), generator=gen)]  # many duplicates
    anchors = torch.randint(-4, 5, (40, 8), generator=gen).double() / 4
    for dtype in (torch.float32, torch.float64):
        pairs = make_pairs(40, 70, anchor_ids=torch.arange(40), candidate_ids=torch.arange(70))
        a, c = anchors.to(dtype), candidates.to(dtype)
        _, cols = nearest_negatives(a, c, pairs, 6)
        sims = (anchors @ candidates.T).masked_fill(torch.eye(40, 70, dtype=torch.bool), float("-inf"))
        expected = torch.sort(sims, dim=1, descending=True, stable=True).indices[:, :6]
        assert torch.equal(cols, expected)
        prob = Problem("twotower", a.requires_grad_(), c.requires_grad_(), None, pairs,
                       torch.ones(40, dtype=torch.float64))
        assert_matches_reference(prob, 0.5, 0.3, 6, dtype)


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 70), m=st.integers(2, 140), dim=st.sampled_from([4, 33, 100]),
       k=st.integers(1, 12), self_excluded=st.booleans(), seed=st.integers(0, 2**20))
@interpreter
def test_top_k_matches_brute_force(n, m, dim, k, self_excluded, seed):
    gen = torch.Generator().manual_seed(seed)
    anchors, candidates = unit(n, dim, gen), unit(m, dim, gen)
    ids = torch.randint(0, 5, (max(n, m),), generator=gen)
    pairs = make_pairs(n, m, anchor_ids=ids[:n], candidate_ids=ids[:m], self_offset=0 if self_excluded else None)
    k = min(k, int(pairs.num_negatives.min()))
    if k < 1:
        return
    sims, cols = nearest_negatives(anchors, candidates, pairs, k)
    exact = anchors @ candidates.T
    negative = ids[:n, None] != ids[None, :m]
    if self_excluded:
        negative &= ~torch.eye(n, m, dtype=torch.bool)
    expected = torch.sort(exact.masked_fill(~negative, float("-inf")), dim=1, descending=True,
                          stable=True).indices[:, :k]
    assert torch.equal(cols, expected)
    torch.testing.assert_close(sims, exact.gather(1, expected), rtol=1e-12, atol=1e-12)


# --- torch.compile / custom-op registration ----------------------------------------------------

@interpreter
@pytest.mark.parametrize("layout", ["moco", "moco_ids"])
def test_custom_op_registration_opcheck(layout):
    prob = make_problem(layout, 20, 40, 17, torch.float32, seed=1)
    p = prob.pairs
    for neighbors in (None, 2):
        w_pos, w_smooth = row_target_weights(p, 0.3, neighbors, torch.float32)
        args = RowLossInputs(prob.anchors, prob.candidates, prob.keys, p.anchor_ids, p.candidate_ids, w_pos,
                             w_smooth, p.self_offset, p.ids_exclude, 0.2, neighbors or 0, False, False)
        torch.library.opcheck(torch.ops.smooth_infonce.triton_row_losses.default, tuple(args))


@interpreter
def test_custom_ops_opcheck_non_contiguous_inputs():
    """Transposed (non-contiguous) inputs: the fake kernels give the real ops' strides (contiguous
    gradients from the backward), the check torch.compile relies on."""
    prob = make_problem("moco", 20, 40, 16, torch.float32, seed=1)
    p = prob.pairs

    def transposed(t):
        return t.detach().T.contiguous().T.requires_grad_(t.requires_grad)

    anchors, candidates, keys = (transposed(t) for t in (prob.anchors, prob.candidates, prob.keys))
    assert not anchors.is_contiguous()
    w_pos, w_smooth = row_target_weights(p, 0.3, None, torch.float32)
    args = RowLossInputs(anchors, candidates, keys, p.anchor_ids, p.candidate_ids, w_pos, w_smooth,
                         p.self_offset, p.ids_exclude, 0.2, 0, False, False)
    torch.library.opcheck(torch.ops.smooth_infonce.triton_row_losses.default, tuple(args))
    _, lse, cols = torch.ops.smooth_infonce.triton_row_losses(*args)
    request = (torch.rand(20), lse, cols, True, True, True)
    torch.library.opcheck(torch.ops.smooth_infonce.triton_row_losses_backward.default,
                          request + tuple(args), test_utils=("test_schema", "test_faketensor"))
    grads = torch.ops.smooth_infonce.triton_row_losses_backward(*request, *args)
    assert all(g.is_contiguous() for g in grads)


@interpreter
@pytest.mark.parametrize("neighbors", [None, 2])
def test_row_without_valid_columns_is_zero_in_both_backends(neighbors):
    """A row whose every column is excluded (its own ids everywhere; reachable only unchecked,
    validate=False) has loss 0 and zero gradient, in the kernel and in the reference (they gave
    -inf and NaN), and leaves the other rows and the candidates' gradients finite and equal."""
    gen = torch.Generator().manual_seed(5)
    anchors, candidates = unit(5, 17, gen).requires_grad_(), unit(9, 17, gen).requires_grad_()
    anchor_ids = torch.tensor([0, 1, 2, 3, 4])
    candidate_ids = torch.zeros(9, dtype=torch.long)  # row 0 excludes every column, the others none
    pairs = make_pairs(5, 9, anchor_ids=anchor_ids, candidate_ids=candidate_ids, ids_exclude=True)
    options = dict(temperature=0.1, smoothing=0.3, neighbors=neighbors)
    rows = torch.tensor([1.0, 0.5, 2.0, 1.0, 1.5], dtype=torch.float64)
    results = []
    for fn in (triton_row_losses, reference_row_losses):
        losses = fn(anchors, candidates, None, pairs, **options)
        results.append((losses, *torch.autograd.grad((losses * rows).sum(), (anchors, candidates))))
    for got, expected in zip(*results):
        assert torch.isfinite(got).all() and torch.isfinite(expected).all()
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    losses, anchor_grad, _ = results[0]
    assert losses[0] == 0 and (anchor_grad[0] == 0).all()  # row 0: every candidate has id 0


@interpreter
@pytest.mark.parametrize("backend,contiguous", [("aot_eager", True), ("inductor", True), ("inductor", False)])
def test_torch_compile_fullgraph(backend, contiguous):
    """Inductor checks each custom-op output against the fake kernel's strides: with a transposed
    input the backward's gradients are contiguous in both (the fake copied the input's strides)."""
    prob = make_problem("inbatch", 40, 40, 17, torch.float32, seed=4)
    x = prob.anchors if contiguous else prob.anchors.detach().T.contiguous().T.requires_grad_()

    def loss(x):
        y = F.normalize(x * 2.0, dim=1)
        return triton_row_losses(y, y, None, prob.pairs, temperature=0.1, smoothing=0.1, neighbors=2).mean()

    torch._dynamo.reset()
    # a graph from inductor's on-disk cache would hide a change of the fake kernels (the backward
    # graph is compiled at the first backward call: inside the patch too)
    with torch._inductor.config.patch(force_disable_caches=not contiguous):
        got = torch.compile(loss, backend=backend, fullgraph=True)(x)
        (grad,) = torch.autograd.grad(got, x)
    expected = loss(x)
    (expected_grad,) = torch.autograd.grad(expected, x)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(grad, expected_grad)


def test_rejects_mismatched_positive_keys():
    prob = make_problem("moco", 4, 5, 3, torch.float32, seed=0)
    with pytest.raises(ValueError, match="positive_keys"):
        triton_row_losses(prob.anchors, prob.candidates, None, prob.pairs, temperature=0.1,
                          smoothing=0.0, neighbors=None)


def test_clear_errors_without_triton_or_device():
    """In a fresh process: no triton -> ImportError naming the fix; CPU tensors without the
    interpreter -> RuntimeError naming TRITON_INTERPRET."""
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "sys.modules['triton'] = None\n"
        "try:\n"
        "    import smooth_infonce.ops.triton\n"
        "except ImportError as err:\n"
        "    assert 'pip install triton' in str(err), err\n"
        "else:\n"
        "    raise SystemExit('no ImportError')\n"
        "del sys.modules['triton']\n"
        "for name in [m for m in sys.modules if m.startswith('smooth_infonce')]:\n"
        "    del sys.modules[name]\n"
        "from smooth_infonce.ops.triton import triton_row_losses\n"
        "from smooth_infonce.layout import make_pairs\n"
        "x = torch.randn(4, 8)\n"
        "try:\n"
        "    triton_row_losses(x, x, None, make_pairs(4, 4), temperature=0.1, smoothing=0.0, neighbors=None)\n"
        "except RuntimeError as err:\n"
        "    assert 'TRITON_INTERPRET' in str(err), err\n"
        "else:\n"
        "    raise SystemExit('no RuntimeError')\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "0", "CUDA_VISIBLE_DEVICES": ""}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


# --- GPU only ----------------------------------------------------------------------------------

@gpu
@needs_cuda
@pytest.mark.parametrize("layout", ["inbatch", "moco", "twotower"])
@pytest.mark.parametrize("neighbors", [None, 10])
def test_gpu_bf16_larger_shapes(layout, neighbors):
    prob = make_problem(layout, 1500, 2500, 128, torch.bfloat16, seed=0)
    prob = _to_cuda(prob)
    assert_matches_reference(prob, 0.07, 0.2, neighbors, torch.bfloat16)


@gpu
@needs_cuda
@pytest.mark.parametrize("dim", [64, 96, 384, 768])
@pytest.mark.parametrize("temperature", [0.01, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_gpu_ragged_odd_dims_vs_fp64(dim, temperature, dtype):
    """S6: ragged 1000 x 3001, D in 64 / 96 / 384 / 768, tau 0.01..1 (fp32 here is IEEE)."""
    prob = _to_cuda(make_problem("twotower", 1000, 3001, dim, dtype, seed=dim))
    assert_matches_reference(prob, temperature, 0.1, 5, dtype)
    assert_matches_reference(prob, temperature, 0.1, None, dtype, deterministic=True)


@gpu
@needs_cuda
def test_gpu_tf32_within_gate():
    prob = _to_cuda(make_problem("inbatch", 2048, 2048, 128, torch.float32, seed=1))
    options = dict(temperature=0.1, smoothing=0.1, neighbors=None)
    got, _ = run(triton_row_losses, prob, allow_tf32=True, **options)
    ref, _ = run(reference_row_losses, prob, to=torch.float64, **options)
    assert ((got.double() - ref).abs().max() / ref.abs().max()) <= 1e-3


@gpu
@needs_cuda
def test_gpu_deterministic_bitwise():
    prob = _to_cuda(make_problem("inbatch", 4096, 4096, 128, torch.bfloat16, seed=2))
    options = dict(temperature=0.1, smoothing=0.2, neighbors=10, deterministic=True)
    first, first_grads = run(triton_row_losses, prob, **options)
    second, second_grads = run(triton_row_losses, prob, **options)
    assert torch.equal(first, second)
    assert all(torch.equal(a, b) for a, b in zip(first_grads, second_grads))


def _peak_extra_bytes(n, dim, neighbors):
    prob = _to_cuda(make_problem("inbatch", n, n, dim, torch.bfloat16, seed=3))
    x = prob.anchors
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    losses = triton_row_losses(x, x, None, prob.pairs, temperature=0.1, smoothing=0.1, neighbors=neighbors)
    (grad,) = torch.autograd.grad(losses.mean(), x)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


@gpu
@needs_cuda
@pytest.mark.parametrize("neighbors", [None, 10])
def test_gpu_memory_is_linear(neighbors):
    n, dim = 16384, 128
    extra = _peak_extra_bytes(n, dim, neighbors)
    assert extra < n * n * 4 / 16, f"{extra / 2**20:.1f} MiB extra at N = M = {n}"
    half = _peak_extra_bytes(n // 2, dim, neighbors)
    assert extra < 2.6 * half, "peak memory grows faster than linearly"


@gpu
@needs_cuda
def test_gpu_compile_inductor():
    prob = _to_cuda(make_problem("inbatch", 1024, 1024, 128, torch.bfloat16, seed=4))
    x = prob.anchors

    def loss(x):
        y = F.normalize(x.float(), dim=1).to(x.dtype)
        return triton_row_losses(y, y, None, prob.pairs, temperature=0.1, smoothing=0.1, neighbors=5).mean()

    got = torch.compile(loss, fullgraph=True)(x)
    torch.testing.assert_close(got, loss(x))


def _to_cuda(prob):
    def move(t):
        return None if t is None else t.detach().cuda().requires_grad_(t.requires_grad)

    anchors = move(prob.anchors)
    candidates = anchors if prob.same else move(prob.candidates)
    p = prob.pairs
    pairs = make_pairs(
        anchors.shape[0], candidates.shape[0],
        anchor_ids=None if p.anchor_ids is None else p.anchor_ids.cuda(),
        candidate_ids=None if p.candidate_ids is None else p.candidate_ids.cuda(),
        self_offset=p.self_offset, has_positive_key=p.has_positive_key, ids_exclude=p.ids_exclude, device="cuda")
    return Problem(prob.layout, anchors, candidates, move(prob.keys), pairs, prob.row_grad.cuda())
