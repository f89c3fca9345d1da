"""The ``method_kwargs`` the smoothed solo-learn methods read, with defaults and checks.

Toolkit-free, so CI can check every shipped config without solo-learn. The loss settings map
one-to-one onto the shared recipe's `LossSpec` (same defaults, same checks, same alpha schedule),
so a preset and a solo config with the same numbers train with the same loss.

``method_kwargs`` of ``smooth_simclr`` and ``smooth_mocov2plus``, besides solo-learn's own
``proj_hidden_dim``, ``proj_output_dim``, ``temperature`` (and ``queue_size`` for MoCo):

============================  =======================  ==========================================
key                           LossSpec / ViewSpec      meaning
============================  =======================  ==========================================
``smoothing``                 ``loss.smoothing``       alpha, target mass moved to negatives
``smoothing_mode``            ``loss.mode``            "neighbors" (k most similar negatives) or
                                                       "uniform" (all negatives)
``neighbors``                 ``loss.neighbors``       k of the neighbours mode
``smoothing_schedule``        ``loss.schedule``        "constant", "warmup" or "cosine" (per epoch)
``smoothing_warmup_epochs``   ``loss.warmup_epochs``   epochs at alpha = 0 first
``wait_for_full_bank``        ``loss.wait_...bank``    MoCo: alpha = 0 until the queue was filled
``loss_weights``              ``views.loss_weights``   null, or [global, local] view weights
``loss_backend``              (op argument)            "auto", "reference" or "triton"
``symmetric`` (MoCo only)     (solo convention)        null, "mean" (default) or "sum"
============================  =======================  ==========================================
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

from smooth_infonce import SmoothingSchedule
from smooth_infonce.integrations.recipes import LossSpec

from .losses import SYMMETRIC_MODES

# method_kwargs key -> LossSpec field
LOSS_SPEC_KEYS = {
    "smoothing": "smoothing",
    "smoothing_mode": "mode",
    "neighbors": "neighbors",
    "smoothing_schedule": "schedule",
    "smoothing_warmup_epochs": "warmup_epochs",
    "wait_for_full_bank": "wait_for_full_bank",
}
_LOSS_SPEC_DEFAULTS = {f.name: f.default for f in dataclasses.fields(LossSpec)}
SMOOTHING_DEFAULTS: Dict[str, Any] = {
    **{key: _LOSS_SPEC_DEFAULTS[field] for key, field in LOSS_SPEC_KEYS.items()},
    "loss_weights": None,
    "loss_backend": "auto",
}
MOCO_DEFAULTS: Dict[str, Any] = {"symmetric": "mean"}
BACKENDS = ("auto", "reference", "triton")


@dataclass(frozen=True)
class LossOptions:
    """Typed loss settings of one run."""

    spec: LossSpec
    schedule: SmoothingSchedule
    loss_weights: Optional[Tuple[float, float]]
    backend: str

    @property
    def neighbors(self) -> Optional[int]:
        return self.spec.neighbors_or_none


def with_defaults(method_kwargs: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict:
    """The defaults, overridden by the keys present in ``method_kwargs``."""
    return {key: method_kwargs.get(key, default) for key, default in defaults.items()}


def loss_options(method_kwargs: Mapping[str, Any], max_epochs: int) -> LossOptions:
    """Parse and check the loss keys (raises ValueError with the offending key)."""
    values = with_defaults(method_kwargs, SMOOTHING_DEFAULTS)
    if "temperature" not in method_kwargs:
        raise ValueError("method_kwargs.temperature is required")
    fields = {field: values[key] for key, field in LOSS_SPEC_KEYS.items()}
    fields["smoothing"] = float(fields["smoothing"])
    if fields["neighbors"] is None and fields["mode"] == "uniform":
        fields["neighbors"] = _LOSS_SPEC_DEFAULTS["neighbors"]  # unused in uniform mode
    spec = LossSpec(temperature=float(method_kwargs["temperature"]), **fields)
    if values["loss_backend"] not in BACKENDS:
        raise ValueError(f"method_kwargs.loss_backend must be one of {BACKENDS}, got {values['loss_backend']!r}")
    return LossOptions(
        spec=spec,
        schedule=spec.smoothing_schedule(int(max_epochs)),
        loss_weights=weight_pair(values["loss_weights"]),
        backend=values["loss_backend"],
    )


def weight_pair(value: Any) -> Optional[Tuple[float, float]]:
    """null, or a (global, local) pair of non-negative floats, not both 0."""
    if value is None:
        return None
    pair = tuple(float(v) for v in value)
    if len(pair) != 2 or min(pair) < 0 or sum(pair) <= 0:
        raise ValueError(f"method_kwargs.loss_weights must be null or [global, local] >= 0, not both 0; got {value!r}")
    return pair


def symmetric_mode(method_kwargs: Mapping[str, Any]) -> Optional[str]:
    """MoCo's ``symmetric``: None (YAML null or "none"), "mean" or "sum"."""
    value = with_defaults(method_kwargs, MOCO_DEFAULTS)["symmetric"]
    if isinstance(value, str) and value.lower() in ("none", "null"):
        value = None
    if value not in SYMMETRIC_MODES:
        raise ValueError(f"method_kwargs.symmetric must be null, 'mean' or 'sum', got {value!r}")
    return value
