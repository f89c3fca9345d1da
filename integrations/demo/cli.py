"""The main job: pre-train a lightweight network with lightly + smooth-infonce on real images that
ship with the install, and compare plain InfoNCE with smoothed InfoNCE on frozen features.

    smooth-infonce-demo                                   # digits, SimCLR, 3 seeds, ~4 min on 2 CPU cores
    smooth-infonce-demo --compare masking --seeds 0 1 2   # MoCo: own-image keys masked in the queue
    smooth-infonce-demo --epochs 100 --framework moco --seeds 0 1 2
    smooth-infonce-demo --data /path/to/image_folder --image-size 64 \\
        --backbone mobilenetv3_large_100 --accelerator gpu --devices 2 --strategy ddp

(``python -m smooth_infonce.integrations.demo`` is the same command.)

Data: scikit-learn's ``load_digits`` (1797 real 8 x 8 handwritten digits, 10 classes; no
download), upsampled to ``--image-size`` px and split 75 / 25 (stratified) into a pre-training /
memory split and a held-out test split. ``--data`` takes a torchvision ImageFolder instead, or
``fashion-mnist[:DIR]``: Fashion-MNIST's official 60,000 training images (``--max-images``: a
stratified subset of them) as pre-training / memory split and its 10,000 test images as the test
split, read from the four IDX files (`smooth_infonce.integrations.data.fashion_mnist`; Debian's
``apt-get install dataset-fashion-mnist`` by default, never downloaded).

The recipe is ``light_moco`` scaled down to the data (`demo_recipe`): tiny CNN, small head, short
queue, faster key momentum, higher lr; SimCLR by default (in-batch negatives learn fastest in a
20-epoch CPU run), MoCo with ``--framework moco``. Every run trains through the Lightning module
(`smooth_infonce.integrations.lightning.PretrainModule` on Lightning's ``Trainer``;
``--accelerator / --devices / --strategy`` go to the Trainer). Runs (same seed, same
initialisation, same views in the same batches):

- ``plain``: InfoNCE (alpha = 0);
- ``uniform``: alpha spread over all negatives;
- ``neighbors``: alpha on the k most similar negatives (light-moco's strategy);
- ``plain-masked``, ``uniform-masked``, ``neighbors-masked`` (MoCo): the same losses with a
  query's own image left out of its negatives (the queue stores each key's dataset index).

``--compare smoothing`` (the default) trains plain, uniform and neighbors; ``--compare masking``
trains MoCo's plain, plain-masked and neighbors-masked. Two reference rows need no training: the
randomly initialised network and the raw pixels. Evaluation on frozen backbone features: weighted
kNN top-1 (lightly's ``knn_predict``, the training split as memory) and a linear probe (logistic
regression) on the test split.

Outputs in ``--out``: ``results.md`` / ``results.csv`` / ``results.json`` (the table and every
run's history) and ``curves.png`` (training loss and kNN top-1 per epoch).

Augmented views: with ``--view-cache V`` (the default for digits), V augmented views of every
training image are made once with lightly's transforms and shared by all runs of a view sampling
(dino / swav: V global crops and 3 V local crops per image for each of baseline and SSLight); each
epoch draws two different global ones per image (and six different local ones). On a 2-core CPU
the PIL augmentations cost more than the tiny network, so this makes the comparison affordable and
identical in data for every run.
``--view-cache 0`` augments on the fly (the default for ``--data``).

Code: the images in `smooth_infonce.integrations.data.digits`, the Trainer call and the training-curve
callback in `smooth_infonce.integrations.demo.pretraining`, kNN and linear probe in
`smooth_infonce.integrations.demo.evaluation`; this module holds the run configuration, the report and
the command line.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib.util
import json
import math
import os
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

from smooth_infonce.integrations.data.digits import (
    NUM_DIGITS,
    digits_views,
    load_digits_images,
    load_image_folder,
    split_indices,
    stratified_subset,
)
from smooth_infonce.integrations.data.fashion_mnist import (
    FashionMNISTError,
    fashion_mnist_images,
    fashion_mnist_views,
    is_data_spec,
    parse_data_spec,
)
from smooth_infonce.integrations.recipes import CropSpec, Recipe, ViewSpec, get_preset

from .evaluation import EvalData, eval_transform
from .pretraining import CachedViews, RunResult, build_view_cache, pretrain, seed_everything

# The [demo] extra, checked without importing it (Lightning and lightly load when training starts,
# after the first status line).
_MISSING = [name for name in ("lightly", "lightning", "sklearn", "tqdm", "matplotlib", "torchvision")
            if importlib.util.find_spec(name) is None]
if _MISSING:
    raise ImportError(f"smooth-infonce-demo needs the demo extra: pip install 'smooth-infonce[demo]' "
                      f"(missing: {', '.join(_MISSING)})")


class RunSpec(NamedTuple):
    """One training run of a comparison: its loss and whether own queue keys are masked."""

    smoothing: bool
    mode: str  # "uniform" | "neighbors" (ignored without smoothing)
    masked: bool


RUN_SPECS: Dict[str, RunSpec] = {
    "plain": RunSpec(False, "neighbors", False),
    "uniform": RunSpec(True, "uniform", False),
    "neighbors": RunSpec(True, "neighbors", False),
    "plain-masked": RunSpec(False, "neighbors", True),
    "uniform-masked": RunSpec(True, "uniform", True),
    "neighbors-masked": RunSpec(True, "neighbors", True),
}
RUNS = ("plain", "uniform", "neighbors")  # --compare smoothing (the default)
MASKING_RUNS = ("plain", "plain-masked", "neighbors-masked")  # --compare masking (MoCo)
# --framework dino | swav: SSLight's view sampling against its baseline (the presets
# <framework>_baseline and sslight_<framework>, crops scaled to the image size)
VIEW_RUNS = ("baseline", "sslight")
COMPARISONS = {"smoothing": RUNS, "masking": MASKING_RUNS, "views": VIEW_RUNS}
CONTRASTIVE_FRAMEWORKS, MULTICROP_FRAMEWORKS = ("simclr", "moco"), ("dino", "swav")
DEFAULT_LR_PER_256 = {"simclr": 0.6, "moco": 0.12, "dino": 0.48, "swav": 0.3}  # dino, swav: the presets' (LARS)
ACCELERATORS = ("cpu", "gpu", "cuda", "mps", "auto")
MIN_IMAGE_SIZE = 8  # smaller views carry next to nothing to learn from (a digit is 8 x 8 px)


@dataclass
class DemoConfig:
    """Everything a demo run depends on (the command-line flags)."""

    framework: str = "simclr"
    epochs: int = 20
    batch_size: int = 128
    backbone: str = "tiny_cnn"
    width: int = 16
    image_size: int = 16
    temperature: float = 0.2
    smoothing: float = 0.2
    neighbors: int = 5
    queue_size: int = 512
    key_momentum: float = 0.99
    lr_per_256: Optional[float] = None
    weight_decay: float = 5e-4
    runs: Tuple[str, ...] = RUNS
    seeds: Tuple[int, ...] = (0, 1, 2)
    data: Optional[str] = None
    max_images: Optional[int] = None
    view_cache: Optional[int] = None
    knn_k: int = 20
    accelerator: str = "cpu"
    devices: str = "1"
    strategy: str = "auto"
    workers: int = 0
    chunk_size: Optional[int] = None
    threads: Optional[int] = None
    out: str = "smooth_infonce_demo"
    plot: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        self.runs = tuple(self.runs)
        self.seeds = tuple(self.seeds)
        if self.framework in MULTICROP_FRAMEWORKS:
            if self.chunk_size is not None:
                raise ValueError("--chunk-size is for simclr and moco (dino and swav have no cached-gradient step)")
            if set(self.runs) - set(VIEW_RUNS):
                raise ValueError(f"--framework {self.framework} compares view sampling: runs from {VIEW_RUNS}, "
                                 f"got {list(self.runs)}")
            if self.lr_per_256 is None:
                self.lr_per_256 = DEFAULT_LR_PER_256[self.framework]
        known = VIEW_RUNS if self.framework in MULTICROP_FRAMEWORKS else tuple(RUN_SPECS)
        unknown = set(self.runs) - set(known)
        if unknown:
            raise ValueError(f"unknown runs {sorted(unknown)} for --framework {self.framework}; choose from "
                             f"{tuple(RUN_SPECS)} (simclr, moco) or {VIEW_RUNS} (dino, swav)")
        masked = [run for run in self.runs if run in RUN_SPECS and RUN_SPECS[run].masked]
        if masked and self.framework != "moco":
            raise ValueError(f"runs {masked} mask own keys in the MoCo queue: they need --framework moco")
        if self.lr_per_256 is None:  # tuned on the digits: MoCo diverges at SimCLR's rate
            self.lr_per_256 = DEFAULT_LR_PER_256[self.framework]
        if self.threads is None and self.accelerator == "cpu" and self.backbone == "tiny_cnn":
            # Small convolutions gain little from a second thread, and on a busy 2-core machine
            # OpenMP threads wait on each other: one thread measured 4x faster there.
            self.threads = 1
        if self.view_cache is None:  # caching pays off for the small built-in data sets
            self.view_cache = 0 if self.data and not is_data_spec(self.data) else 8
        if self.view_cache == 1:
            raise ValueError("--view-cache needs at least 2 views per image (or 0: augment on the fly)")

    def trainer_devices(self):
        """``devices`` for Lightning: "auto", a count, or a list of device indices ("0,1")."""
        if self.devices == "auto":
            return "auto"
        if "," in self.devices:
            return [int(d) for d in self.devices.split(",") if d]
        return int(self.devices)

    def eval_device(self) -> str:
        """Where the reference rows are scored (the trained runs: on their training device)."""
        if self.accelerator in ("gpu", "cuda") or (self.accelerator == "auto" and torch.cuda.is_available()):
            return "cuda"
        if self.accelerator == "mps":
            return "mps"
        return "cpu"


# --- recipe ------------------------------------------------------------------------------------------

def demo_recipe(config: DemoConfig, run: str, views: ViewSpec) -> Recipe:
    """``light_moco`` scaled down to a CPU-sized run (every change is an override); for dino and
    swav `multicrop_recipe`."""
    if config.framework in MULTICROP_FRAMEWORKS:
        return multicrop_recipe(config, run, views)
    spec = RUN_SPECS[run]
    return get_preset(
        "light_moco",
        name=f"demo_{config.framework}_{run}",
        framework=config.framework,
        backbone=dict(name=config.backbone, cifar_stem=True,
                      kwargs={"width": config.width} if config.backbone == "tiny_cnn" else {}),
        head=dict(hidden_dim=256, output_dim=64, num_layers=2, batch_norm=config.framework == "simclr"),
        loss=dict(temperature=config.temperature, smoothing=config.smoothing if spec.smoothing else 0.0,
                  mode=spec.mode, neighbors=config.neighbors, schedule="constant", warmup_epochs=0),
        moco=dict(queue_size=config.queue_size, key_momentum=config.key_momentum),
        optimizer=dict(name="sgd", lr_per_256=config.lr_per_256, weight_decay=config.weight_decay,
                       warmup_epochs=1, exclude_bias_norm=True, exclude_depthwise=True),
        views=views,
        epochs=config.epochs,
        batch_size=config.batch_size,
    )


# SSLight's presets per framework: (baseline view sampling, SSLight's view sampling)
VIEW_PRESETS = {"moco": ("sslight_baseline", "sslight_moco"), "dino": ("dino_baseline", "sslight_dino"),
                "swav": ("swav_baseline", "sslight_swav")}


def multicrop_recipe(config: DemoConfig, run: str, views: ViewSpec) -> Recipe:
    """SSLight's MoCo, DINO or SwAV preset (``run``: ``baseline`` or ``sslight``) scaled down to the data:
    its crop scales, local-crop count and pair weights as published, crop sizes scaled from 224 px
    to ``--image-size`` (SSLight's 128 px locals -> 9 px at 16 px, the baseline's 96 px -> 7 px),
    ``views``' photometric augmentations, the demo's small network and head, and the preset's
    optimiser (LARS, weight decay 1e-6) with 1 warm-up epoch. Prototypes scale with the classes
    (ImageNet's 1000 -> 10 digits: DINO 64 instead of 4096, SwAV 30 instead of 3000). A 20-epoch run
    of about 10 steps per epoch needs a faster teacher (EMA from 0.99, not 0.996), a shorter
    teacher-temperature warm-up and, for SwAV, a short queue from epoch 5; MoCo (multi-crop queries,
    the demo's queue and key momentum) is for the Fashion-MNIST benchmark."""
    preset = get_preset(VIEW_PRESETS[config.framework][VIEW_RUNS.index(run)])
    published, size = preset.views, config.image_size
    local = published.local_crops
    scaled_views = dataclasses.replace(
        views, global_crops=CropSpec(2, size, published.global_crops.scale),
        local_crops=CropSpec(local.count, max(4, round(size * local.size / 224)), local.scale),
        loss_weights=published.loss_weights)
    epochs = config.epochs
    return preset.override(
        name=f"demo_{config.framework}_{run}",
        backbone=dict(name=config.backbone, cifar_stem=True,
                      kwargs={"width": config.width} if config.backbone == "tiny_cnn" else {}),
        head=dict(hidden_dim=256, output_dim=64),
        dino=dict(num_prototypes=64, teacher_momentum=0.99, warmup_teacher_temperature_epochs=max(1, epochs // 4)),
        swav=dict(num_prototypes=30, queue_size=4 * config.batch_size, queue_start_epoch=min(5, epochs)),
        moco=dict(queue_size=config.queue_size, key_momentum=config.key_momentum),
        optimizer=dict(lr_per_256=config.lr_per_256, warmup_epochs=1),
        views=scaled_views,
        epochs=epochs,
        batch_size=config.batch_size,
    )


def describe_views(recipe: Recipe) -> str:
    """A multi-crop run's loss and view sampling, for the table."""
    views = recipe.views
    crops = " + ".join(f"{c.count} x {c.size} px ({c.scale[0]:g}, {c.scale[1]:g})"
                       for c in (views.global_crops, views.local_crops))
    weights = "plain mean" if views.loss_weights is None else "lambda ({:g}, {:g})".format(*views.loss_weights)
    name = {"dino": "DINO", "swav": "SwAV", "moco": "MoCo"}[recipe.framework]
    return f"{name}, {crops}, {weights}"


# --- reporting ------------------------------------------------------------------------------------------------

def describe_loss(result: RunResult) -> str:
    if result.description:
        return result.description
    target = "uniform" if result.neighbors is None else f"k = {result.neighbors} neighbours"
    loss = "InfoNCE" if result.smoothing == 0 else f"smoothed, alpha {result.smoothing:g}, {target}"
    return loss + (", own keys masked" if result.masked else "")


def summarise(results: Sequence[RunResult], references: Dict[str, Dict[str, float]]) -> List[Dict[str, str]]:
    """One row per run (mean +- std over seeds) and per reference."""

    def fmt(values: Sequence[float], percent: bool = True) -> str:
        scale = 100.0 if percent else 1.0
        mean = statistics.fmean(values) * scale
        if len(values) == 1:
            return f"{mean:.1f}" if percent else f"{mean:.3f}"
        spread = statistics.stdev(values) * scale
        return f"{mean:.1f} ± {spread:.1f}" if percent else f"{mean:.3f} ± {spread:.3f}"

    rows = []
    for name, scores in references.items():
        rows.append({"run": name, "loss": "-", "kNN top-1 (%)": f"{100 * scores['knn_top1']:.1f}",
                     "linear top-1 (%)": f"{100 * scores['linear_top1']:.1f}", "final train loss": "-",
                     "train time (s)": "-"})
    for run in dict.fromkeys(r.run for r in results):  # in the order they ran
        mine = [r for r in results if r.run == run]
        rows.append({"run": run, "loss": describe_loss(mine[0]),
                     "kNN top-1 (%)": fmt([r.knn_top1 for r in mine]),
                     "linear top-1 (%)": fmt([r.linear_top1 for r in mine]),
                     "final train loss": fmt([r.loss_per_epoch[-1] for r in mine], percent=False),
                     "train time (s)": f"{statistics.fmean(r.seconds for r in mine):.0f}"})
    return rows


def markdown_table(rows: Sequence[Dict[str, str]]) -> str:
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(row[c] for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def save_outputs(out: Path, config: DemoConfig, rows, results: Sequence[RunResult], references, header: str,
                 plot: bool) -> List[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    (out / "results.md").write_text(f"{header}\n\n{markdown_table(rows)}\n")
    with open(out / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / "results.json").write_text(json.dumps(
        {"config": asdict(config), "table": rows, "references": references,
         "runs": [asdict(r) for r in results]}, indent=2))
    written += [out / "results.md", out / "results.csv", out / "results.json"]
    if plot and results:
        written.append(plot_curves(out / "curves.png", results, references))
    return written


COLOURS = {"plain": "tab:blue", "uniform": "tab:orange", "neighbors": "tab:green", "plain-masked": "tab:purple",
           "uniform-masked": "tab:brown", "neighbors-masked": "tab:red", "baseline": "tab:grey", "sslight": "tab:cyan"}


def plot_curves(path: Path, results: Sequence[RunResult], references) -> Path:
    from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend alone

    figure = Figure(figsize=(11, 4))
    loss_axis, knn_axis = figure.subplots(1, 2)
    for result in results:
        epochs = range(1, len(result.loss_per_epoch) + 1)
        label = f"{result.run} (seed {result.seed})"
        loss_axis.plot(epochs, result.loss_per_epoch, color=COLOURS[result.run], label=label, alpha=0.85)
        knn_axis.plot(epochs, [100 * v for v in result.knn_per_epoch], color=COLOURS[result.run], label=label,
                      alpha=0.85)
    for name, style in (("random init", ":"), ("raw pixels", "--")):
        if name in references:
            knn_axis.axhline(100 * references[name]["knn_top1"], color="grey", linestyle=style, label=name)
    loss_axis.set(xlabel="epoch", ylabel="training loss", title="training loss (smoothed targets differ)")
    knn_axis.set(xlabel="epoch", ylabel="kNN top-1 (%)", title="held-out kNN top-1 of the backbone")
    for axis in (loss_axis, knn_axis):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return path


# --- the job ------------------------------------------------------------------------------------------------

def is_rank_zero() -> bool:
    """False in the extra processes of a multi-device run (they train, rank 0 reports)."""
    rank_zero = sys.modules.get("lightning.fabric.utilities.rank_zero")
    if rank_zero is not None:
        return getattr(rank_zero.rank_zero_only, "rank", 0) == 0
    return all(int(os.environ.get(name, 0)) == 0 for name in ("RANK", "LOCAL_RANK", "NODE_RANK"))


def status_printer(config: DemoConfig) -> Callable[[str], None]:
    start = time.perf_counter()

    def say(message: str) -> None:
        if config.progress and is_rank_zero():
            print(f"[{time.perf_counter() - start:5.0f} s] {message}", file=sys.stderr, flush=True)

    return say


def run_demo(config: DemoConfig) -> Dict:
    """Run the comparison; return {"rows", "results", "references", "files", "seconds", "header"}."""
    threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        return _run_demo(config)
    finally:
        torch.set_num_threads(threads)


def _run_demo(config: DemoConfig) -> Dict:
    start = time.perf_counter()
    say = status_printer(config)
    runs = ", ".join(config.runs)
    say(f"{config.framework}, runs {runs}, seeds {list(config.seeds)}, {config.epochs} epochs; "
        f"training on {config.accelerator} (devices {config.devices}, strategy {config.strategy})")
    if is_data_spec(config.data):
        directory = parse_data_spec(config.data)
        say(f"reading Fashion-MNIST's IDX files ({directory or 'the default location'})")
        train, test = fashion_mnist_images("train", directory), fashion_mnist_images("test", directory)
        if config.max_images:
            train = train.subset(stratified_subset(train.labels, config.max_images, seed=0))
        views = fashion_mnist_views(config.image_size)
        source = f"Fashion-MNIST at {config.image_size} px (official test split)"
    elif config.data:
        say(f"reading the ImageFolder {config.data}")
        images = load_image_folder(config.data)
        views = ViewSpec(global_crops=CropSpec(2, config.image_size, (0.2, 1.0)))  # MoCo v2 augmentations
        source = f"ImageFolder {config.data}"
    else:
        say(f"loading scikit-learn's digits at {config.image_size} px")
        images = load_digits_images(config.image_size)
        views = digits_views(config.image_size)
        source = f"scikit-learn digits upsampled to {config.image_size} px"
    if not is_data_spec(config.data):
        if config.max_images:
            keep = sorted(random.Random(0).sample(range(len(images)), min(config.max_images, len(images))))
            images = images.subset(keep)
        train_idx, test_idx = split_indices(images.labels, 0.25, seed=0)
        train, test = images.subset(train_idx), images.subset(test_idx)
    evaluation = EvalData.from_images(train, test, eval_transform(config.image_size, views))

    # References that need no training: the randomly initialised network and the raw pixels.
    say(f"{len(train)} training / {len(test)} test images; scoring the reference rows (random init, raw pixels)")
    device = config.eval_device()
    seed_everything(config.seeds[0])
    random_backbone = demo_recipe(config, config.runs[0], views).backbone.build().to(device)
    references = {
        "random init": evaluation.evaluate(random_backbone, device, config.knn_k),
        "raw pixels": evaluation.raw_pixels(config.knn_k),
    }

    caches: Dict[Tuple[CropSpec, ...], List[Tuple[torch.Tensor, int]]] = {}
    if config.view_cache:  # one cache per view sampling (multi-crop runs differ in theirs)
        for run in config.runs:
            recipe = demo_recipe(config, run, views)
            crops = recipe.views.crop_groups()
            if crops not in caches:
                say(f"augmenting: {config.view_cache} views per crop group of every training image ({run})")
                caches[crops] = [(build_view_cache(train, recipe.views, config.view_cache * max(1, crop.count // 2),
                                                   seed=0, progress=config.progress and is_rank_zero(), crop=crop),
                                  crop.count) for crop in crops]
    results: List[RunResult] = []
    for seed in config.seeds:
        for run in config.runs:
            recipe = demo_recipe(config, run, views)
            # a fresh view stream per run: every run of a seed sees the same views in the same batches
            if config.view_cache:
                data, transform = CachedViews(caches[recipe.views.crop_groups()], train.labels, seed), None
            else:
                data, transform = train, "recipe"
            say(f"training {run} (seed {seed}, {config.epochs} epochs)")
            _, result = pretrain(recipe, data, evaluation, seed=seed, run=run,
                                 mask_own_keys=run in RUN_SPECS and RUN_SPECS[run].masked, transform=transform,
                                 description=describe_views(recipe) if run in VIEW_RUNS else "",
                                 chunk_size=config.chunk_size,
                                 accelerator=config.accelerator, devices=config.trainer_devices(),
                                 strategy=config.strategy, workers=config.workers, knn_k=config.knn_k,
                                 progress=config.progress, say=say)
            results.append(result)
            say(f"{run} seed {seed}: kNN {100 * result.knn_top1:.1f} %, linear {100 * result.linear_top1:.1f} %, "
                f"{result.seconds:.0f} s")

    rows = summarise(results, references)
    seconds = time.perf_counter() - start
    header = (f"# smooth-infonce demo: {config.framework}, {config.backbone} "
              f"({'width ' + str(config.width) + ', ' if config.backbone == 'tiny_cnn' else ''}"
              f"{config.image_size} px), {config.epochs} epochs, batch {config.batch_size}"
              f"{', tau ' + str(config.temperature) if config.framework in CONTRASTIVE_FRAMEWORKS else ''}"
              f"{', queue ' + str(config.queue_size) if config.framework == 'moco' else ''}, seeds {list(config.seeds)}"
              f"\n\nData: {source}; {len(train)} pre-training / memory images, {len(test)} held-out test images. "
              f"Trained by Lightning ({config.accelerator}). Frozen backbone features; kNN k = {config.knn_k}. "
              f"Total wall time {seconds:.0f} s. "
              + ("Smoothed runs minimise a different target, so their training loss is not comparable with "
                 "InfoNCE's." if config.framework in CONTRASTIVE_FRAMEWORKS else
                 "The runs weigh their pairs differently, so their training losses are not comparable."))
    files = save_outputs(Path(config.out), config, rows, results, references, header, config.plot) \
        if is_rank_zero() else []
    return {"rows": rows, "results": results, "references": references, "files": files, "seconds": seconds,
            "header": header}


# --- the command line ------------------------------------------------------------------------------------------

def int_at_least(minimum: int, what: str):
    """An argparse type: an integer >= ``minimum``, or a one-line usage error."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    return parse


positive_int = int_at_least(1, "a positive integer")
non_negative_int = int_at_least(0, "an integer >= 0")


def float_in(low: float, high: float, low_open: bool = False, high_open: bool = False):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        below = value <= low if low_open else value < low
        above = value >= high if high_open else value > high
        if not math.isfinite(value) or below or above:
            interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            raise argparse.ArgumentTypeError(f"expected a number in {interval}, got {text}")
        return value

    return parse


def devices_arg(text: str) -> str:
    if text == "auto" or all(part.strip().isdigit() for part in text.split(",") if part) and text.strip(","):
        if text != "auto" and "," not in text and int(text) < 1:
            raise argparse.ArgumentTypeError(f"expected a positive count, 'auto' or indices like 0,1; got {text}")
        return text
    raise argparse.ArgumentTypeError(f"expected a positive count, 'auto' or device indices like 0,1; got {text!r}")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown where there is one to show (not for switches, nor where the help says it)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.nargs == 0 or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    d = DemoConfig()
    parser = argparse.ArgumentParser(prog="smooth-infonce-demo", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    what = parser.add_argument_group("what to compare")
    what.add_argument("--compare", choices=tuple(COMPARISONS), default=None,
                      help="smoothing (default for simclr, moco): plain vs uniform vs neighbour-smoothed InfoNCE; "
                           "masking (MoCo): plain MoCo vs MoCo with own-image keys masked in the queue vs smoothed "
                           "MoCo with masking; views (default for dino, swav): SSLight's view sampling vs its "
                           "baseline")
    what.add_argument("--runs", nargs="+", choices=tuple(RUN_SPECS) + VIEW_RUNS, default=None, metavar="RUN",
                      help=f"the runs to train instead of those of --compare, from {', '.join(RUN_SPECS)} "
                           f"(*-masked: MoCo only), or {', '.join(VIEW_RUNS)} (dino, swav)")
    what.add_argument("--framework", choices=CONTRASTIVE_FRAMEWORKS + MULTICROP_FRAMEWORKS, default=None,
                      help="SimCLR (in-batch negatives), MoCo (momentum key encoder + queue), with (smoothed) "
                           "InfoNCE; or DINO / SwAV with SSLight's pair-weighted multi-crop loss; default simclr, "
                           "moco with --compare masking, dino with --compare views")
    what.add_argument("--seeds", nargs="+", type=non_negative_int, default=list(d.seeds),
                      help="one run per seed and run; the table gives mean ± std over the seeds")
    train = parser.add_argument_group("training")
    train.add_argument("--epochs", type=positive_int, default=d.epochs, help="pre-training epochs per run")
    train.add_argument("--batch-size", type=positive_int, default=d.batch_size,
                       help="images per step (per process with --devices > 1)")
    train.add_argument("--backbone", default=d.backbone,
                       help="a registered backbone (tiny_cnn, resnet18, mobilenetv3_large_100, ...) or timm:<name>")
    train.add_argument("--width", type=positive_int, default=d.width, help="tiny_cnn width")
    train.add_argument("--image-size", type=int_at_least(MIN_IMAGE_SIZE, f"a side of at least {MIN_IMAGE_SIZE} px"),
                       default=d.image_size, help="side of the training views in px (the digits are 8 px originals)")
    train.add_argument("--temperature", type=float_in(0, math.inf, low_open=True, high_open=True),
                       default=d.temperature, help="InfoNCE temperature tau")
    train.add_argument("--smoothing", type=float_in(0, 1, high_open=True), default=d.smoothing,
                       help="alpha of the smoothed runs")
    train.add_argument("--neighbors", type=positive_int, default=d.neighbors,
                       help="k of the neighbour-smoothed runs (at most the queue size, or the 2B - 2 in-batch "
                            "negatives of SimCLR)")
    train.add_argument("--queue-size", type=positive_int, default=d.queue_size, help="MoCo queue (memory bank) keys")
    train.add_argument("--key-momentum", type=float_in(0, 1), default=d.key_momentum,
                       help="MoCo key-encoder momentum")
    train.add_argument("--lr-per-256", type=float_in(0, math.inf, low_open=True, high_open=True), default=None,
                       help=f"peak lr per 256 images (SGD; LARS for dino and swav; default: {DEFAULT_LR_PER_256})")
    train.add_argument("--weight-decay", type=float_in(0, math.inf, high_open=True), default=d.weight_decay,
                       help="SGD weight decay of simclr and moco (not on biases and norm layers; dino and swav "
                            "keep their preset's LARS with 1e-6)")
    train.add_argument("--chunk-size", type=positive_int, default=None,
                       help="simclr, moco: cached-gradient steps of this many images per encoder pass (the "
                            "whole batch's loss and gradient in one chunk's activation memory; batch norm sees "
                            "each chunk's statistics); default: one pass")
    data = parser.add_argument_group("data")
    data.add_argument("--data", default=None, metavar="DIR",
                      help="an ImageFolder directory (one sub-folder per class), or fashion-mnist[:DIR] (the "
                           "four IDX files; default /usr/share/datasets/fashion-mnist from Debian's "
                           "dataset-fashion-mnist), instead of the digits")
    data.add_argument("--max-images", type=positive_int, default=None,
                      help="use a random subset of the images (Fashion-MNIST: a stratified subset of the "
                           "training split; the test split stays whole)")
    data.add_argument("--view-cache", type=non_negative_int, default=None,
                      help="augmented views cached per image and crop group (local crops: this times half their "
                           "count; 0: augment on the fly); default 8 for the digits and Fashion-MNIST, 0 for an "
                           "ImageFolder")
    data.add_argument("--knn-k", type=positive_int, default=d.knn_k, help="neighbours of the kNN evaluation")
    hardware = parser.add_argument_group("hardware (passed to Lightning's Trainer)")
    hardware.add_argument("--accelerator", choices=ACCELERATORS, default=None,
                          help="Lightning accelerator (default: cpu)")
    hardware.add_argument("--device", choices=("cpu", "cuda", "mps"), default=None,
                          help="same as --accelerator (kept for older commands)")
    hardware.add_argument("--devices", type=devices_arg, default=d.devices,
                          help="Lightning devices: a count, 'auto' or indices like 0,1")
    hardware.add_argument("--strategy", default=d.strategy,
                          help="Lightning strategy (auto, ddp, ddp_spawn, ...)")
    hardware.add_argument("--workers", type=non_negative_int, default=d.workers, help="DataLoader workers per process")
    hardware.add_argument("--threads", type=positive_int, default=None,
                          help="torch CPU threads (default: 1 for tiny_cnn on the CPU, else torch's default)")
    output = parser.add_argument_group("output")
    output.add_argument("--out", default=d.out, help="output folder (table, runs as JSON, curves.png)")
    output.add_argument("--no-plot", dest="plot", action="store_false", help="do not draw curves.png")
    output.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress bars or status lines (the table is still printed)")
    return parser


def count_train_images(config: DemoConfig, images: int) -> int:
    images = min(images, config.max_images or images)
    if is_data_spec(config.data):  # the official test split is separate
        return images
    return images - math.ceil(0.25 * images)  # split_indices' test share


def parse_args(argv: Optional[Sequence[str]] = None) -> DemoConfig:
    """The flags as a `DemoConfig`; a bad combination exits like argparse (status 2, one line)."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    compare, device = args.pop("compare"), args.pop("device")
    if compare is None:
        compare = "views" if args["framework"] in MULTICROP_FRAMEWORKS else "smoothing"
    if args["runs"] is None:
        args["runs"] = list(COMPARISONS[compare])
    if args["framework"] is None:
        if any(run in VIEW_RUNS for run in args["runs"]):
            args["framework"] = "dino"
        else:
            args["framework"] = "moco" if any(RUN_SPECS[r].masked for r in args["runs"]) else "simclr"
    if (compare == "views") != (args["framework"] in MULTICROP_FRAMEWORKS):
        parser.error(f"--compare {compare} does not apply to --framework {args['framework']}: views compares dino "
                     "or swav runs, smoothing and masking compare simclr or moco runs")
    if device is not None and args["accelerator"] is not None and args["accelerator"] != device:
        parser.error(f"--device {device} and --accelerator {args['accelerator']} disagree; give one of them")
    args["accelerator"] = args["accelerator"] or device or "cpu"
    check_hardware(parser, args)
    if compare == "masking" and args["framework"] != "moco":
        parser.error("--compare masking masks own keys in the MoCo queue: use --framework moco")
    try:
        config = DemoConfig(**args)
    except ValueError as err:
        parser.error(str(err))
    check_data(parser, config)
    return config


def check_hardware(parser: argparse.ArgumentParser, args: Dict) -> None:
    accelerator = args["accelerator"]
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        parser.error(f"--accelerator/--device {accelerator}: no CUDA device is available here (torch "
                     f"{torch.__version__}, CUDA build {torch.version.cuda}); use --accelerator cpu")
    if accelerator == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        parser.error("--accelerator mps: no Apple MPS device is available here; use --accelerator cpu")
    if args["strategy"] != "auto":
        from lightning.pytorch.strategies import StrategyRegistry

        if args["strategy"] not in StrategyRegistry.available_strategies():
            parser.error(f"--strategy {args['strategy']}: not a Lightning strategy; choose auto or one of "
                         f"{', '.join(s for s in StrategyRegistry.available_strategies() if s.startswith('ddp'))}, ...")
    if args["devices"] not in ("auto", "1") and accelerator == "cpu" and "," in args["devices"]:
        parser.error("--devices with indices needs an accelerator with devices (gpu); on the CPU give a count")


def check_data(parser: argparse.ArgumentParser, config: DemoConfig) -> None:
    from smooth_infonce.integrations.recipes.backbones import list_backbones

    if not config.backbone.startswith("timm:") and config.backbone not in list_backbones():
        parser.error(f"--backbone {config.backbone}: unknown; choose from {', '.join(list_backbones())} or timm:<name>")
    if is_data_spec(config.data):
        try:
            images = len(fashion_mnist_images("train", parse_data_spec(config.data)))
        except (FashionMNISTError, ValueError) as err:
            parser.error(f"--data {config.data}: {err}")
    elif config.data:
        folder = Path(config.data)
        if not folder.exists():
            parser.error(f"--data {config.data}: no such directory")
        if not folder.is_dir():
            parser.error(f"--data {config.data}: not a directory (an ImageFolder: one sub-folder per class)")
        try:
            from torchvision.datasets import ImageFolder

            images = len(ImageFolder(str(folder)).samples)
        except (FileNotFoundError, RuntimeError, OSError) as err:
            parser.error(f"--data {config.data}: not an ImageFolder (one sub-folder of images per class): {err}")
    else:
        images = NUM_DIGITS
    train = count_train_images(config, images)
    if train < 2:
        parser.error(f"only {train} training image(s): use more images")
    if config.batch_size > train:
        parser.error(f"--batch-size {config.batch_size} is larger than the {train} training images "
                     f"(every epoch drops its last incomplete batch)")
    smoothed = [r for r in config.runs
                if r in RUN_SPECS and RUN_SPECS[r].smoothing and RUN_SPECS[r].mode == "neighbors"]
    if smoothed and config.framework == "moco" and config.neighbors > config.queue_size:
        parser.error(f"--neighbors {config.neighbors} is larger than the MoCo queue (--queue-size "
                     f"{config.queue_size})")
    negatives = 2 * config.batch_size - 2
    if smoothed and config.framework == "simclr" and config.neighbors > negatives:
        parser.error(f"--neighbors {config.neighbors} is more than the {negatives} in-batch negatives of a "
                     f"batch of {config.batch_size} (SimCLR: 2B - 2)")
    if config.knn_k > train:
        parser.error(f"--knn-k {config.knn_k} is larger than the {train} training images")
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        parser.error(f"--out {config.out}: exists and is not a directory")


def main(argv: Optional[Sequence[str]] = None) -> int:
    config = parse_args(argv)
    outcome = run_demo(config)
    if is_rank_zero():
        print(outcome["header"])
        print()
        print(markdown_table(outcome["rows"]))
        print()
        print("Wrote " + ", ".join(str(p) for p in outcome["files"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
