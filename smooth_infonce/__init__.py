"""smooth-infonce: the smoothed InfoNCE loss for lightweight self-supervised models.

    >>> from smooth_infonce import SmoothInfoNCELoss
    >>> loss_fn = SmoothInfoNCELoss(temperature=0.2, smoothing=0.1, neighbors=5)

See `SmoothInfoNCELoss` (module), `smooth_infonce` (functional, every layout) and
`SmoothingSchedule` (alpha per epoch).
"""

from .functional import smooth_infonce, triton_available
from .layout import Layout, Pairs, make_pairs, resolve_layout
from .loss import SmoothInfoNCELoss
from .ops.reference import reference_row_losses
from .options import LossOptions
from .schedule import SmoothingSchedule
from .views import multi_view_loss, symmetric_moco_loss

__version__ = "0.1.0"

__all__ = [
    "SmoothInfoNCELoss",
    "LossOptions",
    "Layout",
    "resolve_layout",
    "SmoothingSchedule",
    "Pairs",
    "make_pairs",
    "reference_row_losses",
    "smooth_infonce",
    "multi_view_loss",
    "symmetric_moco_loss",
    "triton_available",
]
