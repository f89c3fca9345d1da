"""The per-epoch smoothing (alpha) schedule of the authors' code (docs/loss.md)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from .validation import check_choice, check_smoothing

SCHEDULES = ("constant", "warmup", "cosine")


@dataclass(frozen=True)
class SmoothingSchedule:
    """alpha as a function of the epoch.

    - ``constant``: alpha every epoch.
    - ``warmup``: 0 for the first ``warmup_epochs`` epochs, then alpha. In MoCo a random queue
      makes the early neighbours meaningless, which is why the authors warm up.
    - ``cosine``: alpha_e = alpha * (1 - cos(pi * e / epochs)) / 2, from 0 at epoch 0 to alpha at
      ``epochs`` (held there afterwards), after ``warmup_epochs`` at 0 if given.

    Example:
        >>> round(SmoothingSchedule(0.1, "cosine", epochs=100)(50), 6)
        0.05
    """

    smoothing: float
    kind: str = "constant"
    warmup_epochs: int = 0
    epochs: Optional[int] = None

    def __post_init__(self) -> None:
        check_smoothing(self.smoothing)
        check_choice("kind", self.kind, SCHEDULES)
        if not isinstance(self.warmup_epochs, int) or self.warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be an int >= 0, got {self.warmup_epochs!r}")
        if self.kind == "cosine" and (not isinstance(self.epochs, int) or self.epochs < 1):
            raise ValueError(f"the cosine schedule needs epochs (int >= 1), got {self.epochs!r}")

    def __call__(self, epoch: int) -> float:
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if epoch < self.warmup_epochs:
            return 0.0
        if self.kind == "cosine":
            progress = min(epoch - self.warmup_epochs, self.epochs) / self.epochs
            return self.smoothing * (1.0 - math.cos(math.pi * progress)) / 2.0
        return self.smoothing
