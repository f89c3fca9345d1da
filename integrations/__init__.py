"""Toolkit integrations of smooth-infonce, installed as `smooth_infonce.integrations`.

- `smooth_infonce.integrations.lightly`: drop-in subclass of lightly's NTXentLoss.
- `smooth_infonce.integrations.recipes`: the light-moco and SSLight recipes as named presets.
- `smooth_infonce.integrations.solo`: solo-learn methods, backbones, configs and launcher.
"""
