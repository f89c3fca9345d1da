"""solo-learn integration, the parts that need no solo-learn: shipped configs (generated from the
presets), backbones, losses, the MoCo queue and its step, option parsing and the launcher's error path.

The loss oracles restate solo-learn's two formulas from the math (solo/losses/simclr.py and
mocov2plus.py compute exactly these); lightly's NTXentLoss is an independent cross-check; the MoCo
step is checked over several steps against a queue kept as a Python list and the row-by-row oracle.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from smooth_infonce import LossOptions, SmoothingSchedule, smooth_infonce
from smooth_infonce.integrations.recipes import (
    OptimizerSpec,
    get_preset,
    list_presets,
    query_view_weights,
    view_loss_weights,
)
from smooth_infonce.integrations.recipes.backbones import build_backbone
from smooth_infonce.integrations.recipes.optim import parameter_groups, split_no_decay
from smooth_infonce.integrations.solo import (
    CONFIG_PACKAGE,
    METHOD_NAMES,
    SOLO_BACKBONES,
    KeyQueue,
    generate,
    list_configs,
    moco_loss,
    moco_step,
    simclr_loss,
    solo_backbone_factory,
)
from smooth_infonce.integrations.solo.backbones import SOLO_RESNETS
from smooth_infonce.integrations.solo.configs_index import config_dir, list_group_options
from smooth_infonce.integrations.solo.launcher import (
    find_solo_clone,
    hydra_argv,
    hydra_quote,
    main,
    resolve_config_name,
)
from smooth_infonce.integrations.solo.options import (
    loss_options,
    loss_options_to_yaml,
    moco_settings,
    symmetric_mode,
    validate_flag,
)
from smooth_infonce.integrations.solo.registry import SOLO_INSTALL_HINT, SoloLearnNotFound, register

from oracles import loop_oracle, moco_oracle

SOLO_INSTALLED = importlib.util.find_spec("solo") is not None
LIGHTWEIGHT = ("mobilenetv3_large_100", "efficientnet_b0", "mobilenet_v2")
# backbone groups beyond the lightweight CNNs: solo-learn's own resnet18, the registered resnet34 and ViT
BACKBONE_GROUPS = {*LIGHTWEIGHT, "resnet18", "resnet34", "vit_tiny_patch16"}
SMOOTH_METHODS = ("smooth_simclr", "smooth_mocov2plus")
GROUPS = list_group_options()
# Values that configs leave to the command line (???), filled so every key resolves.
REQUIRED_OVERRIDES = {
    "linear/linear": ["pretrained_feature_extractor=/ckpt/model.ckpt"],
    "linear/smoke_cpu": ["pretrained_feature_extractor=/ckpt/model.ckpt"],
}
# cifar_custom has no default folders (and is the smoke configs' dataset)
CUSTOM_DATA = ["data.train_path=/data/train"]
CUSTOM_LINEAR_DATA = CUSTOM_DATA + ["data.val_path=/data/val"]
AUGMENTATION_KEYS = {
    "crop_size", "num_crops", "rrc.enabled", "rrc.crop_min_scale", "rrc.crop_max_scale", "color_jitter.prob",
    "color_jitter.brightness", "color_jitter.contrast", "color_jitter.saturation", "color_jitter.hue",
    "grayscale.prob", "gaussian_blur.prob", "solarization.prob", "equalization.prob", "horizontal_flip.prob",
}
# What solo-learn's main_*.py, args/*.py and the methods read without a default.
SHARED_KEYS = {"name", "backbone.name", "data.dataset", "data.train_path", "optimizer.name",
               "optimizer.batch_size", "optimizer.lr", "optimizer.weight_decay", "scheduler.name",
               "max_epochs", "devices", "accelerator", "wandb.enabled"}
PRETRAIN_KEYS = SHARED_KEYS | {"method", "method_kwargs.proj_hidden_dim", "method_kwargs.proj_output_dim",
                               "optimizer.classifier_lr"}
MOCO_KEYS = {"method_kwargs.queue_size", "momentum.base_tau", "momentum.final_tau"}
# What solo-learn's DINO / SwAV read without a default (plus their defaulted keys, all generated).
DINO_KEYS = {"method_kwargs." + k for k in (
    "proj_hidden_dim", "proj_output_dim", "num_prototypes", "use_bn_in_head", "norm_last_layer", "student_temperature",
    "teacher_temperature", "warmup_teacher_temperature", "warmup_teacher_temperature_epochs", "center_momentum",
    "freeze_last_layer", "clip_grad", "loss_weights")} | {"momentum.base_tau", "momentum.final_tau"}
SWAV_KEYS = {"method_kwargs." + k for k in (
    "proj_hidden_dim", "proj_output_dim", "num_prototypes", "temperature", "sk_iters", "sk_epsilon", "queue_size",
    "epoch_queue_starts", "freeze_prototypes_epochs", "loss_weights")}
LINEAR_KEYS = SHARED_KEYS | {"data.val_path", "pretrained_feature_extractor"}


def compose_config(name: str, overrides=()):
    overrides = list(overrides)
    custom = "dataset=cifar_custom" in overrides or ("smoke" in name and not any(
        o.startswith("dataset=") for o in overrides))
    if custom:
        overrides = (CUSTOM_LINEAR_DATA if name.startswith("linear/") else CUSTOM_DATA) + overrides
    cfg = compose(name, overrides=[*REQUIRED_OVERRIDES.get(name, []), *overrides])
    OmegaConf.resolve(cfg)  # every interpolation must resolve
    return cfg


@pytest.fixture(scope="module", autouse=True)
def shipped_configs():
    """Hydra initialised once on the shipped config package (compose needs it)."""
    with initialize_config_module(CONFIG_PACKAGE, version_base="1.2"):
        yield


def has_key(cfg, dotted: str) -> bool:
    """Present and not ??? (select returns the default for both)."""
    return OmegaConf.select(cfg, dotted, default="<absent>") != "<absent>"


def count_crops(augmentations) -> tuple[int, int]:
    """solo-learn's rule (args/pretrain.py): crops of the first pipeline's size are large."""
    large_size = augmentations[0].crop_size
    large = sum(p.num_crops for p in augmentations if p.crop_size == large_size)
    small = sum(p.num_crops for p in augmentations if p.crop_size != large_size)
    return large, small


# --- import hygiene ----------------------------------------------------------------------------

def test_package_imports_without_importing_solo():
    code = ("import sys, smooth_infonce.integrations.solo as s; "
            "assert 'solo' not in sys.modules, 'solo imported'; assert s.METHOD_NAMES")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.skipif(SOLO_INSTALLED, reason="solo-learn is installed here")
def test_register_without_solo_raises_with_install_recipe():
    with pytest.raises(SoloLearnNotFound) as info:
        register()
    assert "pip install --no-build-isolation" in str(info.value)


# --- configs -----------------------------------------------------------------------------------

def test_shipped_configs_are_listed():
    assert set(list_configs("pretrain")) == {f"pretrain/{p}" for p in list_presets()} | {
        "pretrain/smoke_cpu", "pretrain/smoke_cpu_simclr"}
    assert {"pretrain/sslight_dino", "pretrain/sslight_swav", "pretrain/sslight_dino_vit"} <= set(list_configs())
    assert set(list_configs("linear")) == {"linear/linear", "linear/smoke_cpu"}
    assert set(GROUPS["backbone"]) == BACKBONE_GROUPS
    assert {"imagenet", "imagenet100", "cifar_custom"} <= set(GROUPS["dataset"])


def backbone_dataset_grid(name: str):
    """Every dataset with the config's own backbone, every backbone on ImageNet and on CIFAR (the
    full grid of backbones x datasets: `test_every_backbone_composes_with_every_dataset`)."""
    own = compose(name, overrides=CUSTOM_DATA if "smoke" in name else []).backbone.name
    pairs = {(own, dataset) for dataset in GROUPS["dataset"]}
    return sorted(pairs | {(b, d) for b in GROUPS["backbone"] for d in ("imagenet", "cifar_custom")})


@pytest.mark.parametrize("name", list_configs("pretrain"))
def test_pretrain_configs_compose_for_every_backbone_and_dataset(name):
    check_pretrain_config(name, backbone_dataset_grid(name))


def test_every_backbone_composes_with_every_dataset():
    check_pretrain_config("pretrain/sslight_dino", [(b, d) for b in GROUPS["backbone"] for d in GROUPS["dataset"]])


def check_pretrain_config(name, grid):
    for backbone, dataset in grid:
        cfg = compose_config(name, [f"backbone={backbone}", f"dataset={dataset}"])
        where = f"{name} backbone={backbone} dataset={dataset}"
        missing = {k for k in PRETRAIN_KEYS if not has_key(cfg, k)}
        assert not missing, f"{where}: missing {missing}"
        assert cfg.method in METHOD_NAMES and cfg.backbone.name == backbone
        assert cfg.backbone.name in (*SOLO_BACKBONES, *SOLO_RESNETS, "resnet18")
        # the shared CNNs take the dataset's stem; solo-learn's resnet18 and the ViT take none
        stem = cfg.backbone.kwargs.get("cifar_stem")
        assert stem == (cfg.views.global_size <= 64) or (stem is None and backbone in ("resnet18", "vit_tiny_patch16"))
        required = {"smooth_mocov2plus": MOCO_KEYS, "sslight_dino": DINO_KEYS, "sslight_swav": SWAV_KEYS}
        assert all(has_key(cfg, k) for k in required.get(cfg.method, ())), where
        if cfg.method in ("smooth_mocov2plus", "sslight_swav"):
            assert cfg.method_kwargs.queue_size % cfg.optimizer.batch_size == 0
        for pipeline in cfg.augmentations:
            assert all(has_key(pipeline, k) for k in AUGMENTATION_KEYS), f"{where}: {pipeline}"
        large, small = count_crops(cfg.augmentations)
        assert large == 2, f"{where}: main_pretrain.py needs exactly 2 large crops"
        assert isinstance(cfg.optimizer.lr, float) and isinstance(cfg.optimizer.weight_decay, float)
        assert cfg.accelerator != "cpu" or cfg.devices == "1"
        assert cfg.data.dataset in ("cifar10", "cifar100", "stl10", "imagenet", "imagenet100", "custom")
        if cfg.method == "sslight_dino":  # solo-learn's teacher-temperature schedule needs it
            assert cfg.method_kwargs.warmup_teacher_temperature_epochs <= cfg.max_epochs
        if cfg.method not in SMOOTH_METHODS:
            continue
        # the method's own checks, as it runs them at start-up
        options = loss_options(cfg.method_kwargs, cfg.max_epochs)
        negatives = cfg.method_kwargs.get("queue_size", 2 * cfg.optimizer.batch_size)
        assert options.neighbors is None or options.neighbors < negatives
        assert options.few_negatives == "use_all"
        if cfg.method == "smooth_mocov2plus":
            moco_settings(cfg.method_kwargs, options)


@pytest.mark.parametrize("name", list_configs("linear"))
def test_linear_configs_compose_for_every_backbone_and_dataset(name):
    for backbone in GROUPS["backbone"]:
        for dataset in GROUPS["dataset"]:
            cfg = compose_config(name, [f"backbone={backbone}", f"dataset={dataset}"])
            missing = {k for k in LINEAR_KEYS if not has_key(cfg, k)}
            assert not missing, f"{name} {backbone} {dataset}: missing {missing}"
            assert cfg.pretrain_method in METHOD_NAMES
            assert "cifar_stem" not in cfg.backbone.kwargs or cfg.backbone.kwargs.cifar_stem == cfg.views.cifar_stem


def test_required_values_are_marked_missing():
    assert OmegaConf.is_missing(compose("pretrain/smoke_cpu").data, "train_path")
    # optional in pretraining (solo-learn reads ??? as None: no online validation)
    assert OmegaConf.is_missing(compose("pretrain/smoke_cpu").data, "val_path")
    assert OmegaConf.is_missing(compose("linear/smoke_cpu").data, "val_path")
    assert OmegaConf.is_missing(compose("linear/linear"), "pretrained_feature_extractor")


@pytest.mark.parametrize("preset", ["sslight_moco", "sslight_dino", "sslight_swav", "dino_vit_baseline"])
def test_cifar_dataset_scales_the_crops_and_drops_the_blur(preset):
    """Every view's blur follows the dataset (off at 32 px); solarisation and the crops' split into
    pipelines do not."""
    cfg = compose_config(f"pretrain/{preset}", ["dataset=cifar_custom"])
    imagenet = compose_config(f"pretrain/{preset}", ["dataset=imagenet"])
    sizes = [(p.crop_size, p.num_crops) for p in cfg.augmentations]
    local = {"dino_vit_baseline": (14, 10)}.get(preset, (18, 6))
    assert sizes == ([(32, 2)] if preset == "sslight_swav" else [(32, 1), (32, 1)]) + [local]
    assert all(p.gaussian_blur.prob == 0 for p in cfg.augmentations)
    assert any(p.gaussian_blur.prob > 0 for p in imagenet.augmentations)
    assert [p.solarization.prob for p in cfg.augmentations] == [p.solarization.prob for p in imagenet.augmentations]
    if preset != "dino_vit_baseline":
        assert cfg.backbone.kwargs.cifar_stem is True
    assert cfg.data.dataset == "custom" and count_crops(cfg.augmentations)[0] == 2
    assert list(cfg.augmentations[0].mean) == pytest.approx([0.4914, 0.4822, 0.4465])


def test_command_line_overrides_reach_the_config():
    cfg = compose_config("pretrain/light_moco", ["method_kwargs.smoothing=0.3", "optimizer.batch_size=128",
                                                 "devices=[0,1]", "backbone=efficientnet_b0"])
    assert cfg.method_kwargs.smoothing == 0.3 and cfg.optimizer.batch_size == 128
    assert list(cfg.devices) == [0, 1] and cfg.name == "light_moco-efficientnet_b0-imagenet"


PRESET_CONFIGS = list_presets()
METHOD_OF = {"moco": "smooth_mocov2plus", "simclr": "smooth_simclr", "dino": "sslight_dino", "swav": "sslight_swav"}


def test_every_preset_has_a_config():
    assert {"moco_v2_baseline", "light_moco", "sslight_baseline", "sslight_moco", "sslight_moco_smooth",
            "dino_baseline", "sslight_dino", "dino_vit_baseline", "sslight_dino_vit", "swav_baseline",
            "sslight_swav"} <= set(PRESET_CONFIGS)
    assert {f"pretrain/{p}" for p in PRESET_CONFIGS} <= set(list_configs("pretrain"))


def per_view(cfg, read):
    """``read(pipeline)`` for every crop, in solo-learn's crop order (pipelines in order, each
    repeated num_crops times: FullTransformPipeline)."""
    return [read(p) for p in cfg.augmentations for _ in range(p.num_crops)]


def check_views(cfg, recipe):
    """The composed pipelines are the preset's views, view by view (ImageNet resolution)."""
    views = recipe.views
    assert count_crops(cfg.augmentations) == (views.global_crops.count, views.num_local)
    crops = [views.global_crops] * views.global_crops.count + [views.local_crops] * views.num_local
    assert per_view(cfg, lambda p: p.crop_size) == [c.size for c in crops]
    assert per_view(cfg, lambda p: (p.rrc.crop_min_scale, p.rrc.crop_max_scale)) == [c.scale for c in crops]
    assert per_view(cfg, lambda p: p.gaussian_blur.prob) == pytest.approx(views.view_probs(views.blur_prob))
    assert per_view(cfg, lambda p: p.solarization.prob) == pytest.approx(views.view_probs(views.solarize_prob))
    for pipeline in cfg.augmentations:
        jitter = pipeline.color_jitter
        assert (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue) == pytest.approx(views.color_jitter)
        assert jitter.prob == views.color_jitter_prob and pipeline.grayscale.prob == views.grayscale_prob
        assert pipeline.horizontal_flip.prob == views.hflip_prob and pipeline.equalization.prob == 0
        assert tuple(pipeline.mean) == pytest.approx(views.mean) and tuple(pipeline.std) == pytest.approx(views.std)
    assert views.interpolation == "bicubic" or recipe.framework in ("moco", "simclr")  # solo-learn: bicubic
    weights = cfg.method_kwargs.loss_weights
    assert (None if weights is None else tuple(weights)) == views.loss_weights


def check_optimizer(cfg, recipe):
    """solo-learn scales lr per 256 images like the preset; the per-256 floor and warm-up start
    and the weight-decay schedule are this package's keys (optimizer_cfg)."""
    opt = recipe.optimizer
    assert cfg.optimizer.name == opt.name and cfg.optimizer.lr == pytest.approx(opt.lr_per_256)
    assert cfg.optimizer.weight_decay == pytest.approx(opt.weight_decay)
    assert cfg.optimizer.get("weight_decay_end") == opt.weight_decay_end
    if opt.name == "adamw":
        assert list(cfg.optimizer.kwargs.betas) == [0.9, 0.999] and "momentum" not in cfg.optimizer.kwargs
    else:
        assert cfg.optimizer.kwargs.momentum == opt.momentum
    assert cfg.optimizer.exclude_bias_n_norm_wd == opt.exclude_bias_norm
    assert cfg.optimizer.exclude_depthwise_wd == opt.exclude_depthwise
    if opt.name == "lars":
        assert cfg.optimizer.kwargs.eta == opt.trust_coefficient
        assert cfg.optimizer.kwargs.exclude_bias_n_norm == opt.exclude_bias_norm
    assert cfg.scheduler.name == "warmup_cosine" and opt.lr_schedule == "cosine"
    assert cfg.scheduler.warmup_epochs == opt.warmup_epochs and cfg.scheduler.interval == "step"
    assert cfg.scheduler.min_lr_per_256 == pytest.approx(opt.min_lr_per_256)
    assert cfg.scheduler.get("warmup_start_lr_per_256", 0.0) == pytest.approx(opt.warmup_start_lr_per_256)
    assert cfg.max_epochs == recipe.epochs
    assert recipe.batch_size % cfg.optimizer.batch_size == 0  # per-device batch x GPUs = the preset's
    run = generate.SOLO_RUNS.get(recipe.name, generate.SoloRun())
    assert recipe.batch_size // cfg.optimizer.batch_size == run.devices


def check_smoothed_method(cfg, recipe):
    kwargs, loss = cfg.method_kwargs, recipe.loss
    # head: solo-learn's MoCo V2+ projector is Linear -> ReLU -> Linear without BN
    assert recipe.head.num_layers == 2 and not recipe.head.batch_norm
    # loss: the preset's options (the solo methods' few_negatives policy), hence the same alpha schedule
    options = loss_options(kwargs, cfg.max_epochs)
    assert options == loss.to_options(recipe.epochs, few_negatives="use_all")
    assert (options.temperature, options.smoothing, options.neighbors) == (
        loss.temperature, loss.smoothing, loss.neighbors_or_none)
    ramp = loss.smoothing_schedule(recipe.epochs)
    assert [options.smoothing_at(e) for e in range(recipe.epochs + 2)] == [ramp(e) for e in range(recipe.epochs + 2)]
    assert kwargs.wait_for_full_bank == loss.wait_for_full_bank and kwargs.mask_own_queue_entries is True
    assert symmetric_mode(kwargs) == recipe.moco.symmetric
    assert kwargs.queue_size == recipe.moco.queue_size
    assert cfg.momentum.base_tau == cfg.momentum.final_tau == recipe.moco.key_momentum


def check_dino(cfg, recipe):
    kwargs, dino, head = cfg.method_kwargs, recipe.dino, recipe.head
    assert (kwargs.proj_hidden_dim, kwargs.proj_output_dim, kwargs.use_bn_in_head) == (
        head.hidden_dim, head.output_dim, head.batch_norm)
    assert head.num_layers == 3  # solo-learn's DINOHead default, which its DINO does not expose
    assert (kwargs.num_prototypes, kwargs.norm_last_layer) == (dino.num_prototypes, dino.norm_last_layer)
    assert (kwargs.student_temperature, kwargs.teacher_temperature, kwargs.warmup_teacher_temperature,
            kwargs.warmup_teacher_temperature_epochs) == (
        dino.student_temperature, dino.teacher_temperature, dino.warmup_teacher_temperature,
        dino.warmup_teacher_temperature_epochs)
    assert kwargs.center_momentum == dino.center_momentum
    assert kwargs.freeze_last_layer == dino.freeze_last_layer_epochs and kwargs.clip_grad == 0
    assert (cfg.momentum.base_tau, cfg.momentum.final_tau) == (dino.teacher_momentum, dino.teacher_momentum_end)
    assert cfg.momentum.classifier is False
    assert dict(cfg.backbone.kwargs).items() >= dict(recipe.backbone.kwargs).items()  # ViT: drop path 0.1


def check_swav(cfg, recipe):
    kwargs, swav, head = cfg.method_kwargs, recipe.swav, recipe.head
    assert (kwargs.proj_hidden_dim, kwargs.proj_output_dim) == (head.hidden_dim, head.output_dim)
    assert head.num_layers == 2 and head.batch_norm  # solo-learn's SwAV projector: Linear BN ReLU Linear
    assert (kwargs.num_prototypes, kwargs.temperature, kwargs.sk_iters, kwargs.sk_epsilon) == (
        swav.num_prototypes, swav.temperature, swav.sinkhorn_iterations, swav.sinkhorn_epsilon)
    assert kwargs.queue_size == swav.queue_length(recipe.batch_size) == 3072  # 3840 trimmed at batch 1024
    assert (kwargs.epoch_queue_starts, kwargs.freeze_prototypes_epochs) == (
        swav.queue_start_epoch, swav.freeze_prototypes_epochs)
    assert "momentum" not in cfg or cfg.momentum is None


@pytest.mark.parametrize("preset_name", PRESET_CONFIGS)
def test_config_matches_the_shared_preset(preset_name):
    """The YAML is the solo-learn rendering of the preset: every number the preset fixes agrees."""
    recipe = get_preset(preset_name)
    cfg = compose_config(f"pretrain/{preset_name}", ["dataset=imagenet"])
    assert cfg.backbone.name == recipe.backbone.name and cfg.method == METHOD_OF[recipe.framework]
    {"moco": check_smoothed_method, "simclr": check_smoothed_method, "dino": check_dino,
     "swav": check_swav}[recipe.framework](cfg, recipe)
    check_optimizer(cfg, recipe)
    check_views(cfg, recipe)


def test_moco_presets_carry_the_authors_photometric_augmentations():
    """SSLight's MoCo (as its DINO): ColorJitter(0.4, 0.4, 0.2, 0.1), blur 1.0 / 0.1 / 0.5 and
    solarisation 0 / 0.2 / 0 on global 1 / global 2 / the locals."""
    for preset in ("sslight_baseline", "sslight_moco", "sslight_moco_smooth", "dino_baseline", "sslight_dino"):
        cfg = compose_config(f"pretrain/{preset}", ["dataset=imagenet"])
        assert per_view(cfg, lambda p: p.gaussian_blur.prob) == [1.0, 0.1] + [0.5] * 6, preset
        assert per_view(cfg, lambda p: p.solarization.prob) == [0.0, 0.2] + [0.0] * 6, preset
        assert per_view(cfg, lambda p: p.color_jitter.saturation) == [0.2] * 8, preset
    swav = compose_config("pretrain/sslight_swav", ["dataset=imagenet"])
    assert per_view(swav, lambda p: (p.gaussian_blur.prob, p.solarization.prob)) == [(0.5, 0.0)] * 8


# --- generated configs ----------------------------------------------------------------------

def test_shipped_preset_configs_equal_the_generated_ones():
    """The presets are the one source: `smooth-infonce-solo configs --write` rewrites these files."""
    assert generate.stale_files() == {}
    generated = set(generate.generated_files())
    assert {f"pretrain/{p}.yaml" for p in list_presets()} <= generated
    groups = {"moco_v2", "sslight", "sslight_baseline", "swav_baseline", "sslight_swav", "dino_vit_baseline",
              "sslight_dino_vit"}
    assert {f"augmentations/{group}.yaml" for group in groups} <= generated
    for rel in generated:
        assert (generate.Path(config_dir()) / rel).read_text().count(generate.GENERATED_MARK) == 1


def test_generator_writes_reports_and_removes_stale_files(tmp_path):
    assert set(generate.write(tmp_path)) == set(generate.generated_files())
    assert generate.stale_files(tmp_path) == {} and generate.write(tmp_path) == []
    (tmp_path / "pretrain/light_moco.yaml").write_text("edited\n")
    (tmp_path / "pretrain/old_preset.yaml").write_text(f"{generate.GENERATED_MARK} from a preset.\n")
    (tmp_path / "pretrain/mine.yaml").write_text("# hand-written\n")
    (tmp_path / "augmentations/moco_v2.yaml").unlink()
    assert generate.stale_files(tmp_path) == {
        "pretrain/light_moco.yaml": "differs from the preset", "augmentations/moco_v2.yaml": "missing",
        "pretrain/old_preset.yaml": "generated from a preset that no longer exists"}
    assert generate.write(tmp_path) == ["augmentations/moco_v2.yaml", "pretrain/light_moco.yaml",
                                        "pretrain/old_preset.yaml"]
    assert not (tmp_path / "pretrain/old_preset.yaml").exists() and (tmp_path / "pretrain/mine.yaml").exists()
    assert generate.stale_files(tmp_path) == {}


def test_configs_check_command(capsys):
    assert main(["configs", "--check"]) == 0
    with pytest.raises(SystemExit):
        main(["configs", "--write", "--check"])


def test_generated_config_follows_a_changed_preset(monkeypatch):
    """A preset change reaches the rendered YAML (the generator reads the presets, not a copy)."""
    changed = get_preset("light_moco", loss__smoothing=0.3, loss__mode="uniform", moco__queue_size=4096)
    monkeypatch.setattr(generate, "get_preset", lambda name: changed if name == "light_moco" else get_preset(name))
    config = generate.pretrain_config("light_moco")
    assert config["method_kwargs"]["smoothing"] == 0.3 and config["method_kwargs"]["neighbors"] is None
    assert config["method_kwargs"]["queue_size"] == 4096
    assert "pretrain/light_moco.yaml" in generate.stale_files()
    symmetric = get_preset("light_moco", moco__symmetric="sum")
    monkeypatch.setattr(generate, "get_preset", lambda name: symmetric if name == "light_moco" else get_preset(name))
    assert generate.pretrain_config("light_moco")["method_kwargs"]["symmetric"] == "sum"


# --- options -----------------------------------------------------------------------------------

def test_every_loss_option_is_a_method_kwarg_of_the_same_name():
    options = loss_options({"temperature": 0.2}, max_epochs=10)
    assert options == LossOptions(temperature=0.2, few_negatives="use_all")
    kwargs = {"temperature": 0.3, "smoothing": 0.2, "neighbors": 4, "schedule": {"kind": "warmup", "warmup_epochs": 2},
              "normalize": False, "reduction": "sum", "backend": "reference", "deterministic": True,
              "allow_tf32": False, "few_negatives": "raise"}
    assert set(kwargs) == set(LossOptions.field_names())
    assert loss_options(kwargs, max_epochs=10) == LossOptions(
        temperature=0.3, smoothing=0.2, neighbors=4, schedule=SmoothingSchedule(0.2, "warmup", warmup_epochs=2),
        normalize=False, reduction="sum", backend="reference", deterministic=True, allow_tf32=False,
        few_negatives="raise")


def test_schedule_spellings_and_round_trip():
    schedule = {"kind": "cosine", "warmup_epochs": 2}
    cosine = loss_options({"temperature": 0.1, "smoothing": 0.2, "schedule": schedule}, 12)
    assert cosine.schedule == SmoothingSchedule(0.2, "cosine", warmup_epochs=2, epochs=10)
    assert cosine.smoothing_at(1) == 0 and cosine.smoothing_at(12) == pytest.approx(0.2)
    assert loss_options({"temperature": 0.1, "smoothing": 0.2, "schedule": "warmup"}, 5).schedule == \
        SmoothingSchedule(0.2, "warmup")
    assert loss_options({"temperature": 0.1, "schedule": None}, 5).schedule is None
    for schedule in (SmoothingSchedule(0.2, "cosine", warmup_epochs=3, epochs=7),
                     SmoothingSchedule(0.2, "cosine", epochs=4), SmoothingSchedule(0.1, "warmup", warmup_epochs=3)):
        options = LossOptions(temperature=0.1, schedule=schedule, few_negatives="use_all")
        rendered = loss_options_to_yaml(options, max_epochs=10)
        assert loss_options(rendered, max_epochs=10) == options


@pytest.mark.parametrize("bad", [
    {"smoothing": 1.0}, {"neighbors": 0}, {"schedule": "linear"}, {"schedule": {"kind": "warmup", "warm": 1}},
    {"backend": "cuda"}, {"reduction": "none"}, {"few_negatives": "skip"}, {"temperature": None},
    {"normalize": "yes"}, {"allow_tf32": 1},
])
def test_invalid_options_are_rejected(bad):
    with pytest.raises((ValueError, TypeError), match="method_kwargs"):
        loss_options({"temperature": 0.2, **bad}, max_epochs=10)


@pytest.mark.parametrize("old, new", [("smoothing_mode", "neighbors"), ("smoothing_schedule", "schedule"),
                                      ("smoothing_warmup_epochs", "schedule"), ("loss_backend", "backend")])
def test_old_keys_are_rejected_with_their_new_name(old, new):
    with pytest.raises(ValueError, match=f"{old} is now {new}"):
        loss_options({"temperature": 0.2, old: "x"}, max_epochs=10)


def test_moco_settings_and_symmetric_spellings():
    options = loss_options({"temperature": 0.2}, 5)
    settings = moco_settings({}, options)
    assert (settings.symmetric, settings.wait_for_full_bank, settings.mask_own_queue_entries) == ("mean", True, True)
    assert moco_settings({"mask_own_queue_entries": False}, options).mask_own_queue_entries is False
    assert symmetric_mode({"symmetric": None}) is None and symmetric_mode({"symmetric": "none"}) is None
    assert symmetric_mode({"symmetric": "sum"}) == "sum"
    with pytest.raises(ValueError):
        symmetric_mode({"symmetric": "max"})
    with pytest.raises(TypeError):
        moco_settings({"mask_own_queue_entries": "yes"}, options)
    with pytest.raises(ValueError, match="reduction"):
        moco_settings({"symmetric": "sum"}, options.replace(reduction="sum"))
    assert validate_flag({}) is True and validate_flag({"validate": False}) is False
    with pytest.raises(TypeError, match="validate"):
        validate_flag({"validate": "no"})


# --- backbones ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", LIGHTWEIGHT)
def test_solo_backbones_report_their_true_width(name):
    factory = solo_backbone_factory(name)
    for size, cifar_stem in ((32, True), (224, False)):
        backbone = factory("smooth_mocov2plus", cifar_stem=cifar_stem).eval()
        with torch.no_grad():
            features = backbone(torch.randn(1, 3, size, size))
        assert features.shape == (1, backbone.num_features) == (1, 1280), (name, size)


def test_mobilenetv3_trap_does_not_reach_solo():
    import timm

    reported = timm.create_model("mobilenetv3_large_100", pretrained=False, num_classes=0).num_features
    assert reported in (960, 1280)  # timm >= 1.0.7: 960, the trap; timm 1.0.3: 1280
    assert solo_backbone_factory("mobilenetv3_large_100")(None).num_features == 1280


def test_cifar_stem_keeps_spatial_resolution():
    plain, cifar = (solo_backbone_factory("mobilenet_v2")(None, cifar_stem=s) for s in (False, True))
    assert plain.net.features[0][0].stride == (2, 2) and cifar.net.features[0][0].stride == (1, 1)


def test_backbone_factory_refuses_resnet_names():
    with pytest.raises(ValueError):
        solo_backbone_factory("resnet18")  # solo-learn special-cases "resnet*" names


# --- losses at smoothing 0 = solo-learn's formulas ---------------------------------------------

def solo_simclr_oracle(z: torch.Tensor, indexes: torch.Tensor, temperature: float) -> torch.Tensor:
    """solo-learn's SimCLR: -mean_i log(sum_{p in P(i)} e^{s_ip} / sum_{j != i} e^{s_ij}),
    s = cosine / tau, P(i) = other rows with the same index."""
    z = F.normalize(z, dim=1)
    sim = torch.exp(z @ z.T / temperature)
    same = indexes[:, None] == indexes[None, :]
    not_self = ~torch.eye(len(z), dtype=torch.bool)
    positives = (sim * (same & not_self)).sum(1)
    others = (sim * not_self).sum(1)
    return -(positives / others).log().mean()


def solo_moco_direction_oracle(query, key, queue, temperature):
    """solo-learn's MoCo V2+ (one direction): cross-entropy of [q.k | q.queue] / tau, label 0,
    unit vectors."""
    query, key, queue = (F.normalize(t, dim=1) for t in (query, key, queue))
    logits = torch.cat([(query * key).sum(1, keepdim=True), query @ queue.T], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(query), dtype=torch.long))


REFERENCE = LossOptions(temperature=0.2, backend="reference", few_negatives="use_all")


def test_simclr_two_crops_at_smoothing_zero_is_solo_simclr_and_lightly_ntxent():
    from lightly.loss import NTXentLoss

    torch.manual_seed(0)
    z0, z1 = torch.randn(12, 16), torch.randn(12, 16)
    indexes = torch.arange(100, 112)  # dataset indexes of the 12 images
    ours = simclr_loss(torch.cat([z0, z1]), indexes, REFERENCE)
    torch.testing.assert_close(ours, solo_simclr_oracle(torch.cat([z0, z1]), indexes.repeat(2), 0.2))
    torch.testing.assert_close(ours, NTXentLoss(temperature=0.2)(z0, z1))


def test_simclr_multicrop_positives_average_the_log_probabilities():
    """With several positives the smoothed loss is the cross-entropy against a target shared by
    the positives; solo-learn's is -log of their summed probability (documented difference)."""
    torch.manual_seed(1)
    z = torch.randn(4 * 6, 8)
    indexes = torch.arange(6).repeat(4)
    ours = simclr_loss(z, torch.arange(6), REFERENCE.replace(temperature=0.5))
    zn = F.normalize(z, dim=1)
    logits = zn @ zn.T / 0.5
    logits.fill_diagonal_(float("-inf"))
    log_p = logits.log_softmax(dim=1)
    positive = (indexes[:, None] == indexes[None, :]) & ~torch.eye(len(z), dtype=torch.bool)
    expected = -(log_p.masked_fill(~positive, 0).sum(1) / positive.sum(1)).mean()
    torch.testing.assert_close(ours, expected)
    assert not torch.allclose(ours, solo_simclr_oracle(z, indexes, 0.5))


def test_simclr_view_weights_weight_rows_by_crop():
    torch.manual_seed(2)
    z, indexes = torch.randn(3 * 5, 8), torch.arange(5)
    options = REFERENCE.replace(temperature=0.3)
    rows = smooth_infonce(z, ids=indexes.repeat(3), options=options, reduction="none")
    weights = torch.tensor([0.5, 0.25, 0.25]).repeat_interleave(5)
    weighted = simclr_loss(z, indexes, options, view_weights=(0.5, 0.25, 0.25))
    torch.testing.assert_close(weighted, (weights * rows).sum() / weights.sum())
    torch.testing.assert_close(simclr_loss(z, indexes, options), rows.mean())


def test_simclr_survives_a_batch_of_one_image():
    """A last batch of one image: no negatives; solo-learn's loss is 0 there (log 1), ours too."""
    z = torch.randn(2, 8, requires_grad=True)
    loss = simclr_loss(z, torch.tensor([7]), REFERENCE.replace(smoothing=0.1, neighbors=5))
    loss.backward()
    assert loss.item() == pytest.approx(float(solo_simclr_oracle(z.detach(), torch.tensor([7, 7]), 0.2)), abs=1e-6)
    assert loss.item() == pytest.approx(0.0, abs=1e-6) and torch.isfinite(z.grad).all()
    three = simclr_loss(torch.randn(4, 8), torch.tensor([1, 2]), REFERENCE.replace(smoothing=0.1, neighbors=5))
    assert torch.isfinite(three)  # 2 negatives per row, k = 5: smooths onto both
    with pytest.raises(ValueError, match="negatives"):
        simclr_loss(z, torch.tensor([7]), REFERENCE.replace(few_negatives="raise"))


def test_moco_symmetric_reads_one_queue_in_both_directions():
    torch.manual_seed(3)
    q1, q2, k1, k2 = (torch.randn(8, 16) for _ in range(4))
    queue = F.normalize(torch.randn(32, 16), dim=-1)
    ours = moco_loss([q1, q2], [k1, k2], queue, REFERENCE, symmetric="mean")
    solo = (solo_moco_direction_oracle(q1, k2, queue, 0.2) + solo_moco_direction_oracle(q2, k1, queue, 0.2)) / 2
    torch.testing.assert_close(ours, solo)
    summed = moco_loss([q1, q2], [k1, k2], queue, REFERENCE, symmetric="sum")
    torch.testing.assert_close(summed, 2 * solo)


def test_moco_asymmetric_is_moco_v2_with_key_from_global_view_one():
    torch.manual_seed(4)
    q1, q2, k1 = (torch.randn(8, 16) for _ in range(3))
    queue = F.normalize(torch.randn(32, 16), dim=-1)
    ours = moco_loss([q1, q2], [k1], queue, REFERENCE.replace(temperature=0.07), symmetric=None)
    torch.testing.assert_close(ours, solo_moco_direction_oracle(q2, k1, queue, 0.07))


def test_moco_multi_query_weights_follow_sslight():
    torch.manual_seed(5)
    q1, q2, k1, k2 = (torch.randn(6, 16) for _ in range(4))
    local = [torch.randn(6, 16) for _ in range(3)]
    queue = F.normalize(torch.randn(24, 16), dim=-1)
    weights = query_view_weights(2, 3, (0.4, 0.6))
    assert weights == pytest.approx((0.4, 0.2, 0.2, 0.2))
    ours = moco_loss([q1, q2], [k1], queue, REFERENCE, local_queries=local, symmetric=None, query_view_weights=weights)
    per_view = [solo_moco_direction_oracle(q, k1, queue, 0.2) for q in [q2, *local]]
    torch.testing.assert_close(ours, sum(w * v for w, v in zip(weights, per_view)))
    plain = moco_loss([q1, q2], [k1], queue, REFERENCE, local_queries=local, symmetric=None)
    torch.testing.assert_close(plain, torch.stack(per_view).mean())
    both = moco_loss([q1, q2], [k1, k2], queue, REFERENCE, local_queries=local, symmetric="sum",
                     query_view_weights=weights)
    other = [solo_moco_direction_oracle(q, k2, queue, 0.2) for q in [q1, *local]]
    torch.testing.assert_close(both, ours + sum(w * v for w, v in zip(weights, other)))


def test_moco_smoothing_matches_the_loop_oracle():
    torch.manual_seed(6)
    q1, q2, k1, k2 = (torch.randn(5, 8) for _ in range(4))
    queue = torch.randn(20, 8)
    options = dict(temperature=0.2, smoothing=0.3, neighbors=4)
    ours = moco_loss([q1, q2], [k1, k2], queue, REFERENCE.replace(**options), symmetric="mean")
    expected = (moco_oracle(q1, k2, queue, **options).mean() + moco_oracle(q2, k1, queue, **options).mean()) / 2
    torch.testing.assert_close(ours, expected.to(ours.dtype))


def test_moco_loss_checks_its_layout():
    q, k = torch.randn(4, 8), torch.randn(4, 8)
    with pytest.raises(ValueError):
        moco_loss([q, q], [k], torch.randn(8, 8), REFERENCE, symmetric="mean")  # needs 2 keys
    with pytest.raises(ValueError):
        moco_loss([q, q], [k], torch.randn(8, 8), REFERENCE, symmetric=None, query_view_weights=(1, 1))


# --- the MoCo queue ------------------------------------------------------------------------------

def test_key_queue_is_a_ring_buffer_of_keys_and_ids():
    queue = KeyQueue(5, 3)
    assert queue.ids.tolist() == [-1] * 5 and not bool(queue.filled)
    assert torch.allclose(queue.keys.norm(dim=1), torch.ones(5))
    keys = torch.arange(3 * 3, dtype=torch.float32).view(3, 3)
    queue.push(keys, torch.tensor([10, 11, 12]))
    assert queue.ids.tolist() == [10, 11, 12, -1, -1] and int(queue.ptr) == 3 and not bool(queue.filled)
    queue.push(keys[:2] + 100)  # no ids: unknown
    assert queue.ids.tolist() == [10, 11, 12, -1, -1] and int(queue.ptr) == 0 and bool(queue.filled)
    assert torch.equal(queue.keys[3:], keys[:2] + 100)
    queue.push(keys, torch.tensor([20, 21, 22]))  # a batch not dividing the queue: it wraps
    queue.push(keys[:1], torch.tensor([30]))
    assert queue.ids.tolist() == [20, 21, 22, 30, -1] and int(queue.ptr) == 4
    queue.push(torch.arange(7 * 3, dtype=torch.float32).view(7, 3), torch.arange(40, 47))  # more than K
    assert queue.ids.tolist() == [46, 42, 43, 44, 45] and int(queue.ptr) == (4 + 7) % 5  # as 7 single pushes
    assert set(queue.state_dict()) == {"keys", "ids", "ptr", "filled"}


def moco_run_oracle(batches, initial_keys, *, symmetric, mask_own, locals_weights=None, smoothing, **loss):
    """The light-moco authors' step, in Python: the loss reads the queue as it was; then key 1
    (and key 2 when symmetric) are enqueued, slot by slot, with their ids. Row losses come from
    the loop oracle; masked entries are left out of the query's candidates. ``smoothing``: one
    alpha, or one per step."""
    queue = [(key, -1) for key in initial_keys]
    ptr, losses = 0, []
    alphas = smoothing if isinstance(smoothing, (list, tuple)) else [smoothing] * len(batches)
    for (q1, q2, k1, k2, local, ids), alpha in zip(batches, alphas):
        loss["smoothing"] = alpha
        keys = torch.stack([key for key, _ in queue])
        owner = [owner_id for _, owner_id in queue]

        def direction(queries, key, keys=keys, owner=owner, ids=ids):
            weights = locals_weights or [1.0 / len(queries)] * len(queries)
            total = 0
            for weight, query in zip(weights, queries):
                def valid(i, j, owner=owner, ids=ids):
                    return not (mask_own and owner[j] == int(ids[i]))

                rows = loop_oracle(query, keys, valid, lambda i, j: False, positive_keys=key, **loss)
                total = total + weight * rows.mean()
            return total

        if symmetric is None:
            losses.append(direction([q2, *local], k1))
        else:
            both = direction([q2, *local], k1) + direction([q1, *local], k2)
            losses.append(both / 2 if symmetric == "mean" else both)
        for block in ([k1] if symmetric is None else [k1, k2]):
            for row in range(block.shape[0]):
                queue[ptr] = (block[row].detach(), int(ids[row]))
                ptr = (ptr + 1) % len(queue)
    return losses, queue


@pytest.mark.parametrize("symmetric, num_local, mask_own", [
    ("sum", 0, True), ("mean", 0, True), ("sum", 0, False), (None, 2, True), ("mean", 2, True)])
def test_moco_step_equals_the_authors_loop_over_steps(symmetric, num_local, mask_own):
    """Seven steps in float64, loss and gradient, including the enqueue: one queue read by both
    directions and receiving both views' keys (2B a step when symmetric); images recur, so the
    queue holds own-image entries that the mask must leave out."""
    torch.manual_seed(7)
    batch, dim, size, steps = 3, 6, 10, 7  # 10 slots: batches wrap around the queue
    loss = dict(temperature=0.2, smoothing=0.2, neighbors=3)
    options = LossOptions(backend="reference", few_negatives="use_all", **loss)
    weights = None if not num_local else [0.4] + [0.6 / num_local] * num_local
    queue = KeyQueue(size, dim).double()
    initial = [row.clone() for row in queue.keys]
    leaves, batches = [], []
    for _ in range(steps):
        q1, q2 = (torch.randn(batch, dim, dtype=torch.float64, requires_grad=True) for _ in range(2))
        k1, k2 = (torch.randn(batch, dim, dtype=torch.float64) for _ in range(2))
        local = [torch.randn(batch, dim, dtype=torch.float64, requires_grad=True) for _ in range(num_local)]
        ids = torch.randint(0, 6, (batch,))  # 6 images: each one comes back within a few steps
        leaves.append([q1, q2, *local])
        batches.append((q1, q2, k1, k2, local, ids))

    ours = [moco_step(queue, (q1, q2), (k1, k2), options, local_queries=local, symmetric=symmetric,
                      query_view_weights=weights, ids=ids, mask_own=mask_own)
            for q1, q2, k1, k2, local, ids in batches]
    expected, oracle_queue = moco_run_oracle(batches, initial, symmetric=symmetric, mask_own=mask_own,
                                             locals_weights=weights, **loss)
    for step in range(steps):
        torch.testing.assert_close(ours[step], expected[step], rtol=1e-12, atol=1e-12)
        got = torch.autograd.grad(ours[step], leaves[step], allow_unused=True)
        want = torch.autograd.grad(expected[step], leaves[step], allow_unused=True)
        for g, w in zip(got, want):
            assert (g is None) == (w is None)  # asymmetric: global view 1 is no query
            if g is not None:
                torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(queue.keys, torch.stack([key for key, _ in oracle_queue]), rtol=0, atol=0)
    assert queue.ids.tolist() == [owner for _, owner in oracle_queue]
    per_step = batch * (1 if symmetric is None else 2)
    assert int(queue.ptr) == steps * per_step % size and bool(queue.filled)
    if mask_own:  # the mask did something: at some step the queue held a query's own image
        unmasked, _ = moco_run_oracle(batches, initial, symmetric=symmetric, mask_own=False,
                                      locals_weights=weights, **loss)
        assert any(abs(float(a) - float(b)) > 1e-6 for a, b in zip(unmasked, expected))


def test_moco_step_without_mask_or_ids_reads_every_entry():
    torch.manual_seed(8)
    queue = KeyQueue(8, 4).double()
    q1, q2, k1, k2 = (torch.randn(4, 4, dtype=torch.float64) for _ in range(4))
    ids = torch.arange(4)
    options = LossOptions(temperature=0.2, backend="reference")
    moco_step(queue, (q1, q2), (k1, k2), options, symmetric="sum", ids=ids)  # enqueue k1, k2 with ids 0-3
    assert queue.ids.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    snapshot = queue.keys.clone()
    masked = moco_step(queue, (q1, q2), (k1, k2), options, symmetric="sum", ids=ids)
    queue.keys.copy_(snapshot)
    plain = moco_step(queue, (q1, q2), (k1, k2), options, symmetric="sum", ids=ids, mask_own=False)
    expected = sum(solo_moco_direction_oracle(q, k, snapshot, 0.2) for q, k in ((q1, k2), (q2, k1)))
    torch.testing.assert_close(plain, expected)
    assert not torch.allclose(masked, plain)
    # each query's own image fills 2 of the 8 slots: masking equals deleting them
    rows = [loop_oracle(q[i:i + 1], snapshot[queue.ids != i], lambda a, b: True, lambda a, b: False,
                        positive_keys=k[i:i + 1], temperature=0.2, smoothing=0.0, neighbors=None)
            for q, k in ((q1, k2), (q2, k1)) for i in range(4)]
    torch.testing.assert_close(masked, torch.cat(rows).view(2, 4).mean(1).sum())


# --- shared recipe rules -----------------------------------------------------------------------

def test_inbatch_weights_give_every_global_crop_a_global_query_weight():
    assert view_loss_weights("simclr", 2, 6, (0.4, 0.6)) == pytest.approx((0.4, 0.4) + (0.1,) * 6)
    assert view_loss_weights("simclr", 2, 0, (0.4, 0.6)) is None and view_loss_weights("simclr", 2, 6, None) is None


def test_no_decay_split_agrees_with_the_recipe_parameter_groups():
    model = build_backbone("mobilenet_v2")
    spec = get_preset("sslight_moco").optimizer
    reference = {g["name"]: {id(p) for p in g["params"]} for g in parameter_groups(model, spec)}
    solo_groups = [{"name": "backbone", "params": model.parameters()},
                   {"name": "classifier", "params": [torch.nn.Parameter(torch.zeros(3, 3))], "weight_decay": 0}]
    rules = OptimizerSpec(exclude_bias_norm=True, exclude_depthwise=True)
    split = {g["name"]: g for g in split_no_decay(solo_groups, model, rules)}
    assert {id(p) for p in split["backbone"]["params"]} == reference["decay"]
    assert {id(p) for p in split["backbone_no_decay"]["params"]} == \
        reference["no_decay_1d"] | reference["no_decay_depthwise"]
    assert split["backbone_no_decay"]["weight_decay"] == 0 and "weight_decay" not in split["backbone"]
    assert split["classifier"]["weight_decay"] == 0
    only_depthwise = split_no_decay([{"name": "b", "params": model.parameters()}], model,
                                    OptimizerSpec(exclude_bias_norm=False, exclude_depthwise=True))
    assert {id(p) for p in only_depthwise[1]["params"]} == reference["no_decay_depthwise"]


# --- launcher ----------------------------------------------------------------------------------

def test_launcher_reports_a_missing_clone_with_the_install_recipe(tmp_path, capsys):
    code = main(["pretrain", "--config-name", "smoke_cpu", "--solo-path", str(tmp_path), "data.train_path=x"])
    assert code == 2
    err = capsys.readouterr().err
    assert "main_pretrain.py" in err and SOLO_INSTALL_HINT.splitlines()[0] in err


def test_launcher_finds_the_clone_from_the_environment(tmp_path, monkeypatch):
    (tmp_path / "main_linear.py").write_text("")
    monkeypatch.setenv("SOLO_LEARN_PATH", str(tmp_path))
    assert find_solo_clone(None, "main_linear.py") == tmp_path.resolve()
    with pytest.raises(SoloLearnNotFound):
        find_solo_clone(None, "main_pretrain.py")


def test_launcher_builds_the_hydra_command_line(tmp_path):
    assert resolve_config_name("pretrain", "light_moco") == "pretrain/light_moco"
    assert resolve_config_name("linear", "smoke_cpu") == "linear/smoke_cpu"
    assert resolve_config_name("pretrain", "my_own") == "my_own"
    argv = hydra_argv("pretrain", "light_moco", ["backbone=efficientnet_b0"], tmp_path / "main_pretrain.py")
    assert argv[1:] == ["--config-path", f"pkg://{CONFIG_PACKAGE}", "--config-name", "pretrain/light_moco",
                        "backbone=efficientnet_b0"]
    own = hydra_argv("pretrain", "mine", ["--config-path", "/my/configs"], tmp_path / "main_pretrain.py")
    assert own.count("--config-path") == 1


@pytest.mark.parametrize("path", ["/runs/light_moco-offline-ab12-ep=199.ckpt", "/it's/a=b,c[d].ckpt", "C:\\ckpt\\"])
def test_checkpoint_paths_are_quoted_for_hydra(path):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    override = OverridesParser.create().parse_override(f"pretrained_feature_extractor={hydra_quote(path)}")
    assert override.value() == path


def test_launcher_lists_the_configs(capsys):
    assert main(["configs"]) == 0
    out = capsys.readouterr().out
    assert "light_moco" in out and "smoke_cpu" in out and "backbone: " in out


@pytest.mark.parametrize("argv, message", [
    (["--foo"], "unrecognized argument --foo: a command comes first"),
    (["pretrain", "--config-name", "smoke_cpu", "--foo", "data.train_path=x"], "unrecognized arguments: --foo"),
    (["configs", "extra"], "unexpected arguments"),
])
def test_launcher_names_unknown_flags(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err.strip().splitlines()[-1]
