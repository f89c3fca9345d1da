"""The main job: pre-train a lightweight network with lightly + smooth-infonce on real images that
ship with the install, and compare plain InfoNCE with smoothed InfoNCE on frozen features.

    python -m smooth_infonce.integrations.demo                # digits, SimCLR, ~2-3 min on 2 CPU cores
    python -m smooth_infonce.integrations.demo --epochs 100 --framework moco --seeds 0 1 2
    python -m smooth_infonce.integrations.demo --data /path/to/image_folder --image-size 64 \\
        --backbone mobilenetv3_large_100 --device cuda

Data: scikit-learn's ``load_digits`` (1797 real 8 x 8 handwritten digits, 10 classes; no
download), upsampled to ``--image-size`` px and split 75 / 25 (stratified) into a pre-training /
memory split and a held-out test split. ``--data`` takes a torchvision ImageFolder instead.

The recipe is ``light_moco`` scaled down to the data (`demo_recipe`): tiny CNN, small head, short
queue, faster key momentum, higher lr; SimCLR by default (in-batch negatives learn fastest in a
20-epoch CPU run), MoCo with ``--framework moco``. Runs (same seed, same initialisation, same batches):

- ``plain``: InfoNCE (alpha = 0);
- ``uniform``: alpha spread over all negatives;
- ``neighbors``: alpha on the k most similar negatives (light-moco's strategy);

plus two reference rows that need no training: the randomly initialised network and the raw
pixels. Evaluation on frozen backbone features: weighted kNN top-1 (lightly's ``knn_predict``,
the training split as memory) and a linear probe (logistic regression) on the test split.

Outputs in ``--out``: ``results.md`` / ``results.csv`` / ``results.json`` (the table and every
run's history) and ``curves.png`` (training loss and kNN top-1 per epoch).

Augmented views: with ``--view-cache V`` (the default for digits), V augmented views of every
training image are made once with lightly's transforms and shared by all runs; each epoch draws
two different ones per image. On a 2-core CPU the PIL augmentations cost more than the tiny
network, so this makes the comparison affordable and identical in data for every run.
``--view-cache 0`` augments on the fly (the default for ``--data``).

Code: the images in `smooth_infonce.integrations.digits`, the training loop in
`smooth_infonce.integrations.pretraining`, kNN and linear probe in
`smooth_infonce.integrations.evaluation`; this module holds the run configuration, the report and
the command line.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset

from .digits import digits_views, load_digits_images, load_image_folder, split_indices
from .evaluation import EvalData, eval_transform
from .pretraining import CachedViews, OnTheFlyViews, RunResult, build_view_cache, pretrain, seed_everything
from .recipes import CropSpec, Recipe, ViewSpec, get_preset

RUNS = ("plain", "uniform", "neighbors")
DEFAULT_LR_PER_256 = {"simclr": 0.6, "moco": 0.12}


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
    seeds: Tuple[int, ...] = (0,)
    data: Optional[str] = None
    max_images: Optional[int] = None
    view_cache: Optional[int] = None
    knn_k: int = 20
    device: str = "cpu"
    workers: int = 0
    threads: Optional[int] = None
    out: str = "smooth_infonce_demo"
    plot: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        self.runs = tuple(self.runs)
        self.seeds = tuple(self.seeds)
        unknown = set(self.runs) - set(RUNS)
        if unknown:
            raise ValueError(f"unknown runs {sorted(unknown)}; choose from {RUNS}")
        if self.lr_per_256 is None:  # tuned on the digits: MoCo diverges at SimCLR's rate
            self.lr_per_256 = DEFAULT_LR_PER_256[self.framework]
        if self.threads is None and self.device == "cpu" and self.backbone == "tiny_cnn":
            # Small convolutions gain little from a second thread, and on a busy 2-core machine
            # OpenMP threads wait on each other: one thread measured 4x faster there.
            self.threads = 1
        if self.view_cache is None:  # caching pays off for the small built-in data set
            self.view_cache = 0 if self.data else 8
        if self.view_cache == 1:
            raise ValueError("--view-cache needs at least 2 views per image (or 0: augment on the fly)")


# --- recipe ------------------------------------------------------------------------------------------

def demo_recipe(config: DemoConfig, run: str, views: ViewSpec) -> Recipe:
    """``light_moco`` scaled down to a CPU-sized run (every change is an override)."""
    return get_preset(
        "light_moco",
        name=f"demo_{config.framework}_{run}",
        framework=config.framework,
        backbone=dict(name=config.backbone, cifar_stem=True,
                      kwargs={"width": config.width} if config.backbone == "tiny_cnn" else {}),
        head=dict(hidden_dim=256, output_dim=64, num_layers=2, batch_norm=config.framework == "simclr"),
        loss=dict(temperature=config.temperature, smoothing=0.0 if run == "plain" else config.smoothing,
                  mode="uniform" if run == "uniform" else "neighbors", neighbors=config.neighbors,
                  schedule="constant", warmup_epochs=0),
        moco=dict(queue_size=config.queue_size, key_momentum=config.key_momentum),
        optimizer=dict(name="sgd", lr_per_256=config.lr_per_256, weight_decay=config.weight_decay,
                       warmup_epochs=1, exclude_bias_norm=True, exclude_depthwise=True),
        views=views,
        epochs=config.epochs,
        batch_size=config.batch_size,
    )


# --- reporting ------------------------------------------------------------------------------------------------

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
    for run in RUNS:
        mine = [r for r in results if r.run == run]
        if not mine:
            continue
        first = mine[0]
        target = "uniform" if first.neighbors is None else f"k = {first.neighbors} neighbours"
        loss = "InfoNCE" if first.smoothing == 0 else f"smoothed, alpha {first.smoothing:g}, {target}"
        rows.append({"run": run, "loss": loss,
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


def plot_curves(path: Path, results: Sequence[RunResult], references) -> Path:
    from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend alone

    figure = Figure(figsize=(11, 4))
    loss_axis, knn_axis = figure.subplots(1, 2)
    colours = {"plain": "tab:blue", "uniform": "tab:orange", "neighbors": "tab:green"}
    for result in results:
        epochs = range(1, len(result.loss_per_epoch) + 1)
        label = f"{result.run} (seed {result.seed})"
        loss_axis.plot(epochs, result.loss_per_epoch, color=colours[result.run], label=label, alpha=0.85)
        knn_axis.plot(epochs, [100 * v for v in result.knn_per_epoch], color=colours[result.run], label=label,
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

def run_demo(config: DemoConfig) -> Dict:
    """Run the comparison; return {"rows", "results", "references", "files", "seconds"}."""
    threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        return _run_demo(config)
    finally:
        torch.set_num_threads(threads)


def _run_demo(config: DemoConfig) -> Dict:
    start = time.perf_counter()
    if config.data:
        images = load_image_folder(config.data)
        views = ViewSpec(global_crops=CropSpec(2, config.image_size, (0.2, 1.0)))  # MoCo v2 augmentations
        source = f"ImageFolder {config.data}"
    else:
        images = load_digits_images(config.image_size)
        views = digits_views(config.image_size)
        source = f"scikit-learn digits upsampled to {config.image_size} px"
    if config.max_images:
        keep = sorted(random.Random(0).sample(range(len(images)), min(config.max_images, len(images))))
        images = images.subset(keep)
    train_idx, test_idx = split_indices(images.labels, 0.25, seed=0)
    train, test = images.subset(train_idx), images.subset(test_idx)
    evaluation = EvalData.from_images(train, test, eval_transform(config.image_size, views))

    # References that need no training: the randomly initialised network and the raw pixels.
    seed_everything(config.seeds[0])
    random_backbone = demo_recipe(config, "plain", views).backbone.build().to(config.device)
    references = {
        "random init": evaluation.evaluate(random_backbone, config.device, config.knn_k),
        "raw pixels": evaluation.raw_pixels(config.knn_k),
    }

    if config.view_cache:
        cache = build_view_cache(train, views, config.view_cache, seed=0, progress=config.progress)
    results: List[RunResult] = []
    for seed in config.seeds:
        if config.view_cache:
            train_views: Dataset = CachedViews(cache, torch.Generator().manual_seed(seed))
        else:
            from .lightly_models import build_view_transform

            train_views = OnTheFlyViews(train, build_view_transform(views))
        for run in config.runs:
            _, result = pretrain(demo_recipe(config, run, views), train_views, evaluation, seed=seed, run=run,
                                 device=config.device, workers=config.workers, knn_k=config.knn_k,
                                 progress=config.progress)
            results.append(result)
            if config.progress:
                print(f"{run:>9} seed {seed}: kNN {100 * result.knn_top1:.1f} %, linear "
                      f"{100 * result.linear_top1:.1f} %, {result.seconds:.0f} s", file=sys.stderr)

    rows = summarise(results, references)
    seconds = time.perf_counter() - start
    header = (f"# smooth-infonce demo: {config.framework}, {config.backbone} "
              f"({'width ' + str(config.width) + ', ' if config.backbone == 'tiny_cnn' else ''}"
              f"{config.image_size} px), {config.epochs} epochs, batch {config.batch_size}, "
              f"tau {config.temperature}, seeds {list(config.seeds)}\n\n"
              f"Data: {source}; {len(train)} pre-training / memory images, {len(test)} held-out test images. "
              f"Frozen backbone features; kNN k = {config.knn_k}. Total wall time {seconds:.0f} s. "
              f"Smoothed runs minimise a different target, so their training loss is not comparable "
              f"with InfoNCE's.")
    files = save_outputs(Path(config.out), config, rows, results, references, header, config.plot)
    return {"rows": rows, "results": results, "references": references, "files": files, "seconds": seconds,
            "header": header}


def parse_args(argv: Optional[Sequence[str]] = None) -> DemoConfig:
    defaults = DemoConfig()
    parser = argparse.ArgumentParser(prog="smooth-infonce-demo", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--framework", choices=("moco", "simclr"), default=defaults.framework)
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--backbone", default=defaults.backbone,
                        help="a registered backbone (tiny_cnn, resnet18, mobilenetv3_large_100, ...) or timm:<name>")
    parser.add_argument("--width", type=int, default=defaults.width, help="tiny_cnn width")
    parser.add_argument("--image-size", type=int, default=defaults.image_size)
    parser.add_argument("--temperature", type=float, default=defaults.temperature)
    parser.add_argument("--smoothing", type=float, default=defaults.smoothing, help="alpha of the smoothed runs")
    parser.add_argument("--neighbors", type=int, default=defaults.neighbors, help="k of the neighbors run")
    parser.add_argument("--queue-size", type=int, default=defaults.queue_size, help="MoCo queue (memory bank)")
    parser.add_argument("--key-momentum", type=float, default=defaults.key_momentum)
    parser.add_argument("--lr-per-256", type=float, default=None,
                        help=f"peak SGD lr per 256 images (default: {DEFAULT_LR_PER_256})")
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    parser.add_argument("--runs", nargs="+", choices=RUNS, default=list(defaults.runs))
    parser.add_argument("--seeds", nargs="+", type=int, default=list(defaults.seeds))
    parser.add_argument("--data", default=None, help="an ImageFolder directory instead of the digits")
    parser.add_argument("--max-images", type=int, default=None, help="use a random subset of the images")
    parser.add_argument("--view-cache", type=int, default=None,
                        help="augmented views cached per image (0: augment on the fly); default 8 for "
                             "the digits, 0 with --data")
    parser.add_argument("--knn-k", type=int, default=defaults.knn_k)
    parser.add_argument("--device", default=defaults.device)
    parser.add_argument("--workers", type=int, default=defaults.workers, help="DataLoader workers")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: 1 for tiny_cnn on the CPU, else torch's default)")
    parser.add_argument("--out", default=defaults.out, help="output folder")
    parser.add_argument("--no-plot", dest="plot", action="store_false")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args(argv)
    return DemoConfig(**vars(args))


def main(argv: Optional[Sequence[str]] = None) -> int:
    config = parse_args(argv)
    outcome = run_demo(config)
    print(outcome["header"])
    print()
    print(markdown_table(outcome["rows"]))
    print()
    print("Wrote " + ", ".join(str(p) for p in outcome["files"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
