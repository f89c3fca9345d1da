"""Every docstring example in the package runs, by the module's installed name (one test each)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import smooth_infonce
import smooth_infonce.integrations

MODULES = sorted({"smooth_infonce", "smooth_infonce.integrations"} | {
    info.name for package in (smooth_infonce, smooth_infonce.integrations)
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + ".")
    if not info.name.endswith(".__main__")})  # a __main__ runs its program when imported


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name and err.name.split(".")[0] == "solo":  # the solo-learn glue needs a clone (see tests marked solo)
            pytest.skip(f"{name} needs solo-learn")
        raise
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    examples, report = 0, []
    for test in doctest.DocTestFinder(exclude_empty=True).find(module, name):
        if test.filename and not test.filename.startswith(str(module.__file__).rsplit("/", 1)[0]):
            continue  # re-exported objects are tested where they are defined
        examples += len(test.examples)
        runner.run(test, out=report.append)
    assert runner.failures == 0, f"{runner.failures} of {examples} docstring examples failed:\n" + "".join(report)
