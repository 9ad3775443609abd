"""Target gradients from target records, computed exactly as the datastore's indexer would.

LESS scores training examples against the plain (``sgd``) gradients of a few target examples,
taken with the same model, LoRA, checkpoints, chat format and projection as the training
features; RDS+ compares representation vectors taken with the same model. :class:`TargetFeaturizer`
reads all of that from a datastore's manifest (model and tokenizer paths, template and maximum
length, LoRA shape and fresh-LoRA seed, checkpoint folders, projection spec, batching, whether the
store has representation vectors), loads the model once through the indexer's compute core
(:class:`gradstore.indexer.featurize.ExampleFeaturizer` with ``sgd`` gradients) and then
featurises any number of record lists. The vectors (and, when the store has them, the
representation vectors) equal those of an ``sgd`` target datastore built by ``gradstore index`` on
the same records with the same model and checkpoints.

Before loading, it checks that the model, tokenizer and checkpoint folders still exist and that
the model files and adapters are the ones the store was built with (by their recorded SHA-256),
since different weights would give gradients that do not compare with the stored ones.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from gradstore.indexer.checkpoints import CheckpointSpec, file_sha256
from gradstore.indexer.corpus import Record, validate_record
from gradstore.datastore import Datastore, Manifest
from gradstore.indexer.errors import BadRecordError, CheckpointError
from gradstore.indexer.extras import ExtraFeatures
from gradstore.indexer.featurize import ExampleFeaturizer, FeaturizerSettings
from gradstore.indexer.formatting import DEFAULT_TEMPLATE_NAME, TOKENIZER_TEMPLATE_NAME
from gradstore.indexer.job import IndexJobConfig, model_sha256
from gradstore.indexer.model import LoraSpec, lora_description
from gradstore.indexer.projection import ProjectionSpec

from .errors import SelectionError
from .targets import TargetSet, store_origin, subtask_of

TARGETS_SOURCE = "targets"
_TEMPLATES = {DEFAULT_TEMPLATE_NAME: "default", TOKENIZER_TEMPLATE_NAME: "tokenizer"}


class TargetFeaturizer:
    """Computes target vectors for records with a datastore's model; load once, reuse.

    ``store`` is a :class:`Datastore`, its :class:`Manifest`, or a store folder. ``device`` is
    where the gradients are computed (``auto``: CUDA when available). ``verify_model`` hashes the
    model files against the manifest (a few seconds per GB). ``featurize`` may be called from
    several threads; calls run one at a time.
    """

    def __init__(self, store: Datastore | Manifest | str | Path, device: str = "auto", verify_model: bool = True,
                 log: Callable[[str], None] = lambda _: None):
        if isinstance(store, Datastore):
            manifest, where = store.manifest, str(store.path)
        elif isinstance(store, Manifest):
            manifest, where = store, "the datastore"
        else:
            manifest, where = Manifest.load(store), str(store)
        self.manifest = manifest
        self.origin = store_origin(manifest)
        self._where = where
        self._lock = threading.Lock()
        settings = self._settings(device)
        self._check_inputs(settings, verify_model)
        self._core = ExampleFeaturizer(settings, log=log)
        self._core.load()
        self._check_loaded()

    @property
    def checkpoints(self) -> list[str]:
        return [c.name for c in self.manifest.checkpoints]

    @property
    def dim(self) -> int:
        return self.manifest.features.dim

    def featurize(self, records: Sequence[dict], subtask_field: str | None = None) -> TargetSet:
        """The normalised sgd vectors of ``records`` at every checkpoint of the store, and their
        representation vectors when the store has representation vectors.

        A record that is not a valid corpus record (or leaves nothing to train on after
        truncation) is an error naming its index; with ``subtask_field``, so is a record
        without that field.
        """
        if isinstance(records, (str, bytes, dict)) or not isinstance(records, Sequence) or not records:
            raise SelectionError("target records must be a non-empty list of records")
        encoded, subtasks = [], []
        for index, record in enumerate(records):
            location = f"target record {index}"
            try:
                shape = validate_record(record, location)
                item = Record(id=str(record.get("id", index)), source=TARGETS_SOURCE, location=location,
                              record=record, shape=shape)
                encoded.append(self._core.formatter.encode(item))
            except BadRecordError as err:
                raise SelectionError(str(err)) from None
            if subtask_field is not None:
                name = f"{location} (id {record['id']!r})" if record.get("id") is not None else location
                subtasks.append(subtask_of(record, subtask_field, name))
        with self._lock:
            computed = self._core.compute(encoded)
        vectors = {name: out["feature"] for name, out in computed.checkpoints.items()}
        return TargetSet.from_vectors(vectors, subtasks if subtask_field is not None else None, dim=self.dim,
                                      origin=self.origin, representations=computed.representations)

    # -- set-up ---------------------------------------------------------------------------

    def _settings(self, device: str) -> FeaturizerSettings:
        """The compute core's settings: ``sgd`` gradients with the store's model and settings, and
        the store's kind of representation vectors (no other extras: targets need none)."""
        m = self.manifest
        template = _TEMPLATES.get(m.tokenizer.get("template"))
        if template is None:
            raise SelectionError(f"{self._where}: unknown chat template {m.tokenizer.get('template')!r} in the "
                                 f"manifest (expected one of {sorted(_TEMPLATES)})")
        fresh = [c.name for c in m.checkpoints if c.path is None]
        if fresh and m.lora.init_seed is None:
            raise SelectionError(f"{self._where}: checkpoint {fresh[0]!r} is a fresh LoRA, but the manifest does not "
                                 f"record its initialisation seed (a store written by an older gradstore); "
                                 f"re-index it to compute target gradients from records")
        job = m.job or {}
        representations = m.extras is not None and m.extras.representations is not None
        return FeaturizerSettings(
            model=Path(m.model.path),
            tokenizer=Path(m.tokenizer.get("path") or m.model.path),
            checkpoints=[CheckpointSpec(name=c.name, path=Path(c.path) if c.path else None, weight=c.weight)
                         for c in m.checkpoints],
            lora=LoraSpec(r=m.lora.r, alpha=m.lora.alpha, target_modules=tuple(m.lora.target_modules),
                          init_seed=m.lora.init_seed or 0),
            gradient_type="sgd",
            projection=ProjectionSpec.from_dict(m.projection),
            max_length=int(m.tokenizer.get("max_length", IndexJobConfig.max_length)),
            template=template,
            # The store's batch limits; a store that records none gets the target device's defaults.
            max_tokens_per_batch=job.get("max_tokens_per_batch"), max_batch_size=job.get("max_batch_size"),
            dtype=m.model.dtype, device=device,
            extras=ExtraFeatures(representations=representations, gradient_spectra=False, vog=False),
        )

    def _check_inputs(self, config: FeaturizerSettings, verify_model: bool) -> None:
        m = self.manifest
        if not config.model.is_dir():
            raise SelectionError(f"{self._where}: the model folder {config.model} the datastore was built with "
                                 f"no longer exists")
        if not config.tokenizer.is_dir():
            raise SelectionError(f"{self._where}: the tokenizer folder {config.tokenizer} the datastore was built "
                                 f"with no longer exists")
        if verify_model and model_sha256(config.model) != m.model.sha256:
            raise SelectionError(f"{self._where}: the model files in {config.model} differ from those the datastore "
                                 f"was built with (sha256 mismatch), so target gradients would not compare")
        for info, spec in zip(m.checkpoints, config.checkpoints):
            if spec.path is None:
                continue
            if not spec.path.is_dir():
                raise SelectionError(f"{self._where}: checkpoint {info.name!r}: the folder {spec.path} no longer "
                                     f"exists")
            try:
                adapter = spec.adapter_weights
            except CheckpointError as err:
                raise SelectionError(f"{self._where}: checkpoint {info.name!r}: {err}") from None
            if info.adapter_sha256 is not None and file_sha256(adapter) != info.adapter_sha256:
                raise SelectionError(f"{self._where}: checkpoint {info.name!r}: {adapter} differs from the adapter "
                                     f"the datastore was built with (sha256 mismatch)")

    def _check_loaded(self) -> None:
        """The loaded formatter and LoRA must describe themselves as the manifest does."""
        m = self.manifest
        recorded = {k: v for k, v in m.tokenizer.items() if k != "path"}
        described = self._core.formatter.describe()
        differing = sorted(k for k in set(recorded) | set(described) if recorded.get(k) != described.get(k))
        if differing:
            key = differing[0]
            raise SelectionError(f"{self._where}: the tokenizer now gives {key} = {described.get(key)!r}, the "
                                 f"datastore recorded {recorded.get(key)!r}")
        lora = lora_description(self._core.peft_model)
        expected = {"r": m.lora.r, "alpha": float(m.lora.alpha), "target_modules": sorted(m.lora.target_modules)}
        shapes = {name: list(shape) for name, shape in self._core.grads.param_shapes.items()}
        if lora != expected or shapes != m.lora.params:
            raise SelectionError(f"{self._where}: the loaded LoRA ({lora}, {len(shapes)} parameters) differs from "
                                 f"the datastore's ({expected}, {len(m.lora.params)} parameters)")
