"""pyproject lists packages explicitly (integrations/ is mapped into smooth_infonce): every package
directory must be listed, or a non-editable install silently ships without it."""

import tomllib  # Python >= 3.11, the project's floor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_directory_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = set()
    for package, folder in config["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            parts = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((package, *parts)))
    assert found - listed == set(), "add these to [tool.setuptools] packages"


def test_shipped_yaml_configs_are_package_data():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    yamls = list((ROOT / "integrations" / "solo" / "configs").rglob("*.yaml"))
    assert yamls and "*/*.yaml" in config["package-data"]["smooth_infonce.integrations.solo.configs"]
    assert all(len(p.relative_to(ROOT / "integrations" / "solo" / "configs").parts) == 2 for p in yamls)
