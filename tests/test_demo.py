"""The main job's code path, tiny: one epoch on a few real digits (and on an ImageFolder), trained
through the Lightning module; its command-line errors; the install hint of a missing extra."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from smooth_infonce.integrations.data.digits import digit_images
from smooth_infonce.integrations.demo import cli as demo

TINY = ["--epochs", "1", "--max-images", "160", "--batch-size", "32", "--width", "4", "--view-cache", "2",
        "--seeds", "0", "--knn-k", "5", "--no-progress"]


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
    assert results["config"]["accelerator"] == "cpu"


def test_trains_through_the_lightning_module(monkeypatch, tmp_path):
    """No loop of its own: every run is one Trainer.fit of a PretrainModule, with the flags' hardware."""
    import lightning as L

    from smooth_infonce.integrations.lightning import PretrainModule

    fits = []
    original = L.Trainer.fit

    def recording_fit(trainer, module, *args, **kwargs):
        fits.append((type(module), trainer.max_epochs, type(trainer.accelerator).__name__, trainer.num_devices))
        return original(trainer, module, *args, **kwargs)

    monkeypatch.setattr(L.Trainer, "fit", recording_fit)
    config = demo.parse_args(TINY + ["--runs", "plain", "--accelerator", "cpu", "--devices", "1", "--strategy",
                                     "auto", "--no-plot", "--out", str(tmp_path)])
    demo.run_demo(config)
    assert fits == [(PretrainModule, 1, "CPUAccelerator", 1)]


def test_same_seed_same_numbers(tmp_path):
    args = TINY + ["--runs", "neighbors", "--no-plot"]
    first = demo.run_demo(demo.parse_args(args + ["--out", str(tmp_path / "a")]))["results"][0]
    second = demo.run_demo(demo.parse_args(args + ["--out", str(tmp_path / "b")]))["results"][0]
    assert first.loss_per_epoch == second.loss_per_epoch
    assert (first.knn_top1, first.linear_top1) == (second.knn_top1, second.linear_top1)


def test_chunked_steps_train_moco(monkeypatch, tmp_path):
    """--chunk-size: the cached-gradient step through the Lightning module (manual optimisation).
    The module that trained got the chunk size, and every optimiser step of the run went through the
    cached step with it, on batches of 32."""
    import lightning as L

    from smooth_infonce.integrations.lightning import module as lightning_integration

    trained, chunked_steps = [], []
    original_fit, original_cached = L.Trainer.fit, lightning_integration.cached_training_loss

    def recording_fit(trainer, module, *args, **kwargs):
        trained.append((trainer, module))
        return original_fit(trainer, module, *args, **kwargs)

    def recording_cached(model, views, criterion, chunk_size, **kwargs):
        chunked_steps.append((chunk_size, views[0].shape[0]))
        return original_cached(model, views, criterion, chunk_size, **kwargs)

    monkeypatch.setattr(L.Trainer, "fit", recording_fit)
    monkeypatch.setattr(lightning_integration, "cached_training_loss", recording_cached)
    config = demo.parse_args(TINY + ["--framework", "moco", "--queue-size", "64", "--runs", "neighbors",
                                     "--chunk-size", "8", "--no-plot", "--out", str(tmp_path)])
    result = demo.run_demo(config)["results"][0]
    assert config.chunk_size == 8 and math.isfinite(result.loss_per_epoch[0]) and 0 <= result.knn_top1 <= 1
    [(trainer, module)] = trained
    assert module.chunk_size == 8 and not module.automatic_optimization
    assert trainer.global_step >= 1 and chunked_steps == [(8, 32)] * trainer.global_step


def test_moco_with_progress_and_two_seeds(tmp_path, capsys):
    config = demo.parse_args(TINY + ["--framework", "moco", "--queue-size", "64", "--runs", "plain", "neighbors",
                                     "--seeds", "0", "1", "--no-plot", "--out", str(tmp_path)])
    config.progress = True  # status lines (stderr is not a terminal here: no bar)
    outcome = demo.run_demo(config)
    assert config.lr_per_256 == demo.DEFAULT_LR_PER_256["moco"]
    assert [(r.run, r.seed) for r in outcome["results"]] == [("plain", 0), ("neighbors", 0), ("plain", 1),
                                                             ("neighbors", 1)]
    neighbors_row = next(row for row in outcome["rows"] if row["run"] == "neighbors")
    assert "±" in neighbors_row["kNN top-1 (%)"]  # mean ± std over the two seeds
    assert not (tmp_path / "curves.png").exists()
    status = capsys.readouterr().err
    assert "loading scikit-learn's digits" in status and "training neighbors (seed 1" in status


def test_masking_comparison(tmp_path):
    config = demo.parse_args(TINY + ["--compare", "masking", "--queue-size", "64", "--out", str(tmp_path)])
    assert config.framework == "moco" and config.runs == demo.MASKING_RUNS
    outcome = demo.run_demo(config)
    assert [(r.run, r.masked, r.smoothing) for r in outcome["results"]] == [
        ("plain", False, 0.0), ("plain-masked", True, 0.0), ("neighbors-masked", True, 0.2)]
    losses = {row["run"]: row["loss"] for row in outcome["rows"]}
    assert losses["plain"] == "InfoNCE" and losses["plain-masked"] == "InfoNCE, own keys masked"
    assert losses["neighbors-masked"].endswith("k = 5 neighbours, own keys masked")
    assert (tmp_path / "curves.png").stat().st_size > 0


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
    with pytest.raises(ValueError, match="--framework moco"):
        demo.DemoConfig(runs=("plain-masked",))
    assert demo.DemoConfig().threads == 1 and demo.DemoConfig(backbone="resnet18").threads is None


# --- command-line errors: argparse's exit status 2 and one message line, never a traceback -------------------

def bad_flags(tmp_path):
    not_a_folder = tmp_path / "file.txt"
    not_a_folder.write_text("x")
    (tmp_path / "empty").mkdir()
    cases = {
        "missing --data": (["--data", str(tmp_path / "missing")], "no such directory"),
        "--data without class folders": (["--data", str(tmp_path / "empty")], "not an ImageFolder"),
        "--data a file": (["--data", str(not_a_folder)], "not a directory"),
        "neighbors above the queue": (["--framework", "moco", "--queue-size", "16", "--neighbors", "32"],
                                      "larger than the MoCo queue"),
        "neighbors above SimCLR's negatives": (["--batch-size", "8", "--neighbors", "20"], "in-batch negatives"),
        "zero epochs": (["--epochs", "0"], "argument --epochs: expected a positive integer, got 0"),
        "negative batch": (["--batch-size", "-4"], "argument --batch-size: expected a positive integer"),
        "batch above the data": (["--batch-size", "5000"], "larger than the 1347 training images"),
        "non-numeric epochs": (["--epochs", "ten"], "expected a positive integer, got 'ten'"),
        "smoothing 1": (["--smoothing", "1"], "argument --smoothing: expected a number in [0, 1)"),
        "zero temperature": (["--temperature", "0"], "argument --temperature"),
        "view cache 1": (["--view-cache", "1"], "at least 2 views"),
        "masking with SimCLR": (["--compare", "masking", "--framework", "simclr"], "--framework moco"),
        "masked run with SimCLR": (["--runs", "plain-masked", "--framework", "simclr"], "--framework moco"),
        "unknown backbone": (["--backbone", "nonesuch"], "--backbone nonesuch: unknown"),
        "unknown strategy": (["--strategy", "warp"], "--strategy warp: not a Lightning strategy"),
        "bad devices": (["--devices", "0"], "argument --devices"),
        "device and accelerator disagree": (["--device", "cpu", "--accelerator", "mps"], "disagree"),
        "out is a file": (["--out", str(not_a_folder)], "is not a directory"),
        "knn-k above the data": (["--max-images", "20", "--batch-size", "4", "--knn-k", "50"], "--knn-k 50"),
        "tiny images": (["--image-size", "3"], "argument --image-size: expected a side of at least 8 px, got 3"),
        "views comparison of SimCLR": (["--compare", "views", "--framework", "simclr"], "does not apply"),
        "smoothing runs with DINO": (["--framework", "dino", "--runs", "plain"], "compares view sampling"),
        "chunks with DINO": (["--framework", "dino", "--chunk-size", "8"], "--chunk-size is for simclr and moco"),
    }
    if not torch.cuda.is_available():
        cases["--device cuda without CUDA"] = (["--device", "cuda"], "no CUDA device")
        cases["--accelerator gpu without CUDA"] = (["--accelerator", "gpu"], "no CUDA device")
    return cases


def test_bad_flags_exit_2_with_one_message_line(tmp_path, capsys):
    for name, (argv, message) in bad_flags(tmp_path).items():
        with pytest.raises(SystemExit) as exit_info:
            demo.main(argv + ["--no-progress"])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2, name
        last = err.strip().splitlines()[-1]
        assert last.startswith("smooth-infonce-demo: error: "), (name, err)
        assert message in last, (name, last)
        assert "Traceback" not in err, name


def test_bad_flag_from_the_command_line_has_no_traceback(tmp_path):
    done = subprocess.run([sys.executable, "-m", "smooth_infonce.integrations.demo", "--data",
                           str(tmp_path / "missing")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (f"smooth-infonce-demo: error: --data {tmp_path / 'missing'}: "
                                                    "no such directory")


def test_every_option_has_help():
    parser = demo.build_parser()
    for action in parser._actions:
        assert action.help, action.option_strings


def test_module_entry_point_help():
    done = subprocess.run([sys.executable, "-m", "smooth_infonce.integrations.demo", "--help"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "--framework" in done.stdout and "--strategy" in done.stdout


# --- a missing extra: an ImportError that names the extra to install ----------------------------------------

BLOCKED_IMPORTS = """
import importlib, json, sys

def message(module):
    try:
        importlib.import_module(module)
    except ImportError as err:
        return str(err)
    return None

found = {}
sys.modules["lightning"] = None  # as if not installed: import raises, find_spec gives None
found["lightning"] = message("smooth_infonce.integrations.lightning")
found["demo without lightning"] = message("smooth_infonce.integrations.demo.cli")
del sys.modules["lightning"]
sys.modules["lightly"] = None
for name in ("lightly", "lightly.models", "demo.cli"):
    found[name] = message("smooth_infonce.integrations." + name)
print(json.dumps(found))
"""


def test_a_missing_extra_names_the_extra_to_install():
    done = subprocess.run([sys.executable, "-c", BLOCKED_IMPORTS], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert "pip install 'smooth-infonce[lightning]'" in found["lightning"]
    assert "pip install 'smooth-infonce[demo]'" in found["demo without lightning"]
    assert "lightning" in found["demo without lightning"]
    assert "pip install 'smooth-infonce[lightly]'" in found["lightly"]
    assert "pip install 'smooth-infonce[lightly]'" in found["lightly.models"]
    assert "pip install 'smooth-infonce[demo]'" in found["demo.cli"] and "lightly" in found["demo.cli"]


@pytest.mark.parametrize("framework", ["dino", "swav"])
def test_dino_and_swav_compare_sslight_views_with_the_baseline(framework, tmp_path):
    """--framework dino | swav: the presets' view sampling, crops scaled to the image size."""
    config = demo.parse_args(TINY + ["--framework", framework, "--out", str(tmp_path)])
    assert config.runs == ("baseline", "sslight")
    outcome = demo.run_demo(config)
    rows = {row["run"]: row for row in outcome["rows"]}
    name = "DINO" if framework == "dino" else "SwAV"
    assert rows["baseline"]["loss"] == f"{name}, 2 x 16 px (0.14, 1) + 6 x 7 px (0.05, 0.14), plain mean"
    assert rows["sslight"]["loss"] == f"{name}, 2 x 16 px (0.3, 1) + 6 x 9 px (0.05, 0.3), lambda (0.4, 0.6)"
    for result in outcome["results"]:
        assert 0.0 <= result.knn_top1 <= 1.0 and math.isfinite(result.loss_per_epoch[0])
    assert (tmp_path / "curves.png").stat().st_size > 0
