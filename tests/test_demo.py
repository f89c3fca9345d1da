"""The main job's code path, tiny: one epoch on a few real digits (and on an ImageFolder)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from smooth_infonce.integrations import demo
from smooth_infonce.integrations.digits import digit_images

TINY = ["--epochs", "1", "--max-images", "160", "--batch-size", "32", "--width", "4", "--view-cache", "2",
        "--knn-k", "5", "--no-progress"]


def test_main_writes_the_table_plot_and_json(tmp_path, capsys):
    assert demo.main(TINY + ["--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    for name in ("random init", "raw pixels", "plain", "uniform", "neighbors"):
        assert f"| {name} |" in printed
    for name in ("results.md", "results.csv", "results.json", "curves.png"):
        assert (tmp_path / name).stat().st_size > 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["run"] for r in results["runs"]] == ["plain", "uniform", "neighbors"]
    assert [r["smoothing"] for r in results["runs"]] == [0.0, 0.2, 0.2]
    assert [r["neighbors"] for r in results["runs"]] == [5, None, 5]
    for run in results["runs"]:
        assert 0.0 <= run["knn_top1"] <= 1.0 and 0.0 <= run["linear_top1"] <= 1.0
        assert len(run["loss_per_epoch"]) == len(run["knn_per_epoch"]) == 1
    assert results["config"]["framework"] == "simclr"


def test_moco_with_progress_bar_and_two_seeds(tmp_path):
    config = demo.parse_args(TINY + ["--framework", "moco", "--queue-size", "64", "--runs", "plain", "neighbors",
                                     "--seeds", "0", "1", "--no-plot", "--out", str(tmp_path)])
    config.progress = True  # exercise the tqdm path
    outcome = demo.run_demo(config)
    assert config.lr_per_256 == demo.DEFAULT_LR_PER_256["moco"]
    assert [(r.run, r.seed) for r in outcome["results"]] == [("plain", 0), ("neighbors", 0), ("plain", 1),
                                                             ("neighbors", 1)]
    neighbors_row = next(row for row in outcome["rows"] if row["run"] == "neighbors")
    assert "±" in neighbors_row["kNN top-1 (%)"]  # mean ± std over the two seeds
    assert not (tmp_path / "curves.png").exists()


def test_image_folder_on_the_fly(tmp_path):
    images, labels = digit_images(48, size=24)
    for index, (image, label) in enumerate(zip(images, labels)):
        folder = tmp_path / "data" / f"class_{label % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{index}.png")
    outcome = demo.run_demo(demo.parse_args(
        ["--data", str(tmp_path / "data"), "--image-size", "16", "--epochs", "1", "--batch-size", "8",
         "--width", "4", "--runs", "neighbors", "--neighbors", "2", "--knn-k", "3", "--no-progress", "--no-plot",
         "--out", str(tmp_path / "out")]))
    assert outcome["results"][0].run == "neighbors"
    assert "ImageFolder" in outcome["header"]


def test_config_validation():
    with pytest.raises(ValueError):
        demo.DemoConfig(runs=("plain", "tiered"))
    with pytest.raises(ValueError):
        demo.DemoConfig(view_cache=1)
    assert demo.DemoConfig().threads == 1 and demo.DemoConfig(backbone="resnet18").threads is None


def test_module_entry_point_help():
    done = subprocess.run([sys.executable, "-m", "smooth_infonce.integrations.demo", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--framework" in done.stdout
