"""What a run leaves behind, beside the machine record and the JSON writer of benchmarks/environment.py:
the JSON with its plot (a study's outcome also added to the benchmark's JSON), the lines printed per
CPU row, and the text summaries that --summary prints from a JSON of any mode."""

from __future__ import annotations

import json
from pathlib import Path

from environment import write_json

from .problems import CPU_SHAPES, GPU_SHAPES
from .studies import tile_suggestion, variant_suggestion

# ================================================================================================
# The JSON and its plot
# ================================================================================================

def write(report, stem: Path, plot):
    write_json(report, stem)
    json_path, png_path = stem.with_suffix(".json"), stem.with_suffix(".png")
    try:
        plot(report, png_path)
    except ImportError as err:  # the GPU image may have no matplotlib: the JSON holds everything
        print(f"wrote {json_path}; no plot ({err}): plot it elsewhere from the JSON")
        return
    print(f"wrote {json_path} and {png_path}")


def record_outcome(record_in, key, stem, fastest):
    """The benchmark's results JSON (`record_in`, when it exists) gets a study's outcome too, under
    `key`: its own results file and the fastest choices."""
    if record_in and Path(record_in).is_file():
        main_report = json.loads(Path(record_in).read_text())
        main_report[key] = dict(file=str(stem.with_suffix(".json")), fastest=fastest)
        write_json(main_report, Path(record_in).with_suffix(""))


# ================================================================================================
# Plots
# ================================================================================================

def plot_cpu(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({r["shape"] for r in report["results"]}, key=list(CPU_SHAPES).index)
    fig, axes = plt.subplots(2, len(shapes), figsize=(5.5 * len(shapes), 6), squeeze=False)
    for col, shape in enumerate(shapes):
        rows = [r for r in report["results"] if r["shape"] == shape]
        names = [r["provider"] for r in rows]
        for row_i, (key, label) in enumerate((("fwdbwd_ms", "fwd+bwd ms"), ("peak_extra_mib", "peak extra MiB"))):
            ax = axes[row_i][col]
            ax.barh(names, [r[key] for r in rows], color="tab:blue")
            ax.set_xlabel(label)
            ax.set_title(f"{shape} (N=M={rows[0]['N']}, D={rows[0]['D']})" if row_i == 0 else "")
            ax.invert_yaxis()
    fig.suptitle(f"CPU: {report['cpu']} -- torch {report['torch']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_gpu(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = [s for s in GPU_SHAPES if any(r["shape"] == s for r in report["results"])]
    if not shapes:
        return
    fig, axes = plt.subplots(1, len(shapes), figsize=(4.2 * len(shapes), 5), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        rows = [r for r in report["results"] if r["shape"] == shape and r.get("fwdbwd_ms")]
        names = [r["provider"] for r in rows]
        times = [r["fwdbwd_ms"] for r in rows]
        colors = ["tab:green" if n.startswith("triton") else "tab:gray" if n in ("gemm-bf16", "sdpa-bf16")
                  else "tab:blue" for n in names]
        ax.barh(names, times, color=colors)
        ax.set_xscale("log")
        ax.invert_yaxis()
        layout, n, m, d = GPU_SHAPES[shape]
        ax.set_title(f"{shape}: {layout} N={n} M={m} D={d}", fontsize=8)
        ax.set_xlabel("fwd+bwd ms (log)")
        for y, r in enumerate(rows):
            if "fraction_of_gemm_ceiling" in r:
                ax.text(r["fwdbwd_ms"], y, f" {100 * r['fraction_of_gemm_ceiling']:.0f}%", va="center", fontsize=6)
    fig.suptitle(f"{report['gpu']} -- torch {report['torch']}, triton {report['triton']} "
                 "(% = useful TFLOP/s over the same-run bf16 GEMM rate)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ================================================================================================
# Text
# ================================================================================================

def cpu_row_line(row) -> str:
    """One CPU result as the run prints it: shape, provider, fwd+bwd time, peak memory growth."""
    return (f"{row['shape']:11s} {row['provider']:20s} {row['fwdbwd_ms']:9.2f} ms  "
            f"{row['peak_extra_mib']:8.1f} MiB")


def cpu_summary(report) -> str:
    """The lines of a CPU run, with each row's time and memory over lightly's where lightly ran."""
    lines = [f"{report['cpu']}, torch {report['torch']}, {report['date']}"]
    for r in report["results"]:
        lines.append(cpu_row_line(r) + (f"  time {r['time_vs_lightly']:.2f}x, memory {r['memory_vs_lightly']:.2f}x "
                                        "lightly's" if "time_vs_lightly" in r else ""))
    return "\n".join(lines)


PEERS = ["reference-fp32", "reference-bf16-autocast", "reference-compiled", "lightly-ntxent", "infcl", "memeff"]


def summary(report) -> str:
    """Per shape and kernel provider: fwd+bwd time, time ratio of each peer that ran (> 1: the
    peer is slower), fraction of the same-run bf16 GEMM rate, peak extra memory; S6 gate results."""
    lines = [f"{report['gpu']}, torch {report['torch']}, triton {report['triton']}, {report['date']}",
             f"{'shape':5s} {'provider':17s} {'fwd+bwd ms':>10s} {'% of bf16 GEMM':>14s} {'peak MiB':>9s}  "
             "peer time / this time"]
    for shape in GPU_SHAPES:
        rows = {r["provider"]: r for r in report["results"] if r["shape"] == shape}
        for name, row in rows.items():
            if not name.startswith("triton") or row.get("status") != "ok":
                if name.startswith("triton") and row.get("status") != "ok":
                    lines.append(f"{shape:5s} {name:17s} {row.get('status')}: {row.get('note', '')}")
                continue
            peers = []
            for peer in PEERS:
                other = rows.get(peer)
                if other is None:
                    continue
                if other.get("status") == "ok":
                    peers.append(f"{peer} {other['fwdbwd_ms'] / row['fwdbwd_ms']:.2f}x")
                else:
                    peers.append(f"{peer} {other.get('status')}")
            fraction = row.get("fraction_of_gemm_ceiling")
            lines.append(f"{shape:5s} {name:17s} {row['fwdbwd_ms']:10.3f} "
                         f"{'-' if fraction is None else f'{100 * fraction:.1f}':>14s} "
                         f"{row.get('peak_extra_mib', float('nan')):9.1f}  {', '.join(peers) or '-'}")
    if report.get("tile_candidates"):
        lines.append(tile_suggestion(report["tile_candidates"]["fastest"]))
    if report.get("variants"):
        lines.append(variant_suggestion(report["variants"]["fastest"]))
    s6 = report.get("correctness_s6") or []
    if s6:
        failed = [r for r in s6 if not r["pass"]]
        lines.append(f"S6 correctness: {len(s6) - len(failed)}/{len(s6)} within the gates"
                     + "".join(f"\n  FAIL D={r['D']} tau={r['temperature']} k={r['neighbors']} {r['dtype']}: "
                               f"loss {r['loss_rel_err']:.2e}, grad {r['grad_rel_err']:.2e}" for r in failed))
    return "\n".join(lines)


def warmup_summary(report) -> str:
    lines = [f"{'shape':5s} {'task':22s} {'compile s':>9s} {'run ms':>9s}  status"]
    for r in report["results"]:
        if r["status"] == "ok":
            lines.append(f"{r['shape']:5s} {r['task']:22s} {r['compile_s']:9.2f} {1e3 * r['second_s']:9.2f}  ok")
        else:
            lines.append(f"{r['shape']:5s} {r['task']:22s} {'-':>9s} {'-':>9s}  {r['status']}: {r.get('note', '')}")
    ok = sum(r["status"] == "ok" for r in report["results"])
    lines.append(f"Triton compile: {report['cubins_after'] - report['cubins_before']} new kernels "
                 f"({'cold' if report['cold_cache'] else 'warm'} cache {report['triton_cache']}), "
                 f"{report['wall_s']:.1f} s wall in {report['jobs']} processes, sum of per-task compile "
                 f"{report['compile_s_sum']:.1f} s; {ok}/{len(report['results'])} tasks ok; process start "
                 f"{max(report['worker_init_s'] or [0]):.1f} s")
    return "\n".join(lines)


def summarize(report) -> str:
    """The text --summary prints for a results JSON of any mode."""
    mode = report.get("mode")
    if mode == "tile-candidates":
        return tile_suggestion(report["fastest"])
    if mode == "variants":
        return variant_suggestion(report["fastest"])
    if mode == "warmup":
        return warmup_summary(report)
    if mode == "cpu":
        return cpu_summary(report)
    return summary(report)
