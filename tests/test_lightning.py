"""The Lightning module: every preset trains on CPU, DDP equals one process, a killed run resumes
exactly (queue, alpha and lr schedules, momentum encoder, RNG; DINO's centre and teacher, SwAV's
queue in use), through real Lightning and lightly."""

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

from lightning_runs import DigitImages, module_options, tiny_overrides  # noqa: E402

RUNS = Path(__file__).parent / "lightning_runs.py"


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(RUNS), *args], capture_output=True, text=True, timeout=600,
                          check=False)


def read_losses(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "losses.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("preset", list_presets())
def test_every_preset_trains_on_cpu(preset):
    module = from_preset(preset, module_options=module_options(preset), **tiny_overrides(preset, keep_vit=True))
    recipe = module.recipe
    vit = recipe.backbone.name == "vit_tiny_patch16"
    steps = 2 if vit else 4  # ViT-Tiny is the slow one on a CPU
    data = PretrainDataModule(recipe, dataset=DigitImages(8 * steps), batch_size=8)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == steps
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
    if recipe.framework == "moco":  # four batches of 8 keys went into the queue, with their ids
        assert int(module.criterion.bank_enqueued) == 32
    model = module.model
    if recipe.framework == "dino":
        assert float(module.criterion.center.abs().sum()) > 0  # the centre moved
        # the last layer was frozen in epoch 0: the student's still equals the teacher's (both at
        # their initial value), while the rest of the teacher trails the student by its EMA
        for name, param in model.head.last_layer.named_parameters():
            torch.testing.assert_close(param, dict(model.teacher_head.last_layer.named_parameters())[name])
        student, teacher = (torch.cat([p.flatten() for p in m.parameters()])
                            for m in (model.backbone, model.teacher_backbone))
        assert not torch.equal(student, teacher)
        if vit:  # stochastic depth in the student only, as DINO
            assert any(getattr(m, "drop_prob", 0) > 0 for m in model.backbone.modules())
            assert all(getattr(m, "drop_prob", 0) == 0 for m in model.teacher_backbone.modules())
    if recipe.framework == "swav":
        # sized from the global batch of 8 (3840 nominal), not yet filled (it starts in epoch 15)
        assert tuple(model.queue.shape) == (2, recipe.swav.queue_length(8), recipe.head.output_dim)
        assert int(model.queue_filled) == 0 and not model.queue_in_use(0)
        norms = model.prototypes.heads[0].weight.norm(dim=1)  # normalised, then frozen in epoch 0
        torch.testing.assert_close(norms, torch.ones_like(norms))
    expected_lr = recipe.optimizer.learning_rate(steps - 1, steps_per_epoch=steps, epochs=1, batch_size=8)
    assert module.optimizers().param_groups[0]["lr"] == pytest.approx(expected_lr)


@pytest.mark.parametrize("preset", ["simclr", "sslight_dino", "sslight_swav"])
def test_two_process_ddp_equals_one_process_on_the_same_global_batch(tmp_path, preset):
    """SimCLR: one step. DINO and SwAV (see lightning_runs.one_step): the third step, after the
    all-reduced centre and the teacher's EMA (DINO) or a full queue over both processes feeding the
    distributed Sinkhorn (SwAV) have come in."""
    single, ddp = tmp_path / "single.pt", tmp_path / "ddp.pt"
    for devices, out in ((1, single), (2, ddp)):
        done = run_script("step", "--preset", preset, "--devices", str(devices), "--out", str(out))
        assert done.returncode == 0, done.stderr[-3000:]
    one, two = torch.load(single), torch.load(ddp)
    assert two["world_size"] == 2
    torch.testing.assert_close(two["loss"], one["loss"], rtol=1e-6, atol=1e-7)
    # fp32 summation order; LARS' trust ratio scales the rounding of small gradients up
    tolerance = dict(rtol=1e-5, atol=1e-6) if preset == "simclr" else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(two["grad"], one["grad"], **tolerance)
    if preset == "sslight_dino":
        torch.testing.assert_close(two["center"], one["center"], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(two["teacher"], one["teacher"], rtol=1e-4, atol=1e-4)
    if preset == "sslight_swav":
        assert one["queue_in_use"] and two["queue_in_use"] and one["queue_filled"] == two["queue_filled"] == 32
        torch.testing.assert_close(two["queue_gram"], one["queue_gram"], rtol=1e-5, atol=1e-5)


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


def test_killed_dino_and_swav_runs_resume_exactly(tmp_path):
    """DINO (centre, teacher, tau_t warm-up, last layer frozen in epoch 0) and SwAV (a queue that
    is full and in use when the checkpoint of epoch 1 is written), each killed at the start of
    epoch 2 and resumed, against uninterrupted runs: two presets in four processes (see
    lightning_runs.train)."""
    presets = ("sslight_dino", "sslight_swav")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    done = run_script("train", "--presets", ",".join(presets), "--dir", str(straight))
    assert done.returncode == 0, done.stderr[-3000:]
    again = ("train", "--presets", ",".join(presets), "--dir", str(killed), "--kill-at-epoch", "2", "--resume")
    for expected in (-9, -9, 0):  # dino killed; dino resumed, swav killed; swav resumed
        done = run_script(*again)
        assert done.returncode == expected, done.stderr[-3000:]

    for preset in presets:
        reference, resumed = read_losses(straight / preset), read_losses(killed / preset)
        assert [r["step"] for r in resumed] == [r["step"] for r in reference], preset
        for ours, theirs in zip(resumed, reference):
            assert ours.keys() == theirs.keys()
            for key in ours:
                assert ours[key] == pytest.approx(theirs[key], rel=1e-6, abs=1e-6), (preset, key, ours["step"])
        a, b = torch.load(straight / preset / "final.pt"), torch.load(killed / preset / "final.pt")
        assert a["state"].keys() == b["state"].keys()
        for name, tensor in a["state"].items():
            torch.testing.assert_close(b["state"][name], tensor, rtol=1e-5, atol=1e-6, msg=f"{preset}: {name}")

    dino, swav = read_losses(straight / "sslight_dino"), read_losses(straight / "sslight_swav")
    assert [r["teacher_temperature"] for r in dino[::4]] == pytest.approx([0.04, 0.055, 0.07, 0.07])
    # the queue (two steps of 16) fills in epoch 1 and is in use from its third step on
    assert [r["queue_in_use"] for r in swav] == [False] * 6 + [True] * 10
    assert "criterion.center" in torch.load(straight / "sslight_dino" / "final.pt")["state"]
    assert {"model.queue", "model.queue_filled"} <= set(torch.load(straight / "sslight_swav" / "final.pt")["state"])
