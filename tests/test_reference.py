"""The reference op against independent oracles and the invariants of loss.md."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from lightly.loss import NTXentLoss

from oracles import label_oracle, moco_oracle, nt_xent_oracle, two_tower_oracle, unit
from smooth_infonce import SmoothInfoNCELoss, make_pairs, reference_row_losses, smooth_infonce
from smooth_infonce.layout import dense_masks
from smooth_infonce.ops.reference import smoothed_targets

temperatures = st.floats(0.01, 1.0)
alphas = st.sampled_from([0.0, 0.05, 0.1, 0.3, 0.9])
widths = st.sampled_from([1, 3, 8, 17, 33])


def randn(seed, *shape, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# --- lightly's NTXentLoss at smoothing 0 ------------------------------------------------------

@settings(max_examples=25)
@given(batch=st.integers(2, 12), width=widths, temperature=temperatures, seed=st.integers(0, 2**16),
       neighbors=st.sampled_from([None, 1]))
def test_in_batch_equals_lightly_ntxent(batch, width, temperature, seed, neighbors):
    out0, out1 = randn(seed, batch, width, dtype=torch.float32), randn(seed + 1, batch, width, dtype=torch.float32)
    expected = NTXentLoss(temperature=temperature)(out0, out1)
    got = SmoothInfoNCELoss(temperature, smoothing=0.0, neighbors=neighbors)(out0, out1)
    torch.testing.assert_close(got, expected, rtol=2e-5, atol=2e-5)


@settings(max_examples=15)
@given(batch=st.integers(1, 8), bank=st.integers(1, 40), width=widths, temperature=temperatures,
       seed=st.integers(0, 2**16))
def test_moco_equals_lightly_memory_bank(batch, bank, width, temperature, seed):
    torch.manual_seed(seed)
    lightly_loss = NTXentLoss(temperature=temperature, memory_bank_size=(bank, width))
    queue = lightly_loss.memory_bank.bank.clone()  # read before lightly's forward enqueues
    query, key = randn(seed, batch, width, dtype=torch.float32), randn(seed + 1, batch, width, dtype=torch.float32)
    expected = lightly_loss(query.requires_grad_(), key)
    got = SmoothInfoNCELoss(temperature)(query, key, queue=queue)
    torch.testing.assert_close(got, expected, rtol=2e-5, atol=2e-5)


# --- cross-entropy with loop-built probability targets -----------------------------------------

@settings(max_examples=30)
@given(batch=st.integers(2, 6), views=st.integers(2, 4), width=widths, temperature=temperatures,
       smoothing=alphas, k=st.sampled_from([None, 1, 2, 3]), seed=st.integers(0, 2**16))
def test_multiview_matches_loop_oracle(batch, views, width, temperature, smoothing, k, seed):
    k = None if k is None else min(k, (batch - 1) * views)
    zs = [randn(seed + v, batch, width) for v in range(views)]
    got = SmoothInfoNCELoss(temperature, smoothing, k, reduction="none")(*zs)
    expected = nt_xent_oracle(zs, temperature=temperature, smoothing=smoothing, neighbors=k)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


@settings(max_examples=25)
@given(batch=st.integers(1, 6), queue=st.integers(1, 20), width=widths, temperature=temperatures,
       smoothing=alphas, k=st.sampled_from([None, 1, 4]), seed=st.integers(0, 2**16))
def test_moco_matches_loop_oracle(batch, queue, width, temperature, smoothing, k, seed):
    if k is not None and k > queue:
        k = queue
    q, key, bank = randn(seed, batch, width), randn(seed + 1, batch, width), randn(seed + 2, queue, width)
    got = smooth_infonce(q, bank, positive_keys=key, temperature=temperature, smoothing=smoothing,
                         neighbors=k, reduction="none")
    expected = moco_oracle(q, key, bank, temperature=temperature, smoothing=smoothing, neighbors=k)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


@settings(max_examples=25)
@given(n=st.integers(2, 8), extra=st.integers(0, 5), width=widths, temperature=temperatures,
       smoothing=alphas, k=st.sampled_from([None, 1, 2]), seed=st.integers(0, 2**16))
def test_two_tower_matches_loop_oracle(n, extra, width, temperature, smoothing, k, seed):
    k = None if k is None else min(k, n + extra - 1)
    x, y = randn(seed, n, width), randn(seed + 1, n + extra, width)
    got = smooth_infonce(x, y, temperature=temperature, smoothing=smoothing, neighbors=k, reduction="none")
    expected = two_tower_oracle(x, y, temperature=temperature, smoothing=smoothing, neighbors=k)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


@settings(max_examples=20)
@given(labels=st.lists(st.integers(0, 3), min_size=3, max_size=12), width=widths, temperature=temperatures,
       smoothing=alphas, seed=st.integers(0, 2**16))
def test_label_ids_match_loop_oracle(labels, width, temperature, smoothing, seed):
    # every label needs a second row (a positive) and some other label (a negative)
    counts = {c: labels.count(c) for c in labels}
    if min(counts.values()) < 2 or len(counts) < 2:
        labels = labels + labels + [max(labels) + 1] * 2
    z = randn(seed, len(labels), width)
    got = smooth_infonce(z, ids=torch.tensor(labels), temperature=temperature, smoothing=smoothing,
                         neighbors=1, reduction="none")
    expected = label_oracle(z, labels, temperature=temperature, smoothing=smoothing, neighbors=1)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


def test_symmetric_mean_and_sum():
    x, y = randn(0, 6, 5), randn(1, 6, 5)
    one = two_tower_oracle(x, y, temperature=0.3, smoothing=0.2, neighbors=2).mean()
    other = two_tower_oracle(y, x, temperature=0.3, smoothing=0.2, neighbors=2).mean()
    kw = dict(temperature=0.3, smoothing=0.2, neighbors=2)
    torch.testing.assert_close(smooth_infonce(x, y, symmetric="mean", **kw), (one + other) / 2)
    torch.testing.assert_close(smooth_infonce(x, y, symmetric="sum", **kw), one + other)


# --- neighbour selection, ties ----------------------------------------------------------------

def test_neighbour_ties_go_to_the_lower_index():
    sims = torch.tensor([[0.9, 0.5, 0.5, 0.5, 0.1]])
    positive = torch.tensor([[True, False, False, False, False]])
    targets = smoothed_targets(sims, positive, ~positive, smoothing=0.4, neighbors=2)
    torch.testing.assert_close(targets, torch.tensor([[0.6, 0.2, 0.2, 0.0, 0.0]]))


@settings(max_examples=20)
@given(n=st.integers(2, 10), k=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_neighbour_targets_are_brute_force_topk(n, k, seed):
    z = randn(seed, n, 4)
    z = torch.cat([z, z])  # duplicate rows: plenty of exact ties
    k = min(k, 2 * n - 2)
    pairs = make_pairs(2 * n, 2 * n, anchor_ids=torch.arange(n).repeat(2), candidate_ids=torch.arange(n).repeat(2),
                       self_offset=0)
    valid, positive = dense_masks(pairs, 2 * n, 2 * n, z.device)
    sims = unit(z) @ unit(z).T
    targets = smoothed_targets(sims, positive, valid & ~positive, smoothing=0.5, neighbors=k)
    for i in range(2 * n):
        negatives = [j for j in range(2 * n) if j != i and j % n != i % n]
        chosen = sorted(negatives, key=lambda j: (-float(sims[i, j]), j))[:k]
        assert [j for j in range(2 * n) if targets[i, j] > 0 and j % n != i % n] == sorted(chosen)


# --- gradients -------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [None, 2])
def test_gradcheck_in_batch(k):
    views = [randn(s, 4, 5).requires_grad_() for s in range(3)]
    fn = lambda *v: SmoothInfoNCELoss(0.2, 0.3, k)(*v)  # noqa: E731
    assert torch.autograd.gradcheck(fn, views)


@pytest.mark.parametrize("k", [None, 3])
def test_gradcheck_moco_and_weights(k):
    q, key, bank = (randn(s, 3, 6).requires_grad_() for s in range(3))
    w = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    fn = lambda q, key, bank: smooth_infonce(q, bank, positive_keys=key, temperature=0.1,  # noqa: E731
                                             smoothing=0.2, neighbors=k, weights=w)
    assert torch.autograd.gradcheck(fn, (q, key, bank))


def test_gradient_is_p_minus_y():
    """dl_i/dz_ij = p_ij - y_ij, checked on the logits themselves (no normalisation)."""
    z = randn(7, 5, 3)
    pairs = make_pairs(5, 5, anchor_ids=torch.tensor([0, 0, 1, 1, 2]), candidate_ids=torch.tensor([0, 0, 1, 1, 2]),
                       self_offset=None)
    a = z.clone().requires_grad_()
    rows = reference_row_losses(a, z, None, pairs, temperature=1.0, smoothing=0.3, neighbors=None)
    rows.sum().backward()
    logits = z @ z.T
    valid, positive = dense_masks(pairs, 5, 5, z.device)
    targets = smoothed_targets(logits, positive, valid & ~positive, 0.3, None)
    expected = (torch.softmax(logits, 1) - targets) @ z
    torch.testing.assert_close(a.grad, expected)


# --- invariants of loss.md --------------------------------------------------------------------

@settings(max_examples=20)
@given(batch=st.integers(2, 6), views=st.integers(2, 3), smoothing=alphas, k=st.sampled_from([None, 1, 2]),
       seed=st.integers(0, 2**16))
def test_targets_sum_to_one(batch, views, smoothing, k, seed):
    n = batch * views
    ids = torch.arange(batch).repeat(views)
    pairs = make_pairs(n, n, anchor_ids=ids, candidate_ids=ids, self_offset=0)
    valid, positive = dense_masks(pairs, n, n, torch.device("cpu"))
    sims = randn(seed, n, n)
    targets = smoothed_targets(sims, positive, valid & ~positive, smoothing, k)
    torch.testing.assert_close(targets.sum(1), torch.ones(n, dtype=torch.float64))
    assert not targets[~valid].any()


@pytest.mark.parametrize("smoothing,k", [(0.0, None), (0.3, None), (0.3, 2), (0.9, 1)])
def test_equal_cosines_give_log_of_valid_count(smoothing, k):
    z = torch.ones(8, 4, dtype=torch.float64)  # every cosine is 1
    rows = SmoothInfoNCELoss(0.07, smoothing, k, reduction="none")(z[:4], z[4:])
    torch.testing.assert_close(rows, torch.full((8,), math.log(7), dtype=torch.float64))
    moco = SmoothInfoNCELoss(0.07, smoothing, k, reduction="none")(z[:4], z[4:], queue=torch.ones(5, 4))
    torch.testing.assert_close(moco, torch.full((4,), math.log(6), dtype=torch.float64))


@settings(max_examples=10)
@given(seed=st.integers(0, 2**16), smoothing=alphas, k=st.sampled_from([None, 2]))
def test_rotation_invariance(seed, smoothing, k):
    out0, out1 = randn(seed, 5, 6), randn(seed + 1, 5, 6)
    rotation, _ = torch.linalg.qr(randn(seed + 2, 6, 6))
    loss = SmoothInfoNCELoss(0.1, smoothing, k)
    torch.testing.assert_close(loss(out0 @ rotation, out1 @ rotation), loss(out0, out1))


def test_row_loss_minimum_is_at_the_targets():
    """Over p, sum_j -y_j log p_j is minimised at p = y (Gibbs), not at the one-hot."""
    targets = torch.tensor([0.7, 0.2, 0.1, 0.0], dtype=torch.float64)
    def row_loss(p):
        return -(targets * torch.log(p.clamp_min(1e-300))).sum()
    one_hot = torch.tensor([1.0, 1e-12, 1e-12, 1e-12], dtype=torch.float64)
    assert row_loss(targets) < row_loss(one_hot / one_hot.sum())
    for seed in range(20):
        p = torch.softmax(randn(seed, 4), 0)
        assert row_loss(targets) <= row_loss(p)


@settings(max_examples=15)
@given(seed=st.integers(0, 2**16), k=st.sampled_from([None, 1, 3]))
def test_zero_smoothing_is_infonce_in_every_mode(seed, k):
    out0, out1 = randn(seed, 6, 8), randn(seed + 1, 6, 8)
    plain = SmoothInfoNCELoss(0.2)(out0, out1)
    torch.testing.assert_close(SmoothInfoNCELoss(0.2, 0.0, k)(out0, out1), plain, rtol=0, atol=0)


def test_smoothing_raises_loss_of_a_confident_model():
    """A model that puts all mass on the positive pays for it once alpha > 0."""
    base = randn(0, 6, 8)
    out0, out1 = base, base + 1e-3 * randn(1, 6, 8)
    plain = SmoothInfoNCELoss(0.05)(out0, out1)
    smooth = SmoothInfoNCELoss(0.05, 0.2)(out0, out1)
    assert smooth > plain
