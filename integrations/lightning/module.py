"""Lightning: pre-train any preset from one device to many nodes, on Lightning's own loop and DDP.

    >>> from smooth_infonce.integrations.lightning import from_preset
    >>> module = from_preset("light_moco", backbone__name="tiny_cnn", batch_size=8,
    ...                      moco__queue_size=64, head__hidden_dim=32, head__output_dim=16)
    >>> type(module).__name__, module.criterion.memory_bank.size
    ('PretrainModule', (64, 16))

`PretrainModule` wires one recipe end to end: the lightly model (backbone + head, and for MoCo the
momentum key encoder), the lightly drop-in loss with the recipe's alpha schedule (set every epoch),
the optimiser with its parameter groups (SGD, LARS or AdamW, the no-decay rules), the warm-up +
cosine lr and the scheduled weight decay (set every step), the multi-crop views
(`PretrainDataModule`), and the MoCo queue in every checkpoint. Under Lightning's DDP, SimCLR
gathers the negatives of every process and MoCo enqueues the keys of every process
(``gather_distributed``); nothing here is a hand-written loop.

DINO and SwAV (SSLight's pair-weighted multi-crop loss, `integrations.lightly.multicrop`): the student and its
EMA teacher (`DINOModel`), or the prototypes and the queue (`SwAVModel`). DINO: the teacher
temperature by epoch, the teacher's EMA after every optimiser step at
``recipe.dino.teacher_momentum_at(step, total steps)``, the last layer's gradients dropped in the
first ``freeze_last_layer_epochs`` epochs, the centre (all-reduced over the processes by lightly)
in the checkpoint. SwAV: the prototypes normalised every step and their gradients dropped in the
first ``freeze_prototypes_epochs`` epochs, Sinkhorn over every process, the queue sized at the
start of training from the global batch (`SwAVSpec.queue_length`), filled from
``swav.queue_start_epoch`` on and in the checkpoint. No gradient clipping (the authors' DINO and
SwAV runs have none).

MoCo masks a query's own image in the queue: the data module hands the dataset index of every
image to the loss (``ids``), which stores it beside each enqueued key.

Random streams under DDP: each process's torch (CPU and its CUDA device), numpy and python RNGs
are seeded at ``setup`` from the run's seed and the process's global rank (`seed_streams`), so
two processes never crop and jitter their images in lockstep; data-loading workers follow
Lightning's convention (`pl_worker_init_function`: the process's stream, the worker id and the
rank), and are started afresh every epoch (``persistent_workers=False``) so that their streams
follow from the process's. Every checkpoint holds every process's streams (gathered when it is
written); a resumed run restores each process's own, so a run killed after an epoch's checkpoint
resumes bit for bit on every process, with or without workers.
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import warnings
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

try:
    import lightning as L
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "smooth_infonce.integrations.lightning needs Lightning: pip install 'smooth-infonce[lightning]'"
    ) from err

from smooth_infonce.cached_step import chunk_slices
from smooth_infonce.integrations.lightly.loss import build_loss
from smooth_infonce.integrations.lightly.models import build_model, build_view_transform
from smooth_infonce.integrations.lightly.steps import cached_training_loss
from smooth_infonce.integrations.recipes import Recipe, get_preset
from smooth_infonce.integrations.recipes.optim import build_optimizer, set_schedules

RNG_STATE_KEY = "smooth_infonce_rng_state"
RNG_STATE_FORMAT = 2  # one state per process (format 1, before it: a single state, rank 0's)


# --- cached-gradient steps under manual optimisation ---------------------------------------------

def lightning_hooks(module) -> dict:
    """``no_sync`` and ``backward`` for `cached_step` inside a LightningModule's
    ``training_step`` under manual optimisation (``automatic_optimization = False``).

    Every chunk is back-propagated through ``module.manual_backward`` (so the precision plugin
    scales each alike) of a scalar whose gradient with respect to the chunk's outputs is exactly
    the cached gradient; all chunks but the last run under the strategy's
    ``block_backward_sync()`` (DDP's ``no_sync``), where Lightning does not arm DDP's reducer. The
    gradients are thus all-reduced once per step, during the last chunk's backward. Single-device
    strategies have no ``block_backward_sync``: nothing to block there.
    """
    strategy = module.trainer.strategy
    no_sync = getattr(strategy, "block_backward_sync", None) or contextlib.nullcontext

    def backward(outputs: Sequence[Tensor], gradients: Sequence[Tensor], last: bool) -> None:
        module.manual_backward(sum((out * grad).sum() for out, grad in zip(outputs, gradients)))

    return {"no_sync": no_sync, "backward": backward}



def seed_streams(seed: int, rank: int, step: int = 0) -> None:
    """Seed this process's torch (CPU and every CUDA device), numpy and python RNGs from the run's
    ``seed``, the process's global ``rank`` and ``step`` (0 for a fresh run): distinct streams for
    distinct ranks, the same streams for the same ``(seed, rank, step)``."""
    words = np.random.SeedSequence([int(seed), int(rank), int(step)]).generate_state(4, np.uint64)
    torch.manual_seed(int(words[0]))  # CPU and CUDA
    np.random.seed(np.random.SeedSequence([int(seed), int(rank), int(step), 1]).generate_state(4))
    random.seed((int(words[1]) << 64) | int(words[2]))


def rng_state(device: Optional[torch.device] = None) -> dict:
    """This process's RNG streams as tensors, plain numbers and tuples (``torch.load(weights_only=True)``
    reads them back): torch's CPU generator, the CUDA generator of ``device`` (when it is a CUDA
    device that has been used), numpy's and python's global ones."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (kind, torch.from_numpy(keys.copy()), int(position), int(has_gauss), float(cached))}
    if device is not None and device.type == "cuda" and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: Optional[torch.device] = None) -> None:
    """Restore what `rng_state` returned (its CUDA state on ``device``, where it has one)."""
    kind, keys, position, has_gauss, cached = state["numpy"]
    torch.set_rng_state(state["torch"])
    np.random.set_state((kind, keys.numpy(), position, has_gauss, cached))
    random.setstate(state["python"])
    if "cuda" in state and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def _as_plain(state: dict) -> dict:
    """`rng_state` with its tensors as (bytes, dtype name): what the pickling collectives carry."""
    def plain(tensor: Tensor) -> tuple:
        return tensor.numpy().tobytes(), str(tensor.dtype).removeprefix("torch.")

    kind, keys, position, has_gauss, cached = state["numpy"]
    out = {key: plain(value) for key, value in state.items() if isinstance(value, Tensor)}
    return {**out, "numpy": (kind, plain(keys), position, has_gauss, cached), "python": state["python"]}


def _from_plain(state: dict) -> dict:
    """The inverse of `_as_plain`."""
    def tensor(plain: tuple) -> Tensor:
        data, dtype = plain
        return torch.from_numpy(np.frombuffer(data, dtype=dtype).copy())

    kind, keys, position, has_gauss, cached = state["numpy"]
    out = {key: tensor(value) for key, value in state.items() if key not in ("numpy", "python")}
    return {**out, "numpy": (kind, tensor(keys), position, has_gauss, cached), "python": state["python"]}


class IndexedViews(Dataset):
    """``(views, target, index)`` for every image of ``dataset`` (a torchvision-style dataset of
    ``(image, target)``): ``views`` is the list ``transform(image)`` returns (the recipe's global
    crops, then its local crops), ``index`` the image's position in the dataset (its sample id)."""

    def __init__(self, dataset: Dataset, transform: Optional[Callable[[Any], Sequence[Tensor]]]) -> None:
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, target = self.dataset[index]
        views = image if self.transform is None else self.transform(image)
        return list(views), target, index


class PretrainDataModule(L.LightningDataModule):
    """Training data with the recipe's views: an ImageFolder at ``root`` (or ``root="fashion-mnist[:DIR]"``:
    Fashion-MNIST's 60,000 training images from its IDX files), or any ``dataset`` of
    ``(image, target)`` pairs (PIL images for the recipe's transform; with ``transform=None`` the
    dataset must return the list of view tensors itself).

    ``batch_size`` is per process; under DDP the data is sharded by a distributed sampler (seeded
    with ``PL_GLOBAL_SEED`` as Lightning's), whose epoch is set before the loader starts, so that a
    resumed run's first epoch is shuffled as the uninterrupted run's (Lightning sets it only after
    the workers have drawn their first indices). Views of one size are stacked by the default
    collate, so multi-crop batches come out as a list of (B, 3, H, W) tensors, globals first.

    Workers are seeded by Lightning's `pl_worker_init_function` (from the process's own stream, the
    worker id and the global rank) and, unless ``persistent_workers=True``, started afresh every
    epoch: their streams then follow from the process's, which the checkpoint holds, and a resumed
    run draws the views of the uninterrupted one. Persistent workers carry their streams on from
    the first epoch, which no checkpoint can hold: a resumed run then draws other views.
    """

    def __init__(self, recipe: Recipe, *, root: Optional[str] = None, dataset: Optional[Dataset] = None,
                 batch_size: int = 256, num_workers: int = 0, drop_last: bool = True, shuffle: bool = True,
                 transform: Optional[Callable] = "recipe",  # type: ignore[assignment]
                 persistent_workers: bool = False) -> None:
        super().__init__()
        if (root is None) == (dataset is None):
            raise ValueError("PretrainDataModule needs exactly one of root (an ImageFolder) or dataset")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.recipe, self.root, self.dataset = recipe, root, dataset
        self.batch_size, self.num_workers, self.drop_last, self.shuffle = batch_size, num_workers, drop_last, shuffle
        self.persistent_workers = persistent_workers and num_workers > 0
        self.transform = build_view_transform(recipe.views) if transform == "recipe" else transform

    def setup(self, stage: Optional[str] = None) -> None:
        if self.dataset is None:
            from smooth_infonce.integrations.data.fashion_mnist import (
                fashion_mnist_images,
                is_data_spec,
                parse_data_spec,
            )

            if is_data_spec(self.root):
                self.dataset = fashion_mnist_images("train", parse_data_spec(self.root))
            else:
                from torchvision.datasets import ImageFolder

                self.dataset = ImageFolder(self.root)

    def train_dataloader(self) -> DataLoader:
        from lightning.fabric.utilities.seed import pl_worker_init_function

        dataset = IndexedViews(self.dataset, self.transform)
        trainer = self.trainer  # None outside a run
        rank = trainer.global_rank if trainer is not None else None
        seed_worker = functools.partial(pl_worker_init_function, rank=rank) if self.num_workers else None
        options = dict(batch_size=self.batch_size, num_workers=self.num_workers, drop_last=self.drop_last,
                       persistent_workers=self.persistent_workers, worker_init_fn=seed_worker)
        if (trainer is not None and trainer.world_size > 1
                and getattr(trainer._accelerator_connector, "use_distributed_sampler", True)):
            sampler = DistributedSampler(dataset, num_replicas=trainer.world_size, rank=trainer.global_rank,
                                         shuffle=self.shuffle, seed=int(os.getenv("PL_GLOBAL_SEED", 0)))
            sampler.set_epoch(trainer.fit_loop.epoch_progress.current.processed)
            return DataLoader(dataset, sampler=sampler, **options)
        return DataLoader(dataset, shuffle=self.shuffle, **options)


class PretrainModule(L.LightningModule):
    """One recipe as a LightningModule (see the module docstring).

    Args:
        recipe: a `Recipe` (``get_preset(name, **overrides)``).
        mask_own_keys: MoCo: leave queue entries of a query's own image out of its negatives.
        seed: the run's seed, from which every process's random streams derive (`seed_streams`);
            by default ``PL_GLOBAL_SEED`` (set by ``seed_everything``), else rank 0's
            ``torch.initial_seed()``, logged.
        chunk_size: MoCo and SimCLR: the cached-gradient step (`cached_step`): the whole batch's
            loss and gradient with the encoder's activations of ``chunk_size`` images at a time
            (pass 1 without a graph, pass 2 chunk by chunk). None: one pass. Train-mode batch norm
            then normalises each chunk with its own statistics, as per-device batch norm under
            DDP with chunk-sized batches; the gradients are all-reduced once per step. Uses
            Lightning's manual optimisation (no ``accumulate_grad_batches`` / gradient clipping).
        loss_options: more keywords of the recipe's loss (`build_loss`): `SmoothNTXentLoss`'s
            (``backend``, ``deterministic``, ``allow_tf32``, ...) for MoCo and SimCLR,
            `SSLightDINOLoss`'s or `SSLightSwaVLoss`'s for DINO and SwAV.

    The learning rate scales with the total batch of the run (per-process batch x processes x
    gradient accumulation), per 256 images, as the recipe states.
    """

    def __init__(self, recipe: Recipe, *, mask_own_keys: bool = True, seed: Optional[int] = None,
                 chunk_size: Optional[int] = None, **loss_options: Any) -> None:
        super().__init__()
        if chunk_size is not None:
            chunk_slices(1, chunk_size)  # a positive int, or a clear error
            if recipe.framework not in ("moco", "simclr"):
                raise ValueError(f"chunk_size is for the moco and simclr frameworks, not {recipe.framework!r}")
        self.chunk_size = chunk_size
        self.automatic_optimization = chunk_size is None  # the cached step back-propagates chunk by chunk
        self.recipe = recipe
        self.seed: Optional[int] = seed
        self.run_seed: Optional[int] = None  # resolved at setup; a resumed run's is its checkpoint's
        self.mask_own_keys = mask_own_keys and recipe.framework == "moco"
        self.model = build_model(recipe)
        if recipe.framework in ("moco", "simclr"):
            loss_options.setdefault("persistent_bank", True)
            loss_options.setdefault("gather_distributed", True)  # a no-op on one process
        elif recipe.framework == "swav":
            loss_options.setdefault("sinkhorn_gather_distributed", True)  # a no-op on one process
        # (DINO: lightly all-reduces the centre's batch mean whenever torch.distributed is running)
        self.criterion = build_loss(recipe, **loss_options)
        self._teacher_updated_at = -1  # the last optimiser step the DINO teacher followed
        self.save_hyperparameters({"recipe": recipe.to_dict(), "mask_own_keys": mask_own_keys,
                                   "chunk_size": chunk_size, **{
            k: v for k, v in loss_options.items() if isinstance(v, (bool, int, float, str, type(None)))}})

    # --- schedules -------------------------------------------------------------------------------

    def total_batch_size(self) -> int:
        trainer = self.trainer
        per_process = trainer.train_dataloader.batch_size if trainer.train_dataloader is not None else None
        if per_process is None:
            per_process = self.recipe.batch_size // max(1, trainer.world_size)
        return per_process * trainer.world_size * trainer.accumulate_grad_batches

    def steps_per_epoch(self) -> int:
        trainer = self.trainer
        return max(1, trainer.num_training_batches // trainer.accumulate_grad_batches)

    def set_schedules(self) -> float:
        """The lr (and weight decay, where the recipe schedules it) of this step; returns the lr."""
        return set_schedules(self.optimizers(), self.recipe.optimizer, self.global_step,
                             steps_per_epoch=self.steps_per_epoch(), epochs=self.trainer.max_epochs,
                             batch_size=self.total_batch_size())

    def teacher_momentum(self, step: int) -> float:
        """DINO: the teacher's EMA factor after optimiser step ``step`` (cosine over the run)."""
        return self.recipe.dino.teacher_momentum_at(step, self.trainer.estimated_stepping_batches)

    def setup(self, stage: str) -> None:
        # every process's streams from (seed, rank): before the first epoch's loader draws from
        # them, and before a checkpoint (restored after setup) replaces them with the saved ones
        if stage != "fit":
            return
        seed = self.seed if self.seed is not None else os.environ.get("PL_GLOBAL_SEED")
        if seed is None:
            seed = self.trainer.strategy.broadcast(torch.initial_seed(), src=0)
            if self.trainer.is_global_zero:
                warnings.warn(f"no seed given (PretrainModule(seed=...) or seed_everything): the run's random "
                              f"streams derive from seed {seed}", stacklevel=2)
        self.run_seed = int(seed)
        seed_streams(self.run_seed, self.trainer.global_rank)

    def on_train_start(self) -> None:
        if self.recipe.framework == "swav":
            # SwAV's queue: the nominal size trimmed to a multiple of the images of one step over
            # all processes (a resumed run finds it restored at that length and keeps it)
            step_batch = self.total_batch_size() // self.trainer.accumulate_grad_batches
            self.model.set_queue_length(self.recipe.swav.queue_length(step_batch))
        images = len(self.trainer.train_dataloader.dataset)
        queue = self.recipe.moco.queue_size
        if self.recipe.framework == "moco" and queue > images:
            what = ("they are masked (mask_own_keys=True), so each query has fewer real negatives than the queue holds"
                    if self.mask_own_keys else "each query is pushed away from its own image: set mask_own_keys=True")
            warnings.warn(f"the MoCo queue ({queue} keys) is larger than the dataset ({images} images): every query "
                          f"meets earlier keys of its own image in the queue; {what}", stacklevel=2)

    def on_train_epoch_start(self) -> None:
        if self.recipe.framework in ("moco", "simclr"):
            alpha = self.criterion.set_epoch(self.current_epoch)
            self.log("train/alpha_schedule", alpha, on_step=False, on_epoch=True)

    # --- the step --------------------------------------------------------------------------------

    def training_step(self, batch, batch_idx: int) -> Tensor:
        views, _, index = batch
        lr = self.set_schedules()
        weights = self.recipe.view_weights()
        framework = self.recipe.framework
        if framework in ("dino", "swav"):
            # DINO: tau_t by epoch (lightly's schedule); SwAV: the queue by epoch
            if framework == "dino":
                tau = self.criterion.teacher_temperature(epoch=self.current_epoch)
                extra = {"train/teacher_temperature": float(tau)}
            else:  # whether this step's Sinkhorn sees the queue (read before the step enqueues)
                extra = {"train/queue_in_use": float(self.model.queue_in_use(self.current_epoch))}
            loss = self.model.training_loss(views, self.criterion, epoch=self.current_epoch)
        else:
            ids = None
            if framework == "moco":
                self.model.update_key_encoder()
                ids = index if self.mask_own_keys else None
            if self.chunk_size is None:  # the model's training_loss: one pass (ids is None for SimCLR)
                loss = self.model.step_parts(views, self.criterion, weights=weights, ids=ids).loss()
            else:  # manual optimisation: the cached step accumulates the gradients, then one step
                optimizer = self.optimizers()
                optimizer.zero_grad()
                loss = cached_training_loss(self.model, views, self.criterion, self.chunk_size, weights=weights,
                                            ids=ids, **lightning_hooks(self))
                optimizer.step()
            extra = {"train/alpha": self.criterion.effective_smoothing}
        self.log_dict({"train/loss": loss, "train/lr": lr, **extra},
                      prog_bar=True, on_step=True, on_epoch=False, batch_size=views[0].shape[0])
        return loss

    def on_after_backward(self) -> None:
        # the gradients are final here (DDP has averaged them); the optimiser step comes next
        if self.recipe.framework == "dino":
            self.model.cancel_last_layer_gradients(self.current_epoch)
        elif self.recipe.framework == "swav":
            self.model.cancel_prototype_gradients(self.current_epoch)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # DINO's teacher follows the student after each optimiser step, at that step's momentum
        # (with gradient accumulation, batches without a step leave global_step unchanged)
        step = self.global_step - 1
        if self.recipe.framework == "dino" and step >= 0 and step != self._teacher_updated_at:
            self.model.update_teacher(self.teacher_momentum(step))
            self._teacher_updated_at = step

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return build_optimizer(self.model, self.recipe.optimizer, batch_size=self.total_batch_size())

    # --- checkpoints: the RNG streams too, so a resumed run draws the same views -----------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # every process's streams: Lightning calls this hook on every process and writes rank 0's
        # dict, so the states are gathered here (tensors, plain numbers, tuples: weights_only loads)
        trainer = self._trainer
        device = trainer.strategy.root_device if trainer is not None else None
        states = [rng_state(device)]
        world_size = trainer.world_size if trainer is not None else 1
        if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered = [None] * world_size  # tensors as bytes: plain objects cross the pickling collective
            torch.distributed.all_gather_object(gathered, _as_plain(states[0]))
            states = [_from_plain(state) for state in gathered]
        checkpoint[RNG_STATE_KEY] = {"format": RNG_STATE_FORMAT, "seed": self.run_seed, "world_size": len(states),
                                     "ranks": states}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        trainer = self._trainer
        if trainer is None:  # load_from_checkpoint outside a run: the process's streams stay as they are
            return
        state = checkpoint.get(RNG_STATE_KEY)
        rank, world_size, device = trainer.global_rank, trainer.world_size, trainer.strategy.root_device
        if state is None:
            if rank == 0:
                warnings.warn("checkpoint without RNG state: the resumed run draws other views", stacklevel=2)
            return
        if "ranks" in state:
            states, self.run_seed = list(state["ranks"]), state["seed"] if state["seed"] is not None else self.run_seed
        else:  # format 1: one state, rank 0's, given to every process before
            states = [state]
            if rank == 0:
                warnings.warn("checkpoint with one RNG state (written before every process's were kept): rank 0 "
                              "restores it" + (f", ranks 1 to {world_size - 1} draw streams derived from the seed "
                                               "and the step: the resumed run draws other views on them"
                                               if world_size > 1 else ""), stacklevel=2)
        if len(states) == world_size:
            set_rng_state(states[rank], device)
            return
        if "ranks" in state and rank == 0:
            warnings.warn(f"the checkpoint holds the RNG streams of {len(states)} processes, this run has "
                          f"{world_size}: rank 0 restores rank 0's, every other rank draws streams derived from the "
                          "seed, its rank and the step; the resumed run draws other views than an uninterrupted one",
                          stacklevel=2)
        if rank == 0:
            set_rng_state(states[0], device)
        else:
            seed = self.run_seed if self.run_seed is not None else 0
            seed_streams(seed, rank, step=int(checkpoint.get("global_step", 0)) + 1)


def build_module(recipe: Recipe, **options: Any) -> PretrainModule:
    """The LightningModule of ``recipe``; ``options`` go to `PretrainModule`."""
    return PretrainModule(recipe, **options)


def from_preset(name: str, *, module_options: Optional[dict] = None, **overrides: Any) -> PretrainModule:
    """`build_module` of ``get_preset(name, **overrides)``."""
    return build_module(get_preset(name, **overrides), **(module_options or {}))
