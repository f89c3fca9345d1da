"""The mutation harness (tests/mutations.py) in CI: its list stays applicable, its bounded subset is
caught, and a mutation the tests cannot see fails the run.

The whole list runs on demand: ``python tests/mutations.py`` (docs/contributing.md)."""

import json
import sys
from pathlib import Path

import pytest

from smooth_infonce.integrations import DEPENDS_ON

sys.path.insert(0, str(Path(__file__).parent))
import mutations  # noqa: E402


def test_every_mutation_applies_exactly_once_and_names_real_tests():
    names = [m.name for m in mutations.MUTATIONS]
    assert len(names) == len(set(names)), "mutation names must be unique"
    for mutation in mutations.MUTATIONS:
        text = (mutations.ROOT / mutation.path).read_text()
        assert text.count(mutation.old) == 1, f"{mutation.name}: its text is not in {mutation.path} exactly once"
        assert mutation.old != mutation.new, mutation.name
        files = {t.split("::")[0] for t in mutation.tests if t.startswith("tests/")}
        assert files, f"{mutation.name} names no test file"
        for name in files:
            assert (mutations.ROOT / name).is_file(), f"{mutation.name}: {name} does not exist"


def test_every_core_module_and_integration_has_a_mutation():
    """Issue 23: at least one planted bug per core module and per integrations subpackage."""
    covered = {m.path for m in mutations.MUTATIONS}
    core = {
        "smooth_infonce/functional.py", "smooth_infonce/layout.py", "smooth_infonce/validation.py",
        "smooth_infonce/schedule.py", "smooth_infonce/views.py", "smooth_infonce/distributed.py",
        "smooth_infonce/ops/__init__.py", "smooth_infonce/ops/reference.py", "smooth_infonce/ops/triton.py",
        "smooth_infonce/ops/kernels.py", "smooth_infonce/self_check.py", "smooth_infonce/doctor.py",
        "smooth_infonce/cached_step.py",
    }
    assert core <= covered, f"no mutation in {sorted(core - covered)}"
    bare = [name for name in DEPENDS_ON if not any(path.startswith(f"integrations/{name}/") for path in covered)]
    assert bare == [], f"no mutation in integrations/{bare}"


def test_a_mutation_the_tests_cannot_see_fails_the_run(monkeypatch, tmp_path, capsys):
    """The harness itself can fail: a planted change that no named test reaches is reported as
    surviving and the run exits 1 (and a mutation whose text is gone is stale, also exit 1)."""
    invisible = mutations.Mutation(
        "invisible", "smooth_infonce/schedule.py", "import math", "import math  # planted, changes nothing",
        ("tests/test_api.py::test_schedules",), "a comment")
    gone = mutations.Mutation("gone", "smooth_infonce/schedule.py", "text that is not there", "x",
                              ("tests/test_api.py::test_schedules",), "nothing")
    monkeypatch.setattr(mutations, "MUTATIONS", [invisible, gone])
    out = tmp_path / "verdicts.json"
    assert mutations.main(["--json", str(out)]) == 1
    verdicts = {r["name"]: r["verdict"] for r in json.loads(out.read_text())["mutations"]}
    assert verdicts == {"invisible": "survived", "gone": "stale"}
    assert "survived: 1" in capsys.readouterr().out


@pytest.mark.slow
def test_the_ci_subset_is_caught(tmp_path):
    """Each mutation marked ci=True, planted in a copy of the tree, fails the tests named for it."""
    out = tmp_path / "verdicts.json"
    code = mutations.main(["--ci", "--jobs", "2", "--json", str(out)])
    results = json.loads(out.read_text())["mutations"]
    escaped = [f"{r['name']}: {r['verdict']} ({r['detail']})" for r in results if r["verdict"] != "caught"]
    assert code == 0 and not escaped, "\n".join(escaped)
