"""Backbones of the lightweight-model recipes, built without downloading weights.

Toolkit-free (torch, torchvision, timm only): the lightly integration, the demo and the solo-learn
integration all build their encoders here, so a backbone name means the same network everywhere.

Every builder returns a `Backbone`: a module mapping images (B, 3, H, W) to pooled features
(B, num_features), where ``num_features`` is the width the network really outputs, measured by a
forward pass at build time. That matters from timm 1.0.7 on, whose MobileNetV3 reports
``num_features == 960`` while its pooled output (after ``conv_head``) is 1280 wide; heads sized
from the reported number would not fit.

Example:
    >>> import torch
    >>> from smooth_infonce.integrations.recipes.backbones import build_backbone, list_backbones
    >>> backbone = build_backbone("mobilenetv3_large_100")
    >>> backbone.num_features
    1280
    >>> backbone(torch.randn(2, 3, 64, 64)).shape
    torch.Size([2, 1280])
    >>> "resnet18" in list_backbones()
    True
"""

from __future__ import annotations

import importlib
from typing import Callable, Dict, List, Optional

import torch
from torch import Tensor, nn

# Width of the probe image used to measure the output width. Every registered network pools
# globally, so any size that survives its downsampling (total stride 32) gives the same width.
_PROBE_SIZE = 32


class Backbone(nn.Module):
    """A feature extractor with its true output width.

    Attributes:
        net: the wrapped network; ``net(images)`` returns (B, num_features).
        num_features: the measured output width (what heads must be sized from).
        name: the registry name it was built from.
    """

    def __init__(self, net: nn.Module, name: str, num_features: int | None = None) -> None:
        super().__init__()
        self.net = net
        self.name = name
        self.num_features = num_features if num_features is not None else measure_output_width(net)

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images).flatten(start_dim=1)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, num_features={self.num_features}"


@torch.no_grad()
def measure_output_width(net: nn.Module, size: int = _PROBE_SIZE) -> int:
    """Output width of ``net`` from one forward pass of a single image (eval mode, restored after)."""
    was_training = net.training
    net.eval()  # batch norm cannot run in train mode on a batch of one
    try:
        parameter = next(net.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
        features = net(torch.zeros(1, 3, size, size, device=device))
    finally:
        net.train(was_training)
    return int(features.flatten(start_dim=1).shape[1])


BackboneFactory = Callable[..., nn.Module]
_BACKBONES: Dict[str, BackboneFactory] = {}


def register_backbone(name: str) -> Callable[[BackboneFactory], BackboneFactory]:
    """Decorator: register ``factory(cifar_stem: bool, **kwargs) -> nn.Module`` (pooled output)."""

    def add(factory: BackboneFactory) -> BackboneFactory:
        if name in _BACKBONES:
            raise ValueError(f"backbone {name!r} is already registered")
        _BACKBONES[name] = factory
        return factory

    return add


def list_backbones() -> List[str]:
    """Registered names; ``"timm:<model>"`` builds any other timm model too."""
    return sorted(_BACKBONES)


def build_backbone(name: str, *, cifar_stem: Optional[bool] = None, **kwargs) -> Backbone:
    """Build a registered backbone (random init, no download) with its measured output width.

    Args:
        name: a name from `list_backbones()`, or ``"timm:<model name>"`` for any timm model.
        cifar_stem: for small images (32-64 px): the first convolution gets stride 1 (ResNets also
            a 3x3 kernel and no max-pool), so a 32 px image is not reduced to 1x1 too early.
            None takes the network's default (False for the ImageNet networks, True for
            ``tiny_cnn``).
        kwargs: passed to the underlying constructor (e.g. ``width`` for ``tiny_cnn``,
            ``drop_rate`` for timm models).
    """
    if cifar_stem is not None:
        kwargs["cifar_stem"] = cifar_stem
    if name.startswith("timm:"):
        net = _timm(name[len("timm:"):], **kwargs)
    elif name in _BACKBONES:
        net = _BACKBONES[name](**kwargs)
    else:
        raise ValueError(f"unknown backbone {name!r}; registered: {list_backbones()} (or 'timm:<model>')")
    return Backbone(net, name)


def _require(module: str, extra: str):
    """Import an optional package, or raise an ImportError that names the extra bringing it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"this backbone needs {module}: pip install 'smooth-infonce[{extra}]' ({err})") from err


# --- timm ------------------------------------------------------------------------------------

def _timm(model_name: str, *, cifar_stem: bool = False, **kwargs) -> nn.Module:
    timm = _require("timm", "timm")

    # num_classes=0 drops the classifier; the output is the pooled feature (after conv_head).
    net = timm.create_model(model_name, pretrained=False, num_classes=0, **kwargs)
    if cifar_stem:
        stem = getattr(net, "conv_stem", None)
        if not isinstance(stem, nn.Conv2d):
            raise ValueError(f"cifar_stem is only supported for timm models with a conv_stem, not {model_name!r}")
        stem.stride = (1, 1)
    return net


@register_backbone("mobilenetv3_large_100")
def _mobilenetv3_large_100(cifar_stem: bool = False, **kwargs) -> nn.Module:
    return _timm("mobilenetv3_large_100", cifar_stem=cifar_stem, **kwargs)


@register_backbone("efficientnet_b0")
def _efficientnet_b0(cifar_stem: bool = False, **kwargs) -> nn.Module:
    return _timm("efficientnet_b0", cifar_stem=cifar_stem, **kwargs)


@register_backbone("efficientnet_b1")
def _efficientnet_b1(cifar_stem: bool = False, **kwargs) -> nn.Module:
    return _timm("efficientnet_b1", cifar_stem=cifar_stem, **kwargs)


@register_backbone("vit_tiny_patch16")
def _vit_tiny_patch16(cifar_stem: bool = False, **kwargs) -> nn.Module:
    """timm's ViT-Tiny/16 (SSLight's ViT; pass ``drop_path_rate``): the CLS token, 192 wide. Any
    image size that is a multiple of 16 works (``dynamic_img_size``: 224 px global and 96 / 128 px
    local crops through one network, the position embedding interpolated)."""
    if cifar_stem:
        raise ValueError("vit_tiny_patch16 has no convolution stem: cifar_stem is not supported")
    kwargs.setdefault("dynamic_img_size", True)
    return _timm("vit_tiny_patch16_224", **kwargs)


# --- torchvision -----------------------------------------------------------------------------

def _torchvision_resnet(arch: str, cifar_stem: bool, **kwargs) -> nn.Module:
    torchvision = _require("torchvision", "lightly")

    net = getattr(torchvision.models, arch)(weights=None, **kwargs)
    if cifar_stem:
        net.conv1 = nn.Conv2d(3, net.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    return net


@register_backbone("resnet18")
def _resnet18(cifar_stem: bool = False, **kwargs) -> nn.Module:
    return _torchvision_resnet("resnet18", cifar_stem, **kwargs)


@register_backbone("resnet34")
def _resnet34(cifar_stem: bool = False, **kwargs) -> nn.Module:
    return _torchvision_resnet("resnet34", cifar_stem, **kwargs)


@register_backbone("resnet50")
def _resnet50(cifar_stem: bool = False, **kwargs) -> nn.Module:
    return _torchvision_resnet("resnet50", cifar_stem, **kwargs)


@register_backbone("mobilenet_v2")
def _mobilenet_v2(cifar_stem: bool = False, **kwargs) -> nn.Module:
    """torchvision's MobileNetV2 (the SSLight backbone), classifier removed: 1280 features."""
    torchvision = _require("torchvision", "lightly")

    net = torchvision.models.mobilenet_v2(weights=None, **kwargs)
    if cifar_stem:
        net.features[0][0].stride = (1, 1)
    net.classifier = nn.Identity()
    return net


# --- a tiny CNN for CPU demos and tests ------------------------------------------------------

def _conv_bn_relu(inputs: int, outputs: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inputs, outputs, 3, stride=stride, padding=1, groups=groups, bias=False),
        nn.BatchNorm2d(outputs),
        nn.ReLU(inplace=True),
    )


@register_backbone("tiny_cnn")
def _tiny_cnn(cifar_stem: bool = True, width: int = 32) -> nn.Module:
    """Six 3x3 conv-BN-ReLU layers, widths (w, w, 2w, 2w, 4w, 4w), stride 2 at layers 3 and 5,
    global average pool: 4 * width features. About 0.3 M parameters at width 32; one CPU core
    trains it on 32 px images at a few hundred images per second. Meant for small images, so it
    has no downsampling stem; ``cifar_stem=False`` adds a stride-2 first layer for larger inputs.
    """
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    w = width
    return nn.Sequential(
        _conv_bn_relu(3, w, stride=1 if cifar_stem else 2),
        _conv_bn_relu(w, w),
        _conv_bn_relu(w, 2 * w, stride=2),
        _conv_bn_relu(2 * w, 2 * w),
        _conv_bn_relu(2 * w, 4 * w, stride=2),
        _conv_bn_relu(4 * w, 4 * w),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
