"""`LossOptions`: every option of the loss, validated once, in one frozen object.

The module (`SmoothInfoNCELoss`), the lightly drop-in, the solo-learn methods, the Lightning module
and the presets all hold one `LossOptions`, so an option is added here once and reaches every
adapter under the same name. Only the scheduled alpha changes during a run: adapters keep the
current value beside the options (``options.smoothing_at(epoch)``), the options never change.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from .schedule import SmoothingSchedule
from .validation import check_choice, check_neighbors, check_smoothing, check_temperature

BACKENDS = ("auto", "reference", "triton")
REDUCTIONS = ("mean", "sum", "none")
SYMMETRIC = (None, "mean", "sum")
# What a row with too few negatives does (a last batch of one image, k larger than a short batch):
FEW_NEGATIVES = (
    "raise",  # a clear error (the default: such input is usually a bug)
    "use_all",  # smooth onto all the row's negatives; no negatives: plain InfoNCE, 0 for one column
)


@dataclass(frozen=True)
class LossOptions:
    """The loss's options. Construction validates every field; the object is immutable.

    Attributes:
        temperature: tau > 0.
        smoothing: alpha in [0, 1), the target mass moved from the positives to the smoothing set
            (0: plain InfoNCE). With a ``schedule`` this is the schedule's alpha.
        neighbors: None for uniform smoothing over all negatives, or k >= 1 for the k most similar
            negatives of each row (the authors' default strategy; ties to the lower index).
        schedule: optional alpha per epoch (`SmoothingSchedule`); its alpha replaces ``smoothing``.
        normalize: L2-normalise the embeddings inside the loss (the gradient flows through it).
        reduction: "mean" (weighted mean of the rows), "sum" or "none".
        backend: "auto" (the fused Triton kernel for CUDA tensors, the reference op elsewhere),
            "reference" or "triton".
        deterministic: Triton backend: no atomics in the backward, bitwise-reproducible gradients.
        allow_tf32: Triton backend, float32 inputs: TF32 tensor-core dots (True), exact IEEE dots
            (False), or None to follow torch (`torch.backends.cuda.matmul.allow_tf32`, i.e.
            ``torch.get_float32_matmul_precision() != "highest"``): the precision an eager
            float32 matmul would get.
        few_negatives: a row with fewer negatives than ``neighbors`` (or none): "raise" or
            "use_all" (smooth onto all of them; with none, the row is plain InfoNCE: all target
            mass on its positives, loss 0 and zero gradient when the positive is its only column,
            as lightly's NTXentLoss gives). The training-loop adapters use "use_all".

    The options are plain Python values: ``torch.compile`` specialises on them (a new value, a
    recompile), and the value checks (``validate``, an argument of the calls, not an option) are
    what decides whether a call compiles as one graph (`smooth_infonce`).

    Example:
        >>> from smooth_infonce import LossOptions, SmoothingSchedule
        >>> opts = LossOptions(temperature=0.2, smoothing=0.1, neighbors=5)
        >>> opts.replace(neighbors=None).neighbors is None
        True
        >>> LossOptions(schedule=SmoothingSchedule(0.1, "warmup", warmup_epochs=3)).smoothing_at(0)
        0.0
    """

    temperature: float = 0.1
    smoothing: float = 0.0
    neighbors: Optional[int] = None
    schedule: Optional[SmoothingSchedule] = None
    normalize: bool = True
    reduction: str = "mean"
    backend: str = "auto"
    deterministic: bool = False
    allow_tf32: Optional[bool] = None
    few_negatives: str = "raise"

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise the validated values in place once
        set_(self, "temperature", check_temperature(self.temperature))
        if self.schedule is not None:
            if not isinstance(self.schedule, SmoothingSchedule):
                raise TypeError(f"schedule must be a SmoothingSchedule or None, got {type(self.schedule).__name__}")
            if self.smoothing not in (0.0, self.schedule.smoothing):
                raise ValueError(f"smoothing={self.smoothing} disagrees with the schedule's alpha "
                                 f"{self.schedule.smoothing}; give one of them")
            set_(self, "smoothing", self.schedule.smoothing)
        set_(self, "smoothing", check_smoothing(self.smoothing))
        set_(self, "neighbors", check_neighbors(self.neighbors))
        check_choice("reduction", self.reduction, REDUCTIONS)
        check_choice("backend", self.backend, BACKENDS)
        check_choice("few_negatives", self.few_negatives, FEW_NEGATIVES)
        for name in ("normalize", "deterministic"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.allow_tf32 is not None and not isinstance(self.allow_tf32, bool):
            raise TypeError(f"allow_tf32 must be None (follow torch), True or False, got {self.allow_tf32!r}")

    def smoothing_at(self, epoch: int) -> float:
        """alpha for ``epoch``: the schedule's value, or the constant ``smoothing``."""
        return self.schedule(epoch) if self.schedule is not None else self.smoothing

    @property
    def initial_smoothing(self) -> float:
        """alpha before any ``set_epoch`` call: the schedule's epoch-0 value."""
        return self.smoothing_at(0)

    def replace(self, **changes: Any) -> "LossOptions":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return _FIELD_NAMES  # read once below: torch.compile cannot trace dataclasses.fields(cls)


_FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(LossOptions))


class ScheduledSmoothing:
    """What every adapter holding ``self.options`` and its current alpha ``self.smoothing`` shares:
    ``set_epoch`` and read access to the neighbours and the schedule (`add_option_properties` makes
    them assignable where an adapter exposes every option)."""

    @property
    def neighbors(self) -> Optional[int]:
        return self.options.neighbors

    @property
    def schedule(self) -> Optional[SmoothingSchedule]:
        return self.options.schedule

    def set_epoch(self, epoch: int) -> float:
        """Set the current alpha (``smoothing``) from the schedule for this epoch and return it."""
        if self.options.schedule is None:
            raise RuntimeError(f"set_epoch needs a schedule: {type(self).__name__}(..., "
                               "schedule=SmoothingSchedule(...))")
        self.smoothing = self.options.smoothing_at(epoch)
        return self.smoothing


def add_option_properties(cls: type) -> type:
    """Give an adapter class holding ``self.options`` one property per option: ``loss.<name>``
    reads it, assigning replaces the options (validated again). ``smoothing`` is left out: the
    adapter's current, scheduled alpha is a plain attribute."""

    def option_property(name: str) -> property:
        def get(self):
            return getattr(self.options, name)

        def set_(self, value):
            self.options = self.options.replace(**{name: value})

        return property(get, set_, doc=f"The `LossOptions.{name}` of this loss.")

    for name in LossOptions.field_names():
        if name != "smoothing":
            setattr(cls, name, option_property(name))
    return cls
