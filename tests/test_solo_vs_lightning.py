"""One recipe, two toolkits: a real solo-learn run with solo's own loader against the Lightning module
(issue 15, item 5). Skipped without solo-learn:

    SOLO_LEARN_PATH=/path/to/solo-learn python -m pytest -q tests/test_solo_vs_lightning.py

DINO (`sslight_dino_vit`, `dino_vit_baseline`): solo-learn's ``Trainer.fit`` of ``sslight_dino``
(the generated config) on solo-learn's own pretraining loader, and Lightning's ``Trainer.fit`` of
``from_preset(...)`` (`PretrainModule`: lightly's pieces) on the very batches solo's loader produced,
replayed in the same order. Both start from the same weights (the Lightning student's and teacher's,
copied into solo's backbone / head / momentum_backbone / momentum_head), run float64 (Lightning's
``precision="64-true"`` in both) for 2 epochs x 2 steps, and must agree on

- the loss of every step (the pair-weighted DINO loss alone: solo adds its online classifier's loss,
  whose gradient stops at the detached features);
- the lr and weight decay every student parameter gets at every step (parameter groups, AdamW, the
  cosine weight-decay schedule 0.04 -> 0.4 of DINO's ViT);
- after the run: the student's and the teacher's weights (backbone and head; the teacher EMA with its
  cosine momentum schedule) and the DINO centre.

The run covers what differs between the epochs: the teacher temperature warms up over the 2 epochs
and the last layer is frozen in epoch 0 only (its gain is learnt: ``norm_last_layer: false``).

Why this configuration (the two paths only agree to rounding where the computation is the same):

- solo-learn runs every crop through the networks separately, the Lightning module batches the crops
  of one size: batch norm would see other statistics. The DINO ViT recipe is BN-free (LayerNorm
  backbone, head without BN), so batching does not change the maths; drop path is set to 0 (random
  per sample, it would draw differently in the two runs).
- the lr is constant on both sides (``scheduler.name=none`` / ``lr_schedule="constant"``, no
  warm-up), to keep the schedules out of this comparison; `test_lr_warmup_is_the_same` and
  `test_lr_after_the_warmup_is_the_same` compare them on their own.
- the teacher temperatures are 5/128 -> 9/128 instead of the recipe's 0.04 -> 0.07: lightly keeps
  its temperature schedule in a float32 tensor and solo-learn in float64 numpy, so 0.04 is not the
  same number on both sides (0.04 vs 0.03999999910593033; `test_recipe_temperatures_are_float32_in_lightly`
  measures what that does). 5/128 and 9/128 are exact in float32.
- tolerance 1e-10 (absolute and relative), float64: the operations are the same, only their grouping
  differs (crops batched or not, the centre's mean as one reduction or a sum / len, the EMA as
  ``m t + (1 - m) s`` fused or not), each a few 1e-16 relative; 4 steps and 1 / tau_t = 25 leave it far
  below 1e-10 (measured: losses <= 1.3e-12, centre <= 3e-16, weights <= 9e-14). The student moves by
  ~3e-5 per run (lr 7.8e-6 x 4 AdamW steps), so a wrong step would show.
- one exception, the ViT's position embedding: timm interpolates it to the crop's grid in float32
  (``resample_abs_pos_embed``), so its gradient carries float32 rounding that depends on how the crops
  are batched; it is compared at 1e-2 of its movement (measured 1.7e-9 on a movement of 3e-5, and it
  is what the losses' 1e-12 drift at the last steps comes from).

Not compared here yet: SwAV. Beyond the projector's batch norm (statistics per crop in solo, over all
views at once in `encode_multicrop`), the two paths differ by construction: solo-learn's prototypes
are ``nn.utils.weight_norm`` with the gain fixed (the optimiser steps the direction ``weight_v``, with
its gradient projected), `SwAVModel` renormalises a plain weight before every step; and solo-learn's
``get_assignments`` puts the queue into Sinkhorn from ``epoch_queue_starts`` on, empty rows included,
where `SwAVModel.queue_in_use` waits until the queue is full.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Dict, List, Tuple

import pytest

pytestmark = pytest.mark.solo
solo_methods = pytest.importorskip("solo.methods", reason="solo-learn is not installed")

import torch  # noqa: E402
from lightning.pytorch import Callback, Trainer, seed_everything  # noqa: E402
from test_solo_integration import make_image_folder, pretrain_cfg, train_loader  # noqa: E402
from timm.layers import resample_abs_pos_embed  # noqa: E402

from smooth_infonce.integrations.lightning import from_preset  # noqa: E402
from smooth_infonce.integrations.recipes import get_preset  # noqa: E402
from smooth_infonce.integrations.solo import register  # noqa: E402

TOL = 1e-10
EPOCHS, STEPS_PER_EPOCH, BATCH = 2, 2, 4
# float32-exact teacher temperatures near the recipe's 0.04 -> 0.07 (see the module docstring)
WARMUP_TEACHER_TEMP, TEACHER_TEMP = 5 / 128, 9 / 128
# CPU size: 32 px globals (solo's cifar_custom dataset group), 16 px locals, a small DINO head
HIDDEN, BOTTLENECK, PROTOTYPES, LOCAL = 32, 16, 16, 16


@pytest.fixture(scope="module", autouse=True)
def registered():
    register()


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("images"))


# --- the same recipe on both sides ---------------------------------------------------------------

def solo_cfg(preset: str, image_folder, *overrides: str, epochs: int = EPOCHS, scheduler: str = "none",
             temperatures: Tuple[float, float] = (WARMUP_TEACHER_TEMP, TEACHER_TEMP)):
    """The preset's generated solo-learn config at test size, completed by solo's parse_cfg."""
    return pretrain_cfg(f"pretrain/{preset}", [
        "dataset=cifar_custom", "hardware=cpu", "auto_resume.enabled=false", "backbone.kwargs.drop_path_rate=0.0",
        f"method_kwargs.proj_hidden_dim={HIDDEN}", f"method_kwargs.proj_output_dim={BOTTLENECK}",
        f"method_kwargs.num_prototypes={PROTOTYPES}", f"max_epochs={epochs}",
        f"method_kwargs.warmup_teacher_temperature_epochs={EPOCHS}",
        f"method_kwargs.warmup_teacher_temperature={temperatures[0]}",
        f"method_kwargs.teacher_temperature={temperatures[1]}", f"scheduler.name={scheduler}",
        # cifar_custom scales the locals to 18 / 14 px; ViT/16 takes multiples of 16 px only
        f"views.local_size.px128={LOCAL}", f"views.local_size.px96={LOCAL}", *overrides], image_folder / "train")


def lightning_module(preset: str, **overrides: Any):
    """The same preset through `from_preset`, with the same test-size overrides."""
    settings = dict(backbone__kwargs={"drop_path_rate": 0.0}, head__hidden_dim=HIDDEN, head__output_dim=BOTTLENECK,
                    dino__num_prototypes=PROTOTYPES, dino__warmup_teacher_temperature_epochs=EPOCHS,
                    dino__warmup_teacher_temperature=WARMUP_TEACHER_TEMP, dino__teacher_temperature=TEACHER_TEMP,
                    optimizer__warmup_epochs=0, optimizer__lr_schedule="constant", epochs=EPOCHS, batch_size=BATCH)
    return from_preset(preset, **{**settings, **overrides})


def assert_same_recipe(cfg, recipe) -> None:
    """Every number of the two runs that the test did not set itself comes from the preset on the
    Lightning side and from its generated YAML on the solo side: they must be the same numbers."""
    kwargs, dino, opt = cfg.method_kwargs, recipe.dino, recipe.optimizer
    assert cfg.method == "sslight_dino" and recipe.framework == "dino"
    assert cfg.backbone.name == recipe.backbone.name and dict(cfg.backbone.kwargs) == dict(recipe.backbone.kwargs)
    weights = None if kwargs.loss_weights is None else tuple(kwargs.loss_weights)
    assert weights == recipe.views.loss_weights
    assert (cfg.data.num_large_crops, cfg.data.num_small_crops) == (2, recipe.views.num_local)
    assert (kwargs.proj_hidden_dim, kwargs.proj_output_dim, kwargs.num_prototypes) == (
        recipe.head.hidden_dim, recipe.head.output_dim, dino.num_prototypes)
    assert kwargs.use_bn_in_head is recipe.head.batch_norm is False
    assert kwargs.norm_last_layer == dino.norm_last_layer
    assert kwargs.freeze_last_layer == dino.freeze_last_layer_epochs
    assert (kwargs.student_temperature, kwargs.center_momentum) == (dino.student_temperature, dino.center_momentum)
    assert (kwargs.warmup_teacher_temperature, kwargs.teacher_temperature,
            kwargs.warmup_teacher_temperature_epochs) == (dino.warmup_teacher_temperature, dino.teacher_temperature,
                                                          dino.warmup_teacher_temperature_epochs)
    assert (cfg.momentum.base_tau, cfg.momentum.final_tau) == (dino.teacher_momentum, dino.teacher_momentum_end)
    assert not kwargs.clip_grad  # the recipe has no clipping
    assert cfg.optimizer.name == opt.name == "adamw" and tuple(cfg.optimizer.kwargs.betas) == (0.9, 0.999)
    assert (cfg.optimizer.weight_decay, cfg.optimizer.weight_decay_end) == (opt.weight_decay, opt.weight_decay_end)
    assert cfg.optimizer.exclude_bias_n_norm_wd == opt.exclude_bias_norm
    assert cfg.optimizer.exclude_depthwise_wd == opt.exclude_depthwise
    assert cfg.optimizer.lr == pytest.approx(opt.scaled_lr(BATCH), rel=1e-15)  # solo scales it by batch / 256
    assert (cfg.max_epochs, cfg.optimizer.batch_size) == (recipe.epochs, recipe.batch_size)


def paired_parameters(module, solo) -> List[Tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, Lightning tensor, solo tensor) for the student and the teacher, backbone and head:
    the backbones are one network in both registries (same keys); solo's ``DINOHead`` and lightly's
    ``DINOProjectionHead`` hold the same layers in the same order (``mlp.i`` / ``layers.i``)."""
    model, out = module.model, []
    for role, ours, theirs in (("student", model.backbone, solo.backbone),
                               ("teacher", model.teacher_backbone, solo.momentum_backbone)):
        mine, other = ours.state_dict(keep_vars=True), theirs.state_dict(keep_vars=True)
        assert list(mine) == list(other)
        out += [(f"{role}.backbone.{key}", mine[key], other[key]) for key in mine]
    for role, ours, theirs in (("student", model.head, solo.head), ("teacher", model.teacher_head, solo.momentum_head)):
        mine, other = ours.state_dict(keep_vars=True), theirs.state_dict(keep_vars=True)
        assert len(mine) == len(other)
        for (key, value), (other_key, other_value) in zip(mine.items(), other.items()):
            assert key.split(".")[-1] == other_key.split(".")[-1] and value.shape == other_value.shape, (key, other_key)
            out.append((f"{role}.head.{other_key}", value, other_value))
    return out


@torch.no_grad()
def copy_lightning_into_solo(module, solo) -> None:
    for _, ours, theirs in paired_parameters(module, solo):
        theirs.copy_(ours)


# --- recording both runs -------------------------------------------------------------------------

class Record(Callback):
    """Per step: the batch (solo side), the DINO loss alone, and the (lr, weight decay) every student
    parameter gets from the optimiser, by name."""

    def __init__(self, loss_module: torch.nn.Module, names: Dict[int, str], keep_batches: bool = False):
        self.batches: List[Any] = []
        self.losses: List[float] = []
        self.settings: List[Dict[str, Tuple[float, float]]] = []
        self.names, self.keep_batches = names, keep_batches
        inner = loss_module.forward

        def forward(*args, **kwargs):
            loss = inner(*args, **kwargs)
            self.losses.append(loss.detach().clone())
            return loss

        loss_module.forward = forward

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if self.keep_batches:  # after Lightning's precision plugin: the float64 tensors solo's step gets
            self.batches.append(batch)

    def on_before_optimizer_step(self, trainer, module, optimizer):
        self.settings.append({self.names[id(p)]: (group["lr"], group["weight_decay"])
                              for group in optimizer.param_groups for p in group["params"] if id(p) in self.names})


class Replay(torch.utils.data.Dataset):
    """The recorded solo batches ``[indexes, crops, targets]`` as the Lightning module's
    ``(views, targets, indexes)``; with `EpochBatches`, epoch e replays solo's epoch e."""

    def __init__(self, batches):
        self.batches = batches

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, i):
        indexes, crops, targets = self.batches[i]
        return list(crops), targets, indexes


class EpochBatches(torch.utils.data.Sampler):
    def __init__(self, per_epoch: int):
        self.per_epoch, self.epoch = per_epoch, 0

    def set_epoch(self, epoch: int) -> None:  # Lightning calls it before every epoch
        self.epoch = epoch

    def __len__(self):
        return self.per_epoch

    def __iter__(self):
        return iter(range(self.epoch * self.per_epoch, (self.epoch + 1) * self.per_epoch))


def trainer(callback: Callback) -> Trainer:
    return Trainer(max_epochs=EPOCHS, limit_train_batches=STEPS_PER_EPOCH, precision="64-true", accelerator="cpu",
                   devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, num_sanity_val_steps=0, callbacks=[callback])


def run_both(preset: str, image_folder, solo_overrides=(), **lightning_overrides):
    """Build the two models from one preset, copy the Lightning weights into solo, train solo on its
    own loader, then the Lightning module on the batches solo's loader gave."""
    cfg = solo_cfg(preset, image_folder, *solo_overrides)
    module = lightning_module(preset, **lightning_overrides)
    assert_same_recipe(cfg, module.recipe)
    solo = solo_methods.METHODS[cfg.method](cfg)
    module.double()
    solo.double()
    copy_lightning_into_solo(module, solo)
    pairs = paired_parameters(module, solo)
    initial = {name: ours.detach().clone() for name, ours, _ in pairs}
    student = [(name, ours, theirs) for name, ours, theirs in pairs if name.startswith("student")]

    seed_everything(0)
    solo_record = Record(solo.dino_loss_func, {id(t): name for name, _, t in student}, keep_batches=True)
    trainer(solo_record).fit(solo, train_loader(cfg))
    assert len(solo_record.batches) == EPOCHS * STEPS_PER_EPOCH

    replay = torch.utils.data.DataLoader(Replay(solo_record.batches), batch_size=None,
                                         sampler=EpochBatches(STEPS_PER_EPOCH))
    lightning_record = Record(module.criterion, {id(o): name for name, o, _ in student})
    trainer(lightning_record).fit(module, replay)
    return cfg, module, solo, solo_record, lightning_record, initial


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().reshape(-1) - b.detach().reshape(-1)).abs().max())


# --- DINO ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", ["sslight_dino_vit", "dino_vit_baseline"])
def test_dino_solo_run_equals_the_lightning_module(preset, image_folder):
    cfg, module, solo, solo_record, lightning_record, initial = run_both(preset, image_folder)
    steps = EPOCHS * STEPS_PER_EPOCH

    # the same batches, in the same order, every crop of solo's loader
    batches = solo_record.batches
    assert [len(crops) for _, crops, _ in batches] == [2 + module.recipe.views.num_local] * steps
    assert all(x.dtype == torch.float64 for _, crops, _ in batches for x in crops)
    sizes = [tuple(crops[0].shape[-2:]) + tuple(crops[-1].shape[-2:]) for _, crops, _ in batches]
    assert sizes == [(32, 32, LOCAL, LOCAL)] * steps

    # losses, step by step
    solo_losses, lightning_losses = torch.stack(solo_record.losses), torch.stack(lightning_record.losses)
    assert solo_losses.shape == lightning_losses.shape == (steps,)
    torch.testing.assert_close(lightning_losses, solo_losses, rtol=TOL, atol=TOL)
    assert len(set(solo_losses.tolist())) == steps  # four different steps

    # every student parameter: the same lr and weight decay at every step (groups and schedules)
    assert len(solo_record.settings) == len(lightning_record.settings) == steps
    decays = []
    for step, (solo_step, lightning_step) in enumerate(zip(solo_record.settings, lightning_record.settings)):
        assert set(solo_step) == set(lightning_step)
        for name, (lr, decay) in solo_step.items():
            assert lightning_step[name] == pytest.approx((lr, decay), rel=1e-12, abs=0), (step, name)
        decays.append(max(decay for _, decay in solo_step.values()))
    assert decays[0] == pytest.approx(0.04) and decays[-1] > decays[0]  # the cosine 0.04 -> 0.4 moved
    assert any(decay == 0 for _, decay in solo_record.settings[0].values())  # biases and norms exempt

    # the weights after the run, and the centre
    differences, moved = {}, {}
    for name, ours, theirs in paired_parameters(module, solo):
        differences[name], moved[name] = max_abs(ours, theirs), max_abs(ours, initial[name])
        if name.endswith("pos_embed"):
            # timm interpolates the position embedding to the crop's grid in float32
            # (resample_abs_pos_embed casts it), so its gradient is rounded to float32 once per
            # backbone call: once per crop size in Lightning, once per crop in solo. AdamW divides by
            # the root of the squared gradients, which turns that 1e-7 relative rounding of the
            # smallest entries into up to ~1e-3 of their step: compared at 1e-2 of how far it moved
            # (measured 6e-5 to 3e-4 for the student, up to 7e-4 for its EMA, the teacher).
            assert differences[name] <= 1e-2 * moved[name], name
        else:
            assert differences[name] <= TOL * (1 + float(theirs.detach().abs().max())), name
    # the student moved by ~lr x steps (3e-5), its last layer in epoch 1 only; the teacher by 1 - 0.996 of that
    assert min(moved["student.backbone.net.blocks.0.attn.qkv.weight"], moved["student.head.last_layer.weight_v"],
               moved["student.head.last_layer.weight_g"]) > 1e-6
    assert min(moved["teacher.backbone.net.blocks.0.attn.qkv.weight"], moved["teacher.head.mlp.0.weight"]) > 1e-8
    pos_embed = solo.backbone.net.pos_embed.detach()  # float64, yet its grid tokens interpolated in float32:
    resampled = resample_abs_pos_embed(pos_embed, new_size=[2, 2], num_prefix_tokens=1)
    in_float32 = resample_abs_pos_embed(pos_embed.float(), new_size=[2, 2], num_prefix_tokens=1)
    assert resampled.dtype == torch.float64 and torch.equal(resampled[:, 1:], in_float32[:, 1:].double())
    centre_ours, centre_solo = module.criterion.center, solo.dino_loss_func.center
    assert centre_solo.abs().sum() > 0
    torch.testing.assert_close(centre_ours.reshape(-1), centre_solo.reshape(-1), rtol=TOL, atol=TOL)
    others = [d for name, d in differences.items() if not name.endswith("pos_embed")]
    pos = [differences[f"{role}.backbone.net.pos_embed"] for role in ("student", "teacher")]
    print(f"\n{preset}: max |diff| loss {max_abs(lightning_losses, solo_losses):.1e}, centre "
          f"{max_abs(centre_ours, centre_solo):.1e}, weights {max(others):.1e} (pos_embed: student {pos[0]:.1e}, "
          f"teacher {pos[1]:.1e})")


# --- where the two paths differ ------------------------------------------------------------------

def test_recipe_temperatures_are_float32_in_lightly(image_folder):
    """At the recipe's own 0.04 -> 0.07, the two paths divide by different numbers: lightly's tau_t
    schedule is a float32 tensor (0.04 -> 0.03999999910593033), solo-learn's a float64 numpy array.
    Negligible in float32 training (the same float32 number); in float64 it moves the loss by ~1e-10
    relative (measured 1.6e-10), which is why the runs above use the float32-exact 5/128 -> 9/128."""
    torch.manual_seed(0)
    recipe_temps = (0.04, 0.07)
    criterion = lightning_module("sslight_dino_vit", dino__warmup_teacher_temperature=recipe_temps[0],
                                 dino__teacher_temperature=recipe_temps[1]).criterion.double()
    solo_loss = solo_methods.METHODS["sslight_dino"](
        solo_cfg("sslight_dino_vit", image_folder, temperatures=recipe_temps)).dino_loss_func.double()
    for epoch, tau in enumerate(recipe_temps):
        assert float(solo_loss.teacher_temp_schedule[epoch]) == tau
        lightly_tau = criterion.teacher_temperature(epoch=epoch)
        assert lightly_tau.dtype == torch.float32 and float(lightly_tau) != tau
        assert float(lightly_tau) == float(torch.tensor(tau, dtype=torch.float32))
    views, batch = 12, 4
    student = torch.randn(views, batch, PROTOTYPES, dtype=torch.float64)
    teacher = torch.randn(2, batch, PROTOTYPES, dtype=torch.float64)
    ours = criterion(list(teacher), list(student), epoch=0)
    theirs = solo_loss(student.reshape(-1, PROTOTYPES), teacher.reshape(-1, PROTOTYPES))
    gap = abs(float(ours - theirs)) / abs(float(theirs))
    print(f"\nrecipe temperatures, float64: relative loss gap {gap:.1e}")
    assert 1e-12 < gap < 1e-6  # float32's rounding of tau (2e-8 relative) through the softmax
    torch.testing.assert_close(criterion.center.reshape(-1), solo_loss.center.reshape(-1), rtol=TOL, atol=TOL)


def lr_schedules(image_folder, epochs: int = 4, warmup_epochs: int = 2, steps_per_epoch: int = 3):
    """The lr of every optimiser step: solo-learn's ``configure_optimizers`` (its
    LinearWarmupCosineAnnealingLR, stepped per iteration) for the generated config, and the recipe's
    `OptimizerSpec.learning_rate`, which `PretrainModule.set_schedules` sets every step."""
    cfg = solo_cfg("sslight_dino_vit", image_folder, f"scheduler.warmup_epochs={warmup_epochs}", epochs=epochs,
                   scheduler="warmup_cosine")
    solo = solo_methods.METHODS[cfg.method](cfg)
    total = epochs * steps_per_epoch
    solo._trainer = SimpleNamespace(estimated_stepping_batches=total)  # all configure_optimizers reads
    (optimizer,), (scheduler,) = solo.configure_optimizers()
    assert scheduler["interval"] == "step"
    solo_lrs = []
    for _ in range(total):
        solo_lrs.append(optimizer.param_groups[0]["lr"])  # the backbone's group
        optimizer.step()
        scheduler["scheduler"].step()
    recipe = get_preset("sslight_dino_vit", optimizer__warmup_epochs=warmup_epochs, epochs=epochs, batch_size=BATCH)
    recipe_lrs = [recipe.optimizer.learning_rate(step, steps_per_epoch=steps_per_epoch, epochs=epochs,
                                                 batch_size=BATCH) for step in range(total)]
    return solo_lrs, recipe_lrs, warmup_epochs * steps_per_epoch


def test_lr_after_the_warmup_is_the_same(image_folder):
    solo_lrs, recipe_lrs, warmup = lr_schedules(image_folder)
    assert recipe_lrs[warmup:] == pytest.approx(solo_lrs[warmup:], rel=1e-12, abs=0)
    assert solo_lrs[warmup] == max(solo_lrs) and solo_lrs[-1] < solo_lrs[warmup]  # peak, then the cosine


def test_lr_warmup_is_the_same(image_folder):
    solo_lrs, recipe_lrs, warmup = lr_schedules(image_folder)
    assert solo_lrs[0] == recipe_lrs[0] == 0.0  # the first step at the start lr, as DINO's np.linspace
    assert recipe_lrs[:warmup] == pytest.approx(solo_lrs[:warmup], rel=1e-12, abs=0)
