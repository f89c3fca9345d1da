"""lightly models, heads, transforms and losses built from the presets (`integrations.lightly.models`,
`lightly.build_loss`), training with the drop-in on real digits."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from smooth_infonce.integrations.data.digits import digit_images
from smooth_infonce.integrations.lightly import SmoothNTXentLoss, build_loss
from smooth_infonce.integrations.lightly.models import (
    MoCoModel,
    SimCLRModel,
    build_model,
    build_view_transform,
    encode_views,
)
from smooth_infonce.integrations.recipes import CropSpec, ViewSpec, get_preset
from smooth_infonce.integrations.recipes.backbones import build_backbone

# --- lightly models training with the drop-in on real images ----------------------------------

DIGIT_VIEWS = ViewSpec(global_crops=CropSpec(2, 16, (0.5, 1.0)), hflip_prob=0.0, color_jitter=(0.4, 0.4, 0.0, 0.0),
                       grayscale_prob=0.0, blur_prob=0.0, mean=(0.5,) * 3, std=(0.5,) * 3)


def _fixed_views(images, transform):
    views = [transform(image) for image in images]
    return [torch.stack([v[i] for v in views]) for i in range(len(views[0]))]


def test_lightly_simclr_trains_with_the_drop_in_on_digits():
    torch.manual_seed(0)
    images, _ = digit_images(64)
    views = _fixed_views(images, build_view_transform(DIGIT_VIEWS))
    model = SimCLRModel(build_backbone("tiny_cnn", width=8), hidden_dim=64, output_dim=32)
    criterion = SmoothNTXentLoss(temperature=0.2, smoothing=0.1, neighbors=5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(15):
        loss = model.training_loss(views, criterion)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.3, losses


def test_lightly_moco_trains_with_the_drop_in_on_digits():
    """Two disjoint batches alternate and the queue holds exactly one batch of keys, so a query
    never meets its own image's old key among the negatives."""
    torch.manual_seed(0)
    transform = build_view_transform(DIGIT_VIEWS)
    batches = [_fixed_views(digit_images(48, offset=48 * b)[0], transform) for b in range(2)]
    model = MoCoModel(build_backbone("tiny_cnn", width=8), hidden_dim=64, output_dim=32, key_momentum=0.9)
    criterion = SmoothNTXentLoss(temperature=0.2, memory_bank_size=(48, 32), smoothing=0.1, neighbors=5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for step in range(30):
        model.update_key_encoder()
        loss = model.training_loss(batches[step % 2], criterion)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert bool(criterion.bank_filled) and criterion.effective_smoothing == pytest.approx(0.1)
    early, late = sum(losses[2:6]) / 4, sum(losses[-4:]) / 4  # steps 0-1 use the random bank
    assert late < early - 0.3, losses
    # the key encoder follows the query encoder, without gradients
    assert all(not p.requires_grad for p in model.backbone_momentum.parameters())


def test_sslight_multi_crop_step_on_digits():
    """Two global and two local crops from lightly's transforms; key = global 1, three queries."""
    torch.manual_seed(0)
    views_spec = dataclasses.replace(DIGIT_VIEWS, local_crops=CropSpec(2, 8, (0.05, 0.3)), loss_weights=(0.4, 0.6))
    images, _ = digit_images(16)
    views = _fixed_views(images, build_view_transform(views_spec))
    assert [tuple(v.shape[-2:]) for v in views] == [(16, 16)] * 2 + [(8, 8)] * 2
    model = MoCoModel(build_backbone("tiny_cnn", width=8), hidden_dim=32, output_dim=16)
    criterion = SmoothNTXentLoss(0.2, memory_bank_size=(64, 16), smoothing=0.1, neighbors=2)
    model.update_key_encoder()
    loss = model.training_loss(views, criterion, weights=views_spec.query_weights())
    loss.backward()
    assert torch.isfinite(loss)
    assert int(criterion.memory_bank.bank_ptr) == 16
    assert model.backbone.net[0][0].weight.grad is not None


def test_encode_views_runs_once_per_resolution_group():
    calls = []

    class Recorder(torch.nn.Module):
        def forward(self, x):
            calls.append(tuple(x.shape))
            return x.flatten(1)[:, :4]

    views = [torch.randn(3, 3, 8, 8)] * 2 + [torch.randn(3, 3, 4, 4)] * 3
    outputs = encode_views(Recorder(), views)
    assert calls == [(6, 3, 8, 8), (9, 3, 4, 4)]
    assert [tuple(o.shape) for o in outputs] == [(3, 4)] * 5


def test_lightly_moco_with_sample_ids_and_a_bank_larger_than_the_data():
    """48 digits, a 96-key bank: every query's own two earlier keys sit in the bank. With the
    dataset indices as ids they are left out of its negatives (fewer, and more similar than most,
    negatives: the loss is lower than with them counted)."""
    torch.manual_seed(0)
    transform = build_view_transform(DIGIT_VIEWS)
    images, _ = digit_images(48)
    batches = [(_fixed_views(images[24 * b:24 * b + 24], transform), torch.arange(24) + 24 * b) for b in range(2)]
    model = MoCoModel(build_backbone("tiny_cnn", width=8), hidden_dim=64, output_dim=32, key_momentum=0.9)
    criterion = SmoothNTXentLoss(temperature=0.2, memory_bank_size=(96, 32), smoothing=0.1, neighbors=5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for step in range(12):
        views, ids = batches[step % 2]
        model.update_key_encoder()
        loss = model.training_loss(views, criterion, ids=ids)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss)
    assert sorted(criterion.bank_ids.tolist()) == sorted(list(range(48)) * 2)
    views, ids = batches[0]
    with torch.no_grad():  # no enqueue: both calls read the same bank
        masked = model.training_loss(views, criterion, ids=ids)
        unmasked = model.training_loss(views, criterion)
    assert masked < unmasked, (float(masked), float(unmasked))


def test_symmetric_training_step_enqueues_both_keys():
    torch.manual_seed(0)
    images, _ = digit_images(16)
    views = _fixed_views(images, build_view_transform(DIGIT_VIEWS))
    model = MoCoModel(build_backbone("tiny_cnn", width=8), hidden_dim=32, output_dim=16)
    criterion = SmoothNTXentLoss(0.1, memory_bank_size=(64, 16), smoothing=0.1, neighbors=3)
    model.update_key_encoder()
    loss = model.symmetric_training_loss(views, criterion, combine="sum", ids=torch.arange(16))
    loss.backward()
    assert torch.isfinite(loss) and int(criterion.memory_bank.bank_ptr) == 32
    assert criterion.bank_ids[:32].tolist() == list(range(16)) * 2
    assert model.backbone.net[0][0].weight.grad is not None
    assert all(p.grad is None for p in model.backbone_momentum.parameters())
    with pytest.raises(ValueError, match="exactly 2 views"):
        model.symmetric_training_loss(views + views[:1], criterion)


# --- presets -> lightly models, losses and transforms ------------------------------------------------

@pytest.mark.parametrize("preset,backbone", [("light_moco", "mobilenetv3_large_100"),
                                             ("light_moco", "efficientnet_b0"),
                                             ("sslight_moco", "mobilenet_v2"),
                                             ("sslight_moco", "resnet18")])
def test_preset_builds_a_lightly_model_whose_head_fits(preset, backbone):
    from smooth_infonce.integrations.lightly import build_loss
    from smooth_infonce.integrations.lightly.models import MoCoModel, build_model

    recipe = get_preset(preset, backbone__name=backbone, moco__queue_size=256)
    model = build_model(recipe).eval()
    assert isinstance(model, MoCoModel)
    with torch.no_grad():
        projections = model(torch.randn(2, 3, 64, 64))
    assert projections.shape == (2, recipe.head.output_dim)
    criterion = build_loss(recipe)
    assert tuple(criterion.memory_bank.size) == (256, 128)
    assert criterion.temperature == recipe.loss.temperature


def test_build_loss_carries_the_schedule_and_the_neighbours():
    from smooth_infonce.integrations.lightly import build_loss

    criterion = build_loss(get_preset("light_moco", moco__queue_size=1024))
    assert criterion.neighbors == 10
    assert [criterion.set_epoch(e) for e in (0, 2, 3, 50)] == [0.0, 0.0, 0.1, 0.1]
    simclr = build_loss(get_preset("light_moco", framework="simclr", loss__mode="uniform"))
    assert not simclr.has_memory_bank and simclr.neighbors is None


def test_sslight_view_transform_on_a_real_photo():
    from PIL import Image
    from sklearn.datasets import load_sample_image

    from smooth_infonce.integrations.lightly.models import build_view_transform

    photo = Image.fromarray(load_sample_image("china.jpg"))
    views = build_view_transform(get_preset("sslight_moco").views)(photo)
    assert [tuple(v.shape) for v in views] == [(3, 224, 224)] * 2 + [(3, 128, 128)] * 6
    assert not torch.equal(views[2], views[3])
    baseline = build_view_transform(get_preset("sslight_baseline").views)(photo)
    assert [tuple(v.shape[-2:]) for v in baseline] == [(224, 224)] * 2 + [(96, 96)] * 6


def test_a_symmetric_preset_trains_with_the_symmetric_loss():
    recipe = get_preset("light_moco", backbone__name="tiny_cnn", backbone__kwargs={"width": 8},
                        head__hidden_dim=32, head__output_dim=16, moco__queue_size=64, moco__symmetric="sum")
    images, _ = digit_images(8)
    views = _fixed_views(images, build_view_transform(DIGIT_VIEWS))
    losses = []
    for symmetric_call in (False, True):
        torch.manual_seed(0)
        model, criterion = build_model(recipe), build_loss(recipe)
        assert model.symmetric == "sum"
        model.update_key_encoder()
        if symmetric_call:
            losses.append(model.symmetric_training_loss(views, criterion, combine="sum", ids=torch.arange(8)))
        else:
            losses.append(model.training_loss(views, criterion, recipe.view_weights(), ids=torch.arange(8)))
        assert int(criterion.memory_bank.bank_ptr) == 16  # both keys enqueued
    torch.testing.assert_close(losses[0], losses[1])
    with pytest.raises(ValueError, match="two views"):
        get_preset("sslight_moco", moco__symmetric="sum")
    with pytest.raises(ValueError, match="symmetric"):
        get_preset("light_moco", moco__symmetric="both")


# --- DINO and SwAV models (SSLight's recipe through lightly's pieces) --------------------------------

def _small(preset, **overrides):
    return get_preset(preset, backbone__name="tiny_cnn", backbone__kwargs={"width": 4}, head__hidden_dim=16,
                      head__output_dim=8, dino__num_prototypes=12, swav__num_prototypes=10, **overrides)


def _views(batch=4, num_local=2):
    return [torch.randn(batch, 3, 16, 16), torch.randn(batch, 3, 16, 16)] + [torch.randn(batch, 3, 8, 8)] * num_local


def test_build_model_and_loss_for_dino():
    from lightly.loss import DINOLoss

    from smooth_infonce.integrations.lightly.models import DINOModel
    from smooth_infonce.integrations.lightly.multicrop import SSLightDINOLoss

    recipe = _small("sslight_dino")
    model, criterion = build_model(recipe), build_loss(recipe)
    assert isinstance(model, DINOModel) and isinstance(criterion, SSLightDINOLoss) and isinstance(criterion, DINOLoss)
    assert criterion.loss_weights == (0.4, 0.6) and criterion.center.shape == (1, 1, 12)
    assert float(criterion.teacher_temperature(epoch=49)) == pytest.approx(0.07)
    assert not any(p.requires_grad for p in model.teacher_backbone.parameters())
    assert not any(p.requires_grad for p in model.teacher_head.parameters())
    for (name, student), teacher in zip(model.head.state_dict().items(), model.teacher_head.state_dict().values()):
        assert torch.equal(student, teacher), name  # the teacher starts as the student
    with pytest.raises(TypeError):  # smoothed-InfoNCE options do not apply to DINO
        build_loss(recipe, backend="reference")

    loss = model.training_loss(_views(), criterion, epoch=0)
    loss.backward()
    model.cancel_last_layer_gradients(epoch=1)  # past the frozen epoch: kept
    assert model.head.last_layer.weight_v.grad is not None
    model.cancel_last_layer_gradients(epoch=0)
    assert all(p.grad is None for p in model.head.last_layer.parameters())
    assert all(p.grad is None for p in model.teacher_backbone.parameters())
    with torch.no_grad():
        next(model.backbone.parameters()).add_(1.0)
    model.update_teacher(0.0)  # momentum 0: the teacher becomes the student
    assert torch.equal(next(model.backbone.parameters()), next(model.teacher_backbone.parameters()))


def test_swav_model_queue_is_fifo_checkpointed_and_used_once_full():
    from smooth_infonce.integrations.lightly.models import SwAVModel
    from smooth_infonce.integrations.lightly.multicrop import SSLightSwaVLoss

    recipe = _small("sslight_swav", swav__queue_start_epoch=1)
    model, criterion = build_model(recipe), build_loss(recipe)
    assert isinstance(model, SwAVModel) and isinstance(criterion, SSLightSwaVLoss)
    assert model.prototypes.heads[0].bias is None  # SwAV's prototypes have no bias
    model.set_queue_length(8)
    assert tuple(model.queue.shape) == (2, 8, 8) and not model.queue_active(0) and model.queue_active(1)

    model.training_loss(_views(), criterion, epoch=0)
    assert int(model.queue_filled) == 0  # not filled before queue_start_epoch
    model.training_loss(_views(), criterion, epoch=1)
    assert int(model.queue_filled) == 4 and not model.queue_in_use(1)
    older = model.queue[:, :4].clone()
    newest = [torch.nn.functional.normalize(torch.randn(4, 8), dim=1) for _ in range(2)]
    model.enqueue(newest)
    assert int(model.queue_filled) == 8 and model.queue_in_use(1)
    torch.testing.assert_close(model.queue[:, :4], torch.stack(newest))  # newest first
    torch.testing.assert_close(model.queue[:, 4:], older)  # the older rows moved back
    model.enqueue(newest)
    assert int(model.queue_filled) == 8  # capped at the length; the oldest fell off
    torch.testing.assert_close(model.queue[:, 4:], torch.stack(newest))

    norms = model.prototypes.heads[0].weight.norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms))  # normalised at the step's start

    restored = build_model(recipe)  # an empty queue takes the saved length when loading
    restored.load_state_dict(model.state_dict())
    assert torch.equal(restored.queue, model.queue) and int(restored.queue_filled) == 8
    restored.set_queue_length(8)  # the run's length: kept
    assert int(restored.queue_filled) == 8
    restored.set_queue_length(16)  # another length: starts empty
    assert int(restored.queue_filled) == 0 and restored.queue.shape[1] == 16

    loss = model.training_loss(_views(), criterion, epoch=1)
    loss.backward()
    model.cancel_prototype_gradients(epoch=0)
    assert all(p.grad is None for p in model.prototypes.parameters())
