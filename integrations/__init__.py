"""Toolkit integrations of smooth-infonce, installed as `smooth_infonce.integrations`.

- `lightly`: the drop-in subclass of lightly's NTXentLoss (extra ``[lightly]``).
- `lightly_models`: lightly models, heads and views built from the recipes (extra ``[lightly]``).
- `lightning`: `PretrainModule` / `PretrainDataModule`, any preset on Lightning (extra ``[lightning]``).
- `recipes`: the light-moco and SSLight recipes as named presets; toolkit-free.
- `solo`: solo-learn methods, backbones, generated configs and launcher (extra ``[solo]`` + a clone).
- `backbones`: the recipes' backbones (timm / torchvision, no weight download), each reporting its
  measured output width; toolkit-free.
- `optim`: parameter groups with the no-decay rules, LARS, lr scaling; toolkit-free.
- `digits`, `evaluation`, `pretraining`, `demo`: the main job (``smooth-infonce-demo``, extra
  ``[demo]``): pre-trains a tiny network on scikit-learn's bundled digits through the Lightning
  module and compares the losses on frozen features (kNN, linear probe).
"""
