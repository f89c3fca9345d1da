"""The test command is never silent for minutes: conftest's heartbeat prints a line while a long test
runs, to the terminal, not into the test's captured output."""

import os
import shutil
import subprocess
import sys
from pathlib import Path


def test_a_long_test_prints_still_running_lines(tmp_path):
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_long.py").write_text("import time\n\ndef test_long():\n    time.sleep(1.6)\n\n"
                                           "def test_short():\n    pass\n")
    env = {**os.environ, "SMOOTH_INFONCE_TEST_HEARTBEAT": "0.5"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    beats = [line for line in done.stdout.splitlines() if "still running" in line]
    assert len(beats) >= 2 and all("test_long.py::test_long" in line for line in beats), done.stdout
