"""The Python blocks of the README and of docs/ run as written, each with only the extra its section
names: every Python block after a `<!-- readme-test extra=NAME -->` marker runs in a fresh interpreter in which the
optional packages of every other extra cannot be imported and have no metadata (no extra: the core's
torch, numpy and triton only)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]  # the front door and the reference pages
MARKED_BLOCK = re.compile(r"<!-- readme-test extra=([\w-]*) -->\n```python\n(.*?)```", flags=re.S)
BLOCKS = [block for page in PAGES for block in MARKED_BLOCK.findall(page.read_text())]
# import name of each optional distribution the extras install
IMPORT_NAMES = {"lightly": "lightly", "torchvision": "torchvision", "timm": "timm", "hydra-core": "hydra",
                "lightning": "lightning", "scikit-learn": "sklearn", "matplotlib": "matplotlib", "tqdm": "tqdm",
                "open-clip-torch": "open_clip", "sentence-transformers": "sentence_transformers",
                "transformers": "transformers", "tokenizers": "tokenizers", "datasets": "datasets",
                "accelerate": "accelerate"}
# Runs the block with the blocked packages hidden from every import finder, exactly as if they were
# not installed: an import raises ModuleNotFoundError and importlib.util.find_spec returns None.
RUNNER = """
import importlib.abc, sys
BLOCKED = set(sys.argv[1].split(",")) - {""}
BLOCKED_DISTRIBUTIONS = set(sys.argv[2].split(",")) - {""}

class WithoutBlocked(importlib.abc.MetaPathFinder):
    def __init__(self, finders):
        self.finders = finders

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            return None
        for finder in self.finders:
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                return spec
        return None

    def invalidate_caches(self):
        for finder in self.finders:
            getattr(finder, "invalidate_caches", lambda: None)()

    def find_distributions(self, *args, **kwargs):  # the others' metadata stays (huggingface_hub reads it)
        for finder in self.finders:
            for dist in getattr(finder, "find_distributions", lambda *a, **k: ())(*args, **kwargs):
                if dist.metadata["Name"].lower().replace("_", "-") not in BLOCKED_DISTRIBUTIONS:
                    yield dist

sys.meta_path[:] = [WithoutBlocked(list(sys.meta_path))]
exec(compile(sys.stdin.read(), "README.md block", "exec"), {"__name__": "__main__"})
"""


def distribution_name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ (]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def installed_closure(names: set[str]) -> set[str]:
    """``names`` and everything they require, transitively, as installed (extras' own extras and
    marker-guarded requirements left out)."""
    from importlib import metadata

    seen, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requirements = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        todo += [distribution_name(r) for r in requirements if ";" not in r]
    return seen


def extras() -> dict[str, set[str]]:
    """{extra: import names of the optional packages it installs, directly or through them}."""
    import tomllib

    table = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = {}
    for extra, requirements in table.items():
        distributions = installed_closure({distribution_name(r) for r in requirements})
        names[extra] = {IMPORT_NAMES[d] for d in distributions if d in IMPORT_NAMES}
    return names


def test_the_readme_marks_its_quickstarts_with_their_extras():
    assert len(BLOCKS) >= 4
    known = set(extras()) | {""}
    assert {extra for extra, _ in BLOCKS} <= known
    for extra, _ in BLOCKS:  # the extra a block runs with is the one its section names
        assert extra == "" or f'".[{extra}]"' in README.read_text()


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs_with_only_its_extra(index, tmp_path):
    extra, code = BLOCKS[index]
    table = extras()
    optional = set().union(*(names for name, names in table.items() if name != "test"))
    blocked = optional - table.get(extra, set())
    distributions = {name for name, module in IMPORT_NAMES.items() if module in blocked}
    done = subprocess.run([sys.executable, "-c", RUNNER, ",".join(sorted(blocked)), ",".join(sorted(distributions))],
                          input=code, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"block {index} (extra {extra!r}, blocked {sorted(blocked)}):\n{done.stderr[-4000:]}"


BUILD_BACKBONE = "from smooth_infonce.integrations.recipes.backbones import build_backbone"


@pytest.mark.parametrize("blocked, code, extra", [
    ("lightly", "from smooth_infonce.integrations.lightly import SmoothNTXentLoss", "lightly"),
    ("timm", f"{BUILD_BACKBONE}\nbuild_backbone('efficientnet_b0')", "timm"),
    ("torchvision", f"{BUILD_BACKBONE}\nbuild_backbone('resnet18')", "lightly"),
])
def test_a_missing_package_names_the_extra_to_install(blocked, code, extra, tmp_path):
    """The runner can fail, and a feature whose package is missing names the extra that brings it."""
    done = subprocess.run([sys.executable, "-c", RUNNER, blocked, blocked], input=code, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and f"pip install 'smooth-infonce[{extra}]'" in done.stderr, done.stderr[-2000:]
