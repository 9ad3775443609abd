"""What a datastore holds and what a selection chose, as small summaries for pages and reports.

Every function here reads a store through :class:`~gradstore.selection.engine.SelectionEngine`
(or its :class:`~gradstore.datastore.Datastore`) and answers a wire model of
``gradstore.client.models``, so the REST routes (``stats``, ``examples``, ``map``, selection
``summary``) and ``gradstore report`` give the same numbers from the same code.

- :func:`store_stats`: examples per source and histograms of token length and, per checkpoint, of
  every per-example score the store holds (``Datastore.score_names``: loss, gradient norm,
  feature norm and the quality scores such as ``nuclear_norm``, ``effective_rank``, ``vog``).
- :func:`example_page`: a page of stored examples in row order, optionally only those whose id or
  record text contains a query (case-insensitive); read shard by shard, so memory stays bounded
  by one shard's examples whatever the store's size.
- :func:`pool_map`: 2-D PCA coordinates of a seeded sample of the pool, and the projection of
  other rows and of target vectors onto the same two axes (see the function for the maths).
- :func:`selection_summary`: composition per source against the eligible pool, the pool's score
  histogram with the selection's cut-off, and the per-subtask breakdown.

Histograms have ``bins`` equal-width bins between the finite minimum and maximum (numpy's
``histogram``); NaN and infinite values are counted as ``missing``, never binned.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from gradstore.client.models import (
    CheckpointSummary,
    DatastoreDetail,
    DatastoreStats,
    Example,
    ExamplePage,
    ExampleScore,
    Histogram,
    MapPoints,
    MapResponse,
    SelectionSummary,
    SourceShare,
    SubtaskSummary,
)
from gradstore.datastore import Manifest

from .engine import Selection, SelectionEngine
from .errors import SelectionError
from .targets import TargetSet

DEFAULT_BINS = 30
#: Scores a store keeps once per example (in its example files), not per checkpoint
#: (``Datastore.scores(name)`` takes no checkpoint for them).
EXAMPLE_SCORES = ("vog",)
EXAMPLE_COLUMNS = ["row", "id", "source", "record", "num_tokens", "num_label_tokens", "truncated"]


# ------------------------------------------------------------------------------------ histograms


def histogram(name: str, values, bins: int = DEFAULT_BINS, checkpoint: str | None = None,
              edges: np.ndarray | None = None) -> Histogram:
    """A :class:`Histogram` of ``values`` (finite ones binned, the others counted as missing);
    ``edges`` fixes the bins (to compare two histograms), else ``bins`` equal-width bins."""
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    finite = values[np.isfinite(values)]
    missing = int(len(values) - len(finite))
    if edges is None:
        if len(finite) == 0:
            return Histogram(name=name, checkpoint=checkpoint, edges=[], counts=[], count=0, missing=missing)
        low, high = float(finite.min()), float(finite.max())
        if low == high:  # one value: one bin around it
            low, high = low - 0.5, high + 0.5
        edges = np.linspace(low, high, bins + 1)
    counts, edges = np.histogram(finite, bins=edges)
    return Histogram(name=name, checkpoint=checkpoint, edges=edges.tolist(), counts=counts.tolist(),
                     count=int(len(finite)), missing=missing,
                     min=float(finite.min()) if len(finite) else None,
                     max=float(finite.max()) if len(finite) else None,
                     mean=float(finite.mean()) if len(finite) else None)


# -------------------------------------------------------------------------------------- describe


def summary_fields(name: str, manifest: Manifest) -> dict:
    """The fields of a ``DatastoreSummary`` of a store's manifest."""
    return dict(
        name=name, examples=manifest.counts.examples, dim=manifest.features.dim,
        checkpoints=[CheckpointSummary(name=c.name, weight=c.weight, learning_rate=c.learning_rate)
                     for c in manifest.checkpoints],
        gradient_type=manifest.gradient_type,
        index=manifest.index.kind if manifest.index is not None else None,
    )


def datastore_detail(name: str, manifest: Manifest) -> DatastoreDetail:
    m = manifest
    return DatastoreDetail(
        **summary_fields(name, m), sources=m.counts.by_source, model=m.model.model_dump(),
        lora=m.lora.model_dump(), projection=m.projection, tokens=m.tokens, created_at=m.created_at,
        gradstore_version=m.gradstore_version, version=m.version, updated_at=m.updated_at,
    )


# ----------------------------------------------------------------------------------------- stats


def store_stats(engine: SelectionEngine, name: str, bins: int = DEFAULT_BINS) -> DatastoreStats:
    """Examples per source and the histograms named in the module docstring."""
    store = engine.store
    live = store.live_rows()
    tokens = store.examples(columns=["num_tokens"], live_only=True).column("num_tokens")
    histograms = [histogram("num_tokens", tokens.to_numpy(), bins)]
    for score in store.score_names:
        checkpoints = [None] if score in EXAMPLE_SCORES else store.checkpoint_names
        histograms += [histogram(score, store.scores(score, checkpoint)[live], bins, checkpoint)
                       for checkpoint in checkpoints]
    return DatastoreStats(datastore=name, examples=store.num_examples, sources=dict(store.manifest.counts.by_source),
                          histograms=histograms, scores=list(store.score_names))


# -------------------------------------------------------------------------------------- examples


def example_page(engine: SelectionEngine, name: str, offset: int, limit: int, query: str | None = None) -> ExamplePage:
    """Live examples ``offset .. offset+limit`` in row order, of all examples or of those whose id
    or record text contains ``query`` (case-insensitive); ``total`` counts all that match."""
    store = engine.store
    query = query or None
    items: list[Example] = []
    total = 0
    removed = store.removed_rows()
    for shard, info in enumerate(store.shards):
        path = store.examples_file(shard)
        if query is None:
            size = info.num_rows - int(np.count_nonzero((removed >= info.first_row)
                                                        & (removed < info.first_row + info.num_rows)))
            first, total = total, total + size
            if first + size <= offset or first >= offset + limit:
                continue  # no row of the page in this shard: not read
            table = _live(pq.read_table(path, columns=EXAMPLE_COLUMNS, memory_map=True), store)
        else:
            table = _live(pq.read_table(path, columns=EXAMPLE_COLUMNS, memory_map=True), store)
            matches = pc.or_(pc.match_substring(table.column("id"), query, ignore_case=True),
                             pc.match_substring(table.column("record"), query, ignore_case=True))
            table = table.filter(matches)
            first, total = total, total + table.num_rows
        start = max(offset - first, 0)
        stop = min(offset + limit - first, table.num_rows)
        if start < stop:
            items += [example_model(columns) for columns in table.slice(start, stop - start).to_pylist()]
    with_scores(engine, items)
    return ExamplePage(datastore=name, total=total, offset=offset, limit=limit, query=query, items=items)


def _live(table: pa.Table, store) -> pa.Table:
    """``table`` without its removed rows (by its ``row`` column)."""
    if not store.manifest.counts.removed:
        return table
    return table.filter(pa.array(store.is_live(table.column("row").to_numpy())))


def example_model(columns: dict) -> Example:
    """The wire form of a stored example: the record parsed back from its JSON text (without its
    scores: see :func:`with_scores`)."""
    return Example(row=columns["row"], id=columns["id"], source=columns["source"],
                   record=json.loads(columns["record"]), num_tokens=columns["num_tokens"],
                   num_label_tokens=columns["num_label_tokens"], truncated=columns["truncated"])


def with_scores(engine: SelectionEngine, examples: list[Example]) -> list[Example]:
    """Fill each example's ``scores``: the store's scores kept in its example files (``vog``), then
    per checkpoint those in its scores files (only the shards holding the examples are read)."""
    if not examples:
        return examples
    store = engine.store
    rows = np.array([example.row for example in examples], dtype=np.int64)
    shard_of = np.array([store.shard_of(row) for row in rows], dtype=np.int64)
    files = [(None, store.examples_file)]
    files += [(c, lambda shard, c=c: store.scores_file(c, shard)) for c in store.checkpoint_names]
    for checkpoint, path_of in files:
        names = pq.read_schema(path_of(0)).names
        wanted = [score for score in store.score_names if score in names]
        if not wanted:
            continue
        for shard in np.unique(shard_of):
            table = pq.read_table(path_of(int(shard)), columns=wanted, memory_map=True)
            for i in np.flatnonzero(shard_of == shard):
                local = int(rows[i] - store.shards[shard].first_row)
                for column in wanted:
                    value = table.column(column)[local].as_py()
                    finite = value is not None and np.isfinite(value)
                    examples[i].scores.append(ExampleScore(name=column, checkpoint=checkpoint,
                                                           value=float(value) if finite else None))
    return examples


# ------------------------------------------------------------------------------------------- map


def pool_map(engine: SelectionEngine, name: str, sample: int, seed: int = 0, rows: Sequence[int] = (),
             targets: TargetSet | None = None) -> MapResponse:
    """2-D PCA map of a seeded sample of the pool, with ``rows`` and ``targets`` placed on it.

    An example's vector is ``x = concat_c sqrt(w_c) · f_c`` (the FAISS index's layout: inner
    products are LESS influences), over the manifest's checkpoints and normalised weights. The
    sample is ``min(sample, N)`` rows drawn without replacement with ``numpy.random.default_rng(seed)``,
    sorted. PCA of the centred sample ``X - μ`` is computed from its Gram matrix
    ``G = Σ_c w_c (F_c - μ_c)(F_c - μ_c)ᵀ`` (``n × n``: cheap when the dimension is large):
    with ``G u_j = λ_j u_j``, sample point ``i`` sits at ``sqrt(λ_j) u_ij`` and the axis is
    ``v_j = (X - μ)ᵀ u_j / sqrt(λ_j)``, so any other vector ``y`` sits at ``(y - μ) · v_j``.
    Target vectors are L2-normalised per checkpoint first, like the stored features. The sign of
    each axis is fixed so that its largest-magnitude sample coordinate is positive.
    """
    store = engine.store
    names = store.checkpoint_names
    weights = store.weights
    live = store.live_rows()
    total = len(live)
    if total < 2:
        raise SelectionError(f"a map needs at least 2 examples; the datastore has {total}")
    chosen = np.sort(np.random.default_rng(seed).choice(live, size=min(sample, total), replace=False))
    blocks = [engine.features_at(c, chosen).astype(np.float64) for c in names]
    means = [block.mean(axis=0) for block in blocks]
    gram = np.zeros((len(chosen), len(chosen)))
    for w, block, mean in zip(weights, blocks, means):
        centred = block - mean
        gram += w * (centred @ centred.T)
    eigenvalues, eigenvectors = np.linalg.eigh(gram)
    order = np.argsort(eigenvalues)[::-1][:2]
    lam = np.clip(eigenvalues[order], 0.0, None)
    u = eigenvectors[:, order]
    coords = u * np.sqrt(lam)
    signs = np.sign(coords[np.abs(coords).argmax(axis=0), [0, 1]])
    signs[signs == 0] = 1.0
    coords *= signs
    safe = np.where(lam > 0, np.sqrt(lam), 1.0)
    axes = [np.sqrt(w) * ((block - mean).T @ u) / safe * signs for w, block, mean in zip(weights, blocks, means)]

    def place(vectors: list[np.ndarray]) -> np.ndarray:
        return sum(np.sqrt(w) * (v - mean) @ axis for w, v, mean, axis in zip(weights, vectors, means, axes))

    placed = MapPoints(rows=[], x=[], y=[])
    if len(rows):
        rows = np.asarray(rows, dtype=np.int64)
        xy = place([engine.features_at(c, rows).astype(np.float64) for c in names])
        placed = MapPoints(rows=rows.tolist(), x=xy[:, 0].tolist(), y=xy[:, 1].tolist())
    target_points = None
    if targets is not None:
        engine.check_targets(targets, names)
        vectors = []
        for c in names:
            v = np.asarray(targets.vectors[c], dtype=np.float64)
            norms = np.linalg.norm(v, axis=1, keepdims=True)
            vectors.append(v / np.where(norms > 0, norms, 1.0))
        xy = place(vectors)
        target_points = MapPoints(x=xy[:, 0].tolist(), y=xy[:, 1].tolist(), subtasks=list(targets.subtasks))
    spread = float(np.trace(gram))
    explained = (lam / spread).tolist() if spread > 0 else [0.0, 0.0]
    _, sources = engine.ids_and_sources(chosen)
    return MapResponse(datastore=name, examples=total, explained_variance=explained,
                       sample=MapPoints(rows=chosen.tolist(), x=coords[:, 0].tolist(), y=coords[:, 1].tolist(),
                                        sources=sources),
                       rows=placed, targets=target_points)


# ------------------------------------------------------------------------------------- selection


def selection_summary(engine: SelectionEngine, selection: Selection, name: str, selection_id: str | None,
                      bins: int = DEFAULT_BINS) -> SelectionSummary:
    """Composition, score histogram with cut-off and per-subtask breakdown of a selection."""
    _, pool_sources = engine.ids_and_sources(selection.ranking)
    return summarize(name, selection_id, pool=selection.pool, pool_sources=Counter(pool_sources),
                     selected_sources=selection.sources, pool_scores=selection.ranking_scores,
                     selected_scores=selection.scores, subtasks=selection.subtasks,
                     targets=[None] * len(selection.subtasks), subtask_scores=selection.subtask_scores, bins=bins)


def summarize(name: str, selection_id: str | None, *, pool: int, pool_sources: dict[str, int],
              selected_sources: Sequence[str], pool_scores, selected_scores, subtasks: list[str],
              targets: list[int | None], subtask_scores, bins: int = DEFAULT_BINS) -> SelectionSummary:
    """A :class:`SelectionSummary` from its parts (``pool_scores`` of every eligible example, or
    None when unknown: the histogram then covers the selection alone)."""
    chosen = Counter(selected_sources)
    composition = [SourceShare(source=s, pool=pool_sources[s], selected=chosen.get(s, 0)) for s in sorted(pool_sources)]
    selected_scores = np.asarray(selected_scores, dtype=np.float64)
    pool_histogram = histogram("score", selected_scores if pool_scores is None else pool_scores, bins)
    edges = np.asarray(pool_histogram.edges) if pool_histogram.edges else None
    return SelectionSummary(
        datastore=name, selection_id=selection_id, total=len(selected_scores), pool=pool,
        cutoff=float(selected_scores.min()) if len(selected_scores) else None,
        pool_scores=pool_histogram, selected_scores=histogram("score", selected_scores, bins, edges=edges),
        pool_scores_known=pool_scores is not None, composition=composition,
        subtasks=subtask_breakdown(subtasks, targets, subtask_scores))


def subtask_breakdown(subtasks: list[str], targets: list[int | None], subtask_scores) -> list[SubtaskSummary]:
    """Per subtask: its targets (when known), the mean of its score over the selected examples, and how many
    selected examples score highest on it (ties to the first subtask)."""
    if not subtasks:  # a strategy without targets
        return []
    scores = np.asarray(subtask_scores, dtype=np.float64).reshape(-1, len(subtasks))
    best = np.bincount(scores.argmax(axis=1), minlength=len(subtasks)) if len(scores) else np.zeros(len(subtasks))
    return [SubtaskSummary(name=s, targets=t, mean_score=float(scores[:, i].mean()) if len(scores) else None,
                           best_for=int(best[i]))
            for i, (s, t) in enumerate(zip(subtasks, targets))]
