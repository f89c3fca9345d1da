"""Toolkit integrations of smooth-infonce, installed as `smooth_infonce.integrations`.

- `smooth_infonce.integrations.lightly`: drop-in subclass of lightly's NTXentLoss.
- `smooth_infonce.integrations.recipes`: the light-moco and SSLight recipes as named presets.
- `smooth_infonce.integrations.solo`: solo-learn methods, backbones, configs and launcher.
- `smooth_infonce.integrations.backbones`: the recipes' backbones (timm / torchvision, no weight
  download), each reporting its measured output width; toolkit-free.
- `smooth_infonce.integrations.optim`: parameter groups with the no-decay rules, LARS, lr scaling;
  toolkit-free.
- `smooth_infonce.integrations.demo`: the main job (``python -m smooth_infonce.integrations.demo``):
  pre-trains a tiny network on scikit-learn's digits with lightly + smooth-infonce and compares
  plain, uniform-smoothed and neighbour-smoothed InfoNCE on frozen features.
"""
