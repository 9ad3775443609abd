"""GIO: choose the subset whose distribution is closest in KL divergence to the targets'.

Gradient Information Optimization (arXiv 2306.11670) minimises a k-nearest-neighbour estimate of
``KL(X ‖ D)`` between the target points ``X`` (``n`` of them, dimension ``d``) and the selected
points ``D`` (``m``), greedily, one point at a time.

The estimate
============
Wang, Kulkarni and Verdú's estimator (2009), in the form that lets the neighbour rank on the
selected side differ from the target side's::

    KL(X ‖ D) ≈ (d / n) Σ_i log(ν(i) / ρ_κ(i)) + ψ(κ) − ψ(1) + log(m / (n − 1))

where ``ρ_κ(i)`` is the distance from target ``i`` to its ``κ``-th nearest other target
(``κ = min(k, n − 1)``, ``k`` the ``neighbors`` option), ``ν(i)`` its distance to the nearest
selected point and ``ψ`` the digamma function. Distances are Euclidean, floored at
:data:`DISTANCE_FLOOR` (a selected point equal to a target would otherwise make the estimate
``−∞``). The selected side uses the nearest point (rank 1), not the ``k``-th: with rank ``k`` a
greedy step is blind to a new region until ``k`` points have landed there (one point near a
target does not move its ``k``-th nearest), so it piles into the first region it found; with
rank 1 every step moves the estimate of the targets it comes near, the estimate is defined from
the first selected point on, and every step's value is comparable with the last.

The greedy step
===============
GIO moves a continuous point by gradient descent on the estimate and then takes the unselected
candidate nearest to it. Here every unselected candidate's exact new estimate is computed and
the best is taken, the step GIO's descent approximates: a candidate ``c`` changes ``ν(i)`` to
``min(ν(i), dist(i, c))``, so the whole step is one pass over the ``targets × candidates``
distance matrix (``O(n · C)`` per step, in log space). GIO's stopping rule ends the selection
when the best step would raise the estimate (the ``log(m / (n − 1))`` term grows with every
point, so it comes once new points no longer bring targets closer); without it the selection
runs to the budget.

Quantisation
============
For a large pool, pool and targets are each quantised by k-means (FAISS, about 1,500 centroids:
trained on a sample of :data:`SAMPLE_PER_CENTROID` points per centroid, then every pool example
assigned to its nearest centroid, block by block); the greedy runs on one point per centroid, its
medoid (the member nearest to it), so that the estimate compares real examples with real targets
as it does unquantised (centroid means are averages, shrunk towards their region's centre: they
would sit closer to the targets than any example, and the greedy would stop after one or two per
region), and each chosen pool centroid is expanded to its members, nearest to the centroid
first, until the budget. Targets beyond ``centroids`` are quantised the same way. Cost: k-means ``O(iterations × sample × C × d)`` plus one
assignment pass ``O(N × C × d)``; the greedy ``O(steps × C_targets × C_pool)``; memory: the
sample and one block of vectors, plus ``O(N)`` assignments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .errors import SelectionError
from .feature_space import FeatureSpace, blocks, gather_all

DISTANCE_FLOOR = 1e-6
DEFAULT_NEIGHBORS = 5
DEFAULT_CENTROIDS = 1500
SAMPLE_PER_CENTROID = 128
KMEANS_ITERATIONS = 20
# Without quantisation the greedy holds a float32 targets x candidates matrix and passes over
# it once per step: beyond this many cells quantise instead.
MAX_EXACT_CELLS = 50_000_000


def digamma(n: int) -> float:
    """ψ(n) for a positive integer: −γ + Σ_{j < n} 1/j."""
    return -0.5772156649015329 + sum(1.0 / j for j in range(1, n))


@dataclass
class GreedyTrace:
    """What :func:`greedy_kl` chose: candidate indices in order, the estimate after each, and
    why it stopped (``kl_rises``, ``budget``, ``exhausted``)."""

    chosen: list[int] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)
    stopped: str = "exhausted"


def _log_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """float32 ``(len(a), len(b))``: log of the Euclidean distances, floored."""
    squared = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    np.maximum(squared, DISTANCE_FLOOR ** 2, out=squared)
    return (0.5 * np.log(squared)).astype(np.float32)


def greedy_kl(targets: np.ndarray, candidates: np.ndarray, k: int = DEFAULT_NEIGHBORS,
              stop_on_rise: bool = True, sizes: np.ndarray | None = None, budget: int | None = None) -> GreedyTrace:
    """GIO's greedy over ``candidates`` (float32 ``(C, d)``) for ``targets`` (``(n, d)``, n >= 2).

    Each step adds the candidate that minimises the estimate (ties: the lowest index). It stops
    when the estimate would rise (``stop_on_rise``), when the chosen candidates' ``sizes``
    (default 1 each) reach ``budget`` (default: all candidates), or when none is left.
    """
    targets = np.asarray(targets, dtype=np.float32)
    candidates = np.asarray(candidates, dtype=np.float32)
    n, d = targets.shape
    if n < 2:
        raise SelectionError(f"gio needs at least 2 target examples to estimate the KL divergence, got {n}")
    if candidates.ndim != 2 or candidates.shape[1] != d:
        raise SelectionError(f"candidates have shape {candidates.shape}: expected (count, {d})")
    if k < 1:
        raise SelectionError(f"gio's neighbour rank must be at least 1, got {k}")
    sizes = np.ones(len(candidates), dtype=np.int64) if sizes is None else np.asarray(sizes, dtype=np.int64)
    budget = int(sizes.sum()) if budget is None else budget
    kappa = min(k, n - 1)
    within = _log_distances(targets, targets)
    np.fill_diagonal(within, np.inf)
    log_rho = np.partition(within, kappa - 1, axis=1)[:, kappa - 1].astype(np.float64)
    del within
    log_nu = _log_distances(targets, candidates)           # (n, C)
    nearest = np.full(n, np.inf, dtype=np.float32)         # log distance to the nearest selected point
    taken = np.zeros(len(candidates), dtype=bool)
    trace, covered = GreedyTrace(), 0
    scale = d / n
    offset = digamma(kappa) - digamma(1) - scale * float(log_rho.sum())
    current = math.inf
    while covered < budget:
        if taken.all():
            trace.stopped = "exhausted"
            break
        m = len(trace.chosen)
        totals = np.minimum(nearest[:, None], log_nu).sum(axis=0, dtype=np.float64)
        totals[taken] = np.inf
        best = int(np.argmin(totals))
        estimate = scale * totals[best] + offset + math.log((m + 1) / (n - 1))
        if stop_on_rise and estimate > current:
            trace.stopped = "kl_rises"
            break
        trace.chosen.append(best)
        trace.kl.append(float(estimate))
        taken[best] = True
        covered += int(sizes[best])
        current = estimate
        np.minimum(nearest, log_nu[:, best], out=nearest)
    else:
        trace.stopped = "budget"
    return trace


def kmeans(points: np.ndarray, centroids: int, seed: int, iterations: int = KMEANS_ITERATIONS) -> np.ndarray:
    """float32 ``(centroids, d)``: FAISS k-means centroids of ``points`` (float32 ``(n, d)``)."""
    import faiss

    points = np.ascontiguousarray(points, dtype=np.float32)
    centroids = min(centroids, len(points))
    km = faiss.Kmeans(points.shape[1], centroids, niter=iterations, seed=seed, verbose=False,
                      max_points_per_centroid=max(SAMPLE_PER_CENTROID, -(-len(points) // centroids)),
                      min_points_per_centroid=1)
    km.train(points)
    return km.centroids.copy()


def assign(space: FeatureSpace, rows: np.ndarray, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's nearest centre (int64) and squared distance to it (float32), block by block."""
    import faiss

    index = faiss.IndexFlatL2(centres.shape[1])
    index.add(np.ascontiguousarray(centres, dtype=np.float32))
    label = np.empty(len(rows), dtype=np.int64)
    distance = np.empty(len(rows), dtype=np.float32)
    for start, block in blocks(rows, space.block_rows()):
        d2, nearest = index.search(space.gather(block), 1)
        label[start:start + len(block)] = nearest[:, 0]
        distance[start:start + len(block)] = d2[:, 0]
    return label, distance


@dataclass
class GioSelection:
    rows: np.ndarray          # int64: the chosen pool rows, in selection order
    kl_after: np.ndarray      # float32: the estimate once each row's step was taken
    report: dict


def gio_select(space: FeatureSpace, pool: np.ndarray, budget: int, k: int = DEFAULT_NEIGHBORS,
               centroids: int = DEFAULT_CENTROIDS, stop_on_rise: bool = True, seed: int = 0) -> GioSelection:
    """GIO over the ``pool`` rows of ``space`` for ``space.targets``, at most ``budget`` rows
    (see the module docstring). ``centroids`` = 0 never quantises."""
    if space.targets is None:
        raise SelectionError("gio needs targets")
    pool = np.asarray(pool, dtype=np.int64)
    targets = space.targets
    rng = np.random.default_rng(seed)
    quantize_pool = 0 < centroids < len(pool)
    quantize_targets = 0 < centroids < len(targets)
    if not quantize_pool and len(pool) * len(targets) > MAX_EXACT_CELLS:
        raise SelectionError(f"gio without quantisation compares every target with every pool example "
                             f"({len(targets)} x {len(pool)}); set centroids to at most {len(pool) - 1} to quantise")
    target_points = _medoids(targets, centroids, seed) if quantize_targets else targets
    if quantize_pool:
        sample_size = min(len(pool), centroids * SAMPLE_PER_CENTROID)
        sample = np.sort(rng.choice(len(pool), sample_size, replace=False))
        centres = kmeans(gather_all(space, pool[sample]), centroids, seed)
        label, distance = assign(space, pool, centres)
        by_centre = np.lexsort((pool, distance, label))
        live, first = np.unique(label[by_centre], return_index=True)  # centres with members, and their medoids
        sizes = np.bincount(label, minlength=len(centres))[live]
        medoids = space.gather(np.sort(pool[by_centre[first]]))
        order = np.argsort(np.argsort(pool[by_centre[first]]))          # back from row order to centre order
        trace = greedy_kl(target_points, medoids[order], k, stop_on_rise, sizes, budget)
        rows, kl_after = _expand(pool, label, by_centre, live[trace.chosen], np.array(trace.kl), budget)
    else:
        trace = greedy_kl(target_points, gather_all(space, pool), k, stop_on_rise, None, budget)
        rows = pool[np.array(trace.chosen, dtype=np.int64)]
        kl_after = np.array(trace.kl, dtype=np.float32)
    report = {"kl": [round(v, 6) for v in trace.kl], "steps": len(trace.chosen), "stopped": trace.stopped,
              "neighbors": k, "dim": space.dim, "targets": len(targets), "selected": len(rows),
              "quantized": {"pool": len(live) if quantize_pool else None,
                            "targets": len(target_points) if quantize_targets else None}}
    return GioSelection(np.asarray(rows, dtype=np.int64), np.asarray(kl_after, dtype=np.float32), report)


def _medoids(points: np.ndarray, centroids: int, seed: int) -> np.ndarray:
    """The point nearest to each k-means centre of ``points`` (in memory), one per non-empty centre."""
    import faiss

    centres = kmeans(points, centroids, seed)
    index = faiss.IndexFlatL2(points.shape[1])
    index.add(np.ascontiguousarray(points, dtype=np.float32))
    _, nearest = index.search(centres, 1)
    return points[np.unique(nearest[:, 0])]


def _expand(pool, label, by_centre, chosen_centres, kl, budget) -> tuple[np.ndarray, np.ndarray]:
    """The members of the chosen centres, centre by centre in order, each centre's members
    nearest first (``by_centre``: the pool sorted by centre, distance, row), cut at ``budget``;
    with each member its step's estimate."""
    ordered = label[by_centre]
    starts = np.searchsorted(ordered, chosen_centres, side="left")
    stops = np.searchsorted(ordered, chosen_centres, side="right")
    parts = [by_centre[a:b] for a, b in zip(starts, stops)]
    if not parts:
        return np.empty(0, np.int64), np.empty(0, np.float32)
    members = np.concatenate(parts)[:budget]
    estimates = np.repeat(kl, [len(p) for p in parts])[:budget]
    return pool[members], estimates.astype(np.float32)
