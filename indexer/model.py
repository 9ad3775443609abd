"""Loading a causal LM from a local path and putting LoRA adapters on it.

Nothing loaded here runs code from the files: models and tokenizers are loaded with
``trust_remote_code=False`` (a folder whose ``config.json`` asks for its own code through
``auto_map`` is refused), weights from safetensors or with ``torch.load(weights_only=True)``
(transformers' and PEFT's default, and ``CheckpointSpec.validate`` checks ``.bin`` adapters first).

The base model is loaded once per job; each checkpoint's adapter weights are then swapped into the
same PEFT model, so a job with four checkpoints does not reload the base model four times. A job
without checkpoints attaches a fresh LoRA (rank, alpha, target modules, seeded initialisation).
"""

from __future__ import annotations

import json
import pickle
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .checkpoints import ADAPTER_CONFIG, CheckpointSpec
from .errors import CheckpointError, ModelError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class LoraSpec:
    """A fresh LoRA: used when the job names no checkpoints."""

    r: int = 8
    alpha: float = 16.0
    target_modules: tuple[str, ...] | None = None  # None: PEFT's default for the architecture
    init_seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"device {device!r} asked for, but CUDA is not available on this machine")
    return torch.device(device)


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, pickle.UnpicklingError) as exc:
        raise ModelError(f"cannot load a tokenizer from {path}: {exc}") from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked; any id will do
    return tokenizer


def load_base_model(path: str | Path, dtype: str, device: torch.device) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}: expected one of {sorted(DTYPES)}")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=DTYPES[dtype], local_files_only=True,
                                                     trust_remote_code=False)
    except (OSError, ValueError, pickle.UnpicklingError) as exc:
        raise ModelError(f"cannot load a causal LM from {path}: {exc}") from exc
    model.requires_grad_(False)
    return model.to(device).eval()


@contextmanager
def _quiet_peft():
    """PEFT calls a transformers property deprecated in v5; the warning is not the user's concern."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        warnings.filterwarnings("ignore", message="fan_in_fan_out is set to False", category=UserWarning)
        yield


def attach_lora(model: torch.nn.Module, checkpoints: list[CheckpointSpec], fresh: LoraSpec):
    """Wrap ``model`` in PEFT: with the first checkpoint's adapter config, or a fresh LoRA."""
    from peft import LoraConfig, PeftModel, get_peft_model

    first = next((c for c in checkpoints if c.path is not None), None)
    if first is not None:
        first.validate()
        try:
            with _quiet_peft():
                peft_model = PeftModel.from_pretrained(model, str(first.path), is_trainable=True)
        except (OSError, ValueError, RuntimeError, pickle.UnpicklingError) as exc:
            raise CheckpointError(f"{first.path}: cannot load the LoRA adapter: {exc}") from exc
    else:
        config = LoraConfig(r=fresh.r, lora_alpha=fresh.alpha, lora_dropout=0.0,
                            target_modules=list(fresh.target_modules) if fresh.target_modules else None,
                            task_type="CAUSAL_LM")
        torch.manual_seed(fresh.init_seed)
        try:
            with _quiet_peft():
                peft_model = get_peft_model(model, config)
        except ValueError as exc:
            raise ModelError(f"cannot attach LoRA: {exc}") from exc
    return peft_model.eval()


def lora_description(peft_model) -> dict:
    config = peft_model.peft_config["default"]
    targets = config.target_modules
    return {
        "r": int(config.r),
        "alpha": float(config.lora_alpha),
        "target_modules": sorted(targets) if isinstance(targets, (set, list, tuple)) else [str(targets)],
    }


def load_checkpoint_weights(peft_model, checkpoint: CheckpointSpec) -> None:
    """Swap a checkpoint's adapter weights into ``peft_model`` (same LoRA config required)."""
    from peft import set_peft_model_state_dict
    from peft.utils import load_peft_weights

    checkpoint.validate()
    expected = lora_description(peft_model)
    found = json.loads((checkpoint.path / ADAPTER_CONFIG).read_text())
    found_targets = found.get("target_modules")
    found_targets = sorted(found_targets) if isinstance(found_targets, list) else [str(found_targets)]
    if (found.get("r"), float(found.get("lora_alpha", 0)), found_targets) != (
            expected["r"], expected["alpha"], expected["target_modules"]):
        raise CheckpointError(
            f"{checkpoint.path}: LoRA config r={found.get('r')}, alpha={found.get('lora_alpha')}, "
            f"targets={found_targets} differs from the first checkpoint's {expected}")
    weights = load_peft_weights(str(checkpoint.path), device=str(next(peft_model.parameters()).device))
    result = set_peft_model_state_dict(peft_model, weights)
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
    if missing:
        raise CheckpointError(f"{checkpoint.path}: adapter weights miss {missing[:5]}")
