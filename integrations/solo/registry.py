"""Adding the smoothed methods and the lightweight backbones to solo-learn's registries."""

from __future__ import annotations

from typing import Dict, List

from .backbones import FACTORY_MARKER, solo_backbone_factories

SOLO_INSTALL_HINT = """\
solo-learn is not installed (it has no usable PyPI release). Install a clone next to this package:

    git clone https://github.com/vturrisi/solo-learn.git
    pip install "setuptools<82" wheel
    pip install --no-build-isolation ./solo-learn     # its setup.py needs pkg_resources

(lightning 2.1.2, which solo-learn pins, needs pkg_resources at run time: keep setuptools<82, or
upgrade to lightning 2.6.6 + torchmetrics 1.9.0.) Then point the launcher at the clone with
--solo-path ./solo-learn or SOLO_LEARN_PATH=./solo-learn."""


class SoloLearnNotFound(ImportError):
    """solo-learn cannot be imported; the message carries the install recipe."""


def import_solo():
    """Import ``solo.methods`` (and so ``solo``), or raise `SoloLearnNotFound` with the recipe."""
    try:
        import solo.methods  # noqa: F401
        import solo.methods.base  # noqa: F401
    except ImportError as err:
        raise SoloLearnNotFound(f"{SOLO_INSTALL_HINT}\n\n(import error: {err})") from err
    return solo.methods


def register(*, methods: bool = True, backbones: bool = True) -> Dict[str, List[str]]:
    """Register ``smooth_simclr``, ``smooth_mocov2plus``, ``sslight_dino``, ``sslight_swav`` in
    ``solo.methods.METHODS`` and the
    lightweight backbones in ``solo.methods.base.BaseMethod._BACKBONES`` (used by both
    main_pretrain.py and main_linear.py).

    Idempotent: entries already ours are refreshed (a reloaded module gives new objects); an
    entry of the same name that is not ours raises ValueError instead of being replaced.

    Returns:
        {"methods": [...], "backbones": [...]}: the names now registered by this package.

    Raises:
        SoloLearnNotFound: solo-learn is not importable (the message says how to install it).
    """
    solo_methods = import_solo()
    registered: Dict[str, List[str]] = {"methods": [], "backbones": []}
    if methods:
        from .methods import METHOD_MARKER, METHODS
        from .multicrop_methods import MULTICROP_METHODS

        for name, cls in {**METHODS, **MULTICROP_METHODS}.items():
            _add(solo_methods.METHODS, name, cls, METHOD_MARKER, "method")
            registered["methods"].append(name)
    if backbones:
        table = solo_methods.base.BaseMethod._BACKBONES
        for name, factory in solo_backbone_factories().items():
            _add(table, name, factory, FACTORY_MARKER, "backbone")
            registered["backbones"].append(name)
    return registered


def _add(table: dict, name: str, entry, marker: str, kind: str) -> None:
    existing = table.get(name)
    if existing is not None and existing is not entry and not getattr(existing, marker, False):
        raise ValueError(f"solo-learn already has a {kind} named {name!r} that is not smooth-infonce's ({existing!r})")
    table[name] = entry


def is_registered() -> bool:
    """Whether every method and backbone of this package is in solo-learn's registries."""
    try:
        solo_methods = import_solo()
    except SoloLearnNotFound:
        return False
    from . import METHOD_NAMES
    from .methods import METHOD_MARKER

    have_methods = all(getattr(solo_methods.METHODS.get(n), METHOD_MARKER, False) for n in METHOD_NAMES)
    table = solo_methods.base.BaseMethod._BACKBONES
    have_backbones = all(getattr(table.get(n), FACTORY_MARKER, None) == n for n in solo_backbone_factories())
    return have_methods and have_backbones
