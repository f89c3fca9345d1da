"""`integrations.open_clip`: the drop-in for open_clip (extra ``[open_clip]``).

- `loss`: `SmoothClipLoss`, a subclass of ``open_clip.loss.ClipLoss`` with the same constructor
  and call plus the smoothing (both directions, neighbours chosen per direction); at
  ``smoothing=0`` it is `ClipLoss`, single-process and distributed (docs/open_clip.md).

Imports: only the core `smooth_infonce` and open_clip; importing this package without open_clip
raises an ImportError that names the extra to install.
"""

from .loss import SmoothClipLoss

__all__ = ["SmoothClipLoss"]
