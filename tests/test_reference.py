"""The reference op against independent oracles and the invariants of the loss (docs/loss.md)."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from lightly.loss import NTXentLoss

from smooth_infonce import SmoothInfoNCELoss, make_pairs, reference_row_losses, smooth_infonce
from smooth_infonce.layout import NO_ID, dense_masks
from smooth_infonce.ops.reference import nearest_negatives, positive_mask, smoothed_targets

from oracles import label_oracle, loop_oracle, moco_oracle, nt_xent_oracle, two_tower_oracle, unit

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


# --- invariants of the loss -------------------------------------------------------------------

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
    """The reference op's row loss LSE(z) - sum_j y_j z_j is the cross-entropy of softmax(z) against
    the targets y: minimal (Gibbs) where softmax(z) = y, with value H(y) and zero gradient there,
    not at the one-hot. One anchor against the unit vectors e_j (tau = 1): z_j is the anchor's j-th
    entry, so the anchor sets the logits. Two positives, three negatives, uniform alpha = 0.3."""
    candidates = torch.eye(5, dtype=torch.float64)
    pairs = make_pairs(1, 5, anchor_ids=torch.tensor([0]), candidate_ids=torch.tensor([0, 0, 1, 2, 3]))
    targets = torch.tensor([0.35, 0.35, 0.1, 0.1, 0.1], dtype=torch.float64)  # (1 - alpha) / 2, alpha / 3
    entropy = -(targets * targets.log()).sum()

    def row_loss(logits):
        return reference_row_losses(logits[None], candidates, None, pairs, temperature=1.0, smoothing=0.3,
                                    neighbors=None)[0]

    at_targets = (targets.log() + 2.0).requires_grad_()  # softmax(z) = y (a shift changes nothing)
    minimum = row_loss(at_targets)
    torch.testing.assert_close(minimum, entropy, rtol=1e-12, atol=1e-12)
    (gradient,) = torch.autograd.grad(minimum, at_targets)
    torch.testing.assert_close(gradient, torch.zeros(5, dtype=torch.float64), rtol=0, atol=1e-12)
    one_hot = torch.tensor([30.0, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64)  # softmax ~ the positive's one-hot
    assert row_loss(one_hot) > entropy + 1.0
    for seed in range(20):
        assert row_loss(randn(seed, 5)) > entropy


@settings(max_examples=15)
@given(seed=st.integers(0, 2**16), k=st.sampled_from([None, 1, 3]))
def test_zero_smoothing_is_infonce_in_every_mode(seed, k):
    """alpha = 0 is plain InfoNCE whatever k is: each layout against torch's cross-entropy on
    logits built here (cosines / tau, -inf off the valid columns), the target the positive's column."""
    tau = 0.2
    out0, out1 = randn(seed, 6, 8), randn(seed + 1, 6, 8)
    plain = SmoothInfoNCELoss(tau)(out0, out1)
    torch.testing.assert_close(SmoothInfoNCELoss(tau, 0.0, k)(out0, out1), plain, rtol=0, atol=0)

    def assert_cross_entropy(got, logits, target):
        torch.testing.assert_close(got, F.cross_entropy(logits, target, reduction="none"), rtol=1e-9, atol=1e-9)

    kw = dict(temperature=tau, smoothing=0.0, neighbors=k, reduction="none")
    # in-batch (SimCLR): row r's positive is the other view of its image, its own column is left out
    z = unit(torch.cat([out0, out1]))
    logits = (z @ z.T / tau).fill_diagonal_(float("-inf"))
    assert_cross_entropy(SmoothInfoNCELoss(tau, 0.0, k, reduction="none")(out0, out1), logits,
                         (torch.arange(12) + 6) % 12)
    # in-batch with labels: y = 1 / |P(i)| on the other rows of the class, l_i = LSE_i - mean_P z_ij
    labels = torch.tensor([0, 1, 0, 2, 1, 2])
    same = (labels.repeat(2)[:, None] == labels.repeat(2)[None, :]).fill_diagonal_(False)
    supervised = torch.logsumexp(logits, dim=1) - (logits.nan_to_num(neginf=0.0) * same).sum(1) / same.sum(1)
    torch.testing.assert_close(SmoothInfoNCELoss(tau, 0.0, k, reduction="none")(out0, out1, labels=labels),
                               supervised, rtol=1e-9, atol=1e-9)
    # MoCo: column 0 the key, then the queue; with ids, queue entries of the row's own image are left out
    queue, queue_ids = randn(seed + 2, 10, 8), torch.tensor([0, 7, 2, 9, 9, 5, 8, 0, 7, 9])
    q, key, bank = unit(out0), unit(out1), unit(queue)
    moco_logits = torch.cat([(q * key).sum(1, keepdim=True), q @ bank.T], dim=1) / tau
    zero = torch.zeros(6, dtype=torch.long)
    assert_cross_entropy(smooth_infonce(out0, queue, positive_keys=out1, **kw), moco_logits, zero)
    ids = torch.arange(6)
    own = torch.cat([torch.zeros(6, 1, dtype=torch.bool), ids[:, None] == queue_ids[None, :]], dim=1)
    assert own.any()  # ids 0 and 2 are in the queue
    assert_cross_entropy(smooth_infonce(out0, queue, positive_keys=out1, ids=ids, candidate_ids=queue_ids, **kw),
                         moco_logits.masked_fill(own, float("-inf")), zero)
    # two-tower (CLIP): row i's positive is column i; symmetric: the mean of both directions
    x, y = unit(out0), unit(queue[:6])
    assert_cross_entropy(smooth_infonce(out0, queue[:6], **kw), x @ y.T / tau, ids)
    both = (F.cross_entropy(x @ y.T / tau, ids) + F.cross_entropy(y @ x.T / tau, ids)) / 2
    torch.testing.assert_close(smooth_infonce(out0, queue[:6], symmetric="mean", temperature=tau, neighbors=k),
                               both, rtol=1e-9, atol=1e-9)


def test_smoothing_raises_loss_of_a_confident_model():
    """A model that puts all mass on the positive pays for it once alpha > 0."""
    base = randn(0, 6, 8)
    out0, out1 = base, base + 1e-3 * randn(1, 6, 8)
    plain = SmoothInfoNCELoss(0.05)(out0, out1)
    smooth = SmoothInfoNCELoss(0.05, 0.2)(out0, out1)
    assert smooth > plain


# --- per-row target weights: rows with fewer than k negatives, rows without negatives ----------

def per_row_oracle(anchors, candidates, is_valid, is_positive, *, smoothing, positive_keys=None, **kw):
    """The loop oracle row by row, with the per-row rule of `row_target_weights`: a row without
    negatives keeps all the mass on its positives (alpha_i = 0); S(i) is the loop oracle's
    ``ranked[:k]``, i.e. all negatives when there are fewer than k."""
    rows = []
    for i in range(anchors.shape[0]):
        has_negative = any(is_valid(i, j) and not is_positive(i, j) for j in range(candidates.shape[0]))
        keys = None if positive_keys is None else positive_keys[i:i + 1]
        rows.append(loop_oracle(anchors[i:i + 1], candidates, lambda _, j, i=i: is_valid(i, j),
                                lambda _, j, i=i: is_positive(i, j), positive_keys=keys,
                                smoothing=smoothing if has_negative else 0.0, normalize=False, **kw))
    return torch.cat(rows)


def values_and_grads(fn, inputs):
    """fn(*leaves) per row, and the gradient of a fixed random combination of the rows."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    rows = fn(*leaves)
    mix = randn(99, rows.shape[0])
    return rows.detach(), torch.autograd.grad((rows * mix).sum(), leaves, allow_unused=True, materialize_grads=True)


def assert_same_values_and_grads(got, expected, tol=1e-12):
    torch.testing.assert_close(got[0], expected[0], rtol=tol, atol=tol)
    for g, e in zip(got[1], expected[1]):
        torch.testing.assert_close(g, e, rtol=tol, atol=tol)


@settings(max_examples=40)
@given(labels=st.lists(st.integers(0, 2), min_size=2, max_size=9), width=widths, temperature=temperatures,
       smoothing=alphas, k=st.sampled_from([None, 1, 2, 5, 20]), seed=st.integers(0, 2**16))
def test_in_batch_few_or_no_negatives_match_loop_oracle(labels, width, temperature, smoothing, k, seed):
    """SupCon-style ids with tiny classes: k often exceeds a row's negatives, and with one label
    (or a row whose label fills the batch) a row has none. Values and gradients, fp64."""
    labels = labels + labels  # every row has a positive
    n = len(labels)
    ids = torch.tensor(labels)
    z = randn(seed, n, width)
    pairs = make_pairs(n, n, anchor_ids=ids, candidate_ids=ids, self_offset=0)
    got = values_and_grads(lambda x: reference_row_losses(x, x, None, pairs, temperature=temperature,
                                                          smoothing=smoothing, neighbors=k), [z])
    expected = values_and_grads(
        lambda x: per_row_oracle(x, x, lambda i, j: i != j, lambda i, j: labels[i] == labels[j],
                                 temperature=temperature, smoothing=smoothing, neighbors=k), [z])
    assert_same_values_and_grads(got, expected)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_row_without_negatives_is_plain_infonce(dtype):
    """One instance, two views: no negatives, one valid column: the loss and its gradient are
    exactly 0 whatever alpha and k (InfoNCE of a single column, as cross-entropy gives it)."""
    z = randn(0, 2, 4, dtype=dtype).requires_grad_()
    pairs = make_pairs(2, 2, anchor_ids=torch.tensor([0, 0]), candidate_ids=torch.tensor([0, 0]), self_offset=0)
    for smoothing, k in [(0.0, None), (0.3, None), (0.3, 2)]:
        rows = reference_row_losses(z, z, None, pairs, temperature=0.1, smoothing=smoothing, neighbors=k)
        assert rows.tolist() == [0.0, 0.0]
        (grad,) = torch.autograd.grad(rows.sum(), z)
        assert not grad.any()


def test_dense_targets_follow_the_per_row_rule():
    """`smoothed_targets`: rows sum to 1 also with k > |Neg(i)| (all negatives share alpha) and
    without negatives (all mass on the positives)."""
    positive = torch.tensor([[True, False, False, False], [True, True, True, False]])
    negative = torch.tensor([[False, True, True, False], [False, False, False, False]])
    sims = randn(0, 2, 4)
    targets = smoothed_targets(sims, positive, negative, smoothing=0.4, neighbors=5)
    expected = torch.tensor([[0.6, 0.2, 0.2, 0.0], [1 / 3, 1 / 3, 1 / 3, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(targets, expected)


# --- ids_exclude: a queue entry with the row's own id is left out of V(i) ----------------------

@settings(max_examples=40)
@given(batch=st.integers(1, 5), queue=st.integers(1, 12), width=widths, temperature=temperatures,
       smoothing=st.sampled_from([0.0, 0.1, 0.4]), k=st.sampled_from([None, 1, 3, 20]),
       queue_ids=st.data(), seed=st.integers(0, 2**16))
def test_masking_a_queue_entry_by_id_equals_deleting_it(batch, queue, width, temperature, smoothing, k,
                                                         queue_ids, seed):
    """MoCo with sample ids: row i's loss, and its gradient to the queries, keys and queue, equal
    those of row i alone against the queue without the entries of id i (which get no gradient),
    for alpha 0, uniform and neighbours, including rows left with < k or no negatives. fp64."""
    cand = queue_ids.draw(st.lists(st.sampled_from(list(range(batch)) + [NO_ID, batch + 7]),
                                   min_size=queue, max_size=queue))
    inputs = randn(seed, batch, width), randn(seed + 1, batch, width), randn(seed + 2, queue, width)
    options = dict(temperature=temperature, smoothing=smoothing, neighbors=k)
    pairs = make_pairs(batch, queue, anchor_ids=torch.arange(batch), candidate_ids=torch.tensor(cand),
                       has_positive_key=True, ids_exclude=True)
    for i in range(batch):
        q, key, bank = (x.detach().clone().requires_grad_() for x in inputs)
        masked = reference_row_losses(q, bank, key, pairs, **options)[i]
        masked_grads = torch.autograd.grad(masked, (q, key, bank))

        keep = torch.tensor([j for j in range(queue) if cand[j] != i], dtype=torch.long)
        q, key, bank = (x.detach().clone().requires_grad_() for x in inputs)
        if len(keep):
            alone = make_pairs(1, len(keep), has_positive_key=True)
            deleted = reference_row_losses(q[i:i + 1], bank[keep], key[i:i + 1], alone, **options)[0]
            deleted_grads = torch.autograd.grad(deleted, (q, key, bank))
        else:  # nothing left but the key: one valid column, loss 0, no gradient
            deleted, deleted_grads = torch.zeros((), dtype=torch.float64), (q * 0, key * 0, bank * 0)

        torch.testing.assert_close(masked, deleted, rtol=1e-12, atol=1e-12)
        for got, expected in zip(masked_grads, deleted_grads):
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
        assert not masked_grads[2][[j for j in range(queue) if cand[j] == i]].any()


@settings(max_examples=25)
@given(batch=st.integers(1, 4), queue=st.integers(1, 10), width=widths, temperature=temperatures,
       smoothing=alphas, k=st.sampled_from([None, 1, 4, 20]), queue_ids=st.data(), seed=st.integers(0, 2**16))
def test_moco_with_ids_matches_loop_oracle(batch, queue, width, temperature, smoothing, k, queue_ids, seed):
    """MoCo with sample ids against the loop oracle: same-id queue entries are not valid columns."""
    cand = queue_ids.draw(st.lists(st.sampled_from(list(range(batch)) + [NO_ID]), min_size=queue, max_size=queue))
    q, key, bank = randn(seed, batch, width), randn(seed + 1, batch, width), randn(seed + 2, queue, width)
    pairs = make_pairs(batch, queue, anchor_ids=torch.arange(batch), candidate_ids=torch.tensor(cand),
                       has_positive_key=True, ids_exclude=True)
    options = dict(temperature=temperature, smoothing=smoothing, neighbors=k)
    got = values_and_grads(lambda q, key, bank: reference_row_losses(q, bank, key, pairs, **options), [q, key, bank])
    expected = values_and_grads(
        lambda q, key, bank: per_row_oracle(q, bank, lambda i, j: cand[j] != i, lambda i, j: False,
                                            positive_keys=key, **options), [q, key, bank])
    assert_same_values_and_grads(got, expected)


# --- the fast path against the dense written-out form ------------------------------------------

@settings(max_examples=40)
@given(layout=st.sampled_from(["in_batch", "two_tower", "moco", "moco_ids"]), n=st.integers(1, 7),
       m=st.integers(1, 9), width=widths, temperature=temperatures, smoothing=alphas,
       k=st.sampled_from([None, 1, 2, 4, 12]), duplicates=st.booleans(), seed=st.integers(0, 2**16))
def test_matches_dense_targets(layout, n, m, width, temperature, smoothing, k, duplicates, seed):
    """l_i = LSE over V(i) - sum_j y_ij z_ij with y from `smoothed_targets` and the masks from
    `dense_masks`: values and gradients, every layout, duplicated candidates (exact ties) included."""
    if layout == "in_batch":
        n = m = 2 * n
    anchors, candidates, keys = randn(seed, n, width), randn(seed + 1, m, width), randn(seed + 2, n, width)
    if duplicates:  # exact ties among the candidates' similarities
        candidates = torch.cat([candidates[: (m + 1) // 2]] * 2)[:m]
        anchors = candidates[:n] if layout == "in_batch" else anchors
    ids = torch.arange(n) % max(n // 2, 1)
    pairs = {
        "in_batch": lambda: make_pairs(n, n, anchor_ids=ids, candidate_ids=ids, self_offset=0),
        "two_tower": lambda: make_pairs(n, m, anchor_ids=torch.arange(n), candidate_ids=torch.arange(m)),
        "moco": lambda: make_pairs(n, m, has_positive_key=True),
        "moco_ids": lambda: make_pairs(n, m, anchor_ids=torch.arange(n), candidate_ids=torch.arange(m) % (n + 1),
                                       has_positive_key=True, ids_exclude=True),
    }[layout]()
    has_positive = bool((pairs.num_positives > 0).all())
    if not has_positive:
        return  # a row without a positive has no defined loss
    options = dict(temperature=temperature, smoothing=smoothing, neighbors=k)
    leaves = [anchors] if layout == "in_batch" else [anchors, candidates] + ([keys] if "moco" in layout else [])

    def fast(a, c=None, key=None):
        return reference_row_losses(a, a if c is None else c, key, pairs, **options)

    def dense(a, c=None, key=None):
        c = a if c is None else c
        sims = a @ c.T
        if key is not None:
            sims = torch.cat([(a * key).sum(1, keepdim=True), sims], dim=1)
        valid, positive = dense_masks(pairs, n, c.shape[0], a.device)
        targets = smoothed_targets(sims.detach(), positive, valid & ~positive, smoothing, k)
        logits = sims / temperature
        return torch.logsumexp(logits.masked_fill(~valid, float("-inf")), 1) - (targets * logits).sum(1)

    assert_same_values_and_grads(values_and_grads(fast, leaves), values_and_grads(dense, leaves), tol=1e-11)


@settings(max_examples=30)
@given(n=st.integers(1, 6), m=st.integers(1, 14), k=st.integers(1, 12), copies=st.integers(1, 4),
       seed=st.integers(0, 2**16))
def test_nearest_negatives_are_brute_force_topk(n, m, k, copies, seed):
    """The op's selection (k-th value, then a rank with ties by column) equals a brute-force sort by
    (similarity descending, column ascending), with many exact ties, k above |Neg(i)| included."""
    base = randn(seed, max(m // copies, 1), 3)
    candidates = base.repeat(m, 1)[:m]
    anchors = randn(seed + 1, n, 3)
    ids = torch.arange(n)
    cand_ids = torch.arange(m) % (n + 2)  # some candidates are a row's positive
    pairs = make_pairs(n, m, anchor_ids=ids, candidate_ids=cand_ids)
    logits = anchors @ candidates.T
    columns, present = nearest_negatives(logits, positive_mask(pairs, m), pairs.num_negatives, k)
    for i in range(n):
        negatives = [j for j in range(m) if int(cand_ids[j]) != i]
        chosen = sorted(negatives, key=lambda j: (-float(logits[i, j]), j))[:k]
        assert sorted(columns[i][present[i]].tolist()) == sorted(chosen)


@pytest.mark.parametrize("k", [None, 2, 6])
def test_gradcheck_moco_ids_and_two_tower(k):
    """fp64 gradcheck of the op itself (the custom backward p - y), MoCo with excluded ids and rows
    with fewer than k negatives, and two-tower with both sides differentiable."""
    q, key, bank = randn(0, 3, 5).requires_grad_(), randn(1, 3, 5).requires_grad_(), randn(2, 6, 5).requires_grad_()
    pairs = make_pairs(3, 6, anchor_ids=torch.arange(3), candidate_ids=torch.tensor([0, 0, 1, 2, 2, NO_ID]),
                       has_positive_key=True, ids_exclude=True)
    fn = lambda q, key, bank: reference_row_losses(q, bank, key, pairs, temperature=0.2,  # noqa: E731
                                                   smoothing=0.3, neighbors=k)
    assert torch.autograd.gradcheck(fn, (q, key, bank))
    x, y = randn(3, 4, 5).requires_grad_(), randn(4, 6, 5).requires_grad_()
    tower = make_pairs(4, 6, anchor_ids=torch.arange(4), candidate_ids=torch.arange(6))
    fn = lambda x, y: reference_row_losses(x, y, None, tower, temperature=0.5,  # noqa: E731
                                           smoothing=0.2, neighbors=k)
    assert torch.autograd.gradcheck(fn, (x, y))


@pytest.mark.parametrize("k", [None, 3])
def test_runs_under_bf16_autocast(k):
    """Under autocast the similarity matmul may run in bf16; everything after it stays float32."""
    x = unit(randn(0, 32, 16, dtype=torch.float32)).requires_grad_()
    ids = torch.arange(16).repeat(2)
    pairs = make_pairs(32, 32, anchor_ids=ids, candidate_ids=ids, self_offset=0)
    options = dict(temperature=0.1, smoothing=0.1, neighbors=k)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rows = reference_row_losses(x, x, None, pairs, **options)
    (grad,) = torch.autograd.grad(rows.sum(), x)
    exact = reference_row_losses(x.detach().double(), x.detach().double(), None, pairs, **options)
    assert rows.dtype == grad.dtype == torch.float32
    torch.testing.assert_close(rows.double(), exact, rtol=0, atol=0.1)
