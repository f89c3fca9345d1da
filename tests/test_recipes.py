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

PRESETS = ("light_moco", "moco_v2_baseline", "sslight_baseline", "sslight_moco", "sslight_moco_smooth",
           "dino_baseline", "sslight_dino", "dino_vit_baseline", "sslight_dino_vit", "swav_baseline", "sslight_swav")


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
    for recipe in (base, sslight, smooth):  # the authors' photometric augmentations, key = global view 1
        assert_sslight_photometric(recipe.views)


def assert_sslight_photometric(views: ViewSpec) -> None:
    """The SSLight authors' MoCo and DINO augmentations, per view (global 1, global 2, locals)."""
    assert views.color_jitter == (0.4, 0.4, 0.2, 0.1) and views.color_jitter_prob == 0.8
    assert (views.grayscale_prob, views.hflip_prob, views.blur_sigmas) == (0.2, 0.5, (0.1, 2.0))
    locals_ = views.num_local
    assert views.view_probs(views.blur_prob) == (1.0, 0.1) + (0.5,) * locals_
    assert views.view_probs(views.solarize_prob) == (0.0, 0.2) + (0.0,) * locals_


# The six rows of SSLight's table (baseline -> SSLight, ImageNet linear top-1): preset pairs, their
# global / local crops and pair weights (lambda_gg per global-global pair, lambda_gl per local one).
SSLIGHT_ROWS = {
    ("dino_baseline", "sslight_dino"): ((0.14, 96, 6, 0.14), (0.3, 128, 6, 0.3)),
    ("dino_vit_baseline", "sslight_dino_vit"): ((0.25, 96, 10, 0.25), (0.3, 128, 10, 0.3)),
    ("swav_baseline", "sslight_swav"): ((0.14, 96, 6, 0.14), (0.3, 128, 6, 0.3)),
}


@pytest.mark.parametrize("names", list(SSLIGHT_ROWS))
def test_dino_and_swav_presets_carry_the_authors_views_and_pair_weights(names):
    for name, (boundary, local_size, locals_, local_top) in zip(names, SSLIGHT_ROWS[names]):
        recipe = get_preset(name)
        views = recipe.views
        assert views.global_crops == CropSpec(2, 224, (boundary, 1.0)) and views.interpolation == "bicubic"
        assert views.local_crops == CropSpec(locals_, local_size, (0.05, local_top))
        weights = recipe.pair_weights()
        pairs = 2 * (1 + locals_)
        assert [w[a] for a, w in enumerate(weights)] == [0.0, 0.0]  # a view is never its own target
        assert sum(map(sum, weights)) == pytest.approx(1.0)
        if name.startswith("sslight"):  # SSLight: 0.4 over the 2 global pairs, 0.6 over the 2 L local ones
            assert views.loss_weights == (0.4, 0.6)
            assert weights[0][1] == weights[1][0] == pytest.approx(0.2)
            assert weights[0][2:] == pytest.approx((0.6 / (2 * locals_),) * locals_)
        else:  # the baseline is the plain mean over pairs
            assert views.loss_weights is None
            assert all(w == pytest.approx(1 / pairs) for row in weights for v, w in enumerate(row) if w)
        assert recipe.epochs == 200 and recipe.batch_size == 1024
        if recipe.framework == "dino":
            assert_sslight_photometric(views)
        else:
            assert views.color_jitter == (0.8, 0.8, 0.8, 0.2) and views.color_jitter_prob == 0.8
            assert views.blur_prob == (0.5, 0.5, 0.5) and views.solarize_prob == (0.0, 0.0, 0.0)
    assert get_preset(names[1]).pair_weights()[0][2] == pytest.approx(0.05 if locals_ == 6 else 0.03)


def test_dino_presets_follow_the_authors_configs():
    for name in ("dino_baseline", "sslight_dino"):
        recipe = get_preset(name)
        assert recipe.framework == "dino" and recipe.backbone.name == "mobilenet_v2"
        assert (recipe.head.hidden_dim, recipe.head.output_dim, recipe.head.num_layers, recipe.head.batch_norm) == \
            (2048, 256, 3, True)
        dino = recipe.dino
        assert (dino.num_prototypes, dino.norm_last_layer, dino.student_temperature) == (4096, True, 0.1)
        assert (dino.warmup_teacher_temperature, dino.teacher_temperature, dino.warmup_teacher_temperature_epochs) \
            == (0.04, 0.07, 50)
        assert (dino.center_momentum, dino.teacher_momentum, dino.teacher_momentum_end) == (0.9, 0.996, 1.0)
        assert dino.freeze_last_layer_epochs == 1
        opt = recipe.optimizer
        assert opt.name == "lars" and opt.scaled_lr(1024) == pytest.approx(1.92)
        assert opt.min_lr_per_256 * 4 == pytest.approx(0.0048) and opt.weight_decay == 1e-6
        assert opt.weight_decay_end is None and opt.warmup_epochs == 10
        assert opt.exclude_bias_norm and opt.exclude_depthwise
        for backbone in ("resnet18", "resnet34"):  # the same recipe on the other CNNs of the table
            assert get_preset(name, backbone__name=backbone).backbone.name == backbone
    for name in ("dino_vit_baseline", "sslight_dino_vit"):
        recipe = get_preset(name)
        assert recipe.backbone.name == "vit_tiny_patch16" and dict(recipe.backbone.kwargs) == {"drop_path_rate": 0.1}
        assert recipe.head.batch_norm is False and recipe.head.num_layers == 3
        assert (recipe.dino.num_prototypes, recipe.dino.norm_last_layer) == (65536, False)
        assert recipe.dino.warmup_teacher_temperature_epochs == 30
        opt = recipe.optimizer
        assert opt.name == "adamw" and opt.scaled_lr(1024) == pytest.approx(2e-3)
        assert opt.min_lr_per_256 * 4 == pytest.approx(1e-5)
        assert (opt.weight_decay, opt.weight_decay_end) == (0.04, 0.4)


def test_swav_presets_follow_the_authors_configs():
    for name in ("swav_baseline", "sslight_swav"):
        recipe = get_preset(name)
        assert recipe.framework == "swav" and recipe.backbone.name == "mobilenet_v2"
        assert (recipe.head.hidden_dim, recipe.head.output_dim, recipe.head.batch_norm) == (4096, 128, True)
        swav = recipe.swav
        assert (swav.num_prototypes, swav.temperature, swav.sinkhorn_epsilon, swav.sinkhorn_iterations) == \
            (3000, 0.1, 0.05, 3)
        assert (swav.queue_size, swav.queue_start_epoch, swav.freeze_prototypes_epochs) == (3840, 15, 1)
        assert swav.queue_length(1024) == 3072 and swav.queue_length(3840) == 3840 and swav.queue_length(4096) == 0
        opt = recipe.optimizer
        assert opt.name == "lars" and opt.scaled_lr(1024) == pytest.approx(1.2)
        assert opt.warmup_start_lr_per_256 * 4 == pytest.approx(0.075)
        assert opt.min_lr_per_256 * 4 == pytest.approx(0.0048)


def test_dino_teacher_schedules_equal_lightlys_and_dinos():
    """tau_t per epoch as lightly's DINOLoss computes it (DINO's linspace), the teacher's EMA as
    DINO's per-iteration cosine."""
    from lightly import loss as lightly_loss

    for spec in (get_preset("dino_baseline").dino, get_preset("dino_vit_baseline").dino):
        theirs = lightly_loss.DINOLoss(output_dim=8, warmup_teacher_temp=spec.warmup_teacher_temperature,
                                       teacher_temp=spec.teacher_temperature,
                                       warmup_teacher_temp_epochs=spec.warmup_teacher_temperature_epochs)
        schedule = theirs.teacher_temp_schedule.tolist()
        for epoch in range(spec.warmup_teacher_temperature_epochs + 3):
            expected = schedule[epoch] if epoch < len(schedule) else spec.teacher_temperature
            assert spec.teacher_temperature_at(epoch) == pytest.approx(expected, rel=1e-6)
    spec = get_preset("sslight_dino").dino
    total = 1000
    for step in (0, 1, 250, 500, 999, 1000):
        expected = 1 + (0.996 - 1) * (1 + math.cos(math.pi * step / total)) / 2
        assert spec.teacher_momentum_at(step, total) == pytest.approx(expected, abs=1e-15)


def test_warmup_start_and_weight_decay_schedule():
    spec = get_preset("swav_baseline").optimizer
    kwargs = dict(steps_per_epoch=10, epochs=200, batch_size=1024)
    assert spec.learning_rate(0, **kwargs) == pytest.approx(0.075)  # the warm-up starts at SwAV's start_warmup
    assert spec.learning_rate(99, **kwargs) == pytest.approx(1.2)
    vit = get_preset("dino_vit_baseline").optimizer
    decay = [vit.weight_decay_at(s, steps_per_epoch=10, epochs=200) for s in (0, 1000, 2000)]
    assert decay == pytest.approx([0.04, 0.22, 0.4])
    assert get_preset("sslight_dino").optimizer.weight_decay_at(1234, steps_per_epoch=10, epochs=200) == 1e-6


def test_dino_and_swav_recipes_reject_heads_and_views_their_losses_cannot_take():
    with pytest.raises(ValueError, match="3 layers"):
        get_preset("sslight_dino", head__num_layers=2)
    with pytest.raises(ValueError, match="SwAV's head"):
        get_preset("sslight_swav", head__batch_norm=False)
    with pytest.raises(ValueError, match="2 global crops"):
        get_preset("sslight_dino", views__global_crops={"count": 3, "size": 224, "scale": (0.3, 1.0)})
    for bad in (dict(dino__teacher_temperature=0.0), dict(dino__center_momentum=1.5),
                dict(dino__warmup_teacher_temperature_epochs=-1), dict(swav__sinkhorn_epsilon=0.0),
                dict(swav__queue_size=-1), dict(views__blur_prob=(1.0, 0.1)), dict(views__solarize_prob=1.5),
                dict(optimizer__weight_decay_end=-0.1)):
        with pytest.raises(ValueError):
            get_preset("sslight_dino", **bad)
    with pytest.raises(ValueError, match="pair weights"):
        get_preset("sslight_moco").pair_weights()


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
    assert lrs[0] == 0.0 and lrs[1] == pytest.approx(1.92 / 19) and lrs[19] == pytest.approx(1.92)
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


def test_per_view_weights_are_for_the_contrastive_frameworks_only():
    from smooth_infonce.integrations.recipes import view_loss_weights

    assert get_preset("sslight_dino").view_weights() is None  # pairs are weighed instead
    with pytest.raises(ValueError, match="pair_weights"):
        view_loss_weights("dino", 2, 6, (0.4, 0.6))
