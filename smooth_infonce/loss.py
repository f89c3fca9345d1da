"""`SmoothInfoNCELoss`: the nn.Module over the functional op, with lightly's call forms."""

from __future__ import annotations

from typing import Any, Optional

from torch import Tensor, nn

from .options import LossOptions, ScheduledSmoothing, add_option_properties
from .validation import check_smoothing
from .views import Weights, multi_view_loss


@add_option_properties
class SmoothInfoNCELoss(ScheduledSmoothing, nn.Module):
    """Smoothed InfoNCE loss ("Establishing a stronger baseline for lightweight contrastive
    models", arXiv 2212.07158).

    The loss, its targets and its conventions are defined once, in docs/loss.md: cross-entropy of
    each row's softmax over its valid candidates against a soft target that keeps 1 - alpha on the
    positives and moves alpha onto all negatives (``neighbors=None``) or onto the ``neighbors`` most
    similar ones. ``smoothing=0`` is plain InfoNCE / NT-Xent.

    Call forms:

    - ``loss(out0, out1)``: two views (B x D each) of B images, in-batch negatives, self excluded,
      mean over the 2B rows; equals lightly's ``NTXentLoss(temperature)`` at smoothing 0.
    - ``loss(out0, out1, out2, ...)``: multi-crop; every view of image b is a positive of every
      other view of b. ``labels=`` (B,) makes all rows of one class positives (SupCon-style).
    - ``loss(query, key, queue=Q)``: MoCo. Row i's positive is key i, the queue rows (K x D, no
      gradient) its negatives; mean over the B rows.
    - ``loss(query, key, *more_queries, queue=Q, weights=(0.4, 0.1, ...))``: SSLight's
      multi-query MoCo: every query view shares the key's positive and the queue's negatives.
    - ``loss(query, key, queue=Q, ids=sample_ids, queue_ids=Q_ids)``: MoCo where a queue entry of
      the query's own image (an earlier key of it) is not one of its negatives.

    ``weights`` is one float per anchor view (rows of view v get weights[v]; the loss is
    sum_i w_i l_i / sum_i w_i) or a tensor with one weight per row.

    ``logit_scale=s`` (any call form): a learnable temperature, a one-element floating tensor
    s > 0 on the views' device that may require grad (open_clip's ``logit_scale.exp()``; to learn
    tau pass ``1 / tau``): the logits are s <a_i, c_j> and the ``temperature`` option is not used.
    dL/ds flows back through both backends (docs/loss.md, "A learnable temperature"); without it the
    float temperature is used exactly as before.

    Args:
        temperature, smoothing, neighbors, schedule, normalize, reduction, backend, deterministic,
            allow_tf32, few_negatives: the loss options (`LossOptions`, where each is described);
            or pass ``options=LossOptions(...)``. With a schedule, ``set_epoch(e)`` sets the
            current alpha (``smoothing``), which starts at the schedule's epoch-0 value.
        gather_distributed: compare against the in-batch candidates of every rank.
        validate: value checks that synchronise with the device (non-finite inputs, too few
            negatives); shape, dtype and device checks always run. Under ``torch.compile`` they
            are data-dependent: ``fullgraph=True`` needs ``validate=False``, and with
            ``validate=True`` a plain ``torch.compile`` breaks the graph at them (`smooth_infonce`).

    Example:
        >>> import torch
        >>> from smooth_infonce import SmoothInfoNCELoss
        >>> loss_fn = SmoothInfoNCELoss(temperature=0.2, smoothing=0.1, neighbors=5)
        >>> out0, out1 = torch.randn(32, 128), torch.randn(32, 128)
        >>> loss = loss_fn(out0, out1)
        >>> queue = torch.randn(4096, 128)
        >>> loss = loss_fn(out0, out1, queue=queue)   # MoCo: out0 queries, out1 keys
        >>> log_scale = torch.nn.Parameter(torch.tensor(2.659))   # open_clip: log(1 / 0.07)
        >>> loss = loss_fn(out0, out1, logit_scale=log_scale.exp())
        >>> loss.backward()
        >>> log_scale.grad is not None
        True
    """

    def __init__(
        self,
        temperature: float = 0.1,
        smoothing: float = 0.0,
        neighbors: Optional[int] = None,
        *,
        options: Optional[LossOptions] = None,
        gather_distributed: bool = False,
        validate: bool = True,
        **option_fields: Any,
    ) -> None:
        super().__init__()
        if options is None:
            options = LossOptions(temperature=temperature, smoothing=smoothing, neighbors=neighbors, **option_fields)
        elif option_fields or (temperature, smoothing, neighbors) != (0.1, 0.0, None):
            raise TypeError("pass options=LossOptions(...) or the option keywords, not both")
        self.options = options
        self.smoothing = options.initial_smoothing  # the current alpha: the one thing that moves
        self.gather_distributed = gather_distributed
        self.validate = validate

    def forward(
        self,
        out0: Tensor,
        out1: Tensor,
        *more_views: Tensor,
        queue: Optional[Tensor] = None,
        ids: Optional[Tensor] = None,
        queue_ids: Optional[Tensor] = None,
        weights: Weights = None,
        labels: Optional[Tensor] = None,
        logit_scale: Optional[Tensor] = None,
    ) -> Tensor:
        return multi_view_loss(
            (out0, out1, *more_views), self.options, smoothing=check_smoothing(self.smoothing),
            queue=queue, ids=ids, queue_ids=queue_ids, weights=weights, labels=labels,
            gather_distributed=self.gather_distributed, validate=self.validate, logit_scale=logit_scale,
        )

    def extra_repr(self) -> str:
        o = self.options
        return (f"temperature={o.temperature}, smoothing={self.smoothing}, neighbors={o.neighbors}, "
                f"backend={o.backend!r}")
