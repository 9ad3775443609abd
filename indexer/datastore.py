"""The on-disk datastore format (this docstring is its specification), its writer and its reader.

A datastore holds, for every training example of a corpus and for each of several model
checkpoints, the example's L2-normalised projected gradient ("feature", ``k`` dims, float16) with
its gradient norm, feature norm and loss (and, in stores that have them, its gradient spectra),
plus the examples themselves (with their VoG), their representation vectors, an optional FAISS
index and a manifest that describes and checksums everything. What representation vectors,
gradient spectra and VoG are is specified in ``gradstore.indexer.extras``.

Layout of a store directory
===========================

::

    STORE/
      manifest.json                          the manifest (below); present only once complete
      examples/part-00000.parquet ...        one file per shard, rows in corpus order, zstd
      features/<checkpoint>/part-00000.parquet ...   same shards, uncompressed
      raw_features/<checkpoint>/part-00000.npy ...   the same features as raw matrices (optional)
      representations/part-00000.parquet ...     representation vectors (optional), uncompressed
      raw_representations/part-00000.npy ...     the same as raw matrices (optional)
      index.faiss                            FAISS index (absent with index kind "none")
      index.ivfdata                          its inverted lists (index kind "ivf-ondisk" only)
      skipped.jsonl                          records the job skipped (only when there were some)

Rows and shards
    Every stored example has a global ``row``, 0-based and dense: rows ``0..N-1`` with no gap or
    duplicate. ``row`` is the example's FAISS id. Shard ``i`` (file ``part-{i:05d}.parquet``;
    wider numbers when ``i >= 100000``) holds a contiguous, increasing range of rows, and shard
    ``i+1`` starts where shard ``i`` ends, so reading the shards in numeric order reads the rows in
    order. A shard may be empty. Every checkpoint has exactly the rows of the examples shard.

``examples/part-XXXXX.parquet`` (zstd-compressed)
    ``row`` int64, ``id`` string (the record id, unique in the corpus), ``source`` string (corpus
    name), ``location`` string (``"file:line"`` of the record), ``record`` string (the original
    record as JSON text), ``num_tokens`` int32, ``num_label_tokens`` int32 (tokens carrying
    loss), ``truncated`` bool (the example was cut to the maximum length); in stores with VoG
    (``extras.vog``), also ``vog`` float32 (the example's variance of input-embedding gradients
    across the checkpoints).

``features/<checkpoint>/part-XXXXX.parquet`` (uncompressed, no dictionary encoding)
    ``row`` int64, ``feature`` fixed_size_list<float16>[k] (the projected gradient divided by its
    L2 norm; an all-zero vector stands for a zero gradient), ``grad_norm`` float32 (norm of the
    unprojected gradient), ``feature_norm`` float32 (norm of the projection before
    normalisation), ``loss`` float32; in stores with gradient spectra (``extras.gradient_spectra``),
    also ``nuclear_norm`` and ``effective_rank`` float32 (each the mean over the LoRA-adapted
    matrices of that statistic of the example's weight gradient at this checkpoint). Random fp16
    data does not compress, and plain encoding keeps
    reading these files close to a memory copy. ``<checkpoint>`` is the checkpoint's name from the
    manifest (letters, digits, ``._-``; not starting with ``.`` or ``_``).

``raw_features/<checkpoint>/part-XXXXX.npy`` (optional, per checkpoint and shard)
    The ``feature`` column of ``features/<checkpoint>/part-XXXXX.parquet``, bit for bit, as a
    raw row-major matrix:
    a NumPy ``.npy`` file (format version 1.0, dtype ``<f2``, ``fortran_order`` false, shape
    ``(rows of the shard, k)``), so ``numpy.load(path, mmap_mode="r")`` maps it without decoding.
    It exists for speed only: scanning every feature reads these at memory speed where the Parquet
    column decodes at a few hundred MB/s, at the cost of storing the features twice. A reader uses
    one exactly when ``files`` lists it, and reads the Parquet file otherwise; a store may have
    them for some shards and checkpoints, or none (stores written before they existed, or with
    them turned off), and the Parquet files stay the interchange format either way. They live
    outside ``features/`` so that tools reading a checkpoint's folder as a Parquet dataset see
    Parquet files only.
    Readers that predate them only check the size of the listed files they do not know, so adding
    them left ``SCHEMA_VERSION`` unchanged.

``representations/part-XXXXX.parquet`` (stores with ``extras.representations``; uncompressed)
    ``row`` int64, ``representation`` fixed_size_list<float16>[hidden]: the example's
    representation vector (RDS+'s position-weighted mean of the last hidden states of the model
    with the first checkpoint's adapter, L2-normalised), one file per shard with the shard's rows.

``raw_representations/part-XXXXX.npy`` (optional, per shard)
    The ``representation`` column as a raw ``.npy`` matrix (``<f2``, row-major, ``(rows of the
    shard, hidden)``), written exactly when the raw feature files are and read on the same terms:
    a reader uses one exactly when ``files`` lists it.

``index.faiss``
    ``faiss.write_index`` output, metric inner product, one vector per row in row order:
    ``concat_c(sqrt(w_c) · feature_c)`` over the manifest's checkpoints in manifest order, with the
    checkpoint weights ``w`` normalised to sum to 1 (see ``gradstore.indexer.faiss_index``). A
    query built the same way scores ``Σ_c w_c · cos(train_c, target_c)``.

``index.ivfdata`` (index kind ``ivf-ondisk`` only)
    The inverted lists of ``index.faiss`` (``faiss.OnDiskInvertedLists``: each list's int64 ids,
    then its codes), which ``index.faiss`` names by this file name alone; a reader looks for it in
    the folder of the index file (``faiss.IO_FLAG_ONDISK_SAME_DIR``), so the store stays
    relocatable. The index file is named in the manifest's ``index.file``; this one is that name
    with the suffix ``.ivfdata``, and ``files`` lists and checksums both.

``manifest.json``
    JSON object validated by :class:`Manifest` (unknown keys are errors):

    - ``format`` = ``"gradstore-datastore"``, ``schema_version`` (this module reads
      ``SCHEMA_VERSION``), ``status`` = ``"complete"``, ``created_at`` (ISO 8601),
      ``gradstore_version``;
    - ``model`` {path, sha256, architecture, dtype, device}; ``tokenizer`` (the formatter's
      description, free-form); ``lora`` {r, alpha, target_modules, params: name -> shape,
      num_params, init_seed (the seed of a fresh, untrained LoRA; null with checkpoints)};
      ``gradient_type`` (e.g. ``"adam"`` or ``"sgd"``);
    - ``checkpoints`` [{name, path, weight, learning_rate, adapter_sha256, optimizer_sha256}], in
      the order of the index's vector blocks;
    - ``projection`` (``ProjectionSpec.to_dict()``: kind, dim, seed, version);
    - ``features`` {dim (= k), dtype = "float16", normalized};
    - ``index`` {file, kind, factory, metric = "inner_product", dim (= k · checkpoints),
      ntotal (= N)} or null; ``kind`` is one of ``flat``, ``sq16``, ``ivf``, ``ivf-ondisk``,
      ``hnsw`` (see ``gradstore.indexer.faiss_index``);
    - ``counts`` {examples (= N), by_source: source -> examples, skipped, truncated};
    - ``extras`` (optional; absent in stores written before extras existed, which hold none):
      {representations: {dim (= hidden), dtype = "float16", normalized, pooling =
      ``"position-weighted-mean"``, checkpoint (the checkpoint whose model gives them: the first)}
      or null, gradient_spectra (bool: the features files have ``nuclear_norm`` and
      ``effective_rank``), vog (bool: the examples files have ``vog``)}. It is derived from the
      shards' done markers, which must agree;
    - ``tokens`` (token statistics, free-form); ``job`` (wall time, throughput, world size, ...);
    - ``shards`` {size (nominal rows per shard), count};
    - ``files``: relative path -> {bytes, sha256} for every file of the store but the manifest.

    A reader refuses a ``schema_version`` it does not know. Changes that old readers could
    misread bump ``SCHEMA_VERSION``.

How a store is written
======================

The indexing job writes into a private work directory, then publishes it in one rename:

1. :func:`write_shard` writes a shard's examples and feature files (Parquet and, unless turned off,
   raw ``.npy``; each to a temporary file and renamed into place), then the done marker
   ``_shards/part-XXXXX.done`` (JSON: rows range and
   counts) last. A shard is complete exactly when its marker exists (:func:`completed_shards`), so
   a job killed at any point resumes by rewriting the shards without markers. Workers may write
   different shards of one work directory concurrently.
2. :func:`finalize_store` checks that the markers cover shards ``0..count-1`` and rows
   ``0..N-1``, builds ``index.faiss`` by streaming the shards (for ``ivf-ondisk``, writing
   ``index.ivfdata`` first, from per-part lists files merged on disk), checksums every file, removes
   ``_shards`` and writes ``manifest.json`` last. It is idempotent: rerun after a crash it gives
   the same files, checksums and manifest.
3. :func:`publish_store` renames the work directory to its final path (atomically replacing an
   older store when asked to).

A write that fails (a full disk, a file size limit, a read-only folder) raises :class:`StoreError`
naming the file, after removing its temporary file; what was complete before stays complete, so
the job can be rerun to resume once the cause is fixed.

:class:`Datastore` opens a published store and reads it without loading the features whole.
"""

from __future__ import annotations

import bisect
import glob
import hashlib
import json
import mmap
import os
import re
import shutil
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from .. import __version__
from .errors import FeatureNotStoredError, StoreError
from .extras import POOLING
from .faiss_index import (
    ONDISK_KIND,
    build_index,
    build_ondisk_ivf,
    choose_factory,
    concat_weighted,
    lists_path,
    normalized_weights,
    read_index,
    train_sample_size,
    trained_index,
)

SCHEMA_VERSION = 1
FORMAT = "gradstore-datastore"
MANIFEST_FILE = "manifest.json"
INDEX_FILE = "index.faiss"
SKIPPED_FILE = "skipped.jsonl"
EXAMPLES_DIR = "examples"
FEATURES_DIR = "features"
RAW_FEATURES_DIR = "raw_features"
REPRESENTATIONS_DIR = "representations"
RAW_REPRESENTATIONS_DIR = "raw_representations"
# Target-free quality scores a store may hold, each one float per example (``Datastore.scores``);
# the first five are per checkpoint (columns of the features files), ``vog`` per example.
SCORE_NAMES = ("loss", "grad_norm", "feature_norm", "nuclear_norm", "effective_rank", "vog")
SPECTRA_SCORES = ("nuclear_norm", "effective_rank")
# Work-directory bookkeeping, never part of a published store.
SHARDS_DIR = "_shards"
_TMP_DIR = "tmp"
_INDEX_STATE = "index.json"
_FINALIZE_STATE = "finalize.json"
PENDING_MANIFEST = ".manifest.json.pending"

_CHECKPOINT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_DONE_MARKER = re.compile(r"^part-(\d+)\.done$")
# Features must be unit vectors up to fp16 rounding (relative 2**-11 per entry).
_NORM_TOLERANCE = 1e-2
# Rows per feature row group: about 64 MiB of fp16, so a reader never holds more than that at once.
_FEATURE_ROW_GROUP_BYTES = 64 << 20
# Vectors per index batch: about 256 MiB of float32.
_INDEX_BATCH_BYTES = 256 << 20
_HASH_CHUNK = 8 << 20


# ----------------------------------------------------------------------------------- manifest


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
    by_source: dict[str, int]
    skipped: int
    truncated: int


class ShardInfo(_Strict):
    size: int
    count: int


class FileInfo(_Strict):
    bytes: int
    sha256: str


class Manifest(_Strict):
    """``manifest.json``; see the module docstring for the meaning of each field."""

    format: Literal["gradstore-datastore"]
    schema_version: int
    status: Literal["complete"]
    created_at: str
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
    extras: ExtrasInfo | None = None  # None: written before extras existed
    tokens: dict[str, Any]
    shards: ShardInfo
    files: dict[str, FileInfo]
    job: dict[str, Any]

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
        if sum(self.counts.by_source.values()) != self.counts.examples:
            raise ValueError(f"counts.by_source sums to {sum(self.counts.by_source.values())}, "
                             f"not counts.examples = {self.counts.examples}")
        if self.index is not None:
            expected = (self.features.dim * len(names), self.counts.examples)
            if (self.index.dim, self.index.ntotal) != expected:
                raise ValueError(f"index dim/ntotal {(self.index.dim, self.index.ntotal)} != {expected} "
                                 f"(features dim x checkpoints, examples)")
        representation = self.extras.representations if self.extras is not None else None
        if representation is not None and representation.checkpoint not in names:
            raise ValueError(f"extras.representations.checkpoint {representation.checkpoint!r} is not one of "
                             f"the checkpoints {names}")
        for relative in self.files:
            if relative.startswith("/") or ".." in Path(relative).parts:
                raise ValueError(f"files: {relative!r} is not a path inside the store")
        return self

    @property
    def weights(self) -> np.ndarray:
        """Checkpoint weights normalised to sum to 1, in checkpoint order."""
        return normalized_weights([c.weight for c in self.checkpoints])

    @classmethod
    def load(cls, path: str | Path) -> "Manifest":
        """Read and validate a manifest file (or the manifest of a store directory)."""
        path = _manifest_path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise StoreError(f"{path}: no manifest (not a datastore, or one that was never finalised)") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise StoreError(f"{path}: cannot read the manifest: {err}") from err
        if not isinstance(data, dict):
            raise StoreError(f"{path}: the manifest is not a JSON object")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise StoreError(f"{path}: schema_version {version!r} is not supported by gradstore {__version__} "
                             f"(it reads schema_version {SCHEMA_VERSION})")
        if data.get("status") != "complete":
            raise StoreError(f"{path}: status is {data.get('status')!r}, not 'complete'")
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            raise StoreError(f"{path}: invalid manifest:\n{_describe(err)}") from None

    def write(self, path: str | Path) -> None:
        """Write atomically (temporary file, fsync, rename) to a file or a store directory."""
        _atomic_write_bytes(_manifest_path(path), self.to_json().encode())

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2) + "\n"


def _manifest_path(path: str | Path) -> Path:
    path = Path(path)
    return path / MANIFEST_FILE if path.is_dir() else path


def _describe(err: ValidationError) -> str:
    return "\n".join(f"  {'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}"
                     for e in err.errors())


def check_checkpoint_name(name: str, error: type[Exception] = StoreError) -> None:
    """Checkpoint names become directory names: refuse anything that is not a plain one."""
    if not isinstance(name, str) or not _CHECKPOINT_NAME.match(name):
        raise error(f"checkpoint name {name!r} is not usable as a directory name "
                    f"(letters, digits and ._- only, not starting with . or _)")


# ------------------------------------------------------------------------------ file helpers


def shard_name(shard: int) -> str:
    """``part-00012`` for shard 12."""
    return f"part-{shard:05d}"


def examples_path(root: Path, shard: int) -> Path:
    return root / EXAMPLES_DIR / f"{shard_name(shard)}.parquet"


def features_path(root: Path, checkpoint: str, shard: int) -> Path:
    return root / FEATURES_DIR / checkpoint / f"{shard_name(shard)}.parquet"


def raw_features_path(root: Path, checkpoint: str, shard: int) -> Path:
    """The optional raw ``.npy`` copy of a features file's ``feature`` column."""
    return root / RAW_FEATURES_DIR / checkpoint / f"{shard_name(shard)}.npy"


def representations_path(root: Path, shard: int) -> Path:
    return root / REPRESENTATIONS_DIR / f"{shard_name(shard)}.parquet"


def raw_representations_path(root: Path, shard: int) -> Path:
    """The optional raw ``.npy`` copy of a representations file's ``representation`` column."""
    return root / RAW_REPRESENTATIONS_DIR / f"{shard_name(shard)}.npy"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as file:
        os.fsync(file.fileno())


def _temp_path(final: Path, tmp_dir: Path | None) -> Path:
    """A temporary name unique to this process and target, on the target's file system."""
    folder = tmp_dir if tmp_dir is not None else final.parent
    folder.mkdir(parents=True, exist_ok=True)
    tag = "-".join(final.parts[-3:])
    return folder / f".{tag}.{os.getpid()}.tmp"


def _move_into_place(tmp: Path, final: Path) -> None:
    """fsync ``tmp``, rename it over ``final`` and fsync the directory, so a crash leaves either
    the old file or the new one, never a partial one."""
    _fsync_file(tmp)
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, final)
    _fsync_dir(final.parent)


@contextmanager
def _written_atomically(final: Path, tmp_dir: Path | None = None) -> Iterator[Path]:
    """A temporary path to write ``final``'s content to; moved into place when the block ends.

    A failed write (a full disk, a file size limit, a read-only folder) removes the temporary
    file and raises a StoreError naming ``final``, so the caller learns which file could not be
    written and nothing half-written stays behind.
    """
    tmp = None
    try:
        tmp = _temp_path(final, tmp_dir)
        yield tmp
        _move_into_place(tmp, final)
    except OSError as err:
        if tmp is not None:
            with suppress(OSError):
                tmp.unlink(missing_ok=True)
        raise StoreError(f"{final}: cannot write: {os_reason(err)}") from err


def os_reason(err: OSError) -> str:
    """The system's words for an OSError (``No space left on device``), else its message."""
    return os.strerror(err.errno) if err.errno else str(err)


def _atomic_write_bytes(final: Path, data: bytes, tmp_dir: Path | None = None) -> None:
    with _written_atomically(final, tmp_dir) as tmp:
        tmp.write_bytes(data)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _file_infos(root: Path, relatives: Sequence[str]) -> dict[str, dict]:
    """``{relative: {bytes, sha256}}``, hashing files in parallel (hashlib releases the GIL)."""
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        digests = list(pool.map(lambda rel: _sha256(root / rel), relatives))
    return {rel: {"bytes": (root / rel).stat().st_size, "sha256": digest}
            for rel, digest in zip(relatives, digests)}


# ------------------------------------------------------------------------------ shard writer


def examples_schema(vog: bool = False) -> pa.Schema:
    """The examples files' columns (with ``vog`` in stores that hold it)."""
    return pa.schema([
        pa.field("row", pa.int64(), nullable=False),
        pa.field("id", pa.string(), nullable=False),
        pa.field("source", pa.string()),
        pa.field("location", pa.string()),
        pa.field("record", pa.string()),
        pa.field("num_tokens", pa.int32()),
        pa.field("num_label_tokens", pa.int32()),
        pa.field("truncated", pa.bool_()),
    ] + ([pa.field("vog", pa.float32())] if vog else []))


def features_schema(dim: int, spectra: bool = False) -> pa.Schema:
    """A features file's columns (with the gradient spectra in stores that hold them)."""
    return pa.schema([
        pa.field("row", pa.int64(), nullable=False),
        pa.field("feature", pa.list_(pa.float16(), dim), nullable=False),
        pa.field("grad_norm", pa.float32()),
        pa.field("feature_norm", pa.float32()),
        pa.field("loss", pa.float32()),
    ] + ([pa.field(name, pa.float32()) for name in SPECTRA_SCORES] if spectra else []))


def representations_schema(dim: int) -> pa.Schema:
    return pa.schema([
        pa.field("row", pa.int64(), nullable=False),
        pa.field("representation", pa.list_(pa.float16(), dim), nullable=False),
    ])


def examples_table(rows: Sequence[int], ids: Sequence[str], sources: Sequence[str],
                   locations: Sequence[str], records: Sequence[str | dict],
                   num_tokens: Sequence[int], num_label_tokens: Sequence[int],
                   truncated: Sequence[bool]) -> pa.Table:
    """The examples table of one shard from Python lists; dict records are serialised to JSON."""
    texts = [r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in records]
    columns = [rows, ids, sources, locations, texts, num_tokens, num_label_tokens, truncated]
    return pa.Table.from_arrays([pa.array(c, type=f.type) for c, f in zip(columns, examples_schema())],
                                schema=examples_schema())


@dataclass
class FeatureBatch:
    """One checkpoint's features for the rows of one shard."""

    rows: np.ndarray          # int64 (n,), the examples' rows
    feature: np.ndarray       # float16 (n, k), L2-normalised
    grad_norm: np.ndarray     # float32 (n,)
    feature_norm: np.ndarray  # float32 (n,)
    loss: np.ndarray          # float32 (n,)
    nuclear_norm: np.ndarray | None = None    # float32 (n,), with gradient spectra
    effective_rank: np.ndarray | None = None  # float32 (n,), with gradient spectra


def write_shard(work_dir: str | Path, shard: int, examples: pa.Table,
                features: dict[str, FeatureBatch], raw_features: bool = True,
                representations: np.ndarray | None = None) -> None:
    """Write shard ``shard`` of the work directory: examples, every checkpoint's features (with
    their raw ``.npy`` copy unless ``raw_features`` is false), the representation vectors when
    given (float16 ``(rows, hidden)``, L2-normalised; raw copy likewise), and the done marker
    last. Rewriting a shard (a resumed job) replaces it."""
    work_dir = Path(work_dir)
    where = f"{work_dir}: shard {shard}"
    if not isinstance(shard, (int, np.integer)) or shard < 0:
        raise StoreError(f"{work_dir}: shard number must be a non-negative integer, got {shard!r}")
    examples = _conform_examples(examples, where)
    rows = examples.column("row").to_numpy()
    _check_contiguous(rows, where)
    batches = _checked_features(features, rows, where)
    if representations is not None:
        representations = _checked_unit_matrix(representations, len(rows), f"{where}: representations")
    marker = _done_marker(work_dir, shard)
    # A shard being rewritten must not look complete until all its new files are in place.
    marker.unlink(missing_ok=True)
    tmp_dir = work_dir / SHARDS_DIR / _TMP_DIR
    _write_parquet(examples, examples_path(work_dir, shard), tmp_dir, compression="zstd")
    for name, batch in batches.items():
        _write_parquet(_features_table(batch), features_path(work_dir, name, shard), tmp_dir,
                       compression="none", use_dictionary=False,
                       row_group_size=max(1024, _FEATURE_ROW_GROUP_BYTES // (2 * batch.feature.shape[1])))
        raw_path = raw_features_path(work_dir, name, shard)
        if raw_features:
            _write_raw_features(batch.feature, raw_path, tmp_dir)
        else:
            raw_path.unlink(missing_ok=True)  # an earlier attempt's copy would no longer match
    raw_path = raw_representations_path(work_dir, shard)
    if representations is not None:
        _write_parquet(_representations_table(rows, representations), representations_path(work_dir, shard),
                       tmp_dir, compression="none", use_dictionary=False,
                       row_group_size=max(1024, _FEATURE_ROW_GROUP_BYTES // (2 * representations.shape[1])))
    else:
        representations_path(work_dir, shard).unlink(missing_ok=True)
    if representations is not None and raw_features:
        _write_raw_features(representations, raw_path, tmp_dir)
    else:
        raw_path.unlink(missing_ok=True)
    summary = _shard_summary(shard, examples, batches, representations)
    _atomic_write_bytes(marker, summary.model_dump_json().encode(), tmp_dir)


def completed_shards(work_dir: str | Path) -> set[int]:
    """Shards of the work directory that have a done marker."""
    folder = Path(work_dir) / SHARDS_DIR
    if not folder.is_dir():
        return set()
    return {int(m.group(1)) for m in map(_DONE_MARKER.match, os.listdir(folder)) if m}


def _done_marker(work_dir: Path, shard: int) -> Path:
    return work_dir / SHARDS_DIR / f"{shard_name(shard)}.done"


def _conform_examples(examples: pa.Table, where: str) -> pa.Table:
    if not isinstance(examples, pa.Table):
        raise StoreError(f"{where}: examples must be a pyarrow Table, got {type(examples).__name__}")
    schema = examples_schema(vog="vog" in examples.column_names)
    missing = [n for n in schema.names if n not in examples.column_names]
    extra = [n for n in examples.column_names if n not in schema.names]
    if missing or extra:
        raise StoreError(f"{where}: examples columns differ from the format: missing {missing}, unexpected {extra}")
    try:
        table = examples.select(schema.names).cast(schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError, ValueError) as err:
        raise StoreError(f"{where}: examples columns have the wrong types: {err}") from err
    for name in ("row", "id"):
        if table.column(name).null_count:
            raise StoreError(f"{where}: examples column {name!r} has null values")
    if "vog" in schema.names and not np.all(np.isfinite(table.column("vog").to_numpy(zero_copy_only=False))):
        raise StoreError(f"{where}: examples column 'vog' has NaN, infinite or null values")
    return table


def _check_contiguous(rows: np.ndarray, where: str) -> None:
    if len(rows) and (rows[0] < 0 or not np.array_equal(rows, np.arange(rows[0], rows[0] + len(rows)))):
        raise StoreError(f"{where}: rows must be one increasing run without gaps starting at >= 0, "
                         f"got {rows[:5].tolist()}...{rows[-1]}")


def _checked_features(features: dict[str, FeatureBatch], rows: np.ndarray, where: str) -> dict[str, FeatureBatch]:
    if not features:
        raise StoreError(f"{where}: no checkpoint features given")
    checked = {name: _checked_batch(batch, rows, f"{where}, checkpoint {name!r}")
               for name, batch in features.items()}
    for name in checked:
        check_checkpoint_name(name)
    dims = {name: batch.feature.shape[1] for name, batch in checked.items()}
    if len(set(dims.values())) != 1:
        raise StoreError(f"{where}: feature dims differ between checkpoints: {dims}")
    spectra = {name: batch.nuclear_norm is not None for name, batch in checked.items()}
    if len(set(spectra.values())) != 1:
        raise StoreError(f"{where}: some checkpoints have gradient spectra and some do not: {spectra}")
    return checked


def _checked_batch(batch: FeatureBatch, rows: np.ndarray, where: str) -> FeatureBatch:
    n = len(rows)
    batch_rows = np.asarray(batch.rows)
    if batch_rows.shape != (n,) or not np.array_equal(batch_rows, rows):
        raise StoreError(f"{where}: feature rows differ from the examples rows "
                         f"({batch_rows.shape[0] if batch_rows.ndim else 0} rows vs {n})")
    feature = batch.feature
    if not isinstance(feature, np.ndarray) or feature.dtype != np.float16:
        raise StoreError(f"{where}: feature must be a float16 numpy array, got "
                         f"{getattr(feature, 'dtype', type(feature).__name__)}")
    if feature.ndim != 2 or feature.shape[0] != n or feature.shape[1] < 1:
        raise StoreError(f"{where}: feature has shape {feature.shape}, expected ({n}, k)")
    _check_unit_rows(feature, where)
    if (batch.nuclear_norm is None) != (batch.effective_rank is None):
        raise StoreError(f"{where}: give both nuclear_norm and effective_rank, or neither")
    scalars = {}
    for name in ("grad_norm", "feature_norm", "loss") + (SPECTRA_SCORES if batch.nuclear_norm is not None else ()):
        values = np.asarray(getattr(batch, name), dtype=np.float32)
        if values.shape != (n,):
            raise StoreError(f"{where}: {name} has shape {values.shape}, expected ({n},)")
        scalars[name] = values
    return FeatureBatch(rows=rows.astype(np.int64), feature=np.ascontiguousarray(feature), **scalars)


def _checked_unit_matrix(matrix: np.ndarray, n: int, where: str) -> np.ndarray:
    if not isinstance(matrix, np.ndarray) or matrix.dtype != np.float16:
        raise StoreError(f"{where} must be a float16 numpy array, got {getattr(matrix, 'dtype', type(matrix).__name__)}")
    if matrix.ndim != 2 or matrix.shape[0] != n or matrix.shape[1] < 1:
        raise StoreError(f"{where} have shape {matrix.shape}, expected ({n}, hidden)")
    _check_unit_rows(matrix, where)
    return np.ascontiguousarray(matrix)


def _check_unit_rows(feature: np.ndarray, where: str) -> None:
    """Each row must be a unit vector (or all zeros); chunked so a large shard needs little memory."""
    for start in range(0, len(feature), 4096):
        block = feature[start:start + 4096].astype(np.float32)
        if not np.all(np.isfinite(block)):
            raise StoreError(f"{where}: feature has NaN or infinite values near row offset {start}")
        norms = np.sqrt(np.einsum("ij,ij->i", block, block))
        bad = np.flatnonzero((np.abs(norms - 1) > _NORM_TOLERANCE) & (norms != 0))
        if len(bad):
            raise StoreError(f"{where}: feature at row offset {start + bad[0]} has norm {norms[bad[0]]:.4f}; "
                             f"features must be L2-normalised")


def _features_table(batch: FeatureBatch) -> pa.Table:
    dim = batch.feature.shape[1]
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(batch.feature.reshape(-1), type=pa.float16()), dim)
    columns = [pa.array(batch.rows, pa.int64()), vectors, pa.array(batch.grad_norm),
               pa.array(batch.feature_norm), pa.array(batch.loss)]
    spectra = batch.nuclear_norm is not None
    if spectra:
        columns += [pa.array(batch.nuclear_norm), pa.array(batch.effective_rank)]
    return pa.Table.from_arrays(columns, schema=features_schema(dim, spectra))


def _representations_table(rows: np.ndarray, representations: np.ndarray) -> pa.Table:
    dim = representations.shape[1]
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(representations.reshape(-1), type=pa.float16()), dim)
    return pa.Table.from_arrays([pa.array(rows, pa.int64()), vectors], schema=representations_schema(dim))


def _write_raw_features(feature: np.ndarray, final: Path, tmp_dir: Path) -> None:
    """``feature`` as a little-endian, row-major float16 ``.npy`` file."""
    with _written_atomically(final, tmp_dir) as tmp, open(tmp, "wb") as file:
        np.lib.format.write_array(file, np.ascontiguousarray(feature, dtype="<f2"), version=(1, 0),
                                  allow_pickle=False)


def _write_parquet(table: pa.Table, final: Path, tmp_dir: Path, **options) -> None:
    with _written_atomically(final, tmp_dir) as tmp:
        pq.write_table(table, tmp, **options)


class _ShardDone(_Strict):
    """Content of a done marker."""

    shard: int
    num_rows: int
    row_start: int
    row_stop: int
    dim: int
    checkpoints: list[str]
    by_source: dict[str, int]
    truncated: int
    # What the shard holds besides the features (markers written before these existed hold none).
    representation_dim: int | None = None
    gradient_spectra: bool = False
    vog: bool = False


def _shard_summary(shard: int, examples: pa.Table, batches: dict[str, FeatureBatch],
                   representations: np.ndarray | None) -> _ShardDone:
    rows = examples.column("row").to_numpy()
    start = int(rows[0]) if len(rows) else 0
    sources = Counter(examples.column("source").to_pylist())
    first = next(iter(batches.values()))
    return _ShardDone(shard=shard, num_rows=len(rows), row_start=start, row_stop=start + len(rows),
                      dim=first.feature.shape[1], checkpoints=sorted(batches),
                      by_source={str(s): c for s, c in sorted(sources.items(), key=lambda i: str(i[0]))},
                      truncated=int(pc.sum(examples.column("truncated")).as_py() or 0),
                      representation_dim=None if representations is None else representations.shape[1],
                      gradient_spectra=first.nuclear_norm is not None, vog="vog" in examples.column_names)


# --------------------------------------------------------------------------------- finaliser


def finalize_store(work_dir: str | Path, manifest_fields: dict, index_kind: str = "auto",
                   index_memory_budget: int = 4 << 30, *, expected_shards: int | None = None) -> Manifest:
    """Turn a work directory whose shards are all written into a complete store.

    ``manifest_fields`` gives what only the job knows: ``model``, ``tokenizer``, ``lora``,
    ``checkpoints``, ``gradient_type``, ``projection``, ``tokens``, ``job``, and optionally
    ``created_at``, ``counts.skipped`` (default: lines of ``skipped.jsonl``) and ``shards.size``
    (default: the largest shard). Everything else is derived from the shards; a derived field
    the caller also passes must agree. ``expected_shards``, when given, is the number of shards
    the job meant to write (otherwise the highest marker decides, which cannot notice missing
    trailing shards).

    A finalise that got as far as its manifest is completed, not redone; an earlier one that
    stopped before reuses its index and creation time, so the result is the same either way.
    """
    work_dir = Path(work_dir)
    finished = _resume_commit(work_dir)
    if finished is not None:
        return finished
    markers = _read_markers(work_dir)
    count = _check_coverage(work_dir, markers, expected_shards)
    draft = _draft_manifest(work_dir, manifest_fields, markers, count, index_kind, index_memory_budget)
    _check_shard_files(work_dir, draft, markers)
    _ensure_index(work_dir, draft, index_memory_budget)
    files = _file_infos(work_dir, _store_files(work_dir))
    manifest = _validated_manifest({**draft.model_dump(mode="json"), "files": files}, work_dir)
    _commit_manifest(work_dir, manifest)
    return manifest


def _resume_commit(work_dir: Path) -> Manifest | None:
    """Finish a finalise that already wrote its manifest (pending or final); None if none did."""
    final, pending = work_dir / MANIFEST_FILE, work_dir / PENDING_MANIFEST
    if final.exists():
        shutil.rmtree(work_dir / SHARDS_DIR, ignore_errors=True)
        pending.unlink(missing_ok=True)
        return Manifest.load(final)
    if pending.exists():
        manifest = Manifest.load(pending)
        _commit_manifest(work_dir, manifest)
        return manifest
    if not (work_dir / SHARDS_DIR).is_dir():
        raise StoreError(f"{work_dir}: no {SHARDS_DIR}/ folder and no manifest: not a work directory "
                         f"with written shards")
    return None


def _commit_manifest(work_dir: Path, manifest: Manifest) -> None:
    """Pending manifest, then drop the bookkeeping, then rename: manifest.json appears last,
    and a crash in between leaves the pending manifest for the next run to commit."""
    pending = work_dir / PENDING_MANIFEST
    if not pending.exists() or Manifest.load(pending) != manifest:
        # The temporary file goes into _shards/, so a crash cannot leave it among the store's files.
        _atomic_write_bytes(pending, manifest.to_json().encode(), work_dir / SHARDS_DIR / _TMP_DIR)
    shutil.rmtree(work_dir / SHARDS_DIR, ignore_errors=True)
    os.replace(pending, work_dir / MANIFEST_FILE)
    _fsync_dir(work_dir)


def _read_markers(work_dir: Path) -> dict[int, _ShardDone]:
    markers = {}
    for shard in sorted(completed_shards(work_dir)):
        path = _done_marker(work_dir, shard)
        try:
            marker = _ShardDone.model_validate_json(path.read_bytes())
        except (OSError, ValidationError) as err:
            raise StoreError(f"{path}: unreadable done marker ({err}); delete it and rerun the job") from None
        if marker.shard != shard:
            raise StoreError(f"{path}: done marker names shard {marker.shard}")
        markers[shard] = marker
    if not markers:
        raise StoreError(f"{work_dir}: no completed shards in {SHARDS_DIR}/")
    return markers


def _check_coverage(work_dir: Path, markers: dict[int, _ShardDone], expected_shards: int | None) -> int:
    """Markers must cover shards 0..count-1 and rows 0..N-1 in order; returns count."""
    count = expected_shards if expected_shards is not None else max(markers) + 1
    missing = [s for s in range(count) if s not in markers]
    if missing:
        raise StoreError(f"{work_dir}: shard {missing[0]} ({shard_name(missing[0])}) has no done marker "
                         f"({len(missing)} of {count} shards missing); rerun the job to write it")
    if max(markers) >= count:
        raise StoreError(f"{work_dir}: shard {max(markers)} is done but only {count} shards were expected")
    next_row = 0
    for shard in range(count):
        marker = markers[shard]
        if marker.num_rows and marker.row_start != next_row:
            problem = "gap" if marker.row_start > next_row else "overlap"
            raise StoreError(f"{work_dir}: shard {shard} ({shard_name(shard)}) starts at row {marker.row_start} "
                             f"but the shards before it end at row {next_row} ({problem})")
        next_row = marker.row_stop if marker.num_rows else next_row
    return count


def _draft_manifest(work_dir: Path, fields: dict, markers: dict[int, _ShardDone], count: int,
                    index_kind: str, budget: int) -> Manifest:
    """The manifest without ``files``, validated before any expensive work."""
    fields = json.loads(json.dumps(fields))  # a deep copy that also rejects non-JSON values
    dims = {m.dim for m in markers.values()}
    if len(dims) != 1:
        raise StoreError(f"{work_dir}: shards disagree on the feature dim: {sorted(dims)}")
    dim = dims.pop()
    num_checkpoints = len(fields.get("checkpoints") or [])
    num_examples = sum(m.num_rows for m in markers.values())
    kind, factory = choose_factory(index_kind, num_examples, dim * num_checkpoints, budget)
    by_source = Counter()
    for marker in markers.values():
        by_source.update(marker.by_source)
    held = {(m.representation_dim, m.gradient_spectra, m.vog) for m in markers.values()}
    if len(held) != 1:
        raise StoreError(f"{work_dir}: shards disagree on the extras they hold (representation dim, gradient "
                         f"spectra, vog): {sorted(held, key=str)}; rerun the job with --restart")
    representation_dim, spectra, vog = held.pop()
    checkpoints = fields.get("checkpoints") or [{}]
    extras = {"representations": None if representation_dim is None else {
                  "dim": representation_dim, "dtype": "float16", "normalized": True, "pooling": POOLING,
                  "checkpoint": checkpoints[0].get("name")},
              "gradient_spectra": spectra, "vog": vog}
    fields.setdefault("created_at", _creation_time(work_dir))
    if isinstance(fields.get("counts", {}), dict):
        fields.setdefault("counts", {}).setdefault("skipped", _count_lines(work_dir / SKIPPED_FILE))
    if isinstance(fields.get("shards", {}), dict):
        fields.setdefault("shards", {}).setdefault("size", max(m.num_rows for m in markers.values()))
    derived = {
        "format": FORMAT, "schema_version": SCHEMA_VERSION, "status": "complete",
        "gradstore_version": __version__,
        "features": {"dim": dim, "dtype": "float16", "normalized": True},
        "index": None if kind == "none" else {
            "file": INDEX_FILE, "kind": kind, "factory": factory, "metric": "inner_product",
            "dim": dim * num_checkpoints, "ntotal": num_examples},
        "counts": {"examples": num_examples, "by_source": dict(sorted(by_source.items())),
                   "truncated": sum(m.truncated for m in markers.values())},
        "extras": extras,
        "shards": {"count": count},
        "files": {},
    }
    return _validated_manifest(_merge_derived(fields, derived, work_dir), work_dir)


def _merge_derived(given: dict, derived: dict, work_dir: Path, prefix: str = "") -> dict:
    merged = dict(given)
    for key, value in derived.items():
        if key not in given:
            merged[key] = value
        elif isinstance(value, dict) and isinstance(given[key], dict) and value:
            merged[key] = _merge_derived(given[key], value, work_dir, f"{prefix}{key}.")
        elif given[key] != value:
            raise StoreError(f"{work_dir}: manifest field {prefix}{key} = {given[key]!r} disagrees with "
                             f"{value!r} found in the shards")
    return merged


def _validated_manifest(data: dict, work_dir: Path) -> Manifest:
    try:
        return Manifest.model_validate(data)
    except ValidationError as err:
        raise StoreError(f"{work_dir}: the manifest fields are invalid:\n{_describe(err)}") from None


def _creation_time(work_dir: Path) -> str:
    """Fixed by the first finalise attempt, so a rerun writes the same manifest."""
    state = work_dir / SHARDS_DIR / _FINALIZE_STATE
    if state.exists():
        return json.loads(state.read_text())["created_at"]
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    _atomic_write_bytes(state, json.dumps({"created_at": created}).encode(), work_dir / SHARDS_DIR / _TMP_DIR)
    return created


def _count_lines(path: Path) -> int:
    if not path.exists():
        return 0
    with open(path, "rb") as file:
        return sum(1 for line in file if line.strip())


def _check_shard_files(work_dir: Path, manifest: Manifest, markers: dict[int, _ShardDone]) -> None:
    """Every marker's files exist with its row count, and no other shard file lies around."""
    names = [c.name for c in manifest.checkpoints]
    representation = manifest.extras.representations if manifest.extras is not None else None
    expected, raw = {}, {}
    for shard, marker in markers.items():
        if sorted(marker.checkpoints) != sorted(names):
            raise StoreError(f"{work_dir}: shard {shard} has checkpoints {marker.checkpoints}, "
                             f"the manifest lists {names}")
        expected[examples_path(work_dir, shard)] = marker.num_rows
        for name in names:
            expected[features_path(work_dir, name, shard)] = marker.num_rows
            raw[raw_features_path(work_dir, name, shard)] = (marker.num_rows, manifest.features.dim)
        if representation is not None:
            expected[representations_path(work_dir, shard)] = marker.num_rows
            raw[raw_representations_path(work_dir, shard)] = (marker.num_rows, representation.dim)
    for path, num_rows in expected.items():
        try:
            found = pq.read_metadata(path).num_rows
        except (OSError, pa.ArrowException) as err:
            raise StoreError(f"{path}: missing or unreadable shard file ({err})") from None
        if found != num_rows:
            raise StoreError(f"{path}: {found} rows, its done marker says {num_rows}")
    present = {p for folder in (EXAMPLES_DIR, FEATURES_DIR, RAW_FEATURES_DIR, REPRESENTATIONS_DIR,
                                RAW_REPRESENTATIONS_DIR)
               for p in (work_dir / folder).rglob("*") if p.is_file()}
    for path in present & set(raw):  # raw copies are optional; those present must fit their shard
        map_raw_features(path, *raw[path])
    stray = sorted(present - set(expected) - set(raw))
    if stray:
        raise StoreError(f"{stray[0]}: not part of any completed shard (a shard without its done marker, "
                         f"or a checkpoint the manifest does not list); remove it or rerun that shard")


def _ensure_index(work_dir: Path, manifest: Manifest, budget: int) -> None:
    """Build ``index.faiss`` (and ``index.ivfdata`` for ivf-ondisk) unless an earlier attempt
    already built this very index."""
    index_path, lists_file = work_dir / INDEX_FILE, lists_path(work_dir / INDEX_FILE)
    on_disk = manifest.index is not None and manifest.index.kind == ONDISK_KIND
    if not on_disk:  # left by an earlier attempt with another index kind
        lists_file.unlink(missing_ok=True)
    if manifest.index is None:
        index_path.unlink(missing_ok=True)
        return
    state = work_dir / SHARDS_DIR / _INDEX_STATE
    wanted = manifest.index.model_dump()
    built = index_path.exists() and (lists_file.exists() or not on_disk)
    if built and state.exists() and json.loads(state.read_text()) == wanted:
        return
    state.unlink(missing_ok=True)
    tmp_dir = work_dir / SHARDS_DIR / _TMP_DIR
    if on_disk:
        index = _build_ondisk_store_index(work_dir, manifest, budget, lists_file, tmp_dir)
    else:
        index = _build_store_index(work_dir, manifest, budget)
    with _written_atomically(index_path, tmp_dir) as tmp:
        _write_faiss_index(index, tmp)
    _atomic_write_bytes(state, json.dumps(wanted).encode(), tmp_dir)


# faiss reports a failed write as a RuntimeError ending in "(<the system's reason>)".
_FAISS_WRITE_ERROR = re.compile(r"write error in .*\(([^()]+)\)\s*$", re.DOTALL)


def _write_faiss_index(index: faiss.Index, path: Path) -> None:
    """``faiss.write_index``, with a failed write raised as the OSError it is."""
    try:
        faiss.write_index(index, str(path))
    except RuntimeError as err:
        match = _FAISS_WRITE_ERROR.search(str(err))
        if match is None:
            raise
        raise OSError(match.group(1)) from err


def _build_store_index(work_dir: Path, manifest: Manifest, budget: int) -> faiss.Index:
    info = manifest.index
    batch_rows = max(1, _INDEX_BATCH_BYTES // (4 * info.dim))
    sample_size = train_sample_size(info.factory, info.ntotal, info.dim, budget)
    sample = _training_sample(work_dir, manifest, sample_size, batch_rows) if sample_size else None
    vectors = (v for _, v in _weighted_vectors(work_dir, manifest, batch_rows))
    index = build_index(vectors, info.factory, info.dim, sample)
    if index.ntotal != info.ntotal:
        raise StoreError(f"{work_dir}: index holds {index.ntotal} vectors, the shards {info.ntotal}")
    return index


def _build_ondisk_store_index(work_dir: Path, manifest: Manifest, budget: int, lists_file: Path,
                              tmp_dir: Path) -> faiss.Index:
    """Write ``lists_file`` into place and return the index (quantizer and list offsets) that
    refers to it; memory stays within about ``budget`` plus one batch and the quantizer."""
    info = manifest.index
    batch_rows = max(1, _INDEX_BATCH_BYTES // (4 * info.dim))
    sample_size = train_sample_size(info.factory, info.ntotal, info.dim, budget)
    # The sample is dropped once trained on, so it never sits in memory beside a part.
    index = trained_index(info.factory, info.dim, _training_sample(work_dir, manifest, sample_size, batch_rows))
    _check_free_space(work_dir, info.ntotal * (faiss.extract_index_ivf(index).code_size + 8))
    parts_dir = tmp_dir / "ivf-parts"
    parts_dir.mkdir(parents=True, exist_ok=True)
    rows_and_vectors = _weighted_vectors(work_dir, manifest, batch_rows)
    with _written_atomically(lists_file, tmp_dir) as tmp:
        build_ondisk_ivf(rows_and_vectors, index, tmp, lists_file.name, parts_dir, max(1, budget // 2))
    if index.ntotal != info.ntotal:
        raise StoreError(f"{work_dir}: index holds {index.ntotal} vectors, the shards {info.ntotal}")
    return index


def _check_free_space(work_dir: Path, lists_bytes: int) -> None:
    """The on-disk build needs room for its parts and their merge at once; FAISS writes both
    through memory maps, where a full disk kills the process (SIGBUS) instead of raising."""
    needed, free = 2 * lists_bytes, shutil.disk_usage(work_dir).free
    if free < needed:
        raise StoreError(f"{work_dir}: the ivf-ondisk index needs about {needed:,} bytes free "
                         f"to build, only {free:,} are")


def _weighted_vectors(work_dir: Path, manifest: Manifest, batch_rows: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(rows, concat_weighted vectors)`` batches over all shards in row order."""
    names, weights = [c.name for c in manifest.checkpoints], manifest.weights
    for shard in range(manifest.shards.count):
        streams = [_iter_feature_file(features_path(work_dir, name, shard), batch_rows) for name in names]
        for parts in zip(*streams, strict=True):
            rows = parts[0][0]
            for name, (other_rows, _) in zip(names, parts):
                if not np.array_equal(rows, other_rows):
                    raise StoreError(f"{features_path(work_dir, name, shard)}: rows differ from those of "
                                     f"checkpoint {names[0]!r}")
            yield rows, concat_weighted([feature for _, feature in parts], weights)


def _training_sample(work_dir: Path, manifest: Manifest, size: int, batch_rows: int) -> np.ndarray:
    """``size`` vectors at seeded random rows, gathered in one streaming pass."""
    chosen = np.sort(np.random.default_rng(0).choice(manifest.counts.examples, size=size, replace=False))
    sample = np.empty((size, manifest.index.dim), dtype=np.float32)
    filled = 0
    for rows, vectors in _weighted_vectors(work_dir, manifest, batch_rows):
        if len(rows) == 0:
            continue
        lo, hi = np.searchsorted(chosen, [rows[0], rows[-1] + 1])
        sample[filled:filled + hi - lo] = vectors[chosen[lo:hi] - rows[0]]
        filled += hi - lo
    return sample[:filled]


def _store_files(root: Path) -> list[str]:
    """Relative paths of every file of the store (not the manifest, not the bookkeeping)."""
    skip = {MANIFEST_FILE, PENDING_MANIFEST}
    files = []
    for path in root.rglob("*"):
        relative = path.relative_to(root)
        if path.is_file() and relative.parts[0] != SHARDS_DIR and str(relative) not in skip:
            files.append(relative.as_posix())
    return sorted(files)


# ------------------------------------------------------------------------------- publication


def publish_store(work_dir: str | Path, out: str | Path, overwrite: bool) -> None:
    """Move a finalised work directory to ``out`` with renames (same file system required).

    When ``out`` exists and ``overwrite`` is set, the old store is renamed to a hidden sibling,
    the new one renamed to ``out``, then the old one deleted. Between the two renames (a few
    microseconds) ``out`` does not exist and an open fails; a reader that opened the old store
    must reopen it afterwards, as its files are gone. Only a datastore or an empty directory is
    ever replaced. Old stores left in hidden siblings by a process killed between the two renames
    are deleted once a new store is in place.
    """
    work_dir, out = Path(work_dir), Path(out)
    Manifest.load(work_dir / MANIFEST_FILE)  # only finalised stores are published
    if work_dir.resolve() == out.resolve():
        raise StoreError(f"{out}: the work directory is already the output path")
    out.parent.mkdir(parents=True, exist_ok=True)
    if not os.path.lexists(out):
        _rename(work_dir, out)
        _remove_replaced(out)
        return
    if not overwrite:
        raise StoreError(f"{out}: already exists; pass overwrite to replace it")
    if not (out.is_dir() and not out.is_symlink() and ((out / MANIFEST_FILE).exists() or not any(out.iterdir()))):
        raise StoreError(f"{out}: exists and is not a gradstore datastore; refusing to replace it")
    old = out.parent / f".{out.name}.replaced-{os.getpid()}-{time.time_ns()}"
    _rename(out, old)
    try:
        _rename(work_dir, out)
    except StoreError:
        os.rename(old, out)
        raise
    shutil.rmtree(old)
    _remove_replaced(out)


def _remove_replaced(out: Path) -> None:
    """Delete the old stores an interrupted ``overwrite`` left beside ``out`` (``.NAME.replaced-*``)."""
    for leftover in out.parent.glob(f".{glob.escape(out.name)}.replaced-*"):
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)


def _rename(source: Path, target: Path) -> None:
    try:
        os.rename(source, target)
    except OSError as err:
        raise StoreError(f"cannot rename {source} to {target}: {err} (the work directory must be on "
                         f"the same file system as the output)") from err
    _fsync_dir(target.parent)


# ------------------------------------------------------------------------------------ reader


class ExampleNotFoundError(StoreError, KeyError):
    """No example with this id (or row) in the store."""

    def __str__(self) -> str:
        return str(self.args[0])


def _iter_feature_file(path: Path, batch_rows: int, column: str = "feature") -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(rows, float16 (n, k))`` batches of one features (or representations) file's vector
    ``column``, memory-mapped."""
    try:
        parquet = pq.ParquetFile(path, memory_map=True)
    except (OSError, pa.ArrowException) as err:
        raise StoreError(f"{path}: cannot read {column}s file ({err})") from None
    dim = parquet.schema_arrow.field(column).type.list_size
    for batch in parquet.iter_batches(batch_size=batch_rows, columns=["row", column]):
        rows = batch.column(0).to_numpy()
        yield rows, batch.column(1).flatten().to_numpy().reshape(len(rows), dim)


def raw_features_offset(path: Path, num_rows: int, dim: int) -> int:
    """Where a raw features file's matrix begins, once its ``.npy`` header is checked to say
    row-major ``<f2`` ``(num_rows, dim)``."""
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    try:
        with open(path, "rb") as file:
            version = np.lib.format.read_magic(file)
            if version not in readers:
                raise ValueError(f".npy format version {version} (1.0 or 2.0 expected)")
            shape, fortran_order, dtype = readers[version](file)
            offset = file.tell()
    except (OSError, ValueError) as err:
        raise StoreError(f"{path}: cannot read raw features file ({err})") from None
    if dtype != np.dtype("<f2") or shape != (num_rows, dim) or fortran_order:
        order = "column-major" if fortran_order else "row-major"
        raise StoreError(f"{path}: raw features file holds {order} {dtype.str} {shape}, expected "
                         f"row-major <f2 {(num_rows, dim)} (the shard's rows x the store's dimension)")
    return offset


def map_raw_features(path: Path, num_rows: int, dim: int, writable: bool = False,
                     offset: int | None = None) -> np.ndarray:
    """A raw features file memory-mapped: float16 ``(num_rows, dim)``, row-major; read-only, or
    copy-on-write with ``writable`` (writes stay in this process, the file never changes).

    ``offset`` is where the matrix begins, from an earlier :func:`raw_features_offset` of the same
    file (parsing the header costs more than mapping the file); None checks the header now.
    """
    if offset is None:
        offset = raw_features_offset(path, num_rows, dim)
    try:
        with open(path, "rb") as file:
            mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY if writable else mmap.ACCESS_READ)
    except (OSError, ValueError) as err:
        raise StoreError(f"{path}: cannot read raw features file ({err})") from None
    if len(mapped) != offset + 2 * num_rows * dim:
        raise StoreError(f"{path}: raw features file has {len(mapped)} bytes, its header says "
                         f"{offset + 2 * num_rows * dim} (truncated or extended)")
    return np.frombuffer(mapped, dtype="<f2", count=num_rows * dim, offset=offset).reshape(num_rows, dim)


class Datastore:
    """A published store, opened read-only. Features are streamed, never loaded whole."""

    def __init__(self, path: Path, manifest: Manifest):
        self.path = path
        self.manifest = manifest
        self._row_by_id: dict[str, int] | None = None
        self._shard_starts: list[int] | None = None
        self._shard_sizes: list[int] | None = None
        # Where each raw features file's matrix begins, once its header was checked.
        self._raw_offsets: dict[tuple[str, int], int] = {}
        # Columns kept once read (ids, source codes), for gathers; readers share a store.
        self._cache_lock = threading.Lock()
        self._ids: np.ndarray | None = None
        self._source_codes: np.ndarray | None = None
        self._source_names: list[str] | None = None

    @classmethod
    def open(cls, path: str | Path, verify: bool = False) -> "Datastore":
        """Open ``path``, checking every listed file's size (and sha256 with ``verify``)."""
        path = Path(path)
        if not path.is_dir():
            raise StoreError(f"{path}: no datastore here (directory missing)")
        manifest = Manifest.load(path / MANIFEST_FILE)
        _check_listed_files(path, manifest, verify)
        return cls(path, manifest)

    def __repr__(self) -> str:
        return f"Datastore({str(self.path)!r}, examples={self.num_examples}, checkpoints={self.checkpoint_names})"

    @property
    def num_examples(self) -> int:
        return self.manifest.counts.examples

    @property
    def dim(self) -> int:
        """Feature dims per checkpoint (k)."""
        return self.manifest.features.dim

    @property
    def checkpoint_names(self) -> list[str]:
        return [c.name for c in self.manifest.checkpoints]

    @property
    def weights(self) -> np.ndarray:
        return self.manifest.weights

    def examples(self, columns: Sequence[str] | None = None) -> pa.Table:
        """All examples in row order (only ``columns`` if given)."""
        tables = [pq.read_table(examples_path(self.path, s), columns=columns, memory_map=True)
                  for s in range(self.manifest.shards.count)]
        return pa.concat_tables(tables)

    def example(self, row: int) -> dict:
        """One example's columns (``record`` is the JSON text of the original record)."""
        if not 0 <= row < self.num_examples:
            raise ExampleNotFoundError(f"{self.path}: row {row} is out of range (0..{self.num_examples - 1})")
        starts = self._starts()
        shard = bisect.bisect_right(starts, row) - 1
        table = pq.read_table(examples_path(self.path, shard), memory_map=True)
        example = table.slice(row - starts[shard], 1).to_pylist()[0]
        if example["row"] != row:
            raise StoreError(f"{examples_path(self.path, shard)}: expected row {row}, found {example['row']}")
        return example

    def row_of(self, id: str) -> int:
        """The row of the example with this id (a lookup table is built on first use)."""
        if self._row_by_id is None:
            table = self.examples(columns=["id", "row"])
            ids, rows = table.column("id").to_pylist(), table.column("row").to_pylist()
            # Reversed, so the first occurrence wins should an id repeat.
            self._row_by_id = dict(zip(reversed(ids), reversed(rows)))
        try:
            return self._row_by_id[id]
        except KeyError:
            raise ExampleNotFoundError(f"{self.path}: no example with id {id!r}") from None

    # -- gathers: the columns of given rows, in the given order -------------------------------

    def ids(self) -> np.ndarray:
        """Every example's id in row order (object array; read once, then kept)."""
        with self._cache_lock:
            if self._ids is None:
                self._ids = np.array(self.examples(columns=["id"]).column("id").to_pylist(), dtype=object)
            return self._ids

    def source_codes(self) -> tuple[np.ndarray, list[str]]:
        """Every example's source as an int32 code in row order, and the names the codes index."""
        with self._cache_lock:
            if self._source_codes is None:
                encoded = self.examples(columns=["source"]).column("source").combine_chunks().dictionary_encode()
                self._source_codes = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int32)
                self._source_names = [str(s) for s in encoded.dictionary.to_pylist()]
            return self._source_codes, self._source_names

    def ids_and_sources(self, rows: Sequence[int] | np.ndarray) -> tuple[list[str], list[str]]:
        """The ids and source names of ``rows``, in the given order."""
        rows = self._checked_rows(rows)
        codes, names = self.source_codes()
        return self.ids()[rows].tolist(), [names[c] for c in codes[rows]]

    def features_at(self, checkpoint: str, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """float16 ``(len(rows), k)``: one checkpoint's features of ``rows``, in the given order.

        Gathered from the raw files' memory maps where the store has them; otherwise only the
        Parquet row groups holding the rows are read (memory-mapped).
        """
        self._check_checkpoint(checkpoint)
        rows = self._checked_rows(rows)
        out = np.empty((len(rows), self.dim), dtype=np.float16)
        for shard, where, local in self._by_shard(rows):
            raw = self.raw_features(checkpoint, shard)
            if raw is not None:
                out[where] = raw[local]
                continue
            path = features_path(self.path, checkpoint, shard)
            table, index = _read_row_groups_of(path, local, ["row", "feature"])
            if not np.array_equal(table.column("row").to_numpy()[index], rows[where]):
                raise StoreError(f"{path}: rows are not where the shard layout puts them")
            feature = table.column("feature").combine_chunks().flatten().to_numpy().reshape(-1, self.dim)
            out[where] = feature[index]
        return out

    def records_at(self, rows: Sequence[int] | np.ndarray) -> list[str]:
        """The stored JSON text of the records of ``rows``, in the given order."""
        rows = self._checked_rows(rows)
        texts: list[str | None] = [None] * len(rows)
        for shard, where, local in self._by_shard(rows):
            path = examples_path(self.path, shard)
            table = pq.read_table(path, columns=["row", "record"], memory_map=True)
            if not np.array_equal(table.column("row").to_numpy()[local], rows[where]):
                raise StoreError(f"{path}: rows are not where the shard layout puts them")
            for i, text in zip(where, table.column("record").take(pa.array(local)).to_pylist()):
                texts[i] = text
        return texts

    def _checked_rows(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if len(rows) and (rows.min() < 0 or rows.max() >= self.num_examples):
            raise ValueError(f"{self.path}: rows must be in 0..{self.num_examples - 1}")
        return rows

    def _by_shard(self, rows: np.ndarray) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """``(shard, positions in rows, rows local to the shard)`` for every shard holding some."""
        starts = np.asarray(self._starts(), dtype=np.int64)
        shard_of = np.searchsorted(starts, rows, side="right") - 1
        for shard in np.unique(shard_of):
            where = np.flatnonzero(shard_of == shard)
            yield int(shard), where, rows[where] - starts[shard]

    def iter_features(self, checkpoint: str, batch_rows: int = 65536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(rows int64, features float16 (n, k))`` batches in row order, shard by shard.

        Batches hold at most ``batch_rows`` rows and never span two shards; the arrays are
        read-only (memory-mapped from the raw files where the store has them, see
        :meth:`shard_features`).
        """
        self._check_checkpoint(checkpoint)
        for shard in range(self.manifest.shards.count):
            yield from self.shard_features(checkpoint, shard, batch_rows)

    def shard_features(self, checkpoint: str, shard: int, batch_rows: int = 65536,
                       writable: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(rows, features)`` batches of one shard, as :meth:`iter_features`: slices of the raw
        file's memory map where the store has one (copy-on-write with ``writable``, see
        :meth:`raw_features`), decoded from the Parquet file otherwise (read-only)."""
        raw = self.raw_features(checkpoint, shard, writable)
        if raw is None:
            yield from _iter_feature_file(features_path(self.path, checkpoint, shard), batch_rows)
            return
        first = self._starts()[shard]
        for start in range(0, len(raw), batch_rows):
            stop = min(len(raw), start + batch_rows)
            yield np.arange(first + start, first + stop, dtype=np.int64), raw[start:stop]

    def raw_features(self, checkpoint: str, shard: int, writable: bool = False) -> np.ndarray | None:
        """One shard's features memory-mapped from its raw ``.npy`` file (float16 ``(rows, k)``),
        or None when the manifest lists no raw file for it. The map is read-only, or with
        ``writable`` copy-on-write: for libraries that want writable buffers (torch); writes stay
        in this process."""
        self._check_checkpoint(checkpoint)
        path = raw_features_path(self.path, checkpoint, shard)
        if path.relative_to(self.path).as_posix() not in self.manifest.files:
            return None
        self._starts()
        rows = self._shard_sizes[shard]
        offset = self._raw_offsets.get((checkpoint, shard))
        if offset is None:
            offset = self._raw_offsets[checkpoint, shard] = raw_features_offset(path, rows, self.dim)
        return map_raw_features(path, rows, self.dim, writable, offset)

    def features(self, checkpoint: str) -> np.ndarray:
        """All of one checkpoint's features, float16 ``(num_examples, k)`` (for small stores)."""
        out = np.empty((self.num_examples, self.dim), dtype=np.float16)
        for rows, feature in self.iter_features(checkpoint):
            out[rows] = feature
        return out

    def feature_stats(self, checkpoint: str) -> pa.Table:
        """``row``, ``grad_norm``, ``feature_norm``, ``loss`` of one checkpoint, in row order."""
        self._check_checkpoint(checkpoint)
        columns = ["row", "grad_norm", "feature_norm", "loss"]
        return pa.concat_tables([pq.read_table(features_path(self.path, checkpoint, s), columns=columns)
                                 for s in range(self.manifest.shards.count)])

    # -- representation vectors and quality scores (gradstore.indexer.extras) --------------------

    @property
    def has_representations(self) -> bool:
        return self._representation_info is not None

    @property
    def representation_dim(self) -> int | None:
        """Dimension of the representation vectors (the model's hidden size), None without them."""
        info = self._representation_info
        return None if info is None else info.dim

    def shard_representations(self, shard: int, batch_rows: int = 65536,
                              writable: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(rows int64, representations float16 (n, hidden))`` batches of one shard, as
        :meth:`shard_features` (memory-mapped from the raw file where the store has one)."""
        dim = self._require_representations()
        path = raw_representations_path(self.path, shard)
        if path.relative_to(self.path).as_posix() not in self.manifest.files:
            yield from _iter_feature_file(representations_path(self.path, shard), batch_rows, "representation")
            return
        first, rows = self._starts()[shard], self._shard_sizes[shard]
        offset = self._raw_offsets.get(("", shard))  # "" is never a checkpoint name
        if offset is None:
            offset = self._raw_offsets["", shard] = raw_features_offset(path, rows, dim)
        raw = map_raw_features(path, rows, dim, writable, offset)
        for start in range(0, len(raw), batch_rows):
            stop = min(len(raw), start + batch_rows)
            yield np.arange(first + start, first + stop, dtype=np.int64), raw[start:stop]

    def representations_at(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """The representation vectors of ``rows``, in that order: float16 ``(len(rows), hidden)``."""
        dim = self._require_representations()
        rows = self._checked_rows(rows)
        out = np.empty((len(rows), dim), dtype=np.float16)
        for shard, where, local in self._by_shard(rows):
            # One shard at a time: a memory map (or one Parquet file's column), gathered from.
            parts = [vectors for _, vectors in self.shard_representations(shard)]
            out[where] = (parts[0] if len(parts) == 1 else np.concatenate(parts))[local]
        return out

    def representations(self) -> np.ndarray:
        """Every example's representation vector, float16 ``(num_examples, hidden)`` (small stores)."""
        out = np.empty((self.num_examples, self._require_representations()), dtype=np.float16)
        for shard in range(self.manifest.shards.count):
            for rows, vectors in self.shard_representations(shard):
                out[rows] = vectors
        return out

    @property
    def score_names(self) -> list[str]:
        """The quality scores this store holds, in :data:`SCORE_NAMES` order."""
        return [name for name in SCORE_NAMES if self._missing_score(name) is None]

    def scores(self, name: str, checkpoint: str | None = None) -> np.ndarray:
        """One quality score of every example, float32 ``(num_examples,)`` in row order.

        Per-checkpoint scores (all but ``vog``) are ``checkpoint``'s, or with None the sum over
        checkpoints of the manifest's normalised weights times each checkpoint's score; ``vog`` is
        per example (``checkpoint`` must be None).
        """
        if name not in SCORE_NAMES:
            raise FeatureNotStoredError(f"{self.path}: no score {name!r} in this datastore (it has "
                                        f"{', '.join(self.score_names)}; the scores a store can hold are "
                                        f"{', '.join(SCORE_NAMES)})")
        missing = self._missing_score(name)
        if missing is not None:
            raise FeatureNotStoredError(f"{self.path}: {missing}")
        shards = range(self.manifest.shards.count)
        if name == "vog":
            if checkpoint is not None:
                raise FeatureNotStoredError(f"{self.path}: vog is one score per example across all checkpoints, "
                                            f"not per checkpoint (asked for checkpoint {checkpoint!r})")
            return self.examples(columns=["vog"]).column("vog").to_numpy().astype(np.float32)
        names = self.checkpoint_names if checkpoint is None else [checkpoint]
        weights = self.weights if checkpoint is None else np.ones(1)
        total = np.zeros(self.num_examples, dtype=np.float64)
        for weight, name_c in zip(weights, names):
            self._check_checkpoint(name_c)
            column = pa.concat_arrays([pq.read_table(features_path(self.path, name_c, s), columns=[name])
                                       .column(name).combine_chunks() for s in shards])
            total += weight * column.to_numpy(zero_copy_only=False)
        return total.astype(np.float32)

    @property
    def _representation_info(self) -> RepresentationInfo | None:
        extras = self.manifest.extras
        return None if extras is None else extras.representations

    def _require_representations(self) -> int:
        info = self._representation_info
        if info is None:
            raise FeatureNotStoredError(f"{self.path}: this store has no representation vectors "
                                        f"({self._why_not('representations', '--no-representations')})")
        return info.dim

    def _missing_score(self, name: str) -> str | None:
        """Why the store lacks score ``name`` (a sentence for the error), or None when it has it."""
        extras = self.manifest.extras
        if name in SPECTRA_SCORES and not (extras is not None and extras.gradient_spectra):
            return (f"this store has no {name} (no gradient spectra: "
                    f"{self._why_not('gradient spectra', '--no-gradient-spectra')})")
        if name == "vog" and not (extras is not None and extras.vog):
            if extras is not None and len(self.checkpoint_names) < 2:
                return ("this store has no vog: VoG is a variance across checkpoints and the store was indexed "
                        "with one; re-index with two or more (--run DIR of a warmup, or several --checkpoint)")
            return f"this store has no vog ({self._why_not('vog', '--no-vog')})"
        return None

    def _why_not(self, what: str, flag: str) -> str:
        if self.manifest.extras is None:
            return (f"it was written by a gradstore that did not compute {what}; re-index the corpus with "
                    f"`gradstore index`, which computes them by default")
        return f"it was indexed with {flag}; re-index the corpus without {flag} to add them"

    def index(self, memory_mapped: bool = True) -> faiss.Index:
        """The FAISS index (id == row), read-only with its vectors memory-mapped unless
        ``memory_mapped`` is false (an ivf-ondisk index's lists are mapped from ``index.ivfdata``
        either way); see ``gradstore.indexer.faiss_index`` for its vectors."""
        info = self.manifest.index
        if info is None:
            raise StoreError(f"{self.path}: this store has no FAISS index (index kind 'none')")
        path = self.path / info.file
        on_disk = info.kind == ONDISK_KIND
        if on_disk and not lists_path(path).is_file():
            raise StoreError(f"{lists_path(path)}: missing; the {ONDISK_KIND} index {info.file} keeps its "
                             f"inverted lists there (copy both files)")
        return read_index(path, memory_mapped, lists_on_disk=on_disk)

    def _check_checkpoint(self, checkpoint: str) -> None:
        if checkpoint not in self.checkpoint_names:
            raise StoreError(f"{self.path}: no checkpoint {checkpoint!r} (the store has {self.checkpoint_names})")

    def check_shards(self) -> None:
        """Every shard's Parquet footers parse, with the manifest's row counts and feature dimension
        (one small read per file: a damaged file is found on open, not in the middle of a query).
        Keeps the shard sizes it read for :meth:`_starts`."""
        sizes = []
        for shard in range(self.manifest.shards.count):
            rows = _footer(examples_path(self.path, shard)).num_rows
            for checkpoint in self.checkpoint_names:
                path = features_path(self.path, checkpoint, shard)
                footer = _footer(path)
                if footer.num_rows != rows:
                    raise StoreError(f"{path}: {footer.num_rows} rows, its examples file has {rows}")
                schema = footer.schema.to_arrow_schema()
                feature = schema.field("feature").type if "feature" in schema.names else None
                if getattr(feature, "list_size", None) != self.dim:
                    raise StoreError(f"{path}: feature column {feature}, the manifest says {self.dim} dimensions")
            if self.has_representations:
                path = representations_path(self.path, shard)
                footer = _footer(path)
                schema = footer.schema.to_arrow_schema()
                vector = schema.field("representation").type if "representation" in schema.names else None
                if footer.num_rows != rows or getattr(vector, "list_size", None) != self.representation_dim:
                    raise StoreError(f"{path}: {footer.num_rows} rows of {vector}, expected {rows} rows of "
                                     f"{self.representation_dim} dimensions")
            sizes.append(rows)
        if sum(sizes) != self.num_examples:
            raise StoreError(f"{self.path}: the shards hold {sum(sizes)} examples, the manifest says "
                             f"{self.num_examples}")
        self._keep_shard_sizes(sizes)

    def _starts(self) -> list[int]:
        """First row of each shard, from the parquet footers."""
        if self._shard_starts is None:
            self._keep_shard_sizes([pq.read_metadata(examples_path(self.path, s)).num_rows
                                    for s in range(self.manifest.shards.count)])
        return self._shard_starts

    def _keep_shard_sizes(self, sizes: list[int]) -> None:
        self._shard_sizes = sizes
        self._shard_starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int).tolist()


def _read_row_groups_of(path: Path, local: np.ndarray, columns: list[str]) -> tuple[pa.Table, np.ndarray]:
    """Only the row groups of the Parquet file ``path`` that hold the (shard-local) rows
    ``local``, memory-mapped, and where each of those rows is in the table read."""
    parquet = pq.ParquetFile(path, memory_map=True)
    sizes = np.array([parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)])
    group_starts = np.cumsum(sizes) - sizes
    group_of = np.searchsorted(group_starts, local, side="right") - 1
    groups = np.unique(group_of)
    # Where each group read begins in the table of just those groups.
    read_start = np.zeros(len(sizes), dtype=np.int64)
    read_start[groups] = np.cumsum(sizes[groups]) - sizes[groups]
    table = parquet.read_row_groups(groups.tolist(), columns=columns)
    return table, read_start[group_of] + (local - group_starts[group_of])


def _footer(path: Path) -> pq.FileMetaData:
    try:
        return pq.read_metadata(path)
    except (OSError, pa.ArrowException) as err:
        raise StoreError(f"{path}: unreadable Parquet file ({err})") from None


def _check_listed_files(root: Path, manifest: Manifest, verify: bool) -> None:
    required = [examples_path(root, s) for s in range(manifest.shards.count)]
    required += [features_path(root, c.name, s) for c in manifest.checkpoints for s in range(manifest.shards.count)]
    if manifest.extras is not None and manifest.extras.representations is not None:
        required += [representations_path(root, s) for s in range(manifest.shards.count)]
    if manifest.index is not None:
        required.append(root / manifest.index.file)
        if manifest.index.kind == ONDISK_KIND:
            required.append(lists_path(root / manifest.index.file))
    for path in required:
        if path.relative_to(root).as_posix() not in manifest.files:
            raise StoreError(f"{root / MANIFEST_FILE}: files does not list {path.relative_to(root).as_posix()}")
    for relative, info in manifest.files.items():
        path = root / relative
        if not path.is_file():
            raise StoreError(f"{path}: listed in the manifest but missing")
        if path.stat().st_size != info.bytes:
            raise StoreError(f"{path}: {path.stat().st_size} bytes, the manifest says {info.bytes}")
    if verify:
        found = _file_infos(root, list(manifest.files))
        for relative, info in manifest.files.items():
            if found[relative]["sha256"] != info.sha256:
                raise StoreError(f"{root / relative}: sha256 mismatch (the file is corrupt or was modified)")
