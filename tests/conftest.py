"""Test set-up shared by every test module.

The Triton interpreter flag is read when a kernel is decorated, so it is set here, before any test
imports smooth_infonce: without CUDA the kernels run (slowly, exactly) on the CPU.

Where the kernels run (the default test command must pass on a CPU machine and on a GPU machine):

- tests marked ``interpreter`` pass CPU tensors to the Triton kernels: they need the interpreter,
  which is on here only without CUDA (or with TRITON_INTERPRET=1 set by hand). On a CUDA machine
  this process runs the kernels on the GPU, so those tests are skipped here with a reason and run,
  all together, in a child process with the interpreter on and CUDA hidden
  (`tests/test_interpreter_subprocess.py`);
- tests marked ``gpu`` need a CUDA device and are skipped without one;
- every other test runs on the CPU either way (the reference backend, or ``backend="auto"``,
  which picks the reference for CPU tensors).

The kernel's first-use self-check (`smooth_infonce.self_check`) stays on, as users get it: each new
kind is probed once per process (about 0.2 s under the interpreter), with its verdicts cached in a
temporary directory of this run (never the user's cache; child processes inherit it). A kind that
fails its probe is an error here, not a warning: the fallback to the reference op would otherwise
hide a broken kernel from the very tests that check it.
"""

import atexit
import os
import shutil
import tempfile
import threading
import time

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# whether the kernels of this process run under the interpreter (read by smooth_infonce.ops.triton
# when it is imported, so fixed for the whole run)
INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"
torch.set_num_threads(min(2, torch.get_num_threads()))
_SELF_CHECK_CACHE = tempfile.mkdtemp(prefix="smooth_infonce_test_cache_")
os.environ["SMOOTH_INFONCE_CACHE_DIR"] = _SELF_CHECK_CACHE
atexit.register(shutil.rmtree, _SELF_CHECK_CACHE, True)

from hypothesis import HealthCheck, settings  # noqa: E402

# CI draws the same examples every run (a red build is reproducible); locally draws are random.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "dev"))

INTERPRETER_ELSEWHERE = ("the Triton interpreter is off in this process (CUDA is present, or "
                         "TRITON_INTERPRET=0): this test runs in a child process with TRITON_INTERPRET=1 and "
                         "CUDA hidden, tests/test_interpreter_subprocess.py")


# A test that runs longer than this many seconds prints a "still running" line this often, so the
# test command is never silent for minutes (the DDP, demo and Lightning tests take one to three).
HEARTBEAT_SECONDS = float(os.environ.get("SMOOTH_INFONCE_TEST_HEARTBEAT", "60"))
_terminal_fd = None  # the terminal as it was before pytest captured fd 1 (pytest_configure)


def pytest_configure(config):
    global _terminal_fd
    if HEARTBEAT_SECONDS > 0 and _terminal_fd is None:
        _terminal_fd = os.dup(1)
    config.addinivalue_line(
        "markers", "interpreter: runs the Triton kernels on CPU tensors under the interpreter (in a "
        "child process when CUDA is present)")
    # a kernel that fails its self-check fails the test (tests of the fallback catch it with pytest.warns)
    config.addinivalue_line("filterwarnings", "error::smooth_infonce.self_check.KernelFallbackWarning")


def _interpreter_numpy_clash():
    """triton < 3.7's interpreter turns 1-element arrays into loop bounds with int(), which numpy 2.4
    rejects; the reason to skip with, or None."""
    import numpy
    import triton

    def release(version):
        return tuple(int(part) for part in version.split(".")[:2])

    if release(triton.__version__) < (3, 7) and release(numpy.__version__) >= (2, 4):
        return (f"the Triton interpreter of triton {triton.__version__} fails with numpy {numpy.__version__} "
                "(TypeError: only 0-dimensional arrays can be converted to Python scalars): install numpy<2.4 "
                "(tests/constraints-oldest.txt) to run the kernels' CPU tests")
    return None


def pytest_collection_modifyitems(config, items):
    reason = INTERPRETER_ELSEWHERE
    if INTERPRETER:
        try:
            reason = _interpreter_numpy_clash()
        except ImportError:  # no triton: the kernel tests skip themselves
            reason = None
        if reason is None:
            return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "interpreter" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """While a test runs, a timer thread writes a progress line every HEARTBEAT_SECONDS to the saved
    terminal fd (the test's own output stays captured)."""
    if _terminal_fd is None:
        return (yield)
    done, start = threading.Event(), time.monotonic()

    def beat():
        while not done.wait(HEARTBEAT_SECONDS):
            elapsed = time.monotonic() - start
            os.write(_terminal_fd, f"\n  ... still running {item.nodeid} ({elapsed:.0f} s)\n".encode())

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        return (yield)
    finally:
        done.set()
        thread.join()


@pytest.fixture
def isolated_self_check(tmp_path, monkeypatch):
    """A self-check cache directory of the test's own, the default mode, no verdict from earlier tests
    (the self-check's and the doctor's tests)."""
    from smooth_infonce import self_check

    monkeypatch.setenv(self_check.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(self_check.MODE_ENV, raising=False)
    self_check.reset()
    yield
    self_check.reset()
