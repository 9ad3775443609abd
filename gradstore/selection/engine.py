"""The selection engine: LESS scores of a datastore's examples for target examples, and selections.

Used in-process by ``gradstore select`` and by the REST service; it needs numpy and pyarrow, and
uses torch's kernels for the scan when torch is installed (see :mod:`gradstore.selection.scan`);
target *records* are turned into vectors by :mod:`gradstore.selection.featurizer`.

Scoring
=======
A datastore holds, for every training example ``x`` and checkpoint ``c``, the normalised projected
gradient ``f_c(x)``; a :class:`TargetSet` holds, for every target example ``t``, the normalised
projected (sgd) gradient ``g_c(t)`` at the same checkpoints. The score of ``x`` for ``t`` is::

    s(x, t) = Σ_c w_c · cos(f_c(x), g_c(t))

over the chosen checkpoints (all by default), with the manifest's checkpoint weights or weights
given per query, normalised to sum to 1 over the chosen checkpoints.

Aggregation over targets
========================
Every target has a subtask (a field of its record, or one subtask ``"all"``):

* ``less`` (the LESS rule): the mean of ``s(x, t)`` over each subtask's targets, then the maximum
  over subtasks;
* ``max``: the maximum of ``s(x, t)`` over all targets;
* ``mean``: the mean of ``s(x, t)`` over all targets.

Streaming
=========
Features are read in row batches, shard by shard, and for each batch one checkpoint at a time:
a shard's raw ``.npy`` features memory-mapped where the store has them (no decoding: the scan
runs at about half the speed of copying those files, bench/RESULTS.md), its Parquet file decoded
otherwise (stores without raw files give the same scores, more slowly). Shards are shared out
between a few worker threads, each with its own :class:`~gradstore.selection.scan.ScanKernel`
converting and multiplying cache-sized blocks.
A worker never holds more than one checkpoint's batch, whatever the store's size. A batch's
per-target scores ``(targets, batch)`` are reduced at once to the per-subtask means and the
maximum over targets, so what persists is ``O(N × subtasks)`` (plus ``O(N)`` for the maximum),
never ``O(N × targets)``.

Selection
=========
The pool is every example, or those of the chosen ``sources``. Examples are ranked by aggregated
score, descending, ties broken by row, ascending (``np.lexsort``), so a selection is a pure
function of the scores. The budget is ``k`` examples or ``ceil(fraction × pool)``. Walking the
ranking, a candidate is skipped when its source already has ``per_source_cap`` selected examples,
or when its similarity to an already selected example exceeds ``dedup_threshold``; the similarity
of two training examples is ``Σ_c w_c · cos(f_c(x), f_c(y))`` with the query's checkpoints and
weights. Deduplication reads the candidates' features in blocks and keeps the selected examples'
features (``selected × k × checkpoints`` float16) in memory.

Errors in a query raise :class:`SelectionError` (a ``ValueError``) naming what is wrong; a
damaged store raises the indexer's ``StoreError``.
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gradstore.indexer.datastore import Datastore, examples_path, features_path
from gradstore.indexer.errors import StoreError
from gradstore.indexer.faiss_index import normalized_weights

from .errors import SelectionError
from .targets import TargetSet, check_origin, store_origin
from .scan import ScanKernel, default_backend, restore_torch_threads, single_threaded_worker
from .scan import scan_threads as default_scan_threads

AGGREGATIONS = ("less", "max", "mean")
EXPORT_FORMATS = ("jsonl", "parquet")
# Rows per scoring batch are chosen so the batches of all scan workers together stay near this
# size in float32 (decoded Parquet batches are half that; memory-mapped ones cost nothing).
_BATCH_BYTES = 64 << 20
# Candidates read per deduplication block, and per chunk of selected vectors compared at once.
_DEDUP_BLOCK_MIN, _DEDUP_BLOCK_MAX = 256, 4096
_DEDUP_CHUNK = 4096


# ------------------------------------------------------------------------------------- options


@dataclass
class SelectionOptions:
    """What to select: aggregation, budget (exactly one of ``k`` and ``fraction``), filters."""

    aggregation: str = "less"
    k: int | None = None
    fraction: float | None = None
    sources: list[str] | None = None
    per_source_cap: int | None = None
    dedup_threshold: float | None = None
    checkpoints: list[str] | None = None
    weights: dict[str, float] | None = None

    def validate(self) -> None:
        if self.aggregation not in AGGREGATIONS:
            raise SelectionError(f"unknown aggregation {self.aggregation!r}: expected one of {', '.join(AGGREGATIONS)}")
        if (self.k is None) == (self.fraction is None):
            raise SelectionError("give exactly one of k or fraction")
        if self.k is not None and (not _is_int(self.k) or self.k < 1):
            raise SelectionError(f"k must be a positive integer, got {self.k!r}")
        if self.fraction is not None and not (_is_number(self.fraction) and 0 < self.fraction <= 1):
            raise SelectionError(f"fraction must be in (0, 1], got {self.fraction!r}")
        if self.per_source_cap is not None and (not _is_int(self.per_source_cap) or self.per_source_cap < 1):
            raise SelectionError(f"per_source_cap must be a positive integer, got {self.per_source_cap!r}")
        threshold = self.dedup_threshold
        if threshold is not None and not (_is_number(threshold) and -1 < threshold <= 1):
            raise SelectionError(f"dedup_threshold must be in (-1, 1], got {threshold!r}")
        if self.sources is not None and (isinstance(self.sources, str) or not self.sources):
            raise SelectionError(f"sources must be a non-empty list of source names, got {self.sources!r}")

    def budget(self, pool: int) -> int:
        """``k``, or ``ceil(fraction × pool)`` computed in decimal (0.07 × 100 is 7, not 8)."""
        if self.k is not None:
            return min(self.k, pool)
        return min(pool, math.ceil(Decimal(repr(float(self.fraction))) * pool))


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool) and math.isfinite(value)


# -------------------------------------------------------------------------------------- results


@dataclass
class Scores:
    """Scores of every example of a store (row order) for one target set."""

    per_subtask: np.ndarray  # float32 (N, S): mean score over each subtask's targets
    best: np.ndarray         # float32 (N,): maximum score over all targets
    subtasks: list[str]      # S names, in order of first appearance among the targets
    counts: np.ndarray       # int64 (S,): targets per subtask
    checkpoints: list[str]   # checkpoints used
    weights: np.ndarray      # their weights (sum 1)

    def aggregate(self, aggregation: str) -> np.ndarray:
        """float32 (N,): ``less`` max over subtask means, ``max`` over targets, ``mean`` over targets."""
        if aggregation == "less":
            return self.per_subtask.max(axis=1)
        if aggregation == "max":
            return self.best
        if aggregation == "mean":
            share = (self.counts / self.counts.sum()).astype(np.float32)
            return self.per_subtask @ share
        raise SelectionError(f"unknown aggregation {aggregation!r}: expected one of {', '.join(AGGREGATIONS)}")


@dataclass
class Selection:
    """A ranked selection: row ``rows[i]`` has rank ``i + 1``."""

    rows: np.ndarray            # int64 (n,)
    scores: np.ndarray          # float32 (n,), aggregated
    subtask_scores: np.ndarray  # float32 (n, S), mean score per subtask
    subtasks: list[str]
    ids: list[str]
    sources: list[str]
    pool: int                   # examples eligible after the source filter
    aggregation: str
    checkpoints: list[str]
    weights: list[float]
    ranking: np.ndarray = field(repr=False)          # int64: the whole pool ranked by score
    ranking_scores: np.ndarray = field(repr=False)   # float32: their aggregated scores
    table: Scores = field(repr=False)                # every example's scores

    def __len__(self) -> int:
        return len(self.rows)

    def items(self, start: int = 0, stop: int | None = None) -> list[dict]:
        """``{rank, row, id, source, score, subtask_scores}`` of ranks ``start+1 .. stop``."""
        stop = len(self.rows) if stop is None else min(stop, len(self.rows))
        return [{"rank": i + 1, "row": int(self.rows[i]), "id": self.ids[i], "source": self.sources[i],
                 "score": float(self.scores[i]),
                 "subtask_scores": {name: float(v) for name, v in zip(self.subtasks, self.subtask_scores[i])}}
                for i in range(start, stop)]


# --------------------------------------------------------------------------------------- engine


class SelectionEngine:
    """Scores and selections over one opened datastore; safe to share between threads.

    ``scan_threads`` worker threads share a scan's shards (default: :func:`~.scan.scan_threads`);
    ``scan_backend`` picks the kernel (``"torch"`` or ``"numpy"``; default: torch if installed).
    """

    def __init__(self, store: Datastore, scan_threads: int | None = None, scan_backend: str | None = None):
        self.store = store
        self.scan_threads = scan_threads or default_scan_threads()
        self.scan_backend = scan_backend or default_backend()
        ScanKernel(1, self.scan_backend)  # refuses an unknown backend now rather than mid-scan
        self._lock = threading.Lock()
        self._ids: np.ndarray | None = None
        self._source_codes: np.ndarray | None = None
        self._source_names: list[str] | None = None
        self._starts: np.ndarray | None = None

    # -- checkpoints and targets ------------------------------------------------------------

    def resolve_checkpoints(self, checkpoints: Sequence[str] | None = None,
                            weights: Mapping[str, float] | None = None) -> tuple[list[str], np.ndarray]:
        """The checkpoints to use (manifest order) and their weights normalised to sum to 1."""
        known = self.store.checkpoint_names
        if checkpoints is None:
            names = list(known)
        else:
            if isinstance(checkpoints, str) or not checkpoints:
                raise SelectionError(f"checkpoints must be a non-empty list of names (the datastore has {known})")
            unknown = [c for c in checkpoints if c not in known]
            if unknown:
                raise SelectionError(f"unknown checkpoint {unknown[0]!r}: the datastore has {known}")
            if len(set(checkpoints)) != len(checkpoints):
                raise SelectionError(f"checkpoints are listed more than once: {list(checkpoints)}")
            names = [c for c in known if c in set(checkpoints)]
        if weights is None:
            by_name = {c.name: c.weight for c in self.store.manifest.checkpoints}
            raw = [by_name[n] for n in names]
        else:
            unknown = [c for c in weights if c not in known]
            if unknown:
                raise SelectionError(f"weight for unknown checkpoint {unknown[0]!r}: the datastore has {known}")
            unused = [c for c in weights if c not in names]
            if unused:
                raise SelectionError(f"weight for checkpoint {unused[0]!r}, which is not among the chosen "
                                     f"checkpoints {names}")
            missing = [c for c in names if c not in weights]
            if missing:
                raise SelectionError(f"no weight for checkpoint {missing[0]!r}: give a weight for every checkpoint "
                                     f"used ({names}), or choose the checkpoints explicitly")
            raw = [weights[n] for n in names]
            for name, value in zip(names, raw):
                if not _is_number(value) or value < 0:
                    raise SelectionError(f"weight of checkpoint {name!r} must be a finite number >= 0, got {value!r}")
        try:
            return names, normalized_weights(raw)
        except ValueError as err:
            raise SelectionError(f"checkpoint weights for {names}: {err}") from None

    def check_targets(self, targets: TargetSet, checkpoints: Sequence[str]) -> None:
        """Targets must have vectors of the store's dimension for ``checkpoints``, computed with
        the store's projection, model and adapters (when their origin is known)."""
        if not isinstance(targets, TargetSet):
            raise SelectionError(f"targets must be a TargetSet, got {type(targets).__name__}")
        for name in checkpoints:
            if name not in targets.vectors:
                raise SelectionError(f"the targets have no vectors for checkpoint {name!r} "
                                     f"(they have {targets.checkpoints})")
            dim = targets.vectors[name].shape[1]
            if dim != self.store.dim:
                raise SelectionError(f"target vectors for checkpoint {name!r} have dimension {dim}, "
                                     f"the datastore has {self.store.dim}")
        if targets.origin is not None:
            check_origin(targets.origin, store_origin(self.store.manifest), checkpoints)

    # -- scoring ------------------------------------------------------------------------------

    def scores(self, targets: TargetSet, checkpoints: Sequence[str] | None = None,
               weights: Mapping[str, float] | None = None) -> Scores:
        """Every example's per-subtask mean score and maximum score over the targets (streamed)."""
        names, w = self.resolve_checkpoints(checkpoints, weights)
        self.check_targets(targets, names)
        subtasks = targets.subtask_names()
        code_of = {name: i for i, name in enumerate(subtasks)}
        codes = np.array([code_of[s] for s in targets.subtasks], dtype=np.int64)
        counts = np.bincount(codes, minlength=len(subtasks)).astype(np.int64)
        # Targets ordered by subtask, so a subtask's scores are adjacent columns (np.add.reduceat).
        order = np.argsort(codes, kind="stable")
        first_of_subtask = np.searchsorted(codes[order], np.arange(len(subtasks)))
        used = [(name, weight) for name, weight in zip(names, w) if weight > 0]
        # (T, k) per checkpoint, the weight folded in: query @ feature = w_c · cos(f_c, g_c).
        queries = [np.ascontiguousarray(np.float32(weight) * targets.vectors[name][order]) for name, weight in used]
        n = self.store.num_examples
        per_subtask = np.zeros((n, len(subtasks)), dtype=np.float32)
        best = np.zeros(n, dtype=np.float32)
        share = max(self.store.dim, targets.num_targets) * 4 * self.scan_threads
        batch_rows = max(1, min(65536, _BATCH_BYTES // share))

        def reduce(rows: np.ndarray, total: np.ndarray) -> None:  # total: (T, rows)
            sums = np.add.reduceat(total, first_of_subtask, axis=0)
            per_subtask[rows] = (sums / counts.astype(np.float32)[:, None]).T
            best[rows] = total.max(axis=0)

        self._scan([name for name, _ in used], queries, batch_rows, reduce)
        return Scores(per_subtask, best, subtasks, counts, names, w)

    def _scan(self, names: list[str], queries: list[np.ndarray], batch_rows: int, reduce) -> None:
        """``reduce(rows, Σ_c queries_c @ features_c.T)`` (targets × rows) for every row batch of
        the store, the shards shared out between worker threads (rows of calls never overlap)."""
        kernels = threading.local()

        def scan_shard(shard: int) -> None:
            if not hasattr(kernels, "kernel"):
                kernels.kernel = ScanKernel(self.store.dim, self.scan_backend)
            for rows, total in self._shard_scores(shard, names, queries, batch_rows, kernels.kernel):
                reduce(rows, total)

        pool = ThreadPoolExecutor(self.scan_threads, thread_name_prefix="gradstore-scan",
                                  initializer=single_threaded_worker)
        try:
            for _ in pool.map(scan_shard, range(self.store.manifest.shards.count)):
                pass
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # after an error, skip the shards not begun
            restore_torch_threads()

    def _shard_scores(self, shard: int, names: list[str], queries: list[np.ndarray], batch_rows: int,
                      kernel: ScanKernel):
        """``(rows, Σ_c queries_c @ features_c.T)`` per row batch of a shard, one checkpoint's batch
        at a time."""
        streams = [self.store.shard_features(name, shard, batch_rows, writable=True) for name in names]
        for rows, feature in streams[0]:
            total = np.zeros((queries[0].shape[0], len(rows)), dtype=np.float32)
            kernel.add_products(feature, queries[0], total)
            del feature
            for name, stream, query in zip(names[1:], streams[1:], queries[1:]):
                item = next(stream, None)
                if item is None or not np.array_equal(item[0], rows):
                    raise StoreError(f"{self.store.path}: shard {shard}: the features of checkpoint {name!r} do "
                                     f"not have the rows of checkpoint {names[0]!r}")
                kernel.add_products(item[1], query, total)
                del item
            yield rows, total
        for name, stream in zip(names[1:], streams[1:]):
            if next(stream, None) is not None:
                raise StoreError(f"{self.store.path}: shard {shard}: checkpoint {name!r} has more feature rows "
                                 f"than {names[0]!r}")

    # -- selection ----------------------------------------------------------------------------

    def select(self, targets: TargetSet, options: SelectionOptions) -> Selection:
        """Score, rank the pool and select under the budget, caps and deduplication of ``options``."""
        if not isinstance(options, SelectionOptions):
            raise SelectionError(f"options must be SelectionOptions, got {type(options).__name__}")
        options.validate()
        pool = self.pool(options.sources)  # checks the source names before any scoring
        table = self.scores(targets, options.checkpoints, options.weights)
        aggregated = table.aggregate(options.aggregation)
        ranking = rank(pool, aggregated)
        budget = options.budget(len(pool))
        weights = dict(zip(table.checkpoints, table.weights))
        if options.dedup_threshold is not None:
            rows = self._greedy_dedup(ranking, budget, options.per_source_cap, options.dedup_threshold, weights)
        elif options.per_source_cap is not None:
            rows = self._capped(ranking, budget, options.per_source_cap)
        else:
            rows = ranking[:budget]
        rows = np.asarray(rows, dtype=np.int64)
        ids, sources = self.ids_and_sources(rows)
        return Selection(rows=rows, scores=aggregated[rows], subtask_scores=table.per_subtask[rows],
                         subtasks=table.subtasks, ids=ids, sources=sources, pool=len(pool),
                         aggregation=options.aggregation, checkpoints=table.checkpoints,
                         weights=[float(x) for x in table.weights], ranking=ranking,
                         ranking_scores=aggregated[ranking], table=table)

    def pool(self, sources: Sequence[str] | None = None) -> np.ndarray:
        """Rows (ascending) of the examples of ``sources`` (all examples when None)."""
        if sources is None:
            return np.arange(self.store.num_examples, dtype=np.int64)
        known = list(self.store.manifest.counts.by_source)
        unknown = [s for s in sources if s not in known]
        if unknown:
            raise SelectionError(f"unknown source {unknown[0]!r}: the datastore has {known}")
        codes, names = self._sources()
        wanted = [names.index(s) for s in sources if s in names]
        return np.flatnonzero(np.isin(codes, wanted)).astype(np.int64)

    def _capped(self, ranking: np.ndarray, budget: int, cap: int) -> np.ndarray:
        codes, _ = self._sources()
        ranked_codes = codes[ranking]
        within = np.empty(len(ranking), dtype=np.int64)
        for code in np.unique(ranked_codes):
            where = np.flatnonzero(ranked_codes == code)
            within[where] = np.arange(len(where))
        return ranking[within < cap][:budget]

    def _greedy_dedup(self, ranking: np.ndarray, budget: int, cap: int | None, threshold: float,
                      weights: dict[str, float]) -> np.ndarray:
        """Walk the ranking in blocks; keep a candidate unless its source is full or its
        similarity to a kept example exceeds ``threshold``."""
        codes, names = self._sources()
        per_source = np.zeros(len(names), dtype=np.int64)
        used = {name: w for name, w in weights.items() if w > 0}
        dim = self.store.dim
        scale = np.repeat(np.array(list(used.values()), dtype=np.float32), dim)
        # The kept examples' raw features, concatenated over checkpoints; grown as needed.
        kept_vectors = np.empty((min(budget, _DEDUP_BLOCK_MAX), dim * len(used)), dtype=np.float16)
        kept: list[int] = []
        position = 0
        while len(kept) < budget and position < len(ranking):
            size = min(_DEDUP_BLOCK_MAX, max(_DEDUP_BLOCK_MIN, 2 * (budget - len(kept))))
            block = ranking[position:position + size]
            position += len(block)
            if cap is not None:
                block = block[per_source[codes[block]] < cap]
            if not len(block):
                continue
            raw = np.concatenate([self.features_at(name, block) for name in used], axis=1)
            weighted = raw.astype(np.float32) * scale
            previous = np.full(len(block), -np.inf, dtype=np.float32)
            for start in range(0, len(kept), _DEDUP_CHUNK):
                chunk = kept_vectors[start:min(len(kept), start + _DEDUP_CHUNK)].astype(np.float32)
                np.maximum(previous, (weighted @ chunk.T).max(axis=1), out=previous)
            gram = weighted @ raw.astype(np.float32).T
            picked: list[int] = []
            for i, row in enumerate(block):
                if previous[i] > threshold or (picked and gram[i, picked].max() > threshold):
                    continue
                if cap is not None and per_source[codes[row]] >= cap:
                    continue
                picked.append(i)
                per_source[codes[row]] += 1
                if len(kept) + len(picked) == budget:
                    break
            if len(kept) + len(picked) > len(kept_vectors):
                grown = np.empty((min(budget, 2 * (len(kept) + len(picked))), kept_vectors.shape[1]), np.float16)
                grown[:len(kept)] = kept_vectors[:len(kept)]
                kept_vectors = grown
            kept_vectors[len(kept):len(kept) + len(picked)] = raw[picked]
            kept.extend(int(r) for r in block[picked])
        return np.asarray(kept, dtype=np.int64)

    # -- reading rows -------------------------------------------------------------------------

    def features_at(self, checkpoint: str, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """float16 ``(len(rows), k)``: one checkpoint's features of ``rows``, in the given order.

        Gathered from the raw files' memory maps where the store has them; otherwise only the
        Parquet row groups holding the rows are read (memory-mapped).
        """
        if checkpoint not in self.store.checkpoint_names:
            raise SelectionError(f"unknown checkpoint {checkpoint!r}: the datastore has {self.store.checkpoint_names}")
        rows = self._checked_rows(rows)
        out = np.empty((len(rows), self.store.dim), dtype=np.float16)
        for shard, where, local in self._by_shard(rows):
            raw = self.store.raw_features(checkpoint, shard)
            if raw is not None:
                out[where] = raw[local]
                continue
            path = features_path(self.store.path, checkpoint, shard)
            parquet = pq.ParquetFile(path, memory_map=True)
            sizes = np.array([parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)])
            group_starts = np.cumsum(sizes) - sizes
            group_of = np.searchsorted(group_starts, local, side="right") - 1
            groups = np.unique(group_of)
            # Where each group read begins in the table of just those groups.
            read_start = np.zeros(len(sizes), dtype=np.int64)
            read_start[groups] = np.cumsum(sizes[groups]) - sizes[groups]
            table = parquet.read_row_groups(groups.tolist(), columns=["row", "feature"])
            index = read_start[group_of] + (local - group_starts[group_of])
            found = table.column("row").to_numpy()[index]
            if not np.array_equal(found, rows[where]):
                raise StoreError(f"{path}: rows are not where the shard layout puts them")
            feature = table.column("feature").combine_chunks().flatten().to_numpy().reshape(-1, self.store.dim)
            out[where] = feature[index]
        return out

    def records_at(self, rows: Sequence[int] | np.ndarray) -> list[str]:
        """The stored JSON text of the records of ``rows``, in the given order."""
        rows = self._checked_rows(rows)
        texts: list[str | None] = [None] * len(rows)
        for shard, where, local in self._by_shard(rows):
            table = pq.read_table(examples_path(self.store.path, shard), columns=["row", "record"], memory_map=True)
            found = table.column("row").to_numpy()[local]
            if not np.array_equal(found, rows[where]):
                raise StoreError(f"{examples_path(self.store.path, shard)}: rows are not where the shard layout "
                                 f"puts them")
            records = table.column("record").take(pa.array(local)).to_pylist()
            for i, text in zip(where, records):
                texts[i] = text
        return texts

    def ids_and_sources(self, rows: Sequence[int] | np.ndarray) -> tuple[list[str], list[str]]:
        rows = self._checked_rows(rows)
        ids = self._example_ids()
        codes, names = self._sources()
        return ids[rows].tolist(), [names[c] for c in codes[rows]]

    def _checked_rows(self, rows) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if len(rows) and (rows.min() < 0 or rows.max() >= self.store.num_examples):
            raise SelectionError(f"rows must be in 0..{self.store.num_examples - 1}")
        return rows

    def _by_shard(self, rows: np.ndarray):
        """``(shard, positions in rows, rows local to the shard)`` for every shard holding some."""
        starts = self._shard_starts()
        shard_of = np.searchsorted(starts, rows, side="right") - 1
        for shard in np.unique(shard_of):
            where = np.flatnonzero(shard_of == shard)
            yield int(shard), where, rows[where] - starts[shard]

    def _shard_starts(self) -> np.ndarray:
        with self._lock:
            if self._starts is None:
                counts = [pq.read_metadata(examples_path(self.store.path, s)).num_rows
                          for s in range(self.store.manifest.shards.count)]
                self._starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
            return self._starts

    def _example_ids(self) -> np.ndarray:
        with self._lock:
            if self._ids is None:
                column = self.store.examples(columns=["id"]).column("id")
                self._ids = np.array(column.to_pylist(), dtype=object)
            return self._ids

    def _sources(self) -> tuple[np.ndarray, list[str]]:
        """Per-row source codes (int32) and the source names they index."""
        with self._lock:
            if self._source_codes is None:
                column = self.store.examples(columns=["source"]).column("source").combine_chunks()
                encoded = column.dictionary_encode()
                self._source_codes = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int32)
                self._source_names = [str(s) for s in encoded.dictionary.to_pylist()]
            return self._source_codes, self._source_names

    # -- output -------------------------------------------------------------------------------

    def export(self, selection: Selection, path: str | Path, fmt: str | None = None) -> Path:
        """Write the selected records in their original form, in rank order; atomic.

        ``jsonl``: one record per line, the JSON text the store keeps (as the corpus held it, up to
        JSON formatting). ``parquet``: one row per record, one column per field (fields a record
        lacks are null). ``fmt`` defaults to the file suffix.
        """
        path = Path(path)
        fmt = fmt or _format_of(path)
        if fmt not in EXPORT_FORMATS:
            raise SelectionError(f"unknown export format {fmt!r}: expected one of {', '.join(EXPORT_FORMATS)}")
        texts = self.records_at(selection.rows)
        if fmt == "jsonl":
            lines = [t if "\n" not in t and "\r" not in t else json.dumps(json.loads(t), ensure_ascii=False)
                     for t in texts]
            data = "".join(line + "\n" for line in lines).encode("utf-8")
            return _atomic_write(path, lambda tmp: tmp.write_bytes(data))
        records = [json.loads(t) for t in texts]
        try:
            table = pa.Table.from_struct_array(pa.array(records)) if records else pa.table({})
        except (pa.ArrowException, ValueError, TypeError) as err:
            raise SelectionError(f"the selected records cannot be written as Parquet ({err}); export JSONL "
                                 f"instead") from None
        return _atomic_write(path, lambda tmp: pq.write_table(table, tmp))

    def write_scores(self, selection: Selection, path: str | Path) -> Path:
        """The whole pool's scores, ranked, as Parquet: ``rank`` (from 1), ``row``, ``id``,
        ``source``, ``score`` (aggregated) and ``score_<subtask>`` (the subtask's mean) per
        subtask. Ranks follow the scores alone (no caps or deduplication); atomic."""
        ranking = selection.ranking
        ids, sources = self.ids_and_sources(ranking)
        columns = {
            "rank": pa.array(np.arange(1, len(ranking) + 1, dtype=np.int64)),
            "row": pa.array(ranking, pa.int64()),
            "id": pa.array(ids, pa.string()),
            "source": pa.array(sources, pa.string()),
            "score": pa.array(selection.ranking_scores.astype(np.float32)),
        }
        per_subtask = selection.table.per_subtask[ranking]
        for i, name in enumerate(selection.subtasks):
            columns[f"score_{name}"] = pa.array(np.ascontiguousarray(per_subtask[:, i]))
        table = pa.table(columns)
        return _atomic_write(Path(path), lambda tmp: pq.write_table(table, tmp))


# ------------------------------------------------------------------------------------ helpers


def rank(rows: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """``rows`` ordered by ``scores[rows]`` descending, then row ascending."""
    rows = np.asarray(rows, dtype=np.int64)
    return rows[np.lexsort((rows, -scores[rows].astype(np.float64)))]


def _format_of(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return "jsonl"
    if suffix == ".parquet":
        return "parquet"
    raise SelectionError(f"{path}: cannot tell the export format from the suffix; use .jsonl or .parquet")


def _atomic_write(path: Path, write) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, fsync it, rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
