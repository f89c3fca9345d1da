"""Test set-up shared by every test module.

The Triton interpreter flag is read when a kernel is decorated, so it is set here, before any test
imports smooth_infonce: without CUDA the kernels run (slowly, exactly) on the CPU.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

from hypothesis import HealthCheck, settings  # noqa: E402

# CI draws the same examples every run (a red build is reproducible); locally draws are random.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "dev"))
