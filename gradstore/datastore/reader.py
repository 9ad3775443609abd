"""The reader: :class:`Datastore` opens one version of a published store read-only.

Opening reads the manifest once and checks every listed file's size (and, asked to, its SHA-256);
the object then reads only that version's files, so it keeps answering from the version it
opened while newer ones are published. Features and representation vectors are memory-mapped
from their ``.npy`` files, never loaded whole; Parquet columns are read per shard. Removed rows
(see :mod:`.layout`) keep their row numbers: arrays indexed by row have :attr:`Datastore.num_rows`
entries, and :meth:`Datastore.live_rows` / :meth:`Datastore.removed_rows` say which count.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gradstore.indexer.faiss_index import ONDISK_KIND, lists_path, read_index

from .errors import ExampleNotFoundError, FeatureNotStoredError, StoreError
from .files import MapCache, file_infos, map_matrix, matrix_offset
from .layout import MANIFEST_FILE, SCORE_NAMES, SEGMENTS_DIR, SPECTRA_SCORES, SegmentFiles
from .manifest import Manifest, RepresentationInfo, SegmentInfo
from .quantized import QuantizedFeatures, code_paths
from .quantized import load as load_quantized

FEATURE_DTYPE = "<f2"


@dataclass(frozen=True)
class Shard:
    """One shard of a store: its segment's files, its number there, its rows."""

    files: SegmentFiles
    local: int
    first_row: int
    num_rows: int


def store_shards(root: Path, segments: Sequence[SegmentInfo]) -> list[Shard]:
    """The shards of ``segments`` (of the store at ``root``) in row order: global shard ``i`` is
    element ``i``."""
    shards = []
    for segment in segments:
        files, row = SegmentFiles(root / SEGMENTS_DIR / segment.name), segment.first_row
        for local, rows in enumerate(segment.shard_rows):
            shards.append(Shard(files, local, row, rows))
            row += rows
    return shards


class Datastore:
    """One version of a published store, opened read-only."""

    def __init__(self, path: Path, manifest: Manifest):
        self.path = path
        self.manifest = manifest
        self.shards = store_shards(path, manifest.segments)
        self._starts = np.array([s.first_row for s in self.shards], dtype=np.int64)
        self._row_by_id: dict[str, int] | None = None
        # Where each matrix file's data begins, once its header was checked; the read-only maps.
        self._offsets: dict[Path, int] = {}
        self._maps = MapCache()
        # Columns kept once read (ids, source codes, removed rows), for gathers; readers share a store.
        self._cache_lock = threading.Lock()
        self._ids: np.ndarray | None = None
        self._source_codes: np.ndarray | None = None
        self._source_names: list[str] | None = None
        self._removed: np.ndarray | None = None

    @classmethod
    def open(cls, path: str | Path, verify: bool = False) -> "Datastore":
        """Open the current version of ``path``, checking every listed file's size (and sha256
        with ``verify``)."""
        path = Path(path)
        if not path.is_dir():
            raise StoreError(f"{path}: no datastore here (directory missing)")
        manifest = Manifest.load(path / MANIFEST_FILE)
        check_listed_files(path, manifest, verify)
        return cls(path, manifest)

    def __repr__(self) -> str:
        return (f"Datastore({str(self.path)!r}, version={self.version}, examples={self.num_examples}, "
                f"checkpoints={self.checkpoint_names})")

    @property
    def version(self) -> int:
        return self.manifest.version

    @property
    def num_examples(self) -> int:
        """Live examples (removed rows not counted)."""
        return self.manifest.counts.examples

    @property
    def num_rows(self) -> int:
        """Every row, removed ones included: the length of arrays indexed by row."""
        return self.manifest.counts.rows

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

    # -- removed rows ----------------------------------------------------------------------------

    def removed_rows(self) -> np.ndarray:
        """The removed rows, int64, sorted (empty without removals); read once, then kept."""
        with self._cache_lock:
            if self._removed is None:
                self._removed = self._read_tombstones()
            return self._removed

    def live_rows(self) -> np.ndarray:
        """Every live row, int64, ascending."""
        removed = self.removed_rows()
        rows = np.arange(self.num_rows, dtype=np.int64)
        return rows if not len(removed) else np.setdiff1d(rows, removed, assume_unique=True)

    def is_live(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """A bool per row: not removed."""
        rows = np.asarray(rows, dtype=np.int64)
        removed = self.removed_rows()
        return ~np.isin(rows, removed) if len(removed) else np.ones(rows.shape, dtype=bool)

    def _read_tombstones(self) -> np.ndarray:
        relative = self.manifest.tombstones
        if relative is None:
            return np.empty(0, dtype=np.int64)
        path = self.path / relative
        try:
            removed = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise StoreError(f"{path}: cannot read the removed rows ({err})") from None
        if (removed.dtype != np.int64 or removed.ndim != 1 or len(removed) != self.manifest.counts.removed
                or (len(removed) and (removed[0] < 0 or removed[-1] >= self.num_rows
                                      or np.any(np.diff(removed) <= 0)))):
            raise StoreError(f"{path}: expected {self.manifest.counts.removed} sorted unique int64 rows in "
                             f"0..{self.num_rows - 1}, found {removed.dtype} {removed.shape}")
        return removed

    # -- examples --------------------------------------------------------------------------------

    def examples_file(self, shard: int) -> Path:
        return self.shards[shard].files.examples(self.shards[shard].local)

    def scores_file(self, checkpoint: str, shard: int) -> Path:
        self._check_checkpoint(checkpoint)
        return self.shards[shard].files.scores(checkpoint, self.shards[shard].local)

    def examples(self, columns: Sequence[str] | None = None, live_only: bool = False) -> pa.Table:
        """Every example in row order (only ``columns`` if given), removed ones too unless ``live_only``."""
        table = pa.concat_tables([pq.read_table(self.examples_file(s), columns=columns, memory_map=True)
                                  for s in range(len(self.shards))])
        if live_only and self.manifest.counts.removed:
            table = table.filter(pa.array(self.is_live(np.arange(self.num_rows))))
        return table

    def example(self, row: int) -> dict:
        """One live example's columns (``record`` is the JSON text of the original record)."""
        if not 0 <= row < self.num_rows:
            raise ExampleNotFoundError(f"{self.path}: row {row} is out of range (0..{self.num_rows - 1})")
        if not self.is_live([row])[0]:
            raise ExampleNotFoundError(f"{self.path}: row {row} was removed (version {self.version})")
        shard = self.shard_of(row)
        table = pq.read_table(self.examples_file(shard), memory_map=True)
        example = table.slice(row - self.shards[shard].first_row, 1).to_pylist()[0]
        if example["row"] != row:
            raise StoreError(f"{self.examples_file(shard)}: expected row {row}, found {example['row']}")
        return example

    def row_of(self, id: str) -> int:
        """The row of the live example with this id (a lookup table is built on first use)."""
        if self._row_by_id is None:
            table = self.examples(columns=["id", "row"], live_only=True)
            self._row_by_id = dict(zip(table.column("id").to_pylist(), table.column("row").to_pylist()))
        try:
            return self._row_by_id[id]
        except KeyError:
            raise ExampleNotFoundError(f"{self.path}: no example with id {id!r}") from None

    def skipped_records(self) -> list[dict]:
        """The records the indexing runs skipped (``--on-bad-record skip``), as each run reported
        them (``location``, ``reason``, ``source``), in segment order."""
        records = []
        for segment in self.manifest.segments:
            path = SegmentFiles(self.path / SEGMENTS_DIR / segment.name).skipped
            if path.exists():
                records += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return records

    def shard_of(self, row: int) -> int:
        return int(np.searchsorted(self._starts, row, side="right") - 1)

    # -- gathers: the columns of given rows, in the given order -------------------------------

    def ids(self) -> np.ndarray:
        """Every row's id in row order (object array; read once, then kept)."""
        with self._cache_lock:
            if self._ids is None:
                self._ids = np.array(self.examples(columns=["id"]).column("id").to_pylist(), dtype=object)
            return self._ids

    def source_codes(self) -> tuple[np.ndarray, list[str]]:
        """Every row's source as an int32 code in row order, and the names the codes index."""
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
        """float16 ``(len(rows), k)``: one checkpoint's features of ``rows``, in the given order."""
        self._check_checkpoint(checkpoint)
        rows = self._checked_rows(rows)
        out = np.empty((len(rows), self.dim), dtype=np.float16)
        for shard, where, local in self._by_shard(rows):
            out[where] = self.raw_features(checkpoint, shard)[local]
        return out

    def records_at(self, rows: Sequence[int] | np.ndarray) -> list[str]:
        """The stored JSON text of the records of ``rows``, in the given order."""
        rows = self._checked_rows(rows)
        texts: list[str | None] = [None] * len(rows)
        for shard, where, local in self._by_shard(rows):
            path = self.examples_file(shard)
            table = pq.read_table(path, columns=["row", "record"], memory_map=True)
            if not np.array_equal(table.column("row").to_numpy()[local], rows[where]):
                raise StoreError(f"{path}: rows are not where the shard layout puts them")
            for i, text in zip(where, table.column("record").take(pa.array(local)).to_pylist()):
                texts[i] = text
        return texts

    def _checked_rows(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if len(rows) and (rows.min() < 0 or rows.max() >= self.num_rows):
            raise ValueError(f"{self.path}: rows must be in 0..{self.num_rows - 1}")
        return rows

    def _by_shard(self, rows: np.ndarray) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """``(shard, positions in rows, rows local to the shard)`` for every shard holding some."""
        shard_of = np.searchsorted(self._starts, rows, side="right") - 1
        for shard in np.unique(shard_of):
            where = np.flatnonzero(shard_of == shard)
            yield int(shard), where, rows[where] - self._starts[shard]

    # -- features --------------------------------------------------------------------------------

    def iter_features(self, checkpoint: str, batch_rows: int = 65536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(rows int64, features float16 (n, k))`` batches in row order, shard by shard (removed
        rows included); batches hold at most ``batch_rows`` rows, never span two shards, and are
        read-only slices of the memory-mapped files."""
        self._check_checkpoint(checkpoint)
        for shard in range(len(self.shards)):
            yield from self.shard_features(checkpoint, shard, batch_rows)

    def shard_features(self, checkpoint: str, shard: int, batch_rows: int = 65536,
                       writable: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(rows, features)`` batches of one shard, as :meth:`iter_features` (copy-on-write
        with ``writable``, see :meth:`raw_features`)."""
        yield from self._batches(shard, self.raw_features(checkpoint, shard, writable), batch_rows)

    def raw_features(self, checkpoint: str, shard: int, writable: bool = False) -> np.ndarray:
        """One shard's features memory-mapped (float16 ``(rows, k)``). The map is read-only, or
        with ``writable`` copy-on-write: for libraries that want writable buffers (torch); writes
        stay in this process."""
        info = self.shards[shard]
        self._check_checkpoint(checkpoint)
        return self._map(info.files.features(checkpoint, info.local), (info.num_rows, self.dim), writable)

    def quantized_features(self, kind: str, checkpoint: str, shard: int) -> QuantizedFeatures:
        """One shard's quantised copy of ``kind`` (memory-mapped codes and scales)."""
        if kind not in self.manifest.features.quantized:
            raise FeatureNotStoredError(f"{self.path}: no {kind} copy of the features (the store has "
                                        f"{self.manifest.features.quantized or 'none'}); add one with "
                                        f"`gradstore quantize {self.path} --kind {kind}`")
        info = self.shards[shard]
        self._check_checkpoint(checkpoint)
        stem = info.files.quantized(kind, checkpoint, info.local)

        def open_maps() -> QuantizedFeatures:
            try:
                return load_quantized(stem, kind, self.dim)
            except (OSError, ValueError) as err:
                raise StoreError(f"cannot read a quantised copy: {err}") from None

        return self._maps.get(stem, open_maps)

    def features(self, checkpoint: str) -> np.ndarray:
        """All of one checkpoint's features, float16 ``(num_rows, k)`` (for small stores)."""
        out = np.empty((self.num_rows, self.dim), dtype=np.float16)
        for rows, feature in self.iter_features(checkpoint):
            out[rows] = feature
        return out

    def feature_stats(self, checkpoint: str) -> pa.Table:
        """``row``, ``grad_norm``, ``feature_norm``, ``loss`` of one checkpoint, in row order."""
        columns = ["row", "grad_norm", "feature_norm", "loss"]
        return pa.concat_tables([pq.read_table(self.scores_file(checkpoint, s), columns=columns)
                                 for s in range(len(self.shards))])

    def _map(self, path: Path, shape: tuple[int, int], writable: bool = False) -> np.ndarray:
        """The matrix file's map: read-only ones are kept open (this version's files never change),
        copy-on-write ones are fresh (their writes are their holder's)."""
        def open_map() -> np.ndarray:
            offset = self._offsets.get(path)
            if offset is None:
                offset = self._offsets[path] = matrix_offset(path, shape, FEATURE_DTYPE)
            return map_matrix(path, shape, FEATURE_DTYPE, writable, offset)

        return open_map() if writable else self._maps.get(path, open_map)

    def _batches(self, shard: int, matrix: np.ndarray, batch_rows: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        first = self.shards[shard].first_row
        for start in range(0, len(matrix), batch_rows):
            stop = min(len(matrix), start + batch_rows)
            yield np.arange(first + start, first + stop, dtype=np.int64), matrix[start:stop]

    # -- representation vectors and quality scores (gradstore.indexer.extras) --------------------

    @property
    def has_representations(self) -> bool:
        return self._representation_info is not None

    @property
    def representation_dim(self) -> int | None:
        """Dimension of the representation vectors (the model's hidden size), None without them."""
        info = self._representation_info
        return None if info is None else info.dim

    def raw_representations(self, shard: int, writable: bool = False) -> np.ndarray:
        """One shard's representation vectors memory-mapped, float16 ``(rows, hidden)``."""
        dim = self._require_representations()
        info = self.shards[shard]
        return self._map(info.files.representations(info.local), (info.num_rows, dim), writable)

    def shard_representations(self, shard: int, batch_rows: int = 65536,
                              writable: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(rows int64, representations float16 (n, hidden))`` batches of one shard."""
        yield from self._batches(shard, self.raw_representations(shard, writable), batch_rows)

    def representations_at(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """The representation vectors of ``rows``, in that order: float16 ``(len(rows), hidden)``."""
        dim = self._require_representations()
        rows = self._checked_rows(rows)
        out = np.empty((len(rows), dim), dtype=np.float16)
        for shard, where, local in self._by_shard(rows):
            out[where] = self.raw_representations(shard)[local]
        return out

    def representations(self) -> np.ndarray:
        """Every row's representation vector, float16 ``(num_rows, hidden)`` (small stores)."""
        return self.representations_at(np.arange(self.num_rows))

    @property
    def score_names(self) -> list[str]:
        """The quality scores this store holds, in :data:`SCORE_NAMES` order."""
        return [name for name in SCORE_NAMES if self._missing_score(name) is None]

    def scores(self, name: str, checkpoint: str | None = None) -> np.ndarray:
        """One quality score of every row, float32 ``(num_rows,)`` in row order.

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
        if name == "vog":
            if checkpoint is not None:
                raise FeatureNotStoredError(f"{self.path}: vog is one score per example across all checkpoints, "
                                            f"not per checkpoint (asked for checkpoint {checkpoint!r})")
            return self.examples(columns=["vog"]).column("vog").to_numpy().astype(np.float32)
        names = self.checkpoint_names if checkpoint is None else [checkpoint]
        weights = self.weights if checkpoint is None else np.ones(1)
        total = np.zeros(self.num_rows, dtype=np.float64)
        for weight, name_c in zip(weights, names):
            column = pa.concat_arrays([pq.read_table(self.scores_file(name_c, s), columns=[name])
                                       .column(name).combine_chunks() for s in range(len(self.shards))])
            total += weight * column.to_numpy(zero_copy_only=False)
        return total.astype(np.float32)

    @property
    def _representation_info(self) -> RepresentationInfo | None:
        return self.manifest.extras.representations

    def _require_representations(self) -> int:
        info = self._representation_info
        if info is None:
            raise FeatureNotStoredError(f"{self.path}: this store has no representation vectors "
                                        f"(it was indexed with --no-representations; re-index the corpus without "
                                        f"it to add them)")
        return info.dim

    def _missing_score(self, name: str) -> str | None:
        """Why the store lacks score ``name`` (a sentence for the error), or None when it has it."""
        extras = self.manifest.extras
        if name in SPECTRA_SCORES and not extras.gradient_spectra:
            return (f"this store has no {name} (no gradient spectra: it was indexed with --no-gradient-spectra; "
                    f"re-index the corpus without it to add them)")
        if name == "vog" and not extras.vog:
            if len(self.checkpoint_names) < 2:
                return ("this store has no vog: VoG is a variance across checkpoints and the store was indexed "
                        "with one; re-index with two or more (--run DIR of a warmup, or several --checkpoint)")
            return "this store has no vog (it was indexed with --no-vog; re-index the corpus without it to add them)"
        return None

    # -- index -----------------------------------------------------------------------------------

    def index(self, memory_mapped: bool = True) -> faiss.Index:
        """The FAISS index (id == row, removed rows included), read-only with its vectors
        memory-mapped unless ``memory_mapped`` is false (an ivf-ondisk index's lists are mapped
        from its ``.ivfdata`` file either way); see ``gradstore.indexer.faiss_index``."""
        info = self.manifest.index
        if info is None:
            raise StoreError(f"{self.path}: this store has no FAISS index (exact searches scan its features)")
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
        """Every shard file's header agrees with the manifest: Parquet footers with the shard's
        row count, matrix headers with its rows and dimension (one small read per file: a damaged
        file is found on open, not in the middle of a query)."""
        for shard, info in enumerate(self.shards):
            paths = [self.examples_file(shard)] + [self.scores_file(c, shard) for c in self.checkpoint_names]
            for path in paths:
                rows = _footer(path).num_rows
                if rows != info.num_rows:
                    raise StoreError(f"{path}: {rows} rows, the manifest says {info.num_rows}")
            for checkpoint in self.checkpoint_names:
                self.raw_features(checkpoint, shard)
            if self.has_representations:
                self.raw_representations(shard)
        self.removed_rows()


def _footer(path: Path) -> pq.FileMetaData:
    try:
        return pq.read_metadata(path)
    except (OSError, pa.ArrowException) as err:
        raise StoreError(f"{path}: unreadable Parquet file ({err})") from None


def required_files(root: Path, manifest: Manifest) -> list[Path]:
    """Every file the manifest's version consists of, by the layout (``files`` must list each)."""
    required = []
    representations = manifest.extras.representations is not None
    for shard in store_shards(root, manifest.segments):
        files, local = shard.files, shard.local
        required.append(files.examples(local))
        for checkpoint in manifest.checkpoints:
            required += [files.scores(checkpoint.name, local), files.features(checkpoint.name, local)]
            for kind in manifest.features.quantized:
                required += code_paths(files.quantized(kind, checkpoint.name, local))
        if representations:
            required.append(files.representations(local))
    if manifest.index is not None:
        required.append(root / manifest.index.file)
        if manifest.index.kind == ONDISK_KIND:
            required.append(lists_path(root / manifest.index.file))
    if manifest.tombstones is not None:
        required.append(root / manifest.tombstones)
    return required


def check_listed_files(root: Path, manifest: Manifest, verify: bool) -> None:
    """Every file the layout requires is listed, and every listed file exists with its size
    (and, with ``verify``, its SHA-256)."""
    for path in required_files(root, manifest):
        if path.relative_to(root).as_posix() not in manifest.files:
            raise StoreError(f"{root / MANIFEST_FILE}: files does not list {path.relative_to(root).as_posix()}")
    for relative, info in manifest.files.items():
        path = root / relative
        if not path.is_file():
            raise StoreError(f"{path}: listed in the manifest but missing")
        if path.stat().st_size != info.bytes:
            raise StoreError(f"{path}: {path.stat().st_size} bytes, the manifest says {info.bytes}")
    if verify:
        found = file_infos(root, list(manifest.files))
        for relative, info in manifest.files.items():
            if found[relative]["sha256"] != info.sha256:
                raise StoreError(f"{root / relative}: sha256 mismatch (the file is corrupt or was modified)")
