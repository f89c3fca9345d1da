"""Presets, backbones (real timm / torchvision, no download), parameter groups, LARS, lr schedule,
view sampling built from lightly's transforms."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from smooth_infonce.integrations.backbones import build_backbone, list_backbones, measure_output_width
from smooth_infonce.integrations.optim import LARS, build_optimizer, is_depthwise_conv, parameter_groups
from smooth_infonce.integrations.recipes import (
    CropSpec,
    LossSpec,
    OptimizerSpec,
    Recipe,
    ViewSpec,
    get_preset,
    list_presets,
)

PRESETS = ("light_moco", "moco_v2_baseline", "sslight_baseline", "sslight_moco", "sslight_moco_smooth")


# --- presets ---------------------------------------------------------------------------------

def test_registry_lists_every_preset_and_rejects_unknown_names():
    assert set(PRESETS) <= set(list_presets())
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("no_such_recipe")


def test_light_moco_and_its_baseline_follow_the_recipe_facts():
    light, base = get_preset("light_moco"), get_preset("moco_v2_baseline")
    for recipe in (light, base):
        assert recipe.framework == "moco" and recipe.backbone.name == "mobilenetv3_large_100"
        assert (recipe.head.hidden_dim, recipe.head.output_dim, recipe.head.batch_norm) == (2048, 128, False)
        assert (recipe.moco.queue_size, recipe.moco.key_momentum) == (65536, 0.999)
        opt = recipe.optimizer
        assert (opt.name, opt.lr_per_256, opt.momentum, opt.weight_decay) == ("sgd", 0.03, 0.9, 1e-4)
        assert not opt.exclude_bias_norm and not opt.exclude_depthwise  # decay on all parameters
        assert recipe.views.global_crops == CropSpec(2, 224, (0.2, 1.0)) and recipe.views.local_crops is None
        assert recipe.views.color_jitter == (0.4, 0.4, 0.4, 0.1)
        assert recipe.epochs == 200 and recipe.optimizer.scaled_lr(recipe.batch_size) == 0.03
    assert base.loss.temperature == 0.2 and base.loss.smoothing == 0.0
    assert light.loss.temperature == 0.07 and light.loss.smoothing > 0 and light.loss.mode == "neighbors"


def test_sslight_presets_follow_the_recipe_facts():
    base, sslight = get_preset("sslight_baseline"), get_preset("sslight_moco")
    smooth = get_preset("sslight_moco_smooth")
    for recipe in (base, sslight, smooth):
        opt = recipe.optimizer
        assert recipe.backbone.name == "mobilenet_v2" and recipe.batch_size == 1024
        assert opt.name == "lars" and opt.scaled_lr(1024) == pytest.approx(1.92)
        assert opt.min_lr_per_256 * 1024 / 256 == pytest.approx(0.0048)
        assert (opt.weight_decay, opt.warmup_epochs, opt.trust_coefficient) == (1e-6, 10, 1e-3)
        assert opt.exclude_bias_norm and opt.exclude_depthwise
        assert recipe.loss.temperature == 0.2 and recipe.views.interpolation == "bicubic"
    assert base.views.global_crops == CropSpec(2, 224, (0.14, 1.0))
    assert base.views.local_crops == CropSpec(6, 96, (0.05, 0.14))
    assert base.views.query_weights() == pytest.approx((1 / 7,) * 7)
    assert sslight.views.global_crops == CropSpec(2, 224, (0.3, 1.0))
    assert sslight.views.local_crops == CropSpec(6, 128, (0.05, 0.3))
    assert sslight.views.query_weights() == pytest.approx((0.4,) + (0.1,) * 6)
    assert sslight.loss.smoothing == 0.0 and smooth.loss.smoothing > 0
    assert dataclasses.replace(smooth.loss, smoothing=0.0, schedule="constant", warmup_epochs=0) == sslight.loss


def test_overrides_nested_dict_and_validation():
    recipe = get_preset("light_moco", epochs=100, loss__smoothing=0.3, optimizer={"lr_per_256": 0.06},
                        views__global_crops={"count": 2, "size": 96, "scale": [0.3, 1.0]})
    assert (recipe.epochs, recipe.loss.smoothing, recipe.optimizer.lr_per_256) == (100, 0.3, 0.06)
    assert recipe.loss.temperature == 0.07  # untouched fields keep the preset's value
    assert recipe.views.global_crops == CropSpec(2, 96, (0.3, 1.0))  # YAML-style list -> tuple
    assert get_preset("light_moco").loss.smoothing == 0.1  # presets are rebuilt, never mutated
    assert get_preset("light_moco", name="mine").name == "mine"
    with pytest.raises(ValueError, match="no field"):
        get_preset("light_moco", loss__alpha=0.1)
    with pytest.raises(ValueError, match="not a section"):
        get_preset("light_moco", views__local_crops__count=6)
    with pytest.raises(ValueError):
        get_preset("light_moco", loss__smoothing=1.5)
    with pytest.raises(ValueError):
        get_preset("light_moco", framework="byol")
    with pytest.raises(dataclasses.FrozenInstanceError):
        recipe.epochs = 3
    assert isinstance(recipe.to_dict()["loss"], dict)


def test_loss_spec_schedule_and_mode():
    spec = LossSpec(smoothing=0.2, mode="uniform", schedule="cosine", warmup_epochs=2)
    assert spec.neighbors_or_none is None
    schedule = spec.smoothing_schedule(epochs=10)
    assert schedule(0) == schedule(1) == 0.0 and schedule(10) == pytest.approx(0.2)
    assert 0 < schedule(6) < 0.2
    assert LossSpec(smoothing=0.1, neighbors=7).neighbors_or_none == 7


def test_loss_spec_builds_the_core_options_and_leaves_the_checks_to_them():
    from smooth_infonce import LossOptions

    options = get_preset("light_moco").loss.to_options(epochs=200, backend="reference")
    assert isinstance(options, LossOptions)
    assert (options.temperature, options.smoothing, options.neighbors, options.backend) == (0.07, 0.1, 10, "reference")
    assert options.initial_smoothing == 0.0 and options.smoothing_at(3) == 0.1  # 3 warm-up epochs at 0
    assert LossSpec(smoothing=0.2, mode="uniform").to_options(10).neighbors is None
    for bad in (dict(neighbors=True), dict(neighbors=0), dict(temperature=0.0), dict(temperature=-1.0),
                dict(smoothing=1.0), dict(mode="tiered"), dict(schedule="linear"), dict(warmup_epochs=-1),
                dict(mode="uniform", neighbors=True)):
        with pytest.raises((ValueError, TypeError)):
            LossSpec(**bad)


def test_learning_rate_warmup_then_cosine_per_iteration():
    spec = OptimizerSpec(lr_per_256=0.48, min_lr_per_256=0.0012, warmup_epochs=2)
    kwargs = dict(steps_per_epoch=10, epochs=12, batch_size=1024)
    lrs = [spec.learning_rate(step, **kwargs) for step in range(120)]
    assert lrs[0] == pytest.approx(1.92 / 20) and lrs[19] == pytest.approx(1.92)
    assert all(a <= b for a, b in zip(lrs[:20], lrs[1:20]))
    assert all(a >= b for a, b in zip(lrs[20:], lrs[21:]))
    assert spec.learning_rate(120, **kwargs) == pytest.approx(0.0048)
    assert lrs[70] == pytest.approx(0.0048 + (1.92 - 0.0048) * (1 + math.cos(math.pi * 0.5)) / 2)


# --- backbones -------------------------------------------------------------------------------------

# (name, expected width) from the networks' definitions; measured by a forward pass below.
BACKBONES = [("mobilenetv3_large_100", 1280), ("efficientnet_b0", 1280), ("mobilenet_v2", 1280),
             ("resnet18", 512), ("tiny_cnn", 128)]


@pytest.mark.parametrize("name,width", BACKBONES)
def test_backbone_reports_its_true_width_at_small_and_224_px(name, width):
    torch.manual_seed(0)
    backbone = build_backbone(name).eval()
    assert backbone.num_features == width
    with torch.no_grad():
        for size in (32, 224):
            assert backbone(torch.randn(2, 3, size, size)).shape == (2, width)


def test_timm_mobilenetv3_reported_width_is_not_its_output_width():
    backbone = build_backbone("mobilenetv3_large_100")
    assert backbone.net.num_features == 960  # what timm >= 1.0 reports
    assert backbone.num_features == 1280 == measure_output_width(backbone.net)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "efficientnet_b0"])
def test_cifar_stem_keeps_more_resolution(name):
    plain, cifar = build_backbone(name).eval(), build_backbone(name, cifar_stem=True).eval()
    first_conv = next(m for m in cifar.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.stride == (1, 1)
    assert cifar.num_features == plain.num_features
    with torch.no_grad():
        assert cifar(torch.randn(2, 3, 32, 32)).shape == (2, plain.num_features)


def test_backbone_registry():
    assert {"mobilenetv3_large_100", "efficientnet_b0", "mobilenet_v2", "resnet18", "tiny_cnn"} <= set(list_backbones())
    assert build_backbone("timm:mobilenetv3_small_050").num_features == 1024
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone("vgg99")


@pytest.mark.parametrize("preset,backbone", [("light_moco", "mobilenetv3_large_100"),
                                             ("light_moco", "efficientnet_b0"),
                                             ("sslight_moco", "mobilenet_v2"),
                                             ("sslight_moco", "resnet18")])
def test_preset_builds_a_lightly_model_whose_head_fits(preset, backbone):
    from smooth_infonce.integrations.lightly import build_loss
    from smooth_infonce.integrations.lightly_models import MoCoModel, build_model

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


# --- parameter groups and LARS --------------------------------------------------------------------

def _group_of(groups):
    return {id(p): g["name"] for g in groups for p in g["params"]}


@pytest.mark.parametrize("name", ["mobilenet_v2", "mobilenetv3_large_100"])
def test_depthwise_kernels_bias_and_norm_get_no_weight_decay(name):
    model = build_backbone(name)
    spec = get_preset("sslight_moco").optimizer
    groups = parameter_groups(model, spec)
    where = _group_of(groups)
    assert len(where) == sum(1 for _ in model.parameters())  # every parameter exactly once
    depthwise = [m for m in model.modules() if is_depthwise_conv(m)]
    assert depthwise and all(m.weight.shape[1] == 1 for m in depthwise)
    assert all(where[id(m.weight)] == "no_decay_depthwise" for m in depthwise)
    for module in model.modules():
        if isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d)):
            assert where[id(module.weight)] == where[id(module.bias)] == "no_decay_1d"
        if isinstance(module, (nn.Conv2d, nn.Linear)) and module.bias is not None:
            assert where[id(module.bias)] == "no_decay_1d"
        if isinstance(module, nn.Conv2d) and not is_depthwise_conv(module):
            assert where[id(module.weight)] == "decay"
    settings = {g["name"]: (g["weight_decay"], g["lars_adaptation"]) for g in groups}
    assert settings == {"decay": (1e-6, True), "no_decay_1d": (0.0, False), "no_decay_depthwise": (0.0, True)}


def test_rules_off_decay_everything_and_grouped_conv_is_not_depthwise():
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.Conv2d(8, 8, 3, groups=2), nn.BatchNorm2d(8))
    assert not any(is_depthwise_conv(m) for m in model)
    groups = parameter_groups(model, get_preset("light_moco").optimizer)
    assert [g["name"] for g in groups] == ["decay"] and groups[0]["weight_decay"] == 1e-4
    assert len(groups[0]["params"]) == sum(1 for _ in model.parameters())


def test_build_optimizer_scales_lr_and_picks_the_class():
    model = build_backbone("tiny_cnn", width=4)
    sgd = build_optimizer(model, get_preset("light_moco").optimizer, batch_size=512)
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["lr"] == pytest.approx(0.06)
    lars = build_optimizer(model, get_preset("sslight_moco").optimizer, batch_size=1024)
    assert isinstance(lars, LARS) and lars.param_groups[0]["lr"] == pytest.approx(1.92)


def _small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 6, 3, groups=6),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4))


def _train(model, optimizer, steps=4):
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        loss = model(torch.randn(8, 3, 10, 10, generator=generator)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_lars_matches_lightly_when_adaptation_follows_weight_decay():
    from lightly.utils.lars import LARS as LightlyLARS

    spec = OptimizerSpec(name="lars", weight_decay=1e-2, exclude_bias_norm=True, exclude_depthwise=False)
    ours, theirs = _small_model(), _small_model()
    _train(ours, LARS(parameter_groups(ours, spec), lr=0.5, momentum=0.9))
    lightly_groups = [{k: v for k, v in g.items() if k != "lars_adaptation"} for g in parameter_groups(theirs, spec)]
    _train(theirs, LightlyLARS(lightly_groups, lr=0.5, momentum=0.9))
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_lars_adapts_depthwise_kernels_without_decaying_them():
    spec = get_preset("sslight_moco").optimizer
    adapted, unadapted = _small_model(), _small_model()
    _train(adapted, LARS(parameter_groups(adapted, spec), lr=0.5, momentum=0.9), steps=1)
    groups = parameter_groups(unadapted, spec)
    for group in groups:
        group["lars_adaptation"] = group["weight_decay"] != 0  # lightly's rule
    _train(unadapted, LARS(groups, lr=0.5, momentum=0.9), steps=1)
    depthwise = 3
    # with adaptation the depthwise step is scaled by eta * |w| / |g| (tiny): it barely moves
    start = _small_model()[depthwise].weight
    moved_adapted = (adapted[depthwise].weight - start).norm()
    moved_plain = (unadapted[depthwise].weight - start).norm()
    assert 0 < moved_adapted < moved_plain
    torch.testing.assert_close(adapted[1].weight, unadapted[1].weight)  # 1-D: same in both


# --- views from lightly's transforms -------------------------------------------------------------

def test_sslight_view_transform_on_a_real_photo():
    from PIL import Image
    from sklearn.datasets import load_sample_image

    from smooth_infonce.integrations.lightly_models import build_view_transform

    photo = Image.fromarray(load_sample_image("china.jpg"))
    views = build_view_transform(get_preset("sslight_moco").views)(photo)
    assert [tuple(v.shape) for v in views] == [(3, 224, 224)] * 2 + [(3, 128, 128)] * 6
    assert not torch.equal(views[2], views[3])
    baseline = build_view_transform(get_preset("sslight_baseline").views)(photo)
    assert [tuple(v.shape[-2:]) for v in baseline] == [(224, 224)] * 2 + [(96, 96)] * 6


def test_view_spec_validation():
    with pytest.raises(ValueError):
        ViewSpec(global_crops=CropSpec(1, 224, (0.2, 1.0)))
    with pytest.raises(ValueError):
        CropSpec(2, 224, (0.5, 0.2))
    with pytest.raises(ValueError):
        Recipe(name="x", epochs=0)


def test_view_loss_weights_for_both_layouts():
    from smooth_infonce.integrations.recipes import query_view_weights, view_loss_weights

    assert query_view_weights(2, 6, (0.4, 0.6)) == pytest.approx((0.4,) + (0.1,) * 6)
    assert query_view_weights(2, 6, None) == pytest.approx((1 / 7,) * 7)
    assert view_loss_weights("moco", 2, 0, (0.4, 0.6)) is None
    assert view_loss_weights("simclr", 2, 2, (0.4, 0.6)) == pytest.approx((0.4, 0.4, 0.3, 0.3))
    assert get_preset("sslight_moco").view_weights() == pytest.approx((0.4,) + (0.1,) * 6)
    assert get_preset("sslight_baseline").view_weights() is None
    with pytest.raises(ValueError):
        query_view_weights(1, 6, (0.4, 0.6))


def test_decay_exemptions_match_the_groups():
    from smooth_infonce.integrations.optim import decay_exemptions

    model = build_backbone("mobilenet_v2")
    spec = get_preset("sslight_moco").optimizer
    exempt = decay_exemptions(model, spec)
    assert exempt == {id(p): g["name"] for g in parameter_groups(model, spec) if g["name"] != "decay"
                      for p in g["params"]}
    assert decay_exemptions(model, get_preset("light_moco").optimizer) == {}
