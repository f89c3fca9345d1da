"""The lightly drop-in (`SmoothNTXentLoss`) against the real lightly 1.6 NTXentLoss: values,
gradients, bank mechanics, state dicts."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from lightly.loss import NTXentLoss

from smooth_infonce import SmoothInfoNCELoss, SmoothingSchedule
from smooth_infonce.integrations.lightly import SmoothNTXentLoss

ATOL = 1e-5


def _embeddings(batch, dim, seed, grad=True):
    generator = torch.Generator().manual_seed(seed)
    out0 = torch.randn(batch, dim, generator=generator, dtype=torch.float32).requires_grad_(grad)
    out1 = torch.randn(batch, dim, generator=generator, dtype=torch.float32).requires_grad_(grad)
    return out0, out1


def _pair_with_same_bank(temperature, bank_size, **options):
    """lightly's loss and the drop-in, with identical random initial banks."""
    torch.manual_seed(123)
    reference = NTXentLoss(temperature=temperature, memory_bank_size=bank_size)
    torch.manual_seed(123)
    drop_in = SmoothNTXentLoss(temperature=temperature, memory_bank_size=bank_size, **options)
    assert torch.equal(reference.memory_bank.bank, drop_in.memory_bank.bank)
    return reference, drop_in


# --- the drop-in contract -------------------------------------------------------------------

def test_is_an_ntxent_loss_with_the_same_constructor():
    loss = SmoothNTXentLoss(0.3, (64, 8), False, smoothing=0.1, neighbors=2)
    assert isinstance(loss, NTXentLoss)
    assert loss.temperature == 0.3 and loss.gather_distributed is False
    assert tuple(loss.memory_bank.size) == (64, 8)
    with pytest.raises(ValueError):  # lightly 1.6: a bare int bank size is rejected
        SmoothNTXentLoss(memory_bank_size=64)
    with pytest.raises(ValueError):
        SmoothNTXentLoss(temperature=-0.1)
    with pytest.raises(ValueError):
        SmoothNTXentLoss(smoothing=1.0)
    with pytest.raises(ValueError):
        SmoothNTXentLoss(smoothing=0.1, neighbors=0)


@pytest.mark.parametrize("batch,dim,temperature", [(8, 16, 0.5), (32, 64, 0.1), (5, 3, 0.07)])
def test_in_batch_at_smoothing_zero_equals_ntxent(batch, dim, temperature):
    out0, out1 = _embeddings(batch, dim, seed=batch)
    expected = NTXentLoss(temperature=temperature)(out0, out1)
    expected_grads = torch.autograd.grad(expected, (out0, out1))
    got = SmoothNTXentLoss(temperature=temperature, smoothing=0.0)(out0, out1)
    got_grads = torch.autograd.grad(got, (out0, out1))
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-5)
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g, e, atol=ATOL, rtol=1e-4)


def test_in_batch_smoothing_matches_the_core_module():
    out0, out1 = _embeddings(16, 32, seed=1)
    extra = torch.randn(16, 32)
    for neighbors in (None, 3):
        core = SmoothInfoNCELoss(temperature=0.2, smoothing=0.2, neighbors=neighbors)
        drop_in = SmoothNTXentLoss(temperature=0.2, smoothing=0.2, neighbors=neighbors)
        torch.testing.assert_close(drop_in(out0, out1), core(out0, out1))
        torch.testing.assert_close(drop_in(out0, out1, extra, weights=(1.0, 0.5, 0.5)),
                                   core(out0, out1, extra, weights=(1.0, 0.5, 0.5)))
        # smoothing really changes the value
        assert not torch.allclose(drop_in(out0, out1), NTXentLoss(temperature=0.2)(out0, out1))


def test_memory_bank_at_smoothing_zero_equals_ntxent_step_by_step():
    """Loss, gradients, bank contents and pointer agree over steps that wrap the bank, with a
    batch that does not divide K (lightly drops the keys that do not fit before wrapping)."""
    reference, drop_in = _pair_with_same_bank(0.2, (40, 8), smoothing=0.0)
    for step in range(6):
        out0, out1 = _embeddings(16, 8, seed=10 + step)
        expected = reference(out0, out1)
        expected_grads = torch.autograd.grad(expected, (out0, out1))
        got = drop_in(out0, out1)
        got_grads = torch.autograd.grad(got, (out0, out1))
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-5)
        for g, e in zip(got_grads, expected_grads):
            torch.testing.assert_close(g, e, atol=ATOL, rtol=1e-4)
        torch.testing.assert_close(drop_in.memory_bank.bank, reference.memory_bank.bank)
        assert int(drop_in.memory_bank.bank_ptr) == int(reference.memory_bank.bank_ptr)


def test_memory_bank_layout_positive_first_bank_read_before_update():
    drop_in = SmoothNTXentLoss(temperature=0.1, memory_bank_size=(32, 4), smoothing=0.0)
    bank_before = drop_in.memory_bank.bank.clone()
    query, key = _embeddings(8, 4, seed=3)
    loss = drop_in(query, key)
    q, k = torch.nn.functional.normalize(query, dim=1), torch.nn.functional.normalize(key, dim=1)
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ bank_before.t()], dim=1) / 0.1
    expected = torch.nn.functional.cross_entropy(logits, torch.zeros(8, dtype=torch.long))
    torch.testing.assert_close(loss, expected, atol=ATOL, rtol=1e-5)
    # the keys were enqueued (normalised) after being read
    torch.testing.assert_close(drop_in.memory_bank.bank[:8], k.detach())
    assert int(drop_in.memory_bank.bank_ptr) == 8


# --- bank mechanics ---------------------------------------------------------------------------

def test_no_bank_update_without_gradient():
    reference, drop_in = _pair_with_same_bank(0.2, (32, 8), smoothing=0.2, neighbors=2)
    bank = drop_in.memory_bank.bank.clone()
    out0, out1 = _embeddings(8, 8, seed=4, grad=False)
    for loss in (reference, drop_in):
        loss(out0, out1)  # out0 does not require grad: no update (lightly's rule)
        leaf0, leaf1 = _embeddings(8, 8, seed=5)
        with torch.no_grad():  # what a model computes under no_grad does not require grad
            loss(leaf0 * 2, leaf1 * 2)
    assert torch.equal(drop_in.memory_bank.bank, bank)
    assert torch.equal(reference.memory_bank.bank, bank)
    assert int(drop_in.memory_bank.bank_ptr) == 0 and not bool(drop_in.bank_filled)


def test_smoothing_held_at_zero_until_the_bank_is_filled_once():
    reference, drop_in = _pair_with_same_bank(0.2, (32, 8), smoothing=0.3, neighbors=4)
    for step in range(4):  # 4 x 8 keys fill the 32 entries; the 4th step still reads 8 random ones
        assert drop_in.effective_smoothing == 0.0
        out0, out1 = _embeddings(8, 8, seed=20 + step)
        torch.testing.assert_close(drop_in(out0, out1), reference(out0, out1), atol=ATOL, rtol=1e-5)
    assert bool(drop_in.bank_filled)
    assert drop_in.effective_smoothing == pytest.approx(0.3)
    out0, out1 = _embeddings(8, 8, seed=30)
    assert not torch.allclose(drop_in(out0, out1), reference(out0, out1), atol=1e-3)

    eager = SmoothNTXentLoss(0.2, memory_bank_size=(32, 8), smoothing=0.3, neighbors=4, wait_for_full_bank=False)
    assert eager.effective_smoothing == pytest.approx(0.3)


def test_default_state_dict_matches_lightly_and_loads_both_ways():
    reference = NTXentLoss(0.2, memory_bank_size=(32, 8))
    drop_in = SmoothNTXentLoss(0.2, memory_bank_size=(32, 8), smoothing=0.1)
    assert list(drop_in.state_dict()) == list(reference.state_dict()) == []
    drop_in.load_state_dict(reference.state_dict())
    reference.load_state_dict(drop_in.state_dict())


def test_persistent_bank_round_trip_resumes_the_queue_and_the_filled_flag():
    trained = SmoothNTXentLoss(0.2, memory_bank_size=(24, 8), smoothing=0.2, neighbors=3, persistent_bank=True)
    for step in range(4):  # fill (24 = 3 x 8) and one more step
        trained(*_embeddings(8, 8, seed=40 + step))
    state = copy.deepcopy(trained.state_dict())
    assert set(state) == {"memory_bank.bank", "memory_bank.bank_ptr", "bank_ids", "bank_enqueued"}

    resumed = SmoothNTXentLoss(0.2, memory_bank_size=(24, 8), smoothing=0.2, neighbors=3, persistent_bank=True)
    assert resumed.effective_smoothing == 0.0  # fresh random bank: held at 0
    resumed.load_state_dict(state)
    assert torch.equal(resumed.memory_bank.bank, trained.memory_bank.bank)
    assert int(resumed.memory_bank.bank_ptr) == int(trained.memory_bank.bank_ptr) == 8
    assert resumed.effective_smoothing == pytest.approx(0.2)
    out0, out1 = _embeddings(8, 8, seed=50)
    torch.testing.assert_close(resumed(out0, out1), trained(out0, out1))
    torch.testing.assert_close(resumed.memory_bank.bank, trained.memory_bank.bank)

    # Without persistence nothing is saved: a resumed run waits for a full bank again.
    plain = SmoothNTXentLoss(0.2, memory_bank_size=(24, 8), smoothing=0.2, neighbors=3)
    for step in range(4):
        plain(*_embeddings(8, 8, seed=40 + step))
    restarted = SmoothNTXentLoss(0.2, memory_bank_size=(24, 8), smoothing=0.2, neighbors=3)
    restarted.load_state_dict(plain.state_dict())
    assert plain.effective_smoothing == pytest.approx(0.2) and restarted.effective_smoothing == 0.0


def test_persistent_bank_inside_a_model_checkpoint(tmp_path):
    model = torch.nn.Module()
    model.criterion = SmoothNTXentLoss(0.2, memory_bank_size=(16, 4), smoothing=0.1, persistent_bank=True)
    for step in range(2):
        model.criterion(*_embeddings(8, 4, seed=60 + step))
    torch.save(model.state_dict(), tmp_path / "checkpoint.pt")
    resumed = torch.nn.Module()
    resumed.criterion = SmoothNTXentLoss(0.2, memory_bank_size=(16, 4), smoothing=0.1, persistent_bank=True)
    resumed.load_state_dict(torch.load(tmp_path / "checkpoint.pt", weights_only=True))
    assert torch.equal(resumed.criterion.memory_bank.bank, model.criterion.memory_bank.bank)
    assert bool(resumed.criterion.bank_filled)


def test_schedule_sets_smoothing_per_epoch():
    loss = SmoothNTXentLoss(0.2, smoothing=0.0, neighbors=2,
                            schedule=SmoothingSchedule(0.2, "warmup", warmup_epochs=2))
    assert [loss.set_epoch(e) for e in range(4)] == [0.0, 0.0, 0.2, 0.2]
    assert loss.effective_smoothing == 0.2
    with pytest.raises(RuntimeError):
        SmoothNTXentLoss().set_epoch(0)


# --- multi-view ---------------------------------------------------------------------------------

def test_multi_query_memory_bank_is_the_weighted_mean_and_enqueues_the_key_once():
    torch.manual_seed(7)
    loss = SmoothNTXentLoss(0.2, memory_bank_size=(64, 8), smoothing=0.2, neighbors=3, wait_for_full_bank=False)
    key = torch.randn(8, 8)
    queries = [torch.randn(8, 8) for _ in range(3)]
    # Without gradient nothing is enqueued, so each query can be scored against the same bank.
    singles = [loss(q, key) for q in queries]
    combined = loss(queries[0], key, *queries[1:], weights=(0.4, 0.3, 0.3))
    torch.testing.assert_close(combined, 0.4 * singles[0] + 0.3 * singles[1] + 0.3 * singles[2])
    torch.testing.assert_close(loss(queries[0], key, *queries[1:]), sum(singles) / 3)

    trainable = [q.clone().requires_grad_() for q in queries]
    loss(trainable[0], key, *trainable[1:], weights=(0.4, 0.3, 0.3)).backward()
    assert int(loss.memory_bank.bank_ptr) == 8  # only the key batch was enqueued
    torch.testing.assert_close(loss.memory_bank.bank[:8], torch.nn.functional.normalize(key, dim=1))
    assert all(q.grad is not None and torch.isfinite(q.grad).all() for q in trainable)


def test_row_weight_errors():
    out0, out1 = _embeddings(4, 8, seed=8)
    with pytest.raises(ValueError, match="one value per anchor view"):
        SmoothNTXentLoss()(out0, out1, weights=(1.0,))
    with pytest.raises(ValueError):
        SmoothNTXentLoss()(out0, out1[:3])


# --- one options object --------------------------------------------------------------------------

def test_every_loss_option_is_a_constructor_keyword_and_an_attribute():
    import inspect

    from smooth_infonce import LossOptions

    parameters = inspect.signature(SmoothNTXentLoss).parameters
    assert set(LossOptions.field_names()) <= set(parameters)
    schedule = SmoothingSchedule(0.2, "warmup", warmup_epochs=1)
    given = dict(temperature=0.3, smoothing=0.2, neighbors=4, schedule=schedule, normalize=False, reduction="sum",
                 backend="reference", deterministic=True, allow_tf32=False, few_negatives="raise")
    loss = SmoothNTXentLoss(memory_bank_size=(16, 8), **given)
    assert loss.options == LossOptions(**given)
    for name, value in given.items():
        if name != "smoothing":
            assert getattr(loss, name) == value
    assert loss.smoothing == 0.0  # the current alpha: the schedule's epoch-0 value
    same = SmoothNTXentLoss(memory_bank_size=(16, 8), options=LossOptions(**given))
    assert same.options == loss.options and same.temperature == 0.3
    with pytest.raises(TypeError, match="not both"):
        SmoothNTXentLoss(0.2, options=LossOptions(temperature=0.2))
    assert SmoothNTXentLoss().options.few_negatives == "use_all"  # the training-loop policy


def test_options_are_validated_by_the_core_options_object():
    with pytest.raises(ValueError, match="temperature"):  # lightly accepts a negative temperature
        SmoothNTXentLoss(temperature=-0.5)
    with pytest.raises(ValueError, match="reduction"):
        SmoothNTXentLoss(reduction="max")
    with pytest.raises(TypeError, match="neighbors"):
        SmoothNTXentLoss(neighbors=True)
    loss = SmoothNTXentLoss(0.2, memory_bank_size=(16, 8), neighbors=4)
    loss.temperature = 0.1  # assignment replaces the options, validated again
    assert loss.options.temperature == 0.1
    with pytest.raises(ValueError, match="temperature"):
        loss.temperature = 0.0


def test_neighbors_larger_than_the_bank_and_width_mismatch_name_memory_bank_size():
    with pytest.raises(ValueError, match="memory_bank_size"):
        SmoothNTXentLoss(0.2, memory_bank_size=(8, 4), smoothing=0.1, neighbors=9)
    SmoothNTXentLoss(0.2, memory_bank_size=(8, 4), smoothing=0.1, neighbors=8)
    loss = SmoothNTXentLoss(0.2, memory_bank_size=(8, 4), smoothing=0.1, neighbors=2)
    with pytest.raises(ValueError, match="memory_bank_size"):
        loss.neighbors = 20
    with pytest.raises(ValueError, match="memory_bank_size"):
        loss(*_embeddings(4, 5, seed=0))
    assert int(loss.memory_bank.bank_ptr) == 0  # nothing enqueued by the failed call


def test_counts_what_it_enqueued_including_dropped_keys_at_the_wrap():
    reference, drop_in = _pair_with_same_bank(0.2, (40, 8), smoothing=0.0)
    counts = []
    for step in range(4):
        out0, out1 = _embeddings(16, 8, seed=70 + step)
        reference(out0, out1)
        drop_in(out0, out1)
        counts.append((int(drop_in.bank_enqueued), drop_in.bank_filled))
        assert int(drop_in.memory_bank.bank_ptr) == int(reference.memory_bank.bank_ptr)
    # 16, 32, then 8 written and 8 dropped (lightly's rule), then 16 from the start again
    assert counts == [(16, False), (32, False), (40, True), (56, True)]


def test_the_bank_keeps_its_dtype_under_bfloat16():
    from smooth_infonce import smooth_infonce

    torch.manual_seed(0)
    loss = SmoothNTXentLoss(0.05, memory_bank_size=(32, 16), smoothing=0.0)
    bank = loss.memory_bank.bank.clone()
    query = torch.randn(8, 16).bfloat16().requires_grad_()
    key = torch.randn(8, 16).bfloat16()
    got = loss(query, key)
    assert loss.memory_bank.bank.dtype == torch.float32  # the bf16 keys were written into the fp32 bank
    keys = torch.nn.functional.normalize(key, dim=1)
    expected = smooth_infonce(query.detach(), bank, positive_keys=keys, temperature=0.05)
    rounded = smooth_infonce(query.detach(), bank.bfloat16(), positive_keys=keys, temperature=0.05)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.detach(), expected, rtol=0, atol=0)
    assert not torch.equal(expected, rounded)  # casting the bank to bf16 would change the loss


# --- issue 11: every batch lightly survives, resuming across the swap ------------------------------

def _values_and_grads(loss_fn, out0, out1):
    out0, out1 = out0.clone().requires_grad_(), out1.clone().requires_grad_()
    loss = loss_fn(out0, out1)
    return (loss.detach(), *torch.autograd.grad(loss, (out0, out1), allow_unused=True))


@pytest.mark.parametrize("batch", [1, 2, 3])
def test_in_batch_small_batches_equal_ntxent(batch):
    """float64: lightly's value and gradients to 1e-6; a batch of one gives 0 with zero gradient."""
    out0, out1 = (x.double() for x in _embeddings(batch, 8, seed=80 + batch, grad=False))
    expected = _values_and_grads(NTXentLoss(temperature=0.2), out0, out1)
    got = _values_and_grads(SmoothNTXentLoss(temperature=0.2), out0, out1)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-6)
    if batch == 1:  # exactly what lightly gives: 0 and zero gradients
        assert float(got[0]) == 0.0 and not got[1].any() and not got[2].any()
    for neighbors in (None, 10):  # smoothing survives too; k = 10 > the 2B - 2 negatives of a row
        smoothed = SmoothNTXentLoss(temperature=0.2, smoothing=0.2, neighbors=neighbors)
        value, *grads = _values_and_grads(smoothed, out0, out1)
        assert torch.isfinite(value) and all(torch.isfinite(g).all() for g in grads)
        if batch == 1:
            assert float(value) == 0.0 and not grads[0].any() and not grads[1].any()


def test_neighbors_larger_than_a_short_batch_smooths_onto_all_negatives():
    out0, out1 = _embeddings(3, 8, seed=90)
    uniform = SmoothNTXentLoss(0.2, smoothing=0.2)(out0, out1)  # 4 negatives per row
    torch.testing.assert_close(SmoothNTXentLoss(0.2, smoothing=0.2, neighbors=10)(out0, out1), uniform)
    with pytest.raises(ValueError, match="neighbors=10"):  # the strict policy says why
        SmoothNTXentLoss(0.2, smoothing=0.2, neighbors=10, few_negatives="raise")(out0, out1)


def test_memory_bank_small_and_short_last_batches_equal_ntxent_step_by_step():
    """Batches 1, 2, 3, then full ones and a short last one (an epoch with drop_last=False), float64."""
    reference, drop_in = _pair_with_same_bank(0.2, (12, 8), smoothing=0.0)
    reference, drop_in = reference.double(), drop_in.double()
    for step, batch in enumerate([1, 2, 3, 5, 5, 5, 1, 5, 2]):
        out0, out1 = (x.double() for x in _embeddings(batch, 8, seed=100 + step, grad=False))
        expected = _values_and_grads(reference, out0, out1)
        got = _values_and_grads(drop_in, out0, out1)
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-6)
        assert torch.equal(drop_in.memory_bank.bank, reference.memory_bank.bank)
        assert int(drop_in.memory_bank.bank_ptr) == int(reference.memory_bank.bank_ptr)


def test_multi_crop_in_batch_survives_a_batch_of_one():
    views = [torch.randn(1, 8, requires_grad=True) for _ in range(4)]
    loss = SmoothNTXentLoss(0.2, smoothing=0.2, neighbors=3)(*views)
    loss.backward()
    # every other row is a positive and none is a negative: plain multi-positive InfoNCE, alpha unused
    plain = SmoothNTXentLoss(0.2)(*[v.detach() for v in views])
    torch.testing.assert_close(loss.detach(), plain)
    assert all(torch.isfinite(v.grad).all() for v in views)


@pytest.mark.parametrize("source", ["lightly", "drop_in"])
def test_state_without_a_bank_loads_strictly_into_a_persistent_bank(source):
    if source == "lightly":
        saved = NTXentLoss(0.2, memory_bank_size=(24, 8))
    else:
        saved = SmoothNTXentLoss(0.2, memory_bank_size=(24, 8), smoothing=0.2, neighbors=3)
    for step in range(4):  # the saving run filled its (unsaved) bank
        saved(*_embeddings(8, 8, seed=110 + step))
    model = torch.nn.Module()
    model.criterion = saved
    checkpoint = model.state_dict()
    assert [k for k in checkpoint if k.startswith("criterion.")] == []

    resumed = torch.nn.Module()
    resumed.criterion = SmoothNTXentLoss(0.2, memory_bank_size=(24, 8), smoothing=0.2, neighbors=3,
                                         persistent_bank=True)
    for step in range(4):  # even a bank that was filled before the load counts as unfilled after it
        resumed.criterion(*_embeddings(8, 8, seed=120 + step))
    assert resumed.criterion.bank_filled
    with pytest.warns(UserWarning, match="not yet filled"):
        resumed.load_state_dict(checkpoint, strict=True)
    criterion = resumed.criterion
    assert not criterion.bank_filled and criterion.effective_smoothing == 0.0
    for step in range(3):  # alpha held at 0 until 24 keys were enqueued again
        criterion(*_embeddings(8, 8, seed=130 + step))
        assert criterion.effective_smoothing == (0.2 if step == 2 else 0.0)


def test_a_partial_bank_state_still_fails_strict_loading():
    state = SmoothNTXentLoss(0.2, memory_bank_size=(16, 8), persistent_bank=True).state_dict()
    del state["bank_ids"]
    with pytest.raises(RuntimeError, match="bank_ids"):
        SmoothNTXentLoss(0.2, memory_bank_size=(16, 8), persistent_bank=True).load_state_dict(state)


def test_persistent_state_loads_into_plain_ntxent_with_strict_false():
    drop_in = SmoothNTXentLoss(0.2, memory_bank_size=(16, 8), smoothing=0.1, persistent_bank=True)
    drop_in(*_embeddings(8, 8, seed=140))
    plain = NTXentLoss(0.2, memory_bank_size=(16, 8))
    with pytest.raises(RuntimeError, match="Unexpected key"):
        plain.load_state_dict(drop_in.state_dict())
    result = plain.load_state_dict(drop_in.state_dict(), strict=False)
    assert set(result.unexpected_keys) == {"memory_bank.bank", "memory_bank.bank_ptr", "bank_ids", "bank_enqueued"}
    assert result.missing_keys == []


# --- issue 12: a bank that knows its samples -------------------------------------------------------

def test_ids_are_stored_beside_the_bank_and_saved_with_a_persistent_bank():
    loss = SmoothNTXentLoss(0.2, memory_bank_size=(10, 8), smoothing=0.1, persistent_bank=True)
    loss(*_embeddings(4, 8, seed=150), ids=torch.tensor([5, 6, 7, 8]))
    loss(*_embeddings(4, 8, seed=151))  # no ids: unknown
    loss(*_embeddings(4, 8, seed=152), ids=torch.tensor([1, 2, 3, 4]))  # 2 fit, 2 dropped, wrap
    assert loss.bank_ids.tolist() == [5, 6, 7, 8, -1, -1, -1, -1, 1, 2]
    assert int(loss.memory_bank.bank_ptr) == 0 and int(loss.bank_enqueued) == 10
    loss(*_embeddings(4, 8, seed=153), ids=torch.tensor([9, 10, 11, 12]))
    assert loss.bank_ids.tolist() == [9, 10, 11, 12, -1, -1, -1, -1, 1, 2]
    state = copy.deepcopy(loss.state_dict())
    assert torch.equal(state["bank_ids"], loss.bank_ids)
    resumed = SmoothNTXentLoss(0.2, memory_bank_size=(10, 8), smoothing=0.1, persistent_bank=True)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.bank_ids, loss.bank_ids) and resumed.bank_filled
    query, key = _embeddings(4, 8, seed=154)
    ids = torch.tensor([1, 9, 3, 0])
    torch.testing.assert_close(resumed(query, key, ids=ids), loss(query, key, ids=ids))
    assert list(SmoothNTXentLoss(0.2, memory_bank_size=(10, 8)).state_dict()) == []  # not persistent: as lightly
    with pytest.raises(ValueError, match="memory-bank mode"):
        SmoothNTXentLoss(0.2)(query, key, ids=ids)


def _bank_with_own_entries(seed, smoothing=0.0, neighbors=None):
    """A filled bank of 12 entries holding earlier keys of the 4 query images (ids 0..3) at known
    places, entries of other images (ids >= 10) and entries without ids (-1)."""
    generator = torch.Generator().manual_seed(seed)
    loss = SmoothNTXentLoss(0.2, memory_bank_size=(12, 8), smoothing=smoothing, neighbors=neighbors,
                            wait_for_full_bank=False).double()
    loss.memory_bank.bank.copy_(torch.nn.functional.normalize(torch.randn(12, 8, generator=generator,
                                                                          dtype=torch.float64), dim=1))
    loss.bank_ids.copy_(torch.tensor([10, 0, 11, 1, -1, 1, 12, 13, 2, -1, 14, 1]))  # image 3: none
    query = torch.randn(4, 8, generator=generator, dtype=torch.float64)
    key = torch.randn(4, 8, generator=generator, dtype=torch.float64)
    return loss, query, key


def _masked_and_deleted(loss, query, key, deleted_loss_fn):
    """The drop-in with ids, and the mean over rows of ``deleted_loss_fn(bank without the row's own
    entries)`` on that row alone; values and query gradients."""
    ids = torch.arange(4)
    bank, bank_ids = loss.memory_bank.bank.clone(), loss.bank_ids.clone()  # the call enqueues the keys
    masked_query = query.clone().requires_grad_()
    masked = loss(masked_query, key, ids=ids)
    (masked_grad,) = torch.autograd.grad(masked, masked_query)
    deleted_query = query.clone().requires_grad_()
    rows = []
    for i in range(4):
        kept = bank[bank_ids != i]
        reference = deleted_loss_fn(kept.shape[0])
        reference.memory_bank.bank = kept.clone()
        rows.append(reference(deleted_query[i:i + 1], key[i:i + 1]))
    deleted = torch.stack(rows).mean()
    (deleted_grad,) = torch.autograd.grad(deleted, deleted_query)
    return (masked.detach(), masked_grad), (deleted.detach(), deleted_grad)


def test_masking_own_image_entries_equals_deleting_them_from_lightly_bank():
    loss, query, key = _bank_with_own_entries(seed=160)
    ntxent = lambda size: NTXentLoss(0.2, memory_bank_size=(size, 8)).double()
    (value, grad), (expected, expected_grad) = _masked_and_deleted(loss, query, key, ntxent)
    torch.testing.assert_close(value, expected, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(grad, expected_grad, atol=1e-10, rtol=1e-10)
    unmasked = SmoothNTXentLoss(0.2, memory_bank_size=(12, 8)).double()
    unmasked.memory_bank.bank.copy_(loss.memory_bank.bank)
    assert not torch.allclose(unmasked(query, key), value)  # the own entries did count before


@pytest.mark.parametrize("neighbors", [None, 2, 11])
def test_masking_equals_deletion_with_smoothing(neighbors):
    """k = 11 fits the bank of 12 but is larger than the 9 negatives image 1 has left once its 3
    own entries are masked: that row smooths onto all of them (few_negatives="use_all", the drop-in's
    default), as the bank without them does with k = its size, 9 (a larger k is refused there)."""
    loss, query, key = _bank_with_own_entries(seed=170, smoothing=0.3, neighbors=neighbors)
    if neighbors == 11:
        assert int((loss.bank_ids == 1).sum()) == 3  # image 1: 12 - 3 = 9 negatives < k

    def deleted_bank(size):
        k = None if neighbors is None else min(neighbors, size)
        return SmoothNTXentLoss(0.2, memory_bank_size=(size, 8), smoothing=0.3, neighbors=k,
                                wait_for_full_bank=False).double()

    (value, grad), (expected, expected_grad) = _masked_and_deleted(loss, query, key, deleted_bank)
    torch.testing.assert_close(value, expected, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(grad, expected_grad, atol=1e-10, rtol=1e-10)


def test_neighbors_larger_than_the_memory_bank_are_refused_at_construction():
    """k = 20 above a bank of 12: no row can ever have that many negatives; the error names the
    argument and the bank's size."""
    with pytest.raises(ValueError, match=r"neighbors=20 is larger than the memory bank: "
                                         r"memory_bank_size=\(12, 8\) holds 12 negatives"):
        SmoothNTXentLoss(0.2, memory_bank_size=(12, 8), smoothing=0.3, neighbors=20)
    loss = SmoothNTXentLoss(0.2, memory_bank_size=(12, 8), smoothing=0.3, neighbors=12)  # k = the bank: accepted
    with pytest.raises(ValueError, match="neighbors=20 is larger than the memory bank"):
        loss.neighbors = 20


def test_a_bank_larger_than_the_data_set_masks_every_own_key():
    """8 images, batch 4, bank 16: after two epochs every query's own two earlier keys are in the
    bank; with ids the loss equals the loss on the bank without them."""
    loss = SmoothNTXentLoss(0.2, memory_bank_size=(16, 8), smoothing=0.0).double()
    data = torch.randn(8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(180))
    for step in range(4):
        ids = torch.arange(4) + 4 * (step % 2)
        loss(data[ids].clone().requires_grad_(), data[ids] + 0.01, ids=ids)
    ids = torch.arange(4)
    assert all(int((loss.bank_ids == i).sum()) == 2 for i in range(8))
    with torch.no_grad():
        masked = loss(data[ids], data[ids] + 0.01, ids=ids)
        rows = []
        for i in range(4):
            kept = loss.memory_bank.bank[loss.bank_ids != i]
            reference = NTXentLoss(0.2, memory_bank_size=(kept.shape[0], 8)).double()
            reference.memory_bank.bank = kept.clone()
            rows.append(reference(data[i:i + 1], data[i:i + 1] + 0.01))
    torch.testing.assert_close(masked, torch.stack(rows).mean(), atol=1e-10, rtol=1e-10)


# --- ids gathered with the keys under DDP (2 gloo processes) --------------------------------------

def _ddp_worker(rank, port, result_dir):
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)  # the same random initial bank on both ranks
        drop_in = SmoothNTXentLoss(0.2, memory_bank_size=(16, 8), gather_distributed=True, smoothing=0.2,
                                   neighbors=3, wait_for_full_bank=False)
        torch.manual_seed(0)
        reference = NTXentLoss(0.2, memory_bank_size=(16, 8), gather_distributed=True)
        losses = []
        for step in range(3):
            query, key = _embeddings(6, 8, seed=1000 + step)
            mine = slice(3 * rank, 3 * rank + 3)
            ids = torch.arange(6)[mine] + 6 * (step % 2)  # the same images every other step
            losses.append(drop_in(query[mine], key[mine], ids=ids).detach())
            reference(query[mine], key[mine])
        torch.save({"losses": losses, "bank": drop_in.memory_bank.bank, "bank_ids": drop_in.bank_ids,
                    "reference_bank": reference.memory_bank.bank}, os.path.join(result_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ids_are_gathered_with_the_keys_under_ddp(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]

    # One process holding both ranks' rows writes the same bank, ids and (per rank) losses.
    torch.manual_seed(0)
    single = SmoothNTXentLoss(0.2, memory_bank_size=(16, 8), smoothing=0.2, neighbors=3, wait_for_full_bank=False)
    for step in range(3):
        query, key = _embeddings(6, 8, seed=1000 + step)
        ids = torch.arange(6) + 6 * (step % 2)
        # score each rank's rows against the bank before the step (detached: no enqueue)
        expected = [single(query[3 * r:3 * r + 3].detach(), key[3 * r:3 * r + 3], ids=ids[3 * r:3 * r + 3])
                    for r in range(2)]
        single(query, key.detach(), ids=ids)  # the enqueue of the whole (gathered) batch
        for r in range(2):
            torch.testing.assert_close(ranks[r]["losses"][step], expected[r])
    for r in range(2):
        torch.testing.assert_close(ranks[r]["bank"], single.memory_bank.bank)
        torch.testing.assert_close(ranks[r]["bank"], ranks[r]["reference_bank"])
        assert torch.equal(ranks[r]["bank_ids"], single.bank_ids)
    assert single.bank_ids.tolist()[:12] == list(range(12)) and single.bank_ids.tolist()[12:] == [0, 1, 2, 3]


# --- issue 10: light-moco's symmetric loss, step by step against the authors' arithmetic ------------

def _authors_direction(query, key, queue, queue_ids, ids, temperature, alpha, k):
    """One direction as light-moco's code computes it, row by row: logits [q.k_pos, q.queue] / tau,
    cross-entropy against the target 1 - alpha on the positive and alpha spread over the k most
    similar queue entries (all of them for k None); queue entries of the row's own image (ids) are
    left out. Mean over the rows."""
    rows = []
    for i in range(query.shape[0]):
        negatives = [j for j in range(queue.shape[0]) if ids is None or int(queue_ids[j]) != int(ids[i])]
        positive = query[i] @ key[i]
        similarities = [query[i] @ queue[j] for j in negatives]
        logits = torch.stack([positive, *similarities]) / temperature
        log_p = logits - torch.logsumexp(logits, dim=0)
        loss = -(1 - alpha) * log_p[0]
        if alpha > 0:
            order = sorted(range(len(negatives)), key=lambda c: (-similarities[c].item(), c))  # ties: lower index
            chosen = order if k is None else order[:k]
            loss = loss - sum(alpha / len(chosen) * log_p[1 + c] for c in chosen)
        rows.append(loss)
    return torch.stack(rows).mean()


@pytest.mark.parametrize("combine,smoothing,neighbors,with_ids", [
    ("sum", 0.0, None, False), ("mean", 0.2, None, False), ("sum", 0.2, 3, False), ("mean", 0.1, 3, True),
])
def test_symmetric_equals_the_authors_loop_over_steps_with_the_enqueue(combine, smoothing, neighbors, with_ids):
    """float64, 6 steps of 2 x 4 keys into a 24-entry bank (it wraps twice): loss, query gradients,
    bank contents, ids and pointer as the authors' loop gives them."""
    tau, batch, dim, size = 0.1, 4, 8, 24
    torch.manual_seed(3)
    loss_fn = SmoothNTXentLoss(tau, memory_bank_size=(size, dim), smoothing=smoothing, neighbors=neighbors,
                               wait_for_full_bank=False).double()
    # lightly's random start is unit-norm in float32; make it unit-norm in float64 (the core
    # normalises the bank it reads, the authors' code does not)
    loss_fn.memory_bank.bank.copy_(torch.nn.functional.normalize(loss_fn.memory_bank.bank, dim=1))
    queue = loss_fn.memory_bank.bank.clone()  # the oracle's own queue, same start
    queue_ids = torch.full((size,), -1)
    ptr = 0
    generator = torch.Generator().manual_seed(4)
    for step in range(6):
        query0, key0, query1, key1 = (torch.randn(batch, dim, generator=generator, dtype=torch.float64)
                                      for _ in range(4))
        ids = torch.arange(batch) + batch * (step % 3) if with_ids else None
        q0, q1 = query0.clone().requires_grad_(), query1.clone().requires_grad_()
        got = loss_fn.symmetric(q0, key0, q1, key1, combine=combine, ids=ids)
        got_grads = torch.autograd.grad(got, (q0, q1))

        o0, o1 = query0.clone().requires_grad_(), query1.clone().requires_grad_()
        n = torch.nn.functional.normalize
        k0, k1 = n(key0, dim=1), n(key1, dim=1)
        args = (queue, queue_ids, ids, tau, smoothing, neighbors)
        expected = (_authors_direction(n(o0, dim=1), k1, *args)
                    + _authors_direction(n(o1, dim=1), k0, *args))
        expected = expected if combine == "sum" else expected / 2
        expected_grads = torch.autograd.grad(expected, (o0, o1))
        torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)
        for g, e in zip(got_grads, expected_grads):
            torch.testing.assert_close(g, e, atol=1e-10, rtol=1e-10)

        for keys in (k0, k1):  # then the authors enqueue key0 and key1 (K is a multiple of 2B)
            queue[ptr:ptr + batch] = keys
            queue_ids[ptr:ptr + batch] = -1 if ids is None else ids
            ptr = (ptr + batch) % size
        torch.testing.assert_close(loss_fn.memory_bank.bank, queue, atol=1e-12, rtol=0)
        assert torch.equal(loss_fn.bank_ids, queue_ids) and int(loss_fn.memory_bank.bank_ptr) == ptr
    assert int(loss_fn.bank_enqueued) == 6 * 2 * batch


def test_symmetric_differs_from_two_calls_and_needs_a_bank():
    torch.manual_seed(5)
    query0, key0, query1, key1 = (torch.randn(4, 8) for _ in range(4))
    one = SmoothNTXentLoss(0.2, memory_bank_size=(16, 8))
    torch.manual_seed(0)
    two = SmoothNTXentLoss(0.2, memory_bank_size=(16, 8))
    two.memory_bank.bank.copy_(one.memory_bank.bank)
    symmetric = one.symmetric(query0.requires_grad_(), key0, query1.requires_grad_(), key1, combine="sum")
    calls = two(query0, key1) + two(query1, key0)  # the second call already sees key1 in the bank
    assert not torch.allclose(symmetric, calls)
    with pytest.raises(ValueError, match="combine"):
        one.symmetric(query0, key0, query1, key1, combine="max")
    with pytest.raises(ValueError, match="memory bank"):
        SmoothNTXentLoss(0.2).symmetric(query0, key0, query1, key1)


# --- the fused kernel behind the drop-in ----------------------------------------------------------

@pytest.mark.parametrize("with_ids", [False, True])
def test_triton_backend_equals_the_reference_mixed_dtypes_and_symmetric(with_ids):
    """bfloat16 queries and keys against the float32 bank, the symmetric form (and own-image
    masking): the Triton kernel (the interpreter on a CPU-only machine) gives the reference's values."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = {}
    for backend in ("reference", "triton"):
        torch.manual_seed(0)
        loss = SmoothNTXentLoss(0.1, memory_bank_size=(32, 16), smoothing=0.2, neighbors=3, wait_for_full_bank=False,
                                backend=backend).to(device)
        loss.bank_ids.copy_(torch.arange(32) % 12)
        generator = torch.Generator().manual_seed(1)
        query = torch.randn(6, 16, generator=generator).bfloat16().to(device).requires_grad_()
        key = torch.randn(6, 16, generator=generator).bfloat16().to(device)
        ids = torch.arange(6, device=device) if with_ids else None
        value = loss(query, key, ids=ids)
        (grad,) = torch.autograd.grad(value, query)
        symmetric = loss.symmetric(query, key, query * 1, key.flip(0), combine="sum", ids=ids)
        assert loss.memory_bank.bank.dtype == torch.float32
        results[backend] = (value.detach(), grad.float(), symmetric.detach(), loss.memory_bank.bank, loss.bank_ids)
    for got, expected in zip(results["triton"], results["reference"]):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


# --- issue 18: the bank is checked once, on the way in, not on every call -------------------------

def _old_path_call(loss_fn, bank, bank_ids, query, key, more, *, ids=None, weights=None):
    """What the drop-in computed before issue 18: the core's MoCo form with the bank as a given
    queue, checked for finite values and normalised on every call."""
    from smooth_infonce.views import multi_view_loss

    return multi_view_loss((query, torch.nn.functional.normalize(key, dim=1), *more), loss_fn.options,
                           smoothing=loss_fn.effective_smoothing, queue=bank, ids=ids,
                           queue_ids=None if ids is None else bank_ids, weights=weights)


def _old_path_symmetric(loss_fn, bank, bank_ids, query0, key0, query1, key1, *, combine, ids=None):
    from smooth_infonce.views import symmetric_moco_loss

    n = torch.nn.functional.normalize
    return symmetric_moco_loss(query0, n(key0, dim=1), query1, n(key1, dim=1), bank, loss_fn.options,
                               combine=combine, smoothing=loss_fn.effective_smoothing, ids=ids,
                               queue_ids=None if ids is None else bank_ids)


def _spy_bank_work(monkeypatch, seen=None):
    """Record the row counts of what the core normalises and of what it checks for finite values."""
    from smooth_infonce import functional, views

    seen = {"normalized": [], "checked": []} if seen is None else seen
    normalize, check_finite = functional._l2_normalize, views.check_finite

    def spy_normalize(x):
        seen["normalized"].append(x.shape[0])
        return normalize(x)

    def spy_check_finite(**named):
        seen["checked"] += [x.shape[0] for x in named.values() if x is not None]
        return check_finite(**named)

    monkeypatch.setattr(functional, "_l2_normalize", spy_normalize)
    monkeypatch.setattr(views, "check_finite", spy_check_finite)
    return seen


@pytest.mark.parametrize("smoothing,neighbors,with_ids", [(0.0, None, False), (0.2, None, True), (0.2, 3, False),
                                                          (0.1, 3, True)])
def test_bank_checked_once_gives_the_previous_losses_and_gradients_float64(monkeypatch, smoothing, neighbors,
                                                                           with_ids):
    """float64, steps that wrap a 40-entry bank: forward, multi-query with weights and symmetric,
    loss and gradients (queries and keys) equal to the previous behaviour (the bank checked and
    normalised on every call) at 1e-12, while the core neither checks nor normalises the bank after
    the first call; the bank gets no gradient."""
    size, dim, batch = 40, 8, 6
    torch.manual_seed(7)
    loss_fn = SmoothNTXentLoss(0.1, memory_bank_size=(size, dim), smoothing=smoothing, neighbors=neighbors,
                               wait_for_full_bank=False).double()
    generator = torch.Generator().manual_seed(8)
    loss_fn.memory_bank.bank = torch.nn.functional.normalize(  # assigned: checked once at the next call
        torch.randn(size, dim, generator=generator, dtype=torch.float64), dim=1)
    seen = _spy_bank_work(monkeypatch)
    for step in range(6):
        views = [torch.randn(batch, dim, generator=generator, dtype=torch.float64) for _ in range(4)]
        ids = torch.arange(batch) + batch * (step % 4) if with_ids else None
        bank, bank_ids = loss_fn.memory_bank.bank.clone(), loss_fn.bank_ids.clone()
        got_leaves = [v.clone().requires_grad_() for v in views]
        old_leaves = [v.clone().requires_grad_() for v in views]
        if step % 3 == 0:
            got = loss_fn(got_leaves[0], got_leaves[1], ids=ids)
            monkeypatch.undo()  # the oracle's own work is not counted
            expected = _old_path_call(loss_fn, bank, bank_ids, old_leaves[0], old_leaves[1], (), ids=ids)
        elif step % 3 == 1:
            got = loss_fn(*got_leaves, ids=ids, weights=(0.5, 0.3, 0.2))
            monkeypatch.undo()
            expected = _old_path_call(loss_fn, bank, bank_ids, old_leaves[0], old_leaves[1], old_leaves[2:],
                                      ids=ids, weights=(0.5, 0.3, 0.2))
        else:
            got = loss_fn.symmetric(*got_leaves, combine="sum", ids=ids)
            monkeypatch.undo()
            expected = _old_path_symmetric(loss_fn, bank, bank_ids, *old_leaves, combine="sum", ids=ids)
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)
        for g, e in zip(torch.autograd.grad(got, got_leaves, allow_unused=True),
                        torch.autograd.grad(expected, old_leaves, allow_unused=True)):
            assert (g is None) == (e is None)
            if g is not None:
                torch.testing.assert_close(g, e, atol=1e-12, rtol=1e-12)
        assert loss_fn.memory_bank.bank.grad is None and not loss_fn.memory_bank.bank.requires_grad
        seen = _spy_bank_work(monkeypatch, seen)
    # the core checked the bank (40 rows) once, at the first call after the assignment, and never
    # normalised it (its rows were looked at once: unit already); it normalised only the queries
    # and keys (6 or 12 rows)
    assert seen["checked"].count(size) == 1 and size not in seen["normalized"]
    assert len(seen["normalized"]) >= 12
    assert int(loss_fn.bank_enqueued) > size  # the bank wrapped


def test_float32_bank_is_not_normalised_or_checked_per_call_and_matches_lightly(monkeypatch):
    """The default float32 bank (lightly's random start, assessed at construction): no per-call
    work on the K rows, lightly's loss and bank at alpha 0."""
    reference, drop_in = _pair_with_same_bank(0.2, (64, 8), smoothing=0.0)
    seen = _spy_bank_work(monkeypatch)
    for step in range(5):
        out0, out1 = _embeddings(16, 8, seed=30 + step)
        torch.testing.assert_close(drop_in(out0, out1), reference(out0, out1), atol=ATOL, rtol=1e-5)
        assert torch.equal(drop_in.memory_bank.bank, reference.memory_bank.bank)
    assert 64 not in seen["checked"] and 64 not in seen["normalized"]


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_non_finite_key_is_caught_before_it_enters_the_bank(bad):
    loss_fn = SmoothNTXentLoss(0.2, memory_bank_size=(32, 8))
    bank = loss_fn.memory_bank.bank.clone()
    query, key = _embeddings(8, 8, seed=40)
    key = key.detach().clone()
    key[5, 2] = bad
    with pytest.raises(ValueError, match=r"out1 has non-finite values .* first at row 5"):
        loss_fn(query, key)
    with pytest.raises(ValueError, match=r"out1 has non-finite values"):
        loss_fn.symmetric(query, key, query, key.flip(0))
    assert torch.equal(loss_fn.memory_bank.bank, bank) and int(loss_fn.bank_enqueued) == 0
    # unchecked (validate=False) it enters; the next checked call finds it in the bank
    loss_fn.validate = False
    loss_fn(query, key)
    loss_fn.validate = True
    with pytest.raises(ValueError, match=r"queue has non-finite values .* first at row 5"):
        loss_fn(*_embeddings(8, 8, seed=41))


def test_a_non_finite_restored_assigned_or_edited_bank_is_caught():
    query, key = _embeddings(8, 8, seed=42)
    trained = SmoothNTXentLoss(0.2, memory_bank_size=(32, 8), persistent_bank=True)
    trained(query, key)
    state = trained.state_dict()
    state["memory_bank.bank"] = state["memory_bank.bank"].clone()
    state["memory_bank.bank"][20, 1] = math.nan
    resumed = SmoothNTXentLoss(0.2, memory_bank_size=(32, 8), persistent_bank=True)
    resumed(query, key)  # checked once, and known finite since
    resumed.load_state_dict(state)  # copied into the bank in place: checked again
    with pytest.raises(ValueError, match=r"queue has non-finite values .* first at row 20"):
        resumed(query, key)
    with pytest.raises(ValueError, match=r"queue has non-finite values .* first at row 20"):
        resumed.symmetric(query, key, query, key)

    loss_fn = SmoothNTXentLoss(0.2, memory_bank_size=(32, 8))
    loss_fn(query, key)
    loss_fn.memory_bank.bank = torch.full((32, 8), math.inf)  # assigned
    with pytest.raises(ValueError, match=r"queue has non-finite values .* 32 row\(s\)"):
        loss_fn(query, key)
    loss_fn.memory_bank.bank = torch.randn(32, 8)
    loss_fn(query, key)
    loss_fn.memory_bank.bank[3, 0] = -math.inf  # edited in place
    with pytest.raises(ValueError, match=r"queue has non-finite values .* first at row 3"):
        loss_fn(query, key)
    # a copy (deepcopy, pickle) does not inherit what was known about the original's bank
    loss_fn.memory_bank.bank = torch.randn(32, 8)
    loss_fn(query, key)
    copied = copy.deepcopy(loss_fn)
    assert copied._bank_state is None
    copied.memory_bank.bank.data[7, 7] = math.nan  # .data: no version change
    with pytest.raises(ValueError, match=r"queue has non-finite values .* first at row 7"):
        copied(query, key)


def test_a_bank_that_is_not_unit_is_normalised_by_every_call_as_before():
    """An assigned bank of rows of norm 3 (or a float32 bank cast to float64, unit only to float32
    rounding) is not taken as unit: the loss normalises it, as the core does a given queue."""
    torch.manual_seed(9)
    loss_fn = SmoothNTXentLoss(0.2, memory_bank_size=(32, 8), smoothing=0.1, neighbors=3, wait_for_full_bank=False)
    loss_fn.memory_bank.bank = 3 * torch.nn.functional.normalize(torch.randn(32, 8), dim=1)
    for step in range(3):
        query, key = _embeddings(8, 8, seed=50 + step)
        bank = loss_fn.memory_bank.bank.clone()
        torch.testing.assert_close(loss_fn(query, key), _old_path_call(loss_fn, bank, None, query, key, ()),
                                   atol=0, rtol=0)
    assert loss_fn._bank_state.unit is False
    cast = SmoothNTXentLoss(0.2, memory_bank_size=(32, 8)).double()
    cast(*(x.double() for x in _embeddings(8, 8, seed=53)))
    assert cast._bank_state.unit is False


def test_half_precision_keys_are_stored_as_unit_rows_of_the_bank():
    """bf16 keys normalised in bf16 are unit rows only to bf16 rounding: the fp32 bank stores them
    normalised in fp32 (what the loss normalised them to before), so the bank stays unit."""
    torch.manual_seed(0)
    loss_fn = SmoothNTXentLoss(0.05, memory_bank_size=(32, 16))
    query = torch.randn(8, 16).bfloat16().requires_grad_()
    key = torch.randn(8, 16).bfloat16()
    loss_fn(query, key)
    stored = loss_fn.memory_bank.bank[:8]
    expected = torch.nn.functional.normalize(torch.nn.functional.normalize(key, dim=1).float(), dim=1)
    assert torch.equal(stored, expected)
    assert loss_fn._bank_state.unit is True
