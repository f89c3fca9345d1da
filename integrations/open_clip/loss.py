"""open_clip drop-in: `SmoothClipLoss`, a subclass of ``open_clip.loss.ClipLoss`` computing smoothed
InfoNCE in both directions through the core (`smooth_infonce.functional.compute_loss`).

Swap one line and an open_clip training loop runs unchanged::

    # loss = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world_size)
    loss = SmoothClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world_size,
                          smoothing=0.1, neighbors=5)

Imports in this module are absolute: ``import open_clip`` is the real open_clip package, not this
subpackage.
"""

from __future__ import annotations

from numbers import Real
from typing import Optional, Union

import torch
from torch import Tensor

try:
    from open_clip.loss import ClipLoss, gather_features
except ImportError as err:
    raise ImportError(f"smooth_infonce.integrations.open_clip needs open_clip: pip install "
                      f"'smooth-infonce[open_clip]' ({err})") from err

from smooth_infonce import distributed
from smooth_infonce.functional import compute_loss
from smooth_infonce.options import LossOptions, ScheduledSmoothing
from smooth_infonce.schedule import SmoothingSchedule
from smooth_infonce.validation import (
    check_embeddings,
    check_finite,
    check_logit_scale,
    check_same_device,
    check_smoothing,
)


def _clip_loss_uses_bias() -> bool:
    """Whether this open_clip's ClipLoss adds ``logit_bias`` to its logits (3.x: a zero gradient
    reaches the bias) or accepts and ignores it (2.x: no gradient), asked of ClipLoss itself."""
    bias = torch.zeros((), requires_grad=True)
    return ClipLoss()(torch.eye(2), torch.eye(2), torch.ones(()), logit_bias=bias).requires_grad


CLIP_LOSS_USES_BIAS = _clip_loss_uses_bias()


class SmoothClipLoss(ScheduledSmoothing, ClipLoss):
    """Smoothed InfoNCE as a drop-in subclass of open_clip's `ClipLoss`.

    Same constructor arguments and call as `ClipLoss` (``isinstance(loss, ClipLoss)`` holds),
    plus the smoothing: ``loss(image_features, text_features, logit_scale, logit_bias=None,
    output_dict=False)``. With s = ``logit_scale`` (already exponentiated, a tensor that may
    require grad), image i and text i a positive pair, for each direction (image-to-text over the
    texts, text-to-image over the images):

        z_ij = s <a_i, c_j>,   p_ij = softmax_j(z_ij)
        y_ij = 1 - alpha on the positive j = i,  alpha / k on the k candidates most similar to a_i
               (``neighbors=k``; ``None``: alpha / (M - 1) on every other candidate), 0 elsewhere
        l_i  = -sum_j y_ij log p_ij
        loss = (mean_i l_i(image-to-text) + mean_i l_i(text-to-image)) / 2

    (docs/loss.md). Each direction picks its own neighbours: the texts nearest an image for the
    image-to-text rows, the images nearest a text for the text-to-image rows, on the values
    without gradient. At ``smoothing=0`` this is `ClipLoss` exactly: the same value and the same
    gradients of both towers and of ``logit_scale`` (to float rounding; tested in float64).

    Same as `ClipLoss`:

    - the features are used as given, not normalised again (open_clip's models return unit
      vectors; normalising again would change the gradient's radial part);
    - ``world_size > 1``: ``local_loss=False`` computes the global logits (every rank's images
      against every rank's texts) on every rank, ``local_loss=True`` only this rank's rows against
      the gathered features; ``gather_with_grad=True`` lets the gradient flow back to every rank's
      features, ``False`` gathers them without gradient (with ``local_loss=False`` this rank's own
      slice keeps its gradient). ``local_loss=True, gather_with_grad=True`` (open_clip's
      recommended setting) runs on the core's own gather (`smooth_infonce.distributed`, the
      same all-gather and gradient sum as ``torch.distributed.nn.all_gather``); every other
      combination, and Horovod, gathers with open_clip's own ``gather_features``;
    - ``logit_bias`` (a scalar added to every logit) shifts each row of logits by a constant,
      which a softmax cross-entropy ignores, smoothed or not: the value does not change and its
      gradient is zero (it still gets one where `ClipLoss` gives it one, open_clip >= 3.0, so
      weight decay reaches it as there; open_clip 2.x's `ClipLoss` leaves it out, and so does this);
    - ``output_dict=True`` returns ``{"contrastive_loss": loss}``;
    - ``cache_labels`` is accepted and has nothing to cache here (the positives are by position).

    Args:
        local_loss, gather_with_grad, cache_labels, rank, world_size, use_horovod: `ClipLoss`'s.
        smoothing: alpha in [0, 1), the target mass moved from each positive onto its neighbours.
        neighbors: k >= 1 (the k most similar negatives of each row), or None (every negative).
        schedule: a `SmoothingSchedule` (alpha per epoch; replaces ``smoothing``): call
            ``set_epoch(epoch)`` each epoch. Before that, alpha is the schedule's epoch-0 value.
        backend, deterministic, allow_tf32: where the loss runs (`smooth_infonce.LossOptions`):
            "auto" takes the fused Triton kernel for CUDA tensors, the reference op elsewhere.
        few_negatives: "use_all" (default here): a row with fewer than k negatives smooths onto
            all of them, and a batch of one pair gives 0, as `ClipLoss`; "raise" makes it an error.
        validate: value checks that read back from the device (finite features, logit_scale > 0).

    Example:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> from open_clip.loss import ClipLoss
        >>> from smooth_infonce.integrations.open_clip import SmoothClipLoss
        >>> images = F.normalize(torch.randn(8, 32, dtype=torch.float64), dim=1).requires_grad_()
        >>> texts = F.normalize(torch.randn(8, 32, dtype=torch.float64), dim=1).requires_grad_()
        >>> logit_scale = torch.tensor(1 / 0.07, dtype=torch.float64)
        >>> criterion = SmoothClipLoss(smoothing=0.1, neighbors=3)
        >>> isinstance(criterion, ClipLoss)
        True
        >>> loss = criterion(images, texts, logit_scale)
        >>> loss.backward()
        >>> plain = SmoothClipLoss()(images, texts, logit_scale)      # smoothing=0: ClipLoss's value
        >>> bool(torch.isclose(plain, ClipLoss()(images, texts, logit_scale)))
        True
    """

    def __init__(
        self,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        use_horovod: bool = False,
        *,
        smoothing: float = 0.0,
        neighbors: Optional[int] = None,
        schedule: Optional[SmoothingSchedule] = None,
        backend: str = "auto",
        deterministic: bool = False,
        allow_tf32: Optional[bool] = None,
        few_negatives: str = "use_all",
        validate: bool = True,
    ) -> None:
        for name, value in (("local_loss", local_loss), ("gather_with_grad", gather_with_grad),
                            ("cache_labels", cache_labels), ("use_horovod", use_horovod), ("validate", validate)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {value!r}")
        for name, value, minimum in (("rank", rank, 0), ("world_size", world_size, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
        if rank >= world_size:
            raise ValueError(f"rank must be below world_size, got rank={rank}, world_size={world_size}")
        # the temperature option is unused: the logits are scaled by the logit_scale of each call
        options = LossOptions(smoothing=smoothing, neighbors=neighbors, schedule=schedule, normalize=False,
                              backend=backend, deterministic=deterministic, allow_tf32=allow_tf32,
                              few_negatives=few_negatives)
        super().__init__(local_loss=local_loss, gather_with_grad=gather_with_grad, cache_labels=cache_labels,
                         rank=rank, world_size=world_size, use_horovod=use_horovod)
        self.options = options
        self.smoothing = self.options.initial_smoothing  # the current alpha: the one thing that moves
        self.validate = validate

    def extra_repr(self) -> str:
        return (f"smoothing={self.smoothing}, neighbors={self.neighbors}, local_loss={self.local_loss}, "
                f"gather_with_grad={self.gather_with_grad}, rank={self.rank}, world_size={self.world_size}")

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Union[Tensor, float],
        logit_bias: Optional[Union[Tensor, float]] = None,
        output_dict: bool = False,
    ):
        check_embeddings("image_features", image_features)
        batch, width = image_features.shape
        check_embeddings("text_features", text_features, width=width, rows=batch)
        check_same_device(image_features=image_features, text_features=text_features)
        scale = self._logit_scale(logit_scale, image_features)
        if self.validate:
            check_finite(image_features=image_features, text_features=text_features)
        loss = self._loss(image_features, text_features, scale, check_smoothing(self.smoothing))
        if CLIP_LOSS_USES_BIAS and isinstance(logit_bias, Tensor) and logit_bias.requires_grad:
            # a row-constant shift: no change to the value, a zero gradient (ClipLoss's, to rounding)
            loss = loss + (logit_bias * 0).sum().to(loss.dtype)
        return {"contrastive_loss": loss} if output_dict else loss

    def _logit_scale(self, logit_scale: Union[Tensor, float], features: Tensor) -> Tensor:
        if not isinstance(logit_scale, Tensor):
            if isinstance(logit_scale, bool) or not isinstance(logit_scale, Real):
                raise TypeError(f"logit_scale must be a tensor (open_clip's logit_scale.exp()) or a real number, "
                                f"got {type(logit_scale).__name__}")
            logit_scale = torch.tensor(float(logit_scale), dtype=features.dtype, device=features.device)
        return check_logit_scale(logit_scale, features.device, validate=self.validate)

    def _two_tower(self, anchors: Tensor, candidates: Tensor, scale: Tensor, alpha: float, **layout) -> Tensor:
        return compute_loss(anchors, candidates, options=self.options, smoothing=alpha, logit_scale=scale,
                            validate=self.validate, **layout)

    def _loss(self, images: Tensor, texts: Tensor, scale: Tensor, alpha: float) -> Tensor:
        if self.world_size == 1:
            return self._two_tower(images, texts, scale, alpha, symmetric="mean")
        if self.local_loss and self.gather_with_grad and not self.use_horovod:
            # this rank's rows against every rank's features, gradients back to their owners: the
            # core's gather (the candidates of each direction, positives at column rank * B + i)
            self._check_process_group()
            return self._two_tower(images, texts, scale, alpha, symmetric="mean", gather_distributed=True)
        all_images, all_texts = gather_features(
            images, texts, local_loss=self.local_loss, gather_with_grad=self.gather_with_grad, rank=self.rank,
            world_size=self.world_size, use_horovod=self.use_horovod)
        if not self.local_loss:  # the global logits on every rank, as ClipLoss
            return self._two_tower(all_images, all_texts, scale, alpha, symmetric="mean")
        batch = images.shape[0]
        ids = torch.arange(self.rank * batch, (self.rank + 1) * batch, device=images.device)
        candidate_ids = torch.arange(all_texts.shape[0], device=images.device)
        image_to_text = self._two_tower(images, all_texts, scale, alpha, ids=ids, candidate_ids=candidate_ids)
        text_to_image = self._two_tower(texts, all_images, scale, alpha, ids=ids, candidate_ids=candidate_ids)
        return (image_to_text + text_to_image) / 2

    def _check_process_group(self) -> None:
        if not distributed.is_distributed():
            raise RuntimeError(f"world_size={self.world_size} needs an initialised torch.distributed process group "
                               "(or use_horovod=True)")
        found = (distributed.rank(), distributed.world_size())
        if found != (self.rank, self.world_size):
            raise ValueError(f"rank={self.rank}, world_size={self.world_size} disagree with the process group "
                             f"(rank {found[0]} of {found[1]})")
