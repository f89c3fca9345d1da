"""The README's quickstarts run as written: every Python block after a `<!-- readme-test -->` marker."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).parent.parent / "README.md"
BLOCKS = re.findall(r"<!-- readme-test -->\n```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_marks_its_quickstarts():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anything a block writes stays out of the checkout
    exec(compile(BLOCKS[index], f"README.md block {index}", "exec"), {"__name__": f"readme_block_{index}"})
