"""The strategy registry: every module of this package defines one strategy, found at import.

:func:`registry` maps names to strategy classes (see :mod:`.base` for what a strategy declares);
the CLI, the REST API (``GET /v1/strategies``, the ``strategy`` field of a select request), the
SDK and the docs all read it, so adding a strategy means adding one module here (and its tests).
:func:`options_type` is the discriminated union of every strategy's options, by ``name``.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Annotated, Union

from pydantic import Field

from .base import FEATURES, NEEDS_TARGETS, Strategy, StrategyOptions

__all__ = ["FEATURES", "NEEDS_TARGETS", "Strategy", "StrategyOptions", "DEFAULT_STRATEGY", "registry",
           "get_strategy", "options_type", "strategy_names", "parse_strategy_spec", "strategy_label"]

DEFAULT_STRATEGY = "less"
# The order strategies are listed in (help, docs, the UI); any others follow, by name.
_LISTED_FIRST = ("less", "rds", "quality", "random", "gio", "diversity")


def _discover() -> dict[str, type[Strategy]]:
    found: dict[str, type[Strategy]] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name == "base" or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, Strategy) and value is not Strategy \
                    and value.__module__ == module.__name__:
                if value.name in found:
                    raise RuntimeError(f"two strategies are named {value.name!r}: {found[value.name]} and {value}")
                found[value.name] = value
    first = [n for n in _LISTED_FIRST if n in found]
    return {name: found[name] for name in first + sorted(set(found) - set(first))}


_REGISTRY = _discover()


def registry() -> dict[str, type[Strategy]]:
    """Every strategy by name, in listing order."""
    return dict(_REGISTRY)


def strategy_names() -> list[str]:
    return list(_REGISTRY)


def get_strategy(name: str) -> type[Strategy]:
    """The strategy called ``name``; an unknown name is a ``ValueError`` listing the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}: expected one of {', '.join(_REGISTRY)}") from None


def options_type():
    """The type of a strategy's options: a union of every ``Options`` model, told apart by ``name``."""
    models = tuple(cls.Options for cls in _REGISTRY.values())
    return Annotated[Union[models], Field(discriminator="name")]  # noqa: UP007 (a runtime union of types)


def parse_strategy_spec(text: str) -> dict:
    """A strategy written on a command line (``gradstore eval --strategies``) as its options.

    ``NAME`` takes the defaults; ``NAME:VALUE`` sets the strategy's ``shorthand`` option
    (``quality:effective_rank``, ``random:3``); ``NAME:KEY=VALUE,KEY=VALUE`` sets options by name
    (``quality:score=nuclear_norm,order=low``). Values stay strings; the options model converts
    and checks them. An unknown name is a ``ValueError``.
    """
    name, _, rest = text.strip().partition(":")
    cls = get_strategy(name.strip())
    spec: dict = {"name": cls.name}
    if not rest:
        return spec
    if "=" not in rest:
        if cls.shorthand is None:
            raise ValueError(f"{text!r}: strategy {cls.name!r} takes no NAME:VALUE shorthand; write "
                             f"{cls.name}:KEY=VALUE")
        spec[cls.shorthand] = rest.strip()
        return spec
    for item in rest.split(","):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{text!r}: expected KEY=VALUE pairs after {cls.name}:, got {item!r}")
        spec[key.strip()] = value.strip()
    return spec


def strategy_label(options: dict) -> str:
    """A short name for a strategy with its options (the eval table's row label): the name, its
    shorthand option when given and the options that differ from the defaults,
    ``quality:score=effective_rank``, ``quality:score=nuclear_norm,order=low``."""
    cls = get_strategy(options["name"])
    defaults = cls.Options().model_dump()
    changed = [f"{key}={value}" for key, value in options.items()
               if key != "name" and (value != defaults.get(key) or key == cls.shorthand)]
    return cls.name + (":" + ",".join(changed) if changed else "")
