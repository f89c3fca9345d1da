"""SSLight's pair-weighted multi-crop loss as drop-in subclasses of lightly's DINO and SwAV losses.

`SSLightDINOLoss` (a `lightly.loss.DINOLoss`) and `SSLightSwaVLoss` (a `lightly.loss.SwaVLoss`)
take the same constructor arguments and the same call as lightly's classes, plus
``loss_weights = (lambda_gg, lambda_gl)``. Global views come first; only they give targets, a
view is never its own target, and no pair has a local target:

    L = lambda_gg * mean_{a != v both global} l(a, v) + lambda_gl * mean_{a global, v local} l(a, v)

with ``l(a, v)`` the batch mean of the cross-entropy from target a to prediction v. The weighting
is stated once, in `smooth_infonce.integrations.recipes.multicrop` (``pair_weights`` and
``multicrop_cross_entropy``; docs/loss.md states the recipe), and both losses call it. What stays
lightly's: the teacher-temperature schedule, the centre and its update (all-reduced over the
processes), the Sinkhorn-Knopp codes (``sinkhorn``, distributed when asked).

``loss_weights=None`` is the plain mean over every (global target, view) pair: the loss then equals
lightly's (value, gradient and, for DINO, the centre after the call), for 2 or more target views.

Example:
    >>> import torch
    >>> from smooth_infonce.integrations.lightly.multicrop import SSLightDINOLoss, SSLightSwaVLoss
    >>> dino = SSLightDINOLoss(output_dim=32, warmup_teacher_temp_epochs=5, loss_weights=(0.4, 0.6))
    >>> teacher_out = [torch.randn(4, 32) for _ in range(2)]            # the 2 global views
    >>> student_out = [torch.randn(4, 32, requires_grad=True) for _ in range(8)]  # + 6 locals
    >>> loss = dino(teacher_out, student_out, epoch=0)
    >>> loss.backward()
    >>> swav = SSLightSwaVLoss(loss_weights=(0.4, 0.6))
    >>> scores = [torch.nn.functional.normalize(torch.randn(4, 16), dim=1) for _ in range(8)]
    >>> loss = swav(scores[:2], scores[2:])
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    from lightly.loss import DINOLoss, SwaVLoss
    from lightly.loss.swav_loss import sinkhorn
except ImportError as err:  # exercised by tests/test_demo.py with lightly blocked
    raise ImportError(f"smooth_infonce.integrations.lightly.multicrop needs lightly: pip install "
                      f"'smooth-infonce[lightly]' ({err})") from err

from smooth_infonce.integrations.recipes.multicrop import check_loss_weights, multicrop_cross_entropy, pair_weights

LossWeights = Optional[Tuple[float, float]]


def _check_outputs(name: str, outputs: Sequence[Tensor], shape: Optional[torch.Size] = None) -> torch.Size:
    """Every tensor of ``outputs`` is 2-D, non-empty, and of one shape (``shape`` if given)."""
    if not isinstance(outputs, (list, tuple)):
        raise ValueError(f"{name} must be a list of (batch_size, dim) tensors, one per view, got {type(outputs)}")
    shape = outputs[0].shape if shape is None and outputs else shape
    for view, output in enumerate(outputs):
        if output.ndim != 2 or output.shape[0] == 0 or output.shape != shape:
            raise ValueError(f"{name}[{view}] has the shape {tuple(output.shape)}; every view must be a "
                             f"non-empty (batch_size, dim) tensor of the shape {tuple(shape)}")
    return shape


class SSLightDINOLoss(DINOLoss):
    """lightly's `DINOLoss` with SSLight's pair weights.

    For teacher outputs t_a of the G global views and student outputs s_v of all V views (the G
    globals first, then the locals):

        target_a = softmax((t_a - center) / tau_t),   log p_v = log_softmax(s_v / tau_s)
        L = sum_{a, v != a} w[a][v] * mean_b(-sum_k target_a[b, k] * log p_v[b, k])

    with ``w = multicrop.pair_weights(G, V - G, loss_weights)``: lambda_gg shared by the G (G - 1)
    global-global pairs, lambda_gl by the G (V - G) global-local pairs (SSLight's (0.4, 0.6) with
    2 globals and 6 locals: 0.2 and 0.05 per pair). tau_t is chosen as in `DINOLoss.forward`
    (``teacher_temp`` if given, else lightly's ``teacher_temp_schedule`` at ``epoch``, else
    ``teacher_temp`` of the constructor); after the loss the centre moves with lightly's
    `update_center` (an EMA of the teacher outputs' batch mean, all-reduced over the processes).

    Args:
        output_dim, warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, student_temp,
            center_momentum, center_mode: as `lightly.loss.DINOLoss`.
        loss_weights: (lambda_gg, lambda_gl), both >= 0, not both 0; None: the plain mean over
            pairs, which is `DINOLoss` (to rounding). Without local views the plain mean is used.

    Unlike `DINOLoss`, at least 2 teacher (global) views are required.

    Example:
        >>> import torch
        >>> from smooth_infonce.integrations.lightly.multicrop import SSLightDINOLoss
        >>> criterion = SSLightDINOLoss(output_dim=16, warmup_teacher_temp=0.04, teacher_temp=0.07,
        ...                             warmup_teacher_temp_epochs=50, loss_weights=(0.4, 0.6))
        >>> float(criterion.teacher_temperature(epoch=0))
        0.03999999910593033
        >>> teacher_out = [torch.randn(8, 16), torch.randn(8, 16)]
        >>> student_out = [torch.randn(8, 16, requires_grad=True) for _ in range(4)]
        >>> loss = criterion(teacher_out, student_out, epoch=0)
        >>> bool(criterion.center.abs().sum() > 0)   # the centre moved after the call
        True
    """

    def __init__(self, output_dim: int = 65536, warmup_teacher_temp: float = 0.04, teacher_temp: float = 0.04,
                 warmup_teacher_temp_epochs: int = 30, student_temp: float = 0.1, center_momentum: float = 0.9,
                 center_mode: str = "mean", loss_weights: Optional[Sequence[float]] = None) -> None:
        for name, value in (("output_dim", output_dim), ("warmup_teacher_temp_epochs", warmup_teacher_temp_epochs)):
            if int(value) != value or value < (1 if name == "output_dim" else 0):
                raise ValueError(f"{name} must be an int >= {1 if name == 'output_dim' else 0}, got {value!r}")
        for name, value in (("warmup_teacher_temp", warmup_teacher_temp), ("teacher_temp", teacher_temp),
                            ("student_temp", student_temp)):
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value!r}")
        if not 0 <= center_momentum <= 1:
            raise ValueError(f"center_momentum must be in [0, 1], got {center_momentum!r}")
        super().__init__(output_dim=output_dim, warmup_teacher_temp=warmup_teacher_temp, teacher_temp=teacher_temp,
                         warmup_teacher_temp_epochs=warmup_teacher_temp_epochs, student_temp=student_temp,
                         center_momentum=center_momentum, center_mode=center_mode)
        self.loss_weights = check_loss_weights(loss_weights)

    def teacher_temperature(self, teacher_temp: Optional[float] = None, epoch: Optional[int] = None) -> Tensor:
        """tau_t as `DINOLoss.forward` picks it: ``teacher_temp`` if given, else lightly's linear
        warm-up ``teacher_temp_schedule[epoch]`` during the warm-up epochs, else the final
        ``teacher_temp``. A float32 0-d tensor, as lightly's."""
        if teacher_temp is not None:
            return torch.tensor(teacher_temp)
        if epoch is not None and epoch < self.warmup_teacher_temp_epochs:
            return self.teacher_temp_schedule[epoch]
        return torch.tensor(self.teacher_temp)

    def forward(self, teacher_out: List[Tensor], student_out: List[Tensor], teacher_temp: Optional[float] = None,
                epoch: Optional[int] = None) -> Tensor:
        """The pair-weighted cross-entropy; updates the centre afterwards.

        Args:
            teacher_out: G >= 2 tensors (batch_size, output_dim), the teacher on the global views.
            student_out: V >= G tensors of the same shape, the student on every view, the G
                globals first (in the order of ``teacher_out``), then the locals.
            teacher_temp, epoch: pick tau_t (see `teacher_temperature`).
        """
        if not isinstance(teacher_out, (list, tuple)) or len(teacher_out) < 2:
            # "at least two views" is lightly's DINOLoss wording, kept for code that matches it
            raise ValueError(f"SSLightDINOLoss requires at least two views: teacher_out must hold the teacher's "
                             f"outputs of >= 2 global views, got "
                             f"{len(teacher_out) if isinstance(teacher_out, (list, tuple)) else type(teacher_out)}")
        shape = _check_outputs("teacher_out", teacher_out)
        if shape[1] != self.center.shape[-1]:
            raise ValueError(f"teacher_out has {shape[1]} outputs per row, the loss was built for "
                             f"output_dim={self.center.shape[-1]}")
        if not isinstance(student_out, (list, tuple)) or len(student_out) < len(teacher_out):
            raise ValueError(f"student_out must hold the student's outputs of every view, the {len(teacher_out)} "
                             f"global views of teacher_out first, got {len(student_out)} view(s)")
        _check_outputs("student_out", student_out, shape)

        teacher_stacked = torch.stack(teacher_out)
        targets = F.softmax((teacher_stacked - self.center) / self.teacher_temperature(teacher_temp, epoch), dim=-1)
        log_probs = F.log_softmax(torch.stack(student_out) / self.student_temp, dim=-1)
        weights = pair_weights(num_global=len(teacher_out), num_local=len(student_out) - len(teacher_out),
                               loss_weights=self.loss_weights)
        loss = multicrop_cross_entropy(targets, log_probs, weights)  # stacked: no second copy
        self.update_center(teacher_stacked)
        return loss


class SSLightSwaVLoss(SwaVLoss):
    """lightly's `SwaVLoss` with SSLight's pair weights.

    For prototype scores z_v of all V views (the G high-resolution, global views first, then the
    low-resolution, local ones), the codes of global view a are lightly's ``sinkhorn`` (with this
    loss's iterations, epsilon and ``sinkhorn_gather_distributed``) of z_a, with the queue's scores
    of view a appended when ``queue_outputs`` is given (then only the batch's rows of the codes
    are kept), and

        L = sum_{a, v != a} w[a][v] * mean_b(-sum_k q_a[b, k] * log_softmax(z_v / temperature)[b, k])

    with ``w = multicrop.pair_weights(G, V - G, loss_weights)`` (see `SSLightDINOLoss`).

    Args:
        temperature, sinkhorn_iterations, sinkhorn_epsilon, sinkhorn_gather_distributed: as
            `lightly.loss.SwaVLoss`.
        loss_weights: (lambda_gg, lambda_gl); None: the plain mean over pairs, which is
            `SwaVLoss` (to rounding; this returns a 0-d tensor where lightly returns shape (1,)).

    Example:
        >>> import torch
        >>> from torch.nn.functional import normalize
        >>> from smooth_infonce.integrations.lightly.multicrop import SSLightSwaVLoss
        >>> criterion = SSLightSwaVLoss(temperature=0.1, loss_weights=(0.4, 0.6))
        >>> high = [normalize(torch.randn(8, 30), dim=1).requires_grad_() for _ in range(2)]
        >>> low = [normalize(torch.randn(8, 30), dim=1).requires_grad_() for _ in range(2)]
        >>> queue = [normalize(torch.randn(16, 30), dim=1) for _ in range(2)]
        >>> loss = criterion(high, low, queue_outputs=queue)
        >>> loss.shape
        torch.Size([])
    """

    def __init__(self, temperature: float = 0.1, sinkhorn_iterations: int = 3, sinkhorn_epsilon: float = 0.05,
                 sinkhorn_gather_distributed: bool = False, loss_weights: Optional[Sequence[float]] = None) -> None:
        if not temperature > 0 or not sinkhorn_epsilon > 0:
            raise ValueError(f"temperature and sinkhorn_epsilon must be > 0, got {temperature!r}, {sinkhorn_epsilon!r}")
        # 0 is lightly's too: the codes are then the softmax of the scores over the whole batch
        if int(sinkhorn_iterations) != sinkhorn_iterations or sinkhorn_iterations < 0:
            raise ValueError(f"sinkhorn_iterations must be an int >= 0, got {sinkhorn_iterations!r}")
        super().__init__(temperature=temperature, sinkhorn_iterations=sinkhorn_iterations,
                         sinkhorn_epsilon=sinkhorn_epsilon, sinkhorn_gather_distributed=sinkhorn_gather_distributed)
        self.loss_weights = check_loss_weights(loss_weights)

    @torch.no_grad()
    def codes(self, scores: Tensor, queue_scores: Optional[Tensor] = None) -> Tensor:
        """The Sinkhorn codes of one global view's ``scores`` (B, P); with ``queue_scores``
        (Q, P) they join the Sinkhorn input and the batch's B rows of the codes are returned."""
        inputs = scores.detach() if queue_scores is None else torch.cat((scores.detach(), queue_scores.detach()))
        codes = sinkhorn(inputs, iterations=self.sinkhorn_iterations, epsilon=self.sinkhorn_epsilon,
                         gather_distributed=self.sinkhorn_gather_distributed)
        return codes[: scores.shape[0]]

    def forward(self, high_resolution_outputs: List[Tensor], low_resolution_outputs: List[Tensor],
                queue_outputs: Union[List[Tensor], None] = None) -> Tensor:
        """The pair-weighted swapped prediction.

        Args:
            high_resolution_outputs: G >= 2 tensors (batch_size, num_prototypes): the global views'
                prototype scores; each gives codes.
            low_resolution_outputs: the local views' scores (same shape), possibly none.
            queue_outputs: None, or G tensors (queue_length, num_prototypes): the scores of the
                queued features of each global view.
        """
        high, low = high_resolution_outputs, low_resolution_outputs
        if not isinstance(high, (list, tuple)) or len(high) < 2:
            raise ValueError(f"high_resolution_outputs must hold the scores of >= 2 global views, got "
                             f"{len(high) if isinstance(high, (list, tuple)) else type(high)}")
        shape = _check_outputs("high_resolution_outputs", high)
        if not isinstance(low, (list, tuple)):
            raise ValueError(f"low_resolution_outputs must be a list (possibly empty), got {type(low)}")
        _check_outputs("low_resolution_outputs", low, shape)
        if queue_outputs is not None:
            if not isinstance(queue_outputs, (list, tuple)) or len(queue_outputs) != len(high):
                got = len(queue_outputs) if isinstance(queue_outputs, (list, tuple)) else type(queue_outputs)
                raise ValueError(f"queue_outputs must hold one tensor per high-resolution view ({len(high)}), "
                                 f"got {got}")
            for view, queued in enumerate(queue_outputs):
                if queued.ndim != 2 or queued.shape[1] != shape[1]:
                    raise ValueError(f"queue_outputs[{view}] has the shape {tuple(queued.shape)}, expected "
                                     f"(queue_length, {shape[1]})")

        codes = [self.codes(scores, None if queue_outputs is None else queue_outputs[a])
                 for a, scores in enumerate(high)]
        log_probs = [F.log_softmax(scores / self.temperature, dim=1) for scores in list(high) + list(low)]
        weights = pair_weights(num_global=len(high), num_local=len(low), loss_weights=self.loss_weights)
        return multicrop_cross_entropy(codes, log_probs, weights)
