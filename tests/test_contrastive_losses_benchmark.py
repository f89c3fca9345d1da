"""benchmarks/contrastive_losses.py (the drop-ins against ClipLoss and MNRL): a tiny run writes its
files, the committed table is what its JSON gives, and a point too small to measure does not crash
the ratios."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
bench = importlib.import_module("contrastive_losses")
COMMITTED = ROOT / "benchmarks" / "results" / "contrastive_losses_cpu"


def test_the_committed_table_is_what_its_json_gives(tmp_path):
    stem = tmp_path / "copy"
    stem.with_suffix(".json").write_text(COMMITTED.with_suffix(".json").read_text())
    bench.main(["--rewrite", str(stem)])
    table = lambda path: [line for line in path.read_text().splitlines() if line.startswith("|")]
    assert table(stem.with_suffix(".md")) == table(COMMITTED.with_suffix(".md"))


def test_a_library_point_of_zero_measured_memory_has_no_memory_ratio(tmp_path):
    report = json.loads(COMMITTED.with_suffix(".json").read_text())
    for point in report["points"]:
        if point["provider"] == "clip" and point["batch"] == report["batches"][0]:
            point["peak_mib"] = 0.0
    stem = tmp_path / "zero"
    stem.with_suffix(".json").write_text(json.dumps(report))
    bench.main(["--rewrite", str(stem)])
    rows = [r for r in json.loads(stem.with_suffix(".json").read_text())["ratios"]
            if r["library"] == "clip" and r["batch"] == report["batches"][0]]
    assert rows and all(r["memory_ratio"] is None for r in rows)
    assert "x, -)" in stem.with_suffix(".md").read_text()


def test_a_tiny_cpu_run_writes_every_point(tmp_path):
    stem = tmp_path / "tiny"
    bench.main(["--batches", "16,32", "--width", "8", "--repeats", "0", "--providers", "clip,smooth_clip_knn",
                "--out", str(stem)])
    report = json.loads(stem.with_suffix(".json").read_text())
    points = {(p["provider"], p["batch"]) for p in report["points"] if "error" not in p}
    assert points == {(p, b) for p in ("clip", "smooth_clip_knn") for b in (16, 32)}
    assert {r["provider"] for r in report["ratios"]} == {"smooth_clip_knn"}
    assert "| 32 |" in stem.with_suffix(".md").read_text()
