"""Optimisers of the recipes: parameter groups with the no-decay rules, LARS, lr scaling.

Toolkit-free, shared by the lightly and solo-learn integrations.

Parameter-group rules (SSLight's code), switched by `OptimizerSpec`:

- ``exclude_bias_norm``: 1-D parameters (biases, norm scales / shifts) get no weight decay and no
  LARS adaptation;
- ``exclude_depthwise``: depthwise convolution kernels (``groups == in_channels > 1``, weight
  shape [C, 1, k, k]) get no weight decay, but keep the LARS adaptation.

lightly's `lightly.utils.lars.LARS` ties the adaptation to a non-zero weight decay, so it would
also switch the adaptation off for depthwise kernels. `LARS` here takes the adaptation as a
per-group flag (``lars_adaptation``), and with the default flag (``weight_decay != 0``) it takes
the same steps as lightly's.

Example:
    >>> import torch
    >>> from smooth_infonce.integrations.recipes.backbones import build_backbone
    >>> from smooth_infonce.integrations.recipes.optim import build_optimizer, parameter_groups
    >>> from smooth_infonce.integrations.recipes import get_preset
    >>> recipe = get_preset("sslight_moco")
    >>> model = build_backbone("mobilenet_v2")
    >>> [g["name"] for g in parameter_groups(model, recipe.optimizer)]
    ['decay', 'no_decay_1d', 'no_decay_depthwise']
    >>> optimizer = build_optimizer(model, recipe.optimizer, batch_size=256)
    >>> type(optimizer).__name__, optimizer.param_groups[0]["lr"]
    ('LARS', 0.48)
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, Optional

import torch
from torch import nn

from .specs import OptimizerSpec


def is_depthwise_conv(module: nn.Module) -> bool:
    """A convolution whose every group has one input channel (``groups == in_channels > 1``)."""
    return isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1 and module.groups == module.in_channels


def parameter_groups(model: nn.Module, spec: OptimizerSpec) -> List[Dict[str, Any]]:
    """Split the trainable parameters of ``model`` into named optimiser groups.

    Groups (only non-empty ones are returned; each parameter appears once):

    - ``decay``: weight decay ``spec.weight_decay``, LARS adaptation on;
    - ``no_decay_1d``: biases and norm parameters (``exclude_bias_norm``): no decay, no adaptation;
    - ``no_decay_depthwise``: depthwise kernels (``exclude_depthwise``): no decay, adaptation on.
    """
    exempt = decay_exemptions(model, spec)
    groups: Dict[str, Dict[str, Any]] = {
        "decay": {"name": "decay", "params": [], "weight_decay": spec.weight_decay, "lars_adaptation": True},
        "no_decay_1d": {"name": "no_decay_1d", "params": [], "weight_decay": 0.0, "lars_adaptation": False},
        "no_decay_depthwise": {"name": "no_decay_depthwise", "params": [], "weight_decay": 0.0,
                               "lars_adaptation": True},
    }
    seen = set()
    for param in model.parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        groups[exempt.get(id(param), "decay")]["params"].append(param)
    return [group for group in groups.values() if group["params"]]


def decay_exemptions(model: nn.Module, spec: OptimizerSpec) -> Dict[int, str]:
    """``id(parameter) -> group name`` for the parameters of ``model`` that the spec's rules
    exempt from weight decay: ``"no_decay_1d"`` (biases, norms: ``exclude_bias_norm``) or
    ``"no_decay_depthwise"`` (depthwise kernels: ``exclude_depthwise``). Toolkits with their own
    parameter groups (solo-learn) can split them with this."""
    exempt: Dict[int, str] = {}
    if spec.exclude_depthwise:
        exempt.update((id(m.weight), "no_decay_depthwise") for m in model.modules() if is_depthwise_conv(m))
    if spec.exclude_bias_norm:
        exempt.update((id(p), "no_decay_1d") for p in model.parameters() if p.ndim <= 1)
    return exempt


def split_no_decay(groups: Iterable[Dict[str, Any]], model: nn.Module, spec: OptimizerSpec) -> List[Dict[str, Any]]:
    """Apply the spec's no-decay rules inside parameter groups a toolkit already built (solo-learn
    makes one per module, each with its own lr).

    Each group keeps its decayed parameters and gets a ``<name>_no_decay`` sibling with
    ``weight_decay=0`` for the exempt ones (`decay_exemptions`). Groups that already have
    ``weight_decay=0`` pass through; empty groups are dropped.
    """
    exempt = decay_exemptions(model, spec)
    out: List[Dict[str, Any]] = []
    for group in groups:
        params = list(group["params"])
        settings = {key: value for key, value in group.items() if key != "params"}
        if settings.get("weight_decay") == 0:
            out.append({**settings, "params": params})
            continue
        decayed = [p for p in params if id(p) not in exempt]
        exempted = [p for p in params if id(p) in exempt]
        if decayed:
            out.append({**settings, "params": decayed})
        if exempted:
            name = {"name": f"{settings['name']}_no_decay"} if settings.get("name") else {}
            out.append({**settings, **name, "params": exempted, "weight_decay": 0.0})
    return out


class LARS(torch.optim.Optimizer):
    """SGD with momentum and LARS trust ratio ("Large Batch Training of Convolutional Networks"),
    with the adaptation switched per parameter group.

    For a parameter p with gradient g in a group with ``lars_adaptation`` (default:
    ``weight_decay != 0``), the update direction is
    ``(g + wd * p) * eta * |p| / (|g| + wd * |p| + eps)``; otherwise ``g + wd * p``. Then
    ``v = momentum * v + d`` and ``p -= lr * v``. This is the formula of lightly's LARS, so the two
    agree whenever the adaptation flag equals ``weight_decay != 0``.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(4, 2)
        >>> optimizer = LARS([{"params": [model.weight], "weight_decay": 1e-6},
        ...                   {"params": [model.bias], "weight_decay": 0.0}], lr=0.1, momentum=0.9)
        >>> model(torch.randn(8, 4)).pow(2).mean().backward()
        >>> optimizer.step()
    """

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 1e-3, eps: float = 1e-8) -> None:
        if lr < 0 or momentum < 0 or weight_decay < 0 or trust_coefficient <= 0:
            raise ValueError(f"invalid LARS settings: lr={lr}, momentum={momentum}, "
                             f"weight_decay={weight_decay}, trust_coefficient={trust_coefficient}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                        trust_coefficient=trust_coefficient, eps=eps, lars_adaptation=None)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            weight_decay = group["weight_decay"]
            adapt = group["lars_adaptation"]
            if adapt is None:
                adapt = weight_decay != 0
            for p in group["params"]:
                if p.grad is None:
                    continue
                direction = p.grad.add(p, alpha=weight_decay) if weight_decay != 0 else p.grad.clone()
                if adapt:
                    p_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(p.grad)
                    trust = group["trust_coefficient"] * p_norm / (g_norm + p_norm * weight_decay + group["eps"])
                    # A zero weight or gradient norm leaves the step unscaled (as in lightly).
                    direction.mul_(torch.where((p_norm > 0) & (g_norm > 0), trust, torch.ones_like(trust)))
                if group["momentum"] != 0:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = direction.clone()
                    else:
                        state["momentum_buffer"].mul_(group["momentum"]).add_(direction)
                    direction = state["momentum_buffer"]
                p.add_(direction, alpha=-group["lr"])
        return loss


def build_optimizer(model: nn.Module, spec: OptimizerSpec, batch_size: int) -> torch.optim.Optimizer:
    """The recipe's optimiser over `parameter_groups`, at the peak lr for ``batch_size`` (per-step
    changes: set ``group["lr"] = spec.learning_rate(step, ...)``)."""
    groups = parameter_groups(model, spec)
    lr = spec.scaled_lr(batch_size)
    if spec.name == "lars":
        return LARS(groups, lr=lr, momentum=spec.momentum, trust_coefficient=spec.trust_coefficient)
    for group in groups:  # SGD and AdamW do not know the LARS flag
        group.pop("lars_adaptation")
    if spec.name == "adamw":  # DINO's ViT optimiser: torch's defaults (betas (0.9, 0.999), eps 1e-8)
        return torch.optim.AdamW(groups, lr=lr)
    return torch.optim.SGD(groups, lr=lr, momentum=spec.momentum)


def set_schedules(optimizer: torch.optim.Optimizer, spec: OptimizerSpec, step: int, *, steps_per_epoch: int,
                  epochs: int, batch_size: int) -> float:
    """Set the learning rate of every group and the weight decay of the decaying groups (those
    built with ``spec.weight_decay``) for iteration ``step``; returns the learning rate."""
    lr = spec.learning_rate(step, steps_per_epoch=steps_per_epoch, epochs=epochs, batch_size=batch_size)
    weight_decay = spec.weight_decay_at(step, steps_per_epoch=steps_per_epoch, epochs=epochs)
    for group in optimizer.param_groups:
        group["lr"] = lr
        if group.get("name") == "decay":
            group["weight_decay"] = weight_decay
    return lr
