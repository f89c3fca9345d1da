"""benchmarks/fashion_mnist.py: the paired summary, and a tiny benchmark on generated IDX files that
trains every kind of study, writes its files and resumes without training again (the numbers are
never pinned)."""

import importlib
import json
import sys
from pathlib import Path

import lightning  # noqa: E402,F401  # a required test dependency: a broken install fails here instead of skipping
import matplotlib  # noqa: E402,F401
import pytest

from integration_helpers import fake_fashion_mnist

# imported by name from benchmarks/ (on sys.path, which spawned workers inherit): the process pool's
# workers find its functions by module name
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
bench = importlib.import_module("fashion_mnist")


def record(study, arm, seed, knn, linear=50.0):
    return dict(study=study, arm=arm, seed=seed, knn=knn, linear=linear, seconds=1.0, loss_per_epoch=[1.0])


def test_differences_are_paired_by_seed_against_the_studys_baseline():
    runs = [record("loss-moco", "plain", 0, 80.0), record("loss-moco", "plain", 1, 70.0),
            record("loss-moco", "neighbors", 0, 81.0), record("loss-moco", "neighbors", 1, 73.0),
            record("loss-moco", "uniform", 1, 69.0)]
    study = bench.summarise(runs)["loss-moco"]
    knn = study["differences"]["neighbors"]["knn"]
    # paired: differences 1 and 3 (unpaired, the seeds' spread of 7 would hide them)
    assert (knn["mean"], knn["pairs"]) == (2.0, 2) and knn["se"] == pytest.approx(1.0)
    assert knn["ci95"] == pytest.approx(12.706, abs=1e-3) and not knn["resolved"]
    assert study["differences"]["uniform"]["knn"]["pairs"] == 1  # only seed 1 has both
    assert "plain" not in study["differences"] and study["arms"]["plain"]["knn"]["mean"] == 75.0


def test_every_study_builds_its_recipe_at_the_benchmarks_scale():
    settings = bench.Settings()
    for name, study in bench.STUDIES.items():
        for arm in study.arms:
            recipe = bench.build_recipe(settings, name, arm)
            assert recipe.epochs == settings.epochs and recipe.batch_size == settings.batch_size
            assert recipe.backbone.kwargs["width"] == (settings.wide_width if "wide" in (name, arm) or
                                                       name.endswith("wide") else settings.width)
            assert {crop.size for crop in recipe.views.crop_groups()[:1]} == {settings.image_size}
    light, base = (bench.build_recipe(settings, "recipe", arm) for arm in ("light_moco", "moco_v2_baseline"))
    assert (light.loss.temperature, light.loss.smoothing, base.loss.temperature, base.loss.smoothing) == \
        (0.07, 0.1, 0.2, 0.0)
    sslight, baseline = (bench.build_recipe(settings, "views-moco", arm) for arm in ("sslight", "baseline"))
    assert sslight.framework == baseline.framework == "moco"
    assert (sslight.views.loss_weights, baseline.views.loss_weights) == ((0.4, 0.6), None)
    assert sslight.views.local_crops.size > baseline.views.local_crops.size  # 128 vs 96 px, scaled


def test_a_tiny_benchmark_trains_writes_and_resumes(tmp_path, capsys):
    data = tmp_path / "data"
    fake_fashion_mnist(data, gz=False)
    out = tmp_path / "out"
    argv = ["--studies", "loss-moco", "views-dino", "supervised", "--seeds", "0", "1", "--data", str(data),
            "--out", str(out), "--train-images", "256", "--test-images", "200", "--epochs", "1", "--batch-size",
            "64", "--view-cache", "2", "--curve-images", "100", "--wide-width", "6", "--width", "4",
            "--queue-size", "128", "--neighbors", "3"]
    assert bench.main(argv) == 0
    runs = sorted((out / "runs").glob("*/*.json"))
    assert len(runs) == 2 * (3 + 2 + 2)
    result = json.loads((out / "results.json").read_text())
    assert set(result["summary"]) == {"loss-moco", "views-dino", "supervised"}
    assert result["summary"]["loss-moco"]["differences"]["neighbors"]["knn"]["pairs"] == 2
    assert set(result["references"]) == {"raw pixels", "random init, width 4", "random init, width 6"}
    assert result["references"]["raw pixels"]["knn"] > 90  # the generated classes are templates plus noise
    one = json.loads(runs[0].read_text())
    assert one["images_per_second"] > 0 and len(one["loss_per_epoch"]) == 1 and one["recipe"]["epochs"] == 1
    assert (out / "results.png").stat().st_size > 0 and "| views-dino | sslight | 2 |" in \
        (out / "results.md").read_text()
    # resume: nothing already finished is trained again, and the references are read back
    written = {path: (path.stat().st_mtime_ns, path.read_text()) for path in runs + [out / "references.json"]}
    capsys.readouterr()
    assert bench.main(argv) == 0
    assert "14 already done" in capsys.readouterr().out
    assert {path: (path.stat().st_mtime_ns, path.read_text()) for path in written} == written
