"""Where the shipped Hydra configs are, and which primary configs exist.

Layout of ``configs/`` (one Hydra config root; the package holds YAML only):

- ``pretrain/<recipe>.yaml``, ``linear/<name>.yaml``: primary configs (``# @package _global_``),
  selected with ``--config-name pretrain/<recipe>``; the launcher adds the ``pretrain/`` or
  ``linear/`` prefix itself.
- ``backbone/``, ``dataset/``, ``augmentations/``, ``wandb/``, ``base/``: config groups, chosen
  on the command line, e.g. ``backbone=efficientnet_b0 dataset=imagenet100``.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Dict, List

CONFIG_PACKAGE = "smooth_infonce.integrations.solo.configs"
CONFIG_PATH = f"pkg://{CONFIG_PACKAGE}"
PRIMARY_KINDS = ("pretrain", "linear")


def config_dir() -> str:
    """Absolute path of the config root (for ``hydra.initialize_config_dir`` / ``--config-dir``)."""
    return str(Path(str(resources.files(CONFIG_PACKAGE))).resolve())


def list_configs(kind: str | None = None) -> List[str]:
    """Primary config names, e.g. ``"pretrain/light_moco"``; ``kind`` filters on the folder."""
    kinds = PRIMARY_KINDS if kind is None else (kind,)
    root = resources.files(CONFIG_PACKAGE)
    names = []
    for folder in kinds:
        if folder not in PRIMARY_KINDS:
            raise ValueError(f"kind must be one of {PRIMARY_KINDS}, got {folder!r}")
        names += [f"{folder}/{entry.name[:-len('.yaml')]}" for entry in root.joinpath(folder).iterdir()
                  if entry.name.endswith(".yaml")]
    return sorted(names)


def list_group_options() -> Dict[str, List[str]]:
    """Options of every config group, e.g. {"backbone": ["efficientnet_b0", ...], ...}."""
    root = resources.files(CONFIG_PACKAGE)
    groups = {}
    for entry in root.iterdir():
        if entry.is_dir() and entry.name not in PRIMARY_KINDS and not entry.name.startswith("__"):
            groups[entry.name] = sorted(option.name[:-len(".yaml")] for option in entry.iterdir()
                                        if option.name.endswith(".yaml"))
    return dict(sorted(groups.items()))
