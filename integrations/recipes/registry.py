"""One name, one factory: the presets' registry (timm-style). A preset module decorates each factory
with `register_preset`; `get_preset(name, **overrides)` builds a copy with overrides applied."""

from __future__ import annotations

from typing import Any, Callable, Dict, List

from .specs import Recipe

_PRESETS: Dict[str, Callable[[], Recipe]] = {}


def register_preset(factory: Callable[[], Recipe]) -> Callable[[], Recipe]:
    """Decorator: register a preset under its function's name (one name, one factory)."""
    name = factory.__name__
    if name in _PRESETS:
        raise ValueError(f"preset {name!r} is already registered")
    _PRESETS[name] = factory
    return factory


def list_presets() -> List[str]:
    return sorted(_PRESETS)


def get_preset(preset: str, /, **overrides: Any) -> Recipe:
    """The preset named ``preset`` with ``overrides`` applied (see `Recipe.override`; a ``name``
    override renames the copy)."""
    if preset not in _PRESETS:
        raise ValueError(f"unknown preset {preset!r}; available: {list_presets()}")
    return _PRESETS[preset]().override(**overrides)
