"""The light-moco presets ("Establishing a stronger baseline for lightweight contrastive models",
arXiv 2212.07158): the MoCo v2 baseline on a lightweight backbone, and light-moco itself."""

from __future__ import annotations

import dataclasses

from .registry import register_preset
from .specs import (
    DEFAULT_NEIGHBORS,
    DEFAULT_SMOOTHING,
    LIGHT_MOCO_WARMUP_EPOCHS,
    BackboneSpec,
    CropSpec,
    HeadSpec,
    LossSpec,
    MoCoSpec,
    OptimizerSpec,
    Recipe,
    ViewSpec,
)

_MOCO_V2_VIEWS = ViewSpec(global_crops=CropSpec(2, 224, (0.2, 1.0)))


@register_preset
def moco_v2_baseline() -> Recipe:
    """MoCo v2 with its ResNet-50 recipe on MobileNetV3-Large: the light-moco paper's baseline
    (36.3 % linear top-1 on ImageNet; 42.2 % with EfficientNet-B0)."""
    return Recipe(
        name="moco_v2_baseline",
        framework="moco",
        backbone=BackboneSpec("mobilenetv3_large_100"),
        head=HeadSpec(hidden_dim=2048, output_dim=128, num_layers=2, batch_norm=False),
        loss=LossSpec(temperature=0.2, smoothing=0.0),
        moco=MoCoSpec(queue_size=65536, key_momentum=0.999),
        # MoCo v2 decays every parameter (no exclusion rules); cosine lr, no warm-up.
        optimizer=OptimizerSpec(name="sgd", lr_per_256=0.03, momentum=0.9, weight_decay=1e-4),
        views=_MOCO_V2_VIEWS,
        epochs=200,
        batch_size=256,
        description="MoCo v2, ResNet-50 recipe, on a lightweight backbone (plain InfoNCE, tau 0.2)",
    )


@register_preset
def light_moco() -> Recipe:
    """The light-moco recipe: MoCo v2 with tau 0.07 and smoothed InfoNCE (62.3 % with
    MobileNetV3-Large, 65.8 % with EfficientNet-B0 in the paper).

    The published alpha, k, mode and schedule are unknown (neither the paper's abstract nor its
    public code states them). Chosen defaults:

    - mode ``neighbors``: the default strategy of the authors' code.
    - alpha = 0.1: the customary label-smoothing mass; it keeps 90 % of the target on the
      positive, so the loss stays an instance-discrimination loss.
    - k = 10: the neighbours should be likely same-class images. A 65536-key queue holds about
      65 images per ImageNet class, so the 10 most similar negatives are mostly same-class ones
      once the features are meaningful, while k stays far below 65.
    - warm-up: 3 epochs, as in the authors' scripts, where one flag (``--warm``) drives both: the
      learning rate warms up linearly (then the cosine schedule) and alpha is held at 0 for those
      epochs, so early, meaningless neighbours stay out of the targets. ``wait_for_full_bank``
      also holds alpha at 0 until the queue is full.
    """
    base = moco_v2_baseline()
    return base.override(
        name="light_moco",
        loss=LossSpec(temperature=0.07, smoothing=DEFAULT_SMOOTHING, mode="neighbors",
                      neighbors=DEFAULT_NEIGHBORS, schedule="warmup", warmup_epochs=LIGHT_MOCO_WARMUP_EPOCHS),
        optimizer=dataclasses.replace(base.optimizer, warmup_epochs=LIGHT_MOCO_WARMUP_EPOCHS),
        description="light-moco: MoCo v2, tau 0.07, smoothed InfoNCE on the 10 nearest negatives",
    )
