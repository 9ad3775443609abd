"""The compute core: encoded examples -> every per-example output a datastore holds.

:class:`ExampleFeaturizer` loads, once, the tokenizer and formatter, the base model with its LoRA,
each checkpoint's adapter weights and gradient transform, and the projection; then
:meth:`ExampleFeaturizer.compute` turns any list of encoded examples into, per checkpoint, the
normalised projected (transformed) gradient with its gradient norm, feature norm and loss (and the
gradient spectra), and per example the representation vector and VoG
(:mod:`gradstore.indexer.extras` specifies those). The indexing job (:mod:`gradstore.indexer.job`)
runs it over the corpus shard by shard; target featurisation
(:class:`gradstore.selection.featurizer.TargetFeaturizer`) runs it, configured from a store's
manifest, over target records, so both compute exactly the same things.

Examples are sorted by length and packed into batches under a token budget (a function of the
examples alone, so the same examples always give the same bits). Each batch goes through every
checkpoint in turn (the adapter weights are copied in), so what combines checkpoints (VoG) needs
one batch in memory, not the whole corpus; an out-of-memory batch is split in half and retried,
down to single examples.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from .batching import default_batching
from .checkpoints import CheckpointSpec, resolve_weights
from .errors import JobError
from .extras import ExtraFeatures, GradientVariance, l2_normalized
from .formatting import Encoded, Formatter
from .grads import Batch, PerExampleGradients
from .model import LoraSpec, attach_lora, load_base_model, load_checkpoint_weights, load_tokenizer, resolve_device
from .optimizer_state import find_optimizer_file, load_optimizer_state
from .projection import ProjectionSpec, make_projector
from .transforms import GradientTransform, make_transform

# Columns of each checkpoint's outputs, and the two that only gradient spectra add.
CHECKPOINT_COLUMNS = ("feature", "grad_norm", "feature_norm", "loss")
SPECTRA_COLUMNS = ("nuclear_norm", "effective_rank")


@dataclass
class FeaturizerSettings:
    """What the outputs depend on: model, LoRA, checkpoints, gradient type, projection, tokenisation,
    batching, precision, and which extras to compute."""

    model: Path
    tokenizer: Path | None = None
    checkpoints: list[CheckpointSpec] = field(default_factory=list)  # none: one fresh LoRA
    lora: LoraSpec = field(default_factory=LoraSpec)
    gradient_type: str = "adam"
    projection: ProjectionSpec = field(default_factory=ProjectionSpec)
    max_length: int = 2048
    template: str = "auto"
    max_tokens_per_batch: int | None = None  # None: the device's default (batching.default_batching)
    max_batch_size: int | None = None
    dtype: str = "fp32"
    device: torch.device | str = "auto"
    extras: ExtraFeatures = field(default_factory=ExtraFeatures)

    def effective_checkpoints(self) -> list[CheckpointSpec]:
        """The checkpoints to featurise: the given ones, or one fresh LoRA."""
        return self.checkpoints or [CheckpointSpec(name="fresh", path=None)]


@dataclass
class CheckpointState:
    """One checkpoint, ready to switch in: its spec, weight, gradient transform and LoRA weights."""

    spec: CheckpointSpec
    weight: float
    transform: GradientTransform
    lora_weights: list[torch.Tensor]  # in the order of ExampleFeaturizer's trainable parameters


@dataclass
class Computed:
    """:meth:`ExampleFeaturizer.compute`'s result, rows in the order of the examples given.

    ``checkpoints``: name -> ``feature`` float16 ``(n, k)`` (L2-normalised), ``grad_norm``,
    ``feature_norm``, ``loss`` and, with gradient spectra, ``nuclear_norm`` and ``effective_rank``
    (float32 ``(n,)``). ``representations``: float16 ``(n, hidden)`` (L2-normalised) or None;
    ``vog``: float32 ``(n,)`` or None.
    """

    checkpoints: dict[str, dict[str, np.ndarray]]
    representations: np.ndarray | None = None
    vog: np.ndarray | None = None


def _is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)


class ExampleFeaturizer:
    """Loads a model with its checkpoints once (:meth:`load`), then computes per-example outputs."""

    def __init__(self, settings: FeaturizerSettings, log: Callable[[str], None] = print):
        self.settings = settings
        self.log = log
        self.oom_retries = 0

    # -- set-up --------------------------------------------------------------------------------

    def load(self, device: torch.device | None = None) -> None:
        """Load the tokenizer, formatter, model with its LoRA, projection and checkpoints, on
        ``device`` (default: the settings' device)."""
        self.device = device if device is not None else resolve_device(str(self.settings.device))
        # Batch limits left as None take the device's defaults, now that the device is known.
        tokens, examples = default_batching(self.device.type)
        given = self.settings
        self.settings = s = replace(
            given, max_tokens_per_batch=tokens if given.max_tokens_per_batch is None else given.max_tokens_per_batch,
            max_batch_size=examples if given.max_batch_size is None else given.max_batch_size)
        self.tokenizer = load_tokenizer(s.tokenizer or s.model)
        self.formatter = Formatter(self.tokenizer, s.max_length, s.template)
        base = load_base_model(s.model, s.dtype, self.device)
        self.peft_model = attach_lora(base, s.checkpoints, s.lora)
        self.grads = PerExampleGradients(self.peft_model)
        self.projector = make_projector(s.projection, self.device)
        self.pad_id = self.tokenizer.pad_token_id
        self._lora_params = [p for p in self.peft_model.parameters() if p.requires_grad]
        initial = [p.detach().clone() for p in self._lora_params]  # a fresh LoRA's weights
        specs = s.effective_checkpoints()
        weights = resolve_weights(specs)
        self.checkpoints = [self._checkpoint_state(spec, w, initial) for spec, w in zip(specs, weights)]
        self._active: int | None = None

    def _checkpoint_state(self, spec: CheckpointSpec, weight: float, initial: list[torch.Tensor]) -> CheckpointState:
        gradient_type = self.settings.gradient_type
        states = None
        if gradient_type in ("adam", "less"):
            optimizer_file = find_optimizer_file(spec.path)
            if optimizer_file is None:
                raise JobError(f"{spec.path}: gradient type {gradient_type!r} needs the optimizer "
                               "state (optimizer.pt or optimizer.bin), none found")
            states = load_optimizer_state(optimizer_file, self.grads.param_shapes)
        lora_weights = initial
        if spec.path is not None:
            load_checkpoint_weights(self.peft_model, spec)  # validates config compatibility
            lora_weights = [p.detach().clone() for p in self._lora_params]
        return CheckpointState(spec, weight, make_transform(gradient_type, states), lora_weights)

    @property
    def checkpoint_names(self) -> list[str]:
        return [c.spec.name for c in self.checkpoints]

    @property
    def computes_vog(self) -> bool:
        """VoG is a variance across checkpoints: computed only with two or more."""
        return self.settings.extras.vog and len(self.checkpoints) >= 2

    def activate(self, index: int) -> None:
        """Switch the model to checkpoint ``index`` (its LoRA weights copied in)."""
        if self._active == index:
            return
        with torch.no_grad():
            for param, value in zip(self._lora_params, self.checkpoints[index].lora_weights):
                param.copy_(value)
        self._active = index

    # -- compute -------------------------------------------------------------------------------

    def compute(self, encoded: list[Encoded], progress=None) -> Computed:
        """Every output of ``encoded`` (see :class:`Computed`); needs :meth:`load` first.

        ``progress``, when given, gets ``update(examples × checkpoints, tokens × checkpoints)``
        after each batch.
        """
        s = self.settings
        lengths = [e.num_tokens for e in encoded]
        batches = length_batches(list(range(len(encoded))), lengths, s.max_tokens_per_batch, s.max_batch_size)
        columns = CHECKPOINT_COLUMNS + (SPECTRA_COLUMNS if s.extras.gradient_spectra else ())
        out = {}
        for name in self.checkpoint_names:
            out[name] = {"feature": np.zeros((len(encoded), s.projection.dim), np.float16)}
            out[name].update({column: np.zeros(len(encoded), np.float32) for column in columns[1:]})
        representations = vog = None
        passes = len(self.checkpoints)
        for rows in batches:
            result = self._batch([encoded[i] for i in rows])
            for name, values in zip(self.checkpoint_names, result["checkpoints"]):
                for column in columns:
                    out[name][column][rows] = values[column]
            if "representations" in result:
                if representations is None:
                    representations = np.zeros((len(encoded), result["representations"].shape[1]), np.float16)
                representations[rows] = result["representations"]
            if "vog" in result:
                vog = np.zeros(len(encoded), np.float32) if vog is None else vog
                vog[rows] = result["vog"]
            if progress is not None:
                progress.update(len(rows) * passes, sum(lengths[i] for i in rows) * passes)
        return Computed(out, representations, vog)

    def _batch(self, examples: list[Encoded]) -> dict:
        """One batch at every checkpoint; on out-of-memory split in half and retried."""
        try:
            return self._batch_once(examples)
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            if not _is_out_of_memory(exc) or len(examples) == 1:
                raise
        self.oom_retries += 1
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        half = len(examples) // 2
        parts = [self._batch(examples[:half]), self._batch(examples[half:])]
        merged = {"checkpoints": [{column: np.concatenate([a[column], b[column]]) for column in a}
                                  for a, b in zip(parts[0]["checkpoints"], parts[1]["checkpoints"])]}
        for key in ("representations", "vog"):
            if key in parts[0]:
                merged[key] = np.concatenate([parts[0][key], parts[1][key]])
        return merged

    def _batch_once(self, examples: list[Encoded]) -> dict:
        """``{"checkpoints": [per checkpoint {column: values}], "representations"?, "vog"?}``."""
        extras = self.settings.extras
        batch = Batch.collate([(e.input_ids, e.labels) for e in examples], self.pad_id, self.device)
        variance = GradientVariance() if self.computes_vog else None
        result: dict = {"checkpoints": []}
        for index, checkpoint in enumerate(self.checkpoints):
            self.activate(index)
            grads = self.grads.compute(batch, representations=extras.representations and index == 0,
                                       input_grads=variance is not None, spectra=extras.gradient_spectra)
            result["checkpoints"].append(self._checkpoint_columns(grads, checkpoint.transform))
            if grads.representations is not None:
                result["representations"] = l2_normalized(grads.representations).half().cpu().numpy()
            if variance is not None:
                variance.add(grads.input_grads)
        if variance is not None:
            result["vog"] = variance.vog(batch.attention_mask).cpu().numpy()
        return result

    def _checkpoint_columns(self, grads, transform: GradientTransform) -> dict[str, np.ndarray]:
        batch_size = grads.losses.shape[0]
        projected = torch.zeros(batch_size, self.projector.spec.dim, device=self.device)
        squared_norm = torch.zeros(batch_size, device=self.device)
        # Groups of consecutive parameters, each (B, Σ numel): a few large operations per batch.
        for params, flat in PerExampleGradients.group_params(grads.per_param):
            squared_norm += flat.square().sum(1)
            projected += self.projector.project_many(params, transform.flat(params, flat)).float()
        feature_norm = projected.norm(dim=1)
        # A zero gradient has no direction: store a zero vector (cosine 0 with everything).
        normalised = projected / feature_norm.clamp_min(torch.finfo(torch.float32).tiny)[:, None]
        columns = {"feature": normalised.half().cpu().numpy(), "grad_norm": squared_norm.sqrt().cpu().numpy(),
                   "feature_norm": feature_norm.cpu().numpy(), "loss": grads.losses.cpu().numpy()}
        if grads.nuclear_norm is not None:
            columns["nuclear_norm"] = grads.nuclear_norm.cpu().numpy()
            columns["effective_rank"] = grads.effective_rank.cpu().numpy()
        return columns


# A batch takes no example shorter than its longest one divided by this: every example is padded
# by at most 20 % of its own length, so padded tokens stay within 1.2x the real ones.
MAX_PADDING_RATIO = 1.2


def length_batches(rows: list[int], lengths: list[int], max_tokens: int, max_batch: int) -> list[list[int]]:
    """Rows packed longest-first into batches of at most ``max_tokens`` padded tokens.

    Sorting by length keeps padding low; ties keep row order, so batching is deterministic. A
    batch is also closed before an example that would be padded to more than
    ``MAX_PADDING_RATIO`` times its length: padding costs as much compute as real tokens, and
    where lengths are sparse (a small shard, the long tail) it would otherwise dominate.
    """
    order = sorted(rows, key=lambda r: (-lengths[r], r))
    batches, current = [], []
    for row in order:
        padded = lengths[current[0]] if current else lengths[row]
        if current and (len(current) + 1 > max_batch or (len(current) + 1) * padded > max_tokens
                        or padded > MAX_PADDING_RATIO * lengths[row]):
            batches.append(current)
            current = []
        current.append(row)
    if current:
        batches.append(current)
    return batches
