"""Parameter groups with the no-decay rules, LARS (against lightly's), and the optimiser of a
preset, on real networks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from smooth_infonce.integrations.recipes import OptimizerSpec, get_preset
from smooth_infonce.integrations.recipes.backbones import build_backbone
from smooth_infonce.integrations.recipes.optim import LARS, build_optimizer, is_depthwise_conv, parameter_groups


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


def test_decay_exemptions_match_the_groups():
    from smooth_infonce.integrations.recipes.optim import decay_exemptions

    model = build_backbone("mobilenet_v2")
    spec = get_preset("sslight_moco").optimizer
    exempt = decay_exemptions(model, spec)
    assert exempt == {id(p): g["name"] for g in parameter_groups(model, spec) if g["name"] != "decay"
                      for p in g["params"]}
    assert decay_exemptions(model, get_preset("light_moco").optimizer) == {}


def test_vit_preset_gets_adamw_and_its_weight_decay_schedule_reaches_only_the_decaying_group():
    from smooth_infonce.integrations.recipes.optim import set_schedules

    recipe = get_preset("sslight_dino_vit")
    model = build_backbone("vit_tiny_patch16")
    optimizer = build_optimizer(model, recipe.optimizer, batch_size=1024)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert {g["name"] for g in optimizer.param_groups} == {"decay", "no_decay_1d"}
    kwargs = dict(steps_per_epoch=10, epochs=200, batch_size=1024)
    lr = set_schedules(optimizer, recipe.optimizer, 1000, **kwargs)
    assert lr == pytest.approx(recipe.optimizer.learning_rate(1000, **kwargs))
    decay = {g["name"]: (g["lr"], g["weight_decay"]) for g in optimizer.param_groups}
    assert decay["decay"] == (lr, pytest.approx(0.22)) and decay["no_decay_1d"] == (lr, 0.0)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()  # AdamW takes the groups as built (no LARS flag left in them)
