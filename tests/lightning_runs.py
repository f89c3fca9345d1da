"""Training runs of `PretrainModule` in processes of their own, for tests/test_lightning.py.

Lightning's DDP launcher starts rank 1 by running this script again, and the kill-and-resume test
needs a process it can kill, so these runs cannot live inside the pytest process.

    python tests/lightning_runs.py step --devices 2 --out step.pt      # one SimCLR step, DDP or not
    python tests/lightning_runs.py presets --out presets.json           # every preset under 2-process DDP
    python tests/lightning_runs.py train --dir RUN [--kill-at-epoch 2] [--resume]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).parent))

import lightning as L  # noqa: E402

from smooth_infonce.integrations.backbones import list_backbones, register_backbone  # noqa: E402
from smooth_infonce.integrations.digits import digit_images  # noqa: E402
from smooth_infonce.integrations.lightning import PretrainDataModule, from_preset  # noqa: E402

TINY = dict(backbone__name="tiny_cnn", backbone__kwargs={"width": 8}, head__hidden_dim=32,
            head__output_dim=16, views__global_crops={"size": 16}, views__local_crops=None)


# --- one step: DDP against one process on the same global batch ---------------------------------


if "flat_linear" not in list_backbones():
    @register_backbone("flat_linear")
    def _flat_linear(cifar_stem: bool = True, width: int = 12) -> nn.Module:
        """No batch norm: per-process statistics would differ from one process's by design."""
        return nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(3 * 4 * 4, width), nn.ReLU())


class FixedViews(Dataset):
    """Two fixed random views per image: no augmentation randomness between the runs."""

    def __init__(self, count: int = 16) -> None:
        gen = torch.Generator().manual_seed(0)
        self.views = torch.randn(count, 2, 3, 8, 8, generator=gen)

    def __len__(self) -> int:
        return len(self.views)

    def __getitem__(self, index: int):
        return [self.views[index, 0], self.views[index, 1]], 0


class RecordStep(L.Callback):
    """After the backward (gradients already averaged by DDP): the global loss and the gradient."""

    def __init__(self, out: str) -> None:
        self.out = out

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        grads = torch.cat([p.grad.flatten() for p in module.model.parameters() if p.grad is not None])
        losses = module.all_gather(self.loss)  # each process's mean over its own rows
        if trainer.is_global_zero:
            torch.save({"loss": losses.float().mean(), "grad": grads, "world_size": trainer.world_size}, self.out)

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.loss = None

    def on_before_backward(self, trainer, module, loss) -> None:
        self.loss = loss.detach()


def one_step(args) -> None:
    L.seed_everything(0, workers=True)
    module = from_preset("light_moco", framework="simclr", backbone__name="flat_linear", backbone__kwargs={},
                         head__hidden_dim=16, head__output_dim=8, head__batch_norm=False,
                         loss__smoothing=0.1, loss__schedule="constant", loss__warmup_epochs=0,
                         views__local_crops=None, module_options={"backend": "reference"})
    data = PretrainDataModule(module.recipe, dataset=FixedViews(), transform=None,
                              batch_size=16 // args.devices, shuffle=False)
    trainer = L.Trainer(accelerator="cpu", devices=args.devices, strategy="ddp" if args.devices > 1 else "auto",
                        max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[RecordStep(args.out)])
    trainer.fit(module, datamodule=data)


def every_preset(args) -> None:
    """Two steps of every preset (tiny, on digits) under 2-process DDP; rank 0 writes what it saw."""
    from smooth_infonce.integrations.recipes import list_presets

    seen = {}
    for preset in list_presets():
        L.seed_everything(0, workers=True)
        overrides = dict(TINY, moco__queue_size=32)
        if preset.startswith("sslight"):
            overrides["views__local_crops"] = {"count": 2, "size": 8, "scale": (0.05, 0.3)}
        module = from_preset(preset, module_options={"backend": "reference"}, **overrides)
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


class RecordLosses(L.Callback):
    """Appends every step's loss to losses.jsonl; with ``kill_at_epoch`` the process kills itself
    with SIGKILL when that epoch starts (the previous epoch's checkpoint is on disk by then)."""

    def __init__(self, path: Path, kill_at_epoch: int | None) -> None:
        self.path, self.kill_at_epoch = path, kill_at_epoch

    def on_train_epoch_start(self, trainer, module) -> None:
        if trainer.current_epoch == self.kill_at_epoch:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"epoch": trainer.current_epoch, "step": trainer.global_step,
                                "loss": float(outputs["loss"]), "alpha": module.criterion.effective_smoothing,
                                "lr": module.optimizers().param_groups[0]["lr"]}) + "\n")
            f.flush()


class DigitImages(Dataset):
    def __init__(self, count: int) -> None:
        self.images, self.labels = digit_images(count, size=16)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.images[index], self.labels[index]


def train(args) -> None:
    run = Path(args.dir)
    run.mkdir(parents=True, exist_ok=True)
    L.seed_everything(0, workers=True)
    module = from_preset("light_moco", moco__queue_size=48, loss__warmup_epochs=1, optimizer__warmup_epochs=1,
                         module_options={"backend": "reference"}, **TINY)
    data = PretrainDataModule(module.recipe, dataset=DigitImages(64), batch_size=16)
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(dirpath=run / "ckpt", save_last=True, save_top_k=-1,
                                                      every_n_epochs=1)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=args.epochs, deterministic=True, logger=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[RecordLosses(run / "losses.jsonl", args.kill_at_epoch), checkpoints])
    trainer.fit(module, datamodule=data, ckpt_path=str(run / "ckpt" / "last.ckpt") if args.resume else None)
    torch.save({"bank": module.criterion.memory_bank.bank.clone(), "state": module.state_dict()}, run / "final.pt")


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    step = sub.add_parser("step")
    step.add_argument("--devices", type=int, default=1)
    step.add_argument("--out", required=True)
    presets = sub.add_parser("presets")
    presets.add_argument("--out", required=True)
    run = sub.add_parser("train")
    run.add_argument("--dir", required=True)
    run.add_argument("--epochs", type=int, default=4)
    run.add_argument("--kill-at-epoch", type=int, default=None)
    run.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    {"step": one_step, "presets": every_preset, "train": train}[args.command](args)


if __name__ == "__main__":
    main()
