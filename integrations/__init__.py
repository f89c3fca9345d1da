"""Toolkit integrations of smooth-infonce, installed as `smooth_infonce.integrations`: one
subpackage per thing served, in the order data flows (recipe -> loss / model / views -> trainer).

- `recipes`: what to train: the light-moco and SSLight presets, their backbones, pair weights and
  optimiser rules. Toolkit-free.
- `data`: the images of the main job and the benchmarks (bundled digits, Fashion-MNIST).
- `lightly`: drop-ins for lightly: the NTXent loss, SSLight's DINO / SwAV losses, the models and
  views of a recipe (extra ``[lightly]``).
- `lightning`: any recipe on Lightning, one device to many (extra ``[lightning]``).
- `demo`: the main job, ``smooth-infonce-demo`` (extra ``[demo]``).
- `solo`: solo-learn methods, backbones, generated configs and launcher (extra ``[solo]`` + a clone).
- `open_clip`: `SmoothClipLoss`, open_clip's ``ClipLoss`` with smoothing (extra ``[open_clip]``).
- `sentence_transformers`: smoothed (Cached)MultipleNegativesRankingLoss (extra
  ``[sentence-transformers]``).

A subpackage imports the core and the subpackages `DEPENDS_ON` lists for it, never one downstream
of it and never this package itself (tests/test_layout.py checks every import).
"""

# subpackage -> the subpackages it may import (the core `smooth_infonce` is open to all)
DEPENDS_ON = {
    "recipes": (),
    "data": ("recipes",),
    "lightly": ("recipes",),
    "lightning": ("recipes", "data", "lightly"),
    "demo": ("recipes", "data", "lightly", "lightning"),
    "solo": ("recipes",),
    "open_clip": (),
    "sentence_transformers": (),
}
