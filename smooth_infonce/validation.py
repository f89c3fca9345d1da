"""Argument checks shared by the functional op, the module and the integrations.

Every message names the argument and says what was expected, so a bad call fails loudly at the
boundary instead of surfacing later as a NaN.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Optional

import torch
from torch import Tensor


def check_temperature(temperature: float) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, Real):
        raise TypeError(f"temperature must be a real number, got {type(temperature).__name__}")
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    return float(temperature)


def check_smoothing(smoothing: float) -> float:
    if isinstance(smoothing, bool) or not isinstance(smoothing, Real):
        raise TypeError(f"smoothing must be a real number in [0, 1), got {type(smoothing).__name__}")
    if not 0.0 <= smoothing < 1.0:  # also rejects NaN
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
    return float(smoothing)


def check_neighbors(neighbors: Optional[int]) -> Optional[int]:
    if neighbors is None:
        return None
    if isinstance(neighbors, bool) or not isinstance(neighbors, int):
        raise TypeError(f"neighbors must be None (uniform smoothing) or an int >= 1, got {neighbors!r}")
    if neighbors < 1:
        # k = 0 with alpha > 0 has no smoothing set: the authors' code divides alpha by k there.
        raise ValueError(f"neighbors must be None (uniform smoothing) or >= 1, got {neighbors}")
    return neighbors


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_embeddings(name: str, x: Tensor, *, width: Optional[int] = None, rows: Optional[int] = None) -> None:
    """A 2-D floating tensor of embeddings, optionally of a given width and row count."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (batch, dim), got shape {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor (float16/bfloat16/float32/float64), got {x.dtype}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (shape {tuple(x.shape)}); need at least one row")
    if x.shape[1] == 0:
        raise ValueError(f"{name} has zero-width embeddings (shape {tuple(x.shape)})")
    if width is not None and x.shape[1] != width:
        raise ValueError(f"{name} must have embedding width {width} like the anchors, got shape {tuple(x.shape)}")
    if rows is not None and x.shape[0] != rows:
        raise ValueError(f"{name} must have {rows} rows (one per anchor), got shape {tuple(x.shape)}")


def check_finite(**named: Optional[Tensor]) -> None:
    """Raise on NaN / inf and say which tensor and row.

    One device synchronisation for all the tensors together (they must share a device); only a
    failing call looks for the culprit.
    """
    present = {name: x for name, x in named.items() if x is not None}
    if not present or bool(torch.stack([torch.isfinite(x).all() for x in present.values()]).all()):
        return
    for name, x in present.items():
        bad_rows = (~torch.isfinite(x)).reshape(x.shape[0], -1).any(dim=1).nonzero().flatten()
        if bad_rows.numel():
            raise ValueError(
                f"{name} has non-finite values (NaN or inf) in {bad_rows.numel()} row(s), "
                f"first at row {int(bad_rows[0])}"
            )


def check_same_device(**tensors: Optional[Tensor]) -> None:
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {v.device for v in present.values()}
    if len(devices) > 1:
        where = ", ".join(f"{k} on {v.device}" for k, v in present.items())
        raise ValueError(f"all tensors must be on one device, got {where}")


def check_ids(name: str, ids: Tensor, rows: int, *, minimum: int = 0, validate: bool = True) -> None:
    """1-D integer ids, one per row; with ``validate`` also >= minimum (candidate ids may be -1:
    never matched), which reads a value back from the device."""
    if not isinstance(ids, Tensor):
        raise TypeError(f"{name} must be a 1-D integer tensor, got {type(ids).__name__}")
    if ids.dim() != 1 or ids.shape[0] != rows:
        raise ValueError(f"{name} must have shape ({rows},), got {tuple(ids.shape)}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {ids.dtype}")
    if validate and rows and int(ids.min()) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got min {int(ids.min())}")


def check_weights(weights: Tensor, rows: int, *, validate: bool = True) -> None:
    """Per-row weights (rows,), float; with ``validate`` also finite, >= 0 and not all zero (a
    device synchronisation)."""
    if not isinstance(weights, Tensor) or not weights.dtype.is_floating_point:
        raise TypeError("weights must be a floating-point tensor of per-row weights")
    if weights.shape != (rows,):
        raise ValueError(f"weights must have shape ({rows},), one per anchor row, got {tuple(weights.shape)}")
    if not validate:
        return
    check_finite(weights=weights)
    if bool((weights < 0).any()):
        raise ValueError("weights must be >= 0")
    if not bool(weights.sum() > 0):
        raise ValueError("weights must not all be zero")


def check_logit_scale(logit_scale: Tensor, device: torch.device, *, validate: bool = True) -> Tensor:
    """The learnable inverse temperature s (logits s <a_i, c_j>, open_clip's ``logit_scale``): a
    floating tensor with one element (shape () or (1,)) on the anchors' device; with ``validate``
    also finite and > 0, which reads it back from the device. Returns it as a 0-dim tensor."""
    if not isinstance(logit_scale, Tensor):
        raise TypeError(f"logit_scale must be a one-element floating-point torch.Tensor (s = 1 / tau, may "
                        f"require grad), got {type(logit_scale).__name__}; a fixed temperature is the "
                        "temperature option")
    if logit_scale.dim() > 1 or logit_scale.numel() != 1:
        raise ValueError(f"logit_scale must have one element (shape () or (1,)), got shape {tuple(logit_scale.shape)}")
    if not logit_scale.dtype.is_floating_point:
        raise TypeError(f"logit_scale must be a floating-point tensor (float16/bfloat16/float32/float64), "
                        f"got {logit_scale.dtype}")
    if logit_scale.device != device:
        raise ValueError(f"logit_scale must be on the anchors' device ({device}), got {logit_scale.device}")
    if validate:
        value = float(logit_scale.detach())
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"logit_scale must be finite and > 0 (s = 1 / tau), got {value}")
    return logit_scale.reshape(())
