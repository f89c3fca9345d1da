"""Cached-gradient training steps ("GradCache"): the gradient of a contrastive loss over a batch of
any size, in the activation memory of one chunk.

A contrastive loss couples every row of the batch, so the batch a device can hold is normally set
by the encoder's activations. The cached-gradient step splits the encoder's work, not the loss:

1. pass 1: every chunk of ``chunk_size`` images is embedded without a graph (``torch.no_grad``);
   each chunk's RNG state (CPU and CUDA generators: dropout, drop-path, anything random in the
   forward) is saved first, and the modules' buffers are restored afterwards, so that pass 1 does
   not move the batch-norm running statistics;
2. the loss over the whole batch, with the embeddings as leaves: its value is the step's loss, and
   one backward gives the gradient of each embedding. The loss is called once, so a MoCo queue is
   read once and the whole batch's keys are enqueued once;
3. pass 2: each chunk is embedded again, with a graph, under the RNG state it had in pass 1 (so
   the same dropout masks), and its cached embedding gradient is back-propagated into the
   parameters. After the step the running statistics have moved exactly as one forward of each
   chunk moves them.

The result equals the plain step (one graph over the same chunk-by-chunk forward, one backward)
up to float rounding: same loss, same parameter gradients, same running statistics.

**Batch norm in train mode normalises each chunk with that chunk's statistics**, as per-device
batch norm does under DDP with chunk-sized per-device batches. So with batch norm a chunked step is
the plain step of a model whose batch-norm batches are the chunks, not the whole batch (a model
without batch norm, or with it in eval mode, computes the same thing at any chunk size). MoCo keys
(`lightly_step_parts`) are computed chunk by chunk as well, without a graph. The cost: a second
forward of the encoder (about a third more compute for a forward + backward), and the O(N D)
embeddings plus the loss's own state held for the whole batch.

``chunk_size=None`` is the single pass: one forward with a graph, the loss, one backward.

A plain training loop (any model, any loss over the embeddings):

    >>> import torch
    >>> from torch import nn
    >>> from smooth_infonce import SmoothInfoNCELoss
    >>> from smooth_infonce.cached_step import cached_step
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Flatten(), nn.Linear(48, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 16))
    >>> criterion = SmoothInfoNCELoss(temperature=0.2, smoothing=0.1, neighbors=5)
    >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> views = [torch.randn(64, 3, 4, 4), torch.randn(64, 3, 4, 4)]   # two views of 64 images
    >>> optimizer.zero_grad()
    >>> loss = cached_step(lambda chunk: [model(v) for v in chunk], views,
    ...                    lambda embeddings: criterion(*embeddings), chunk_size=16, modules=model)
    >>> optimizer.step()                                # the gradients are in .grad already
    >>> loss.requires_grad, loss.ndim
    (False, 0)

The lightly models of this project (`SimCLRModel`, `MoCoModel`, SSLight multi-crop, symmetric
MoCo) with the lightly drop-in loss, in one call, are
`smooth_infonce.integrations.lightly.steps.cached_training_loss`; the Lightning module's chunked
steps go through it with `smooth_infonce.integrations.lightning.module.lightning_hooks`.

This module needs torch only: it is the one copy of the cached-gradient step that every
integration uses.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Dict, Iterable, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn

# embed(chunk of inputs) -> the embeddings of that chunk (one tensor per output, rows = images)
Embed = Callable[[Sequence[Tensor]], Union[Tensor, Sequence[Tensor]]]
# loss_of(embeddings of the whole batch, one tensor per output) -> a scalar loss
LossOf = Callable[[List[Tensor]], Tensor]
# backward(outputs of one chunk, their cached gradients, whether it is the last chunk)
Backward = Callable[[Sequence[Tensor], Sequence[Tensor], bool], None]
Modules = Union[nn.Module, Iterable[nn.Module], None]


def chunk_slices(batch: int, chunk_size: Optional[int]) -> List[slice]:
    """The row ranges of the chunks: ``chunk_size`` rows each, the last one shorter when
    ``chunk_size`` does not divide ``batch``; one range for ``chunk_size=None``."""
    if chunk_size is None:
        return [slice(0, batch)]
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    return [slice(start, min(start + chunk_size, batch)) for start in range(0, batch, chunk_size)]


# --- RNG and buffers: what pass 2 must see exactly as pass 1 saw it ------------------------------

@dataclass
class RNGState:
    """The torch generators a forward may draw from: the CPU one and the CUDA ones of the given
    devices (Python's and numpy's generators are not saved: a forward pass does not use them)."""

    cpu: Tensor
    cuda: Dict[int, Tensor] = field(default_factory=dict)

    @classmethod
    def capture(cls, cuda_devices: Iterable[int] = ()) -> "RNGState":
        return cls(torch.get_rng_state(), {d: torch.cuda.get_rng_state(d) for d in cuda_devices})

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        for device, state in self.cuda.items():
            torch.cuda.set_rng_state(state, device)


def cuda_devices(tensors: Iterable[Tensor]) -> List[int]:
    """The CUDA devices whose generators a forward over ``tensors`` may use: those of the tensors
    and the current device (a model may create random tensors on it without an input there)."""
    devices = {t.device.index for t in tensors if t.device.type == "cuda"}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        devices.add(torch.cuda.current_device())
    return sorted(d if d is not None else torch.cuda.current_device() for d in devices)


def module_list(modules: Modules) -> List[nn.Module]:
    if modules is None:
        return []
    return [modules] if isinstance(modules, nn.Module) else list(modules)


def snapshot_buffers(modules: Sequence[nn.Module]) -> List[tuple]:
    """A copy of every buffer of ``modules`` (batch-norm running statistics and their counters,
    and anything else a forward may update), each shared buffer once."""
    seen, saved = set(), []
    for module in modules:
        for buffer in module.buffers():
            if id(buffer) not in seen:
                seen.add(id(buffer))
                saved.append((buffer, buffer.detach().clone()))
    return saved


@torch.no_grad()
def restore_buffers(saved: Sequence[tuple]) -> None:
    # in place: the modules keep their tensors (optimisers, DDP and hooks may hold references)
    for buffer, value in saved:
        buffer.copy_(value)


# --- the three parts of the step ---------------------------------------------------------------

@dataclass
class CachedEmbeddings:
    """What pass 1 leaves for the loss and for pass 2."""

    embeddings: List[Tensor]  # one leaf per output, whole batch, requires_grad (the loss's inputs)
    chunks: List[slice]
    rng_states: List[RNGState]  # each chunk's RNG state before its pass-1 forward
    rng_after: RNGState  # the state after pass 1: the stream continues from here after the step


def _as_list(outputs: Union[Tensor, Sequence[Tensor]]) -> List[Tensor]:
    return [outputs] if isinstance(outputs, Tensor) else list(outputs)


def _check_inputs(inputs: Sequence[Tensor]) -> int:
    if not inputs:
        raise ValueError("cached_step needs at least one input tensor (the views)")
    batch = inputs[0].shape[0]
    sizes = [int(x.shape[0]) for x in inputs]
    if any(size != batch for size in sizes):
        raise ValueError(f"every input must hold the same images (equal first dimension), got {sizes}")
    return batch


def embed_without_graph(embed: Embed, inputs: Sequence[Tensor], chunk_size: Optional[int], *,
                        modules: Modules) -> CachedEmbeddings:
    """Pass 1: ``embed`` of every chunk under ``torch.no_grad``, each chunk's RNG state saved
    before its forward; the buffers of ``modules`` (batch-norm running statistics) are restored
    afterwards, so pass 1 leaves the model as it found it. Returns the whole batch's embeddings as
    leaves that require a gradient."""
    batch = _check_inputs(inputs)
    chunks = chunk_slices(batch, chunk_size)
    devices = cuda_devices(inputs)
    saved = snapshot_buffers(module_list(modules))
    rng_states, parts = [], []
    try:
        with torch.no_grad():
            for rows in chunks:
                rng_states.append(RNGState.capture(devices))
                parts.append(_as_list(embed([x[rows] for x in inputs])))
    finally:
        restore_buffers(saved)
    rng_after = RNGState.capture(devices)
    if any(len(p) != len(parts[0]) for p in parts):
        raise ValueError("embed returned a different number of outputs for different chunks")
    embeddings = [torch.cat(outputs).requires_grad_() for outputs in zip(*parts)]
    for e in embeddings:
        if e.shape[0] != batch:
            raise ValueError(f"embed must return one row per image: {e.shape[0]} rows for {batch} images")
    return CachedEmbeddings(embeddings, chunks, rng_states, rng_after)


def plain_backward(outputs: Sequence[Tensor], gradients: Sequence[Tensor], last: bool) -> None:
    """One backward of a chunk's outputs with their cached gradients (one call, so outputs that
    share a graph are back-propagated together)."""
    torch.autograd.backward(list(outputs), list(gradients))


def backward_chunks(embed: Embed, inputs: Sequence[Tensor], cached: CachedEmbeddings,
                    gradients: Sequence[Optional[Tensor]], *,
                    no_sync: Optional[Callable[[], ContextManager]] = None,
                    backward: Optional[Backward] = None) -> None:
    """Pass 2: each chunk embedded again with a graph under its pass-1 RNG state, then ``backward``
    of its slice of ``gradients`` (one per output; None: that output does not reach the loss).
    ``no_sync`` (a context-manager factory: DDP's ``model.no_sync``, Lightning's
    ``strategy.block_backward_sync``) is entered around every chunk but the last, so that a
    data-parallel wrapper all-reduces the accumulated gradients once, in the last chunk's
    backward. Afterwards the RNG continues from where pass 1 left it."""
    if len(gradients) != len(cached.embeddings):
        raise ValueError(f"one gradient per output: {len(cached.embeddings)} outputs, {len(gradients)} gradients")
    backward = plain_backward if backward is None else backward
    last_index = len(cached.chunks) - 1
    for index, (rows, state) in enumerate(zip(cached.chunks, cached.rng_states)):
        last = index == last_index
        context = contextlib.nullcontext() if last or no_sync is None else no_sync()
        with context, torch.enable_grad():
            state.restore()
            outputs = _as_list(embed([x[rows] for x in inputs]))
            pairs = [(out, grad[rows]) for out, grad in zip(outputs, gradients)
                     if grad is not None and out.requires_grad]
            if pairs:
                backward([out for out, _ in pairs], [grad for _, grad in pairs], last)
    cached.rng_after.restore()


def cached_step(embed: Embed, inputs: Sequence[Tensor], loss_of: LossOf, chunk_size: Optional[int], *,
                modules: Modules = None, no_sync: Optional[Callable[[], ContextManager]] = None,
                backward: Optional[Backward] = None) -> Tensor:
    """One training step's loss and parameter gradients, the encoder run ``chunk_size`` images at
    a time (see the module docstring). The gradients are accumulated into ``.grad`` as
    ``loss.backward()`` would; the caller zeroes them before and steps the optimiser after.

    Args:
        embed: ``embed(chunk)`` -> the embeddings of the chunk: ``chunk`` holds the rows of the
            chunk's images of every input, in order; return one tensor or a list (one per
            output, e.g. one per view), each with one row per image of the chunk. It is called
            twice per chunk (no graph, then with a graph) and must be deterministic given the RNG.
        inputs: the batch, e.g. the views: tensors with the same first dimension (the images).
        loss_of: ``loss_of(embeddings)`` -> the scalar loss of the whole batch, from the list of
            outputs, each concatenated over the chunks (leaves that require a gradient). Called
            exactly once per step: a loss with a memory bank reads and updates it once. Any
            parameter inside the loss gets its gradient from a plain backward of the loss.
        chunk_size: images per chunk; ``None``: the single pass (embed the whole batch with a
            graph, the loss, one backward), as without this function.
        modules: the networks ``embed`` runs, whose buffers (batch-norm running statistics) pass
            1 must not move; defaults to ``embed`` when it is a module. Required otherwise
            (``modules=()`` when nothing has state).
        no_sync: DDP: a context-manager factory entered for every chunk but the last
            (``ddp_model.no_sync``, or Lightning's ``trainer.strategy.block_backward_sync``), so
            the gradients are all-reduced once per step, not once per chunk.
        backward: ``backward(outputs, gradients, last)`` back-propagates one chunk (default:
            `plain_backward`); Lightning's manual optimisation passes `lightning_hooks`.

    Returns:
        The loss, detached.

    Batch norm in train mode normalises each chunk with that chunk's statistics (as per-device
    batch norm under DDP with chunk-sized batches); its running statistics move once per chunk.

    Mixed precision: the embeddings keep the dtype the encoder gives (the loss sees what it sees
    in a single pass), and so do their cached gradients. Under fp16 autocast with loss scaling
    those gradients are held unscaled in fp16 (scaling applies from pass 2 on), so very small ones
    can underflow where a single pass would keep them: prefer bf16, which has float32's range.
    """
    if modules is None:
        if not isinstance(embed, nn.Module):
            raise TypeError("cached_step needs modules=: the networks embed runs, whose batch-norm running "
                            "statistics pass 1 must leave alone (modules=() if none has buffers)")
        modules = embed
    backward = plain_backward if backward is None else backward
    if chunk_size is None:
        _check_inputs(inputs)
        loss = _check_loss(loss_of(_as_list(embed(list(inputs)))))
        backward([loss], [torch.ones_like(loss)], True)
        return loss.detach()
    cached = embed_without_graph(embed, inputs, chunk_size, modules=modules)
    loss = _check_loss(loss_of(list(cached.embeddings)))
    # the whole-batch gradient of every embedding (and of any parameter inside the loss); under
    # gather_distributed this backward exchanges the embedding gradients between ranks, once
    loss.backward()
    backward_chunks(embed, inputs, cached, [e.grad for e in cached.embeddings], no_sync=no_sync,
                    backward=backward)
    return loss.detach()


def _check_loss(loss: Tensor) -> Tensor:
    if not isinstance(loss, Tensor) or loss.ndim != 0:
        raise ValueError(f"loss_of must return a scalar tensor, got {getattr(loss, 'shape', type(loss))}")
    return loss


@torch.no_grad()
def embed_in_chunks(fn: Callable[[Tensor], Tensor], images: Tensor, chunk_size: Optional[int]) -> Tensor:
    """``fn`` of ``images`` without a graph, ``chunk_size`` images at a time (MoCo keys: the
    momentum encoder needs no second pass, only its activations bounded)."""
    return torch.cat([fn(images[rows]) for rows in chunk_slices(images.shape[0], chunk_size)])


@dataclass
class StepParts:
    """The pieces `cached_step` takes for one model and loss: ``cached_step(parts.embed,
    parts.inputs, parts.loss_of, chunk_size, modules=model)``."""

    embed: Embed
    inputs: List[Tensor]
    loss_of: LossOf

    def loss(self) -> Tensor:
        """The single pass: the whole batch embedded with a graph, then the loss."""
        return self.loss_of(_as_list(self.embed(self.inputs)))
