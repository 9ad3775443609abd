"""Warmup checkpoints: where their adapter and optimizer state live, and how much each one weighs.

A checkpoint is a directory holding a PEFT adapter (``adapter_config.json`` plus
``adapter_model.safetensors`` or ``.bin``) and, for the ``adam``/``less`` gradient types, the
optimizer state (``optimizer.pt`` as HF Trainer saves it, or a name-keyed ``optimizer.bin``).

Its weight in the influence sum defaults to the learning rate recorded with it, as LESS weights
each epoch by its average learning rate, so nobody copies numbers by hand:

1. ``gradstore_checkpoint.json`` written by ``gradstore warmup``: ``{"average_learning_rate": ...}``;
2. ``trainer_state.json`` written by HF Trainer: the mean ``learning_rate`` logged since the
   previous checkpoint of the same run;
3. otherwise every checkpoint weighs the same.

Weights are normalised to sum to one. An explicit weight (``DIR:WEIGHT`` on the command line)
overrides the recorded one; mixing explicit and missing weights is an error.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import CheckpointError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
GRADSTORE_CHECKPOINT_INFO = "gradstore_checkpoint.json"
TRAINER_STATE = "trainer_state.json"


@dataclass(frozen=True)
class CheckpointSpec:
    """One checkpoint as the user named it; ``path=None`` is a fresh, untrained LoRA."""

    name: str
    path: Path | None
    weight: float | None = None

    @classmethod
    def parse(cls, spec: str) -> "CheckpointSpec":
        """``DIR``, ``DIR:WEIGHT``, ``NAME=DIR`` or ``NAME=DIR:WEIGHT``."""
        name = None
        if "=" in spec:
            name, spec = spec.split("=", 1)
        weight = None
        head, sep, tail = spec.rpartition(":")
        if sep and re.fullmatch(r"[0-9.eE+-]+", tail):
            spec, weight = head, float(tail)
            if weight <= 0:
                raise CheckpointError(f"checkpoint weight must be positive, got {tail} in {spec!r}")
        path = Path(spec)
        return cls(name=name or path.name, path=path, weight=weight)

    @property
    def adapter_weights(self) -> Path:
        for filename in ADAPTER_WEIGHTS:
            if (self.path / filename).is_file():
                return self.path / filename
        raise CheckpointError(f"{self.path}: no adapter weights (looked for {', '.join(ADAPTER_WEIGHTS)})")

    def validate(self) -> None:
        if self.path is None:
            return
        if not self.path.is_dir():
            raise CheckpointError(f"checkpoint {self.path} is not a directory")
        if not (self.path / ADAPTER_CONFIG).is_file():
            raise CheckpointError(f"{self.path}: no {ADAPTER_CONFIG}; is this a PEFT adapter checkpoint?")
        self.adapter_weights  # noqa: B018 - raises when missing


def recorded_learning_rate(path: Path | None) -> float | None:
    """The learning rate recorded with a checkpoint (see the module docstring), or None."""
    if path is None:
        return None
    info = path / GRADSTORE_CHECKPOINT_INFO
    if info.is_file():
        return float(json.loads(info.read_text())["average_learning_rate"])
    state = path / TRAINER_STATE
    if state.is_file():
        return _trainer_state_learning_rate(json.loads(state.read_text()))
    return None


def _trainer_state_learning_rate(state: dict) -> float | None:
    """Mean logged learning rate since the previous checkpoint, from HF ``trainer_state.json``."""
    step = state.get("global_step", 0)
    save_steps = state.get("save_steps") or step
    logs = [entry for entry in state.get("log_history", []) if "learning_rate" in entry]
    window = [e["learning_rate"] for e in logs if step - save_steps < e.get("step", 0) <= step]
    rates = window or [e["learning_rate"] for e in logs]
    return sum(rates) / len(rates) if rates else None


def resolve_weights(checkpoints: list[CheckpointSpec]) -> list[float]:
    """Normalised weights: explicit ones, else recorded learning rates, else uniform."""
    explicit = [c.weight for c in checkpoints]
    if all(w is not None for w in explicit):
        raw = explicit
    elif any(w is not None for w in explicit):
        missing = [c.name for c in checkpoints if c.weight is None]
        raise CheckpointError(f"give a weight for every checkpoint or for none; missing for {missing}")
    else:
        recorded = [recorded_learning_rate(c.path) for c in checkpoints]
        raw = recorded if all(r is not None and r > 0 for r in recorded) else [1.0] * len(checkpoints)
    total = sum(raw)
    return [w / total for w in raw]


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
