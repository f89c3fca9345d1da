"""Whole training steps, not only the loss: what the smoothed loss costs a real step.

Per recipe family (SimCLR, ``light_moco``, SSLight multi-crop MoCo) and lightweight backbone
(``mobilenetv3_large_100``, ``efficientnet_b0``), one step = the recipe's forward (MoCo: momentum
update and keys too), the loss, backward and the optimiser step. The loss variants run through the
same model code, interleaved round-robin in one process, so a changing background load hits each
alike:

- ``lightly``: lightly's ``NTXentLoss`` (with its memory bank for MoCo). lightly has no
  multi-query form: for SSLight it is called once per query view and the weighted losses summed;
- ``alpha0``: the lightly drop-in (`SmoothNTXentLoss`) at alpha 0 (plain InfoNCE);
- ``uniform``: alpha 0.1 spread over every negative;
- ``neighbors``: alpha 0.1 on the 10 most similar negatives (the recipes' default).

Reported per variant: the step time (median over the repeated steps, with the 25th-75th
percentiles), the loss's share of it (the loss's forward + backward alone on the step's
embeddings, timed in the same rounds), and the ratio to lightly (median over the rounds of the
step time over lightly's step time in the same round). Background load only adds time, so the
fastest step of each variant over lightly's fastest is recorded too (``min_ratio_to_lightly``).

CPU (default without CUDA): small images (32 px globals, 16 px locals), 1 torch thread. GPU:
bf16 autocast, 224 px globals and 128 px locals, CUDA-synchronised wall clock.

    .venv/bin/python benchmarks/training_step.py --out benchmarks/results/training_step_cpu
    .venv/bin/python benchmarks/training_step.py --backbones tiny_cnn --repeats 2   # a quick look
    python benchmarks/training_step.py --out benchmarks/results/training_step_<gpu>      # GPU

Without --out a run goes to benchmarks/runs/training_step-<device>-<date-time>.json/.png (git-ignored).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from environment import default_stem, machine, slug, write_json  # noqa: E402

SEED = 0
FAMILIES = {
    # name: (preset, overrides). SimCLR has no preset: light_moco's loss with an in-batch SimCLR
    # model and its batch-norm projection head.
    "simclr": ("light_moco", {"framework": "simclr", "head__batch_norm": True, "name": "simclr"}),
    "light_moco": ("light_moco", {}),
    "sslight_moco": ("sslight_moco_smooth", {}),
}
VARIANTS = ("lightly", "alpha0", "uniform", "neighbors")
SMOOTHING, NEIGHBORS = 0.1, 10


def percentile(values, q: float) -> float:
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def build_criterion(variant: str, recipe, device):
    from lightly.loss import NTXentLoss

    from smooth_infonce.integrations.lightly import SmoothNTXentLoss

    tau = recipe.loss.temperature
    bank = (recipe.moco.queue_size, recipe.head.output_dim) if recipe.framework == "moco" else 0
    if variant == "lightly":
        return NTXentLoss(temperature=tau, memory_bank_size=bank).to(device)
    smoothing, neighbors = {"alpha0": (0.0, None), "uniform": (SMOOTHING, None),
                            "neighbors": (SMOOTHING, NEIGHBORS)}[variant]
    # no wait for a full bank: the smoothing works from the first step, as in a long run
    return SmoothNTXentLoss(tau, memory_bank_size=bank, smoothing=smoothing, neighbors=neighbors,
                            wait_for_full_bank=False).to(device)


class Family:
    """One recipe family on one backbone: its model, optimiser, views, and a loss per variant."""

    def __init__(self, name: str, backbone: str, args, device: str):
        from smooth_infonce.integrations.lightly.models import build_model
        from smooth_infonce.integrations.recipes import get_preset
        from smooth_infonce.integrations.recipes.optim import build_optimizer

        preset, overrides = FAMILIES[name]
        self.recipe = get_preset(preset, backbone__name=backbone, **overrides)
        self.name, self.backbone, self.device = name, backbone, device
        torch.manual_seed(SEED)
        self.model = build_model(self.recipe).to(device)
        self.optimizer = build_optimizer(self.model, self.recipe.optimizer, batch_size=args.batch)
        self.weights = self.recipe.view_weights()
        views = self.recipe.views
        g = torch.Generator().manual_seed(SEED)
        global_px, local_px = (args.global_px, args.local_px)
        sizes = [global_px] * views.global_crops.count + [local_px] * views.num_local
        self.views = [torch.randn(args.batch, 3, px, px, generator=g).to(device) for px in sizes]
        self.criteria = {variant: build_criterion(variant, self.recipe, device) for variant in VARIANTS}
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda")

    def embed(self):
        """The model side of the step, the same code for every variant: (queries or views, keys)."""
        from smooth_infonce.integrations.lightly.models import encode_views

        if self.recipe.framework == "moco":
            self.model.update_key_encoder()
            return encode_views(self.model, self.views[1:]), self.model.forward_key(self.views[0])
        return encode_views(self.model, self.views), None

    def loss(self, variant: str, embeddings, keys):
        criterion = self.criteria[variant]
        if keys is None:  # SimCLR: two views, in-batch negatives
            return criterion(*embeddings)
        if len(embeddings) == 1:  # MoCo: one query view
            return criterion(embeddings[0], keys)
        if variant == "lightly":  # lightly has no multi-query form: one call per query view
            return sum(w * criterion(q, keys) for w, q in zip(self.weights, embeddings))
        return criterion(embeddings[0], keys, *embeddings[1:], weights=self.weights)

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def step(self, variant: str):
        """(seconds of one whole step, the step's embeddings and keys, detached)."""
        self.sync()
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast:
            embeddings, keys = self.embed()
            loss = self.loss(variant, embeddings, keys)
        loss.backward()
        self.optimizer.step()
        self.sync()
        return time.perf_counter() - start, [e.detach() for e in embeddings], keys

    def loss_alone(self, variant: str, embeddings, keys) -> float:
        """Seconds of the loss's forward + backward alone, on a step's embeddings."""
        leaves = [e.clone().requires_grad_() for e in embeddings]
        self.sync()
        start = time.perf_counter()
        with self.autocast:
            loss = self.loss(variant, leaves, keys)
        torch.autograd.grad(loss, leaves)
        self.sync()
        return time.perf_counter() - start


def run(args, device: str) -> list:
    rows = []
    for backbone in args.backbones:
        for name in args.families:
            family = Family(name, backbone, args, device)
            steps = {v: [] for v in VARIANTS}
            losses = {v: [] for v in VARIANTS}
            for round_index in range(args.warmup + args.repeats):
                for variant in VARIANTS:  # round-robin: a changing load hits every variant alike
                    seconds, embeddings, keys = family.step(variant)
                    loss_seconds = family.loss_alone(variant, embeddings, keys)
                    if round_index >= args.warmup:
                        steps[variant].append(seconds)
                        losses[variant].append(loss_seconds)
            for variant in VARIANTS:
                ratios = [s / b for s, b in zip(steps[variant], steps["lightly"])]
                row = dict(
                    backbone=backbone, family=name, variant=variant, batch=args.batch,
                    views=[tuple(v.shape[1:]) for v in family.views],
                    step_ms=1e3 * statistics.median(steps[variant]),
                    step_ms_p25=1e3 * percentile(steps[variant], 0.25),
                    step_ms_p75=1e3 * percentile(steps[variant], 0.75),
                    loss_ms=1e3 * statistics.median(losses[variant]),
                    ratio_to_lightly=statistics.median(ratios),
                    ratio_p25=percentile(ratios, 0.25), ratio_p75=percentile(ratios, 0.75),
                    steps_ms=[1e3 * s for s in steps[variant]],
                )
                row["loss_share"] = row["loss_ms"] / row["step_ms"]
                # background load only adds time: the fastest step is the least disturbed one
                row["step_ms_min"] = 1e3 * min(steps[variant])
                row["min_ratio_to_lightly"] = min(steps[variant]) / min(steps["lightly"])
                rows.append(row)
                print(f"{backbone:22s} {name:13s} {variant:9s} step {row['step_ms']:9.1f} ms "
                      f"[{row['step_ms_p25']:.1f}, {row['step_ms_p75']:.1f}]  loss {row['loss_ms']:7.1f} ms "
                      f"({100 * row['loss_share']:4.1f} %)  / lightly {row['ratio_to_lightly']:.3f} "
                      f"[{row['ratio_p25']:.3f}, {row['ratio_p75']:.3f}]  fastest / lightly's "
                      f"{row['min_ratio_to_lightly']:.3f}", flush=True)
            del family
    return rows


def plot(report, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backbones = list(dict.fromkeys(r["backbone"] for r in report["results"]))
    families = [f for f in FAMILIES if any(r["family"] == f for r in report["results"])]
    fig, axes = plt.subplots(len(backbones), len(families), figsize=(3.8 * len(families), 3.4 * len(backbones)),
                             squeeze=False)
    for ax, (backbone, family) in ((axes[i][j], (b, f)) for i, b in enumerate(backbones)
                                   for j, f in enumerate(families)):
        rows = [r for r in report["results"] if r["backbone"] == backbone and r["family"] == family]
        names = [r["variant"] for r in rows]
        steps = [r["step_ms"] for r in rows]
        loss = [r["loss_ms"] for r in rows]
        errors = [[r["step_ms"] - r["step_ms_p25"] for r in rows], [r["step_ms_p75"] - r["step_ms"] for r in rows]]
        rest = [step - loss_ms for step, loss_ms in zip(steps, loss)]
        ax.bar(names, rest, color="tab:gray", label="rest of the step")
        ax.bar(names, loss, bottom=rest, color="tab:orange", label="loss fwd+bwd")
        ax.errorbar(names, steps, yerr=errors, fmt="none", ecolor="black", capsize=3)
        for x, r in enumerate(rows):
            ax.text(x, r["step_ms"], f"{r['ratio_to_lightly']:.3f}", ha="center", va="bottom", fontsize=7)
        ax.set_title(f"{family}\n{backbone}", fontsize=8)
        ax.set_ylabel("step ms (median, p25-p75)")
        ax.tick_params(axis="x", labelsize=7)
    axes[0][0].legend(fontsize=7)
    load = report.get("load_average_at_end") or [float("nan")]
    fig.suptitle(f"{report['device']}, torch {report['torch']}, {report['date']}, load average {load[0]:.1f} -- "
                 "numbers: step time / lightly (median over rounds)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    gpu = torch.cuda.is_available()
    parser.add_argument("--cpu", action="store_true", help="CPU mode even if CUDA is available")
    parser.add_argument("--backbones", type=lambda s: s.split(","),
                        default=["mobilenetv3_large_100", "efficientnet_b0"])
    parser.add_argument("--families", type=lambda s: s.split(","), default=list(FAMILIES))
    parser.add_argument("--batch", type=int, default=None, help="images per step (default: 32 on CPU, 256 on GPU)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default: 7 on CPU, 20 on GPU)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--out", help="output path without suffix (default: "
                        "benchmarks/runs/training_step-<device>-<time>)")
    args = parser.parse_args(argv)
    device = "cuda" if gpu and not args.cpu else "cpu"
    args.batch = args.batch or (256 if device == "cuda" else 32)
    args.repeats = args.repeats or (20 if device == "cuda" else 7)
    args.global_px, args.local_px = (224, 128) if device == "cuda" else (32, 16)
    if device == "cpu":
        torch.set_num_threads(1)
    unknown = set(args.families) - set(FAMILIES)
    if unknown:
        parser.error(f"unknown families {sorted(unknown)}; known: {list(FAMILIES)}")

    load_at_start = os.getloadavg()
    results = run(args, device)
    report = dict(
        benchmark="training_step", date=datetime.datetime.now().isoformat(timespec="seconds"),
        **machine(device, ["lightly", "timm"]), torch_threads=torch.get_num_threads(),
        # a shared machine: other work inflates the absolute times
        load_average_at_start=load_at_start, load_average_at_end=os.getloadavg(),
        settings=dict(batch=args.batch, global_px=args.global_px, local_px=args.local_px, repeats=args.repeats,
                      warmup_rounds=args.warmup, seed=SEED, smoothing=SMOOTHING, neighbors=NEIGHBORS,
                      precision="bf16 autocast" if device == "cuda" else "float32",
                      families={k: dict(preset=p, overrides=o) for k, (p, o) in FAMILIES.items()},
                      step="zero_grad, (MoCo: momentum update, keys), queries / views, loss, backward, optimiser step",
                      timing="per variant: median of the timed rounds (p25-p75); variants interleaved round-robin "
                             "in one process through the same model; ratio_to_lightly: median over rounds of "
                             "step / lightly's step in the same round; min_ratio_to_lightly: fastest step over "
                             "lightly's fastest; loss_ms: the loss's fwd+bwd alone on the "
                             "step's embeddings, in the same rounds",
                      lightly_multicrop="lightly's NTXentLoss takes one query view: one call per query view, "
                                        "weighted sum (each call reads and updates its bank)",
                      no_ids="MoCo runs without sample ids (lightly has none), so every variant does the same work"),
        results=results,
    )
    stem = Path(args.out) if args.out else default_stem("training_step", slug(report["device"]))
    write_json(report, stem)
    plot(report, stem.with_suffix(".png"))
    print(f"wrote {stem.with_suffix('.json')} and {stem.with_suffix('.png')}")


if __name__ == "__main__":
    main()
