"""Target sets: what a selection is scored against.

A :class:`TargetSet` holds, for every target example, its normalised projected (``sgd``)
gradient at each checkpoint of a store, optionally its representation vector (RDS+, see
:mod:`gradstore.selection.strategies.rds`), and its subtask. Build one from raw vectors
(:meth:`TargetSet.from_vectors`), from a target datastore (:meth:`TargetSet.from_datastore`) or
from records (:class:`gradstore.selection.featurizer.TargetFeaturizer`); each validates and
normalises, and records the *origin* of its vectors (:func:`store_origin`) so that vectors from
another model, LoRA or projection are refused (:func:`check_origin`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gradstore.datastore import Datastore, Manifest

from .errors import SelectionError

DEFAULT_SUBTASK = "all"


def store_origin(manifest: Manifest) -> dict:
    """What the vectors of a store depend on besides the examples: projection, model, LoRA and
    checkpoint adapters. Target vectors are comparable with a store's only when these agree."""
    lora = manifest.lora
    return {
        "projection": dict(manifest.projection),
        "model_sha256": manifest.model.sha256,
        "lora": {"r": lora.r, "alpha": float(lora.alpha), "target_modules": sorted(lora.target_modules),
                 "init_seed": lora.init_seed},
        "adapters": {c.name: c.adapter_sha256 for c in manifest.checkpoints},
    }


@dataclass(frozen=True)
class TargetSet:
    """Target vectors, L2-normalised per checkpoint, with the subtask of each target.

    ``vectors`` maps a checkpoint name to a float32 ``(n_targets, k)`` array; ``subtasks`` has one
    name per target; ``representations``, when known, is a float32 ``(n_targets, hidden)`` array of
    L2-normalised representation vectors (what the ``rds`` strategy compares). ``origin`` (see
    :func:`store_origin`) records what the vectors were computed with, when known, so the engine
    can refuse vectors from another model or projection. Build one with :meth:`from_vectors` or
    :meth:`from_datastore` (or ``featurizer.TargetFeaturizer.featurize``), which validate and
    normalise.
    """

    vectors: dict[str, np.ndarray]
    subtasks: list[str]
    origin: dict | None = field(default=None, compare=False)
    representations: np.ndarray | None = field(default=None, compare=False)

    def __post_init__(self):
        if not self.vectors:
            raise SelectionError("the targets have no vectors (no checkpoint)")
        counts = {name: v.shape[0] for name, v in self.vectors.items()}
        if len(set(counts.values())) != 1:
            raise SelectionError(f"target vectors differ in the number of targets between checkpoints: {counts}")
        if len(self.subtasks) != self.num_targets:
            raise SelectionError(f"{len(self.subtasks)} subtask labels for {self.num_targets} target examples")
        if self.representations is not None and (self.representations.ndim != 2
                                                 or self.representations.shape[0] != self.num_targets):
            raise SelectionError(f"target representations have shape {self.representations.shape}: expected "
                                 f"({self.num_targets}, hidden)")

    @property
    def num_targets(self) -> int:
        return next(iter(self.vectors.values())).shape[0]

    @property
    def checkpoints(self) -> list[str]:
        return list(self.vectors)

    def subtask_names(self) -> list[str]:
        """Distinct subtasks in order of first appearance."""
        return list(dict.fromkeys(self.subtasks))

    @classmethod
    def from_vectors(cls, vectors: Mapping[str, Any], subtasks: Sequence[str] | None = None,
                     dim: int | None = None, origin: dict | None = None,
                     representations: Any = None) -> "TargetSet":
        """Validate ``{checkpoint: (n, k) vectors}`` (lists or arrays) and normalise each row.

        All checkpoints need the same ``n >= 1``; ``dim``, when given, is the required ``k``. NaN or
        infinite values are refused; an all-zero row (a zero gradient) stays zero and scores 0.
        ``subtasks`` defaults to one subtask, ``"all"``. ``representations`` (optional, one row per
        target) are checked and normalised the same way.
        """
        if not isinstance(vectors, Mapping) or not vectors:
            raise SelectionError("target vectors must be a non-empty mapping of checkpoint name -> vectors")
        arrays, counts = {}, {}
        for name, value in vectors.items():
            array = _checked_matrix(value, f"target vectors for checkpoint {name!r}", dim)
            arrays[name], counts[name] = array, array.shape[0]
        if len(set(counts.values())) != 1:
            raise SelectionError(f"target vectors differ in the number of targets between checkpoints: {counts}")
        n = next(iter(counts.values()))
        labels = [DEFAULT_SUBTASK] * n if subtasks is None else list(subtasks)
        if len(labels) != n:
            raise SelectionError(f"{len(labels)} subtask labels for {n} target examples")
        for index, label in enumerate(labels):
            if not isinstance(label, str) or not label:
                raise SelectionError(f"subtask of target {index} is {label!r}: expected a non-empty string")
        if representations is not None:
            representations = _checked_matrix(representations, "target representations")
        return cls(arrays, labels, origin, representations)

    @classmethod
    def from_datastore(cls, store: Datastore, subtask_field: str | None = None) -> "TargetSet":
        """Every example of ``store`` (normally built with ``sgd`` gradients) as a target, with
        its representation vector when the store has them.

        With ``subtask_field``, each target's subtask is that field of its record; a record
        without it is an error naming its id and row.
        """
        subtasks = None
        if subtask_field is not None:
            table = store.examples(columns=["row", "id", "record"])
            subtasks = []
            for row, id_, text in zip(*(table.column(c).to_pylist() for c in ("row", "id", "record"))):
                subtasks.append(subtask_of(json.loads(text), subtask_field,
                                           f"{store.path}: target example {id_!r} (row {row})"))
        vectors = {name: store.features(name) for name in store.checkpoint_names}
        representations = store.representations() if store.has_representations else None
        return cls.from_vectors(vectors, subtasks, dim=store.dim, origin=store_origin(store.manifest),
                                representations=representations)


def subtask_of(record: Any, subtask_field: str, where: str) -> str:
    """The subtask named by ``record[subtask_field]``; ``where`` names the record in errors."""
    value = record.get(subtask_field) if isinstance(record, dict) else None
    if value is None:
        raise SelectionError(f"{where} has no field {subtask_field!r} (the subtask field)")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)) or value == "":
        raise SelectionError(f"{where}: subtask field {subtask_field!r} is {value!r}: expected a non-empty "
                             f"string or a number")
    return str(value)


def _checked_matrix(value: Any, where: str, dim: int | None = None) -> np.ndarray:
    """``value`` as a float32 ``(n >= 1, d >= 1)`` array of finite numbers with unit rows (an
    all-zero row stays zero); ``dim``, when given, is the required ``d``."""
    try:
        array = np.array(value, dtype=np.float32)
    except (TypeError, ValueError) as err:
        raise SelectionError(f"{where} are not a rectangular array of numbers ({err})") from None
    if array.ndim != 2 or array.shape[0] < 1 or array.shape[1] < 1:
        raise SelectionError(f"{where} have shape {array.shape}: expected (targets, dim) with at least one target")
    if dim is not None and array.shape[1] != dim:
        raise SelectionError(f"{where} have dimension {array.shape[1]}, the datastore has {dim}")
    bad = np.argwhere(~np.isfinite(array))
    if len(bad):
        row, column = map(int, bad[0])
        raise SelectionError(f"{where}: row {row} has a non-finite value ({array[row, column]}) at position {column}")
    return _normalize_rows(array)


def _normalize_rows(array: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(array.astype(np.float64), axis=1, keepdims=True)
    return np.divide(array, norms, out=np.zeros_like(array), where=norms > 0).astype(np.float32)


def check_origin(target: dict, store: dict, checkpoints: Sequence[str]) -> None:
    advice = "compute the targets with this datastore's model, checkpoints and projection"
    if target.get("projection") != store["projection"]:
        raise SelectionError(f"the target vectors were projected with {target.get('projection')}, the datastore "
                             f"with {store['projection']}; {advice}")
    if target.get("model_sha256") != store["model_sha256"]:
        raise SelectionError(f"the target vectors come from another model (sha256 {target.get('model_sha256')}, "
                             f"the datastore's is {store['model_sha256']}); {advice}")
    lora_t, lora_s = target.get("lora") or {}, store["lora"]
    for key in ("r", "alpha", "target_modules"):
        if lora_t.get(key) != lora_s[key]:
            raise SelectionError(f"the target vectors come from a LoRA with {key} = {lora_t.get(key)!r}, the "
                                 f"datastore's has {lora_s[key]!r}; {advice}")
    adapters_t = target.get("adapters") or {}
    for name in checkpoints:
        a, b = adapters_t.get(name), store["adapters"].get(name)
        if a != b:
            raise SelectionError(f"checkpoint {name!r} of the targets is not the datastore's (adapter sha256 "
                                 f"{a} vs {b}); {advice}")
        if a is None and None not in (lora_t.get("init_seed"), lora_s["init_seed"]) \
                and lora_t.get("init_seed") != lora_s["init_seed"]:
            raise SelectionError(f"checkpoint {name!r}: the targets' fresh LoRA was initialised with seed "
                                 f"{lora_t.get('init_seed')}, the datastore's with {lora_s['init_seed']}; {advice}")
