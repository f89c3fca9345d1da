"""The recipes on real images: Fashion-MNIST, pre-trained on a CPU, scored on the official test split.

Every run pre-trains a small network with self-supervision on a stratified subset of Fashion-MNIST's
60,000 training images (the same subset in every run), freezes it, and scores its backbone features
on the official 10,000 test images: weighted kNN top-1 (the subset as memory) and a linear probe
(logistic regression fitted on the subset). The studies, each a set of arms trained once per seed;
the runs of one seed see the same batches of the same cached views, so arms are compared per seed:

    loss-simclr, loss-moco   light-moco's loss: plain InfoNCE vs uniform vs neighbour smoothing
    loss-simclr-wide         the same SimCLR comparison on a network 4x wider (the lightweight premise)
    recipe                   light-moco's recipe: moco_v2_baseline vs light_moco, scaled down alike
    views-moco, views-dino,  SSLight's view sampling: baseline vs SSLight multi-crop (crop sizes
    views-swav               scaled from 224 px, SSLight's pair weights)
    supervised               the same backbones trained with labels on the same views (a ceiling)

plus two references that need no training: the randomly initialised networks and the raw pixels.
A difference between two arms is reported as the mean over seeds of (arm - baseline arm), its
standard error and the 95 % t interval (`paired_difference`); "resolved" means the interval
excludes 0.

    .venv/bin/python benchmarks/fashion_mnist.py                  # everything, 2 processes (~3.5 h, 2 cores)
    .venv/bin/python benchmarks/fashion_mnist.py --studies loss-simclr --seeds 0 1
    .venv/bin/python benchmarks/fashion_mnist.py --data /path/to/FashionMNIST/raw

Resumable: each finished run is a JSON file under ``<out>/runs/`` and is never trained again (delete
it to retrain); the summary ``<out>/results.{json,md,png}`` is rewritten after every run. The
augmented views are made once per view sampling and kept in ``<out>/cache/`` (not committed).
Needs the four IDX files (``apt-get install dataset-fashion-mnist``, or ``--data DIR``).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import multiprocessing
import statistics
import sys
import textwrap
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from smooth_infonce.integrations.data.fashion_mnist import fashion_mnist_images, fashion_mnist_views
from smooth_infonce.integrations.demo.cli import DemoConfig, demo_recipe, multicrop_recipe
from smooth_infonce.integrations.demo.evaluation import EvalData, eval_transform, paired_difference
from smooth_infonce.integrations.recipes import Recipe, get_preset

# environment.py beside this file, also when a test loads this file by path or PYTHONSAFEPATH=1 is set
sys.path.insert(0, str(Path(__file__).resolve().parent))

import environment  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "fashion_mnist"


@dataclass(frozen=True)
class Settings:
    """The scale of every run (the command-line flags); the README says why these values."""

    image_size: int = 20  # px, from 28: 2x the images per second of 28 px, the classes still apart
    width: int = 8  # tiny_cnn width: 32 features, ~20 k parameters
    wide_width: int = 32  # loss-simclr-wide: 4x wider
    train_images: int = 10_000  # stratified subset of the 60,000 (1,000 per class)
    test_images: Optional[int] = None  # the official 10,000 (a smaller stratified subset: tests only)
    epochs: int = 8
    batch_size: int = 128
    view_cache: int = 8  # augmented views per image and crop group
    knn_k: int = 20
    curve_images: int = 2_000  # memory and test images of the per-epoch kNN curve
    temperature: float = 0.2
    smoothing: float = 0.2
    neighbors: int = 10
    queue_size: int = 4_096
    key_momentum: float = 0.99
    data: Optional[str] = None  # directory of the IDX files (default: Debian's)


@dataclass(frozen=True)
class Study:
    title: str
    arms: Tuple[str, ...]
    baseline: str  # differences are arm - baseline, per seed
    seeds: int


STUDIES: Dict[str, Study] = {
    "loss-simclr": Study("light-moco's loss, SimCLR", ("plain", "uniform", "neighbors"), "plain", 5),
    "loss-moco": Study("light-moco's loss, MoCo", ("plain", "uniform", "neighbors"), "plain", 5),
    "views-dino": Study("SSLight's view sampling, DINO", ("baseline", "sslight"), "baseline", 3),
    "views-swav": Study("SSLight's view sampling, SwAV", ("baseline", "sslight"), "baseline", 3),
    "views-moco": Study("SSLight's view sampling, MoCo", ("baseline", "sslight"), "baseline", 3),
    "recipe": Study("light-moco's recipe", ("moco_v2_baseline", "light_moco"), "moco_v2_baseline", 3),
    "supervised": Study("supervised ceiling (labels, same views)", ("tiny", "wide"), "tiny", 3),
    "loss-simclr-wide": Study("light-moco's loss, SimCLR, 4x wider network", ("plain", "uniform", "neighbors"),
                              "plain", 5),
}


def demo_config(settings: Settings, study: str) -> DemoConfig:
    """The demo's run configuration at this benchmark's scale (its recipes are the demo's)."""
    framework = {"loss-simclr": "simclr", "loss-simclr-wide": "simclr", "supervised": "simclr"}.get(
        study, study.removeprefix("views-") if study.startswith("views-") else "moco")
    lr = {"views-moco": 0.48}.get(study)  # SSLight's LARS rate, as for dino and swav
    config = DemoConfig(framework=framework, runs=("baseline",) if framework in ("dino", "swav") else ("plain",),
                        epochs=settings.epochs, batch_size=settings.batch_size, image_size=settings.image_size,
                        width=settings.wide_width if study.endswith("wide") else settings.width,
                        temperature=settings.temperature, smoothing=settings.smoothing,
                        neighbors=settings.neighbors, queue_size=settings.queue_size,
                        key_momentum=settings.key_momentum, lr_per_256=lr, knn_k=settings.knn_k, plot=False,
                        progress=False)
    return config


def scaled_preset(name: str, config: DemoConfig, views) -> Recipe:
    """A light-moco paper preset at the demo's scale: network, head, queue, momentum, lr, views,
    epochs and batch as every other MoCo run; its temperature, smoothing and warm-up its own (the
    3 of 200 warm-up epochs scaled to the run: 1)."""
    preset = get_preset(name)
    warmup = max(1, round(preset.optimizer.warmup_epochs * config.epochs / preset.epochs)) \
        if preset.optimizer.warmup_epochs else 0
    return preset.override(
        name=f"fmnist_{name}",
        backbone=dict(name="tiny_cnn", cifar_stem=True, kwargs={"width": config.width}),
        head=dict(hidden_dim=256, output_dim=64, num_layers=2, batch_norm=False),
        loss=dict(warmup_epochs=warmup if preset.loss.smoothing else 0),
        moco=dict(queue_size=config.queue_size, key_momentum=config.key_momentum),
        optimizer=dict(lr_per_256=config.lr_per_256, warmup_epochs=warmup),
        views=views, epochs=config.epochs, batch_size=config.batch_size)


def build_recipe(settings: Settings, study: str, arm: str) -> Recipe:
    config = demo_config(settings, study)
    views = fashion_mnist_views(settings.image_size)
    if study == "recipe":
        return scaled_preset(arm, config, views)
    if study.startswith("views-"):
        return multicrop_recipe(config, arm, views)
    if study == "supervised":
        config = dataclasses.replace(config, width=settings.wide_width if arm == "wide" else settings.width)
        return demo_recipe(config, "plain", views)
    return demo_recipe(config, arm, views)


# --- data and view caches (one per view sampling, shared by every run that uses it) ------------------------

def load_splits(settings: Settings):
    from smooth_infonce.integrations.data.digits import stratified_subset

    train = fashion_mnist_images("train", settings.data)
    train = train.subset(stratified_subset(train.labels, settings.train_images, seed=0))
    test = fashion_mnist_images("test", settings.data)
    if settings.test_images:
        test = test.subset(stratified_subset(test.labels, settings.test_images, seed=0))
    return train, test


def cache_key(settings: Settings, crop) -> str:
    """The cache's identity: the images, the crop group and the photometric augmentations."""
    fields = (settings.data, settings.train_images, settings.image_size, settings.view_cache, crop,
              fashion_mnist_views(settings.image_size))
    return hashlib.sha1(repr(fields).encode()).hexdigest()[:12]


def cache_path(out: Path, settings: Settings, crop) -> Path:
    return out / "cache" / f"views-{crop.size}px-{crop.scale[0]:g}-{crop.scale[1]:g}-{cache_key(settings, crop)}.pt"


def build_cache(task) -> str:
    """Worker task: augment ``view_cache`` views (locals: times half their count) of one crop group."""
    from smooth_infonce.integrations.demo.pretraining import build_view_cache

    out, settings, study, arm = task
    recipe = build_recipe(settings, study, arm)
    for crop in recipe.views.crop_groups():
        path = cache_path(out, settings, crop)
        if not path.exists():
            train, _ = _worker_data(settings)
            views = build_view_cache(train, recipe.views, settings.view_cache * max(1, crop.count // 2), seed=0,
                                     progress=False, crop=crop)
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(views, path.with_suffix(".tmp"))
            path.with_suffix(".tmp").rename(path)
    return str(path)


_DATA: Dict = {}


def _worker_data(settings: Settings):
    if settings not in _DATA:
        _DATA.clear()
        train, test = load_splits(settings)
        views = fashion_mnist_views(settings.image_size)
        transform = eval_transform(settings.image_size, views)
        evaluation = EvalData.from_images(train, test, transform)
        first = slice(0, settings.curve_images)
        curve = EvalData(evaluation.train_images[first], evaluation.train_labels[first],
                         evaluation.test_images[first], evaluation.test_labels[first])
        _DATA[settings] = (train, test, evaluation, curve)
    return _DATA[settings][:2]


def _worker_evaluation(settings: Settings):
    _worker_data(settings)
    return _DATA[settings][2:]


# --- one run --------------------------------------------------------------------------------------------

def run_path(out: Path, study: str, arm: str, seed: int) -> Path:
    return out / "runs" / study / f"{arm}-seed{seed}.json"


def train_run(task) -> dict:
    """Worker task: one (study, arm, seed), written to its JSON file; returns the record."""
    out, settings, study, arm, seed = task
    torch.set_num_threads(1)  # two runs on two cores beat one run on two threads for a network this small
    from smooth_infonce.integrations.demo.pretraining import CachedViews, pretrain

    train, _ = _worker_data(settings)
    evaluation, curve = _worker_evaluation(settings)
    recipe = build_recipe(settings, study, arm)
    caches = [(torch.load(cache_path(out, settings, crop), mmap=True), crop.count)
              for crop in recipe.views.crop_groups()]
    data = CachedViews(caches, train.labels, seed)
    if study == "supervised":
        record = supervised_run(recipe, data, evaluation, settings, seed)
    else:
        _, result = pretrain(recipe, data, evaluation, seed=seed, run=arm, progress=False, knn_k=settings.knn_k,
                             curve_evaluation=curve)
        record = dict(knn=100 * result.knn_top1, linear=100 * result.linear_top1, seconds=result.seconds,
                      loss_per_epoch=result.loss_per_epoch, knn_per_epoch=[100 * v for v in result.knn_per_epoch])
    images = settings.epochs * (len(train) // settings.batch_size) * settings.batch_size
    record.update(study=study, arm=arm, seed=seed, images_per_second=images / record["seconds"],
                  recipe=recipe.to_dict(), machine=machine(),
                  finished=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    environment.write_json(record, run_path(out, study, arm, seed).with_suffix(""))
    return record


def supervised_run(recipe: Recipe, data, evaluation: EvalData, settings: Settings, seed: int) -> dict:
    """The backbone and a linear classifier trained with labels (cross-entropy on the first view
    of each item, SGD, the recipe's lr and cosine schedule), on Lightning's Trainer."""
    import lightning as L

    from smooth_infonce.integrations.demo.pretraining import quiet_lightning

    class Supervised(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = recipe.backbone.build()
            self.classifier = torch.nn.Linear(self.backbone.num_features, 10)
            self.losses: List[float] = []

        def training_step(self, batch, batch_idx):
            views, labels = batch
            loss = torch.nn.functional.cross_entropy(self.classifier(self.backbone(views[0])), labels)
            self.losses.append(float(loss))
            return loss

        def configure_optimizers(self):
            lr = recipe.optimizer.lr_per_256 * recipe.batch_size / 256
            optimizer = torch.optim.SGD(self.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
            return [optimizer], [torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, self.trainer.max_epochs)]

    with quiet_lightning():
        L.seed_everything(seed, verbose=False)
        module = Supervised()
        loader = torch.utils.data.DataLoader(data, batch_size=recipe.batch_size, shuffle=True, drop_last=True)
        trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=recipe.epochs, logger=False,
                            enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False)
        start = time.perf_counter()
        trainer.fit(module, loader)
        seconds = time.perf_counter() - start
    scores = evaluation.evaluate(module.backbone, "cpu", settings.knn_k)
    steps = len(module.losses) // recipe.epochs
    per_epoch = [statistics.fmean(module.losses[e * steps:(e + 1) * steps]) for e in range(recipe.epochs)]
    return dict(knn=100 * scores["knn_top1"], linear=100 * scores["linear_top1"], seconds=seconds,
                loss_per_epoch=per_epoch, knn_per_epoch=[])


def references(settings: Settings, out: Path) -> Dict[str, Dict[str, float]]:
    """Random init (both widths, seed 0) and raw pixels, in %; kept in ``<out>/references.json``
    and read back by a resumed benchmark of the same settings (the raw pixels' probe takes minutes)."""
    from smooth_infonce.integrations.demo.pretraining import seed_everything

    path = out / "references.json"
    if path.exists():
        kept = json.loads(path.read_text())
        if kept["settings"] == dataclasses.asdict(settings):
            return kept["references"]
    evaluation, _ = _worker_evaluation(settings)
    scores = {"raw pixels": evaluation.raw_pixels(settings.knn_k)}
    for arm, name in (("tiny", f"random init, width {settings.width}"),
                      ("wide", f"random init, width {settings.wide_width}")):
        seed_everything(0)
        scores[name] = evaluation.evaluate(build_recipe(settings, "supervised", arm).backbone.build(), "cpu",
                                           settings.knn_k)
    refs = {name: {"knn": 100 * s["knn_top1"], "linear": 100 * s["linear_top1"]} for name, s in scores.items()}
    environment.write_json(dict(settings=dataclasses.asdict(settings), references=refs), path.with_suffix(""))
    return refs


# --- the summary ------------------------------------------------------------------------------------------

def summarise(runs: List[dict]) -> Dict[str, dict]:
    """Per study: each arm's mean and sd over seeds, and each arm's paired difference from the baseline."""
    summary = {}
    for name, study in STUDIES.items():
        mine = [r for r in runs if r["study"] == name]
        if not mine:
            continue
        arms = {}
        for arm in study.arms:
            done = sorted((r for r in mine if r["arm"] == arm), key=lambda r: r["seed"])
            if done:
                arms[arm] = {metric: dict(mean=statistics.fmean(r[metric] for r in done),
                                          sd=statistics.stdev(r[metric] for r in done) if len(done) > 1 else None)
                             for metric in ("knn", "linear")}
                arms[arm].update(seeds=[r["seed"] for r in done], seconds=statistics.fmean(r["seconds"] for r in done),
                                 final_loss=statistics.fmean(r["loss_per_epoch"][-1] for r in done))
        base = {r["seed"]: r for r in mine if r["arm"] == study.baseline}
        differences = {}
        for arm in study.arms:
            pairs = [(r, base[r["seed"]]) for r in mine if r["arm"] == arm and r["seed"] in base]
            if pairs and arm != study.baseline:
                differences[arm] = {metric: paired_difference([a[metric] for a, _ in pairs],
                                                              [b[metric] for _, b in pairs])
                                    for metric in ("knn", "linear")}
        summary[name] = dict(title=study.title, baseline=study.baseline, arms=arms, differences=differences)
    return summary


def fmt(stats: dict) -> str:
    return f"{stats['mean']:.1f}" + (f" ± {stats['sd']:.1f}" if stats.get("sd") is not None else "")


def fmt_diff(d: dict) -> str:
    if d["pairs"] < 2:
        return f"{d['mean']:+.1f} (1 seed)"
    return f"{d['mean']:+.1f} ± {d['se']:.1f} [{d['mean'] - d['ci95']:+.1f}, {d['mean'] + d['ci95']:+.1f}]" \
        + (" *" if d["resolved"] else "")


def markdown(record: dict) -> str:
    lines = [f"# Fashion-MNIST benchmark ({record['date']})", "", record["setup"], "",
             "| reference | kNN top-1 (%) | linear top-1 (%) |", "|---|---|---|"]
    lines += [f"| {name} | {s['knn']:.1f} | {s['linear']:.1f} |" for name, s in record["references"].items()]
    lines += ["", "Each arm: mean ± sd over its seeds. Difference: mean over seeds of (arm - baseline), ± its standard "
              "error, [95 % t interval]; * the interval excludes 0.", "",
              "| study | arm | seeds | kNN top-1 (%) | linear top-1 (%) | kNN diff. (points) | linear diff. (points) "
              "| s / run | images / s |", "|---|---|---|---|---|---|---|---|---|"]
    for name, study in record["summary"].items():
        for arm, stats in study["arms"].items():
            diff = study["differences"].get(arm)
            runs = [r for r in record["runs"] if r["study"] == name and r["arm"] == arm]
            speed = statistics.fmean(r["images_per_second"] for r in runs)
            lines.append(f"| {name} | {arm} | {len(stats['seeds'])} | {fmt(stats['knn'])} | {fmt(stats['linear'])} | "
                         f"{fmt_diff(diff['knn']) if diff else 'baseline'} | "
                         f"{fmt_diff(diff['linear']) if diff else 'baseline'} | {stats['seconds']:.0f} | {speed:.0f} |")
    return "\n".join(lines) + "\n"


COLOURS = {"plain": "tab:blue", "uniform": "tab:orange", "neighbors": "tab:green", "baseline": "tab:grey",
           "sslight": "tab:cyan", "moco_v2_baseline": "tab:grey", "light_moco": "tab:red", "tiny": "tab:blue",
           "wide": "tab:purple"}


def plot(path: Path, record: dict) -> None:
    """Left: every paired difference with its 95 % interval. Right: the training loss per epoch of
    the multi-crop runs against log K (a DINO / SwAV run still at log K has learnt nothing)."""
    import math

    from matplotlib.figure import Figure

    figure = Figure(figsize=(13, 5.5))
    diff_axis, dino_axis, swav_axis = figure.subplots(1, 3, gridspec_kw=dict(width_ratios=[1.4, 1, 1]))
    labels, y = [], 0
    for name, study in record["summary"].items():
        for arm, diff in study["differences"].items():
            for offset, metric, marker in ((-0.15, "knn", "o"), (0.15, "linear", "s")):
                d = diff[metric]
                ci = d["ci95"] if math.isfinite(d["ci95"]) else 0.0
                diff_axis.errorbar(d["mean"], y + offset, xerr=ci, fmt=marker, color=COLOURS.get(arm, "black"),
                                   capsize=3, label=metric if y == 0 else None)
            labels.append(f"{name}: {arm} - {study['baseline']}")
            y += 1
    diff_axis.axvline(0, color="black", linewidth=0.8)
    diff_axis.set_yticks(range(len(labels)), labels, fontsize=7)
    diff_axis.invert_yaxis()
    diff_axis.set(xlabel="paired difference (points), 95 % t interval",
                  title="arm - baseline per seed: kNN (circles), linear (squares)")
    diff_axis.grid(alpha=0.3)
    for axis, study, classes in ((dino_axis, "views-dino", 64), (swav_axis, "views-swav", 30)):
        for run in (r for r in record["runs"] if r["study"] == study):
            axis.plot(range(1, len(run["loss_per_epoch"]) + 1), run["loss_per_epoch"],
                      color=COLOURS[run["arm"]], alpha=0.8, label=f"{run['arm']} seed {run['seed']}")
        axis.axhline(math.log(classes), color="black", linestyle="--", label=f"log K = log {classes}")
        axis.set(xlabel="epoch", ylabel="training loss", title=f"{study}: loss per epoch")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=6)
    figure.suptitle(textwrap.fill(record["setup"], 180), fontsize=7)
    figure.tight_layout(rect=(0, 0, 1, 0.9))
    figure.savefig(path, dpi=110)


def machine() -> dict:
    return dict(environment.machine("cpu", ["lightning", "lightly"]), torch_threads_per_run=1)


def write_summary(out: Path, settings: Settings, refs: dict, started: float, jobs: int) -> dict:
    runs = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*/*.json"))]
    setup = (f"Fashion-MNIST, {settings.train_images} stratified training images (memory and probe) at "
             f"{settings.image_size} px, official test split ({settings.test_images or 10000} images); tiny_cnn width "
             f"{settings.width} ({settings.wide_width} for -wide), {settings.epochs} epochs, batch "
             f"{settings.batch_size}, {settings.view_cache} cached views per image; tau {settings.temperature}, "
             f"alpha {settings.smoothing}, k {settings.neighbors}, queue {settings.queue_size}; kNN k "
             f"{settings.knn_k}; {jobs} runs at a time, 1 thread each")
    record = dict(date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), machine=machine(),
                  settings=dataclasses.asdict(settings), setup=setup, references=refs,
                  wall_seconds_this_invocation=time.perf_counter() - started,
                  train_seconds_all_runs=sum(r["seconds"] for r in runs),
                  summary=summarise(runs), runs=runs)
    environment.write_json(record, out / "results")
    (out / "results.md").write_text(markdown(record))
    plot(out / "results.png", record)
    return record


# --- the command ------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--studies", nargs="+", choices=tuple(STUDIES), default=list(STUDIES))
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="instead of each study's own (0 .. seeds - 1)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    parser.add_argument("--out", default=str(RESULTS))
    for field in dataclasses.fields(Settings):
        flag = "--" + field.name.replace("_", "-")
        kind = str if field.name == "data" else (float if isinstance(field.default, float) else int)
        parser.add_argument(flag, type=kind, default=field.default)
    args = parser.parse_args(argv)
    settings = Settings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Settings)})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    def say(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f} s] {message}", flush=True)

    tasks = [(study, arm, seed) for study in args.studies
             for seed in (args.seeds if args.seeds is not None else range(STUDIES[study].seeds))
             for arm in STUDIES[study].arms]
    todo = [t for t in tasks if not run_path(out, *t).exists()]
    say(f"{len(tasks)} runs, {len(tasks) - len(todo)} already done in {out / 'runs'}; {len(todo)} to train, "
        f"{args.jobs} at a time")
    torch.set_num_threads(1)
    refs = references(settings, out)
    say("references: " + ", ".join(f"{n} kNN {s['knn']:.1f} / linear {s['linear']:.1f}" for n, s in refs.items()))
    samplings = {}
    for study, arm, _ in todo:  # one cache task per view sampling
        samplings.setdefault(build_recipe(settings, study, arm).views.crop_groups(), (out, settings, study, arm))
    context = multiprocessing.get_context("spawn")
    with context.Pool(args.jobs, maxtasksperchild=None) as pool:
        for path in pool.imap_unordered(build_cache, samplings.values()):
            say(f"views cached: {Path(path).parent}")
        for done, record in enumerate(pool.imap_unordered(train_run, [(out, settings, *t) for t in todo]), 1):
            say(f"{done}/{len(todo)} {record['study']} {record['arm']} seed {record['seed']}: kNN {record['knn']:.1f}, "
                f"linear {record['linear']:.1f} ({record['seconds']:.0f} s, {record['images_per_second']:.0f} "
                "images/s)")
            write_summary(out, settings, refs, started, args.jobs)
    record = write_summary(out, settings, refs, started, args.jobs)
    print(markdown(record))
    say(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'results.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
