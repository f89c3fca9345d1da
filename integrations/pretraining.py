"""The demo's pre-training loop: a recipe's lightly model trained with the `SmoothNTXentLoss`
drop-in, per step lr schedule and key-encoder update, per epoch alpha schedule and kNN.

Augmented views come from lightly's transforms, either fresh for every item (`OnTheFlyViews`)
or drawn from a fixed cache of augmented views per image (`CachedViews`, `build_view_cache`): on
a 2-core CPU the PIL augmentations cost more than a tiny network, and a cache makes every run of
a comparison see the same data.
"""

from __future__ import annotations

import random
import sys
import time
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .backbones import Backbone
from .digits import ImageList
from .evaluation import EvalData
from .recipes import Recipe, ViewSpec

# tqdm refreshes: smooth on a terminal, a line every few seconds in a log file.
BAR_INTERVAL = 0.2 if sys.stderr.isatty() else 5.0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)  # lightly's GaussianBlur draws from numpy
    torch.manual_seed(seed)


class OnTheFlyViews(Dataset):
    """Every item: fresh augmented views (lightly's MultiViewTransform) of one image."""

    def __init__(self, images: ImageList, transform) -> None:
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> List[Tensor]:
        return self.transform(self.images.image(index))


class CachedViews(Dataset):
    """Every item: two different views drawn from a fixed cache of augmented views per image."""

    def __init__(self, cache: Tensor, generator: torch.Generator) -> None:
        self.cache, self.generator = cache, generator  # cache: (images, views, 3, H, W)

    def __len__(self) -> int:
        return self.cache.shape[0]

    def __getitem__(self, index: int) -> List[Tensor]:
        first, second = torch.randperm(self.cache.shape[1], generator=self.generator)[:2].tolist()
        return [self.cache[index, first], self.cache[index, second]]


def build_view_cache(images: ImageList, views: ViewSpec, per_image: int, seed: int, progress: bool) -> Tensor:
    """(images, per_image, 3, H, W): ``per_image`` augmented global crops of every image."""
    from tqdm.auto import tqdm

    from .lightly_models import build_crop_transform

    one_view = build_crop_transform(views.global_crops, views)
    seed_everything(seed)
    cache = [torch.stack([one_view(images.image(i)) for _ in range(per_image)])
             for i in tqdm(range(len(images)), desc=f"augmenting ({per_image} views / image)",
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
    loss_per_epoch: List[float] = field(default_factory=list)
    knn_per_epoch: List[float] = field(default_factory=list)
    smoothing_per_epoch: List[float] = field(default_factory=list)


def pretrain(recipe: Recipe, train_views: Dataset, evaluation: EvalData, *, seed: int, run: str,
             device: str = "cpu", workers: int = 0, knn_k: int = 20,
             progress: bool = True) -> Tuple[Backbone, RunResult]:
    """Pre-train ``recipe``'s lightly model with the smooth-infonce drop-in loss; kNN top-1 after
    every epoch, kNN and linear probe at the end."""
    from tqdm.auto import tqdm

    from .lightly import build_loss
    from .lightly_models import build_model
    from .optim import build_optimizer

    seed_everything(seed)  # the same initialisation and batch order for every run of a seed
    model = build_model(recipe).to(device)
    criterion = build_loss(recipe).to(device)
    optimizer = build_optimizer(model, recipe.optimizer, recipe.batch_size)
    loader = DataLoader(train_views, batch_size=recipe.batch_size, shuffle=True, drop_last=True,
                        num_workers=workers, generator=torch.Generator().manual_seed(seed))
    steps_per_epoch = len(loader)
    weights = recipe.view_weights()
    result = RunResult(run, seed, recipe.loss.smoothing, recipe.loss.mode if recipe.loss.smoothing else "-",
                       recipe.loss.neighbors_or_none, 0.0, 0.0, 0.0)
    start = time.perf_counter()
    bar = tqdm(total=recipe.epochs * steps_per_epoch, desc=f"{run:>9} seed {seed}", unit="step",
               disable=not progress, leave=False, dynamic_ncols=True, mininterval=BAR_INTERVAL)
    step = 0
    for epoch in range(recipe.epochs):
        criterion.set_epoch(epoch)
        total, count = 0.0, 0
        for views in loader:
            lr = recipe.optimizer.learning_rate(step, steps_per_epoch=steps_per_epoch, epochs=recipe.epochs,
                                                batch_size=recipe.batch_size)
            for group in optimizer.param_groups:
                group["lr"] = lr
            views = [v.to(device, non_blocking=True) for v in views]
            if recipe.framework == "moco":
                model.update_key_encoder()
            loss = model.training_loss(views, criterion, weights)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, count, step = total + float(loss.detach()), count + 1, step + 1
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{total / count:.3f}", alpha=criterion.effective_smoothing,
                            refresh=False)
        result.loss_per_epoch.append(total / max(count, 1))
        result.smoothing_per_epoch.append(criterion.smoothing)
        result.knn_per_epoch.append(evaluation.knn(model.backbone, device, knn_k))
        bar.set_postfix(epoch=epoch, loss=f"{result.loss_per_epoch[-1]:.3f}", knn=f"{result.knn_per_epoch[-1]:.3f}",
                        refresh=False)
    bar.close()
    result.seconds = time.perf_counter() - start
    scores = evaluation.evaluate(model.backbone, device, knn_k)
    result.knn_top1, result.linear_top1 = scores["knn_top1"], scores["linear_top1"]
    return model.backbone, result
