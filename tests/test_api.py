"""The public API: call forms, weights, reductions, dtypes, backends, purity."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from smooth_infonce import SmoothInfoNCELoss, SmoothingSchedule, reference_row_losses, smooth_infonce, triton_available

from oracles import moco_oracle, nt_xent_oracle


def randn(seed, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_module_and_functional_agree_in_batch():
    out0, out1 = randn(0, 8, 16), randn(1, 8, 16)
    module = SmoothInfoNCELoss(0.2, 0.1, 3)(out0, out1)
    functional = smooth_infonce(torch.cat([out0, out1]), ids=torch.arange(8).repeat(2),
                                temperature=0.2, smoothing=0.1, neighbors=3)
    torch.testing.assert_close(module, functional)


def test_sslight_multi_query_weighting():
    """loss = 0.4 * mean(global rows) + 0.1 * sum over 6 locals of mean(local rows)."""
    batch, width = 4, 8
    key, queue = randn(0, batch, width, dtype=torch.float64), randn(1, 30, width, dtype=torch.float64)
    queries = [randn(2 + v, batch, width, dtype=torch.float64) for v in range(7)]
    weights = (0.4,) + (0.6 / 6,) * 6
    got = SmoothInfoNCELoss(0.2, 0.1, 5)(queries[0], key, *queries[1:], queue=queue, weights=weights)
    per_view = [moco_oracle(q, key, queue, temperature=0.2, smoothing=0.1, neighbors=5).mean() for q in queries]
    expected = sum(w * loss for w, loss in zip(weights, per_view)) / sum(weights)
    torch.testing.assert_close(got, expected)


def test_per_row_weight_tensor_and_reductions():
    views = [randn(v, 5, 6, dtype=torch.float64) for v in range(2)]
    rows = nt_xent_oracle(views, temperature=0.3, smoothing=0.2, neighbors=None)
    w = torch.rand(10, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    loss = SmoothInfoNCELoss(0.3, 0.2, reduction="none")
    torch.testing.assert_close(loss(*views), rows)
    torch.testing.assert_close(loss(*views, weights=w), w * rows)
    loss.reduction = "sum"
    torch.testing.assert_close(loss(*views, weights=w), (w * rows).sum())
    loss.reduction = "mean"
    torch.testing.assert_close(loss(*views, weights=w), (w * rows).sum() / w.sum())


def test_labels_make_same_class_rows_positives():
    out0, out1 = randn(0, 6, 4, dtype=torch.float64), randn(1, 6, 4, dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 2, 1, 2])
    got = SmoothInfoNCELoss(0.5, 0.1)(out0, out1, labels=labels)
    expected = smooth_infonce(torch.cat([out0, out1]), ids=labels.repeat(2), temperature=0.5, smoothing=0.1)
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, SmoothInfoNCELoss(0.5, 0.1)(out0, out1))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtypes_compute_in_float32_or_wider(dtype):
    out0, out1 = randn(0, 8, 16).to(dtype), randn(1, 8, 16).to(dtype)
    loss = SmoothInfoNCELoss(0.1, 0.1, 2)(out0, out1)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    exact = SmoothInfoNCELoss(0.1, 0.1, 2)(out0.double(), out1.double())
    tolerance = {torch.float16: 5e-3, torch.bfloat16: 3e-2}.get(dtype, 1e-5)
    assert abs(loss.double() - exact) / exact < tolerance
    # The similarities themselves: raw dot products (normalize=False: no rounding of the inputs to
    # the dtype after normalising) of values that the dtype holds exactly. Their products are exact
    # in float32 and the sums of 64 of them round far below 1e-5, while a product rounded to 16
    # bits (fp16: 2^-11 relative, bf16: 2^-8) moves the row losses by more than 1e-4.
    a, b = (randn(seed, 8, 64).to(dtype) for seed in (2, 3))
    rows = SmoothInfoNCELoss(0.5, 0.1, 2, normalize=False, reduction="none")(a, b)
    exact_rows = SmoothInfoNCELoss(0.5, 0.1, 2, normalize=False, reduction="none")(a.double(), b.double())
    torch.testing.assert_close(rows.double(), exact_rows, rtol=1e-5, atol=1e-5)


def test_half_inputs_get_the_float64_gradients_rounded_to_their_dtype():
    """bf16 inputs: the gradients are the float64 loss's on the same values, to bf16 rounding (the
    dtype itself autograd would restore anyway; the values are what a lossy backward would change)."""
    half = [randn(seed, 8, 16).to(torch.bfloat16).requires_grad_() for seed in (0, 1)]
    exact = [x.detach().double().requires_grad_() for x in half]
    SmoothInfoNCELoss(0.1, 0.1, 2)(*half).backward()
    SmoothInfoNCELoss(0.1, 0.1, 2)(*exact).backward()
    for h, e in zip(half, exact):
        assert h.grad.dtype == torch.bfloat16
        torch.testing.assert_close(h.grad.double(), e.grad, rtol=2e-2, atol=2e-2 * e.grad.abs().max().item())


def test_low_temperature_is_finite():
    out0, out1 = randn(0, 16, 8), randn(1, 16, 8)
    loss = SmoothInfoNCELoss(0.01, 0.2, 4)(out0.requires_grad_(), out1)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(out0.grad).all()


@settings(max_examples=15)
@given(mode=st.sampled_from(["in_batch", "moco", "two_tower", "symmetric"]), k=st.sampled_from([None, 2]),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]), seed=st.integers(0, 1000))
def test_inputs_are_never_modified(mode, k, dtype, seed):
    """In every layout and dtype (float64 normalises without a cast, where an in-place division would
    reach the caller's tensor)."""
    x, y, q = (randn(seed + i, rows, 5, dtype=dtype) for i, rows in enumerate((6, 6, 9)))
    before = [t.clone() for t in (x, y, q)]
    kw = dict(temperature=0.2, smoothing=0.3, neighbors=k)
    if mode == "in_batch":
        loss = SmoothInfoNCELoss(**kw)(x.requires_grad_(), y)
    elif mode == "moco":
        loss = SmoothInfoNCELoss(**kw)(x.requires_grad_(), y, queue=q)
    else:
        loss = smooth_infonce(x.requires_grad_(), y, symmetric=None if mode == "two_tower" else "mean", **kw)
    loss.backward()
    for t, b in zip((x, y, q), before):
        assert torch.equal(t.detach(), b)


def test_queue_gets_no_gradient():
    queue = randn(0, 10, 4).requires_grad_()
    SmoothInfoNCELoss(0.2)(randn(1, 3, 4).requires_grad_(), randn(2, 3, 4), queue=queue).backward()
    assert queue.grad is None


def test_normalize_false_uses_raw_dot_products():
    out0, out1 = randn(0, 4, 3, dtype=torch.float64), randn(1, 4, 3, dtype=torch.float64)
    raw = SmoothInfoNCELoss(1.0, normalize=False)(out0, out1)
    scaled = SmoothInfoNCELoss(1.0, normalize=False)(2 * out0, 2 * out1)
    assert not torch.allclose(raw, scaled)
    torch.testing.assert_close(SmoothInfoNCELoss(1.0)(out0, out1), SmoothInfoNCELoss(1.0)(2 * out0, 2 * out1))


def test_backend_auto_and_explicit_reference_agree_on_cpu():
    """The values only: which backend auto picks is spied on in the next test (the interpreter's
    kernel gives the reference's values too, so values cannot tell)."""
    out0, out1 = randn(0, 6, 8), randn(1, 6, 8)
    torch.testing.assert_close(SmoothInfoNCELoss(0.2, 0.1, 2, backend="auto")(out0, out1),
                               SmoothInfoNCELoss(0.2, 0.1, 2, backend="reference")(out0, out1))


def record_backend_calls(monkeypatch) -> list:
    """Spies on both backends' row-loss functions where `functional.resolve_backend` looks them up;
    each call appends the backend's name. The Triton spy computes with the reference op, so it runs
    without the kernels (no interpreter, no GPU)."""
    from smooth_infonce import functional

    calls = []

    def reference_spy(*args, **kwargs):
        calls.append("reference")
        return reference_row_losses(*args, **kwargs)

    def triton_spy(*args, deterministic=False, allow_tf32=None, **kwargs):
        calls.append("triton")
        return reference_row_losses(*args, **kwargs)

    monkeypatch.setattr(functional, "reference_row_losses", reference_spy)
    if triton_available():
        monkeypatch.setattr("smooth_infonce.ops.triton.triton_row_losses", triton_spy)
    return calls


def test_backend_auto_calls_the_reference_op_for_cpu_tensors(monkeypatch):
    """Which backend 'auto' chose, seen through the public API: on CPU tensors the reference op
    computes the rows and the Triton backend is never called (the interpreter would give the same
    values, so only the call itself tells them apart)."""
    calls = record_backend_calls(monkeypatch)
    out0, out1, queue = randn(0, 6, 8), randn(1, 6, 8), randn(2, 10, 8)
    SmoothInfoNCELoss(0.2, 0.1, 2, backend="auto")(out0, out1)
    SmoothInfoNCELoss(0.2, 0.1, 2, backend="auto")(out0, out1, queue=queue)
    smooth_infonce(torch.cat([out0, out1]), ids=torch.arange(6).repeat(2), temperature=0.2, backend="auto")
    assert calls == ["reference"] * 3
    if triton_available():  # the spy does see an explicit choice of the kernel
        calls.clear()
        SmoothInfoNCELoss(0.2, 0.1, 2, backend="triton")(out0, out1)
        assert calls == ["triton"]


def test_schedule_drives_the_module():
    """set_epoch's alpha is the one the loss computes with (mutation module-ignores-a-changed-smoothing)."""
    loss = SmoothInfoNCELoss(0.2, schedule=SmoothingSchedule(0.2, "warmup", warmup_epochs=2))
    assert [loss.set_epoch(e) for e in range(4)] == [0.0, 0.0, 0.2, 0.2]
    x, y = randn(0, 8, 5), randn(1, 8, 5)
    for epoch, alpha in ((0, 0.0), (2, 0.2)):
        loss.set_epoch(epoch)
        assert torch.equal(loss(x, y), SmoothInfoNCELoss(0.2, smoothing=alpha)(x, y))
    assert not torch.equal(SmoothInfoNCELoss(0.2, smoothing=0.0)(x, y), SmoothInfoNCELoss(0.2, smoothing=0.2)(x, y))
    with pytest.raises(RuntimeError, match="schedule"):
        SmoothInfoNCELoss(0.2).set_epoch(0)


def test_schedules():
    cosine = SmoothingSchedule(0.1, "cosine", epochs=10)
    assert cosine(0) == 0.0 and abs(cosine(5) - 0.05) < 1e-12 and cosine(10) == pytest.approx(0.1)
    assert cosine(50) == pytest.approx(0.1)
    assert SmoothingSchedule(0.1)(0) == 0.1
    delayed = SmoothingSchedule(0.1, "cosine", warmup_epochs=3, epochs=4)
    assert delayed(2) == 0.0 and delayed(3) == 0.0 and delayed(7) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="epochs"):
        SmoothingSchedule(0.1, "cosine")
    with pytest.raises(ValueError, match="kind"):
        SmoothingSchedule(0.1, "linear")
    with pytest.raises(ValueError, match="smoothing"):
        SmoothingSchedule(1.0)


@pytest.mark.interpreter  # CPU tensors through the kernels (tests/conftest.py)
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("k", [None, 3])
def test_public_api_reaches_the_triton_backend(deterministic, k):
    """backend='triton' through the module (interpreter on CPU) matches the reference, both layouts."""
    out0, out1, queue = (randn(s, 12, 20).requires_grad_() for s in range(3))
    for extra in ({}, {"queue": queue}):
        grads = []
        for backend in ("reference", "triton"):
            loss_fn = SmoothInfoNCELoss(0.1, 0.2, k, backend=backend, deterministic=deterministic)
            loss = loss_fn(out0, out1, **extra)
            grads.append((loss, *torch.autograd.grad(loss, (out0, out1))))
        for ref, fused in zip(*grads):
            torch.testing.assert_close(fused, ref, rtol=2e-5, atol=2e-6)


# --- one options object, validation once, no host reads without validation ------------------------


def test_options_object_validates_once_and_is_shared():
    from smooth_infonce import LossOptions

    opts = LossOptions(temperature=0.3, smoothing=0.2, neighbors=2)
    views = [randn(v, 5, 6, dtype=torch.float64) for v in range(2)]
    by_keywords = SmoothInfoNCELoss(0.3, 0.2, 2)(*views)
    torch.testing.assert_close(SmoothInfoNCELoss(options=opts)(*views), by_keywords)
    torch.testing.assert_close(smooth_infonce(torch.cat(views), ids=torch.arange(5).repeat(2), options=opts),
                               by_keywords)
    with pytest.raises(TypeError, match="not both"):
        SmoothInfoNCELoss(0.5, options=opts)
    with pytest.raises(TypeError, match="unexpected keyword"):
        smooth_infonce(torch.cat(views), ids=torch.arange(5).repeat(2), temprature=0.1)
    with pytest.raises(Exception, match="frozen|cannot assign"):
        opts.temperature = 1.0
    loss = SmoothInfoNCELoss(options=opts)
    with pytest.raises(ValueError, match="temperature must be finite and > 0"):
        loss.temperature = 0.0  # an assignment goes through the same validation
    with pytest.raises(TypeError, match="neighbors must be None"):
        LossOptions(neighbors=True)
    with pytest.raises(ValueError, match="few_negatives must be one of"):
        LossOptions(few_negatives="ignore")
    with pytest.raises(ValueError, match="disagrees with the schedule"):
        LossOptions(smoothing=0.2, schedule=SmoothingSchedule(0.1))


def test_a_scheduled_loss_starts_at_the_schedules_epoch_zero_value():
    loss = SmoothInfoNCELoss(0.2, schedule=SmoothingSchedule(0.1, "warmup", warmup_epochs=3))
    assert loss.smoothing == 0.0
    assert loss.set_epoch(3) == 0.1


def test_validate_false_reads_nothing_back_from_the_device():
    """On the meta device every value read raises; validate=False must not need one."""
    x = torch.randn(16, 8, device="meta")
    ids = torch.arange(8, device="meta").repeat(2)
    out = smooth_infonce(x, ids=ids, validate=False, smoothing=0.1, neighbors=3, backend="reference")
    assert out.device.type == "meta" and out.shape == ()
    query, queue = torch.randn(4, 8, device="meta"), torch.randn(10, 8, device="meta")
    loss = SmoothInfoNCELoss(0.2, 0.1, 3, validate=False, backend="reference")
    out = loss(query, query, queue=queue, ids=torch.arange(4, device="meta"),
               queue_ids=torch.arange(10, device="meta"), weights=torch.ones(4, device="meta"))
    assert out.device.type == "meta"
    with pytest.raises(RuntimeError, match="meta"):  # the validating path does read values
        smooth_infonce(x, ids=ids, backend="reference")


# --- few negatives: raise by default, or the policy training loops use --------------------------


def test_a_batch_of_one_raises_by_default_and_is_plain_infonce_with_use_all():
    from lightly.loss import NTXentLoss

    out0 = randn(0, 1, 8).requires_grad_()
    out1 = randn(1, 1, 8).requires_grad_()
    with pytest.raises(ValueError, match="few_negatives='use_all'"):
        SmoothInfoNCELoss(0.2, 0.1, 5)(out0, out1)
    for neighbors in (None, 5):
        with pytest.warns(RuntimeWarning, match="only 0 negatives"):
            loss = SmoothInfoNCELoss(0.2, 0.1, neighbors, few_negatives="use_all")(out0, out1)
        torch.testing.assert_close(loss, NTXentLoss(temperature=0.2)(out0, out1))
        assert float(loss) == 0.0
        grads = torch.autograd.grad(loss, (out0, out1))
        assert all(float(g.abs().max()) == 0.0 for g in grads)


@pytest.mark.parametrize("batch", [2, 3])
def test_more_neighbours_than_negatives_smooths_onto_all_of_them(batch):
    views = [randn(v, batch, 6, dtype=torch.float64) for v in range(2)]
    negatives = 2 * (batch - 1)
    with pytest.raises(ValueError, match=f"neighbors={negatives + 1} is larger than the {negatives}"):
        SmoothInfoNCELoss(0.3, 0.2, negatives + 1)(*views)
    uniform = SmoothInfoNCELoss(0.3, 0.2, None, reduction="none")(*views)
    torch.testing.assert_close(
        SmoothInfoNCELoss(0.3, 0.2, negatives + 5, reduction="none", few_negatives="use_all")(*views), uniform)
    torch.testing.assert_close(uniform, nt_xent_oracle(views, temperature=0.3, smoothing=0.2, neighbors=None))


# --- MoCo with sample ids: a query's own image is not its negative ------------------------------


@pytest.mark.parametrize("neighbors", [None, 2])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_own_queue_entries_are_masked_like_deleted(smoothing, neighbors):
    batch, size = 4, 12
    query, key = randn(0, batch, 8, dtype=torch.float64), randn(1, batch, 8, dtype=torch.float64)
    queue = randn(2, size, 8, dtype=torch.float64)
    ids = torch.tensor([3, 7, 11, 5])
    queue_ids = torch.tensor([7, -1, 3, 3, 20, 21, 11, 22, 23, 24, 7, 25])  # -1: unknown, never masked
    query.requires_grad_()
    loss = SmoothInfoNCELoss(0.2, smoothing, neighbors, reduction="none")
    got = loss(query, key, queue=queue, ids=ids, queue_ids=queue_ids)
    for i in range(batch):  # the oracle deletes row i's own entries from the queue
        kept = queue[queue_ids != ids[i]]
        expected = moco_oracle(query[i:i + 1], key[i:i + 1], kept, temperature=0.2, smoothing=smoothing,
                               neighbors=neighbors)
        torch.testing.assert_close(got[i:i + 1], expected)
        g_got, = torch.autograd.grad(got[i], query, retain_graph=True)
        g_exp, = torch.autograd.grad(expected.sum(), query)
        torch.testing.assert_close(g_got, g_exp)
    with pytest.raises(ValueError, match="both ids .* and queue_ids"):
        loss(query, key, queue=queue, ids=ids)
    with pytest.raises(ValueError, match="queue_ids must have shape"):
        loss(query, key, queue=queue, ids=ids, queue_ids=queue_ids[:3])


# --- symmetric MoCo: both directions against one queue -------------------------------------------


@pytest.mark.parametrize("combine", ["mean", "sum"])
def test_symmetric_moco_reads_one_queue_in_both_directions(combine):
    from smooth_infonce import LossOptions, symmetric_moco_loss

    q0, k0, q1, k1 = (randn(s, 4, 8, dtype=torch.float64) for s in range(4))
    queue = randn(9, 10, 8, dtype=torch.float64)
    opts = LossOptions(temperature=0.2, smoothing=0.1, neighbors=3)
    got = symmetric_moco_loss(q0, k0, q1, k1, queue, opts, combine=combine)
    forward = moco_oracle(q0, k1, queue, temperature=0.2, smoothing=0.1, neighbors=3).mean()
    backward = moco_oracle(q1, k0, queue, temperature=0.2, smoothing=0.1, neighbors=3).mean()
    expected = forward + backward if combine == "sum" else (forward + backward) / 2
    torch.testing.assert_close(got, expected)


def test_view_weights_are_exact_in_float64():
    views = [randn(v, 4, 6, dtype=torch.float64) for v in range(3)]
    weights = (0.4, 0.3, 0.3)
    got = SmoothInfoNCELoss(0.3, 0.2, 2)(*views, weights=weights)
    rows = nt_xent_oracle(views, temperature=0.3, smoothing=0.2, neighbors=2)
    per_row = torch.tensor(weights, dtype=torch.float64).repeat_interleave(4)
    torch.testing.assert_close(got, (per_row * rows).sum() / per_row.sum(), rtol=1e-13, atol=0)
