"""The toolkit drop-ins against the losses they replace: time and peak memory of one forward +
backward of open_clip's ``ClipLoss`` against `SmoothClipLoss` (smoothing 0, and 0.1 with k = 5
neighbours), and of sentence-transformers' ``MultipleNegativesRankingLoss`` against
`SmoothMultipleNegativesRankingLoss` (the same two settings), at a growing batch of N pairs, D = 512.

Inputs: N image / text features (unit rows, as open_clip's models give them) and a logit scale
that requires grad; N (anchor, positive) embedding pairs for MNRL (``compute_loss_from_embeddings``,
cos_sim, scale 20). Every provider's point is one fwd+bwd of the loss on its inputs (gradients of
both sides and of the logit scale).

- CPU (default): each provider runs in a fresh process, the batches in increasing order after a
  warm-up at the smallest one; at each batch the first fwd+bwd gives the peak resident-set growth
  (VmHWM after ``clear_refs`` minus VmRSS before, glibc told to mmap every block >= 64 KiB so that
  resident memory follows the live tensors: `throughput.timing.measure_peak_rss_growth`, as
  `kernel_throughput.py` and `step_memory.py` measure) and its wall time; ``--repeats`` more runs
  (default 2 up to 4096 pairs, 0 above) make the time a median. 1 torch thread. A provider whose
  point fails (out of memory) records the error and skips its larger batches.
- GPU (``--device cuda``): every provider in one process, the time a median of CUDA-event timed
  runs after a warm-up, the peak ``torch.cuda.max_memory_allocated`` during fwd+bwd minus the
  memory allocated before; the smoothed losses take the fused Triton kernel (backend "auto"), the
  library losses their own eager code. An out-of-memory point is recorded as ``oom``.

    .venv/bin/python benchmarks/contrastive_losses.py --out benchmarks/results/contrastive_losses_cpu
    .venv/bin/python benchmarks/contrastive_losses.py --batches 1024,2048 --providers clip,smooth_clip_knn  # a look
    python benchmarks/contrastive_losses.py --device cuda --batches 4096,16384,65536 --out ...   # GPU

Without --out a run goes to benchmarks/runs/contrastive_losses-<device>-<date-time>.json/.md/.png
(git-ignored). The JSON is rewritten after every point; at the end it gets ``ratios``: each smoothed
loss's time and memory over its library loss's at the same batch (what the docs quote), and
``--rewrite STEM`` redoes the ratios, the table and the plot from a JSON.
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

PROVIDERS = {  # name: (family, what it is)
    "clip": ("clip", "open_clip ClipLoss"),
    "smooth_clip_0": ("clip", "SmoothClipLoss, smoothing 0"),
    "smooth_clip_knn": ("clip", "SmoothClipLoss, smoothing 0.1, k = 5"),
    "mnrl": ("mnrl", "sentence-transformers MultipleNegativesRankingLoss"),
    "smooth_mnrl_0": ("mnrl", "SmoothMultipleNegativesRankingLoss, smoothing 0"),
    "smooth_mnrl_knn": ("mnrl", "SmoothMultipleNegativesRankingLoss, smoothing 0.1, k = 5"),
}
BATCHES = (1024, 2048, 4096, 8192, 16384)
WIDTH, SEED = 512, 0


def build_step(provider: str, batch: int, width: int, device: str):
    """A closure running one fwd+bwd of ``provider`` on fresh inputs of ``batch`` pairs."""
    g = torch.Generator().manual_seed(SEED)
    a = torch.nn.functional.normalize(torch.randn(batch, width, generator=g), dim=1).to(device).requires_grad_()
    b = torch.nn.functional.normalize(torch.randn(batch, width, generator=g), dim=1).to(device).requires_grad_()
    family = PROVIDERS[provider][0]
    if family == "clip":
        from open_clip.loss import ClipLoss

        from smooth_infonce.integrations.open_clip import SmoothClipLoss

        loss = {"clip": lambda: ClipLoss(), "smooth_clip_0": lambda: SmoothClipLoss(validate=False),
                "smooth_clip_knn": lambda: SmoothClipLoss(smoothing=0.1, neighbors=5, validate=False)}[provider]()
        scale = torch.tensor(1 / 0.07, device=device, requires_grad=True)

        def step():
            value = loss(a, b, scale)
            value.backward()
            a.grad = b.grad = scale.grad = None
            return value.detach()
    else:
        from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

        from smooth_infonce.integrations.sentence_transformers import SmoothMultipleNegativesRankingLoss

        model = torch.nn.Identity()  # compute_loss_from_embeddings never calls the model
        loss = {"mnrl": lambda: MultipleNegativesRankingLoss(model),
                "smooth_mnrl_0": lambda: SmoothMultipleNegativesRankingLoss(model, validate=False),
                "smooth_mnrl_knn": lambda: SmoothMultipleNegativesRankingLoss(model, smoothing=0.1, neighbors=5,
                                                                               validate=False)}[provider]()

        def step():
            value = loss.compute_loss_from_embeddings([a, b], None)
            value.backward()
            a.grad = b.grad = None
            return value.detach()
    return step


# --- CPU: one fresh process per provider ----------------------------------------------------------

def cpu_provider(provider: str, batches, width: int, repeats_small: int, repeats_large: int) -> None:
    """Runs in the child process: prints one JSON line per batch."""
    torch.set_num_threads(1)
    build_step(provider, batches[0], width, "cpu")()  # warm-up: lazy initialisation, first-call costs
    for batch in batches:
        try:
            step = build_step(provider, batch, width, "cpu")
            start = time.perf_counter()
            peak = measure_peak_rss_growth(step)
            times = [time.perf_counter() - start]
            for _ in range(repeats_small if batch <= 4096 else repeats_large):
                start = time.perf_counter()
                step()
                times.append(time.perf_counter() - start)
            row = dict(batch=batch, seconds=sorted(times)[len(times) // 2], runs=len(times),
                       peak_mib=peak / 2**20)
        except (RuntimeError, MemoryError) as err:
            row = dict(batch=batch, error=f"{type(err).__name__}: {err}"[:300])
        print(json.dumps(row), flush=True)
        if "error" in row:
            return


def run_cpu(args, report, stem) -> None:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    for provider in args.providers:
        code = (f"import sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r})\n"
                "from contrastive_losses import cpu_provider\n"
                f"cpu_provider({provider!r}, {list(args.batches)!r}, {args.width}, {args.repeats}, "
                f"{args.repeats_large})\n")
        child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
        done = set()
        for line in child.stdout:
            row = json.loads(line)
            done.add(row["batch"])
            report["points"].append(dict(provider=provider, **row))
            print(f"{provider:16s} {row}", flush=True)
            write(report, stem, final=False)
        if child.wait() != 0:  # killed (out of memory) or failed: the rest of its batches
            for batch in args.batches:
                if batch not in done:
                    report["points"].append(dict(provider=provider, batch=batch,
                                                 error=f"process exited with {child.returncode}"))
                    break
        write(report, stem, final=False)


# --- GPU: every provider in one process --------------------------------------------------------------

def run_cuda(args, report, stem) -> None:
    for batch in args.batches:
        for provider in args.providers:
            try:
                step = build_step(provider, batch, args.width, "cuda")
                for _ in range(3):
                    step()
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
                step()
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated() - before
                times = []
                for _ in range(args.repeats_cuda):
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    step()
                    end.record()
                    torch.cuda.synchronize()
                    times.append(start.elapsed_time(end) / 1000)
                row = dict(batch=batch, seconds=sorted(times)[len(times) // 2], runs=len(times),
                           peak_mib=peak / 2**20)
            except torch.cuda.OutOfMemoryError:
                row = dict(batch=batch, error="oom")
            del step
            torch.cuda.empty_cache()
            report["points"].append(dict(provider=provider, **row))
            print(f"{provider:16s} {row}", flush=True)
            write(report, stem, final=False)


# --- the report --------------------------------------------------------------------------------------

def ratios(report) -> list:
    """Each smoothed provider's time and peak memory over its library loss's, batch by batch."""
    points = {(p["provider"], p["batch"]): p for p in report["points"] if "error" not in p}
    rows = []
    for provider, (family, _) in PROVIDERS.items():
        if provider == family:
            continue
        for batch in report["batches"]:
            mine, library = points.get((provider, batch)), points.get((family, batch))
            if mine and library:
                # a growth below the RSS counters' resolution reads 0 MiB: no memory ratio there
                memory = mine["peak_mib"] / library["peak_mib"] if library["peak_mib"] > 0 else None
                rows.append(dict(provider=provider, library=family, batch=batch,
                                 time_ratio=mine["seconds"] / library["seconds"], memory_ratio=memory))
    return rows


def table(report) -> str:
    """Markdown: per batch, each provider's time and peak memory; ratios to the library loss."""
    points = {(p["provider"], p["batch"]): p for p in report["points"]}
    providers = [p for p in PROVIDERS if any(key[0] == p for key in points)]
    lines = ["| pairs | " + " | ".join(providers) + " |", "|---" * (len(providers) + 1) + "|"]
    by_ratio = {(r["provider"], r["batch"]): r for r in report.get("ratios", [])}
    for batch in report["batches"]:
        cells = []
        for provider in providers:
            point = points.get((provider, batch))
            if point is None:
                cells.append("")
            elif "error" in point:
                cells.append(point["error"].split(":")[0])
            else:
                cell = f"{point['seconds']:.3g} s, {point['peak_mib']:.0f} MiB"
                ratio = by_ratio.get((provider, batch))
                if ratio:
                    memory = "-" if ratio["memory_ratio"] is None else f"{ratio['memory_ratio']:.2f}x"
                    cell += f" ({ratio['time_ratio']:.2f}x, {memory})"
                cells.append(cell)
        lines.append(f"| {batch} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(report, png: Path) -> None:
    try:
        import matplotlib
    except ImportError:  # a bare GPU machine: the JSON and the table are the results
        print(f"no plot ({png.name}): matplotlib is not importable")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for provider, (family, label) in PROVIDERS.items():
        rows = [p for p in report["points"] if p["provider"] == provider and "error" not in p]
        if not rows:
            continue
        style = dict(marker="o", linestyle="-" if family == "clip" else "--", label=label)
        axes[0].plot([r["batch"] for r in rows], [r["seconds"] for r in rows], **style)
        axes[1].plot([r["batch"] for r in rows], [r["peak_mib"] for r in rows], **style)
    for ax, ylabel in zip(axes, ["fwd+bwd time, s", "peak memory growth, MiB"]):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(f"pairs (D = {report['width']})")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    env = report["environment"]
    fig.suptitle(f"contrastive losses, {env['device']}, torch {env['torch']}, {env['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def write(report, stem: Path, final: bool) -> None:
    if final:
        report["ratios"] = ratios(report)
    write_json(report, stem)
    if not final:
        return
    env = report["environment"]
    header = (f"Contrastive losses, fwd+bwd of N pairs, D = {report['width']}: time (median of the stated runs) "
              f"and peak memory growth. {env['device']}, torch {env['torch']}, open_clip_torch "
              f"{env['open_clip_torch']}, sentence-transformers {env['sentence_transformers']}, {env['date']}. "
              "In brackets: time and memory over the library loss's at the same batch.\n"
              f"Command: `{report['command']}`\n\n")
    stem.with_suffix(".md").write_text(header + table(report) + "\n")
    plot(report, stem.with_suffix(".png"))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=list(BATCHES))
    parser.add_argument("--providers", type=lambda s: s.split(","), default=list(PROVIDERS))
    parser.add_argument("--width", type=int, default=WIDTH)
    parser.add_argument("--repeats", type=int, default=2, help="CPU: timed runs after the first, up to 4096 pairs")
    parser.add_argument("--repeats-large", type=int, default=0, help="CPU: the same above 4096 pairs")
    parser.add_argument("--repeats-cuda", type=int, default=20, help="GPU: timed runs per point")
    parser.add_argument("--out", type=Path, help="file stem of the JSON / MD / PNG (default: benchmarks/runs/...)")
    parser.add_argument("--rewrite", type=Path, metavar="STEM", help="redo the ratios, table and plot of STEM.json")
    args = parser.parse_args(argv)
    if args.rewrite:
        report = json.loads(args.rewrite.with_suffix(".json").read_text())
        write(report, args.rewrite, final=True)
        print(table(report))
        return
    unknown = set(args.providers) - set(PROVIDERS)
    if unknown:
        parser.error(f"unknown providers {sorted(unknown)}; choose from {list(PROVIDERS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA device")
    env = dict(date=f"{datetime.date.today()}",
               **machine(args.device, ["open_clip_torch", "sentence_transformers", "smooth_infonce"]))
    if args.device == "cpu":
        env["threads"] = 1  # every provider's process sets it
    stem = args.out or default_stem("contrastive_losses", slug(env["device"]))
    command = "python benchmarks/contrastive_losses.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report = dict(environment=env, width=args.width, batches=args.batches, providers=args.providers,
                  command=command.strip(), repeats=dict(small=args.repeats, large=args.repeats_large,
                                                         cuda=args.repeats_cuda), points=[])
    (run_cuda if args.device == "cuda" else run_cpu)(args, report, stem)
    write(report, stem, final=True)
    print(table(report))
    print(f"wrote {stem.with_suffix('.json')}, .md, .png")


if __name__ == "__main__":
    main()
