"""The selection engine: scores of a datastore's examples, strategies run over them, selections.

Used in-process by ``gradstore select`` and ``gradstore eval`` and by the REST service; it needs
numpy and pyarrow, and uses torch's kernels for the scan when torch is installed (see
:mod:`gradstore.selection.scan`); target *records* are turned into vectors by
:mod:`gradstore.selection.featurizer`. :meth:`SelectionEngine.select` runs any registered
strategy (:mod:`gradstore.selection.strategies`); the scoring below is what the ``less`` and
``rds`` strategies use.

Scoring
=======
A datastore holds, for every training example ``x`` and checkpoint ``c``, the normalised projected
gradient ``f_c(x)``; a :class:`TargetSet` holds, for every target example ``t``, the normalised
projected (sgd) gradient ``g_c(t)`` at the same checkpoints. The score of ``x`` for ``t`` is::

    s(x, t) = Σ_c w_c · cos(f_c(x), g_c(t))

over the chosen checkpoints (all by default), with the manifest's checkpoint weights or weights
given per query, normalised to sum to 1 over the chosen checkpoints.

Representation scores (``rds``) are the same scan over one feature space, the stored
representation vectors, against the targets' representations: ``s(x, t) = cos(r(x), r(t))``.

Aggregation over targets
========================
Every target has a subtask (a field of its record, or one subtask ``"all"``):

* ``less`` (the LESS rule): the mean of ``s(x, t)`` over each subtask's targets, then the maximum
  over subtasks;
* ``max``: the maximum of ``s(x, t)`` over all targets;
* ``mean``: the mean of ``s(x, t)`` over all targets.

Streaming
=========
Shards are shared out between a few worker threads, each with its own
:class:`~gradstore.selection.scan.ScanKernel`. A worker takes a shard's features of every
checkpoint as ``Datastore.raw_features`` gives them (read-only ``numpy.memmap`` s of the
features' ``.npy`` files, kept open by the store so that later scans find their pages mapped;
the kernel reads them in place), and scores the shard in row batches, for each batch one
checkpoint after the other. A batch's per-target scores ``(targets, batch)`` are reduced at once
to the per-subtask means and the maximum over targets, written by the worker into the result's
rows of that batch, so what persists is ``O(N × subtasks)`` (plus ``O(N)`` for the maximum),
never ``O(N × targets)``.

Precision
=========
``scores(..., precision="int8" | "1bit")`` (the ``less`` strategy's ``precision`` option) scans
the store's quantised copy of that kind instead (``gradstore quantize`` adds one; see
:mod:`gradstore.datastore.quantized`) with a
:class:`~gradstore.selection.quantized_scan.QuantizedScanKernel`: the scores are those of the
decoded rows, approximate (1bit's are about 2/π of the cosine, plus noise), and the rows read are
about 2× (int8) or 16× (1bit) fewer bytes. Deduplication and diversity always compare the fp16
features.

* ``round_robin`` (``rds``): subtasks take turns, each adding its best example (by its mean)
  not yet taken.

Selection
=========
The pool is every example, or those of the chosen ``sources``, narrowed by the quality filters
(see :mod:`gradstore.selection.options`). The strategy scores the pool, or orders it. Scored
examples are ranked by score, descending, ties broken by row, ascending (``np.lexsort``), so a
selection is a pure function of the scores. The budget is ``k`` examples or
``ceil(fraction × pool)``. Walking the ranking (or the strategy's order), a candidate is skipped when its source already has ``per_source_cap`` selected examples,
or when its similarity to an already selected example exceeds ``dedup_threshold``; the similarity
of two training examples is ``Σ_c w_c · cos(f_c(x), f_c(y))`` with the checkpoints and weights
the strategy used (the manifest's for strategies that use no gradients). Deduplication reads the candidates' features in blocks and keeps the selected examples'
features (``selected × k × checkpoints`` float16) in memory.

Errors in a query raise :class:`SelectionError` (a ``ValueError``) naming what is wrong; a
damaged store raises the indexer's ``StoreError``.
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import ValidationError

from gradstore.datastore import Datastore
from gradstore.datastore.layout import FULL_PRECISION, PRECISIONS
from gradstore.datastore.quantized import QuantizedFeatures
from gradstore.indexer.errors import FeatureNotStoredError, StoreError
from gradstore.indexer.faiss_index import normalized_weights

from .context import SelectionContext, StrategyResult
from .errors import SelectionError
from .options import EXPORT_FORMATS, SelectionOptions
from .quantized_scan import QuantizedScanKernel
from .scan import ScanKernel, default_backend, restore_torch_threads, single_threaded_worker
from .scan import scan_threads as default_scan_threads
from .strategies import get_strategy, strategy_names
from .targets import TargetSet, check_origin, store_origin

AGGREGATIONS = ("less", "max", "mean")
# What a scan's workers multiply with: float16 rows, or the rows of a quantised copy.
Kernel = ScanKernel | QuantizedScanKernel
# Per-checkpoint scores stored beside each feature (combined over checkpoints by weight).
_FEATURE_SCORES = ("loss", "grad_norm", "feature_norm")
# Rows per scoring batch are chosen so the batches of all scan workers together stay near this
# size in float32 (decoded Parquet batches are half that; memory-mapped ones cost nothing).
_BATCH_BYTES = 64 << 20
# Candidates read per deduplication block, and per chunk of selected vectors compared at once.
_DEDUP_BLOCK_MIN, _DEDUP_BLOCK_MAX = 256, 4096
_DEDUP_CHUNK = 4096


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
    checkpoints: list[str]   # checkpoints used (none for representation scores)
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

    def result(self, aggregation: str) -> StrategyResult:
        """These scores aggregated, as a strategy's answer."""
        return StrategyResult(scores=self.aggregate(aggregation), per_subtask=self.per_subtask,
                              subtasks=self.subtasks, checkpoints=self.checkpoints,
                              weights=[float(w) for w in self.weights], report={"aggregation": aggregation})

    def round_robin(self, pool: np.ndarray) -> StrategyResult:
        """The pool ordered by turns: subtask ``s`` (in order of first appearance) adds its
        highest-scoring example (by its mean) not yet taken, then the next subtask does."""
        rankings = [rank(pool, self.per_subtask[:, s]) for s in range(len(self.subtasks))]
        taken = np.zeros(len(self.per_subtask), dtype=bool)
        order, order_scores, cursors = [], [], [0] * len(rankings)
        while len(order) < len(pool):
            for s, ranking in enumerate(rankings):
                while cursors[s] < len(ranking) and taken[ranking[cursors[s]]]:
                    cursors[s] += 1
                if cursors[s] == len(ranking):
                    continue
                row = int(ranking[cursors[s]])
                taken[row] = True
                order.append(row)
                order_scores.append(self.per_subtask[row, s])
        return StrategyResult(order=np.asarray(order, dtype=np.int64),
                              order_scores=np.asarray(order_scores, dtype=np.float32),
                              per_subtask=self.per_subtask, subtasks=self.subtasks,
                              checkpoints=self.checkpoints, weights=[float(w) for w in self.weights],
                              report={"aggregation": "round_robin"})


@dataclass
class Selection:
    """A ranked selection: row ``rows[i]`` has rank ``i + 1``."""

    rows: np.ndarray            # int64 (n,)
    scores: np.ndarray          # float32 (n,): the strategy's score (or order score) of each
    subtask_scores: np.ndarray  # float32 (n, S), mean score per subtask (S = 0 without targets)
    subtasks: list[str]
    ids: list[str]
    sources: list[str]
    pool: int                   # examples eligible after the source and quality filters
    strategy: dict              # the strategy's name and options, as given
    checkpoints: list[str]      # gradient checkpoints used (scoring or deduplication)
    weights: list[float]
    ranking: np.ndarray = field(repr=False)          # int64: the whole pool ranked (or ordered)
    ranking_scores: np.ndarray = field(repr=False)   # float32: their scores
    per_subtask: np.ndarray | None = field(default=None, repr=False)  # float32 (N, S), row order
    report: dict = field(default_factory=dict)       # the strategy's report, the pool's filtering

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
    ``scan_backend`` picks the kernel (one of ``scan.BACKENDS``: ``"numba"``, ``"torch"``,
    ``"numpy"``; default: the first installed); scans of a quantised copy use numba's kernel with
    ``"numba"``, numpy's otherwise.
    """

    def __init__(self, store: Datastore, scan_threads: int | None = None, scan_backend: str | None = None):
        self.store = store
        self.scan_threads = scan_threads or default_scan_threads()
        self.scan_backend = scan_backend or default_backend()
        ScanKernel(1, self.scan_backend)  # refuses an unknown backend now rather than mid-scan

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
               weights: Mapping[str, float] | None = None, precision: str = FULL_PRECISION) -> Scores:
        """Every example's per-subtask mean LESS score and maximum score over the targets (streamed),
        from the stored float16 features or, with ``precision`` ``int8`` or ``1bit``, from the
        store's quantised copy of that kind (approximate scores; see ``gradstore.datastore.quantized``)."""
        names, w = self.resolve_checkpoints(checkpoints, weights)
        self.check_targets(targets, names)
        used = [(name, weight) for name, weight in zip(names, w) if weight > 0]
        dim = self.store.dim
        if precision == FULL_PRECISION:
            def matrices(shard: int) -> list[np.ndarray]:
                return [self.store.raw_features(name, shard) for name, _ in used]

            def make_kernel() -> ScanKernel:
                return ScanKernel(dim, self.scan_backend)
        else:
            self._check_precision(precision)

            def matrices(shard: int) -> list[QuantizedFeatures]:
                return [self.store.quantized_features(precision, name, shard) for name, _ in used]

            def make_kernel() -> QuantizedScanKernel:  # numba's where the fp16 scan uses numba's
                return QuantizedScanKernel(precision, dim, "numba" if self.scan_backend == "numba" else "numpy")

        # (T, k) per checkpoint, the weight folded in: query @ feature = w_c · cos(f_c, g_c).
        queries = [np.float32(weight) * targets.vectors[name] for name, weight in used]
        per_subtask, best, subtasks, counts = self._target_scores(targets, queries, matrices, make_kernel,
                                                                  [name for name, _ in used])
        return Scores(per_subtask, best, subtasks, counts, names, w)

    def _check_precision(self, precision: str) -> None:
        if precision not in PRECISIONS:
            raise SelectionError(f"unknown precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
        stored = self.store.manifest.features.quantized
        if precision not in stored:
            raise SelectionError(f"{self.store.path}: no {precision} copy of the features to scan (the store has "
                                 f"{', '.join(stored) or 'none'}); add one with `gradstore quantize {self.store.path} "
                                 f"--kind {precision}`, or scan at precision {FULL_PRECISION}")

    def representation_scores(self, targets: TargetSet) -> Scores:
        """Every example's per-subtask mean and maximum cosine of its representation vector with
        the targets' (the ``rds`` strategy; streamed like :meth:`scores`)."""
        if not isinstance(targets, TargetSet):
            raise SelectionError(f"targets must be a TargetSet, got {type(targets).__name__}")
        if not self.store.has_representations:
            raise SelectionError(f"{self.store.path}: this datastore has no representation vectors (it was "
                                 f"indexed without them); re-index it with representations to use strategy 'rds'")
        dim = self.store.representation_dim
        if targets.representations is None:
            raise SelectionError("the targets have no representation vectors: give target records or a target "
                                 "datastore indexed with representations")
        if targets.representations.shape[1] != dim:
            raise SelectionError(f"target representations have dimension {targets.representations.shape[1]}, "
                                 f"the datastore's have {dim}")
        if targets.origin is not None and targets.origin.get("model_sha256") != self.store.manifest.model.sha256:
            raise SelectionError("the target representations come from another model than the datastore's; compute "
                                 "them with this datastore's model")

        def matrices(shard: int) -> list[np.ndarray]:
            return [self.store.raw_representations(shard)]

        per_subtask, best, subtasks, counts = self._target_scores(
            targets, [targets.representations], matrices, lambda: ScanKernel(dim, self.scan_backend),
            ["representations"])
        return Scores(per_subtask, best, subtasks, counts, [], np.zeros(0, dtype=np.float32))

    def _target_scores(self, targets: TargetSet, queries: list[np.ndarray], matrices: Callable[[int], list],
                       make_kernel: Callable[[], Kernel], names: list[str]):
        """Per-subtask means ``(N, S)`` and maxima ``(N,)`` over the targets of
        ``Σ_space queries_space @ features_space.T``, with the subtask names and counts;
        ``matrices(shard)`` gives the shard's rows of each space, as the kernels ``make_kernel()``
        makes read them (float16 matrices, or quantised copies)."""
        subtasks = targets.subtask_names()
        code_of = {name: i for i, name in enumerate(subtasks)}
        codes = np.array([code_of[s] for s in targets.subtasks], dtype=np.int64)
        counts = np.bincount(codes, minlength=len(subtasks)).astype(np.int64)
        # Targets ordered by subtask, so a subtask's scores are adjacent columns (np.add.reduceat).
        order = np.argsort(codes, kind="stable")
        first_of_subtask = np.searchsorted(codes[order], np.arange(len(subtasks)))
        queries = [np.ascontiguousarray(query[order], dtype=np.float32) for query in queries]
        n = self.store.num_rows
        held = sum(shard.num_rows for shard in self.store.shards)
        if held != n:
            raise StoreError(f"{self.store.path}: the shards hold {held} rows, the store {n}")
        per_subtask = np.zeros((n, len(subtasks)), dtype=np.float32)
        best = np.zeros(n, dtype=np.float32)
        share = max(queries[0].shape[1], targets.num_targets) * 4 * self.scan_threads
        batch_rows = max(1, min(65536, _BATCH_BYTES // share))
        inverse_counts = (1 / counts).astype(np.float32)

        def reduce(total: np.ndarray, rows: slice) -> None:  # total: (T, rows)
            np.max(total, axis=0, out=best[rows])
            np.multiply(np.add.reduceat(total, first_of_subtask, axis=0).T, inverse_counts, out=per_subtask[rows])

        self._scan(names, queries, matrices, make_kernel, batch_rows, reduce)
        return per_subtask, best, subtasks, counts

    def _scan(self, names: list[str], queries: list[np.ndarray], matrices: Callable[[int], list],
              make_kernel: Callable[[], Kernel], batch_rows: int, reduce: Callable[[np.ndarray, slice], None]) -> None:
        """``reduce(Σ_i queries_i @ features_i.T, rows)`` (targets × rows) for every row batch of
        the store, ``rows`` the batch's slice of the store's rows; the shards are shared out
        between worker threads, each with its own kernel, which call ``reduce`` on their own rows."""
        kernels = threading.local()

        def scan_shard(shard: int) -> None:
            if not hasattr(kernels, "kernel"):
                kernels.kernel = make_kernel()
            spaces = matrices(shard)
            self._check_rows(shard, names, spaces)
            first_row = self.store.shards[shard].first_row
            for start in range(0, len(spaces[0]), batch_rows):
                total = np.zeros((queries[0].shape[0], min(batch_rows, len(spaces[0]) - start)), dtype=np.float32)
                for features, query in zip(spaces, queries):
                    kernels.kernel.add_products(features, query, total, start)
                reduce(total, slice(first_row + start, first_row + start + total.shape[1]))

        pool = ThreadPoolExecutor(self.scan_threads, thread_name_prefix="gradstore-scan",
                                  initializer=single_threaded_worker)
        try:
            for _ in pool.map(scan_shard, range(len(self.store.shards))):
                pass
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # after an error, skip the shards not begun
            restore_torch_threads()

    def _check_rows(self, shard: int, names: list[str], spaces: list[np.ndarray]) -> None:
        expected = self.store.shards[shard].num_rows
        if len(spaces[0]) != expected:
            raise StoreError(f"{self.store.path}: shard {shard}: checkpoint {names[0]!r} has {len(spaces[0])} "
                             f"feature rows, the manifest lists {expected}")
        for name, features in zip(names[1:], spaces[1:]):
            if len(features) != len(spaces[0]):
                raise StoreError(f"{self.store.path}: shard {shard}: checkpoint {name!r} has {len(features)} "
                                 f"feature rows, checkpoint {names[0]!r} has {len(spaces[0])}")

    def score_values(self, name: str, checkpoint: str | None = None) -> np.ndarray:
        """float32 ``(N,)``, row order: a stored per-example score (see ``Datastore.scores``)."""
        if checkpoint is not None and checkpoint not in self.store.checkpoint_names:
            raise SelectionError(f"unknown checkpoint {checkpoint!r}: the datastore has {self.store.checkpoint_names}")
        try:
            return np.asarray(self.store.scores(name, checkpoint), dtype=np.float32)
        except FeatureNotStoredError as err:  # a question the store cannot answer, not a damaged store
            raise SelectionError(str(err)) from None

    # -- selection ----------------------------------------------------------------------------

    def select(self, targets: TargetSet | None, options: SelectionOptions | Mapping) -> Selection:
        """Run the strategy of ``options`` on the pool left by its filters, then take the budget
        under its caps and deduplication (see the module docstring)."""
        options = selection_options(options)
        strategy = get_strategy(options.strategy.name)
        if strategy.needs_targets == "none" and targets is not None:
            raise SelectionError(f"strategy {strategy.name!r} does not use targets; leave them out")
        if strategy.needs_targets == "required" and targets is None:
            raise SelectionError(f"strategy {strategy.name!r} needs targets: give target records, a target "
                                 f"datastore or target vectors")
        pool, report = self.filtered_pool(options)
        budget = options.budget(len(pool))
        result = strategy().run(SelectionContext(self, targets, pool, budget), options.strategy)
        ranking, ranking_scores = self._ranked(result, pool)
        names, weights = (result.checkpoints, np.asarray(result.weights, dtype=np.float32)) if result.checkpoints \
            else self.resolve_checkpoints()
        if options.diversity_weight:
            chosen = self._diverse(result, ranking, ranking_scores, budget, options.diversity_weight,
                                   strategy.features)
            report["diversity_weight"] = options.diversity_weight
        elif options.dedup_threshold is not None:
            chosen = self._greedy_dedup(ranking, budget, options.per_source_cap, options.dedup_threshold,
                                        dict(zip(names, weights)))
        elif options.per_source_cap is not None:
            chosen = self._capped(ranking, budget, options.per_source_cap)
        else:
            chosen = ranking[:budget]
        rows = np.asarray(chosen, dtype=np.int64)
        position = np.empty(self.store.num_rows, dtype=np.int64)
        position[ranking] = np.arange(len(ranking))
        per_subtask = result.per_subtask
        subtask_scores = per_subtask[rows] if per_subtask is not None else np.zeros((len(rows), 0), np.float32)
        ids, sources = self.ids_and_sources(rows)
        return Selection(rows=rows, scores=ranking_scores[position[rows]], subtask_scores=subtask_scores,
                         subtasks=list(result.subtasks), ids=ids, sources=sources, pool=len(pool),
                         strategy=options.strategy.model_dump(mode="json"), checkpoints=list(names),
                         weights=[float(x) for x in weights], ranking=ranking, ranking_scores=ranking_scores,
                         per_subtask=per_subtask, report={**report, **result.report})

    def _diverse(self, result: StrategyResult, ranking: np.ndarray, ranking_scores: np.ndarray,
                 budget: int, weight: float, features: tuple[str, ...]) -> np.ndarray:
        """``budget`` rows of a ranking re-ranked by maximal marginal relevance, similarities in the
        strategy's space: its representations, else the gradients it scored with (the manifest's
        checkpoints for strategies that use none)."""
        from .feature_space import feature_space
        from .mmr import mmr_rerank

        if result.order is not None:
            raise SelectionError("diversity_weight re-ranks a ranking; this strategy gives an ordered subset "
                                 "(leave diversity_weight out)")
        if features == ("representations",):
            space = feature_space(self, None, "representations")
        else:
            space = feature_space(self, None, "gradients", result.checkpoints or None,
                                  dict(zip(result.checkpoints, result.weights)) if result.checkpoints else None)
        return mmr_rerank(ranking, ranking_scores, space.gather, budget, weight)

    def filtered_pool(self, options: SelectionOptions) -> tuple[np.ndarray, dict]:
        """The rows of ``options.sources`` (all when None) that pass its quality filters, and a
        report of each filter's threshold and the pool left. Quantiles are inclusive, so every
        filter keeps at least one example."""
        pool = self.pool(options.sources)
        steps = []
        for item in options.filters or []:
            values = self.score_values(item.score, item.checkpoint)[pool]
            threshold = float(np.quantile(values, item.quantile))
            pool = pool[values >= threshold] if item.keep == "above" else pool[values <= threshold]
            steps.append({**item.model_dump(mode="json"), "threshold": threshold, "pool": int(len(pool))})
        return pool, ({"filters": steps} if steps else {})

    def _ranked(self, result: StrategyResult, pool: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The pool ranked by the result's scores, or the result's order (checked to be pool rows,
        each once), with the score of each ranked row."""
        if result.order is None:
            scores = np.asarray(result.scores, dtype=np.float32)
            if scores.shape != (self.store.num_rows,):
                raise ValueError(f"a strategy gave {scores.shape} scores for {self.store.num_rows} examples")
            ranking = rank(pool, scores)
            return ranking, scores[ranking]
        order = np.asarray(result.order, dtype=np.int64)
        if len(np.unique(order)) != len(order) or not np.isin(order, pool).all():
            raise ValueError("a strategy ordered rows outside the pool, or a row twice")
        return order, np.asarray(result.order_scores, dtype=np.float32)

    def pool(self, sources: Sequence[str] | None = None) -> np.ndarray:
        """Rows (ascending) of the live examples of ``sources`` (all live examples when None)."""
        if sources is None:
            return self.store.live_rows()
        known = list(self.store.manifest.counts.by_source)
        unknown = [s for s in sources if s not in known]
        if unknown:
            raise SelectionError(f"unknown source {unknown[0]!r}: the datastore has {known}")
        codes, names = self._sources()
        wanted = [names.index(s) for s in sources if s in names]
        rows = np.flatnonzero(np.isin(codes, wanted)).astype(np.int64)
        return rows[self.store.is_live(rows)]

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

    # -- reading rows (the datastore's gathers, with the query's errors) ---------------------

    def features_at(self, checkpoint: str, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """float16 ``(len(rows), k)``: one checkpoint's features of ``rows``, in the given order."""
        if checkpoint not in self.store.checkpoint_names:
            raise SelectionError(f"unknown checkpoint {checkpoint!r}: the datastore has {self.store.checkpoint_names}")
        return self.store.features_at(checkpoint, self._checked_rows(rows))

    def records_at(self, rows: Sequence[int] | np.ndarray) -> list[str]:
        """The stored JSON text of the records of ``rows``, in the given order."""
        return self.store.records_at(self._checked_rows(rows))

    def ids_and_sources(self, rows: Sequence[int] | np.ndarray) -> tuple[list[str], list[str]]:
        return self.store.ids_and_sources(self._checked_rows(rows))

    def _checked_rows(self, rows) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if len(rows) and (rows.min() < 0 or rows.max() >= self.store.num_rows):
            raise SelectionError(f"rows must be in 0..{self.store.num_rows - 1}")
        return rows

    def _sources(self) -> tuple[np.ndarray, list[str]]:
        """Per-row source codes (int32) and the source names they index."""
        return self.store.source_codes()

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
        if selection.per_subtask is not None:
            per_subtask = selection.per_subtask[ranking]
            for i, name in enumerate(selection.subtasks):
                columns[f"score_{name}"] = pa.array(np.ascontiguousarray(per_subtask[:, i]))
        table = pa.table(columns)
        return _atomic_write(Path(path), lambda tmp: pq.write_table(table, tmp))


# ------------------------------------------------------------------------------------ helpers


def selection_options(options: SelectionOptions | Mapping) -> SelectionOptions:
    """``options`` as a validated :class:`SelectionOptions` (a mapping is validated; a model is
    validated again, so one built with ``model_construct`` or changed after creation is checked);
    what is wrong becomes a :class:`SelectionError` naming the field."""
    if isinstance(options, SelectionOptions):
        options = options.model_dump(exclude_unset=True)
    elif not isinstance(options, Mapping):
        raise SelectionError(f"options must be SelectionOptions or a mapping, got {type(options).__name__}")
    try:
        return SelectionOptions.model_validate(dict(options))
    except ValidationError as err:
        raise SelectionError(describe_validation_error(err)) from None


def describe_validation_error(err: ValidationError) -> str:
    """One line per error: ``where: what`` (``strategy.score: Field required``)."""
    parts = []
    for item in err.errors():
        loc = list(item["loc"])
        if len(loc) > 1 and loc[0] == "strategy" and loc[1] in strategy_names():
            del loc[1]  # the union member's tag, which the strategy's name already says
        where = ".".join(str(part) for part in loc)
        message = item["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts)


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
