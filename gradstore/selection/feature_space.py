"""The vector space a geometric strategy (``gio``, ``diversity``) works in, over a store's pool.

A :class:`FeatureSpace` gathers float32 vectors for any rows of the store, block by block (never
the whole pool at once unless asked), and holds the targets' vectors in the same space:

* ``gradients``: the checkpoint-weighted gradient space, ``concat_c sqrt(w_c) · f_c(x)`` over the
  chosen checkpoints with positive weight (``w`` normalised to sum 1), so that the inner product of
  two vectors is LESS's ``Σ_c w_c · cos(f_c(x), f_c(y))`` and a vector of unit features has unit
  norm; dimension ``checkpoints × k``;
* ``representations``: the RDS+ representation vectors (normalised last hidden states).

:func:`blocks` cuts a row list into gather-sized blocks (about 64 MiB of float32 each).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from .errors import SelectionError
from .strategies._geometric import SpaceFeatures

FEATURE_KINDS: tuple[str, ...] = SpaceFeatures.__args__
_BLOCK_BYTES = 64 << 20


@dataclass
class FeatureSpace:
    """``gather(rows)`` -> float32 ``(len(rows), dim)``; ``targets``: float32 ``(T, dim)`` or None."""

    kind: str
    dim: int
    gather: Callable[[np.ndarray], np.ndarray]
    targets: np.ndarray | None = None
    checkpoints: list[str] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)

    def block_rows(self) -> int:
        return max(256, _BLOCK_BYTES // (4 * self.dim))

    def describe(self) -> dict:
        info = {"features": self.kind, "dim": self.dim}
        if self.checkpoints:
            info.update(checkpoints=self.checkpoints, weights=self.weights)
        return info


def feature_space(engine, targets, kind: str, checkpoints: Sequence[str] | None = None,
                  weights: Mapping[str, float] | None = None) -> FeatureSpace:
    """The ``kind`` space (see the module docstring) of ``engine``'s store, with ``targets``'
    vectors in it when targets are given (checked against the store as the ``less`` scan checks
    them)."""
    if kind == "gradients":
        return _gradient_space(engine, targets, checkpoints, weights)
    if kind == "representations":
        if checkpoints is not None or weights is not None:
            raise SelectionError("checkpoints and weights apply to gradient features, not to representations")
        return _representation_space(engine, targets)
    raise SelectionError(f"unknown features {kind!r}: expected one of {', '.join(FEATURE_KINDS)}")


def _gradient_space(engine, targets, checkpoints, weights) -> FeatureSpace:
    names, w = engine.resolve_checkpoints(checkpoints, weights)
    if targets is not None:
        engine.check_targets(targets, names)
    used = [(name, np.float32(np.sqrt(weight))) for name, weight in zip(names, w) if weight > 0]
    dim = engine.store.dim * len(used)

    def gather(rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), dim), dtype=np.float32)
        for i, (name, scale) in enumerate(used):
            part = out[:, i * engine.store.dim:(i + 1) * engine.store.dim]
            part[...] = engine.features_at(name, rows)
            part *= scale
        return out

    target_vectors = None
    if targets is not None:
        target_vectors = np.concatenate([targets.vectors[name] * scale for name, scale in used], axis=1)
    return FeatureSpace("gradients", dim, gather, target_vectors, list(names), [float(x) for x in w])


def _representation_space(engine, targets) -> FeatureSpace:
    store = engine.store
    if not store.has_representations:
        raise SelectionError(f"{store.path}: this store has no representation vectors; index it with "
                             f"representations, or use gradient features")
    dim = store.representation_dim
    target_vectors = None
    if targets is not None:
        if targets.representations is None:
            raise SelectionError("the targets have no representation vectors; give target records or a target "
                                 "store with representations, or use gradient features")
        target_vectors = np.ascontiguousarray(targets.representations, dtype=np.float32)
        if target_vectors.shape[1] != dim:
            raise SelectionError(f"target representations have dimension {target_vectors.shape[1]}, the "
                                 f"datastore's have {dim}")

    def gather(rows: np.ndarray) -> np.ndarray:
        return np.asarray(store.representations_at(np.asarray(rows, dtype=np.int64)), dtype=np.float32)

    return FeatureSpace("representations", dim, gather, target_vectors)


def blocks(rows: np.ndarray, size: int) -> Iterator[tuple[int, np.ndarray]]:
    """``(start, rows[start:start + size])`` for consecutive blocks of ``rows``."""
    for start in range(0, len(rows), size):
        yield start, rows[start:start + size]


def gather_all(space: FeatureSpace, rows: np.ndarray) -> np.ndarray:
    """float32 ``(len(rows), dim)``: the vectors of ``rows``, gathered block by block."""
    out = np.empty((len(rows), space.dim), dtype=np.float32)
    for start, block in blocks(rows, space.block_rows()):
        out[start:start + len(block)] = space.gather(block)
    return out
