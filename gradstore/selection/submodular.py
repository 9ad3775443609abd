"""Submodular subset selection over a sparse similarity graph, by (stochastic) greedy: MILO's core.

MILO (arXiv 2301.13287) selects data model-agnostically by maximising a submodular function of
fixed features' similarities with stochastic greedy, and orders the data easy to hard by the
greedy's per-example gains.

Similarity graph
================
:func:`knn_graph` links every pool point to its ``neighbors`` nearest points by inner product
(FAISS: exact for small pools, an IVF index with ``nprobe`` lists probed otherwise), keeps the
positive similarities, symmetrises (``s_ij = s_ji``) and adds each point's self-similarity
``s_ii = ‖x_i‖²``: a CSR matrix with at most ``n · (2 · neighbors + 1)`` entries. Missing pairs
count as similarity 0.

Objectives (ground weights ``w_i >= 0``, mean 1; all 1 without targets)
=======================================================================
* facility location: ``f(S) = Σ_i w_i · max_{j ∈ S} s_ij`` (0 for an empty ``S``): monotone
  submodular; a point's gain is how much closer it brings its neighbours to the selection;
* graph cut: ``f(S) = Σ_i Σ_{j ∈ S} w_i s_ij − λ Σ_{i ∈ S} Σ_{j ∈ S} s_ij``: submodular, monotone
  for ``λ <= 1/2`` on non-negative weights; ``λ`` trades representativeness against diversity.

Greedy
======
:func:`greedy` adds, ``budget`` times, the candidate of largest gain (ties: lowest index) among
all remaining points (``epsilon = 0``, plain greedy: at least ``(1 − 1/e)`` of the optimum for a
monotone submodular ``f``), or among a uniform sample of ``⌈(n / budget) · ln(1/ε)⌉`` remaining
points (stochastic greedy, Mirzasoleiman et al. 2015: ``(1 − 1/e − ε)`` of the optimum in
expectation, from ``O(n · ln(1/ε))`` gain evaluations in all). A facility-location gain costs
the candidate's degree; a graph-cut gain is ``O(1)`` (its modular part precomputed, its penalty
kept up to date as points are added).

Curriculum
==========
The greedy order is MILO's easy-to-hard order: early points have large gains (representative,
"easy"), late ones small gains. :func:`taylor_softmax` turns gains into MILO's sampling
probabilities, ``p_i ∝ 1 + x_i + x_i² / 2`` with ``x_i = (g_i / max g) / τ``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import SelectionError
from .feature_space import FeatureSpace, blocks, gather_all
from .strategies._geometric import Objective

OBJECTIVES: tuple[str, ...] = Objective.__args__
DEFAULT_NEIGHBORS = 10
# Below this many points the neighbours are exact (a flat index); above, an IVF index.
EXACT_NEIGHBORS_BELOW = 20_000
# An IVF search costs each example about lists + nprobe·n/lists products, least at
# lists = sqrt(nprobe·n) (≈ 2.8·sqrt(n) at nprobe 8); 2·sqrt(n) is near that and keeps the
# k-means training, which grows with lists², small. FAISS wants at least 39 points per list.
IVF_LISTS_PER_SQRT_N = 2
IVF_TRAINING_PER_LIST = 40


@dataclass
class SimilarityGraph:
    """A symmetric sparse similarity matrix over ``n`` points, CSR, self-similarities included."""

    indptr: np.ndarray   # int64 (n + 1,)
    indices: np.ndarray  # int64 (nnz,)
    values: np.ndarray   # float32 (nnz,), > 0 except possibly self-similarities

    @property
    def n(self) -> int:
        return len(self.indptr) - 1

    def diagonal(self) -> np.ndarray:
        out = np.zeros(self.n, dtype=np.float32)
        row = np.repeat(np.arange(self.n), np.diff(self.indptr))
        self_loop = row == self.indices
        out[row[self_loop]] = self.values[self_loop]
        return out

    def dense(self) -> np.ndarray:
        out = np.zeros((self.n, self.n), dtype=np.float32)
        out[np.repeat(np.arange(self.n), np.diff(self.indptr)), self.indices] = self.values
        return out


def graph_from_pairs(n: int, heads: np.ndarray, tails: np.ndarray, values: np.ndarray,
                     self_similarity: np.ndarray) -> SimilarityGraph:
    """The symmetric graph of the pairs ``(head, tail, value)`` with positive value (both
    directions, one entry per pair) and the self-similarities (clipped at 0)."""
    keep = (values > 0) & (heads != tails)
    heads, tails, values = heads[keep], tails[keep], values[keep].astype(np.float32)
    loops = np.arange(n, dtype=np.int64)
    head = np.concatenate([heads, tails, loops])
    tail = np.concatenate([tails, heads, loops])
    value = np.concatenate([values, values, np.maximum(self_similarity, 0).astype(np.float32)])
    key, first = np.unique(head * n + tail, return_index=True)
    head, tail = key // n, key % n
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(head, minlength=n), out=indptr[1:])
    return SimilarityGraph(indptr, tail, value[first])


def dense_graph(points: np.ndarray) -> SimilarityGraph:
    """Every positive inner product of ``points`` (float32 ``(n, d)``) as a graph (small ``n``)."""
    points = np.asarray(points, dtype=np.float32)
    gram = points @ points.T
    heads, tails = np.nonzero(np.triu(gram, 1) > 0)
    return graph_from_pairs(len(points), heads, tails, gram[heads, tails], np.diag(gram).copy())


def knn_graph(space: FeatureSpace, rows: np.ndarray, neighbors: int = DEFAULT_NEIGHBORS, nprobe: int = 8,
              seed: int = 0) -> SimilarityGraph:
    """The ``neighbors``-nearest-neighbour graph of the ``rows`` of ``space`` (points are numbered
    by position in ``rows``), see the module docstring."""
    import faiss

    n = len(rows)
    if neighbors < 1:
        raise SelectionError(f"neighbors must be at least 1, got {neighbors}")
    if n < 2:
        return graph_from_pairs(n, *(np.empty(0, np.int64),) * 2, np.empty(0, np.float32),
                                _self_similarity(space, rows))
    if n < EXACT_NEIGHBORS_BELOW:
        index = faiss.IndexFlatIP(space.dim)
    else:
        lists = int(min(IVF_LISTS_PER_SQRT_N * math.sqrt(n), n // IVF_TRAINING_PER_LIST))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(space.dim), space.dim, lists, faiss.METRIC_INNER_PRODUCT)
        sample = np.sort(np.random.default_rng(seed).choice(n, min(n, IVF_TRAINING_PER_LIST * lists), replace=False))
        index.train(gather_all(space, rows[sample]))
        index.nprobe = nprobe
    for _, block in blocks(rows, space.block_rows()):
        index.add(space.gather(block))
    want = min(neighbors + 1, n)
    heads, tails, values = [], [], []
    self_similarity = np.empty(n, dtype=np.float32)
    for start, block in blocks(rows, space.block_rows()):
        vectors = space.gather(block)
        self_similarity[start:start + len(block)] = (vectors * vectors).sum(1)
        sims, ids = index.search(vectors, want)
        here = np.arange(start, start + len(block))[:, None]
        keep = (ids >= 0) & (ids != here)
        # At most `neighbors` others per point (the point itself may be missing from its list).
        keep &= np.cumsum(keep, axis=1) <= neighbors
        heads.append(np.broadcast_to(here, ids.shape)[keep])
        tails.append(ids[keep])
        values.append(sims[keep])
    del index
    return graph_from_pairs(n, np.concatenate(heads), np.concatenate(tails).astype(np.int64),
                            np.concatenate(values), self_similarity)


def _self_similarity(space: FeatureSpace, rows: np.ndarray) -> np.ndarray:
    vectors = gather_all(space, rows)
    return (vectors * vectors).sum(1)


def relevance_weights(space: FeatureSpace, rows: np.ndarray) -> np.ndarray:
    """float32 ground weights: each row's largest inner product with a target, clipped at 0,
    scaled to mean 1 (a row no more similar to any target than orthogonal weighs 0)."""
    if space.targets is None:
        raise SelectionError("relevance weights need targets")
    out = np.empty(len(rows), dtype=np.float32)
    for start, block in blocks(rows, space.block_rows()):
        out[start:start + len(block)] = (space.gather(block) @ space.targets.T).max(axis=1)
    np.maximum(out, 0, out=out)
    total = float(out.sum(dtype=np.float64))
    if total <= 0:
        raise SelectionError("no pool example has a positive similarity to any target: nothing to weight the "
                             "diversity objective by (run it without targets)")
    return out * np.float32(len(out) / total)


class FacilityLocation:
    """``Σ_i w_i · max_{j ∈ S} s_ij`` over a :class:`SimilarityGraph`, updated as points are added."""

    def __init__(self, graph: SimilarityGraph, weights: np.ndarray | None = None):
        self.graph = graph
        self.weights = np.ones(graph.n, np.float32) if weights is None else np.asarray(weights, np.float32)
        self.cover = np.zeros(graph.n, dtype=np.float32)  # max similarity to the selection so far
        self.value = 0.0

    def gains(self, candidates: np.ndarray) -> np.ndarray:
        g = self.graph
        starts, stops = g.indptr[candidates], g.indptr[candidates + 1]
        lengths = stops - starts
        offsets = np.zeros(len(candidates), dtype=np.int64)
        np.cumsum(lengths[:-1], out=offsets[1:])
        positions = np.repeat(starts - offsets, lengths) + np.arange(int(lengths.sum()))
        neighbours = g.indices[positions]
        gain = self.weights[neighbours] * np.maximum(g.values[positions] - self.cover[neighbours], 0)
        out = np.zeros(len(candidates), dtype=np.float64)
        nonempty = lengths > 0
        out[nonempty] = np.add.reduceat(gain.astype(np.float64), offsets[nonempty]) if len(gain) else 0
        return out

    def add(self, point: int) -> None:
        g = self.graph
        span = slice(g.indptr[point], g.indptr[point + 1])
        neighbours = g.indices[span]
        self.value += float(self.gains(np.array([point]))[0])
        self.cover[neighbours] = np.maximum(self.cover[neighbours], g.values[span])


class GraphCut:
    """``Σ_i Σ_{j ∈ S} w_i s_ij − λ Σ_{i,j ∈ S} s_ij`` over a :class:`SimilarityGraph`."""

    def __init__(self, graph: SimilarityGraph, weights: np.ndarray | None = None, penalty: float = 0.4):
        self.graph = graph
        self.penalty = penalty
        w = np.ones(graph.n, np.float32) if weights is None else np.asarray(weights, np.float32)
        row_lengths = np.diff(graph.indptr)
        modular = np.zeros(graph.n, dtype=np.float64)
        contributions = (w[graph.indices] * graph.values).astype(np.float64)
        nonempty = row_lengths > 0
        if len(contributions):
            modular[nonempty] = np.add.reduceat(contributions, graph.indptr[:-1][nonempty])
        self.modular = modular
        self.diagonal = graph.diagonal().astype(np.float64)
        self.inside = np.zeros(graph.n, dtype=np.float64)  # Σ_{i ∈ S, i ≠ j} s_ij
        self.value = 0.0

    def gains(self, candidates: np.ndarray) -> np.ndarray:
        return self.modular[candidates] - self.penalty * (2 * self.inside[candidates] + self.diagonal[candidates])

    def add(self, point: int) -> None:
        g = self.graph
        self.value += float(self.gains(np.array([point]))[0])
        span = slice(g.indptr[point], g.indptr[point + 1])
        neighbours, values = g.indices[span], g.values[span]
        others = neighbours != point
        np.add.at(self.inside, neighbours[others], values[others])


def make_objective(name: str, graph: SimilarityGraph, weights: np.ndarray | None = None, penalty: float = 0.4):
    if name == "facility_location":
        return FacilityLocation(graph, weights)
    if name == "graph_cut":
        return GraphCut(graph, weights, penalty)
    raise SelectionError(f"unknown objective {name!r}: expected one of {', '.join(OBJECTIVES)}")


def sample_size(n: int, budget: int, epsilon: float) -> int:
    """Stochastic greedy's candidates per step, ``⌈(n / budget) · ln(1/ε)⌉`` (``n`` for ε = 0)."""
    if epsilon <= 0:
        return n
    return max(1, min(n, math.ceil(n / max(budget, 1) * math.log(1 / epsilon))))


def greedy(objective, budget: int, epsilon: float = 0.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``budget`` points of ``objective`` by greedy (``epsilon`` = 0) or stochastic greedy, in
    the order added, with each one's gain (see the module docstring)."""
    n = objective.graph.n
    budget = min(budget, n)
    if not 0 <= epsilon < 1:
        raise SelectionError(f"epsilon must be in [0, 1), got {epsilon}")
    per_step = sample_size(n, budget, epsilon)
    rng = np.random.default_rng(seed)
    remaining = np.arange(n, dtype=np.int64)   # the unselected points, first `left` of them
    where = np.arange(n, dtype=np.int64)       # position of each point in `remaining`
    left = n
    chosen = np.empty(budget, dtype=np.int64)
    gains = np.empty(budget, dtype=np.float64)
    for step in range(budget):
        if per_step >= left:
            candidates = remaining[:left]
        else:
            candidates = remaining[np.unique(rng.integers(0, left, per_step))]
        values = objective.gains(candidates)
        top = values.max()
        point = int(candidates[values == top].min())
        chosen[step], gains[step] = point, top
        objective.add(point)
        # Swap-remove the point from the remaining ones.
        last = remaining[left - 1]
        remaining[where[point]], where[last] = last, where[point]
        left -= 1
    return chosen, gains


def taylor_softmax(gains: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """MILO's sampling probabilities: ``∝ 1 + x + x² / 2``, ``x = (g / max g) / temperature``."""
    gains = np.asarray(gains, dtype=np.float64)
    if not len(gains):
        return gains
    top = float(np.abs(gains).max()) or 1.0
    x = gains / top / temperature
    weight = 1 + x + x * x / 2
    return weight / weight.sum()
