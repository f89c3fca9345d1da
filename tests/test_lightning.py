"""The Lightning module: every preset trains on CPU, DDP equals one process, a killed run resumes
exactly (queue, alpha and lr schedules, momentum encoder, RNG; DINO's centre and teacher, SwAV's
queue in use), through real Lightning and lightly; under 2-process DDP too, every rank from its
own RNG streams, with and without workers; ranks do not augment in lockstep."""

from __future__ import annotations

import json
import math
import random
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L  # noqa: E402  # a required test dependency: a broken install fails here instead of skipping
import numpy as np
import pytest
import torch

from smooth_infonce.integrations.lightning.module import (  # noqa: E402
    RNG_STATE_KEY,
    PretrainDataModule,
    from_preset,
    rng_state,
    seed_streams,
)
from smooth_infonce.integrations.recipes import list_presets  # noqa: E402

from lightning_runs import DigitImages, module_options, tiny_overrides  # noqa: E402

RUNS = Path(__file__).parent / "lightning_runs.py"


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(RUNS), *args], capture_output=True, text=True, timeout=600,
                          check=False)


def read_losses(run: Path, name: str = "losses.jsonl") -> list[dict]:
    return [json.loads(line) for line in (run / name).read_text().splitlines()]


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


def test_chunked_two_process_ddp_equals_one_unchunked_process_with_one_allreduce_per_step(tmp_path):
    """PretrainModule(chunk_size=3) under 2-process DDP (per process 8 images: chunks 3, 3, 2)
    equals one process without chunks on the same global batch of 16, and its gradients are
    all-reduced as often as an unchunked DDP step's (once per step, not once per chunk)."""
    runs = {"single": ("1", None), "ddp": ("2", None), "ddp_chunked": ("2", "3")}
    records = {}
    for name, (devices, chunk) in runs.items():
        out = tmp_path / f"{name}.pt"
        args = ["step", "--devices", devices, "--out", str(out)] + (["--chunk-size", chunk] if chunk else [])
        done = run_script(*args)
        assert done.returncode == 0, done.stderr[-3000:]
        records[name] = torch.load(out)
    one, chunked = records["single"], records["ddp_chunked"]
    assert not chunked["automatic_optimization"] and one["automatic_optimization"]  # else equal by construction
    torch.testing.assert_close(chunked["loss"], one["loss"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(chunked["grad"], one["grad"], rtol=1e-5, atol=1e-6)
    assert chunked["allreduce_calls"] == records["ddp"]["allreduce_calls"] >= 1


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
        # Parameter by parameter, each at its own scale: the head's biases reach about 150 while its
        # weights stay near 0.05, so one tolerance over all of them would check only the biases. The
        # large biases are this toy head's, not a bug: its bottleneck output has norm ~4e-5 before
        # DINO's L2 normalisation (lightly's trunc-normal 0.02 init through three layers of width 16
        # and 8), whose Jacobian scales the gradient by 1 / ||h|| ~ 2e4; the biases are outside LARS'
        # adaptation (plain SGD at lr 0.03, as in the authors' LARS), so the student's last bias
        # steps to ~900 in the first step and the teacher's EMA (momentum 0.9) follows to 90, then 151.
        # At DINO's real sizes (hidden 2048, bottleneck 256) ||h|| is O(0.1) and nothing blows up.
        assert one["teacher"].keys() == two["teacher"].keys()
        for name, theirs in one["teacher"].items():
            scale = float(theirs.abs().max().clamp_min(1e-3))
            torch.testing.assert_close(two["teacher"][name], theirs, rtol=1e-4, atol=1e-5 * scale,
                                       msg=lambda detail, name=name: f"teacher {name}: {detail}")
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


@pytest.mark.parametrize("chunk_size", [None, 6])
def test_killed_run_resumes_exactly(tmp_path, chunk_size):
    """light_moco, one pass or cached-gradient chunks of 6 images (batch 16: 6, 6, 4; manual
    optimisation, one enqueue per step)."""
    chunks = () if chunk_size is None else ("--chunk-size", str(chunk_size))
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    done = run_script("train", "--dir", str(straight), *chunks)
    assert done.returncode == 0, done.stderr[-3000:]
    done = run_script("train", "--dir", str(killed), "--kill-at-epoch", "2", *chunks)
    assert done.returncode == -9, done.stderr[-3000:]  # SIGKILL, after epoch 1's checkpoint
    assert not (killed / "final.pt").exists()
    done = run_script("train", "--dir", str(killed), "--resume", *chunks)
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


# --- DDP: every rank's streams in the checkpoint; ranks not in lockstep --------------------------------


def test_killed_ddp_run_resumes_exactly_on_every_rank(tmp_path):
    """light_moco under 2-process DDP, images of 12 to 24 px through the recipe's own crops (the
    ranks' streams then diverge), killed at the start of epoch 2 and resumed, with 0 and with 2
    workers (two runs in four launches, see lightning_runs.train): every rank equals the
    uninterrupted run bit for bit (indices, views, losses, weights, BN buffers, queue, its ids and
    pointer). Before each rank kept its own streams, rank 1 resumed with rank 0's: its views
    differed at every resumed step, and through shuffle-BN and the queue rank 0's losses too.
    Then a resume of the 2-process checkpoint on one process runs and warns."""
    common = ("train", "--devices", "2", "--variable-size", "--record-views", "--epochs", "3",
              "--num-workers", "0,2")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    done = run_script(*common, "--dir", str(straight))
    assert done.returncode == 0, done.stderr[-3000:]
    for expected in (-9, -9, 0):  # 0 workers killed; resumed, 2 workers killed; resumed
        done = run_script(*common, "--dir", str(killed), "--kill-at-epoch", "2", "--resume")
        assert done.returncode == expected, done.stderr[-3000:]

    for run in ("light_moco-workers0", "light_moco-workers2"):
        for rank, suffix in ((0, ""), (1, ".rank1")):
            reference = read_losses(straight / run, f"losses{suffix}.jsonl")
            resumed = read_losses(killed / run, f"losses{suffix}.jsonl")
            assert [r["step"] for r in resumed] == [r["step"] for r in reference] == list(range(1, 7)), (run, rank)
            for ours, theirs in zip(resumed, reference):  # steps 5 and 6 after the resume
                assert ours == theirs, (run, rank, ours["step"])  # ids, views digest, loss, lr, alpha: exact
            a = torch.load(straight / run / f"final{suffix}.pt")
            b = torch.load(killed / run / f"final{suffix}.pt")
            assert a["world_size"] == b["world_size"] == 2
            assert {"criterion.memory_bank.bank", "criterion.bank_ids", "criterion.memory_bank.bank_ptr",
                    "model.backbone.net.0.1.running_mean"} <= a["state"].keys()
            for name, tensor in a["state"].items():  # weights, BN buffers, queue, ids, pointer
                assert torch.equal(b["state"][name], tensor), (run, rank, name)

            # every rank restored its own streams: the ranks' differ, and each resumed rank starts
            # from what it held when the checkpoint of epoch 1 was written
            events = read_losses(killed / run, f"rng{suffix}.jsonl")
            saved = [e["rng"] for e in events if e["event"] == "save" and e["epoch"] == 1]
            starts = [e["rng"] for e in events if e["event"] == "start"]
            assert len(starts) == 2 and starts[1] == saved[-1], (run, rank)
        rank0, rank1 = (read_losses(straight / run, f"rng{s}.jsonl") for s in ("", ".rank1"))
        assert all(x["rng"] != y["rng"] for x, y in zip(rank0, rank1)), run
        assert all(x["views"] != y["views"] for x, y in zip(*(read_losses(straight / run, f"losses{s}.jsonl")
                                                               for s in ("", ".rank1"))))

    # the checkpoint holds both ranks' streams, and loads with weights_only=True
    checkpoint = torch.load(killed / "light_moco-workers0" / "ckpt" / "epoch=1-step=4.ckpt", weights_only=True)
    state = checkpoint[RNG_STATE_KEY]
    assert state["world_size"] == 2 and state["seed"] == 0 and len(state["ranks"]) == 2
    assert not torch.equal(state["ranks"][0]["torch"], state["ranks"][1]["torch"])

    # a resume on another world size (one process) runs, and says what it cannot reproduce
    other = tmp_path / "one_process"
    (other / "ckpt").mkdir(parents=True)
    shutil.copy(killed / "light_moco-workers0" / "ckpt" / "epoch=1-step=4.ckpt", other / "ckpt" / "last.ckpt")
    done = run_script("train", "--devices", "1", "--variable-size", "--epochs", "3", "--dir", str(other),
                      "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "the checkpoint holds the RNG streams of 2 processes, this run has 1" in done.stderr
    assert [r["epoch"] for r in read_losses(other)] == [2] * 4  # 64 images in batches of 16 on one process


def test_ranks_draw_different_views_and_a_run_is_reproducible_from_its_seed(tmp_path):
    """2-process DDP, each rank handed the same images in the same order (see
    lightning_runs.rank_views): the ranks' crops differ, with and without workers; the same seed
    draws the same views again, another seed others."""
    out = tmp_path / "views.pt"
    done = run_script("views", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    rank0, rank1 = torch.load(out), torch.load(tmp_path / "views.rank1.pt")
    for name in ("seed0", "seed0_again", "seed1", "seed0_workers"):
        (views0, ids0), (views1, ids1) = rank0[name][0], rank1[name][0]
        assert ids0.tolist() == [0, 2, 4, 6] and ids1.tolist() == [1, 3, 5, 7]  # digits 0, 1, 2, 3 on both
        for view0, view1 in zip(views0, views1):  # each of the two global crops
            assert view0.shape == view1.shape == (4, 3, 16, 16)
            assert all(not torch.equal(a, b) for a, b in zip(view0, view1)), name  # per image
    for rank in (rank0, rank1):
        assert all(torch.equal(a, b) for a, b in zip(rank["seed0"][0][0], rank["seed0_again"][0][0]))
        assert not any(torch.equal(a, b) for a, b in zip(rank["seed0"][0][0], rank["seed1"][0][0]))
        assert not any(torch.equal(a, b) for a, b in zip(rank["seed0"][0][0], rank["seed0_workers"][0][0]))


def _module_on(rank: int, world_size: int):
    """A module attached to a real Lightning Trainer of ``world_size`` CPU processes (DDP when more
    than one), as process ``rank`` sees it. The trainer is not launched (no processes, no process
    group): the rank is set on its real cluster environment, as Lightning's launcher does in each
    process, so the checkpoint hooks read `Trainer.global_rank`, `Trainer.world_size` and
    `Strategy.root_device` from Lightning itself."""
    module = from_preset("light_moco", module_options={"backend": "reference"}, **tiny_overrides("light_moco"))
    trainer = L.Trainer(accelerator="cpu", devices=world_size, strategy="ddp" if world_size > 1 else "auto",
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    if world_size > 1:
        trainer.strategy.cluster_environment.set_global_rank(rank)
    assert (trainer.global_rank, trainer.world_size, trainer.strategy.root_device) == (rank, world_size,
                                                                                      torch.device("cpu"))
    module.trainer = trainer
    module.run_seed = 7
    return module


def _draws() -> tuple:
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]


def test_rng_checkpoint_per_rank_other_world_size_and_old_format():
    """The hooks alone, on real unlaunched trainers: each rank restores its own streams; on another world
    size rank 0 restores rank 0's and the others derive distinct ones from the seed, rank and step,
    with a warning on rank 0; a checkpoint of the older format (one state) restores it with a
    warning."""
    states = []
    for rank in (0, 1):
        seed_streams(7, rank)
        states.append(rng_state())
    checkpoint = {"global_step": 4}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _module_on(0, 1).on_save_checkpoint(checkpoint)  # one process: no collective
    assert checkpoint[RNG_STATE_KEY]["world_size"] == 1 and checkpoint[RNG_STATE_KEY]["seed"] == 7
    checkpoint[RNG_STATE_KEY].update(world_size=2, ranks=states)  # as two ranks would have gathered

    draws = {}
    for rank in (0, 1):
        torch.manual_seed(123)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _module_on(rank, 2).on_load_checkpoint(checkpoint)
        draws[rank] = _draws()
        seed_streams(7, rank)
        assert draws[rank] == _draws()  # its own state
    assert draws[0] != draws[1]

    for rank, world_size in ((0, 3), (1, 3), (2, 3)):
        with pytest.warns(UserWarning, match="holds the RNG streams of 2 processes, this run has 3") if rank == 0 \
                else warnings.catch_warnings():
            _module_on(rank, world_size).on_load_checkpoint(checkpoint)
        draws[(rank, world_size)] = _draws()
    assert draws[(0, 3)] == draws[0]  # rank 0's own
    assert len({str(d) for d in (draws[0], draws[1], draws[(1, 3)], draws[(2, 3)])}) == 4  # all distinct
    seed_streams(7, 2, step=5)  # the seed, the rank and the step after the checkpoint's
    assert _draws() == draws[(2, 3)]

    old = {"global_step": 4, RNG_STATE_KEY: {key: states[1][key] for key in ("torch", "numpy", "python")}}
    with pytest.warns(UserWarning, match="one RNG state"):
        _module_on(0, 1).on_load_checkpoint(old)
    assert _draws() == draws[1]
    with pytest.warns(UserWarning, match="checkpoint without RNG state"):
        _module_on(0, 1).on_load_checkpoint({"global_step": 4})
