"""solo-learn backbone factories over the shared builders of `smooth_infonce.integrations.backbones`.

Toolkit-free: a factory has solo-learn's signature ``factory(method, **kwargs)`` and returns the
shared `Backbone` (pooled features, ``num_features`` measured, not reported), which is what
solo-learn sizes its projector and online classifier from. So the timm MobileNetV3 trap
(``num_features`` 960, output 1280) cannot reach solo.

``backbone.kwargs`` in a solo config go to the shared builder, e.g. ``cifar_stem: true`` for
32-64 px images (solo-learn's own CIFAR stem switch only applies to its ResNets).

Names are the shared registry's names, so one name means one network in lightly and in solo.
None starts with ``resnet``: solo-learn special-cases those names (it reads ``inplanes`` and
swaps the stem), and keeps its own ``resnet18`` / ``resnet50``.
"""

from __future__ import annotations

from typing import Callable, Dict

from torch import nn

from smooth_infonce.integrations.backbones import build_backbone, list_backbones

# The lightweight backbones of the recipes, plus the shared CPU test network.
SOLO_BACKBONES = ("mobilenetv3_large_100", "efficientnet_b0", "mobilenet_v2", "efficientnet_b1", "tiny_cnn")

# Marks a factory as ours, so registering twice is a no-op and a foreign entry is never replaced.
FACTORY_MARKER = "_smooth_infonce_backbone"


def solo_backbone_factory(name: str) -> Callable[..., nn.Module]:
    """A solo-learn backbone factory for the shared backbone ``name``."""
    if name not in list_backbones():
        raise ValueError(f"unknown backbone {name!r}; shared backbones: {list_backbones()}")
    if name.startswith("resnet"):
        raise ValueError("solo-learn special-cases backbone names starting with 'resnet'; use its own")

    def factory(method: str | None = None, **kwargs) -> nn.Module:
        # ``method`` is solo-learn's pretraining method name (ViTs use it); CNNs do not need it.
        return build_backbone(name, **kwargs)

    factory.__name__ = f"solo_{name}"
    factory.__doc__ = f"solo-learn factory for the shared backbone {name!r} (kwargs: cifar_stem, ...)."
    setattr(factory, FACTORY_MARKER, name)
    return factory


def solo_backbone_factories() -> Dict[str, Callable[..., nn.Module]]:
    """Factories for every name of `SOLO_BACKBONES` the shared registry has."""
    available = set(list_backbones())
    return {name: solo_backbone_factory(name) for name in SOLO_BACKBONES if name in available}
