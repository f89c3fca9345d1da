"""solo-learn backbone factories over the shared builders of `smooth_infonce.integrations.recipes.backbones`.

Toolkit-free: a factory has solo-learn's signature ``factory(method, **kwargs)`` and returns the
shared `Backbone` (pooled features, ``num_features`` measured, not reported), which is what
solo-learn sizes its projector and online classifier from. So the timm MobileNetV3 trap
(``num_features`` 960, output 1280) cannot reach solo.

``backbone.kwargs`` in a solo config go to the shared builder, e.g. ``cifar_stem: true`` for
32-64 px images (solo-learn's own CIFAR stem switch only applies to its ResNets).

Names are the shared registry's names, so one name means one network in lightly and in solo.
Names starting with ``resnet`` are special-cased by solo-learn (it reads ``inplanes``, replaces
``fc`` and, for cifar10 / cifar100, swaps the stem): solo-learn's own ``resnet18`` / ``resnet50``
stay, and the one it lacks, ``resnet34`` (SSLight's DINO), is registered as the shared builder's
torchvision ResNet itself (`solo_resnet_factory`), which is what solo-learn's special case expects.

ViT-Tiny/16: ``vit_tiny_patch16`` (the shared timm ViT-Tiny/16 with ``dynamic_img_size``) rather
than solo-learn's ``vit_tiny``, whose patch embedding takes 224 px images only: SSLight's 96 / 128
px local crops go through the same network.
"""

from __future__ import annotations

from typing import Callable, Dict

from torch import nn

from smooth_infonce.integrations.recipes.backbones import build_backbone, list_backbones, measure_output_width

# The lightweight backbones of the recipes, plus the shared CPU test network.
SOLO_BACKBONES = ("mobilenetv3_large_100", "efficientnet_b0", "mobilenet_v2", "efficientnet_b1", "tiny_cnn",
                  "vit_tiny_patch16")
# ResNets solo-learn lacks, registered in its own layout (a torchvision ResNet with ``inplanes``).
SOLO_RESNETS = ("resnet34",)

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


def solo_resnet_factory(name: str) -> Callable[..., nn.Module]:
    """A solo-learn factory for the shared ResNet ``name``: the torchvision ResNet itself (random
    init, ``fc`` removed, ``cifar_stem`` as the shared builder), so solo-learn reads its width
    from ``inplanes`` (512 for ResNet-18/34) as for its own ResNets."""
    if not name.startswith("resnet") or name not in list_backbones():
        raise ValueError(f"{name!r} is not a shared ResNet; shared backbones: {list_backbones()}")

    def factory(method: str | None = None, **kwargs) -> nn.Module:
        net = build_backbone(name, **kwargs).net
        if net.inplanes != measure_output_width(net):
            raise AssertionError(f"{name}: inplanes {net.inplanes} is not its output width")
        return net

    factory.__name__ = f"solo_{name}"
    factory.__doc__ = f"solo-learn factory for the shared torchvision {name!r} (kwargs: cifar_stem, ...)."
    setattr(factory, FACTORY_MARKER, name)
    return factory


def solo_backbone_factories() -> Dict[str, Callable[..., nn.Module]]:
    """Factories for every name of `SOLO_BACKBONES` and `SOLO_RESNETS` the shared registry has."""
    available = set(list_backbones())
    factories = {name: solo_backbone_factory(name) for name in SOLO_BACKBONES if name in available}
    factories.update((name, solo_resnet_factory(name)) for name in SOLO_RESNETS if name in available)
    return factories
