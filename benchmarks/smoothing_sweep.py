"""The main job's alpha x k sweep: how far smoothing moves kNN accuracy on the digits, against the
spread over seeds.

Every cell (alpha, S) trains the main job's SimCLR run (`smooth_infonce.integrations.demo`: tiny_cnn,
16 px digits, 20 epochs, batch 128, tau 0.2) with smoothing alpha onto S = all negatives (uniform)
or the k nearest, once per seed; plain InfoNCE trains once per seed too. Runs of one seed see the
same views in the same batches, so the effect of a cell is measured per seed, paired:

    d(cell, seed) = kNN top-1(cell, seed) - kNN top-1(plain, seed)

and the heatmap shows mean_seeds d with its standard error (sd / sqrt(seeds)); a cell is marked
where the 95% t interval of the mean (seeds - 1 degrees of freedom: 3.18 standard errors with 4
seeds) excludes 0. Twelve cells at 95% each: expect about one marked cell from noise alone. The
linear probe gets the same panel. Writes <out>.json (every
run; rewritten after each, so an interrupted sweep keeps what it trained and `--resume` goes on
from there) and <out>.png.

    .venv/bin/python benchmarks/smoothing_sweep.py                        # the committed grid (~40 min, 2 cores)
    .venv/bin/python benchmarks/smoothing_sweep.py --alphas 0.2 --modes uniform 5 --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import textwrap
import time
from datetime import datetime, timezone
from pathlib import Path

from smooth_infonce.integrations.demo.cli import DemoConfig, run_demo
from smooth_infonce.integrations.demo.evaluation import paired_difference, t_critical

# environment.py beside this file, also when a test loads this file by path or PYTHONSAFEPATH=1 is set
sys.path.insert(0, str(Path(__file__).resolve().parent))

from environment import machine, write_json  # noqa: E402


def cell_name(alpha: float, mode: str) -> str:
    return "plain" if alpha == 0 else f"alpha={alpha:g},{'uniform' if mode == 'uniform' else 'k=' + mode}"


def train(alpha: float, mode: str, seed: int, epochs: int, max_images: int | None) -> dict:
    """One run of the main job's SimCLR setting; kNN and linear top-1 in %."""
    run = "plain" if alpha == 0 else ("uniform" if mode == "uniform" else "neighbors")
    with tempfile.TemporaryDirectory() as out:
        config = DemoConfig(runs=(run,), seeds=(seed,), epochs=epochs, smoothing=alpha or 0.2,
                            neighbors=5 if mode == "uniform" else int(mode), max_images=max_images,
                            out=out, plot=False, progress=False)
        result = run_demo(config)["results"][0]
    return dict(cell=cell_name(alpha, mode), alpha=alpha, mode=mode, seed=seed, knn=100 * result.knn_top1,
                linear=100 * result.linear_top1, seconds=result.seconds)


def paired_effects(runs: list[dict], metric: str) -> dict:
    """{cell: (mean, standard error, seeds)} of metric(cell, seed) - metric(plain, seed)."""
    plain = {r["seed"]: r[metric] for r in runs if r["cell"] == "plain"}
    effects = {}
    for cell in dict.fromkeys(r["cell"] for r in runs if r["cell"] != "plain"):
        pairs = [(r[metric], plain[r["seed"]]) for r in runs if r["cell"] == cell and r["seed"] in plain]
        if pairs:
            effect = paired_difference(*zip(*pairs))
            effects[cell] = (effect["mean"], effect["se"], effect["pairs"])
    return effects


def save(record: dict, out: Path) -> None:
    """<out>.json: the runs so far and the paired effects of each cell."""
    record["effects"] = {metric: {cell: dict(mean=m, se=se, seeds=n, ci95=t_critical(n) * se)
                                  for cell, (m, se, n) in paired_effects(record["runs"], metric).items()}
                         for metric in ("knn", "linear")}
    write_json(record, out)


def plot(path: Path, runs: list[dict], alphas: list[float], modes: list[str], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(5.2 * 2, 1.6 + 0.75 * len(alphas)), constrained_layout=True)
    for ax, metric, label in zip(axes, ("knn", "linear"), ("kNN top-1", "linear top-1")):
        effects = paired_effects(runs, metric)
        grid = [[effects.get(cell_name(a, m), (float("nan"),) * 3) for m in modes] for a in alphas]
        means = [[cell[0] for cell in row] for row in grid]
        limit = max([abs(v) for row in means for v in row if v == v] + [0.5])
        image = ax.imshow(means, cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto")
        for i, row in enumerate(grid):
            for j, (mean, se, seeds) in enumerate(row):
                if mean == mean:
                    marked = "*" if se == se and abs(mean) > t_critical(seeds) * se else ""
                    ax.text(j, i, f"{mean:+.1f}{marked}\n±{se:.1f}", ha="center", va="center", fontsize=9,
                            color="white" if abs(mean) > 0.6 * limit else "black")
        ax.set_xticks(range(len(modes)), ["uniform" if m == "uniform" else f"k={m}" for m in modes])
        ax.set_yticks(range(len(alphas)), [f"alpha {a:g}" for a in alphas])
        ax.set_title(f"{label}: smoothed - plain (points, mean ± s.e.)", fontsize=10)
        fig.colorbar(image, ax=ax, shrink=0.8)
    fig.suptitle(textwrap.fill(title, 140), fontsize=8)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.1, 0.2, 0.4])
    parser.add_argument("--modes", nargs="+", default=["uniform", "1", "5", "20"],
                        help="uniform, or k of the neighbour mode")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--max-images", type=int, default=None, help="a subset of the digits (tests)")
    parser.add_argument("--out", default="benchmarks/results/smoothing_sweep_cpu")
    parser.add_argument("--resume", action="store_true", help="keep the runs already in <out>.json")
    args = parser.parse_args(argv)
    if any(not 0 < a < 1 for a in args.alphas):
        parser.error("--alphas: each in (0, 1)")
    if any(m != "uniform" and not (m.isdigit() and int(m) >= 1) for m in args.modes):
        parser.error("--modes: 'uniform' or a neighbour count >= 1")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = dict(
        what="main job (SimCLR, tiny_cnn width 16, 16 px digits, batch 128, tau 0.2): kNN / linear top-1 "
             "of smoothed runs minus plain InfoNCE, paired by seed",
        machine=dict(machine("cpu"), torch_threads=1),
        date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), epochs=args.epochs,
        seeds=args.seeds, alphas=args.alphas, modes=args.modes, runs=[])
    if args.resume and out.with_suffix(".json").exists():
        previous = json.loads(out.with_suffix(".json").read_text())
        record.update(runs=previous["runs"], date=previous["date"], machine=previous["machine"])
    done = {(r["cell"], r["seed"]) for r in record["runs"]}
    cells = [(0.0, "uniform")] + [(a, m) for a in args.alphas for m in args.modes]
    start = time.perf_counter()
    for seed in args.seeds:
        for alpha, mode in cells:
            if (cell_name(alpha, mode), seed) in done:
                continue
            run = train(alpha, mode, seed, args.epochs, args.max_images)
            record["runs"].append(run)
            print(f"{run['cell']:>22} seed {seed}: kNN {run['knn']:.1f}  linear {run['linear']:.1f}  "
                  f"({run['seconds']:.0f} s; {time.perf_counter() - start:.0f} s so far)", flush=True)
            save(record, out)
    save(record, out)
    plot(out.with_suffix(".png"), record["runs"], args.alphas, args.modes,
         f"{record['what']}; seeds {args.seeds}, {args.epochs} epochs; * the 95% t interval excludes 0; "
         f"{record['date']}")
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
