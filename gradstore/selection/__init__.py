"""Selection over a datastore: targets, scoring, strategies, exports.

Used in-process by the CLI (``gradstore select``, ``gradstore eval``) and by the REST service,
which is a thin HTTP layer over it; it needs numpy and pyarrow (torch for target records and,
when installed, the scan kernel), never FastAPI.

Modules, one concept each:

- :mod:`~gradstore.selection.errors`: :class:`SelectionError`.
- :mod:`~gradstore.selection.targets`: :class:`TargetSet` and the origin checks of target vectors.
- :mod:`~gradstore.selection.featurizer`: :class:`TargetFeaturizer`, target records -> a
  :class:`TargetSet` with a store's own model, checkpoints and projection.
- :mod:`~gradstore.selection.scan`: the fp16 scan kernel.
- :mod:`~gradstore.selection.engine`: :class:`SelectionEngine`, LESS scores of every example,
  ranking, budget, caps, deduplication, exports.

Public names are re-exported here and imported on first use, so that importing
``gradstore.selection`` (or a light submodule) costs nothing until a name is used.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "SelectionError": "errors",
    "TargetSet": "targets",
    "store_origin": "targets",
    "subtask_of": "targets",
    "TargetFeaturizer": "featurizer",
    "SelectionEngine": "engine",
    "SelectionOptions": "engine",
    "Selection": "engine",
    "Scores": "engine",
    "rank": "engine",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'gradstore.selection' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
