"""The package's shape: integrations grouped by what they serve, imports running only downstream
(`smooth_infonce.integrations.DEPENDS_ON`), the core free of every integration."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from smooth_infonce.integrations import DEPENDS_ON

ROOT = Path(__file__).resolve().parents[1]
INTEGRATIONS = ROOT / "integrations"
PACKAGE = "smooth_infonce.integrations"


def imported_modules(path: Path, package: str) -> list[str]:
    """Every module ``path`` imports (absolute names; relative imports resolved against ``package``)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module
            names.append(module)
            names += [f"{module}.{alias.name}" for alias in node.names]  # `from pkg import submodule`
    return names


def subpackage_of(module: str) -> str | None:
    """The integrations subpackage ``module`` belongs to ("" for the package itself), or None."""
    if module == PACKAGE:
        return ""
    if module.startswith(PACKAGE + "."):
        return module[len(PACKAGE) + 1:].split(".")[0]
    return None


def test_every_integration_lives_in_a_declared_subpackage():
    loose = sorted(p.name for p in INTEGRATIONS.glob("*.py") if p.name != "__init__.py")
    assert loose == [], f"modules outside a subpackage: {loose}"
    found = sorted(p.parent.name for p in INTEGRATIONS.glob("*/__init__.py"))
    assert found == sorted(DEPENDS_ON), "a subpackage is missing from DEPENDS_ON (or DEPENDS_ON names a missing one)"
    for name in found:
        doc = ast.get_docstring(ast.parse((INTEGRATIONS / name / "__init__.py").read_text()))
        assert doc and "Imports:" in doc, f"integrations/{name}/__init__.py: say what lives there and what it imports"


@pytest.mark.parametrize("name", sorted(DEPENDS_ON))
def test_imports_run_only_downstream(name):
    allowed = {name, *DEPENDS_ON[name]}
    for path in sorted((INTEGRATIONS / name).rglob("*.py")):
        package = ".".join([PACKAGE, *path.relative_to(INTEGRATIONS).parent.parts])
        for module in imported_modules(path, package):
            owner = subpackage_of(module)
            if owner is None or owner in allowed:
                continue
            if owner not in DEPENDS_ON:  # the package itself, or a name defined in its __init__
                pytest.fail(f"{path.relative_to(ROOT)} imports the package above it ({module})")
            pytest.fail(f"{path.relative_to(ROOT)} imports {module}: {name} may import {sorted(allowed - {name})}")


def test_the_core_imports_no_integration():
    for path in sorted((ROOT / "smooth_infonce").rglob("*.py")):
        package = ".".join(path.relative_to(ROOT).parent.parts)
        bad = [m for m in imported_modules(path, package) if subpackage_of(m) is not None]
        assert bad == [], f"{path.relative_to(ROOT)} imports {bad}"


def test_the_check_sees_an_upward_import(tmp_path):
    """The walker resolves relative imports: a planted upward import is found."""
    planted = tmp_path / "x.py"
    planted.write_text("from ..lightning import module\nfrom . import specs\n")
    modules = imported_modules(planted, f"{PACKAGE}.recipes")
    assert f"{PACKAGE}.lightning.module" in modules and subpackage_of(f"{PACKAGE}.lightning") == "lightning"
    assert f"{PACKAGE}.recipes.specs" in modules
