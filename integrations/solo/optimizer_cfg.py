"""The recipes' optimiser settings that solo-learn lacks, shared by every method of this package.

Toolkit-free (no solo-learn import), so CI checks it without solo-learn. Keys read from the config:

- ``optimizer.exclude_depthwise_wd`` (bool, default false): no weight decay on depthwise kernels
  (SSLight), on top of solo-learn's ``optimizer.exclude_bias_n_norm_wd`` (1-D parameters).
- ``scheduler.min_lr_per_256`` / ``scheduler.warmup_start_lr_per_256`` (float or null, default
  null): the final lr and the lr the warm-up starts from, per 256 images. When set they replace
  ``scheduler.min_lr`` / ``scheduler.warmup_start_lr``, scaled like solo-learn scales
  ``optimizer.lr`` (batch size x devices x nodes / 256), so they follow the batch.
- ``optimizer.weight_decay_end`` (float or null, default null): DINO's ViT schedule, a cosine per
  iteration from ``optimizer.weight_decay`` to this value over the run, applied to the groups that
  decay (weight decay != 0). solo-learn keeps the weight decay constant.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import omegaconf
import torch
from omegaconf import OmegaConf

from smooth_infonce.integrations.recipes import OptimizerSpec, cosine_ramp
from smooth_infonce.integrations.recipes.optim import split_no_decay

PER_256_KEYS = {"scheduler.min_lr_per_256": "min_lr", "scheduler.warmup_start_lr_per_256": "warmup_start_lr"}


def _select(cfg: omegaconf.DictConfig, key: str, default: Any) -> Any:
    value = OmegaConf.select(cfg, key, default=default)
    return default if value is None else value


def devices_per_node(devices: Any, accelerator: str = "auto") -> int:
    """The processes Lightning starts per node for ``devices``, read as Lightning reads it: an int
    (a count; -1: every visible GPU), a list of device ids, or a string ("2": a count, "0,1" or
    "0,": ids, "-1", "auto": every visible GPU on a GPU accelerator, else 1)."""
    visible = torch.cuda.device_count() if accelerator in ("gpu", "cuda", "auto") else 0
    if isinstance(devices, str):
        text = devices.strip()
        if text == "auto":
            return max(visible, 1)
        if "," in text:
            return len([part for part in text.split(",") if part.strip()])
        try:
            devices = int(text)
        except ValueError:
            raise ValueError(f"devices {devices!r}: expected a count, -1, 'auto' or device ids like '0,1'") from None
    if isinstance(devices, int) and not isinstance(devices, bool):
        if devices == -1 and visible:
            return visible
        if devices < 1:
            raise ValueError(f"devices {devices!r}: expected a positive count (or -1 with GPUs visible)")
        return devices
    if isinstance(devices, (str, bool)) or not hasattr(devices, "__len__"):
        raise ValueError(f"devices {devices!r}: expected a count, a list of device ids or a string")
    return len(devices)


def total_batch(cfg: omegaconf.DictConfig) -> int:
    """solo-learn's lr scale numerator (``parse_cfg``): batch per device x devices x nodes, the
    devices counted as Lightning counts them (`devices_per_node`: solo-learn's own ``len`` takes
    only a list)."""
    devices = devices_per_node(cfg.devices, str(_select(cfg, "accelerator", "auto")))
    return int(cfg.optimizer.batch_size) * devices * int(_select(cfg, "num_nodes", 1))


def add_optimizer_cfg(cfg: omegaconf.DictConfig) -> None:
    """Fill the defaults of the keys above and turn the per-256 values into solo-learn's own keys
    (in place, from a method's ``add_and_assert_specific_cfg``)."""
    cfg.optimizer.exclude_depthwise_wd = bool(_select(cfg, "optimizer.exclude_depthwise_wd", False))
    end = OmegaConf.select(cfg, "optimizer.weight_decay_end", default=None)
    if end is not None and float(end) < 0:
        raise ValueError(f"optimizer.weight_decay_end must be null or >= 0, got {end}")
    cfg.optimizer.weight_decay_end = None if end is None else float(end)
    for key, target in PER_256_KEYS.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None:
            cfg.scheduler[target] = float(value) * total_batch(cfg) / 256


class RecipeOptimizer:
    """Mixin for a solo-learn method: the depthwise no-decay split of its parameter groups and the
    weight-decay schedule (see the module docstring)."""

    cfg: omegaconf.DictConfig

    @property
    def learnable_params(self) -> List[Dict[str, Any]]:
        groups = super().learnable_params
        if not self.cfg.optimizer.exclude_depthwise_wd:
            return groups
        # solo-learn splits off the 1-D parameters itself afterwards when exclude_bias_n_norm_wd
        return split_no_decay(groups, self, OptimizerSpec(exclude_bias_norm=self.exclude_bias_n_norm_wd,
                                                          exclude_depthwise=True))

    def scheduled_weight_decay(self, step: int, total_steps: int) -> Optional[float]:
        """The decaying groups' weight decay at iteration ``step`` (None: constant, solo-learn's)."""
        end = self.cfg.optimizer.weight_decay_end
        if end is None:
            return None
        return cosine_ramp(step / max(1, total_steps), float(self.cfg.optimizer.weight_decay), end)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        parent = getattr(super(), "on_train_batch_start", None)
        if parent is not None:
            parent(batch, batch_idx)
        decay = self.scheduled_weight_decay(self.trainer.global_step, int(self.trainer.estimated_stepping_batches))
        if decay is None:
            return
        groups = [group for optimizer in self.trainer.optimizers for group in optimizer.param_groups]
        if getattr(self, "_decaying_groups", None) is None:  # fixed at the first step: a decay of 0 stays 0
            self._decaying_groups = [i for i, group in enumerate(groups) if group["weight_decay"] != 0]
        for i in self._decaying_groups:  # the exempt groups (and the classifier) stay at 0
            groups[i]["weight_decay"] = decay
