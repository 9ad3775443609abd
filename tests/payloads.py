"""Hostile input files for the security tests: each runs code that creates a marker file if it is
ever loaded in a way that executes code from it, so a test asserts the marker is absent."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch


class _WritesMarker:
    """Unpickled with ``weights_only=False``, runs ``exec`` of code that writes the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('payload ran')",)


def optimizer_with_payload(path: Path, marker: Path) -> Path:
    """An ``optimizer.pt``-shaped state dict whose param group holds the payload."""
    state = {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(2), "exp_avg_sq": torch.ones(2)}}
    groups = [{"betas": (0.9, 0.999), "eps": 1e-8, "params": [0], "hook": _WritesMarker(marker)}]
    torch.save({"state": state, "param_groups": groups}, path)
    return path


def checkpoint_with_optimizer_payload(checkpoint: Path, dest: Path, marker: Path) -> Path:
    """A copy of a real checkpoint folder whose ``optimizer.pt`` carries the payload."""
    shutil.copytree(checkpoint, dest)
    for name in ("optimizer.pt", "optimizer.bin"):
        (dest / name).unlink(missing_ok=True)
    optimizer_with_payload(dest / "optimizer.pt", marker)
    return dest


def checkpoint_with_adapter_payload(checkpoint: Path, dest: Path, marker: Path) -> Path:
    """A copy of a real checkpoint folder whose adapter weights are an ``adapter_model.bin`` with
    the payload beside real tensors."""
    from safetensors.torch import load_file

    shutil.copytree(checkpoint, dest)
    weights = load_file(dest / "adapter_model.safetensors")
    (dest / "adapter_model.safetensors").unlink()
    torch.save({**weights, "hook": _WritesMarker(marker)}, dest / "adapter_model.bin")
    return dest


def model_with_remote_code(model: Path, dest: Path, marker: Path) -> Path:
    """A copy of a model folder whose ``config.json`` asks for its own code (``auto_map``, an
    architecture transformers does not know); the code writes the marker."""
    shutil.copytree(model, dest)
    config = json.loads((dest / "config.json").read_text())
    config["model_type"] = "payload-net"
    config["auto_map"] = {"AutoConfig": "payload.PayloadConfig", "AutoModelForCausalLM": "payload.PayloadModel"}
    (dest / "config.json").write_text(json.dumps(config))
    (dest / "payload.py").write_text(
        f"open({str(marker)!r}, 'w').write('payload ran')\n"
        "from transformers import LlamaConfig as PayloadConfig, LlamaForCausalLM as PayloadModel\n")
    return dest
