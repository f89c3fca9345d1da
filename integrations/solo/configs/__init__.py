"""Hydra configs for solo-learn shipped with smooth-infonce (YAML only; see configs_index)."""
