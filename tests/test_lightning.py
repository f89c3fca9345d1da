"""The Lightning module: every preset trains on CPU, DDP equals one process, a killed run resumes
exactly (queue, alpha and lr schedules, momentum encoder, RNG), through real Lightning and lightly."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

L = pytest.importorskip("lightning")

from smooth_infonce.integrations.lightning import PretrainDataModule, from_preset  # noqa: E402
from smooth_infonce.integrations.recipes import list_presets  # noqa: E402

from lightning_runs import TINY, DigitImages  # noqa: E402

RUNS = Path(__file__).parent / "lightning_runs.py"


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(RUNS), *args], capture_output=True, text=True, timeout=600,
                          check=False)


def read_losses(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "losses.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("preset", list_presets())
def test_every_preset_trains_on_cpu(preset):
    overrides = dict(TINY, moco__queue_size=32)
    module = from_preset(preset, module_options={"backend": "reference"}, **overrides)
    if module.recipe.views.local_crops is not None or preset.startswith("sslight"):
        module = from_preset(preset, module_options={"backend": "reference"},
                             **dict(overrides, views__local_crops={"count": 2, "size": 8, "scale": (0.05, 0.3)}))
    data = PretrainDataModule(module.recipe, dataset=DigitImages(32), batch_size=8)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 4
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
    if module.recipe.framework == "moco":  # four batches of 8 keys went into the queue, with their ids
        assert int(module.criterion.bank_enqueued) == 32
    expected_lr = module.recipe.optimizer.learning_rate(3, steps_per_epoch=4, epochs=1, batch_size=8)
    assert module.optimizers().param_groups[0]["lr"] == pytest.approx(expected_lr)


def test_two_process_ddp_equals_one_process_on_the_same_global_batch(tmp_path):
    single, ddp = tmp_path / "single.pt", tmp_path / "ddp.pt"
    for devices, out in ((1, single), (2, ddp)):
        done = run_script("step", "--devices", str(devices), "--out", str(out))
        assert done.returncode == 0, done.stderr[-3000:]
    one, two = torch.load(single), torch.load(ddp)
    assert two["world_size"] == 2
    torch.testing.assert_close(two["loss"], one["loss"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(two["grad"], one["grad"], rtol=1e-5, atol=1e-6)  # fp32 summation order


def test_every_preset_trains_under_two_process_ddp(tmp_path):
    out = tmp_path / "presets.json"
    done = run_script("presets", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(out.read_text())
    assert sorted(seen) == list_presets()
    for preset, run in seen.items():
        assert run["world_size"] == 2 and run["steps"] == 2 and math.isfinite(run["loss"]), preset
        if run["enqueued"] is not None:  # both processes' keys went into the queue: 2 steps x 2 x 8
            assert run["enqueued"] == 32, preset


def test_killed_run_resumes_exactly(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    done = run_script("train", "--dir", str(straight))
    assert done.returncode == 0, done.stderr[-3000:]
    done = run_script("train", "--dir", str(killed), "--kill-at-epoch", "2")
    assert done.returncode == -9, done.stderr[-3000:]  # SIGKILL, after epoch 1's checkpoint
    assert not (killed / "final.pt").exists()
    done = run_script("train", "--dir", str(killed), "--resume")
    assert done.returncode == 0, done.stderr[-3000:]

    reference, resumed = read_losses(straight), read_losses(killed)
    assert [r["step"] for r in resumed] == [r["step"] for r in reference]  # nothing lost, nothing twice
    for ours, theirs in zip(resumed, reference):
        assert ours["epoch"] == theirs["epoch"] and ours["alpha"] == theirs["alpha"]
        assert ours["lr"] == pytest.approx(theirs["lr"], rel=1e-12)
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-6, abs=1e-6)
    # the light_moco warm-up: alpha 0 and a rising lr in epoch 0, then the preset's alpha
    assert {r["alpha"] for r in reference if r["epoch"] == 0} == {0.0}
    assert all(r["alpha"] > 0 for r in reference if r["epoch"] >= 1)
    warm = [r["lr"] for r in reference if r["epoch"] == 0]
    assert warm == sorted(warm) and warm[0] < warm[-1]

    a, b = torch.load(straight / "final.pt"), torch.load(killed / "final.pt")
    torch.testing.assert_close(b["bank"], a["bank"], rtol=0, atol=1e-6)  # the queue, bit for bit or nearly
    for name, tensor in a["state"].items():
        torch.testing.assert_close(b["state"][name], tensor, rtol=1e-5, atol=1e-6, msg=name)
