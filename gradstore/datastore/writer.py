"""The shard writer: one run's finished shards in its work directory, resumable at any point.

:func:`write_shard` writes a shard's examples, per-checkpoint scores and features, and its
representation vectors (each file atomically, see :mod:`.files`), then the done marker
``_shards/part-XXXXX.done`` (JSON: the shard's rows and what it holds) last. A shard is complete
exactly when its marker exists (:func:`completed_shards`), so a run killed at any point resumes
by rewriting the shards without markers. Workers may write different shards of one work
directory concurrently. Every value is checked before anything is written: rows contiguous,
features float16 unit rows (or zero), one dimension across checkpoints.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import StoreError
from .files import atomic_write_bytes, write_matrix, written_atomically
from .layout import CHECKPOINT_SCORES, SHARDS_DIR, SPECTRA_SCORES, TMP_DIR, SegmentFiles, check_checkpoint_name, shard_name

_NORM_TOLERANCE = 1e-2
_DONE_SUFFIX = ".done"


@dataclass
class FeatureBatch:
    """One checkpoint's features and scores for the rows of one shard."""

    rows: np.ndarray          # int64 (n,), the examples' rows
    feature: np.ndarray       # float16 (n, k), L2-normalised
    grad_norm: np.ndarray     # float32 (n,)
    feature_norm: np.ndarray  # float32 (n,)
    loss: np.ndarray          # float32 (n,)
    nuclear_norm: np.ndarray | None = None    # float32 (n,), with gradient spectra
    effective_rank: np.ndarray | None = None  # float32 (n,), with gradient spectra


class ShardDone(BaseModel):
    """Content of a done marker."""

    model_config = ConfigDict(extra="forbid")

    shard: int
    num_rows: int
    row_start: int
    row_stop: int
    dim: int
    checkpoints: list[str]
    by_source: dict[str, int]
    truncated: int
    representation_dim: int | None = None
    gradient_spectra: bool = False
    vog: bool = False


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


def scores_schema(spectra: bool = False) -> pa.Schema:
    """A scores file's columns (with the gradient spectra in stores that hold them)."""
    return pa.schema([pa.field("row", pa.int64(), nullable=False)]
                     + [pa.field(name, pa.float32()) for name in CHECKPOINT_SCORES]
                     + ([pa.field(name, pa.float32()) for name in SPECTRA_SCORES] if spectra else []))


def examples_table(rows: Sequence[int], ids: Sequence[str], sources: Sequence[str],
                   locations: Sequence[str], records: Sequence[str | dict],
                   num_tokens: Sequence[int], num_label_tokens: Sequence[int],
                   truncated: Sequence[bool]) -> pa.Table:
    """The examples table of one shard from Python lists; dict records are serialised to JSON."""
    texts = [r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in records]
    columns = [rows, ids, sources, locations, texts, num_tokens, num_label_tokens, truncated]
    return pa.Table.from_arrays([pa.array(c, type=f.type) for c, f in zip(columns, examples_schema())],
                                schema=examples_schema())


def write_shard(work_dir: str | Path, shard: int, examples: pa.Table, features: dict[str, FeatureBatch],
                representations: np.ndarray | None = None) -> None:
    """Write shard ``shard`` of the work directory: examples, every checkpoint's scores and
    features, the representation vectors when given (float16 ``(rows, hidden)``,
    L2-normalised), and the done marker last. Rewriting a shard (a resumed run) replaces it."""
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
    marker = done_marker(work_dir, shard)
    # A shard being rewritten must not look complete until all its new files are in place.
    marker.unlink(missing_ok=True)
    files, tmp_dir = SegmentFiles(work_dir), work_dir / SHARDS_DIR / TMP_DIR
    _write_parquet(examples, files.examples(shard), tmp_dir, compression="zstd")
    for name, batch in batches.items():
        _write_parquet(_scores_table(batch), files.scores(name, shard), tmp_dir, compression="none",
                       use_dictionary=False)
        write_matrix(batch.feature, files.features(name, shard), tmp_dir)
    if representations is not None:
        write_matrix(representations, files.representations(shard), tmp_dir)
    else:
        files.representations(shard).unlink(missing_ok=True)
    summary = _shard_summary(shard, examples, batches, representations)
    atomic_write_bytes(marker, summary.model_dump_json().encode(), tmp_dir)


def completed_shards(work_dir: str | Path) -> set[int]:
    """Shards of the work directory that have a done marker."""
    folder = Path(work_dir) / SHARDS_DIR
    if not folder.is_dir():
        return set()
    names = (name[len("part-"):-len(_DONE_SUFFIX)] for name in os.listdir(folder)
             if name.startswith("part-") and name.endswith(_DONE_SUFFIX))
    return {int(number) for number in names if number.isdigit()}


def done_marker(work_dir: Path, shard: int) -> Path:
    return work_dir / SHARDS_DIR / f"{shard_name(shard)}{_DONE_SUFFIX}"


def read_markers(work_dir: Path) -> dict[int, ShardDone]:
    """Every done marker of the work directory, checked to name its own shard."""
    markers = {}
    for shard in sorted(completed_shards(work_dir)):
        path = done_marker(work_dir, shard)
        try:
            marker = ShardDone.model_validate_json(path.read_bytes())
        except (OSError, ValidationError) as err:
            raise StoreError(f"{path}: unreadable done marker ({err}); delete it and rerun the job") from None
        if marker.shard != shard:
            raise StoreError(f"{path}: done marker names shard {marker.shard}")
        markers[shard] = marker
    if not markers:
        raise StoreError(f"{work_dir}: no completed shards in {SHARDS_DIR}/")
    return markers


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
    for name in features:
        check_checkpoint_name(name)
    checked = {name: _checked_batch(batch, rows, f"{where}, checkpoint {name!r}")
               for name, batch in features.items()}
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
    check_unit_rows(feature, where)
    if (batch.nuclear_norm is None) != (batch.effective_rank is None):
        raise StoreError(f"{where}: give both nuclear_norm and effective_rank, or neither")
    scalars = {}
    for name in CHECKPOINT_SCORES + (SPECTRA_SCORES if batch.nuclear_norm is not None else ()):
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
    check_unit_rows(matrix, where)
    return np.ascontiguousarray(matrix)


def check_unit_rows(feature: np.ndarray, where: str) -> None:
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


def _scores_table(batch: FeatureBatch) -> pa.Table:
    spectra = batch.nuclear_norm is not None
    names = CHECKPOINT_SCORES + (SPECTRA_SCORES if spectra else ())
    columns = [pa.array(batch.rows, pa.int64())] + [pa.array(getattr(batch, name)) for name in names]
    return pa.Table.from_arrays(columns, schema=scores_schema(spectra))


def _write_parquet(table: pa.Table, final: Path, tmp_dir: Path, **options) -> None:
    with written_atomically(final, tmp_dir) as tmp:
        pq.write_table(table, tmp, **options)


def _shard_summary(shard: int, examples: pa.Table, batches: dict[str, FeatureBatch],
                   representations: np.ndarray | None) -> ShardDone:
    rows = examples.column("row").to_numpy()
    start = int(rows[0]) if len(rows) else 0
    sources = Counter(examples.column("source").to_pylist())
    first = next(iter(batches.values()))
    return ShardDone(shard=shard, num_rows=len(rows), row_start=start, row_stop=start + len(rows),
                     dim=first.feature.shape[1], checkpoints=sorted(batches),
                     by_source={str(s): c for s, c in sorted(sources.items(), key=lambda i: str(i[0]))},
                     truncated=int(pc.sum(examples.column("truncated")).as_py() or 0),
                     representation_dim=None if representations is None else representations.shape[1],
                     gradient_spectra=first.nuclear_norm is not None, vog="vog" in examples.column_names)
