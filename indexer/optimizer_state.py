"""Read the Adam optimizer state saved in a training checkpoint, keyed by canonical LoRA names.

LESS preconditions training gradients with the Adam moments of each warmup checkpoint, so the
indexer needs ``exp_avg``, ``exp_avg_sq``, the step count and the hyper-parameters for every
trainable LoRA parameter. Two on-disk layouts are understood:

* HF Trainer ``optimizer.pt``: ``torch.optim.Optimizer.state_dict()``, whose ``state`` is keyed by
  integer ids. The ids are positions in the param groups, so they are mapped back to names by
  rebuilding the groups the way ``transformers.Trainer.create_optimizer`` builds them (a
  weight-decay group, then a no-decay group), or from ``param_names`` when torch stored them.
* Name-keyed ``optimizer.bin`` (accelerate / FSDP full state dicts): ``state`` is keyed by
  parameter names that may carry wrapper prefixes (``module.``, ``_fsdp_wrapped_module.``).

Files are read with ``torch.load(weights_only=True)`` (``checkpoints.load_torch_file``): one
that holds other Python objects is refused, since unpickling them runs code from the file.
:func:`convert_optimizer_file` (``gradstore convert-optimizer``, for the file's owner) rewrites
such a file as one that loads safely.

Canonical parameter names drop PEFT's ``base_model.model.`` prefix and the adapter-name segment,
so that names do not depend on how the model was wrapped or what the adapter was called.
"""

from __future__ import annotations

import re
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoints import load_torch_file
from .errors import OptimizerStateError

OPTIMIZER_FILE_NAMES = ("optimizer.pt", "optimizer.bin")

PEFT_PREFIX = "base_model.model."

# Segments that distributed / compile wrappers insert into parameter names (at any depth).
WRAPPER_SEGMENTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")

# Leading segments added by DDP / accelerate wrapping.
WRAPPER_PREFIXES = ("module.",)

# The name rule of ``transformers.Trainer.get_decay_parameter_names``: a parameter whose lowercased
# full name matches any of these gets no weight decay. (Trainer also exempts every parameter of an
# ``nn.LayerNorm`` module by type; that cannot be seen from a name, and LoRA parameters never live
# in one.)
NO_DECAY_NAME_PATTERNS = tuple(
    re.compile(pattern)
    for pattern in (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")
)

MAX_LISTED_NAMES = 10


@dataclass(frozen=True)
class AdamParamState:
    """Adam moments of one parameter, with the hyper-parameters of the group it was trained in."""

    exp_avg: torch.Tensor  # same shape as the parameter, float32
    exp_avg_sq: torch.Tensor  # same shape as the parameter, float32
    step: int  # optimizer steps taken so far
    beta1: float
    beta2: float
    eps: float


# --------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------


def canonical_param_name(name: str, adapter_name: str = "default") -> str:
    """PEFT parameter name -> canonical name (no ``base_model.model.`` prefix, no adapter segment).

    ``base_model.model.transformer.h.0.attn.c_attn.lora_A.default.weight``
    -> ``transformer.h.0.attn.c_attn.lora_A.weight``. Already-canonical names are returned as is.
    """
    if name.startswith(PEFT_PREFIX):
        name = name[len(PEFT_PREFIX):]
    return ".".join(segment for segment in name.split(".") if segment != adapter_name)


def _canonical_saved_name(name: str, adapter_name: str) -> str:
    """Canonical name of a parameter name found in a saved optimizer, wrapper segments removed."""
    for prefix in WRAPPER_PREFIXES:
        while name.startswith(prefix):
            name = name[len(prefix):]
    segments = [segment for segment in name.split(".") if segment not in WRAPPER_SEGMENTS]
    return canonical_param_name(".".join(segments), adapter_name)


def is_weight_decayed(name: str, adapter_name: str = "default") -> bool:
    """Whether HF Trainer puts canonical parameter ``name`` in its weight-decay group.

    Trainer matches the full PEFT name, which also holds the adapter segment, so an adapter called
    e.g. ``"bias_ft"`` takes every LoRA parameter out of weight decay; the adapter name is checked
    as a segment of its own for that reason.
    """
    candidates = (name.lower(), f".{adapter_name.lower()}.")
    return not any(pattern.search(candidate)
                   for pattern in NO_DECAY_NAME_PATTERNS for candidate in candidates)


def _list_names(names: Iterable[str]) -> str:
    """At most ``MAX_LISTED_NAMES`` names, then how many more there are."""
    names = list(names)
    listed = ", ".join(str(name) for name in names[:MAX_LISTED_NAMES])
    if len(names) > MAX_LISTED_NAMES:
        listed += f" and {len(names) - MAX_LISTED_NAMES} more"
    return listed


def _shape_text(shape: Iterable[int]) -> str:
    """``(8, 32)`` for a shape; ``(96,)`` for a vector, as Python writes tuples."""
    return str(tuple(int(size) for size in shape))


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def find_optimizer_file(checkpoint_dir: Path) -> Path | None:
    """``optimizer.pt`` in ``checkpoint_dir``, else ``optimizer.bin``, else ``None``."""
    for file_name in OPTIMIZER_FILE_NAMES:
        candidate = Path(checkpoint_dir) / file_name
        if candidate.is_file():
            return candidate
    return None


def _resolve_optimizer_file(path: Path) -> Path:
    """The optimizer file at ``path``, or inside it when ``path`` is a checkpoint directory."""
    path = Path(path)
    if path.is_dir():
        found = find_optimizer_file(path)
        if found is None:
            raise OptimizerStateError(
                f"{path}: no optimizer state in this checkpoint directory "
                f"(looked for {' and '.join(OPTIMIZER_FILE_NAMES)}){_layout_hint(path)}"
            )
        return found
    if not path.is_file():
        raise OptimizerStateError(f"{path}: optimizer state file does not exist")
    return path


def _layout_hint(checkpoint_dir: Path) -> str:
    """Why a directory may hold optimizer state in a layout gradstore does not read."""
    if any(checkpoint_dir.glob("optimizer_*")):
        return "; it has a sharded optimizer_* folder, save a full optimizer state dict instead"
    if any(checkpoint_dir.glob("global_step*")):
        return "; it looks like a DeepSpeed checkpoint, whose optimizer state is not supported"
    return ""


CONVERT_HINT = ("convert it with `gradstore convert-optimizer IN OUT` (run by the file's owner, who trusts it) "
                "and use the converted file")


def _torch_load(path: Path, trust_pickle: bool) -> Any:
    """``torch.load`` on CPU with ``weights_only=True`` (see ``checkpoints.load_torch_file``)."""
    return load_torch_file(path, fix=CONVERT_HINT, trust_pickle=trust_pickle, error=OptimizerStateError)


def convert_optimizer_file(source: Path, dest: Path) -> list[str]:
    """Rewrite the optimizer state ``source`` as ``dest``, which ``weights_only=True`` loads.

    ``source`` is unpickled in full (``weights_only=False``), which runs any code it holds: only for
    a file its owner trusts. Tensors, numbers, strings, booleans, None and lists, tuples and dicts
    of them are kept; NumPy arrays and scalars become tensors and numbers; any other object is
    dropped. Returns where the dropped objects were (``param_groups[0].extra``).
    """
    saved = load_torch_file(Path(source), fix=CONVERT_HINT, trust_pickle=True, error=OptimizerStateError)
    dropped: list[str] = []
    clean = _plain(saved, "", dropped)
    _split_state_dict(Path(source), clean)
    torch.save(clean, dest)
    load_torch_file(Path(dest), fix=CONVERT_HINT, error=OptimizerStateError)  # what the indexer will do
    return dropped


def _plain(value: Any, where: str, dropped: list[str]) -> Any:
    """``value`` with only what ``weights_only=True`` rebuilds (see :func:`convert_optimizer_file`)."""
    import numpy as np

    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.array(value))
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return {key: _plain(item, f"{where}.{key}" if where else str(key), dropped)
                for key, item in value.items() if _keep(item, f"{where}.{key}" if where else str(key), dropped)}
    if isinstance(value, (list, tuple)):
        items = [_plain(item, f"{where}[{i}]", dropped) for i, item in enumerate(value)]
        return tuple(items) if isinstance(value, tuple) else items
    dropped.append(where)
    return None


def _keep(value: Any, where: str, dropped: list[str]) -> bool:
    """Whether a dict entry is kept: an object that is not plain data is dropped with its key."""
    import numpy as np

    plain = (type(None), bool, int, float, str, torch.Tensor, np.ndarray, np.generic, Mapping, list, tuple)
    if isinstance(value, plain):
        return True
    dropped.append(where)
    return False


# --------------------------------------------------------------------------------------------
# Mapping saved states to canonical names
# --------------------------------------------------------------------------------------------


def load_optimizer_state(path: Path, params: "OrderedDict[str, torch.Size]", *,
                         adapter_name: str = "default", trust_pickle: bool = False) -> dict[str, AdamParamState]:
    """Adam state of every trainable LoRA parameter, keyed by canonical name.

    ``path`` is an optimizer file or a checkpoint directory holding one. ``params`` maps canonical
    names to shapes in ``named_parameters()`` order. Raises ``OptimizerStateError`` when the file
    is missing or unreadable (a file that ``weights_only=True`` does not load is refused unless
    ``trust_pickle``), or its states do not match ``params`` one to one.
    """
    path = _resolve_optimizer_file(path)
    saved = _torch_load(path, trust_pickle)
    state, groups = _split_state_dict(path, saved)
    if all(isinstance(key, str) for key in state):
        keyed, group_of = _map_name_keyed(path, state, groups, adapter_name)
    else:
        keyed, group_of = _map_id_keyed(path, state, groups, params, adapter_name)
    _check_names(path, keyed, params)
    return {
        name: _adam_param_state(path, name, keyed[name], groups[group_of[name]], params[name])
        for name in params
    }


def _split_state_dict(path: Path, saved: Any) -> tuple[Mapping, list[dict]]:
    """``state`` and ``param_groups`` of a saved optimizer state dict, checked to be there."""
    if not isinstance(saved, Mapping) or "state" not in saved or "param_groups" not in saved:
        found = list(saved) if isinstance(saved, Mapping) else type(saved).__name__
        raise OptimizerStateError(
            f"{path}: not an optimizer state dict (expected the keys 'state' and 'param_groups', "
            f"found {found})"
        )
    return saved["state"], list(saved["param_groups"])


def _map_name_keyed(path: Path, state: Mapping, groups: list[dict],
                    adapter_name: str) -> tuple[dict[str, dict], dict[str, int]]:
    """Canonical name -> state, and -> group index, for a state keyed by parameter names."""
    keyed: dict[str, dict] = {}
    for saved_name, value in state.items():
        name = _canonical_saved_name(saved_name, adapter_name)
        if name in keyed:
            raise OptimizerStateError(
                f"{path}: two optimizer states map to the parameter {name} "
                f"(the second is saved as {saved_name})"
            )
        keyed[name] = value
    group_of = {}
    for index, group in enumerate(groups):
        for name in group.get("params", []):
            if isinstance(name, str):
                group_of[_canonical_saved_name(name, adapter_name)] = index
    # FSDP lists every name in a group; a file that does not is read with the first group's
    # hyper-parameters, which is right whenever there is only one.
    for name in keyed:
        group_of.setdefault(name, 0)
    return keyed, group_of


def _map_id_keyed(path: Path, state: Mapping, groups: list[dict],
                  params: "OrderedDict[str, torch.Size]",
                  adapter_name: str) -> tuple[dict[str, dict], dict[str, int]]:
    """Canonical name -> state, and -> group index, for a state keyed by integer ids."""
    id_to_name: dict[Any, str] = {}
    group_of: dict[str, int] = {}
    group_names = _group_names(path, groups, params, adapter_name)
    for index, (group, names) in enumerate(zip(groups, group_names)):
        for param_id, name in zip(group.get("params", []), names):
            id_to_name[param_id] = name
            group_of[name] = index
    keyed = {}
    for param_id, value in state.items():
        # An id no group lists gets a placeholder name so that it is reported as an extra state.
        keyed[id_to_name.get(param_id, f"<state id {param_id}>")] = value
    return keyed, group_of


def _group_names(path: Path, groups: list[dict], params: "OrderedDict[str, torch.Size]",
                 adapter_name: str) -> list[list[str]]:
    """Canonical names of every group's params, in the order of the group's id list."""
    if all("param_names" in group for group in groups):
        return [_stored_group_names(path, index, group, adapter_name)
                for index, group in enumerate(groups)]
    names = list(params)
    sizes = [len(group.get("params", [])) for group in groups]
    if sizes == [len(names)]:
        return [names]
    decay = [name for name in names if is_weight_decayed(name, adapter_name)]
    no_decay = [name for name in names if not is_weight_decayed(name, adapter_name)]
    if sizes == [len(decay), len(no_decay)]:
        return [decay, no_decay]
    raise OptimizerStateError(
        f"{path}: cannot tell which parameter each integer-keyed state belongs to: the file has "
        f"{len(groups)} param group(s) of sizes {sizes}, expected one group of all {len(names)} "
        f"trainable LoRA parameters, or HF Trainer's weight-decay / no-decay groups of sizes "
        f"{[len(decay), len(no_decay)]}"
    )


def _stored_group_names(path: Path, index: int, group: Mapping, adapter_name: str) -> list[str]:
    """Canonical names of the ``param_names`` torch stored with a group, one per id."""
    names = list(group["param_names"])
    if len(names) != len(group.get("params", [])):
        raise OptimizerStateError(
            f"{path}: param group {index} lists {len(group.get('params', []))} parameter ids but "
            f"{len(names)} param_names"
        )
    return [_canonical_saved_name(name, adapter_name) for name in names]


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------


def _check_names(path: Path, keyed: Mapping[str, Any], params: Mapping[str, torch.Size]) -> None:
    """Every LoRA parameter has a state and every state belongs to a LoRA parameter."""
    missing = [name for name in params if name not in keyed]
    if missing:
        raise OptimizerStateError(
            f"{path}: no optimizer state for {len(missing)} trainable LoRA parameter(s): "
            f"{_list_names(missing)}"
        )
    extra = [name for name in keyed if name not in params]
    if extra:
        raise OptimizerStateError(
            f"{path}: {len(extra)} optimizer state(s) belong to no trainable LoRA parameter: "
            f"{_list_names(extra)}"
        )


def _adam_param_state(path: Path, name: str, state: Mapping, group: Mapping,
                      shape: torch.Size) -> AdamParamState:
    """One parameter's ``AdamParamState``, checked to be Adam-like and shaped like the parameter."""
    if "exp_avg" not in state or "exp_avg_sq" not in state:
        raise OptimizerStateError(
            f"{path}: {name}: not an Adam-family optimizer state (no exp_avg / exp_avg_sq); "
            f"its keys are {sorted(map(str, state))}"
        )
    for key in ("exp_avg", "exp_avg_sq"):
        if tuple(state[key].shape) != tuple(shape):
            raise OptimizerStateError(
                f"{path}: {name}: {key} has shape {_shape_text(state[key].shape)}, "
                f"parameter has shape {_shape_text(shape)}"
            )
    beta1, beta2, eps = _adam_hyperparameters(path, name, group)
    return AdamParamState(
        exp_avg=state["exp_avg"].detach().to(torch.float32),
        exp_avg_sq=state["exp_avg_sq"].detach().to(torch.float32),
        step=_step_count(path, name, state),
        beta1=beta1,
        beta2=beta2,
        eps=eps,
    )


def _adam_hyperparameters(path: Path, name: str, group: Mapping) -> tuple[float, float, float]:
    """``(beta1, beta2, eps)`` of a param group."""
    if "betas" not in group or "eps" not in group:
        raise OptimizerStateError(
            f"{path}: {name}: its param group has no 'betas' / 'eps', so it is not an Adam-family "
            f"group; its keys are {sorted(key for key in group if key != 'params')}"
        )
    if group.get("amsgrad"):
        # The transforms reproduce plain Adam; with AMSGrad the optimizer divides by max(v).
        warnings.warn(f"{path}: {name} was trained with amsgrad=True; the adam transform "
                      "uses exp_avg_sq, not max_exp_avg_sq", stacklevel=4)
    beta1, beta2 = (float(beta) for beta in group["betas"])
    return beta1, beta2, float(group["eps"])


def _step_count(path: Path, name: str, state: Mapping) -> int:
    """Optimizer steps taken so far (torch stores a tensor, older versions a number)."""
    if "step" not in state:
        raise OptimizerStateError(f"{path}: {name}: optimizer state has no 'step'")
    step = state["step"]
    return int(step.item() if isinstance(step, torch.Tensor) else step)
