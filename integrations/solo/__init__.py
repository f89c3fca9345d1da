"""solo-learn integration: smoothed-InfoNCE methods, lightweight backbones, shipped Hydra configs
and a launcher for a solo-learn clone's main_pretrain.py / main_linear.py.

Importing this package does not import solo-learn (it is never a dependency: it has no usable
PyPI release). solo-learn is imported by `register` and by the launcher only.

    >>> from smooth_infonce.integrations.solo import register
    >>> register()          # doctest: +SKIP
    {'methods': ['smooth_simclr', 'smooth_mocov2plus', 'sslight_dino', 'sslight_swav'], 'backbones': [...]}

Command line (see README.md next to this file):

    smooth-infonce-solo pretrain --config-name light_moco backbone=efficientnet_b0 dataset=imagenet100
    smooth-infonce-solo linear --config-name linear --checkpoint ...ckpt
    smooth-infonce-solo configs --write     # regenerate the preset configs (see `generate`)

Imports: the core, `integrations.recipes`, and solo-learn itself (lazily, in `register`).
"""

from __future__ import annotations

from .backbones import SOLO_BACKBONES, solo_backbone_factory
from .configs_index import CONFIG_PACKAGE, CONFIG_PATH, config_dir, list_configs
from .losses import KeyQueue, moco_loss, moco_step, simclr_loss
from .options import loss_options
from .registry import SOLO_INSTALL_HINT, SoloLearnNotFound, is_registered, register

METHOD_NAMES = ("smooth_simclr", "smooth_mocov2plus", "sslight_dino", "sslight_swav")

__all__ = [
    "CONFIG_PACKAGE",
    "CONFIG_PATH",
    "METHOD_NAMES",
    "SOLO_BACKBONES",
    "SOLO_INSTALL_HINT",
    "KeyQueue",
    "SoloLearnNotFound",
    "config_dir",
    "is_registered",
    "list_configs",
    "loss_options",
    "moco_loss",
    "moco_step",
    "register",
    "simclr_loss",
    "solo_backbone_factory",
]
