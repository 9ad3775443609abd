"""``manifest.json``: the description of one version of a store, validated on load.

Fields (unknown keys are errors):

- ``format`` = ``"gradstore-datastore"``, ``schema_version`` (:data:`~.layout.SCHEMA_VERSION`),
  ``status`` = ``"complete"``, ``version`` (1 for a new store, +1 for each append, removal or
  compaction or quantised copy), ``created_at`` (the store's first version, ISO 8601), ``updated_at`` (this
  version's), ``gradstore_version``;
- ``model`` {path, sha256, architecture, dtype, device}; ``tokenizer`` (the formatter's
  description, free-form); ``lora`` {r, alpha, target_modules, params: name -> shape, num_params,
  init_seed (the seed of a fresh, untrained LoRA; null with checkpoints)}; ``gradient_type``;
- ``checkpoints`` [{name, path, weight, learning_rate, adapter_sha256, optimizer_sha256}], in the
  order of the index's vector blocks;
- ``projection`` (``ProjectionSpec.to_dict()``: kind, dim, seed, version);
- ``features`` {dim (= k), dtype = "float16", normalized, quantized: the kinds of quantised copy
  stored (``gradstore.datastore.quantized``), default none};
- ``index`` {file, kind, factory, metric = "inner_product", dim (= k · checkpoints), ntotal (=
  ``counts.rows``)} or null (exact searches scan the features);
- ``counts`` {examples (live rows), rows (every row, removed ones included), removed, by_source:
  source -> live examples, skipped, truncated (live)};
- ``extras`` {representations: {dim (= hidden), dtype = "float16", normalized, pooling =
  ``"position-weighted-mean"``, checkpoint (the first)} or null, gradient_spectra (bool), vog
  (bool)};
- ``tokens`` (token statistics of the live rows, free-form); ``job`` (the last indexing run: wall
  time, throughput, world size, ...); ``settings`` (what an append must reproduce:
  :mod:`gradstore.indexer.job` writes and compares it; free-form here);
- ``segments`` [{name, first_row, shard_rows}] in row order; ``shards`` {size (nominal rows per
  shard), count (every segment's)};
- ``tombstones``: the store-relative path of the removed-rows file, or null;
- ``history`` [{version, at, action (``build``, ``append``, ``remove``, ``compact``,
  ``migrate``, ``quantize``), rows_added, rows_removed}]: how the store came to be;
- ``files``: store-relative path -> {bytes, sha256} for every file of the version but the
  manifests.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from gradstore.indexer.faiss_index import normalized_weights

from .errors import StoreError
from .files import atomic_write_bytes
from .layout import MANIFEST_FILE, SCHEMA_VERSION, check_checkpoint_name, segment_number

POOLING = "position-weighted-mean"
#: What made a version (its ``history`` entry).
ACTIONS = ("build", "append", "remove", "compact", "migrate", "quantize")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelInfo(_Strict):
    path: str
    sha256: str
    architecture: str
    dtype: str
    device: str


class LoraInfo(_Strict):
    r: int
    alpha: float
    target_modules: list[str]
    params: dict[str, list[int]]
    num_params: int
    init_seed: int | None = None  # seed of a fresh LoRA's initialisation; None with checkpoints


class CheckpointInfo(_Strict):
    name: str
    path: str | None = None
    weight: float
    learning_rate: float | None = None
    adapter_sha256: str | None = None
    optimizer_sha256: str | None = None

    @model_validator(mode="after")
    def _valid(self):
        check_checkpoint_name(self.name, ValueError)
        if not (self.weight >= 0 and np.isfinite(self.weight)):
            raise ValueError(f"checkpoint {self.name!r}: weight must be finite and >= 0, got {self.weight}")
        return self


class FeatureInfo(_Strict):
    dim: int
    dtype: Literal["float16"]
    normalized: bool = True
    quantized: list[str] = []


class RepresentationInfo(_Strict):
    dim: int
    dtype: Literal["float16"] = "float16"
    normalized: bool = True
    pooling: Literal["position-weighted-mean"] = POOLING
    checkpoint: str  # the checkpoint whose adapted model gives them (the first)


class ExtrasInfo(_Strict):
    """Which extra per-example features the store holds (``gradstore.indexer.extras``)."""

    representations: RepresentationInfo | None = None
    gradient_spectra: bool = False
    vog: bool = False


class IndexInfo(_Strict):
    file: str
    kind: str
    factory: str
    metric: Literal["inner_product"]
    dim: int
    ntotal: int


class CountInfo(_Strict):
    examples: int
    rows: int
    removed: int = 0
    by_source: dict[str, int]
    skipped: int
    truncated: int


class SegmentInfo(_Strict):
    name: str
    first_row: int
    shard_rows: list[int]

    @property
    def num_rows(self) -> int:
        return sum(self.shard_rows)


class ShardInfo(_Strict):
    size: int
    count: int


class HistoryEntry(_Strict):
    version: int
    at: str
    action: Literal[ACTIONS]
    rows_added: int = 0
    rows_removed: int = 0


class FileInfo(_Strict):
    bytes: int
    sha256: str


class Manifest(_Strict):
    """``manifest.json``; see the module docstring for the meaning of each field."""

    format: Literal["gradstore-datastore"]
    schema_version: int
    status: Literal["complete"]
    version: int
    created_at: str
    updated_at: str
    gradstore_version: str
    model: ModelInfo
    tokenizer: dict[str, Any]
    lora: LoraInfo
    checkpoints: list[CheckpointInfo]
    gradient_type: str
    projection: dict[str, Any]
    features: FeatureInfo
    index: IndexInfo | None
    counts: CountInfo
    extras: ExtrasInfo
    tokens: dict[str, Any]
    job: dict[str, Any]
    settings: dict[str, Any] = {}
    segments: list[SegmentInfo]
    shards: ShardInfo
    tombstones: str | None = None
    history: list[HistoryEntry]
    files: dict[str, FileInfo]

    @model_validator(mode="after")
    def _consistent(self):
        if self.schema_version != SCHEMA_VERSION:
            raise ValueError(f"schema_version {self.schema_version} is not supported "
                             f"(this gradstore reads {SCHEMA_VERSION})")
        names = [c.name for c in self.checkpoints]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"checkpoints must be non-empty with unique names, got {names}")
        normalized_weights([c.weight for c in self.checkpoints])
        if self.projection.get("dim", self.features.dim) != self.features.dim:
            raise ValueError(f"projection dim {self.projection['dim']} != features dim {self.features.dim}")
        counts = self.counts
        if sum(counts.by_source.values()) != counts.examples:
            raise ValueError(f"counts.by_source sums to {sum(counts.by_source.values())}, "
                             f"not counts.examples = {counts.examples}")
        if counts.examples + counts.removed != counts.rows:
            raise ValueError(f"counts: examples {counts.examples} + removed {counts.removed} != rows {counts.rows}")
        if (counts.removed > 0) != (self.tombstones is not None):
            raise ValueError("tombstones must name a file exactly when counts.removed > 0")
        self._check_segments()
        if self.index is not None:
            expected = (self.features.dim * len(names), counts.rows)
            if (self.index.dim, self.index.ntotal) != expected:
                raise ValueError(f"index dim/ntotal {(self.index.dim, self.index.ntotal)} != {expected} "
                                 f"(features dim x checkpoints, rows)")
        representation = self.extras.representations
        if representation is not None and representation.checkpoint not in names:
            raise ValueError(f"extras.representations.checkpoint {representation.checkpoint!r} is not one of "
                             f"the checkpoints {names}")
        for relative in self.files:
            if relative.startswith("/") or ".." in Path(relative).parts:
                raise ValueError(f"files: {relative!r} is not a path inside the store")
        return self

    def _check_segments(self) -> None:
        next_row, numbers = 0, []
        for segment in self.segments:
            numbers.append(segment_number(segment.name))
            if segment.first_row != next_row:
                raise ValueError(f"segment {segment.name} starts at row {segment.first_row}, the segments "
                                 f"before it end at row {next_row}")
            if any(rows < 0 for rows in segment.shard_rows):
                raise ValueError(f"segment {segment.name}: negative shard sizes")
            next_row += segment.num_rows
        if numbers != sorted(set(numbers)):
            raise ValueError(f"segments must have increasing numbers, got {[s.name for s in self.segments]}")
        if next_row != self.counts.rows:
            raise ValueError(f"the segments hold {next_row} rows, counts.rows is {self.counts.rows}")
        if sum(len(s.shard_rows) for s in self.segments) != self.shards.count:
            raise ValueError(f"the segments hold {sum(len(s.shard_rows) for s in self.segments)} shards, "
                             f"shards.count is {self.shards.count}")

    @property
    def weights(self) -> np.ndarray:
        """Checkpoint weights normalised to sum to 1, in checkpoint order."""
        return normalized_weights([c.weight for c in self.checkpoints])

    @classmethod
    def load(cls, path: str | Path) -> "Manifest":
        """Read and validate a manifest file (or the manifest of a store directory)."""
        path = manifest_path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise StoreError(f"{path}: no manifest (not a datastore, or one that was never finalised)") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise StoreError(f"{path}: cannot read the manifest: {err}") from err
        if not isinstance(data, dict):
            raise StoreError(f"{path}: the manifest is not a JSON object")
        check_schema_version(path, data.get("schema_version"))
        if data.get("status") != "complete":
            raise StoreError(f"{path}: status is {data.get('status')!r}, not 'complete'")
        return cls.validated(data, path)

    @classmethod
    def validated(cls, data: dict, where: str | Path) -> "Manifest":
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            raise StoreError(f"{where}: invalid manifest:\n{describe_validation(err)}") from None

    def write(self, path: str | Path, tmp_dir: Path | None = None) -> None:
        """Write atomically (temporary file, fsync, rename) to a file or a store directory."""
        atomic_write_bytes(manifest_path(path), self.to_json().encode(), tmp_dir)

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2) + "\n"


def check_schema_version(path: Path, version: Any) -> None:
    from .. import __version__

    if version == 1:
        raise StoreError(f"{path}: a schema version 1 store (gradstore before datastore versions); convert it "
                         f"once with `gradstore migrate {path.parent}`")
    if version != SCHEMA_VERSION:
        raise StoreError(f"{path}: schema_version {version!r} is not supported by gradstore {__version__} "
                         f"(it reads schema_version {SCHEMA_VERSION})")


def manifest_path(path: str | Path) -> Path:
    path = Path(path)
    return path / MANIFEST_FILE if path.is_dir() else path


def describe_validation(err: ValidationError) -> str:
    return "\n".join(f"  {'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}"
                     for e in err.errors())
