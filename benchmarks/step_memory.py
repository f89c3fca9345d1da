"""Peak memory of one training step against the global batch: the cached-gradient step
(`smooth_infonce.cached_step`, chunk 128) against the single pass.

One step = the recipe's whole step: momentum update, MoCo keys, queries, the smoothed loss against
the queue (read once, enqueued once), backward, optimiser step. The recipe is ``light_moco`` on a
lightweight backbone at a small image size, with a smaller queue than the preset's (4096 keys), so
that the loss's own state (the N x K logits of the CPU reference op) stays small next to the
encoder's activations, which are what the chunking bounds.

Every point (batch, mode) runs in a fresh process, after a warm-up step on one chunk (gradients
and optimiser state allocated, lazy initialisation done), so the measured growth is the step's
own: activations, embeddings, loss state.

- CPU: peak resident-set growth (VmHWM after ``clear_refs``, minus VmRSS before the step), glibc
  told to mmap every block >= 64 KiB (``MALLOC_MMAP_THRESHOLD_``) so that resident memory follows
  the live tensors; 1 torch thread.
- GPU: ``torch.cuda.max_memory_allocated`` during the step minus the memory allocated before it;
  ``--bf16`` runs the step under bf16 autocast. A point that runs out of memory is recorded as
  ``oom``.

The goal: the chunked growth from the smallest to the largest batch is at most 10 % of the
single pass's. Time: the chunked step's extra cost is the second forward (pass 1, without a
graph); ``second_pass`` times both steps alternated in one process at ``--time-batch`` images
(the one-step times of the memory points are recorded too, but one step on a shared machine is
noisy).

    .venv/bin/python benchmarks/step_memory.py --out benchmarks/results/step_memory_cpu
    .venv/bin/python benchmarks/step_memory.py --batches 256,1024 --backbone tiny_cnn   # a quick look
    python benchmarks/step_memory.py --image-size 96 --batches 256,1024,4096,16384 --out ...  # GPU

Without --out a run goes to benchmarks/runs/step_memory-<device>-<date-time>.json/.png (git-ignored).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from environment import default_stem, machine, slug, write_json  # noqa: E402
from throughput.timing import measure_peak_rss_growth  # noqa: E402

SEED = 0


def build_step(args, batch: int, chunk_size, device: str):
    """(step, warm_up): closures running one training step on ``batch`` images (warm_up: on one
    chunk's worth), chunked when ``chunk_size`` is set."""
    from smooth_infonce.integrations.lightly import build_loss
    from smooth_infonce.integrations.lightly.models import build_model
    from smooth_infonce.integrations.lightly.steps import cached_training_loss
    from smooth_infonce.integrations.recipes import get_preset
    from smooth_infonce.integrations.recipes.optim import build_optimizer

    torch.manual_seed(SEED)
    recipe = get_preset("light_moco", backbone__name=args.backbone, moco__queue_size=args.queue)
    model = build_model(recipe).to(device)
    criterion = build_loss(recipe, wait_for_full_bank=False).to(device)  # the smoothed loss from the first step
    optimizer = build_optimizer(model, recipe.optimizer, batch_size=batch)
    g = torch.Generator().manual_seed(SEED)
    views = [torch.randn(batch, 3, args.image_size, args.image_size, generator=g).to(device) for _ in range(2)]
    ids = torch.arange(batch, device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.bf16 and device == "cuda")

    def run(images, sample_ids):
        optimizer.zero_grad(set_to_none=False)  # gradients stay allocated: not part of the growth
        model.update_key_encoder()
        with autocast:
            loss = cached_training_loss(model, images, criterion, chunk_size, ids=sample_ids)
        optimizer.step()
        return loss

    warm = min(batch, args.chunk_size)
    return (lambda: run(views, ids)), (lambda: run([v[:warm] for v in views], ids[:warm]))


def measure_point(args) -> dict:
    """One (batch, mode) point in this process: warm-up, then one measured step."""
    device = "cuda" if args.device == "gpu" else "cpu"
    chunk_size = args.chunk_size if args.mode == "chunked" else None
    step, warm_up = build_step(args, args.batch, chunk_size, device)
    warm_up()
    row = dict(batch=args.batch, mode=args.mode, chunk_size=chunk_size)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        start = time.perf_counter()
        try:
            step()
            torch.cuda.synchronize()
        except torch.cuda.OutOfMemoryError:
            return {**row, "status": "oom"}
        row["step_s"] = time.perf_counter() - start
        row["peak_growth_mib"] = (torch.cuda.max_memory_allocated() - before) / 2**20
    else:
        start = time.perf_counter()
        row["peak_growth_mib"] = measure_peak_rss_growth(step) / 2**20
        row["step_s"] = time.perf_counter() - start
    return {**row, "status": "ok"}


def run_point(args, batch: int, mode: str) -> dict:
    command = [sys.executable, __file__, "--point", "--batch", str(batch), "--mode", mode, "--device", args.device,
               "--backbone", args.backbone, "--image-size", str(args.image_size), "--queue", str(args.queue),
               "--chunk-size", str(args.chunk_size)] + (["--bf16"] if args.bf16 else [])
    # every block >= 64 KiB mapped on its own and unmapped when freed: resident memory follows the tensors
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        return dict(batch=batch, mode=mode, status="error", note=done.stderr[-800:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def time_second_pass(args) -> dict:
    """The chunked step's time over the single pass's, in this process: both steps at
    ``--time-batch`` images, alternated for ``--time-rounds`` rounds after one warm-up each (the
    one-step times of the memory points are too noisy on a shared machine for this)."""
    device = "cuda" if args.device == "gpu" else "cpu"
    torch.set_num_threads(1)
    steps = {mode: build_step(args, args.time_batch, args.chunk_size if mode == "chunked" else None, device)[0]
             for mode in ("single", "chunked")}
    seconds = {mode: [] for mode in steps}
    for round_index in range(args.time_rounds + 1):
        for mode, step in steps.items():
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            if device == "cuda":
                torch.cuda.synchronize()
            if round_index:  # the first round warms up
                seconds[mode].append(time.perf_counter() - start)
    ratios = sorted(c / s for c, s in zip(seconds["chunked"], seconds["single"]))
    return dict(batch=args.time_batch, chunk_size=args.chunk_size, rounds=args.time_rounds,
                single_s=seconds["single"], chunked_s=seconds["chunked"],
                ratio_median=ratios[len(ratios) // 2], ratio_min=ratios[0], ratio_max=ratios[-1])


def summarise(results) -> dict:
    """Growth from the smallest to the largest batch per mode, their ratio, and the chunked step's
    time over the single pass's at each batch."""
    ok = {(r["batch"], r["mode"]): r for r in results if r.get("status") == "ok"}
    batches = sorted({b for b, _ in ok})
    out: dict = {"time_ratio_chunked_over_single": {}}
    for b in batches:
        if (b, "chunked") in ok and (b, "single") in ok:
            out["time_ratio_chunked_over_single"][str(b)] = ok[b, "chunked"]["step_s"] / ok[b, "single"]["step_s"]
    complete = [b for b in batches if (b, "chunked") in ok and (b, "single") in ok]
    if len(complete) >= 2:
        lo, hi = complete[0], complete[-1]
        growth = {mode: ok[hi, mode]["peak_growth_mib"] - ok[lo, mode]["peak_growth_mib"]
                  for mode in ("chunked", "single")}
        out.update(from_batch=lo, to_batch=hi, growth_mib=growth,
                   growth_ratio_chunked_over_single=growth["chunked"] / growth["single"],
                   goal="growth_ratio_chunked_over_single <= 0.10")
    return out


def plot(report, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (mem_ax, time_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    labels = {"single": "single pass", "chunked": f"cached step, chunk {report['settings']['chunk_size']}"}
    for mode, color in (("single", "tab:red"), ("chunked", "tab:blue")):
        rows = sorted((r for r in report["results"] if r["mode"] == mode and r.get("status") == "ok"),
                      key=lambda r: r["batch"])
        if not rows:
            continue
        batches = [r["batch"] for r in rows]
        mem_ax.plot(batches, [r["peak_growth_mib"] for r in rows], "o-", color=color, label=labels[mode])
        time_ax.plot(batches, [r["step_s"] for r in rows], "o-", color=color, label=labels[mode])
    for ax, ylabel in ((mem_ax, "peak memory growth of one step (MiB)"), (time_ax, "step time (s, one step)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("global batch (images)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    s, summary = report["settings"], report["summary"]
    ratio = summary.get("growth_ratio_chunked_over_single")
    mem_ax.set_title(f"growth {summary.get('from_batch')} -> {summary.get('to_batch')}: chunked / single = "
                     f"{ratio:.3f}" if ratio is not None else "growth", fontsize=9)
    second = report.get("second_pass")
    if second:
        time_ax.set_title(f"both steps alternated at {second['batch']} images: chunked / single = "
                          f"{second['ratio_median']:.2f} (median of {second['rounds']})", fontsize=9)
    fig.suptitle(f"{report['device']}: light_moco, {s['backbone']} at {s['image_size']} px, queue {s['queue']}, "
                 f"torch {report['torch']}, {report['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=None,
                        help="global batches (default: 256,512,1024,2048,4096)")
    parser.add_argument("--chunk-size", type=int, default=128)
    parser.add_argument("--backbone", default="mobilenetv3_large_100")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--queue", type=int, default=4096, help="MoCo queue (keys)")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="gpu" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="GPU: bf16 autocast")
    parser.add_argument("--time-batch", type=int, default=512,
                        help="batch of the alternated timing of the two steps (0: skip it)")
    parser.add_argument("--time-rounds", type=int, default=3)
    parser.add_argument("--out", help="output path without suffix (default: "
                        "benchmarks/runs/step_memory-<device>-<time>)")
    parser.add_argument("--timing-only", action="store_true",
                        help="only the alternated timing; the memory points of an earlier run at --out are kept")
    parser.add_argument("--point", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=("single", "chunked"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.point:
        torch.set_num_threads(1)
        print(json.dumps(measure_point(args)), flush=True)
        return

    batches = args.batches or [256, 512, 1024, 2048, 4096]
    load_at_start = os.getloadavg()
    results, memory_date = [], None
    earlier = Path(args.out).with_suffix(".json") if args.out else None
    if args.timing_only and earlier is not None and earlier.exists():
        previous = json.loads(earlier.read_text())
        results, memory_date = previous["results"], previous.get("memory_points_date", previous["date"])
        batches = []
    for batch in batches:
        for mode in ("single", "chunked"):  # side by side per batch: a changing load hits both alike
            row = run_point(args, batch, mode)
            results.append(row)
            print(json.dumps(row), flush=True)
    second_pass = time_second_pass(args) if args.time_batch else None
    print(json.dumps(second_pass), flush=True)
    report = dict(
        benchmark="step_memory", date=datetime.datetime.now().isoformat(timespec="seconds"),
        **machine("cuda" if args.device == "gpu" else "cpu", ["lightly", "timm"]), torch_threads=1,
        memory_points_date=memory_date or datetime.datetime.now().isoformat(timespec="seconds"),
        load_average_at_start=load_at_start, load_average_at_end=os.getloadavg(),
        settings=dict(recipe="light_moco", backbone=args.backbone, image_size=args.image_size, queue=args.queue,
                      chunk_size=args.chunk_size, views=2, seed=SEED, bf16=args.bf16, device=args.device,
                      step="update_key_encoder, keys (chunked in the cached step), queries, smoothed loss "
                           "(neighbours) against the queue, backward, SGD step",
                      memory=("peak RSS growth (VmHWM after clear_refs, minus VmRSS) of one step, fresh process "
                              "per point, after a warm-up step on one chunk, MALLOC_MMAP_THRESHOLD_=65536, "
                              "1 torch thread" if args.device == "cpu" else
                              "torch.cuda.max_memory_allocated during one step minus allocated before, fresh "
                              "process per point, after a warm-up step on one chunk"),
                      timing="step_s: the one memory step of each point, wall clock (noisy on a shared "
                             "machine); second_pass: both steps alternated in one process, median of the "
                             "per-round ratios"),
        results=results, summary=summarise(results), second_pass=second_pass,
    )
    stem = Path(args.out) if args.out else default_stem("step_memory", slug(report["device"]))
    write_json(report, stem)
    plot(report, stem.with_suffix(".png"))
    print(json.dumps(report["summary"], indent=1))
    print(f"wrote {stem.with_suffix('.json')} and {stem.with_suffix('.png')}")


if __name__ == "__main__":
    main()
