"""Presets (the light-moco and SSLight recipes as data), overrides, the loss settings and their
core options, the lr schedule, view sampling and loss weights."""

from __future__ import annotations

import dataclasses
import math

import pytest

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


def test_light_moco_warms_alpha_and_lr_together_as_the_authors_warm_flag():
    """The authors' `--warm` epochs: lr warms up linearly and alpha is 0; a loss built from the
    preset starts at its schedule's epoch-0 value."""
    recipe = get_preset("light_moco")
    options = recipe.loss.to_options(recipe.epochs)
    assert [options.smoothing_at(e) for e in range(5)] == [0.0, 0.0, 0.0, 0.1, 0.1]
    assert options.initial_smoothing == 0.0
    steps, batch = 100, 256
    lrs = [recipe.optimizer.learning_rate(s, steps_per_epoch=steps, epochs=recipe.epochs, batch_size=batch)
           for s in range(0, 4 * steps, steps // 2)]
    peak = recipe.optimizer.scaled_lr(batch)
    assert lrs[:6] == sorted(lrs[:6]) and lrs[0] < peak / 10 and lrs[5] < peak  # rising through epoch 2
    assert lrs[6] == pytest.approx(peak, rel=1e-3)  # epoch 3: the cosine starts at the peak
