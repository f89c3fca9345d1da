"""benchmarks/gpu_check.sh in the GPU image's situation, as far as a CPU machine can replay it.

The lent GPU machines get only the working tree (no install of the project, no .venv, `python3` on
PATH) and have no lightly. Here: a copy of the tree (the files git tracks or does not ignore, as the
device machine receives them), `PYTHON` unset, a `python3` on PATH that is this interpreter with
lightly hidden from the import system, CUDA hidden. The script must stop cleanly at "no usable CUDA
device" (exit code 2), and its --collect-only mode must map smooth_infonce.integrations through its
path shim and collect every test marked `gpu` without an import error.
"""

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"

HIDE_LIGHTLY = '''\
import sys


class _HideLightly:
    """The GPU image has no lightly: every import of it fails as if it were not installed."""

    def find_spec(self, name, path=None, target=None):
        if name == "lightly" or name.startswith("lightly."):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by tests/test_gpu_check.py)", name=name)
        return None


sys.meta_path.insert(0, _HideLightly())
'''


def test_script_parses():
    done = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def copy_tree(destination: Path) -> None:
    """The files the device machine receives: tracked, and untracked but not ignored."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                                capture_output=True, check=True).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("needs a git checkout (git ls-files) to copy the working tree as the device machine gets it")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file() and not name.startswith(".venv/"):
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)


def gpu_marked_tests() -> set:
    """Names of the test functions that carry the gpu marker (`@gpu`, `@pytest.mark.gpu`), read from
    the sources: what pytest must collect."""
    names = set()
    for path in (ROOT / "tests").glob("test_*.py"):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test"):
                for decorator in node.decorator_list:
                    text = ast.unparse(decorator)
                    if text == "gpu" or re.search(r"\bmark\.gpu\b", text):
                        names.add(node.name)
    return names


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """(tree, environment): the copied tree and the environment of the GPU image's situation."""
    base = tmp_path_factory.mktemp("gpu_image")
    tree, bin_dir, site = base / "tree", base / "bin", base / "site"
    for folder in (tree, bin_dir, site):
        folder.mkdir()
    copy_tree(tree)
    assert not (tree / ".venv").exists()
    (site / "sitecustomize.py").write_text(HIDE_LIGHTLY)
    python3 = bin_dir / "python3"
    python3.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python3.chmod(0o755)
    env = {key: value for key, value in os.environ.items()
           if key not in ("PYTHON", "VIRTUAL_ENV", "PYTHONHOME", "TRITON_INTERPRET", "GPU_CHECK_SITE")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", PYTHONPATH=str(site), CUDA_VISIBLE_DEVICES="")
    return tree, env


def run_both(tree, env):
    """The plain run and the --collect-only run, side by side (each mostly waits on imports)."""
    procs = [subprocess.Popen(["bash", "benchmarks/gpu_check.sh", *extra], cwd=tree, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for extra in ([], ["--collect-only"])]
    return [(proc.communicate(timeout=240)[0], proc.returncode) for proc in procs]


def test_gpu_check_on_the_image_without_a_gpu(image):
    tree, env = image
    results_before = sorted(p.name for p in (tree / "benchmarks" / "results").iterdir())
    (plain, plain_rc), (collect, collect_rc) = run_both(tree, env)

    # the plain run: python3 from PATH, lightly hidden, stops at the CUDA check with exit code 2
    assert plain_rc == 2, plain
    assert f"interpreter: {shutil.which('python3', path=env['PATH'])}" in plain, plain
    assert "lightly not importable" in plain, plain
    assert plain.rstrip().endswith("no usable CUDA device: stopping"), plain
    assert sorted(p.name for p in (tree / "benchmarks" / "results").iterdir()) == results_before

    # --collect-only: the shim maps smooth_infonce.integrations to the copy's integrations/, and
    # pytest collects every gpu-marked test without an import error
    assert collect_rc == 0, collect
    resolved = Path(os.path.realpath(tree))
    assert f"import check: smooth_infonce and smooth_infonce.integrations from {resolved}" in collect, collect
    assert "smooth_infonce.integrations.lightning found, needs an optional package" in collect, collect
    assert "error" not in collect.lower(), collect
    collected = set(re.findall(r"::(test_\w+)", collect))
    expected = gpu_marked_tests()
    assert expected, "no test carries the gpu marker: the check below would prove nothing"
    assert expected <= collected, sorted(expected - collected)
    count = re.search(r"(\d+)/\d+ tests collected", collect)
    assert count and int(count.group(1)) >= len(expected), collect


def test_stages_include_the_speed_variants():
    """The variants stage (kernel_throughput.py --variants) has a weight and a minimum like the others,
    and the minimums of the stages that always run fit the 8-minute total."""
    text = SCRIPT.read_text()
    stages = re.search(r'^STAGES="([^"]+)"', text, re.M).group(1).split()
    parsed = {name: (float(weight), int(minimum)) for name, weight, minimum in (s.split(":") for s in stages)}
    assert list(parsed)[-2:] == ["tiles", "variants"] and parsed["variants"][0] > 0
    assert sum(minimum for _, minimum in parsed.values()) < 480
    body = re.search(r"variants_stage\(\) \{(.*?)\n\}", text, re.S).group(1)
    assert "--variants" in body and "--budget" in body and '--record-in "$OUT.json"' in body
    assert re.search(r"^run_stage variants$", text, re.M)
