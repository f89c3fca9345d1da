"""`integrations.demo`: the main job, ``smooth-infonce-demo`` (extra ``[demo]``).

- `cli`: the command (``python -m smooth_infonce.integrations.demo`` is the same): the runs it
  compares, its options, its tables and plots.
- `pretraining`: one pre-training run through the Lightning module, evaluated on frozen features.
- `evaluation`: kNN and linear-probe accuracy, paired differences with t intervals.

Imports: everything upstream (`recipes`, `data`, `lightly`, `lightning`); nothing imports it.
"""
