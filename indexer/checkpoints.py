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

Pickled files (``optimizer.pt``, ``optimizer.bin``, ``adapter_model.bin``) are read by
:func:`load_torch_file` with ``torch.load(weights_only=True)``, which rebuilds tensors, numbers,
strings and containers and refuses every other Python object, so a file cannot run code when it is
read. A file that needs more is refused with its reason and how to convert it; only the
``gradstore index --trust-pickled-checkpoints`` command line unpickles it in full.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import warnings
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
        """The folder holds an adapter config and weights; ``.bin`` weights load without code
        (PEFT reads them with ``torch.load`` itself; checked here so that a file it would refuse,
        whatever its version, is refused with the reason and the fix)."""
        if self.path is None:
            return
        if not self.path.is_dir():
            raise CheckpointError(f"checkpoint {self.path} is not a directory")
        if not (self.path / ADAPTER_CONFIG).is_file():
            raise CheckpointError(f"{self.path}: no {ADAPTER_CONFIG}; is this a PEFT adapter checkpoint?")
        weights = self.adapter_weights
        if weights.suffix == ".bin":
            load_torch_file(weights, fix="save the adapter as adapter_model.safetensors "
                                         "(PeftModel.save_pretrained(..., safe_serialization=True))")


TRUST_FLAG = "--trust-pickled-checkpoints"


def load_torch_file(path: Path, *, fix: str, trust_pickle: bool = False,
                    error: type[CheckpointError] = CheckpointError):
    """``torch.load(path)`` on CPU with ``weights_only=True``; raises ``error`` naming the file,
    why it does not load and ``fix`` (how its owner converts it).

    ``trust_pickle`` (the CLI's :data:`TRUST_FLAG` only; the service never sets it) loads a file
    that the safe loader refuses with ``weights_only=False``, which runs any code the file holds.
    """
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = _unpickling_reason(exc)
        if not trust_pickle:
            raise error(f"{path}: refused: torch.load(weights_only=True) cannot read it ({reason}), and "
                        f"weights_only=False would run code stored in the file; {fix}") from None
    except Exception as exc:  # noqa: BLE001 - truncated, not a torch file, ...: one line naming the file
        raise error(f"{path}: cannot be read as a torch file: {type(exc).__name__}: {exc}") from None
    warnings.warn(f"{path}: loading with weights_only=False, which runs any code the file holds",
                  stacklevel=2)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001
        raise error(f"{path}: cannot be read as a torch file: {type(exc).__name__}: {exc}") from None


def _unpickling_reason(exc: Exception) -> str:
    """The one line of torch's weights-only refusal that says what the file holds."""
    text = str(exc)
    found = re.search(r"WeightsUnpickler error:\s*(.*?)(?:\. Please use|\n\n|$)", text, re.S)
    reason = " ".join((found.group(1) if found else text).split())
    return reason[:300] or "an object weights_only=True does not rebuild"


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
