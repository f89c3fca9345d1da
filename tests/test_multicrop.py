"""SSLight's pair-weighted multi-crop loss through lightly's DINO and SwAV losses
(`integrations/lightly/multicrop.py`) and the weighting itself (`integrations/recipes/multicrop.py`).

- loss_weights=None: the subclasses equal lightly's DINOLoss / SwaVLoss (fp64: value, gradient,
  the centre after the call; SwAV with and without a queue);
- SSLight's lambdas: both equal a row-by-row plain-Python evaluation of the authors' formula (its
  own softmax and Sinkhorn, a loop over pairs and rows: nothing shared with multicrop.py);
- pair_weights' invariants and the errors for bad input.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from lightly.loss import DINOLoss, SwaVLoss
from torch.nn.functional import normalize

from smooth_infonce.integrations.lightly.multicrop import SSLightDINOLoss, SSLightSwaVLoss
from smooth_infonce.integrations.recipes.multicrop import pair_weights

F64 = torch.float64


def _outputs(gen: torch.Generator, views: int, rows: int, dim: int, scale: float = 1.0,
             grad: bool = False) -> List[torch.Tensor]:
    return [(scale * torch.randn(rows, dim, generator=gen, dtype=F64)).requires_grad_(grad) for _ in range(views)]


def _unit_scores(gen: torch.Generator, views: int, rows: int, prototypes: int, grad: bool = False):
    """Cosine similarities of unit features and unit prototypes, as SwAV's scores are."""
    protos = normalize(torch.randn(prototypes, 8, generator=gen, dtype=F64), dim=1)
    return [(normalize(torch.randn(rows, 8, generator=gen, dtype=F64), dim=1) @ protos.T).requires_grad_(grad)
            for _ in range(views)]


# --- plain-Python statement of the authors' formula (the oracle) -------------------------------------

def _softmax_row(row: Sequence[float]) -> List[float]:
    top = max(row)
    exps = [math.exp(x - top) for x in row]
    total = sum(exps)
    return [e / total for e in exps]


def _log_softmax_row(row: Sequence[float]) -> List[float]:
    top = max(row)
    log_total = top + math.log(sum(math.exp(x - top) for x in row))
    return [x - log_total for x in row]


def _sinkhorn_rows(rows: List[List[float]], iterations: int, epsilon: float) -> List[List[float]]:
    """SwAV's Sinkhorn-Knopp on a list of score rows (samples x prototypes): every prototype gets
    the same total mass, every sample mass 1; returns one code row per sample."""
    q = [[math.exp(x / epsilon) for x in row] for row in rows]
    total = sum(map(sum, q))
    q = [[x / total for x in row] for row in q]
    samples, prototypes = len(q), len(q[0])
    for _ in range(iterations):
        for k in range(prototypes):
            mass = sum(q[b][k] for b in range(samples))
            for b in range(samples):
                q[b][k] /= mass * prototypes
        for b in range(samples):
            mass = sum(q[b])
            q[b] = [x / (mass * samples) for x in q[b]]
    return [[x * samples for x in row] for row in q]


def _sslight_loss(targets: List[List[List[float]]], log_probs: List[List[List[float]]],
                  lambdas: Optional[Sequence[float]]) -> float:
    """lambda_gg * mean over global-global pairs + lambda_gl * mean over global-local pairs of the
    batch-mean cross-entropy, pair by pair and row by row (lambdas normalised to sum 1; no locals
    or None: the plain mean over all pairs)."""
    num_global, num_views = len(targets), len(log_probs)
    pair_losses = {}
    for a in range(num_global):
        for v in range(num_views):
            if v == a:
                continue
            rows = [-sum(t * lp for t, lp in zip(targets[a][b], log_probs[v][b])) for b in range(len(targets[a]))]
            pair_losses[a, v] = sum(rows) / len(rows)
    global_pairs = [loss for (a, v), loss in pair_losses.items() if v < num_global]
    local_pairs = [loss for (a, v), loss in pair_losses.items() if v >= num_global]
    if lambdas is None or not local_pairs:
        return sum(pair_losses.values()) / len(pair_losses)
    lambda_gg, lambda_gl = (w / sum(lambdas) for w in lambdas)
    return lambda_gg * sum(global_pairs) / len(global_pairs) + lambda_gl * sum(local_pairs) / len(local_pairs)


def _sslight_score_grads(targets: List[List[List[float]]], probs: List[List[List[float]]],
                         lambdas: Optional[Sequence[float]], temperature: float) -> List[List[List[float]]]:
    """d loss / d z for every view, row and prototype, written out from `_sslight_loss`: with the
    targets held fixed (SwAV's codes carry no gradient) and lp = log softmax(z / T), the pair (a, v)
    with weight w_av contributes w_av (|q_ab| p_vb - q_ab) / (T B) to view v's row b, where |q_ab| is
    the code row's mass (1 after a Sinkhorn iteration; any value with ``sinkhorn_iterations=0``)."""
    num_global, num_views, batch = len(targets), len(probs), len(targets[0])
    global_pairs, local_pairs = num_global * (num_global - 1), num_global * (num_views - num_global)
    if lambdas is None or local_pairs == 0:
        per_global = per_local = 1.0 / (global_pairs + local_pairs)
    else:
        lambda_gg, lambda_gl = (w / sum(lambdas) for w in lambdas)
        per_global, per_local = lambda_gg / global_pairs, lambda_gl / local_pairs
    grads = [[[0.0] * len(row) for row in view] for view in probs]
    for a in range(num_global):
        for v in range(num_views):
            if v == a:
                continue
            weight = per_global if v < num_global else per_local
            for b in range(batch):
                mass = sum(targets[a][b])
                for k, (p, q) in enumerate(zip(probs[v][b], targets[a][b])):
                    grads[v][b][k] += weight * (mass * p - q) / (temperature * batch)
    return grads


# --- DINO ---------------------------------------------------------------------------------------

DINO_DRAW = dict(
    batch=st.integers(1, 5), dim=st.integers(2, 10), num_local=st.integers(0, 4),
    warmup_temp=st.floats(0.02, 0.2), final_temp=st.floats(0.02, 0.2), student_temp=st.floats(0.05, 0.5),
    warmup_epochs=st.integers(0, 6), epoch=st.one_of(st.none(), st.integers(0, 8)),
    explicit_temp=st.one_of(st.none(), st.floats(0.02, 0.2)), center_momentum=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)


def _dino_pair(dim, warmup_temp, final_temp, warmup_epochs, student_temp, center_momentum, loss_weights, center):
    kwargs = dict(output_dim=dim, warmup_teacher_temp=warmup_temp, teacher_temp=final_temp,
                  warmup_teacher_temp_epochs=warmup_epochs, student_temp=student_temp, center_momentum=center_momentum)
    ours, theirs = SSLightDINOLoss(**kwargs, loss_weights=loss_weights).double(), DINOLoss(**kwargs).double()
    for loss in (ours, theirs):
        loss.center.copy_(center)
    return ours, theirs


@settings(max_examples=60)
@given(**DINO_DRAW)
def test_dino_without_weights_equals_lightly(batch, dim, num_local, warmup_temp, final_temp, student_temp,
                                             warmup_epochs, epoch, explicit_temp, center_momentum, seed):
    gen = torch.Generator().manual_seed(seed)
    center = 0.3 * torch.randn(1, 1, dim, generator=gen, dtype=F64)
    ours, theirs = _dino_pair(dim, warmup_temp, final_temp, warmup_epochs, student_temp, center_momentum, None, center)
    teacher = _outputs(gen, 2, batch, dim, grad=True)
    student = _outputs(gen, 2 + num_local, batch, dim, scale=2.0, grad=True)

    expected = theirs(teacher, student, teacher_temp=explicit_temp, epoch=epoch)
    got = ours(teacher, student, teacher_temp=explicit_temp, epoch=epoch)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
    for mine, lightly_grad in zip(torch.autograd.grad(got, teacher + student),
                                  torch.autograd.grad(expected, teacher + student)):
        torch.testing.assert_close(mine, lightly_grad, rtol=0, atol=1e-10)
    torch.testing.assert_close(ours.center, theirs.center, rtol=0, atol=1e-12)
    assert not torch.equal(ours.center, center) or center_momentum == 1.0  # the call moved it


@settings(max_examples=40)
@given(**DINO_DRAW, lambdas=st.tuples(st.floats(0.0, 1.0), st.floats(0.0, 1.0)).filter(lambda w: sum(w) > 0.01))
@example(batch=3, dim=6, num_local=4, warmup_temp=0.04, final_temp=0.07, student_temp=0.1, warmup_epochs=5,
         epoch=2, explicit_temp=None, center_momentum=0.9, seed=0, lambdas=(0.4, 0.6))
def test_dino_with_lambdas_equals_the_authors_formula_row_by_row(batch, dim, num_local, warmup_temp, final_temp,
                                                                 student_temp, warmup_epochs, epoch, explicit_temp,
                                                                 center_momentum, seed, lambdas):
    gen = torch.Generator().manual_seed(seed)
    center = 0.3 * torch.randn(1, 1, dim, generator=gen, dtype=F64)
    ours, _ = _dino_pair(dim, warmup_temp, final_temp, warmup_epochs, student_temp, center_momentum, lambdas, center)
    teacher = _outputs(gen, 2, batch, dim)
    student = _outputs(gen, 2 + num_local, batch, dim, scale=2.0)
    got = ours(teacher, student, teacher_temp=explicit_temp, epoch=epoch)

    # tau_t: DINO's linear warm-up per epoch (float32, as lightly's schedule holds it)
    if explicit_temp is not None:
        tau_t = float(torch.tensor(explicit_temp))
    elif epoch is not None and epoch < warmup_epochs:
        tau_t = float(torch.tensor(warmup_temp if warmup_epochs == 1 else
                                   warmup_temp + (final_temp - warmup_temp) * epoch / (warmup_epochs - 1)))
    else:
        tau_t = float(torch.tensor(final_temp))
    c = center.flatten().tolist()
    targets = [[_softmax_row([(x - ck) / tau_t for x, ck in zip(row, c)]) for row in t.tolist()] for t in teacher]
    log_probs = [[_log_softmax_row([x / student_temp for x in row]) for row in s.tolist()] for s in student]
    assert float(got) == pytest.approx(_sslight_loss(targets, log_probs, lambdas), rel=1e-5, abs=1e-9)
    # the centre: EMA of the teacher outputs' mean over views and rows
    mean = [sum(t[b][k] for t in (x.tolist() for x in teacher) for b in range(batch)) / (2 * batch)
            for k in range(dim)]
    expected_center = [center_momentum * ck + (1 - center_momentum) * mk for ck, mk in zip(c, mean)]
    assert ours.center.flatten().tolist() == pytest.approx(expected_center, rel=1e-9, abs=1e-12)


def test_dino_sslight_weights_put_a_fifth_on_each_global_pair():
    """With 6 identical local predictions, moving all loss to one global pair shows 0.2 / 0.05."""
    gen = torch.Generator().manual_seed(1)
    criterion = SSLightDINOLoss(output_dim=5, teacher_temp=0.07, warmup_teacher_temp_epochs=0,
                                loss_weights=(0.4, 0.6)).double()
    teacher = _outputs(gen, 2, 3, 5)
    student = _outputs(gen, 8, 3, 5, grad=True)
    loss = criterion(teacher, student)
    grads = torch.autograd.grad(loss, student)
    # d loss / d student_v = sum_a w[a][v] * (softmax(s_v / tau_s) - target_a) / (B tau_s): the
    # global view 1 has one target (global 0) at 0.2, each local two targets at 0.05
    tau_t = float(torch.tensor(0.07))  # lightly keeps tau_t as a float32 tensor; the centre was 0
    target = [torch.softmax(t / tau_t, dim=-1) for t in teacher]
    p = [torch.softmax(s.detach() / 0.1, dim=-1) for s in student]
    torch.testing.assert_close(grads[1], 0.2 * (p[1] - target[0]) / (3 * 0.1))
    torch.testing.assert_close(grads[5], 0.05 * (2 * p[5] - target[0] - target[1]) / (3 * 0.1))


# --- SwAV ---------------------------------------------------------------------------------------

SWAV_DRAW = dict(
    batch=st.integers(1, 5), prototypes=st.integers(2, 10), num_local=st.integers(0, 4),
    queue=st.one_of(st.none(), st.integers(1, 8)), temperature=st.floats(0.05, 0.5),
    iterations=st.integers(0, 4), epsilon=st.floats(0.05, 0.5), seed=st.integers(0, 2**16),
)


@settings(max_examples=60)
@given(**SWAV_DRAW)
@example(batch=3, prototypes=4, num_local=2, queue=None, temperature=0.1, iterations=0, epsilon=0.05, seed=0)
def test_swav_without_weights_equals_lightly(batch, prototypes, num_local, queue, temperature, iterations, epsilon,
                                             seed):
    """Every setting lightly's SwaVLoss runs (sinkhorn_iterations=0 included) gives lightly's result."""
    gen = torch.Generator().manual_seed(seed)
    high = _unit_scores(gen, 2, batch, prototypes, grad=True)
    low = _unit_scores(gen, num_local, batch, prototypes, grad=True)
    queued = None if queue is None else _unit_scores(gen, 2, queue, prototypes)
    kwargs = dict(temperature=temperature, sinkhorn_iterations=iterations, sinkhorn_epsilon=epsilon)

    expected = SwaVLoss(**kwargs)(high, low, queue_outputs=queued)
    got = SSLightSwaVLoss(**kwargs)(high, low, queue_outputs=queued)
    assert got.shape == () and expected.shape == (1,)
    torch.testing.assert_close(got, expected.reshape(()), rtol=0, atol=1e-10)
    for mine, lightly_grad in zip(torch.autograd.grad(got, high + low), torch.autograd.grad(expected, high + low)):
        torch.testing.assert_close(mine, lightly_grad, rtol=0, atol=1e-10)


@settings(max_examples=40)
@given(**SWAV_DRAW, lambdas=st.tuples(st.floats(0.0, 1.0), st.floats(0.0, 1.0)).filter(lambda w: sum(w) > 0.01))
@example(batch=4, prototypes=6, num_local=4, queue=8, temperature=0.1, iterations=3, epsilon=0.05, seed=0,
         lambdas=(0.4, 0.6))
def test_swav_with_lambdas_equals_the_authors_formula_row_by_row(batch, prototypes, num_local, queue, temperature,
                                                                 iterations, epsilon, seed, lambdas):
    gen = torch.Generator().manual_seed(seed)
    high = _unit_scores(gen, 2, batch, prototypes, grad=True)
    low = _unit_scores(gen, num_local, batch, prototypes, grad=True)
    queued = None if queue is None else _unit_scores(gen, 2, queue, prototypes)
    got = SSLightSwaVLoss(temperature=temperature, sinkhorn_iterations=iterations, sinkhorn_epsilon=epsilon,
                          loss_weights=lambdas)(high, low, queue_outputs=queued)

    # codes of global view a: Sinkhorn over its batch rows plus its queue rows, the batch's rows kept
    codes = [_sinkhorn_rows(h.tolist() + ([] if queued is None else queued[a].tolist()), iterations, epsilon)[:batch]
             for a, h in enumerate(high)]
    scaled = [[[x / temperature for x in row] for row in z.tolist()] for z in high + low]
    log_probs = [[_log_softmax_row(row) for row in view] for view in scaled]
    assert float(got) == pytest.approx(_sslight_loss(codes, log_probs, lambdas), rel=1e-5, abs=1e-9)

    # and its gradients, view by view, against the formula's derivative written out row by row
    got.backward()
    expected = _sslight_score_grads(codes, [[_softmax_row(row) for row in view] for view in scaled], lambdas,
                                    temperature)
    for view, (scores, oracle) in enumerate(zip(high + low, expected)):
        torch.testing.assert_close(scores.grad, torch.tensor(oracle, dtype=F64), rtol=1e-7, atol=1e-10,
                                   msg=lambda detail, view=view: f"view {view}: {detail}")


def test_swav_queue_changes_the_codes():
    gen = torch.Generator().manual_seed(2)
    high, low = _unit_scores(gen, 2, 4, 6), _unit_scores(gen, 2, 4, 6)
    criterion = SSLightSwaVLoss(loss_weights=(0.4, 0.6))
    assert float(criterion(high, low)) != pytest.approx(float(criterion(high, low, _unit_scores(gen, 2, 8, 6))))


# --- the weighting --------------------------------------------------------------------------------

@given(num_global=st.integers(2, 4), num_local=st.integers(0, 10),
       lambdas=st.one_of(st.none(), st.tuples(st.floats(0.0, 5.0), st.floats(0.0, 5.0)).filter(lambda w: sum(w) > 0)))
def test_pair_weights_invariants(num_global, num_local, lambdas):
    weights = pair_weights(num_global, num_local, lambdas)
    assert len(weights) == num_global and all(len(row) == num_global + num_local for row in weights)
    assert all(weights[a][a] == 0 for a in range(num_global))  # a view is never its own target
    assert sum(map(sum, weights)) == pytest.approx(1.0, abs=1e-12)
    global_pair = {w for a, row in enumerate(weights) for v, w in enumerate(row[:num_global]) if v != a}
    local_pair = {w for row in weights for w in row[num_global:]}
    assert len(global_pair) == 1 and len(local_pair) <= 1  # one weight per kind of pair
    if lambdas is not None and num_local > 0:
        lambda_gg, lambda_gl = (w / sum(lambdas) for w in lambdas)
        assert global_pair.pop() * num_global * (num_global - 1) == pytest.approx(lambda_gg, abs=1e-12)
        assert local_pair.pop() * num_global * num_local == pytest.approx(lambda_gl, abs=1e-12)


@pytest.mark.parametrize("num_local, per_global, per_local", [(6, 0.2, 0.05), (10, 0.2, 0.03), (0, 0.5, None)])
def test_pair_weights_at_sslight_lambdas(num_local, per_global, per_local):
    weights = pair_weights(2, num_local, (0.4, 0.6))
    assert weights[0][1] == pytest.approx(per_global) and weights[1][0] == pytest.approx(per_global)
    assert all(w == pytest.approx(per_local) for row in weights for w in row[2:])


@pytest.mark.parametrize("args", [(1, 6, None), (2, -1, None), (2, 6, (-0.1, 0.6)), (2, 6, (0.0, 0.0))])
def test_pair_weights_rejects_bad_input(args):
    with pytest.raises(ValueError):
        pair_weights(*args)


# --- errors -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls", [SSLightDINOLoss, SSLightSwaVLoss])
@pytest.mark.parametrize("loss_weights", [(-0.1, 0.6), (0.0, 0.0), (0.4,), (0.4, 0.6, 0.1)])
def test_constructors_reject_bad_loss_weights(cls, loss_weights):
    with pytest.raises(ValueError, match="loss_weights"):
        cls(loss_weights=loss_weights)


@pytest.mark.parametrize("kwargs, name", [(dict(output_dim=0), "output_dim"), (dict(teacher_temp=0.0), "teacher_temp"),
                                          (dict(student_temp=-1.0), "student_temp"),
                                          (dict(center_momentum=1.5), "center_momentum"),
                                          (dict(warmup_teacher_temp_epochs=-1), "warmup_teacher_temp_epochs")])
def test_dino_constructor_rejects_bad_settings(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SSLightDINOLoss(**kwargs)


def test_swav_constructor_rejects_bad_settings():
    for kwargs, name in ((dict(temperature=0.0), "temperature"), (dict(sinkhorn_iterations=-1), "sinkhorn_iterations"),
                         (dict(sinkhorn_iterations=1.5), "sinkhorn_iterations"),
                         (dict(sinkhorn_epsilon=-1.0), "sinkhorn_epsilon")):
        with pytest.raises(ValueError, match=name):
            SSLightSwaVLoss(**kwargs)


def test_dino_single_view_error_has_lightlys_wording():
    """Code that matches lightly's DINOLoss message ("at least two views") still matches ours."""
    view = [torch.randn(3, 4)]
    with pytest.raises(ValueError, match="at least two views") as lightly_error:
        DINOLoss(output_dim=4)(view, view)
    with pytest.raises(ValueError, match="at least two views.*teacher_out") as ours:
        SSLightDINOLoss(output_dim=4)(view, view)
    assert type(ours.value) is type(lightly_error.value)


def test_dino_forward_names_the_bad_argument():
    criterion = SSLightDINOLoss(output_dim=4)
    t, s = [torch.randn(3, 4)] * 2, [torch.randn(3, 4)] * 4
    cases = [((t[:1], s), "teacher_out"), ((t, s[:1]), "student_out"), (([torch.randn(3, 5)] * 2, s), "output_dim"),
             (([t[0], torch.randn(2, 4)], s), r"teacher_out\[1\]"),
             ((t, s[:3] + [torch.randn(3, 5)]), r"student_out\[3\]"),
             ((t, [torch.randn(3, 4, 1)] * 3), r"student_out\[0\]")]
    for args, name in cases:
        with pytest.raises(ValueError, match=name):
            criterion(*args)
    assert torch.equal(criterion.center, torch.zeros(1, 1, 4))  # nothing moved on bad input


def test_swav_forward_names_the_bad_argument():
    criterion = SSLightSwaVLoss()
    high, low = [normalize(torch.randn(3, 4), dim=1)] * 2, [normalize(torch.randn(3, 4), dim=1)] * 2
    cases = [((high[:1], low), "high_resolution_outputs"),
             ((high, [torch.randn(3, 5)]), r"low_resolution_outputs\[0\]"),
             ((high, low, [torch.randn(6, 4)]), "queue_outputs"),
             ((high, low, [torch.randn(6, 4), torch.randn(6, 5)]), r"queue_outputs\[1\]"),
             (([high[0], torch.randn(2, 4)], low), r"high_resolution_outputs\[1\]")]
    for args, name in cases:
        with pytest.raises(ValueError, match=name):
            criterion(*args)
