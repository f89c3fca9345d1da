"""The ``method_kwargs`` of the smoothed solo-learn methods: one `LossOptions` per run.

Toolkit-free, so CI checks every shipped config without solo-learn. Every field of
`smooth_infonce.LossOptions` is a key of the same name under ``method_kwargs``:

=====================  ===================================================================
key                    meaning (`LossOptions` has the details)
=====================  ===================================================================
``temperature``        tau (required, as in solo-learn)
``smoothing``          alpha, the target mass moved from the positive to the smoothing set
``neighbors``          null: uniform smoothing over all negatives; k: the k most similar
``schedule``           alpha per epoch: null (constant), a kind (``constant`` | ``warmup``
                       | ``cosine``), or ``{kind, warmup_epochs, epochs}``; ``epochs`` of the
                       cosine ramp defaults to ``max_epochs - warmup_epochs``
``normalize``          L2-normalise inside the loss (default true)
``reduction``          ``mean`` (default) or ``sum`` (a training step needs a scalar)
``backend``            ``auto`` | ``reference`` | ``triton``
``deterministic``      Triton backend: no atomics in the backward
``allow_tf32``         Triton backend, fp32: null follows torch, true / false
``few_negatives``      ``use_all`` (default here: a short last batch never stops a run;
                       a row without negatives gives solo-learn's value) or ``raise``
=====================  ===================================================================

Besides these: ``loss_weights`` (null or [global, local] view weights, SSLight), ``validate``
(default true: the core's value checks, non-finite embeddings and the like, each step; they
synchronise with the device, false skips them on a hot GPU path), and for
``smooth_mocov2plus`` ``symmetric`` (null | ``mean`` | ``sum``), ``wait_for_full_bank`` (alpha 0
until the queue was filled once) and ``mask_own_queue_entries`` (queue entries of the query's own
image are not its negatives; default true), plus solo-learn's ``proj_hidden_dim``,
``proj_output_dim`` and ``queue_size``.

The keys of earlier versions (``smoothing_mode``, ``smoothing_schedule``,
``smoothing_warmup_epochs``, ``loss_backend``) are rejected with the key that replaces them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

from smooth_infonce import LossOptions, SmoothingSchedule
from smooth_infonce.integrations.recipes.multicrop import check_loss_weights
from smooth_infonce.options import SYMMETRIC

LOSS_KEYS: Tuple[str, ...] = LossOptions.field_names()
# LossOptions' defaults, except the training-loop policy for rows with too few negatives.
LOSS_DEFAULTS: Dict[str, Any] = {
    **{f.name: f.default for f in dataclasses.fields(LossOptions)},
    "few_negatives": "use_all",
}
METHOD_DEFAULTS: Dict[str, Any] = {**LOSS_DEFAULTS, "loss_weights": None, "validate": True}
MOCO_DEFAULTS: Dict[str, Any] = {"symmetric": "mean", "wait_for_full_bank": True, "mask_own_queue_entries": True}
RENAMED_KEYS = {
    "smoothing_mode": "neighbors (null = uniform)",
    "smoothing_schedule": "schedule",
    "smoothing_warmup_epochs": "schedule: {kind: ..., warmup_epochs: ...}",
    "loss_backend": "backend",
}
SCHEDULE_KEYS = ("kind", "warmup_epochs", "epochs")


@dataclass(frozen=True)
class MoCoSettings:
    """The queue settings of ``smooth_mocov2plus``."""

    symmetric: Optional[str]
    wait_for_full_bank: bool
    mask_own_queue_entries: bool


def with_defaults(method_kwargs: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict:
    """The defaults, overridden by the keys present in ``method_kwargs``."""
    return {key: method_kwargs.get(key, default) for key, default in defaults.items()}


def check_renamed(method_kwargs: Mapping[str, Any]) -> None:
    old = [key for key in RENAMED_KEYS if key in method_kwargs]
    if old:
        raise ValueError("method_kwargs: " + "; ".join(f"{key} is now {RENAMED_KEYS[key]}" for key in old))


def schedule_from_yaml(value: Any, smoothing: float, max_epochs: int) -> Optional[SmoothingSchedule]:
    """``schedule`` as written in YAML -> a `SmoothingSchedule` of alpha ``smoothing`` (or None)."""
    if value is None:
        return None
    fields = {"kind": value} if isinstance(value, str) else dict(value)
    unknown = set(fields) - set(SCHEDULE_KEYS)
    if unknown:
        raise ValueError(f"method_kwargs.schedule: unknown key(s) {sorted(unknown)}; use {SCHEDULE_KEYS}")
    kind = fields.get("kind", "constant")
    warmup = int(fields.get("warmup_epochs", 0) or 0)
    epochs = fields.get("epochs")
    if kind == "cosine" and epochs is None:
        epochs = max(1, int(max_epochs) - warmup)  # the ramp spans the run after the warm-up
    return SmoothingSchedule(float(smoothing), kind, warmup_epochs=warmup,
                             epochs=None if epochs is None else int(epochs))


def schedule_to_yaml(schedule: Optional[SmoothingSchedule], max_epochs: int) -> Any:
    """The inverse of `schedule_from_yaml`, always a mapping (so that a command line can set
    ``method_kwargs.schedule.warmup_epochs`` of any config); ``epochs`` only when it is not the
    default ramp."""
    if schedule is None:
        return None
    fields: Dict[str, Any] = {"kind": schedule.kind, "warmup_epochs": schedule.warmup_epochs}
    if schedule.kind == "cosine" and schedule.epochs != max(1, max_epochs - schedule.warmup_epochs):
        fields["epochs"] = schedule.epochs
    return fields


def loss_options(method_kwargs: Mapping[str, Any], max_epochs: int) -> LossOptions:
    """The run's `LossOptions` from ``method_kwargs`` (raises ValueError / TypeError naming the
    key; `LossOptions` checks the values)."""
    check_renamed(method_kwargs)
    if method_kwargs.get("temperature") is None:
        raise ValueError("method_kwargs.temperature is required")
    values = with_defaults(method_kwargs, LOSS_DEFAULTS)
    if values["reduction"] == "none":
        raise ValueError("method_kwargs.reduction must be 'mean' or 'sum': a training step needs a scalar loss")
    try:
        values["temperature"] = float(values["temperature"])
        values["smoothing"] = float(values["smoothing"])
        if values["neighbors"] is not None:
            values["neighbors"] = int(values["neighbors"])
        values["schedule"] = schedule_from_yaml(values["schedule"], values["smoothing"], max_epochs)
        return LossOptions(**values)
    except (TypeError, ValueError) as err:
        if str(err).startswith("method_kwargs"):
            raise
        raise type(err)(f"method_kwargs: {err}") from err


def loss_options_to_yaml(options: LossOptions, max_epochs: int) -> Dict[str, Any]:
    """``method_kwargs`` entries that `loss_options` turns back into ``options``."""
    values = {name: getattr(options, name) for name in LOSS_KEYS}
    values["schedule"] = schedule_to_yaml(options.schedule, max_epochs)
    return values


def weight_pair(value: Any) -> Optional[Tuple[float, float]]:
    """null, or a (global, local) pair of non-negative floats, not both 0."""
    return check_loss_weights(value, "method_kwargs.loss_weights")


def symmetric_mode(method_kwargs: Mapping[str, Any]) -> Optional[str]:
    """MoCo's ``symmetric``: None (YAML null or "none"), "mean" or "sum"."""
    value = with_defaults(method_kwargs, MOCO_DEFAULTS)["symmetric"]
    if isinstance(value, str) and value.lower() in ("none", "null"):
        value = None
    if value not in SYMMETRIC:
        raise ValueError(f"method_kwargs.symmetric must be null, 'mean' or 'sum', got {value!r}")
    return value


def validate_flag(method_kwargs: Mapping[str, Any]) -> bool:
    value = with_defaults(method_kwargs, METHOD_DEFAULTS)["validate"]
    if not isinstance(value, bool):
        raise TypeError(f"method_kwargs.validate must be true or false, got {value!r}")
    return value


def moco_settings(method_kwargs: Mapping[str, Any], options: LossOptions) -> MoCoSettings:
    values = with_defaults(method_kwargs, MOCO_DEFAULTS)
    for key in ("wait_for_full_bank", "mask_own_queue_entries"):
        if not isinstance(values[key], bool):
            raise TypeError(f"method_kwargs.{key} must be true or false, got {values[key]!r}")
    symmetric = symmetric_mode(method_kwargs)
    if symmetric is not None and options.reduction != "mean":
        raise ValueError("method_kwargs: symmetric MoCo combines two mean losses; reduction must be 'mean'")
    return MoCoSettings(symmetric, values["wait_for_full_bank"], values["mask_own_queue_entries"])
