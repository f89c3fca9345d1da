"""benchmarks/smoothing_sweep.py: the paired statistics, and a tiny sweep that trains and writes its
files (the numbers are never pinned)."""

import importlib.util
import json
from pathlib import Path

import lightning  # noqa: E402,F401  # a required test dependency: a broken install fails here instead of skipping
import matplotlib  # noqa: E402,F401
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "smoothing_sweep.py"
spec = importlib.util.spec_from_file_location("smoothing_sweep", SCRIPT)
sweep = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sweep)


def test_effects_are_paired_by_seed():
    runs = [dict(cell="plain", seed=0, knn=90.0), dict(cell="plain", seed=1, knn=80.0),
            dict(cell="a", seed=0, knn=91.0), dict(cell="a", seed=1, knn=83.0)]
    mean, se, seeds = sweep.paired_effects(runs, "knn")["a"]
    # paired: differences 1 and 3 (unpaired means would differ by 2 with a spread of 7)
    assert (mean, seeds) == (2.0, 2) and se == pytest.approx(1.0)  # sd sqrt(2) over sqrt(2) seeds


def test_a_tiny_sweep_trains_and_writes_its_files(tmp_path):
    out = tmp_path / "sweep"
    assert sweep.main(["--alphas", "0.3", "--modes", "uniform", "2", "--seeds", "0", "1", "--epochs", "2",
                       "--max-images", "200", "--out", str(out)]) == 0
    record = json.loads(out.with_suffix(".json").read_text())
    assert len(record["runs"]) == 6 and out.with_suffix(".png").stat().st_size > 0
    assert set(record["effects"]["knn"]) == {"alpha=0.3,uniform", "alpha=0.3,k=2"}
    # --resume trains nothing that is already there
    assert sweep.main(["--alphas", "0.3", "--modes", "uniform", "2", "--seeds", "0", "1", "--epochs", "2",
                       "--max-images", "200", "--out", str(out), "--resume"]) == 0
    assert len(json.loads(out.with_suffix(".json").read_text())["runs"]) == 6
