"""`integrations.lightly`: drop-ins for lightly (extra ``[lightly]``).

- `loss`: `SmoothNTXentLoss`, a subclass of lightly's ``NTXentLoss`` (SimCLR, MoCo with its memory
  bank and sample ids, SSLight's multi-query MoCo), and `build_loss` (the loss a recipe names).
- `multicrop`: `SSLightDINOLoss` and `SSLightSwaVLoss`, lightly's DINO and SwAV losses with
  SSLight's pair weights.
- `models`: the lightly models, heads and view transforms a recipe describes (`build_model`,
  `build_view_transform`).
- `steps`: their cached-gradient steps (`cached_training_loss`).

Imports: the core `smooth_infonce` and `integrations.recipes`; never the trainers downstream
(`lightning`, `demo`).
"""

from .loss import SmoothNTXentLoss, build_loss
from .multicrop import SSLightDINOLoss, SSLightSwaVLoss

__all__ = ["SSLightDINOLoss", "SSLightSwaVLoss", "SmoothNTXentLoss", "build_loss"]
