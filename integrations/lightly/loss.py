"""lightly drop-in: `SmoothNTXentLoss`, a subclass of `lightly.loss.NTXentLoss` computing smoothed
InfoNCE through the core (`smooth_infonce.views`).

Swap one line and existing lightly code runs unchanged::

    # criterion = NTXentLoss(temperature=0.2, memory_bank_size=(4096, 128))
    criterion = SmoothNTXentLoss(temperature=0.2, memory_bank_size=(4096, 128), smoothing=0.1, neighbors=5)

``build_loss(recipe)`` builds it from a preset (`smooth_infonce.integrations.recipes`); lightly
models, heads and transforms of the recipes: `smooth_infonce.integrations.lightly.models`.
Imports in this module are absolute: ``import lightly`` is the real lightly package, not this file.
"""

from __future__ import annotations

import inspect
import warnings
import weakref
from typing import Any, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    from lightly.loss import NTXentLoss
    from lightly.models.utils import concat_all_gather
    from lightly.utils import dist as lightly_dist
except ImportError as err:  # exercised by tests/test_demo.py with lightly blocked
    raise ImportError(f"smooth_infonce.integrations.lightly needs lightly: pip install 'smooth-infonce[lightly]' "
                      f"({err})") from err

from smooth_infonce.integrations.recipes import Recipe
from smooth_infonce.options import LossOptions, ScheduledSmoothing, add_option_properties
from smooth_infonce.schedule import SmoothingSchedule
from smooth_infonce.validation import check_smoothing
from smooth_infonce.views import Weights, check_views, multi_view_loss, symmetric_moco_loss

from .multicrop import SSLightDINOLoss, SSLightSwaVLoss

NO_ID = -1  # a bank entry whose sample id is unknown: never masked
UNIT_TOLERANCE = 16  # bank rows within this many epsilons of unit norm need no normalisation


class _BankState(NamedTuple):
    """What is known about one version of the bank tensor (module docstring of the class: "The
    bank's checks"): ``finite`` every value is finite; ``unit`` every row is a unit vector to the
    bank dtype's rounding (``None``: not yet looked at)."""
    bank: "weakref.ref[Tensor]"
    version: int
    finite: bool
    unit: Optional[bool]



@add_option_properties
class SmoothNTXentLoss(ScheduledSmoothing, NTXentLoss):
    """Smoothed InfoNCE as a drop-in subclass of lightly's `NTXentLoss`.

    Same constructor arguments and call as `NTXentLoss` (``isinstance(loss, NTXentLoss)`` holds),
    plus the smoothing. At ``smoothing=0`` it returns what `NTXentLoss` returns (to float
    rounding), in both modes and for every batch size >= 1 (a batch of one image gives 0 with
    zero gradient in-batch, as lightly):

    - in-batch (``memory_bank_size=0``, SimCLR): every other embedding of the batch is a
      negative, mean over the 2B rows;
    - memory bank (``memory_bank_size=(K, dim)``, MoCo): ``out0`` are the queries, ``out1`` the
      keys; logits ``[positive | K bank entries]``, positive at column 0, the bank read before it
      is updated with the (normalised) keys. As in lightly, the bank is only updated when
      ``out0.requires_grad`` (not under ``torch.no_grad()``, not for evaluation), keys that do not
      fit before the bank's end are dropped and the pointer wraps to 0.

    With smoothing alpha, each row's target keeps 1 - alpha on its positive and spreads alpha over
    its ``neighbors`` most similar negatives (``neighbors=None``: over all negatives); the loss is
    defined in the docs/loss.md.

    Multi-view: ``loss(out0, out1, out2, ..., weights=...)``. In-batch, every view of an image is
    a positive of every other view (multi-crop). With a memory bank, ``out1`` is the key (global
    view 1, enqueued alone) and ``out0, out2, ...`` are queries that share it as positive and the
    bank as negatives (SSLight's MoCo). ``weights`` gives one float per anchor view (in-batch: per
    view in call order; bank: per query view, ``out0`` first), or one weight per row; the loss is
    the weighted mean of the row losses.

    Beyond lightly:

    - ``loss(query, key, ids=sample_ids)`` (memory bank): the bank stores each key's sample id
      (dataset index) beside it, and a bank entry holding an earlier key of the query's own image
      is left out of that query's negatives (it is a certain false negative). Entries enqueued
      without ids have id -1 (unknown: never masked). Under ``gather_distributed`` the ids are
      gathered with the keys (lightly's ``concat_all_gather``). A bank larger than the data set
      always holds the query's own earlier key: pass ids there.
    - ``loss.symmetric(query0, key0, query1, key1, combine="mean")``: light-moco's symmetric loss,
      both directions against the bank as it was before the step, then key0 and key1 enqueued.
    - ``persistent_bank=True`` stores the bank, its pointer, its ids and the count of enqueued keys
      in the ``state_dict``, so a resumed run continues with its queue instead of a random one.
      A state dict without them (saved from lightly's `NTXentLoss`, or from this loss without a
      persistent bank) still loads with ``strict=True``: the bank is then counted as not yet
      filled (alpha held at 0 until it is, with ``wait_for_full_bank``), with a warning. The
      reverse, this loss's state into a plain `NTXentLoss`, needs
      ``load_state_dict(state, strict=False)`` when the bank is persistent (lightly keeps no bank
      state and ignores those keys); without ``persistent_bank`` the state dicts are identical
      (empty), so both directions load strictly.
    - ``wait_for_full_bank=True`` holds alpha at 0 until K keys have been enqueued (the random
      initial bank has meaningless neighbours). The drop-in counts the keys it wrote.
    - ``schedule``: a `SmoothingSchedule`; call ``set_epoch(epoch)`` each epoch. Before that,
      alpha is the schedule's epoch-0 value.
    - ``neighbors`` larger than the memory bank is rejected at construction; an embedding width
      other than the bank's raises an error naming ``memory_bank_size``.

    The bank's checks: what enters the bank is checked once, not the whole bank on every call.
    With ``validate`` every key is checked for finite values by the call that enqueues it, so a
    bank the drop-in filled is known finite and is not checked again. With ``normalize`` the keys
    are stored as unit rows, so the loss does not normalise the K bank rows again (the result is
    the one normalising them gives, to float rounding). A bank the drop-in did not write itself,
    the initial one, one loaded by ``load_state_dict``, assigned, changed in place, moved or cast
    (``.to``, ``.double()``), is checked once, at the next call, as the loss checks a given queue:
    non-finite values raise (with ``validate``), and its rows are normalised by every call unless
    they are unit vectors already (looked at once, with ``validate``). lightly's random initial
    bank is looked at when the loss is built (on the CPU). The bank itself is never modified by
    these checks.

    Refused on purpose where lightly accepts: ``temperature <= 0`` (lightly only rejects
    ``|temperature| < 1e-8``; a negative temperature inverts the loss).

    Args:
        temperature: tau > 0.
        memory_bank_size: 0 (in-batch) or (K, dim), as in lightly.
        gather_distributed: in-batch: negatives from all ranks; bank: keys (and ids) of all ranks
            enqueued.
        smoothing, neighbors, schedule, normalize, reduction, backend, deterministic, allow_tf32,
            few_negatives: the loss options, each described in `smooth_infonce.LossOptions` (which
            validates them); ``few_negatives`` defaults to "use_all" here. Or pass
            ``options=LossOptions(...)`` instead of these keywords. Each is readable (and
            assignable, validated again) as an attribute; ``smoothing`` is the current alpha.
        persistent_bank: keep the bank state in the state_dict.
        wait_for_full_bank: alpha = 0 until the bank has been filled once.
        validate: value checks that synchronise with the device.

    Example:
        >>> import torch
        >>> from lightly.loss import NTXentLoss
        >>> from smooth_infonce.integrations.lightly import SmoothNTXentLoss
        >>> criterion = SmoothNTXentLoss(temperature=0.2, smoothing=0.1, neighbors=5)
        >>> isinstance(criterion, NTXentLoss)
        True
        >>> out0, out1 = torch.randn(16, 32, requires_grad=True), torch.randn(16, 32)
        >>> loss = criterion(out0, out1)                     # SimCLR
        >>> moco = SmoothNTXentLoss(0.2, memory_bank_size=(256, 32), smoothing=0.1, neighbors=5,
        ...                         persistent_bank=True)
        >>> loss = moco(out0, out1, ids=torch.arange(16))    # MoCo: out1 = keys, then enqueued
        >>> locals_ = [torch.randn(16, 32, requires_grad=True) for _ in range(2)]
        >>> loss = moco(out0, out1, *locals_, weights=(0.4, 0.3, 0.3))   # SSLight multi-query
        >>> loss = moco.symmetric(out0, out1, locals_[0], locals_[1], combine="sum")
        >>> sorted(moco.state_dict())
        ['bank_enqueued', 'bank_ids', 'memory_bank.bank', 'memory_bank.bank_ptr']
    """

    def __init__(
        self,
        temperature: float = 0.5,
        memory_bank_size: Union[int, Sequence[int]] = 0,
        gather_distributed: bool = False,
        smoothing: float = 0.0,
        neighbors: Optional[int] = None,
        *,
        schedule: Optional[SmoothingSchedule] = None,
        normalize: bool = True,
        reduction: str = "mean",
        backend: str = "auto",
        deterministic: bool = False,
        allow_tf32: Optional[bool] = None,
        few_negatives: str = "use_all",
        options: Optional[LossOptions] = None,
        persistent_bank: bool = False,
        wait_for_full_bank: bool = True,
        validate: bool = True,
    ) -> None:
        given = dict(temperature=temperature, smoothing=smoothing, neighbors=neighbors, schedule=schedule,
                     normalize=normalize, reduction=reduction, backend=backend, deterministic=deterministic,
                     allow_tf32=allow_tf32, few_negatives=few_negatives)
        if options is None:
            options = LossOptions(**given)  # validates every option (before lightly sees tau)
        else:
            if not isinstance(options, LossOptions):
                raise TypeError(f"options must be a LossOptions, got {type(options).__name__}")
            changed = sorted(name for name, value in given.items() if value != _option_defaults()[name])
            if changed:
                raise TypeError(f"pass options=LossOptions(...) or the option keywords, not both (got {changed})")
        # lightly's __init__ assigns self.temperature, a property over the options: set them first.
        self.__dict__["options"] = options
        super().__init__(temperature=options.temperature, memory_bank_size=memory_bank_size,
                         gather_distributed=gather_distributed)
        self.options = options
        self._check_neighbors_fit_bank(options)
        self.smoothing = options.initial_smoothing  # the current alpha: the one thing that moves
        self.wait_for_full_bank = wait_for_full_bank
        self.validate = validate
        self.persistent_bank = persistent_bank and self.has_memory_bank
        size = self.memory_bank.size[0] if self.has_memory_bank else 0
        if self.persistent_bank:
            # Re-registering an existing buffer only changes whether it is saved.
            self.memory_bank.register_buffer("bank", self.memory_bank.bank, persistent=True)
            self.memory_bank.register_buffer("bank_ptr", self.memory_bank.bank_ptr, persistent=True)
        # Saved exactly when the bank is: a bank restored from a checkpoint keeps its ids and count,
        # a fresh random bank starts unfilled with unknown ids.
        self.register_buffer("bank_ids", torch.full((size,), NO_ID, dtype=torch.long),
                             persistent=self.persistent_bank)
        self.register_buffer("bank_enqueued", torch.zeros((), dtype=torch.long), persistent=self.persistent_bank)
        self._bank_state: Optional[_BankState] = None
        if self.has_memory_bank and self.memory_bank.bank.device.type == "cpu":
            # lightly's random initial bank, looked at once (on the CPU: no device to wait for)
            state = self._assess_bank(check=True)
            self._bank_state = state._replace(finite=bool(torch.isfinite(self.memory_bank.bank).all()))

    # --- options ------------------------------------------------------------------------------

    def _check_neighbors_fit_bank(self, options: LossOptions) -> None:
        if self.has_memory_bank and options.neighbors is not None and options.neighbors > self.memory_bank.size[0]:
            raise ValueError(f"neighbors={options.neighbors} is larger than the memory bank: memory_bank_size="
                             f"{tuple(self.memory_bank.size)} holds {self.memory_bank.size[0]} negatives")

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "options":
            if not isinstance(value, LossOptions):
                raise TypeError(f"options must be a LossOptions, got {type(value).__name__}")
            if "memory_bank" in self._modules:
                self._check_neighbors_fit_bank(value)
        super().__setattr__(name, value)

    @property
    def has_memory_bank(self) -> bool:
        return self.memory_bank.size[0] > 0

    @property
    def bank_filled(self) -> bool:
        """Whether every bank entry has been written once (K keys enqueued)."""
        return self.has_memory_bank and int(self.bank_enqueued) >= self.memory_bank.size[0]

    @property
    def effective_smoothing(self) -> float:
        """The alpha the next call uses: 0 while a bank that was never filled is waited for."""
        if self.has_memory_bank and self.wait_for_full_bank and not self.bank_filled:
            return 0.0
        return check_smoothing(self.smoothing)

    # --- the loss -------------------------------------------------------------------------------

    def forward(self, out0: Tensor, out1: Tensor, *more_views: Tensor, weights: Weights = None,
                ids: Optional[Tensor] = None) -> Tensor:
        """The loss of one step (see the class docstring); ``ids`` (B,): sample ids of the images
        (memory bank only)."""
        views = (out0, out1, *more_views)
        check_views(views)  # before the bank sees the keys
        if not self.has_memory_bank:
            if ids is not None:
                raise ValueError("ids apply to the memory-bank mode (memory_bank_size=(K, dim)); in-batch views "
                                 "of one image are matched by position")
            return multi_view_loss(views, self.options, smoothing=self.effective_smoothing, weights=weights,
                                   gather_distributed=self.gather_distributed, validate=self.validate)
        self._check_bank_width(out0)
        keys = self._keys(out1)
        state = self._assess_bank(check=self.validate)
        bank, bank_ids = self._read_bank(out0.device)
        loss = multi_view_loss((out0, keys, *more_views), self.options, smoothing=self.effective_smoothing,
                               queue=bank, ids=ids, queue_ids=None if ids is None else bank_ids,
                               weights=weights, validate=self.validate, queue_finite=state.finite,
                               queue_normalized=bool(state.unit))
        self._bank_checked(state)
        if out0.requires_grad:  # lightly's rule: no update for evaluation
            self._enqueue(keys, ids)
        return loss

    def symmetric(self, query0: Tensor, key0: Tensor, query1: Tensor, key1: Tensor, combine: str = "mean",
                  ids: Optional[Tensor] = None) -> Tensor:
        """light-moco's symmetric MoCo loss (memory bank only), as its authors compute it.

        ``query_v`` / ``key_v`` are the query- and key-encoder outputs of view v. query0 is scored
        against key1 and query1 against key0, both against the bank as it was before this step;
        the two mean losses are combined by ``combine`` ("sum" as the authors' code, or "mean").
        Then key0 and key1 are enqueued, in that order (2B keys; only when ``query0`` requires a
        gradient, lightly's rule). ``ids`` (B,): the images' sample ids (one image gives both
        views), stored with both keys and masked as in ``forward``.
        """
        if not self.has_memory_bank:
            raise ValueError("symmetric needs a memory bank: SmoothNTXentLoss(memory_bank_size=(K, dim))")
        check_views((query0, key0, query1, key1))
        self._check_bank_width(query0)
        key0, key1 = self._keys(key0), self._keys(key1)
        state = self._assess_bank(check=self.validate)
        bank, bank_ids = self._read_bank(query0.device)
        loss = symmetric_moco_loss(query0, key0, query1, key1, bank, self.options, combine=combine,
                                   smoothing=self.effective_smoothing, ids=ids,
                                   queue_ids=None if ids is None else bank_ids, validate=self.validate,
                                   queue_finite=state.finite, queue_normalized=bool(state.unit))
        self._bank_checked(state)
        if query0.requires_grad:
            self._enqueue(key0, ids)
            self._enqueue(key1, ids)
        return loss

    # --- the bank -------------------------------------------------------------------------------

    def _check_bank_width(self, out0: Tensor) -> None:
        width = self.memory_bank.size[1]
        if out0.shape[1] != width:
            raise ValueError(f"the embeddings are {out0.shape[1]} wide but memory_bank_size="
                             f"{tuple(self.memory_bank.size)} stores {width}-wide keys")

    def _keys(self, keys: Tensor) -> Tensor:
        """The keys as the bank stores them: unit rows (like lightly's) unless ``normalize=False``."""
        return F.normalize(keys, dim=1) if self.options.normalize else keys

    def _assess_bank(self, check: bool) -> _BankState:
        """What is known about the bank as it is now. A bank the drop-in did not leave this way
        (initial, loaded, assigned, changed in place, moved or cast: another tensor or another
        version of it) is known to be neither finite nor unit; with ``check`` its rows are looked
        at once (one read back from the device): unit vectors to the dtype's rounding or not. Its
        finiteness is left to the loss call (`_bank_checked`)."""
        bank = self.memory_bank.bank
        version = _version(bank)
        state = self._bank_state
        if state is None or version is None or state.bank() is not bank or state.version != version:
            state = _BankState(weakref.ref(bank), version if version is not None else -1, False, None)
        if check and state.unit is None:
            state = state._replace(unit=_rows_are_unit(bank))
        if version is not None:
            self._bank_state = state
        return state

    def _bank_checked(self, state: _BankState) -> None:
        """After a loss call that read the bank in ``state``: with ``validate`` it checked the
        bank's values (or knew them finite already), so this version of the bank is finite."""
        if self.validate and self._bank_state is state:
            self._bank_state = state._replace(finite=True)

    def _read_bank(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """A copy of the bank (K, dim) in its own dtype and of its ids, read before any enqueue.
        The core computes mixed dtypes in float32, so an fp32 bank is never rounded to the
        queries' half precision."""
        # lightly's buffer is (K, dim) whatever feature_dim_first says (that only transposes what
        # its forward returns)
        return self.memory_bank.bank.detach().clone().to(device), self.bank_ids.clone().to(device)

    @torch.no_grad()
    def _enqueue(self, keys: Tensor, ids: Optional[Tensor]) -> None:
        """Write the keys (and their ids, -1 if unknown) at the pointer with lightly's rule: the
        keys that do not fit before the bank's end are dropped and the pointer wraps to 0. Under
        ``gather_distributed`` the keys and ids of every rank are written, in rank order."""
        keys = keys.detach()  # keys and ids were checked by the loss call before (with validate)
        ids = torch.full((keys.shape[0],), NO_ID, dtype=torch.long, device=keys.device) if ids is None else ids
        if self.gather_distributed and lightly_dist.world_size() > 1:
            # every rank's keys were checked by that rank's own call
            keys, ids = concat_all_gather(keys.contiguous()), concat_all_gather(ids.to(keys.device).contiguous())
        size, ptr = self.memory_bank.size[0], int(self.memory_bank.bank_ptr)
        written = min(keys.shape[0], size - ptr)
        bank = self.memory_bank.bank
        state = self._assess_bank(check=False)
        stored = keys[:written].to(device=bank.device, dtype=bank.dtype)
        if self.options.normalize and _narrower(keys.dtype, bank.dtype):
            # keys normalised in half precision are unit rows only to its rounding: store them as
            # the loss would normalise them in the bank's dtype, so the bank needs no normalising
            stored = F.normalize(stored, dim=1)
        bank[ptr:ptr + written] = stored
        self.bank_ids[ptr:ptr + written] = ids[:written].to(self.bank_ids.device)
        self.memory_bank.bank_ptr[0] = 0 if ptr + keys.shape[0] >= size else ptr + written
        self.bank_enqueued += written
        version = _version(bank)
        if version is not None:  # the entries written are what was checked (and normalised)
            unit_rows = self.options.normalize and bank.dtype in (torch.float32, torch.float64)
            self._bank_state = state._replace(version=version, finite=state.finite and self.validate,
                                              unit=state.unit and unit_rows)

    def __getstate__(self) -> dict:
        """Pickled or deep-copied, the copy's bank is checked again (what is known about this one
        is not carried over)."""
        state = super().__getstate__()
        state["_bank_state"] = None
        return state

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        """A persistent bank also loads, strictly, a state dict without any bank state (saved from
        lightly's NTXentLoss, or from this loss without ``persistent_bank``): it keeps its current
        bank, which then counts as not yet filled."""
        if self.persistent_bank:
            current = {"memory_bank.bank": self.memory_bank.bank, "memory_bank.bank_ptr": self.memory_bank.bank_ptr,
                       "bank_ids": self.bank_ids, "bank_enqueued": torch.zeros_like(self.bank_enqueued)}
            if not any(prefix + name in state_dict for name in current):
                warnings.warn("SmoothNTXentLoss(persistent_bank=True) loaded a state dict without a memory bank "
                              "(saved from lightly's NTXentLoss, or without persistent_bank): the bank counts as "
                              "not yet filled" + (", and alpha is held at 0 until it is" if self.wait_for_full_bank
                                                  else ""), stacklevel=4)
                for name, value in current.items():
                    state_dict[prefix + name] = value.detach().clone()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        o = self.options
        bank = f", memory_bank_size={tuple(self.memory_bank.size)}" if self.has_memory_bank else ""
        return (f"temperature={o.temperature}, smoothing={self.smoothing}, neighbors={o.neighbors}"
                f"{bank}, persistent_bank={self.persistent_bank}")


def _version(tensor: Tensor) -> Optional[int]:
    """The tensor's version counter (every in-place change increments it); None where there is
    none (an inference-mode tensor): such a bank is checked by every call."""
    try:
        return tensor._version
    except RuntimeError:
        return None


def _narrower(dtype: torch.dtype, than: torch.dtype) -> bool:
    return torch.finfo(dtype).eps > torch.finfo(than).eps


@torch.no_grad()
def _rows_are_unit(bank: Tensor) -> bool:
    """Whether every row of a float32 / float64 bank has norm 1 within ``UNIT_TOLERANCE`` epsilons
    of its dtype (norms taken in float64): normalising such rows again changes the loss only at
    float rounding. One read back from the device."""
    if bank.dtype not in (torch.float32, torch.float64):
        return False
    deviation = (torch.linalg.vector_norm(bank.double(), dim=1) - 1).abs().max()
    return bool(deviation <= UNIT_TOLERANCE * torch.finfo(bank.dtype).eps)


def _option_defaults() -> dict:
    """The drop-in's keyword defaults of the loss options (its signature is the one source).
    ``few_negatives="use_all"``: a training loop survives every batch lightly's NTXentLoss
    survives (a last batch of one image, k larger than a short batch's negatives)."""
    parameters = inspect.signature(SmoothNTXentLoss.__init__).parameters
    return {name: parameters[name].default for name in LossOptions.field_names()}


def build_loss(recipe: Recipe, **kwargs: Any) -> Union[SmoothNTXentLoss, SSLightDINOLoss, SSLightSwaVLoss]:
    """The recipe's loss.

    - moco / simclr: `SmoothNTXentLoss`, a memory bank of ``moco.queue_size`` keys for MoCo,
      in-batch for SimCLR; alpha starts at the schedule's epoch-0 value. ``kwargs``: loss options
      not in the recipe (``backend``, ``deterministic``, ``allow_tf32``, ``normalize``,
      ``few_negatives``, ...) and the drop-in's own arguments (``persistent_bank=True``,
      ``validate``, ``gather_distributed``).
    - dino: `SSLightDINOLoss` with the recipe's temperatures, teacher-temperature warm-up, centre
      momentum and ``views.loss_weights``; ``kwargs``: its other arguments (``center_mode``).
    - swav: `SSLightSwaVLoss` with the recipe's temperature, Sinkhorn settings and
      ``views.loss_weights``; ``kwargs``: ``sinkhorn_gather_distributed``.
    """
    if recipe.framework == "dino":
        dino = recipe.dino
        return SSLightDINOLoss(output_dim=dino.num_prototypes, warmup_teacher_temp=dino.warmup_teacher_temperature,
                               teacher_temp=dino.teacher_temperature,
                               warmup_teacher_temp_epochs=dino.warmup_teacher_temperature_epochs,
                               student_temp=dino.student_temperature, center_momentum=dino.center_momentum,
                               loss_weights=recipe.views.loss_weights, **kwargs)
    if recipe.framework == "swav":
        swav = recipe.swav
        return SSLightSwaVLoss(temperature=swav.temperature, sinkhorn_iterations=swav.sinkhorn_iterations,
                               sinkhorn_epsilon=swav.sinkhorn_epsilon, loss_weights=recipe.views.loss_weights,
                               **kwargs)
    option_fields = {k: kwargs.pop(k) for k in list(kwargs) if k in LossOptions.field_names()}
    option_fields.setdefault("few_negatives", "use_all")
    bank = (recipe.moco.queue_size, recipe.head.output_dim) if recipe.framework == "moco" else 0
    kwargs.setdefault("wait_for_full_bank", recipe.loss.wait_for_full_bank)
    return SmoothNTXentLoss(memory_bank_size=bank, options=recipe.loss.to_options(recipe.epochs, **option_fields),
                            **kwargs)
