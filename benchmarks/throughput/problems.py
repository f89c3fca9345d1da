"""The problems the benchmark times: the loss settings every provider shares, the shapes (GPU S0-S4,
the CPU sizes, S6's correctness grid) and the builders of their inputs."""

from __future__ import annotations

import torch

from smooth_infonce.testing import make_problem

TEMPERATURE = 0.1
SMOOTHING = 0.1
NEIGHBORS = 10

GPU_SHAPES = {
    # id: (layout, N, M, D); in-batch layouts have M = N (2 views, self excluded)
    "S0": ("twotower", 4096, 4096, 128),
    "S1": ("inbatch", 8192, 8192, 128),
    "S2": ("inbatch", 8192, 8192, 256),
    "S3": ("moco", 256, 65536, 128),
    "S4": ("inbatch", 65536, 65536, 128),
}
CPU_SHAPES = {
    "ssl-2x256": ("inbatch", 512, 512, 128),
    "ssl-2x1024": ("inbatch", 2048, 2048, 128),
}

# S6: ragged two-tower 1000 x 3001, correctness only, at these widths and input dtypes
S6_N, S6_M = 1000, 3001
S6_DIMS = (64, 96, 384, 768)
S6_DTYPES = (torch.float32, torch.bfloat16, torch.float64)


def build_problem(layout, n, m, dim, dtype, device, seed=0):
    """One benchmark problem from the project's problem builder (`smooth_infonce.testing`): in-batch
    rows in view order (out0's rows, then out1's), gradients for what a training step
    differentiates (the MoCo keys and queue are frozen)."""
    return make_problem(layout, n, m, dim, dtype=dtype, device=device, seed=seed, shuffle=False,
                        grads=(True, layout == "twotower", False))


def views(problem):
    """(out0, out1) of the in-batch layout: rows with ids b and b + n/2 are two views."""
    half = problem.n // 2
    return problem.anchors[:half], problem.anchors[half:]


def s6_base(d):
    """The fp64 S6 problem at width `d` (one seed per width), cast to each dtype checked."""
    return build_problem("twotower", S6_N, S6_M, d, torch.float64, "cuda", seed=d)
