"""solo-learn integration against a real solo-learn install (skipped without one).

Run with a clone installed (see integrations/solo/README.md), e.g.
    SOLO_LEARN_PATH=/path/to/solo-learn python -m pytest tests/test_solo_integration.py -q
The launcher test needs the clone's main_pretrain.py / main_linear.py: SOLO_LEARN_PATH, or the
importable solo package's parent folder (an editable install of the clone).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.solo
solo_methods = pytest.importorskip("solo.methods", reason="solo-learn is not installed")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hydra import compose, initialize_config_module  # noqa: E402
from lightning.pytorch import Trainer, seed_everything  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from PIL import Image  # noqa: E402
from solo.args.pretrain import parse_cfg  # noqa: E402
from solo.data.pretrain_dataloader import (  # noqa: E402
    FullTransformPipeline,
    NCropAugmentation,
    build_transform_pipeline,
    prepare_dataloader,
    prepare_datasets,
)
from solo.losses.mocov2plus import mocov2plus_loss_func  # noqa: E402
from solo.losses.simclr import simclr_loss_func  # noqa: E402
from solo.methods.base import BaseMethod  # noqa: E402

from smooth_infonce.integrations.solo import CONFIG_PACKAGE, is_registered, moco_loss, register, simclr_loss  # noqa: E402
from smooth_infonce.integrations.solo.launcher import SCRIPTS, find_solo_clone  # noqa: E402
from smooth_infonce.integrations.solo.methods import SmoothMoCoV2Plus, SmoothSimCLR  # noqa: E402
from smooth_infonce.integrations.solo.registry import SoloLearnNotFound  # noqa: E402

LIGHTWEIGHT = ("mobilenetv3_large_100", "efficientnet_b0", "mobilenet_v2")
# Small enough for a CPU step: batch 4, queue 8 (full after 2 steps).
TINY = ["optimizer.batch_size=4", "data.num_workers=0"]


@pytest.fixture(scope="module", autouse=True)
def registered():
    register()
    return True


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """train/ and val/ ImageFolders of random 32 px RGB images, 5 classes x 4 (val: x 2). Five
    classes: solo-learn's linear model reports top-5 accuracy."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for split, count in (("train", 4), ("val", 2)):
        for label in range(5):
            folder = root / split / f"class_{label}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def pretrain_cfg(config_name: str, overrides, train_path: Path):
    """A shipped config composed and completed by solo-learn's own parse_cfg, as main_pretrain."""
    with initialize_config_module(CONFIG_PACKAGE, version_base="1.2"):
        cfg = compose(config_name, overrides=[f"data.train_path={train_path}", *TINY, *overrides])
    OmegaConf.set_struct(cfg, False)
    return parse_cfg(cfg)


def train_loader(cfg):
    """The pretraining loader main_pretrain.py builds (multi-crop transforms from cfg)."""
    transform = FullTransformPipeline([
        NCropAugmentation(build_transform_pipeline(cfg.data.dataset, aug), aug.num_crops)
        for aug in cfg.augmentations
    ])
    dataset = prepare_datasets(cfg.data.dataset, transform, train_data_path=cfg.data.train_path,
                               data_format=cfg.data.format, no_labels=cfg.data.no_labels)
    return prepare_dataloader(dataset, batch_size=cfg.optimizer.batch_size, num_workers=0)


def fit(model, cfg, steps: int) -> Trainer:
    trainer = Trainer(fast_dev_run=steps, accelerator="cpu", devices=1, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, train_loader(cfg))
    return trainer


def logged(trainer: Trainer, name: str) -> float:
    metrics = trainer.callback_metrics
    return float(metrics[name] if name in metrics else metrics[f"{name}_epoch"])


# --- registration ------------------------------------------------------------------------------

def test_register_adds_methods_and_backbones_idempotently():
    first = register()
    second = register()
    assert first == second and is_registered()
    assert solo_methods.METHODS["smooth_simclr"] is SmoothSimCLR
    assert solo_methods.METHODS["smooth_mocov2plus"] is SmoothMoCoV2Plus
    assert set(LIGHTWEIGHT) <= set(first["backbones"]) <= set(BaseMethod._BACKBONES)
    assert "resnet18" in BaseMethod._BACKBONES  # solo-learn's own entries stay


def test_register_refuses_to_replace_a_foreign_entry():
    class SomeoneElsesMethod:
        pass

    saved = solo_methods.METHODS["smooth_simclr"]
    solo_methods.METHODS["smooth_simclr"] = SomeoneElsesMethod
    try:
        with pytest.raises(ValueError, match="not smooth-infonce"):
            register()
    finally:
        solo_methods.METHODS["smooth_simclr"] = saved
    register()


@pytest.mark.parametrize("name", LIGHTWEIGHT)
def test_solo_builds_the_backbone_with_its_true_width(name):
    backbone = BaseMethod._BACKBONES[name]("smooth_mocov2plus", cifar_stem=True)
    assert backbone.num_features == 1280
    with torch.no_grad():
        assert backbone.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 1280)


# --- losses against solo-learn's own functions ---------------------------------------------------

def test_losses_at_smoothing_zero_equal_solo_learns_functions():
    torch.manual_seed(0)
    z = torch.randn(2 * 10, 32)
    indexes = torch.arange(10).repeat(2)
    torch.testing.assert_close(simclr_loss(z, indexes, temperature=0.2, backend="reference"),
                               simclr_loss_func(z, indexes=indexes, temperature=0.2))
    q1, q2, k1, k2 = (F.normalize(torch.randn(8, 16), dim=-1) for _ in range(4))
    solo_queue = F.normalize(torch.randn(2, 16, 64), dim=1)  # solo-learn's (2, D, K) layout
    expected = (mocov2plus_loss_func(q1, k2, solo_queue[1], 0.2) + mocov2plus_loss_func(q2, k1, solo_queue[0], 0.2)) / 2
    ours = moco_loss([q1, q2], [k1, k2], solo_queue.transpose(1, 2), temperature=0.2, symmetric="mean",
                     backend="reference")
    torch.testing.assert_close(ours, expected)


def test_methods_at_smoothing_zero_train_like_solo_learns(image_folder):
    """Same weights, same batch: smooth_simclr / smooth_mocov2plus (symmetric mean, two crops,
    alpha 0) log the same contrastive loss as solo-learn's simclr / mocov2plus."""
    two_crops = ["dataset=cifar_custom", "augmentations=moco_v2", "backbone.name=tiny_cnn"]
    for ours_name, solo_name, config, extra in (
        ("smooth_simclr", "simclr", "pretrain/smoke_cpu_simclr", ["method_kwargs.loss_weights=null"]),
        ("smooth_mocov2plus", "mocov2plus", "pretrain/smoke_cpu", ["method_kwargs.symmetric=mean"]),
    ):
        cfg = pretrain_cfg(config, [*two_crops, *extra, "method_kwargs.smoothing=0.0"], image_folder / "train")
        solo_cfg = cfg.copy()
        solo_cfg.method = solo_name
        torch.manual_seed(0)
        reference = solo_methods.METHODS[solo_name](solo_cfg)
        ours = solo_methods.METHODS[ours_name](cfg)
        state = {k: v for k, v in reference.state_dict().items() if k != "queue"}
        ours.load_state_dict(state, strict=False)
        if solo_name == "mocov2plus":
            ours.queue.copy_(reference.queue.transpose(1, 2))
        losses = []
        for model in (reference, ours):
            seed_everything(1)
            losses.append(logged(fit(model, cfg, steps=1), "train_nce_loss"))
        assert losses[0] == pytest.approx(losses[1], rel=1e-5), ours_name


# --- a training step of every method x backbone on CPU ------------------------------------------

@pytest.mark.parametrize("backbone", LIGHTWEIGHT)
@pytest.mark.parametrize("config", ["pretrain/smoke_cpu", "pretrain/smoke_cpu_simclr"])
def test_fast_dev_run_every_method_and_backbone(config, backbone, image_folder):
    queue = ["method_kwargs.queue_size=8"] if config == "pretrain/smoke_cpu" else []
    cfg = pretrain_cfg(config, [f"backbone={backbone}", *queue], image_folder / "train")
    assert (cfg.data.num_large_crops, cfg.data.num_small_crops) == (2, 6)
    model = solo_methods.METHODS[cfg.method](cfg)
    assert model.features_dim == 1280
    trainer = fit(model, cfg, steps=1)
    assert np.isfinite(logged(trainer, "train_nce_loss"))
    # SSLight's no-decay rules reached the optimiser: depthwise kernels and 1-D parameters
    decay_of = {id(p): group["weight_decay"] for group in trainer.optimizers[0].param_groups for p in group["params"]}
    depthwise = [m.weight for m in model.backbone.modules()
                 if isinstance(m, torch.nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels]
    assert depthwise and all(decay_of[id(w)] == 0 for w in depthwise)
    assert all(decay_of[id(p)] == 0 for p in model.backbone.parameters() if p.ndim <= 1)
    dense = [p for p in model.backbone.parameters() if p.ndim == 4 and p.shape[1] > 1]
    assert all(decay_of[id(p)] == cfg.optimizer.weight_decay for p in dense)


def test_moco_waits_for_a_full_queue_then_smooths(image_folder):
    cfg = pretrain_cfg("pretrain/smoke_cpu", ["backbone.name=tiny_cnn", "method_kwargs.queue_size=8"],
                       image_folder / "train")
    model = solo_methods.METHODS[cfg.method](cfg)
    assert model.symmetric is None and model.queue.shape == (1, 8, 128)
    assert model.current_smoothing() == 0.0 and model.smoothing == pytest.approx(0.1)
    fit(model, cfg, steps=1)
    assert not bool(model.queue_filled) and int(model.queue_ptr) == 4
    fit(model, cfg, steps=1)
    assert bool(model.queue_filled) and model.current_smoothing() == pytest.approx(0.1)
    assert "queue_filled" in model.state_dict()  # saved with the checkpoint


def test_min_lr_per_256_follows_the_batch(image_folder):
    cfg = pretrain_cfg("pretrain/smoke_cpu", ["backbone.name=tiny_cnn", "method_kwargs.queue_size=8"],
                       image_folder / "train")
    model = solo_methods.METHODS[cfg.method](cfg)
    assert model.min_lr == pytest.approx(0.0012 * 4 / 256)
    assert model.lr == pytest.approx(0.48 * 4 / 256)  # solo-learn's own scaling of lr


# --- the launcher with solo-learn's own scripts --------------------------------------------------

@pytest.fixture(scope="module")
def solo_clone() -> Path:
    try:
        return find_solo_clone(None, SCRIPTS["pretrain"])
    except SoloLearnNotFound:
        pytest.skip("no solo-learn clone with main_pretrain.py (set SOLO_LEARN_PATH)")


def run_launcher(args, cwd: Path, clone: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "SOLO_LEARN_PATH": str(clone), "WANDB_MODE": "disabled"}
    return subprocess.run([sys.executable, "-m", "smooth_infonce.integrations.solo", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)


def test_launcher_pretrains_then_evaluates_on_cpu(tmp_path, image_folder, solo_clone):
    checkpoints = tmp_path / "checkpoints"
    pretrain = run_launcher(["pretrain", "--config-name", "smoke_cpu", f"data.train_path={image_folder / 'train'}",
                             f"checkpoint.dir={checkpoints}", *TINY, "method_kwargs.queue_size=8",
                             "limit_train_batches=3"], tmp_path, solo_clone)
    assert pretrain.returncode == 0, pretrain.stdout[-4000:] + pretrain.stderr[-4000:]
    saved = sorted((checkpoints / "smooth_mocov2plus").rglob("*.ckpt"))
    assert saved, f"no checkpoint under {checkpoints}"
    state = torch.load(saved[-1], map_location="cpu", weights_only=False)["state_dict"]
    assert bool(state["queue_filled"]) and state["queue"].shape == (1, 8, 128)

    assert "=" in saved[-1].name  # solo-learn names checkpoints "...-ep=0.ckpt": --checkpoint quotes it
    linear = run_launcher(["linear", "--config-name", "smoke_cpu", "--checkpoint", str(saved[-1]),
                           f"data.train_path={image_folder / 'train'}", f"data.val_path={image_folder / 'val'}",
                           *TINY], tmp_path, solo_clone)
    assert linear.returncode == 0, linear.stdout[-4000:] + linear.stderr[-4000:]


def test_launcher_explains_a_wrong_solo_path(tmp_path, solo_clone):
    result = run_launcher(["pretrain", "--config-name", "smoke_cpu", "--solo-path", str(tmp_path)], tmp_path, solo_clone)
    assert result.returncode == 2 and "pip install --no-build-isolation" in result.stderr
