"""The SSLight presets ("Effective Self-supervised Pre-training on Low-compute Networks without
Distillation", ICLR 2023): MoCo v2, DINO (CNN and ViT-Tiny) and SwAV, each with the baseline and
with SSLight's view sampling."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Tuple

from .registry import register_preset
from .specs import (
    DEFAULT_NEIGHBORS,
    DEFAULT_SMOOTHING,
    BackboneSpec,
    CropSpec,
    DINOSpec,
    HeadSpec,
    LossSpec,
    MoCoSpec,
    OptimizerSpec,
    Recipe,
    SwAVSpec,
    ViewSpec,
)

# SSLight's optimisation for CNNs (batch 1024 = 128 x 8 GPUs, 200 epochs): LARS, peak lr
# 1.92 = 0.48 per 256, 10 warm-up epochs, per-iteration cosine to 0.0048 = 0.0012 per 256,
# weight decay 1e-6, none on 1-D parameters and depthwise kernels.
_SSLIGHT_OPTIMIZER = OptimizerSpec(
    name="lars", lr_per_256=0.48, min_lr_per_256=0.0012, momentum=0.9, weight_decay=1e-6,
    warmup_epochs=10, lr_schedule="cosine", exclude_bias_norm=True, exclude_depthwise=True,
    trust_coefficient=1e-3,
)


# The SSLight authors' photometric augmentations for MoCo and DINO (BYOL's asymmetric pair): blur
# always on global 1, rarely on global 2, half the time on locals; solarisation on global 2 only.
_SSLIGHT_PHOTOMETRIC = dict(color_jitter=(0.4, 0.4, 0.2, 0.1), color_jitter_prob=0.8, grayscale_prob=0.2,
                            hflip_prob=0.5, blur_prob=(1.0, 0.1, 0.5), solarize_prob=(0.0, 0.2, 0.0))
# ... and for SwAV (SwAV's own colour distortion of strength 1): blur 0.5 on every view, no solarisation.
_SWAV_PHOTOMETRIC = dict(color_jitter=(0.8, 0.8, 0.8, 0.2), color_jitter_prob=0.8, grayscale_prob=0.2,
                         hflip_prob=0.5, blur_prob=0.5, solarize_prob=0.0)


def _multicrop_views(global_scale: Tuple[float, float], local: CropSpec, sslight: bool,
                     photometric: Mapping[str, Any]) -> ViewSpec:
    """2 x 224 px global crops at ``global_scale`` + ``local``, bicubic; SSLight weighs the
    global and local pairs (0.4, 0.6), the baselines take the plain mean (None)."""
    return ViewSpec(global_crops=CropSpec(2, 224, global_scale), local_crops=local,
                    loss_weights=(0.4, 0.6) if sslight else None, interpolation="bicubic", **photometric)


# View sampling, baseline vs SSLight (the authors' configs): CNNs split global and local crops at
# scale 0.14 (baseline) or 0.3 (SSLight, with 128 px locals); ViT-Tiny at 0.25 or 0.3, 10 locals.
_CNN_BASELINE_LOCALS, _CNN_SSLIGHT_LOCALS = CropSpec(6, 96, (0.05, 0.14)), CropSpec(6, 128, (0.05, 0.3))
_VIT_BASELINE_LOCALS, _VIT_SSLIGHT_LOCALS = CropSpec(10, 96, (0.05, 0.25)), CropSpec(10, 128, (0.05, 0.3))


@register_preset
def sslight_baseline() -> Recipe:
    """MoCo v2 on MobileNetV2 with SSLight's optimisation and the baseline multi-crop (60.6 %
    linear top-1 on ImageNet in SSLight's README): 2 x 224 px at (0.14, 1), 6 x 96 px at
    (0.05, 0.14), every query view weighing the same ((1/7, 6/7))."""
    return Recipe(
        name="sslight_baseline",
        framework="moco",
        backbone=BackboneSpec("mobilenet_v2"),
        head=HeadSpec(hidden_dim=2048, output_dim=128, num_layers=2, batch_norm=False),
        loss=LossSpec(temperature=0.2, smoothing=0.0),
        moco=MoCoSpec(queue_size=65536, key_momentum=0.999, shuffle_bn=True),
        optimizer=_SSLIGHT_OPTIMIZER,
        views=_multicrop_views((0.14, 1.0), _CNN_BASELINE_LOCALS, sslight=False, photometric=_SSLIGHT_PHOTOMETRIC),
        epochs=200,
        batch_size=1024,
        description="MoCo v2 + baseline multi-crop, SSLight optimisation (LARS), MobileNetV2",
    )


@register_preset
def sslight_moco() -> Recipe:
    """SSLight's view sampling for MoCo v2 (61.6 % on ImageNet with MobileNetV2, README):
    2 x 224 px at (0.3, 1), 6 x 128 px at (0.05, 0.3), weights 0.4 for the global query and 0.6
    shared by the 6 local queries. Plain InfoNCE, as published; the key is global view 1."""
    return sslight_baseline().override(
        name="sslight_moco",
        views=_multicrop_views((0.3, 1.0), _CNN_SSLIGHT_LOCALS, sslight=True, photometric=_SSLIGHT_PHOTOMETRIC),
        description="MoCo v2 + SSLight view sampling (0.4 / 0.6 weights), LARS, MobileNetV2",
    )


@register_preset
def sslight_moco_smooth() -> Recipe:
    """``sslight_moco`` with light-moco's smoothing (alpha 0.1 on the 10 nearest negatives after
    3 epochs at 0; see `light_moco` for why). The combination of the two papers: its effect is not
    published."""
    return sslight_moco().override(
        name="sslight_moco_smooth",
        loss__smoothing=DEFAULT_SMOOTHING, loss__mode="neighbors", loss__neighbors=DEFAULT_NEIGHBORS,
        loss__schedule="warmup", loss__warmup_epochs=3,
        description="SSLight view sampling + smoothed InfoNCE (neighbours)",
    )


# --- SSLight's DINO and SwAV ------------------------------------------------------------------


@register_preset
def dino_baseline() -> Recipe:
    """DINO on a CNN with the SSLight authors' baseline views (66.2 % linear top-1 on ImageNet
    with MobileNetV2, 62.2 % ResNet-18, 67.7 % ResNet-34: ``backbone__name="resnet18"``): 2 x 224
    px at (0.14, 1), 6 x 96 px at (0.05, 0.14), the plain mean over the 14 (global target, view)
    pairs. Head 2048-2048-256 with BN and GELU, weight-normalised last layer of 4096 outputs with
    its gain fixed; student tau 0.1, teacher tau 0.04 -> 0.07 over 50 epochs, centre momentum 0.9,
    teacher EMA 0.996 -> 1 (cosine), last layer frozen in epoch 0; LARS as SSLight's MoCo."""
    return Recipe(
        name="dino_baseline",
        framework="dino",
        backbone=BackboneSpec("mobilenet_v2"),
        head=HeadSpec(hidden_dim=2048, output_dim=256, num_layers=3, batch_norm=True),
        dino=DINOSpec(),
        optimizer=_SSLIGHT_OPTIMIZER,
        views=_multicrop_views((0.14, 1.0), _CNN_BASELINE_LOCALS, sslight=False, photometric=_SSLIGHT_PHOTOMETRIC),
        epochs=200,
        batch_size=1024,
        description="DINO + baseline multi-crop, LARS, MobileNetV2 (or ResNet-18/34)",
    )


@register_preset
def sslight_dino() -> Recipe:
    """`dino_baseline` with SSLight's views (68.3 % MobileNetV2, 65.7 % ResNet-18, 69.7 %
    ResNet-34): 2 x 224 px at (0.3, 1), 6 x 128 px at (0.05, 0.3), lambda (0.4, 0.6): 0.2 per
    global-global pair, 0.05 per global-local pair."""
    return dino_baseline().override(
        name="sslight_dino",
        views=_multicrop_views((0.3, 1.0), _CNN_SSLIGHT_LOCALS, sslight=True, photometric=_SSLIGHT_PHOTOMETRIC),
        description="DINO + SSLight view sampling (0.4 / 0.6), LARS, MobileNetV2 (or ResNet-18/34)",
    )


@register_preset
def dino_vit_baseline() -> Recipe:
    """DINO on ViT-Tiny/16 (drop path 0.1) with the baseline views (66.7 %): 2 x 224 px at
    (0.25, 1), 10 x 96 px at (0.05, 0.25), plain mean over the 22 pairs. Head 2048-2048-256
    without BN, 65536 outputs, last-layer gain learnt; teacher tau warm-up over 30 epochs; AdamW,
    lr 5e-4 per 256 (2e-3 at 1024) to 1e-5 at 1024, weight decay 0.04 -> 0.4 (cosine)."""
    return Recipe(
        name="dino_vit_baseline",
        framework="dino",
        backbone=BackboneSpec("vit_tiny_patch16", kwargs={"drop_path_rate": 0.1}),
        head=HeadSpec(hidden_dim=2048, output_dim=256, num_layers=3, batch_norm=False),
        dino=DINOSpec(num_prototypes=65536, norm_last_layer=False, warmup_teacher_temperature_epochs=30),
        optimizer=OptimizerSpec(name="adamw", lr_per_256=5e-4, min_lr_per_256=2.5e-6, weight_decay=0.04,
                                weight_decay_end=0.4, warmup_epochs=10, lr_schedule="cosine",
                                exclude_bias_norm=True, exclude_depthwise=False),
        views=_multicrop_views((0.25, 1.0), _VIT_BASELINE_LOCALS, sslight=False, photometric=_SSLIGHT_PHOTOMETRIC),
        epochs=200,
        batch_size=1024,
        description="DINO + baseline multi-crop, AdamW, ViT-Tiny/16",
    )


@register_preset
def sslight_dino_vit() -> Recipe:
    """`dino_vit_baseline` with SSLight's views (69.5 %): 2 x 224 px at (0.3, 1), 10 x 128 px at
    (0.05, 0.3), lambda (0.4, 0.6): 0.2 per global-global pair, 0.03 per global-local pair."""
    return dino_vit_baseline().override(
        name="sslight_dino_vit",
        views=_multicrop_views((0.3, 1.0), _VIT_SSLIGHT_LOCALS, sslight=True, photometric=_SSLIGHT_PHOTOMETRIC),
        description="DINO + SSLight view sampling (0.4 / 0.6), AdamW, ViT-Tiny/16",
    )


@register_preset
def swav_baseline() -> Recipe:
    """SwAV on MobileNetV2 with the baseline views (65.2 %): 2 x 224 px at (0.14, 1), 6 x 96 px
    at (0.05, 0.14), plain mean over the 14 pairs; SwAV's colour distortion. Head 4096 hidden with
    BN and ReLU -> 128 -> L2 -> 3000 prototypes (normalised every step, frozen in epoch 0);
    codes by Sinkhorn (epsilon 0.05, 3 iterations, over every process) of the 2 global views,
    predicted at tau 0.1; queue of 3840 (3072 at batch 1024) from epoch 15; LARS, lr 0.3 per 256
    (1.2 at 1024), warm-up from 0.075 at 1024, to 0.0048 at 1024."""
    return Recipe(
        name="swav_baseline",
        framework="swav",
        backbone=BackboneSpec("mobilenet_v2"),
        head=HeadSpec(hidden_dim=4096, output_dim=128, num_layers=2, batch_norm=True),
        swav=SwAVSpec(),
        optimizer=dataclasses.replace(_SSLIGHT_OPTIMIZER, lr_per_256=0.3, warmup_start_lr_per_256=0.075 / 4),
        views=_multicrop_views((0.14, 1.0), _CNN_BASELINE_LOCALS, sslight=False, photometric=_SWAV_PHOTOMETRIC),
        epochs=200,
        batch_size=1024,
        description="SwAV + baseline multi-crop, LARS, MobileNetV2",
    )


@register_preset
def sslight_swav() -> Recipe:
    """`swav_baseline` with SSLight's views (67.3 %): 2 x 224 px at (0.3, 1), 6 x 128 px at
    (0.05, 0.3), lambda (0.4, 0.6)."""
    return swav_baseline().override(
        name="sslight_swav",
        views=_multicrop_views((0.3, 1.0), _CNN_SSLIGHT_LOCALS, sslight=True, photometric=_SWAV_PHOTOMETRIC),
        description="SwAV + SSLight view sampling (0.4 / 0.6), LARS, MobileNetV2",
    )
