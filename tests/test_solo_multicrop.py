"""SSLight's DINO and SwAV in a real solo-learn (skipped without one; see test_solo_integration.py).

    SOLO_LEARN_PATH=/path/to/solo-learn python -m pytest -q tests/test_solo_multicrop.py

- baseline lambdas: our methods' loss is solo-learn's own ``DINOLoss`` (chunked into every crop) and
  its SwAV step (``swav_loss_func``, Sinkhorn and queue), value and gradient, float64, 1e-10;
- SSLight lambdas: a row-by-row loop of L = lambda_gg mean(gg pairs) + lambda_gl mean(gl pairs);
- every new preset config trains a few steps through solo-learn's loader, and through the launcher
  (main_pretrain.py); kill-and-resume through solo-learn's checkpoints keeps the DINO centre and
  the SwAV queue and continues exactly.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.solo
solo_methods = pytest.importorskip("solo.methods", reason="solo-learn is not installed")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from solo.losses.dino import DINOLoss  # noqa: E402
from solo.methods.base import BaseMethod  # noqa: E402
from solo.methods.dino import DINO  # noqa: E402
from solo.methods.swav import SwAV  # noqa: E402
from solo.utils.sinkhorn_knopp import SinkhornKnopp  # noqa: E402
from test_solo_integration import (  # noqa: E402
    kill_and_resume,
    logged,
    make_image_folder,
    pretrain_cfg,
    run_launcher,
    solo_clone_or_skip,
    train_loader,
)

from smooth_infonce.integrations.recipes.multicrop import pair_weights  # noqa: E402
from smooth_infonce.integrations.solo import multicrop_methods, register  # noqa: E402
from smooth_infonce.integrations.solo.launcher import hydra_quote  # noqa: E402
from smooth_infonce.integrations.solo.multicrop_methods import (  # noqa: E402
    PairWeightedDINOLoss,
    SSLightDINO,
    SSLightSwAV,
)


@pytest.fixture(scope="module", autouse=True)
def registered():
    register()


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def solo_clone():
    return solo_clone_or_skip()


NEW_PRESETS = ("dino_baseline", "sslight_dino", "dino_vit_baseline", "sslight_dino_vit", "swav_baseline",
               "sslight_swav")
# A CPU-sized run of any preset config: 32 px crops, the tiny CNN (the ViT configs' drop-path
# argument removed with the ViT), small heads, solo-learn's CPU hardware group.
TINY_RUN = ["dataset=cifar_custom", "hardware=cpu", "backbone.name=tiny_cnn", "~backbone.kwargs",
            "+backbone.kwargs.cifar_stem=true", "auto_resume.enabled=false", "method_kwargs.proj_hidden_dim=32",
            "method_kwargs.num_prototypes=16", "max_epochs=2", "precision=32"]
PER_METHOD = {"dino": ["method_kwargs.warmup_teacher_temperature_epochs=2"], "swav": ["method_kwargs.queue_size=8"]}


def tiny(preset: str, image_folder, *overrides):
    extra = PER_METHOD["dino" if "dino" in preset else "swav"]
    cfg = pretrain_cfg(f"pretrain/{preset}", [*TINY_RUN, *extra, *overrides], image_folder / "train")
    return cfg, solo_methods.METHODS[cfg.method](cfg)


def loop_loss(targets, logits, temperature, loss_weights):
    """SSLight's formula, one row at a time: L = lambda_gg * mean over the 2 global-global pairs
    + lambda_gl * mean over the 2 L global-local pairs of -sum_k t_a[b, k] log softmax(s_v[b] / tau)[k],
    each pair's term a mean over the batch (lambdas normalised to sum 1)."""
    lambda_gg, lambda_gl = (w / sum(loss_weights) for w in loss_weights)
    sums = {"gg": [], "gl": []}
    for a, target in enumerate(targets):
        for v, student in enumerate(logits):
            if v == a:
                continue
            rows = [-(target[b] * torch.log_softmax(student[b] / temperature, dim=0)).sum() for b in range(len(target))]
            sums["gg" if v < len(targets) else "gl"].append(sum(rows) / len(rows))
    return lambda_gg * sum(sums["gg"]) / len(sums["gg"]) + lambda_gl * sum(sums["gl"]) / len(sums["gl"])


def params_of(model, *modules):
    return [p for m in modules for p in getattr(model, m).parameters() if p.requires_grad]


def assert_same(got, want, tol=1e-10):
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


# --- registration --------------------------------------------------------------------------------

def test_methods_and_backbones_are_registered_through_solos_extension_points():
    assert solo_methods.METHODS["sslight_dino"] is SSLightDINO and issubclass(SSLightDINO, DINO)
    assert solo_methods.METHODS["sslight_swav"] is SSLightSwAV and issubclass(SSLightSwAV, SwAV)
    table = BaseMethod._BACKBONES
    assert table["resnet18"].__module__.startswith("solo.")  # solo-learn's own stays
    resnet = table["resnet34"]("sslight_dino", cifar_stem=True)
    assert resnet.inplanes == 512 and isinstance(resnet.fc, torch.nn.Identity)
    with torch.no_grad():
        assert resnet.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 512)
    vit = table["vit_tiny_patch16"]("sslight_dino", drop_path_rate=0.1)
    assert vit.num_features == 192
    with torch.no_grad():  # global and local crop sizes through one network
        assert vit.eval()(torch.randn(2, 3, 64, 64)).shape == vit(torch.randn(2, 3, 32, 32)).shape == (2, 192)


# --- the loss, value and gradient ----------------------------------------------------------------

@pytest.mark.parametrize("num_local", [6, 10])
def test_baseline_weights_are_solo_learns_dino_loss(num_local):
    """PairWeightedDINOLoss at baseline lambdas = solo-learn's DINOLoss chunked into every crop
    (float64): value, gradient and the updated centre; at SSLight lambdas, the row loop."""
    torch.manual_seed(0)
    views, batch, k = 2 + num_local, 5, 12
    settings = dict(num_prototypes=k, warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=5,
                    num_epochs=10, student_temp=0.1)
    ours = PairWeightedDINOLoss(pair_weights(2, num_local), **settings).double()
    solo = DINOLoss(num_large_crops=views, **settings).double()
    centre = torch.randn(1, k, dtype=torch.float64)
    for loss in (ours, solo):
        loss.center = centre.clone()
        loss.epoch = 3
    student = torch.randn(views * batch, k, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2 * batch, k, dtype=torch.float64)
    got, want = ours(student, teacher), solo(student, teacher)
    assert_same(got, want)
    assert_same(torch.autograd.grad(got, student)[0], torch.autograd.grad(want, student)[0])
    assert_same(ours.center, solo.center)

    weighted = PairWeightedDINOLoss(pair_weights(2, num_local, (0.4, 0.6)), **settings).double()
    weighted.center, weighted.epoch = centre.clone(), 3
    got = weighted(student, teacher)
    targets = F.softmax((teacher - centre) / solo.teacher_temp_schedule[3], dim=-1).chunk(2)
    want = loop_loss(targets, student.chunk(views), 0.1, (0.4, 0.6))
    assert_same(got, want)
    assert_same(torch.autograd.grad(got, student)[0], torch.autograd.grad(want, student)[0])
    assert not torch.allclose(got, solo(student, teacher))  # the weights matter


class Recorder:
    """Wraps ``obj.name`` to record its inputs and output."""

    def __init__(self, obj, name):
        self.calls, inner = [], getattr(obj, name)

        def call(*args):
            out = inner(*args)
            self.calls.append((args, out))
            return out

        setattr(obj, name, call)


@pytest.mark.parametrize("loss_weights", [None, (0.4, 0.6)])
def test_dino_step_equals_solo_learns_loss_or_the_row_loop(image_folder, loss_weights):
    """A float64 training step of sslight_dino on a batch of solo-learn's loader: every crop reaches
    the student; at baseline lambdas the loss is solo-learn's DINOLoss over all crops (value and
    gradient of every backbone and head parameter); at SSLight lambdas it is the row loop."""
    weights = "null" if loss_weights is None else f"[{loss_weights[0]},{loss_weights[1]}]"
    cfg, model = tiny("sslight_dino", image_folder, f"method_kwargs.loss_weights={weights}")
    model = model.double().train()
    model.dino_loss_func.center.normal_()  # a non-trivial centre
    centre = model.dino_loss_func.center.clone()
    record = Recorder(model.dino_loss_func, "forward")
    indexes, crops, targets = next(iter(train_loader(cfg)))
    total = model.training_step([indexes, [x.double() for x in crops], targets], 0)
    ((student, teacher), loss), = record.calls
    views, batch = len(crops), len(indexes)
    assert student.shape[0] == views * batch == 8 * 4 and teacher.shape[0] == 2 * batch  # small crops included
    params = params_of(model, "backbone", "head")
    if loss_weights is None:
        reference = DINOLoss(num_prototypes=16, warmup_teacher_temp=0.04, teacher_temp=0.07,
                             warmup_teacher_temp_epochs=2, num_epochs=2, student_temp=0.1,
                             num_large_crops=views).double()
        reference.center = centre.clone()
        want = reference(student, teacher)
        assert_same(reference.center, model.dino_loss_func.center)  # solo-learn's centre update ran
    else:
        tau_t = model.dino_loss_func.teacher_temp_schedule[0]
        assert tau_t == pytest.approx(0.04)  # epoch 0 of the warm-up
        targets = F.softmax((teacher - centre) / tau_t, dim=-1).chunk(2)
        want = loop_loss(targets, student.chunk(views), 0.1, loss_weights)
    assert_same(loss, want)
    got_grads = torch.autograd.grad(loss, params, retain_graph=True)
    for got_grad, want_grad in zip(got_grads, torch.autograd.grad(want, params)):
        assert_same(got_grad, want_grad)
    assert torch.isfinite(total)


def swav_pair(image_folder, loss_weights):
    weights = "null" if loss_weights is None else f"[{loss_weights[0]},{loss_weights[1]}]"
    cfg, ours = tiny("sslight_swav", image_folder, f"method_kwargs.loss_weights={weights}",
                     "method_kwargs.epoch_queue_starts=0")  # the queue's scores enter Sinkhorn
    ours = ours.double().train()
    ours.sk = SinkhornKnopp(cfg.method_kwargs.sk_iters, cfg.method_kwargs.sk_epsilon, 1)  # on_train_start's
    ours.queue.copy_(F.normalize(torch.randn_like(ours.queue), dim=-1))  # a filled queue
    return cfg, ours


def test_swav_step_at_baseline_weights_is_solo_learns_swav_step(image_folder):
    """Same weights, same batch, float64: sslight_swav and solo-learn's own swav (multi-crop, the
    queue active) give the same loss, gradients and queue after the step."""
    cfg, ours = swav_pair(image_folder, None)
    solo_cfg = cfg.copy()
    solo_cfg.method = "swav"
    solo = solo_methods.METHODS["swav"](solo_cfg).double().train()
    solo.load_state_dict(ours.state_dict(), strict=False)
    solo.sk = ours.sk
    solo.register_buffer("queue", ours.queue.clone())
    indexes, crops, targets = next(iter(train_loader(cfg)))
    batch = [indexes, [x.double() for x in crops], targets]
    losses = [model.training_step(batch, 0) for model in (ours, solo)]
    assert_same(losses[0], losses[1])
    names = ("backbone", "projector", "prototypes", "classifier")
    for got, want in zip(torch.autograd.grad(losses[0], params_of(ours, *names)),
                         torch.autograd.grad(losses[1], params_of(solo, *names))):  # two separate graphs
        assert_same(got, want)
    assert torch.equal(ours.queue, solo.queue)


def test_swav_step_at_sslight_weights_is_the_row_loop(image_folder, monkeypatch):
    """float64: the SwAV term of a step is the row loop over solo-learn's Sinkhorn codes (with the
    queue) and the prototype scores of every crop, value and gradient; then the queue holds this
    batch's two global projections first and the older entries shifted back."""
    cfg, model = swav_pair(image_folder, (0.4, 0.6))
    codes_of = Recorder(model, "get_assignments")
    terms, real = [], multicrop_methods.multicrop_cross_entropy
    monkeypatch.setattr(multicrop_methods, "multicrop_cross_entropy", lambda *a: terms.append(real(*a)) or terms[-1])
    indexes, crops, targets = next(iter(train_loader(cfg)))
    crops = [x.double() for x in crops]
    queue_before = model.queue.clone()
    model.training_step([indexes, crops, targets], 0)
    ((globals_,), codes), = codes_of.calls
    (term,) = terms
    # the prototype scores of every crop again (the same batch, so the same batch-norm statistics)
    preds = [model.prototypes(F.normalize(model.projector(model.backbone(x)))) for x in crops]
    assert_same(preds[0], globals_[0])
    want = loop_loss(codes, preds, cfg.method_kwargs.temperature, (0.4, 0.6))
    assert_same(term, want)
    params = params_of(model, "backbone", "projector", "prototypes")
    for got, expected in zip(torch.autograd.grad(term, params, retain_graph=True), torch.autograd.grad(want, params)):
        assert_same(got, expected)
    batch = len(indexes)
    with torch.no_grad():
        z = torch.stack([F.normalize(model.projector(model.backbone(x))) for x in crops[:2]])
    assert_same(model.queue[:, :batch], z)
    assert torch.equal(model.queue[:, batch:], queue_before[:, :-batch])


# --- every new preset trains through solo-learn's loader -----------------------------------------

@pytest.mark.parametrize("preset", NEW_PRESETS)
def test_every_new_preset_config_trains_on_cpu(preset, image_folder):
    cfg, model = tiny(preset, image_folder, *(["method_kwargs.epoch_queue_starts=1"] if "swav" in preset else []))
    assert (cfg.data.num_large_crops, cfg.data.num_small_crops) == (2, 10 if "vit" in preset else 6)
    solarization = [a.solarization.prob for a in cfg.augmentations]
    assert solarization == ([0.0, 0.2, 0.0] if "dino" in preset else [0.0, 0.0])  # one pipeline per global
    trainer = fit_epochs(model, cfg, epochs=2)
    name = "dino_loss" if "dino" in preset else "train_swav_loss"
    assert torch.isfinite(torch.tensor(logged(trainer, name)))
    if "dino" in preset:
        assert model.dino_loss_func.center.abs().sum() > 0
        assert model.dino_loss_func.epoch == 1
    else:
        assert (model.queue.abs().sum(-1) > 0).all()  # 2 epochs x 2 steps x 4 images fill the 8 slots
    if "vit" in preset:  # AdamW with the weight-decay schedule of DINO's ViT (this package's key)
        decays = {g["weight_decay"] for g in trainer.optimizers[0].param_groups} - {0}
        assert type(trainer.optimizers[0]).__name__ == "AdamW" and len(decays) == 1
        assert 0.04 < decays.pop() < 0.4


def fit_epochs(model, cfg, epochs):
    from lightning.pytorch import Trainer

    trainer = Trainer(max_epochs=epochs, limit_train_batches=2, accelerator="cpu", devices=1, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, train_loader(cfg))
    return trainer


# --- main_pretrain.py, checkpoints, kill and resume ----------------------------------------------

@pytest.mark.parametrize("preset", ["sslight_dino", "sslight_swav"])
def test_launcher_trains_and_resumes_keeping_the_centre_and_queue(preset, tmp_path, image_folder, solo_clone):
    """solo-learn's main_pretrain.py through the launcher, one epoch, then a second run resumed by
    solo-learn's resume_from_checkpoint: the DINO centre / SwAV queue continue from the checkpoint."""
    checkpoints = tmp_path / "checkpoints"
    extra = (["method_kwargs.warmup_teacher_temperature_epochs=1"] if "dino" in preset
             else ["method_kwargs.queue_size=16"])
    common = [f"data.train_path={image_folder / 'train'}", f"checkpoint.dir={checkpoints}", "optimizer.batch_size=4",
              "data.num_workers=0", *[o for o in TINY_RUN if not o.startswith("max_epochs")], *extra,
              "+limit_train_batches=2", "seed=3"]
    first = run_launcher(["pretrain", "--config-name", preset, "max_epochs=1", *common], tmp_path, solo_clone)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    (epoch0,) = sorted(checkpoints.rglob("*ep=0.ckpt"))
    state0 = torch.load(epoch0, map_location="cpu", weights_only=False)["state_dict"]
    second = run_launcher(["pretrain", "--config-name", preset, "max_epochs=2",
                           f"+resume_from_checkpoint={hydra_quote(str(epoch0))}", *common], tmp_path, solo_clone)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    (epoch1,) = sorted(checkpoints.rglob("*ep=1.ckpt"))
    resumed = torch.load(epoch1, map_location="cpu", weights_only=False)
    state1 = resumed["state_dict"]
    assert resumed["global_step"] == 4 and resumed["epoch"] == 1
    if preset == "sslight_dino":
        c0, c1 = state0["dino_loss_func.center"], state1["dino_loss_func.center"]
        assert c0.abs().sum() > 0 and not torch.equal(c0, c1)
        # two more EMA steps of momentum 0.9 from the saved centre: 0.81 of it is still there, so a
        # centre restarted from zero would be far off (the batch means are about the same size)
        assert (c1 - 0.81 * c0).norm() < (c1 - 0.0).norm()
    else:
        q0, q1 = state0["queue"], state1["queue"]  # 16 slots, 8 written per epoch, newest first
        assert q0.shape == (2, 16, 128) and (q0[:, :8].abs().sum(-1) > 0).all() and (q0[:, 8:] == 0).all()
        assert torch.equal(q1[:, 8:], q0[:, :8])  # epoch 1's entries, restored and shifted back


@pytest.mark.parametrize("preset", ["sslight_dino", "sslight_swav"])
def test_kill_and_resume_continues_exactly(preset, tmp_path, image_folder):
    """Killed after epoch 2 and resumed (`kill_and_resume`): epoch 3's losses and every final tensor
    (weights, teacher, DINO centre, SwAV queue) agree with the uninterrupted run. DINO's teacher
    temperature still warms up in epoch 3 and SwAV's queue enters Sinkhorn from epoch 2 on, so both
    depend on the restored state."""
    extra = (["method_kwargs.warmup_teacher_temperature_epochs=3"] if "dino" in preset
             else ["method_kwargs.queue_size=8", "method_kwargs.epoch_queue_starts=1"])
    overrides = [o for o in TINY_RUN if not o.startswith("max_epochs")] + ["max_epochs=3", *extra]
    full_state, resumed_state = kill_and_resume(tmp_path, image_folder, preset, overrides, batches=2)
    for key, value in full_state.items():
        torch.testing.assert_close(resumed_state[key], value, rtol=0, atol=1e-6, msg=key)
    kept = "dino_loss_func.center" if "dino" in preset else "queue"
    assert full_state[kept].abs().sum() > 0
