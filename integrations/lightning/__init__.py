"""`integrations.lightning`: any preset trained on Lightning, from one device to many nodes (extra
``[lightning]``).

- `module`: `PretrainModule` (model, loss, optimiser and schedules of one recipe; cached-gradient
  steps under manual optimisation; exact DDP resume) and `PretrainDataModule` (the recipe's views of
  an image folder, the digits or Fashion-MNIST).

Imports: the core, `integrations.recipes`, `integrations.data` and `integrations.lightly`; never
`demo`.
"""

from .module import IndexedViews, PretrainDataModule, PretrainModule, build_module, from_preset

__all__ = ["IndexedViews", "PretrainDataModule", "PretrainModule", "build_module", "from_preset"]
