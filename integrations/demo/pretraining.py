"""The demo's pre-training: a recipe's `PretrainModule` trained by Lightning's ``Trainer``
(`smooth_infonce.integrations.lightning`; there is no hand-written loop here), plus the demo's
views and a callback that records the training curves (mean loss, alpha and held-out kNN top-1
per epoch) and scores the frozen backbone at the end.

Augmented views come from lightly's transforms, either fresh for every item (the recipe's
transform in `PretrainDataModule`) or drawn from a fixed cache of augmented views per image
(`CachedViews`, `build_view_cache`): on a 2-core CPU the PIL augmentations cost more than a tiny
network, and a cache makes every run of a comparison see the same data.
"""

from __future__ import annotations

import logging
import random
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from smooth_infonce.integrations.data.digits import ImageList
from smooth_infonce.integrations.recipes import CropSpec, Recipe, ViewSpec
from smooth_infonce.integrations.recipes.backbones import Backbone

from .evaluation import EvalData

# tqdm refreshes: smooth on a terminal, a line every few seconds in a log file.
BAR_INTERVAL = 0.2 if sys.stderr.isatty() else 5.0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)  # lightly's GaussianBlur draws from numpy
    torch.manual_seed(seed)


class CachedViews(Dataset):
    """Every item: ``(views, label)``, the recipe's views drawn from fixed caches of augmented views
    per image (a dataset for `PretrainDataModule` with ``transform=None``): ``count`` different
    views from each ``(cache, count)`` group, globals first (``cache``: (images, per_image, 3, H, W))."""

    def __init__(self, groups: Sequence[Tuple[Tensor, int]], labels: Sequence[int], seed: int) -> None:
        self.groups, self.labels = [(cache, count) for cache, count in groups], list(labels)
        for cache, count in self.groups:
            if count > cache.shape[1]:
                raise ValueError(f"{count} views per item from a cache of {cache.shape[1]} views per image")
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self.groups[0][0].shape[0]

    def __getitem__(self, index: int) -> Tuple[List[Tensor], int]:
        views = []
        for cache, count in self.groups:
            chosen = torch.randperm(cache.shape[1], generator=self.generator)[:count].tolist()
            views += [cache[index, view] for view in chosen]
        return views, self.labels[index]


def build_view_cache(images: ImageList, views: ViewSpec, per_image: int, seed: int, progress: bool,
                     crop: Optional[CropSpec] = None) -> Tensor:
    """(images, per_image, 3, H, W): ``per_image`` augmented crops of the group ``crop`` (default:
    the global crops) of every image. The cache is shared by the views of a group, so their blur
    and solarisation probabilities must agree (digits: none)."""
    from tqdm.auto import tqdm

    from smooth_infonce.integrations.lightly.models import build_crop_transform

    crop = views.global_crops if crop is None else crop
    first = 0 if crop is views.global_crops else views.global_crops.count
    probs = {(views.view_probs(views.blur_prob)[v], views.view_probs(views.solarize_prob)[v])
             for v in range(first, first + crop.count)}
    if len(probs) > 1:
        raise ValueError(f"views of one cached group differ in blur / solarisation ({sorted(probs)}): augment on "
                         "the fly instead (view cache 0)")
    one_view = build_crop_transform(crop, views, view=first)
    seed_everything(seed)
    cache = [torch.stack([one_view(images.image(i)) for _ in range(per_image)])
             for i in tqdm(range(len(images)), desc=f"augmenting ({per_image} views of {crop.size} px / image)",
                           disable=not progress, leave=False, mininterval=BAR_INTERVAL)]
    return torch.stack(cache)


@dataclass
class RunResult:
    run: str
    seed: int
    smoothing: float
    mode: str
    neighbors: Optional[int]
    knn_top1: float
    linear_top1: float
    seconds: float
    masked: bool = False
    description: str = ""  # the loss, where the smoothing fields do not say it (dino, swav)
    loss_per_epoch: List[float] = field(default_factory=list)
    knn_per_epoch: List[float] = field(default_factory=list)
    smoothing_per_epoch: List[float] = field(default_factory=list)


@contextmanager
def quiet_lightning() -> Iterator[None]:
    """Lightning's banner lines ("GPU available: ...") and the few-workers hint, off for the demo."""
    from lightning_utilities.core import rank_zero  # rank_zero_info writes to its ``log``, whichever it is now

    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")] + [rank_zero.log]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*is smaller than the logging interval.*")
            warnings.filterwarnings("ignore", message=".*LeafSpec.*")  # torch's pytree, inside Lightning
            warnings.filterwarnings("ignore", message=".*sync_dist=True.*")  # per-rank alpha and kNN are equal
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _recorder_class():
    import lightning as L

    class Recorder(L.Callback):
        """Per epoch: mean training loss, alpha, held-out kNN top-1; at the end of training (on
        the training device, before Lightning moves the module back): kNN and linear probe."""

        def __init__(self, result: RunResult, evaluation: EvalData, knn_k: int, epochs: int, say,
                     curve_evaluation: Optional[EvalData] = None) -> None:
            self.result, self.evaluation, self.knn_k, self.epochs, self.say = result, evaluation, knn_k, epochs, say
            self.curve_evaluation = evaluation if curve_evaluation is None else curve_evaluation
            self.total, self.count, self.start = 0.0, 0, 0.0

        def on_train_start(self, trainer, module) -> None:
            self.start = time.perf_counter()

        def on_train_epoch_start(self, trainer, module) -> None:
            self.total, self.count = 0.0, 0

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            self.total, self.count = self.total + float(outputs["loss"]), self.count + 1

        def on_train_epoch_end(self, trainer, module) -> None:
            result = self.result
            result.loss_per_epoch.append(self.total / max(self.count, 1))
            result.smoothing_per_epoch.append(float(getattr(module.criterion, "smoothing", 0.0)))
            knn = self.curve_evaluation.knn(module.model.backbone, module.device, self.knn_k)
            result.knn_per_epoch.append(knn)
            module.log("knn", knn, prog_bar=True, on_step=False, on_epoch=True)
            epoch = trainer.current_epoch + 1
            if self.say is not None and (epoch % max(1, self.epochs // 4) == 0 or epoch == self.epochs):
                self.say(f"{result.run} seed {result.seed}: epoch {epoch}/{self.epochs}, loss "
                         f"{result.loss_per_epoch[-1]:.3f}, kNN {100 * knn:.1f} %")

        def on_train_end(self, trainer, module) -> None:
            self.result.seconds = time.perf_counter() - self.start
            scores = self.evaluation.evaluate(module.model.backbone, module.device, self.knn_k)
            self.result.knn_top1, self.result.linear_top1 = scores["knn_top1"], scores["linear_top1"]

    return Recorder


def pretrain(recipe: Recipe, train_data: Dataset, evaluation: EvalData, *, seed: int, run: str,
             mask_own_keys: bool = False, transform: Optional[str] = None, accelerator: str = "cpu",
             devices: Union[int, str, Sequence[int]] = 1, strategy: str = "auto", workers: int = 0,
             knn_k: int = 20, progress: bool = True, say=None, description: str = "",
             chunk_size: Optional[int] = None,
             curve_evaluation: Optional[EvalData] = None) -> Tuple[Backbone, RunResult]:
    """Pre-train ``recipe`` with `PretrainModule` on Lightning's Trainer; kNN top-1 after every
    epoch, kNN and linear probe at the end.

    ``train_data``: ``(views, label)`` items with ``transform=None`` (e.g. `CachedViews`), or
    ``(PIL image, label)`` items with ``transform="recipe"`` (the recipe's lightly views, made on
    the fly). ``curve_evaluation``: the (smaller) split scored by the kNN of every epoch (default
    ``evaluation``). ``recipe.batch_size`` is the batch of one process. ``mask_own_keys`` (MoCo): queue
    entries of a query's own image are not its negatives. ``say``: a function for a few status
    lines (every quarter of the run) when there is no progress bar. ``chunk_size`` (MoCo, SimCLR):
    the cached-gradient step (`PretrainModule`).
    """
    import lightning as L

    from smooth_infonce.integrations.lightning.module import PretrainDataModule, build_module

    result = RunResult(run, seed, recipe.loss.smoothing, recipe.loss.mode if recipe.loss.smoothing else "-",
                       recipe.loss.neighbors_or_none, 0.0, 0.0, 0.0, masked=mask_own_keys, description=description)
    with quiet_lightning():
        L.seed_everything(seed, workers=True, verbose=False)  # the same initialisation and batches per seed
        module = build_module(recipe, mask_own_keys=mask_own_keys, chunk_size=chunk_size)
        data = PretrainDataModule(recipe, dataset=train_data, batch_size=recipe.batch_size, num_workers=workers,
                                  transform=transform)
        bar = progress and sys.stderr.isatty()
        recorder = _recorder_class()(result, evaluation, knn_k, recipe.epochs, say if progress and not bar else None,
                                     curve_evaluation)
        trainer = L.Trainer(accelerator=accelerator, devices=devices, strategy=strategy, max_epochs=recipe.epochs,
                            logger=False, enable_checkpointing=False, enable_model_summary=False,
                            enable_progress_bar=bar, callbacks=[recorder])
        trainer.fit(module, datamodule=data)
    return module.model.backbone, result
