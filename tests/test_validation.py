"""Bad input gets a clear exception naming the argument and the expectation."""

import math

import pytest
import torch

from smooth_infonce import SmoothInfoNCELoss, smooth_infonce

x = torch.randn(4, 8)
y = torch.randn(4, 8)


@pytest.mark.parametrize("temperature,match", [
    (0.0, "temperature must be finite and > 0"), (-1.0, "temperature"), (math.inf, "temperature"),
    (math.nan, "temperature"), ("0.1", "temperature must be a real number"),
])
def test_bad_temperature(temperature, match):
    with pytest.raises((ValueError, TypeError), match=match):
        SmoothInfoNCELoss(temperature)
    with pytest.raises((ValueError, TypeError), match=match):
        smooth_infonce(x, ids=torch.arange(4), temperature=temperature)


@pytest.mark.parametrize("smoothing", [-0.1, 1.0, 1.5, math.nan])
def test_bad_smoothing(smoothing):
    with pytest.raises(ValueError, match=r"smoothing must be in \[0, 1\)"):
        SmoothInfoNCELoss(0.1, smoothing)


@pytest.mark.parametrize("neighbors,error", [(0, ValueError), (-2, ValueError), (2.0, TypeError), (True, TypeError)])
def test_bad_neighbors(neighbors, error):
    with pytest.raises(error, match="neighbors"):
        SmoothInfoNCELoss(0.1, 0.1, neighbors)


def test_neighbors_larger_than_negatives():
    # 2 views of 4 images: each row has 8 - 1 (self) - 1 (positive) = 6 negatives
    SmoothInfoNCELoss(0.1, 0.1, 6)(x, y)
    with pytest.raises(ValueError, match="neighbors=7 is larger than the 6 negatives"):
        SmoothInfoNCELoss(0.1, 0.1, 7)(x, y)
    with pytest.raises(ValueError, match="neighbors=11 is larger than the 10 negatives"):
        SmoothInfoNCELoss(0.1, 0.1, 11)(x, y, queue=torch.randn(10, 8))


def test_shapes():
    with pytest.raises(ValueError, match=r"out1 must have 4 rows"):
        SmoothInfoNCELoss()(x, torch.randn(3, 8))
    with pytest.raises(ValueError, match=r"out1 must have embedding width 8"):
        SmoothInfoNCELoss()(x, torch.randn(4, 7))
    with pytest.raises(ValueError, match=r"out0 must be 2-D"):
        SmoothInfoNCELoss()(torch.randn(4, 8, 1), y)
    with pytest.raises(ValueError, match=r"queue must have embedding width 8"):
        SmoothInfoNCELoss()(x, y, queue=torch.randn(10, 4))
    with pytest.raises(ValueError, match=r"positive_keys must have 4 rows"):
        smooth_infonce(x, torch.randn(10, 8), positive_keys=torch.randn(3, 8))
    with pytest.raises(ValueError, match=r"ids must have shape \(4,\)"):
        smooth_infonce(x, ids=torch.arange(5))
    with pytest.raises(ValueError, match=r"weights must have shape \(8,\)"):
        SmoothInfoNCELoss()(x, y, weights=torch.ones(4))
    with pytest.raises(ValueError, match=r"one value per anchor view \(2\)"):
        SmoothInfoNCELoss()(x, y, weights=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match=r"labels must have shape \(4,\)"):
        SmoothInfoNCELoss()(x, y, labels=torch.arange(3))


def test_empty_batch_and_no_negatives():
    with pytest.raises(ValueError, match="out0 is an empty batch"):
        SmoothInfoNCELoss()(torch.randn(0, 8), torch.randn(0, 8))
    with pytest.raises(ValueError, match="no negatives"):
        SmoothInfoNCELoss()(torch.randn(1, 8), torch.randn(1, 8))
    with pytest.raises(ValueError, match="no positive"):
        smooth_infonce(x, ids=torch.tensor([0, 1, 1, 2]))


def test_dtypes_and_devices():
    with pytest.raises(TypeError, match="out0 must be a floating-point tensor"):
        SmoothInfoNCELoss()(torch.ones(4, 8, dtype=torch.long), y)
    with pytest.raises(TypeError, match="ids must be an integer tensor"):
        smooth_infonce(x, ids=torch.zeros(4))
    with pytest.raises(ValueError, match="ids must be >= 0"):
        smooth_infonce(x, ids=torch.tensor([0, 0, -1, -1]))
    with pytest.raises(ValueError, match="one device"):
        smooth_infonce(x, torch.randn(4, 8, device="meta"))
    with pytest.raises(ValueError, match="out0 on cpu, out1 on meta"):
        SmoothInfoNCELoss()(x, y.to("meta"))
    with pytest.raises(ValueError, match="queue on meta"):
        SmoothInfoNCELoss()(x, y, queue=torch.randn(5, 8, device="meta"))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_embeddings_say_where(bad):
    poisoned = y.clone()
    poisoned[2, 5] = bad
    with pytest.raises(ValueError, match=r"out1 has non-finite values \(NaN or inf\) in 1 row\(s\), first at row 2"):
        SmoothInfoNCELoss()(x, poisoned)
    with pytest.raises(ValueError, match=r"queue has non-finite values .* first at row 2"):
        SmoothInfoNCELoss()(x, y, queue=poisoned)
    with pytest.raises(ValueError, match=r"candidates has non-finite values .* first at row 2"):
        smooth_infonce(x, poisoned)


def test_layout_misuse():
    with pytest.raises(ValueError, match="needs ids"):
        smooth_infonce(x)
    with pytest.raises(ValueError, match="positive_keys .* needs candidates"):
        smooth_infonce(x, positive_keys=y)
    # MoCo takes sample ids for both sides (own-image queue entries are excluded), never half of them
    with pytest.raises(ValueError, match="both ids and candidate_ids"):
        smooth_infonce(x, y, positive_keys=y, ids=torch.arange(4))
    with pytest.raises(ValueError, match="both ids and candidate_ids"):
        smooth_infonce(x, y, ids=torch.arange(4))
    with pytest.raises(ValueError, match="symmetric applies to the two-tower layout"):
        smooth_infonce(x, ids=torch.arange(2).repeat(2), symmetric="mean")
    with pytest.raises(ValueError, match="symmetric must be one of"):
        smooth_infonce(x, y, symmetric="max")
    with pytest.raises(ValueError, match="reduction must be one of"):
        SmoothInfoNCELoss(reduction="avg")
    with pytest.raises(ValueError, match="backend must be one of"):
        SmoothInfoNCELoss(backend="cuda")
    with pytest.raises(ValueError, match="weights must be >= 0"):
        SmoothInfoNCELoss()(x, y, weights=torch.tensor([1.0] * 7 + [-1.0]))
    with pytest.raises(ValueError, match="weights must not all be zero"):
        SmoothInfoNCELoss()(x, y, weights=torch.zeros(8))
    with pytest.raises(ValueError, match="labels are not supported with a queue"):
        SmoothInfoNCELoss()(x, y, queue=torch.randn(5, 8), labels=torch.arange(4))


def test_validate_false_skips_value_checks_only():
    poisoned = y.clone()
    poisoned[0, 0] = math.nan
    assert torch.isnan(SmoothInfoNCELoss(validate=False)(x, poisoned))
    with pytest.raises(ValueError, match="out1 must have 4 rows"):
        SmoothInfoNCELoss(validate=False)(x, torch.randn(3, 8))


def test_a_given_queue_is_checked_and_normalised_on_every_call():
    """Only a caller that knows its queue (the lightly drop-in's bank, checked on its way in) may
    skip its check or normalisation; every public form checks and normalises the queue it is given."""
    from smooth_infonce.options import LossOptions
    from smooth_infonce.views import multi_view_loss

    poisoned = y.clone()
    poisoned[1, 3] = math.nan
    with pytest.raises(ValueError, match=r"queue has non-finite values .* first at row 1"):
        multi_view_loss((x, y), LossOptions(), queue=poisoned)
    with pytest.raises(ValueError, match=r"candidates has non-finite values .* first at row 1"):
        smooth_infonce(x, poisoned, positive_keys=y)
    assert torch.isnan(multi_view_loss((x, y), LossOptions(), queue=poisoned, queue_finite=True))
    with pytest.raises(ValueError, match=r"out1 has non-finite values"):  # the views are still checked
        multi_view_loss((x, poisoned), LossOptions(), queue=y, queue_finite=True)
    # a queue of rows of norm 2: normalised unless the caller says its rows are unit already
    queue = 2 * torch.nn.functional.normalize(torch.randn(6, 8, dtype=torch.float64), dim=1)
    a, k = x.double(), y.double()
    given = multi_view_loss((a, k), LossOptions(), queue=queue)
    torch.testing.assert_close(given, smooth_infonce(a, queue, positive_keys=k), rtol=0, atol=0)
    torch.testing.assert_close(given, multi_view_loss((a, k), LossOptions(), queue=queue / 2, queue_normalized=True),
                               rtol=1e-12, atol=1e-12)
    assert not torch.allclose(given, multi_view_loss((a, k), LossOptions(), queue=queue, queue_normalized=True))
