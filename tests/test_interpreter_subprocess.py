"""The interpreter tests, where this process cannot run them.

Tests marked ``interpreter`` pass CPU tensors to the Triton kernels. The interpreter is chosen once
per process, before the kernels are decorated (tests/conftest.py turns it on only without CUDA), so
on a CUDA machine the default test command skips them in its own process and runs them here, in a
child pytest with TRITON_INTERPRET=1 and CUDA hidden: exactly the run a CPU machine makes.
"""

import os
import subprocess
import sys

import pytest
from conftest import INTERPRETER

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child_environment():
    """The environment of the child run: interpreter on, no CUDA device visible."""
    return {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}


@pytest.mark.skipif(INTERPRETER, reason="the interpreter is on in this process: the interpreter tests ran here")
def test_interpreter_tests_pass_in_a_child_process():
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "interpreter and not gpu",
               os.path.join(ROOT, "tests")]
    done = subprocess.run(command, cwd=ROOT, env=child_environment(), capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert " passed" in done.stdout and "deselected" in done.stdout, done.stdout[-2000:]
