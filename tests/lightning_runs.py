"""Training runs of `PretrainModule` in processes of their own, for tests/test_lightning.py.

Lightning's DDP launcher starts rank 1 by running this script again, and the kill-and-resume test
needs a process it can kill, so these runs cannot live inside the pytest process.

    python tests/lightning_runs.py step --devices 2 --out step.pt      # one SimCLR step, DDP or not
    python tests/lightning_runs.py step --preset sslight_dino --devices 2 --out step.pt   # 3 DINO / SwAV steps
    python tests/lightning_runs.py presets --out presets.json           # every preset under 2-process DDP
    python tests/lightning_runs.py train --dir RUN [--kill-at-epoch 2] [--resume]
    python tests/lightning_runs.py train --presets sslight_dino,sslight_swav --dir RUN --kill-at-epoch 2 --resume
    python tests/lightning_runs.py train --devices 2 --variable-size --record-views --num-workers 0,2 --dir RUN ...
    python tests/lightning_runs.py views --out views.pt    # 2-process DDP: the views each rank draws
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).parent))

import lightning as L  # noqa: E402

from smooth_infonce.integrations.data.digits import digit_images  # noqa: E402
from smooth_infonce.integrations.lightning import PretrainDataModule, from_preset  # noqa: E402
from smooth_infonce.integrations.recipes import get_preset  # noqa: E402
from smooth_infonce.integrations.recipes.backbones import list_backbones, register_backbone  # noqa: E402

TINY = dict(backbone__name="tiny_cnn", backbone__kwargs={"width": 8}, head__hidden_dim=32,
            head__output_dim=16, views__global_crops={"size": 16}, views__local_crops=None)
TINY_LOCALS = {"count": 2, "size": 8, "scale": (0.05, 0.3)}


def tiny_overrides(preset: str, keep_vit: bool = False) -> dict:
    """A preset shrunk for the CPU: tiny_cnn at 16 px, small heads, queues and prototypes, two
    8 px local crops where the preset has local crops. ``keep_vit``: the ViT presets keep
    ViT-Tiny/16 (drop path included) at its smallest sizes, 32 px globals and 16 px locals."""
    recipe = get_preset(preset)
    overrides = dict(TINY, moco__queue_size=32, dino__num_prototypes=64, swav__num_prototypes=32)
    if recipe.views.local_crops is not None:
        overrides["views__local_crops"] = dict(TINY_LOCALS)
    if keep_vit and recipe.backbone.name == "vit_tiny_patch16":
        del overrides["backbone__name"], overrides["backbone__kwargs"]
        overrides["views__global_crops"] = {"size": 32}
        overrides["views__local_crops"] = dict(TINY_LOCALS, size=16)
    return overrides


def module_options(preset: str) -> dict:
    """The smoothed-InfoNCE presets run the loss's reference backend on the CPU; DINO and SwAV
    have lightly's losses, without backends."""
    return {"backend": "reference"} if get_preset(preset).framework in ("moco", "simclr") else {}


# --- one step: DDP against one process on the same global batch ---------------------------------


if "flat_linear" not in list_backbones():
    @register_backbone("flat_linear")
    def _flat_linear(cifar_stem: bool = True, width: int = 12) -> nn.Module:
        """No batch norm: per-process statistics would differ from one process's by design."""
        return nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(3 * 4 * 4, width), nn.ReLU())


class FixedViews(Dataset):
    """Two fixed random 8 px views per image (and ``num_local`` 4 px ones): no augmentation
    randomness between the runs."""

    def __init__(self, count: int = 16, num_local: int = 0) -> None:
        gen = torch.Generator().manual_seed(0)
        self.views = torch.randn(count, 2, 3, 8, 8, generator=gen)
        self.locals = torch.randn(count, num_local, 3, 4, 4, generator=gen)

    def __len__(self) -> int:
        return len(self.views)

    def __getitem__(self, index: int):
        return [self.views[index, 0], self.views[index, 1], *self.locals[index]], 0


class RecordStep(L.Callback):
    """After the backward (gradients already averaged by DDP): the gradient, and after the step the
    global loss (the value ``training_step`` returned: with a cached-gradient step, whose backward
    runs chunk by chunk, that is the whole batch's loss)."""

    def __init__(self, out: str) -> None:
        self.out = out
        self.allreduce_calls = 0  # DDP's gradient all-reduces (buckets), counted by a comm hook

    def on_train_start(self, trainer, module) -> None:
        ddp = trainer.strategy.model
        if trainer.world_size > 1 and hasattr(ddp, "register_comm_hook"):
            from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

            def counting_allreduce(state, bucket):
                self.allreduce_calls += 1
                return allreduce_hook(state, bucket)

            ddp.register_comm_hook(state=None, hook=counting_allreduce)

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        grads = torch.cat([p.grad.flatten() for p in module.model.parameters() if p.grad is not None])
        record = {"grad": grads, "world_size": trainer.world_size, "allreduce_calls": self.allreduce_calls,
                  "automatic_optimization": module.automatic_optimization}  # False: the chunked step ran
        if module.recipe.framework == "dino":
            record["center"] = module.criterion.center.clone()
            record["teacher"] = {name: p.detach().clone() for name, p in module.model.teacher_head.named_parameters()}
        if module.recipe.framework == "swav":  # the rows' order differs between the runs: compare Gram matrices
            queue = module.model.queue
            record["queue_gram"] = torch.einsum("vqd,vqe->vde", queue, queue)
            record["queue_filled"] = int(module.model.queue_filled)
            record["queue_in_use"] = module.model.queue_in_use(module.current_epoch)
        self.record = record

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        losses = module.all_gather(loss.detach())  # each process's mean over its own rows
        self.record["loss"] = losses.float().mean()
        if trainer.is_global_zero:
            torch.save(self.record, self.out)


class BatchNormInEvalMode(L.Callback):
    """Batch norm normalises with statistics of the process's own rows, so one process and two
    differ by design. SwAV's head has batch norm (lightly's SwaVProjectionHead), so the DDP
    comparison keeps every batch-norm layer in eval mode: it then applies its fixed running
    statistics to each row alone, and everything else of the step (distributed Sinkhorn, the
    queue over the processes, gradient averaging) is compared exactly. Without this callback the
    comparison fails."""

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        for layer in module.modules():
            if isinstance(layer, nn.modules.batchnorm._BatchNorm):
                layer.eval()


def one_step(args) -> None:
    """``--preset simclr``: one SimCLR step. ``sslight_dino`` / ``sslight_swav``: three steps (one per
    epoch) of 16 images with 2 global and 2 local views, so that the centre, the teacher's EMA and
    (SwAV) a full queue of two steps all enter the recorded third step."""
    L.seed_everything(0, workers=True)
    callbacks = [RecordStep(args.out)]
    if args.preset == "simclr":
        module = from_preset("light_moco", framework="simclr", backbone__name="flat_linear", backbone__kwargs={},
                             head__hidden_dim=16, head__output_dim=8, head__batch_norm=False,
                             loss__smoothing=0.1, loss__schedule="constant", loss__warmup_epochs=0,
                             views__local_crops=None,
                             module_options={"backend": "reference", "chunk_size": args.chunk_size})
        dataset, steps = FixedViews(), 1
    else:
        common = dict(backbone__name="flat_linear", backbone__kwargs={}, head__hidden_dim=16, head__output_dim=8,
                      views__local_crops={"count": 2, "size": 4, "scale": (0.05, 0.3)}, optimizer__warmup_epochs=0)
        if args.preset == "sslight_dino":  # no batch norm in the head: the per-row computation is the same
            module = from_preset("sslight_dino", head__batch_norm=False, dino__num_prototypes=32,
                                 dino__freeze_last_layer_epochs=0, dino__teacher_momentum=0.9,
                                 dino__warmup_teacher_temperature_epochs=3, **common)
        else:  # a queue of two global batches, filling from the first step
            module = from_preset("sslight_swav", swav__num_prototypes=24, swav__queue_size=32,
                                 swav__queue_start_epoch=0, swav__freeze_prototypes_epochs=0, **common)
            callbacks.append(BatchNormInEvalMode())
        dataset, steps = FixedViews(num_local=2), 3
    data = PretrainDataModule(module.recipe, dataset=dataset, transform=None,
                              batch_size=16 // args.devices, shuffle=False)
    trainer = L.Trainer(accelerator="cpu", devices=args.devices, strategy="ddp" if args.devices > 1 else "auto",
                        max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=callbacks)
    trainer.fit(module, datamodule=data)


def every_preset(args) -> None:
    """Two steps of every preset (tiny, on digits) under 2-process DDP; rank 0 writes what it saw."""
    from smooth_infonce.integrations.recipes import list_presets

    seen = {}
    for preset in list_presets():
        L.seed_everything(0, workers=True)
        # tiny_cnn for every preset here (the ViT presets run ViT-Tiny in the CPU test)
        module = from_preset(preset, module_options=module_options(preset), **tiny_overrides(preset))
        data = PretrainDataModule(module.recipe, dataset=DigitImages(64), batch_size=8)
        trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=2, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(module, datamodule=data)
        enqueued = int(module.criterion.bank_enqueued) if module.recipe.framework == "moco" else None
        seen[preset] = {"world_size": trainer.world_size, "steps": trainer.global_step, "enqueued": enqueued,
                        "loss": float(trainer.callback_metrics["train/loss"])}
    if trainer.is_global_zero:
        Path(args.out).write_text(json.dumps(seen))


# --- a run that checkpoints every epoch, can be killed, and resumed --------------------------------


def rank_file(run: Path, name: str, rank: int) -> Path:
    """``name`` in ``run`` for rank 0 (losses.jsonl), ``name`` with ``.rank<r>`` before its suffix
    for the other ranks (losses.rank1.jsonl)."""
    return run / name if rank == 0 else run / f"{Path(name).stem}.rank{rank}{Path(name).suffix}"


def digest(tensors) -> str:
    """A hash of the tensors' bytes: equal digests, bit-identical tensors."""
    sha = hashlib.sha1()
    for tensor in tensors:
        sha.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return sha.hexdigest()[:16]


def rng_digest() -> str:
    """A hash of this process's torch, numpy and python RNG states."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    return digest([torch.get_rng_state(), torch.from_numpy(keys.astype(np.int64)), torch.tensor([position, has_gauss]),
                   torch.tensor(cached), torch.tensor(random.getstate()[1], dtype=torch.int64)])


class RecordLosses(L.Callback):
    """Appends every step's loss to losses.jsonl (rank r > 0: losses.rank<r>.jsonl); with
    ``kill_at_epoch`` the process kills itself with SIGKILL when that epoch starts (the previous
    epoch's checkpoint is on disk by then). ``record_views``: each step's dataset indices and a
    digest of its views too, and rng.jsonl the digest of the process's RNG streams when training
    starts (after a resumed run's restore) and at every checkpoint."""

    def __init__(self, path: Path, kill_at_epoch: int | None, record_views: bool = False) -> None:
        self.path, self.kill_at_epoch, self.record_views = path, kill_at_epoch, record_views

    def setup(self, trainer, module, stage) -> None:
        self.rank = trainer.global_rank
        self.path = rank_file(self.path.parent, self.path.name, self.rank)

    def write_rng(self, event: str, trainer) -> None:
        if self.record_views:
            with rank_file(self.path.parent, "rng.jsonl", self.rank).open("a") as f:
                f.write(json.dumps({"event": event, "epoch": trainer.current_epoch, "rng": rng_digest()}) + "\n")

    def on_fit_start(self, trainer, module) -> None:  # after a checkpoint's restore, before the loader
        self.write_rng("start", trainer)

    def on_save_checkpoint(self, trainer, module, checkpoint) -> None:  # just before the module's hook
        self.write_rng("save", trainer)

    def on_train_epoch_start(self, trainer, module) -> None:
        if trainer.current_epoch == self.kill_at_epoch:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        record = {"epoch": trainer.current_epoch, "step": trainer.global_step, "loss": float(outputs["loss"]),
                  "lr": module.optimizers().param_groups[0]["lr"]}
        framework = module.recipe.framework
        if framework in ("moco", "simclr"):
            record["alpha"] = module.criterion.effective_smoothing
        elif framework == "dino":
            record["teacher_temperature"] = float(module.criterion.teacher_temperature(epoch=trainer.current_epoch))
            record["center_norm"] = float(module.criterion.center.norm())
        else:
            record["queue_in_use"] = bool(trainer.callback_metrics["train/queue_in_use"])  # in this step's loss
            record["queue_filled"] = int(module.model.queue_filled)
        if self.record_views:
            views, _, index = batch
            record["ids"], record["views"] = index.tolist(), digest(views)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()


class DigitImages(Dataset):
    """``count`` digits at 16 px; ``variable_size``: image i at 12 + 3 (i % 5) px, as the images of
    an ImageFolder differ in size (the recipe's crops then draw a number of values that depends on
    the image). ``repeat``: each digit ``repeat`` times in a row (index i is digit i // repeat)."""

    def __init__(self, count: int, variable_size: bool = False, repeat: int = 1) -> None:
        images, labels = digit_images(-(-count // repeat), size=16)
        self.images = [images[i // repeat] for i in range(count)]
        self.labels = [labels[i // repeat] for i in range(count)]
        if variable_size:
            self.images = [image.resize((12 + 3 * (i % 5),) * 2) for i, image in enumerate(self.images)]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.images[index], self.labels[index]


# The runs `train` knows: light_moco (alpha warm-up, queue); DINO with the teacher temperature
# rising over 3 epochs and the last layer frozen in epoch 0; SwAV with a queue of two steps that
# fills from epoch 1 and is in use from its third step (so a checkpoint after epoch 1 holds a full
# queue in use), prototypes frozen in epoch 0.
TRAIN_RUNS = {
    "light_moco": dict(moco__queue_size=48, loss__warmup_epochs=1, optimizer__warmup_epochs=1, **TINY),
    "sslight_dino": dict(tiny_overrides("sslight_dino"), dino__warmup_teacher_temperature_epochs=3,
                         optimizer__warmup_epochs=1),
    "sslight_swav": dict(tiny_overrides("sslight_swav"), swav__queue_size=32, swav__queue_start_epoch=1,
                         optimizer__warmup_epochs=1),
}


def train_one(preset: str, run: Path, args, num_workers: int, kill_at_epoch: int | None, resume: bool) -> None:
    """One run; under DDP every rank records its own losses (with ``--record-views`` its indices,
    views and RNG digests) and writes its own final state (final.pt, final.rank1.pt)."""
    L.seed_everything(0, workers=True)
    options = module_options(preset) | ({"chunk_size": args.chunk_size} if args.chunk_size else {})
    module = from_preset(preset, module_options=options, **TRAIN_RUNS[preset])
    data = PretrainDataModule(module.recipe, dataset=DigitImages(64, variable_size=args.variable_size),
                              batch_size=16, num_workers=num_workers)
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(dirpath=run / "ckpt", save_last=True, save_top_k=-1,
                                                      every_n_epochs=1)
    record = RecordLosses(run / "losses.jsonl", kill_at_epoch, record_views=args.record_views)
    trainer = L.Trainer(accelerator="cpu", devices=args.devices, strategy="ddp" if args.devices > 1 else "auto",
                        max_epochs=args.epochs, deterministic=True, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[record, checkpoints])
    trainer.fit(module, datamodule=data, ckpt_path=str(run / "ckpt" / "last.ckpt") if resume else None)
    final = {"state": module.state_dict(), "world_size": trainer.world_size}
    if module.recipe.framework == "moco":
        final["bank"] = module.criterion.memory_bank.bank.clone()
    torch.save(final, rank_file(run, "final.pt", trainer.global_rank))


def train(args) -> None:
    """One run in ``--dir``, or with ``--presets a,b`` one per preset in ``--dir/<preset>``, in turn
    (with ``--num-workers 0,2`` one per preset and worker count, ``--dir/<preset>-workers<n>``):
    a finished run (final.pt) is skipped, one with a checkpoint resumes (``--resume``), a fresh
    one is killed at ``--kill-at-epoch``. Calling ``--kill-at-epoch 2 --resume`` again and again
    kills and resumes each run in turn, two runs in four processes."""
    presets, workers = args.presets.split(","), [int(n) for n in args.num_workers.split(",")]
    for preset in presets:
        for num_workers in workers:
            run = Path(args.dir)
            if len(presets) * len(workers) > 1:
                run = run / (preset if len(workers) == 1 else f"{preset}-workers{num_workers}")
            run.mkdir(parents=True, exist_ok=True)
            if (run / "final.pt").exists():
                continue
            resume = args.resume and (run / "ckpt" / "last.ckpt").exists()
            train_one(preset, run, args, num_workers, None if resume else args.kill_at_epoch, resume)


class SameImagesOnEveryRank(DigitImages):
    """Every digit twice in a row: with 2 processes and no shuffling rank 0 is handed indices 0, 2,
    4, ... and rank 1 indices 1, 3, 5, ...: the same images in the same order."""

    def __init__(self, count: int) -> None:
        super().__init__(count, repeat=2)


class RecordViews(L.Callback):
    def __init__(self) -> None:
        self.views = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.views.append(([view.clone() for view in batch[0]], batch[2].clone()))


def rank_views(args) -> None:
    """2-process DDP, one step of light_moco on `SameImagesOnEveryRank`, for seed 0, seed 0 again,
    seed 1, and seed 0 with 2 workers: each rank writes its (views, indices) of each run (``--out``
    for rank 0, with ``.rank1`` before the suffix for rank 1)."""
    seen = {}
    for name, seed, workers in (("seed0", 0, 0), ("seed0_again", 0, 0), ("seed1", 1, 0), ("seed0_workers", 0, 2)):
        L.seed_everything(seed, workers=True)
        module = from_preset("light_moco", module_options=module_options("light_moco"), **TRAIN_RUNS["light_moco"])
        data = PretrainDataModule(module.recipe, dataset=SameImagesOnEveryRank(16), batch_size=4, shuffle=False,
                                  num_workers=workers)
        views = RecordViews()
        trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=1, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            callbacks=[views])
        trainer.fit(module, datamodule=data)
        seen[name] = views.views
    out = Path(args.out)
    torch.save(seen, rank_file(out.parent, out.name, trainer.global_rank))


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    step = sub.add_parser("step")
    step.add_argument("--devices", type=int, default=1)
    step.add_argument("--out", required=True)
    step.add_argument("--preset", default="simclr", choices=("simclr", "sslight_dino", "sslight_swav"))
    step.add_argument("--chunk-size", type=int, default=None, help="simclr: the cached-gradient step")
    presets = sub.add_parser("presets")
    presets.add_argument("--out", required=True)
    run = sub.add_parser("train")
    run.add_argument("--dir", required=True)
    run.add_argument("--epochs", type=int, default=4)
    run.add_argument("--kill-at-epoch", type=int, default=None)
    run.add_argument("--resume", action="store_true")
    run.add_argument("--presets", default="light_moco", help=f"comma-separated, of {sorted(TRAIN_RUNS)}")
    run.add_argument("--devices", type=int, default=1)
    run.add_argument("--num-workers", default="0", help="comma-separated: one run per count")
    run.add_argument("--variable-size", action="store_true", help="image i at 12 + 3 (i % 5) px")
    run.add_argument("--record-views", action="store_true")
    run.add_argument("--chunk-size", type=int, default=None, help="the cached-gradient step (moco, simclr)")
    views = sub.add_parser("views")
    views.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    {"step": one_step, "presets": every_preset, "train": train, "views": rank_views}[args.command](args)


if __name__ == "__main__":
    main()
