"""What each stage plans and what its timings conclude, apart from running it (benchmark.py and
study_runs.py run the plans on the machine; nothing here needs a GPU):

- the GPU benchmark's order: providers in three phases, what matters most first;
- the compile warm-up's tasks: the Triton launches the benchmark makes;
- the tile candidates: the TILE_TABLE entries of the shapes timed, their valid neighbours, an
  in-process override of one entry, the fastest per entry and the table change it suggests;
- the speed variants: which KernelVariants axes are timed where, the fastest per (shape, axis) and
  the defaults to change.
"""

from __future__ import annotations

import contextlib
import statistics

import torch

from .problems import NEIGHBORS, S6_DIMS, S6_DTYPES

# ================================================================================================
# The GPU benchmark's order
# ================================================================================================

# The order of a GPU run: what matters most first, so that a run stopped by --budget keeps it. Phase
# 1: the kernels and the GEMM ceiling at every shape (and S6); phase 2: the peers; phase 3:
# torch.compile's reference, whose cold compile takes the longest.
PHASES = (("triton-uniform", "triton-neighbors", "gemm-bf16"), None, ("reference-compiled",))


def provider_phases(providers):
    first, last = PHASES[0], PHASES[2]
    return [[p for p in providers if p in first], [p for p in providers if p not in first and p not in last],
            [p for p in providers if p in last]]


# ================================================================================================
# Compile warm-up (--warmup)
# ================================================================================================

def warmup_tasks(shapes, providers):
    """(shape, what) pairs: every Triton kernel provider at the timed shapes, and every S6
    configuration (D, neighbours, dtype): the launches the benchmark makes, hence its kernels."""
    tasks = []
    for shape in shapes:
        if shape == "S6":
            tasks += [("S6", f"{d}:{k or 0}:{str(dtype).replace('torch.', '')}")
                      for d in S6_DIMS for k in (None, NEIGHBORS) for dtype in S6_DTYPES]
            continue
        for provider in providers:
            if provider.startswith("triton") and not (provider == "triton-fp32" and shape == "S4"):
                tasks.append((shape, provider))
    return tasks


# ================================================================================================
# Tile candidates (--tile-candidates): a few zero-spill neighbours of the table's tiles
# ================================================================================================

# Shapes timed with candidates, the compile-report configuration that plans the same launches
# (benchmarks/compile_report.py: layout, D, dtype, mode, deterministic) and the kernels of
# TILE_TABLE that the shape's bf16 uniform fwd+bwd (provider triton-uniform) launches: the in-batch
# default backward is candidate_grad (dC + atomic dA), the frozen MoCo queue needs dA only.
TILE_SHAPES = {
    "S1": (("inbatch", 128, "bf16", "uniform", False), ("forward", "candidate_grad")),
    "S3": (("moco", 128, "bf16", "uniform", False), ("forward", "anchor_grad")),
}
TILE_PROVIDER = "triton-uniform"
TILE_NEIGHBOURS = 4  # timed neighbours per kernel at most (besides the table's choice)
TILE_MIN_SPEEDUP = 1.03  # a candidate must beat the table's choice by this to be suggested (noise)
DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16"}


def table_key(dim: int, dtype: torch.dtype, precision: str = "ieee", arch: int = 90):
    """The TILE_TABLE key (arch family, dot kind, D range) that `choose_tiles` reads for D = `dim`."""
    from smooth_infonce.ops import triton as host

    padded = max(16, host._next_power_of_two(dim))
    family = "sm90" if arch >= 90 else "sm80"
    kind = host._dot_kind(dtype, precision)
    return family, kind, min(k[2] for k in host.TILE_TABLE if k[:2] == (family, kind) and k[2] >= padded)


@contextlib.contextmanager
def tile_override(overrides):
    """Within the block, launches use other tiles: `overrides` maps (TILE_TABLE key, kernel) to a
    table entry (dict as `_t` makes; missing fields keep the table's). The table dict is patched
    in-process (the host reads it at every launch) and restored on exit, exception or not."""
    from smooth_infonce.ops import triton as host

    saved = []
    try:
        for (key, kernel), tile in overrides.items():
            entry = host.TILE_TABLE[tuple(key)]
            saved.append((entry, kernel, entry[kernel]))
            entry[kernel] = {**entry[kernel], **tile}
        yield
    finally:
        for entry, kernel, old in reversed(saved):
            entry[kernel] = old


def _valid_tile(tile) -> bool:
    """Every tl.dot dimension a power of two >= 16, a tile of at most 128 x 128 (256 x 64), 4 or 8
    warps, 1 to 4 pipeline stages; a streamed D chunk of >= 16 features."""
    def pow2(x):
        return x >= 16 and x & (x - 1) == 0

    return (pow2(tile["rows"]) and pow2(tile["cols"]) and tile["rows"] <= 256 and tile["cols"] <= 256
            and tile["rows"] * tile["cols"] <= 128 * 128 and tile["warps"] in (4, 8) and 1 <= tile["stages"] <= 4
            and (tile["chunk"] is None or pow2(tile["chunk"])) and (tile["out"] is None or pow2(tile["out"])))


def tile_candidates(current, limit=None):
    """The table's entry first, then its valid neighbours, most promising first: one more / one
    fewer pipeline stage, double / half the candidate columns (BLOCK_M), double / half the anchor
    rows (BLOCK_N), the other warp count. At most `limit` neighbours (None: all)."""
    current = dict(current)
    moves = [("stages", lambda v: v + 1), ("stages", lambda v: v - 1), ("cols", lambda v: 2 * v),
             ("cols", lambda v: v // 2), ("rows", lambda v: 2 * v), ("rows", lambda v: v // 2),
             ("warps", lambda v: 4 if v == 8 else 8)]
    out = [current]
    for field, move in moves:
        tile = {**current, field: move(current[field])}
        if _valid_tile(tile) and tile not in out:
            out.append(tile)
    return out[:1 + limit] if limit is not None else out


def tile_text(tile) -> str:
    """The entry as TILE_TABLE's source writes it: _t(rows, cols, warps, stages[, chunk, out])."""
    extra = "" if tile["chunk"] is None and tile["out"] is None else f", chunk={tile['chunk']}, out={tile['out']}"
    return f"_t({tile['rows']}, {tile['cols']}, {tile['warps']}, {tile['stages']}{extra})"


def tile_jobs(arch: int, limit=None):
    """Every (shape, TILE_TABLE key, kernel, candidate) of the tile stage, the table's choice first."""
    from smooth_infonce.ops import triton as host

    jobs = []
    for shape, (config, kernels) in TILE_SHAPES.items():
        key = table_key(config[1], getattr(torch, DTYPE_NAMES[config[2]]), "ieee", arch)
        for kernel in kernels:
            for i, tile in enumerate(tile_candidates(host.TILE_TABLE[key][kernel], limit)):
                jobs.append(dict(shape=shape, key=list(key), kernel=kernel, tile=tile, current=i == 0))
    return jobs


def fastest_tiles(rows):
    """Per (TILE_TABLE key, kernel): every candidate's time per shape, the fastest candidate (the
    geometric mean of its speedup over the table's choice across the shapes that timed both) and
    its speedup per shape."""
    groups = {}
    for r in rows:
        if r.get("status") != "ok":
            continue
        g = groups.setdefault((tuple(r["key"]), r["kernel"]), dict(current=None, times={}))
        text = tile_text(r["tile"])
        if r["current"]:
            g["current"] = r["tile"]
        g["times"].setdefault(text, dict(tile=r["tile"], ms={}))["ms"][r["shape"]] = r["fwdbwd_ms"]
    out = []
    for (key, kernel), g in groups.items():
        if g["current"] is None:
            continue
        base = g["times"][tile_text(g["current"])]["ms"]
        best, best_score, best_speedups = g["current"], 1.0, {s: 1.0 for s in base}
        for cand in g["times"].values():
            speedups = {s: base[s] / ms for s, ms in cand["ms"].items() if s in base}
            if not speedups:
                continue
            score = statistics.geometric_mean(speedups.values())
            if score > best_score:
                best, best_score, best_speedups = cand["tile"], score, speedups
        out.append(dict(key=list(key), kernel=kernel, current=g["current"], fastest=best, speedup=best_score,
                        speedup_per_shape=best_speedups,
                        times_ms={text: c["ms"] for text, c in g["times"].items()}))
    return out


def tile_suggestion(fastest, min_speedup=TILE_MIN_SPEEDUP) -> str:
    """The TILE_TABLE change the timings suggest, one line per entry: old -> new, speedup."""
    if not fastest:
        return "tile candidates: nothing timed"
    lines = [f"Suggested TILE_TABLE change (fastest candidate, speedup over the table's choice; at least "
             f"{min_speedup:.2f}x to count):"]
    for f in fastest:
        where = f"TILE_TABLE[{', '.join(repr(k) for k in f['key'])}][{f['kernel']!r}]"
        shapes = ", ".join(f"{s} {v:.2f}x" for s, v in sorted(f["speedup_per_shape"].items()))
        if f["fastest"] != f["current"] and f["speedup"] >= min_speedup:
            lines.append(f"- {where}: {tile_text(f['current'])} -> {tile_text(f['fastest'])}  "
                         f"{f['speedup']:.2f}x ({shapes})")
        else:
            lines.append(f"  {where}: keep {tile_text(f['current'])} ({len(f['times_ms']) - 1} candidates timed"
                         + ("" if f["fastest"] == f["current"] else
                            f"; best {tile_text(f['fastest'])} only {f['speedup']:.2f}x") + ")")
    return "\n".join(lines)


# ================================================================================================
# Speed variants (--variants): each KernelVariants alternative against the default
# ================================================================================================

# axis: (alternatives, shapes, neighbour modes). Where the variant can matter: the top-k only with
# neighbours; no atomics at S3 (frozen queue: dA only, no fused atomics); grad_d changes nothing at
# D 128 bf16 (D is held in registers, one output block already), so it is timed at S2 (D 256),
# where the table writes two output blocks.
VARIANT_NEIGHBORS = 5
VARIANT_AXES = {
    "topk": (("two_pass",), ("S1", "S3", "S4"), (VARIANT_NEIGHBORS,)),
    "atomics": (("red",), ("S1", "S4"), (None, VARIANT_NEIGHBORS)),
    "splits": (("occupancy",), ("S1", "S3", "S4"), (None, VARIANT_NEIGHBORS)),
    "grad_d": (("one_block",), ("S2",), (None,)),
}
VARIANT_SHAPE_ORDER = ("S1", "S3", "S2", "S4")  # cheapest first: a run stopped by --budget keeps most
VARIANT_MIN_SPEEDUP = 1.03  # an alternative must beat the default by this at every shape timed (noise)


def variant_jobs(axes=None, shapes=None):
    """(shape, neighbors) -> the axes timed there, in VARIANT_SHAPE_ORDER."""
    jobs = {}
    for axis, (_, axis_shapes, modes) in VARIANT_AXES.items():
        if axes and axis not in axes:
            continue
        for shape in axis_shapes:
            if shapes and shape not in shapes:
                continue
            for k in modes:
                jobs.setdefault((shape, k), []).append(axis)
    return sorted(jobs.items(), key=lambda item: (VARIANT_SHAPE_ORDER.index(item[0][0]), item[0][1] or 0))


def fastest_variants(rows):
    """Per (shape, axis): the default's and each alternative's fwd+bwd time per neighbour mode, the
    fastest (geometric mean of the speedup over the default across the modes timed) and its speedup."""
    from smooth_infonce.ops.triton import VARIANT_CHOICES  # the defaults: each axis's first choice

    times = {}
    for r in rows:
        if r.get("status") == "ok":
            times[(r["shape"], r["mode"], r["axis"], r["variant"])] = r["fwdbwd_ms"]
    out = []
    for axis, (alternatives, shapes, _) in VARIANT_AXES.items():
        for shape in shapes:
            modes = sorted({mode for (s, mode, a, _) in times if s == shape and a == axis})
            if not modes:
                continue
            default = VARIANT_CHOICES[axis][0]
            entry = dict(shape=shape, axis=axis, default=default, fastest=None, speedup=1.0, times_ms={})
            for mode in modes:
                base = times.get((shape, mode, "default", "default"))
                entry["times_ms"][mode] = {"default": base,
                                           **{v: times.get((shape, mode, axis, v)) for v in alternatives}}
            best, best_score = default, 1.0
            for v in alternatives:
                ratios = [t["default"] / t[v] for t in entry["times_ms"].values() if t["default"] and t.get(v)]
                if not ratios:
                    continue
                score = statistics.geometric_mean(ratios)
                entry.setdefault("speedup_of", {})[v] = score
                entry.setdefault("worst_speedup_of", {})[v] = min(ratios)
                if score > best_score:
                    best, best_score = v, score
            entry.update(fastest=best, speedup=best_score)
            out.append(entry)
    return out


def variant_suggestion(fastest, min_speedup=VARIANT_MIN_SPEEDUP) -> str:
    """What to change, one line per axis: a new default where an alternative is at least
    `min_speedup` faster at every shape (and mode) timed, else keep, with the numbers."""
    if not fastest:
        return "speed variants: nothing timed"
    lines = [f"Speed variants (fwd+bwd speedup over the default, geometric mean over the modes timed; a new "
             f"default needs >= {min_speedup:.2f}x at every shape and mode):"]
    for axis, (alternatives, _, _) in VARIANT_AXES.items():
        entries = [f for f in fastest if f["axis"] == axis]
        if not entries:
            continue
        for v in alternatives:
            per_shape = {f["shape"]: (f.get("speedup_of", {}).get(v), f.get("worst_speedup_of", {}).get(v))
                         for f in entries}
            timed = {s: x for s, x in per_shape.items() if x[0] is not None}
            text = ", ".join(f"{s} {mean:.2f}x (worst mode {worst:.2f}x)" for s, (mean, worst) in timed.items())
            if timed and all(worst >= min_speedup for _, worst in timed.values()):
                lines.append(f"- {axis}: make {v!r} the default (KernelVariants.{axis} = {v!r} in "
                             f"smooth_infonce/ops/triton.py): {text}")
            else:
                lines.append(f"  {axis}: keep {entries[0]['default']!r} ({v}: {text or 'not timed'})")
    return "\n".join(lines)
