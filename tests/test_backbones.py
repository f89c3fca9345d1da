"""Backbones built from real timm / torchvision networks (no weight download), each reporting its
measured output width."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from smooth_infonce.integrations.recipes.backbones import build_backbone, list_backbones, measure_output_width

# (name, expected width) from the networks' definitions; measured by a forward pass below.
BACKBONES = [("mobilenetv3_large_100", 1280), ("efficientnet_b0", 1280), ("mobilenet_v2", 1280),
             ("resnet18", 512), ("resnet34", 512), ("vit_tiny_patch16", 192), ("tiny_cnn", 128)]


@pytest.mark.parametrize("name,width", BACKBONES)
def test_backbone_reports_its_true_width_at_small_and_224_px(name, width):
    torch.manual_seed(0)
    backbone = build_backbone(name).eval()
    assert backbone.num_features == width
    with torch.no_grad():
        for size in (32, 224):
            assert backbone(torch.randn(2, 3, size, size)).shape == (2, width)


def test_timm_mobilenetv3_reported_width_is_not_its_output_width():
    backbone = build_backbone("mobilenetv3_large_100")
    assert backbone.net.num_features in (960, 1280)  # timm >= 1.0.7 reports 960 (the trap), 1.0.3 1280
    assert backbone.num_features == 1280 == measure_output_width(backbone.net)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "efficientnet_b0"])
def test_cifar_stem_keeps_more_resolution(name):
    plain, cifar = build_backbone(name).eval(), build_backbone(name, cifar_stem=True).eval()
    first_conv = next(m for m in cifar.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.stride == (1, 1)
    assert cifar.num_features == plain.num_features
    with torch.no_grad():
        assert cifar(torch.randn(2, 3, 32, 32)).shape == (2, plain.num_features)


def test_backbone_registry():
    assert {"mobilenetv3_large_100", "efficientnet_b0", "mobilenet_v2", "resnet18", "tiny_cnn"} <= set(list_backbones())
    assert build_backbone("timm:mobilenetv3_small_050").num_features == 1024
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone("vgg99")


def test_vit_tiny_takes_the_multicrop_sizes_drops_path_and_has_no_cifar_stem():
    """SSLight's ViT-Tiny/16: one network for 224 px globals and 96 / 128 px locals (the position
    embedding is interpolated), its CLS token as the feature, stochastic depth as the preset asks."""
    backbone = build_backbone("vit_tiny_patch16", drop_path_rate=0.1)
    assert backbone.net.global_pool == "token" and backbone.num_features == 192
    rates = [block.drop_path1.drop_prob for block in backbone.net.blocks if hasattr(block.drop_path1, "drop_prob")]
    assert rates and max(rates) == pytest.approx(0.1)
    with torch.no_grad():
        for size in (96, 128, 224):
            assert backbone.eval()(torch.randn(1, 3, size, size)).shape == (1, 192)
    with pytest.raises(ValueError, match="cifar_stem"):
        build_backbone("vit_tiny_patch16", cifar_stem=True)
