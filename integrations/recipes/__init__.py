"""`integrations.recipes`: what to train. The lightweight-model recipes as named, overridable presets
(timm-style registry), and the toolkit-free pieces they are made of.

A preset is a frozen dataclass tree (`Recipe`) holding everything a run needs: backbone, projection
head, loss (tau, alpha, k, mode, schedule), MoCo settings, optimiser with its parameter-group
rules and lr scaling, view sampling, epochs. It is plain data, toolkit-free (no lightly, no solo
import): the lightly integration (`smooth_infonce.integrations.lightly`) and the solo-learn
integration read the same objects, so a preset name means the same run in both.

Presets (see `list_presets()`):

- ``moco_v2_baseline``: MoCo v2 with the ResNet-50 recipe on MobileNetV3-Large (tau 0.2, plain
  InfoNCE): the 36.3 % baseline of the light-moco paper.
- ``light_moco``: the light-moco recipe ("Establishing a stronger baseline for lightweight
  contrastive models"): tau 0.07 and smoothed InfoNCE on neighbours.
- ``sslight_baseline``: MoCo v2 on MobileNetV2 with SSLight's optimisation and the baseline
  multi-crop (2 x 224 at (0.14, 1), 6 x 96 at (0.05, 0.14), plain mean).
- ``sslight_moco``: SSLight's view sampling ("Effective Self-supervised Pre-training on
  Low-compute Networks without Distillation"): 2 x 224 at (0.3, 1), 6 x 128 at (0.05, 0.3),
  weights (0.4, 0.6). Plain InfoNCE, as published.
- ``sslight_moco_smooth``: ``sslight_moco`` plus light-moco's smoothing (the combination; not a
  published configuration).
- ``dino_baseline`` / ``sslight_dino``: DINO on MobileNetV2 (or ResNet-18/34), baseline or SSLight
  views; ``dino_vit_baseline`` / ``sslight_dino_vit``: the same on ViT-Tiny/16 with AdamW.
- ``swav_baseline`` / ``sslight_swav``: SwAV on MobileNetV2, baseline or SSLight views.

The MoCo-v2 presets of SSLight and its DINO presets use the authors' photometric augmentations
(BYOL's asymmetric blur and solarisation per global view); SwAV uses SwAV's.

Every number is overridable: ``get_preset(name, **overrides)`` takes top-level fields, nested
fields as ``section__field`` (``loss__smoothing=0.2``) or a dict per section
(``loss={"smoothing": 0.2}``).

Example:
    >>> from smooth_infonce.integrations.recipes import get_preset, list_presets
    >>> "light_moco" in list_presets()
    True
    >>> recipe = get_preset("light_moco", epochs=100, loss__smoothing=0.2, backbone__name="efficientnet_b0")
    >>> recipe.loss.temperature, recipe.loss.smoothing, recipe.epochs
    (0.07, 0.2, 100)
    >>> recipe.optimizer.scaled_lr(batch_size=512)
    0.06

Modules: `specs` (the dataclasses), `registry` (one name, one factory), `light_moco` and `sslight`
(the presets), `backbones` (timm / torchvision networks with their measured width), `multicrop`
(SSLight's pair weights and multi-crop cross-entropy), `optim` (parameter groups, LARS, lr scaling).

Imports: the core `smooth_infonce` only; every other integration may import it.
"""

from . import light_moco as _light_moco  # noqa: F401  (registers its presets)
from . import sslight as _sslight  # noqa: F401
from .registry import get_preset, list_presets, register_preset
from .specs import (
    DEFAULT_NEIGHBORS,
    DEFAULT_SMOOTHING,
    FRAMEWORKS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    INTERPOLATIONS,
    LIGHT_MOCO_WARMUP_EPOCHS,
    LR_SCHEDULES,
    OPTIMIZERS,
    SMOOTHING_MODES,
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
    cosine_ramp,
    query_view_weights,
    view_loss_weights,
)

__all__ = [
    "BackboneSpec", "CropSpec", "DEFAULT_NEIGHBORS", "DEFAULT_SMOOTHING", "DINOSpec", "FRAMEWORKS", "HeadSpec",
    "IMAGENET_MEAN", "IMAGENET_STD", "INTERPOLATIONS", "LIGHT_MOCO_WARMUP_EPOCHS", "LR_SCHEDULES", "LossSpec",
    "MoCoSpec", "OPTIMIZERS", "OptimizerSpec", "Recipe", "SMOOTHING_MODES", "SwAVSpec", "ViewSpec", "cosine_ramp",
    "get_preset", "list_presets", "query_view_weights", "register_preset", "view_loss_weights",
]
