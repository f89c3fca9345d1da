"""docs/ builds as a MkDocs site in strict mode: a broken link, a missing anchor or a page left out
of the navigation fails (issue 25; mkdocs.yml's `validation` makes each a warning, strict mode an error)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_docs_build_strictly(tmp_path):
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                           "-d", str(tmp_path / "site")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (tmp_path / "site" / "loss" / "index.html").is_file()

