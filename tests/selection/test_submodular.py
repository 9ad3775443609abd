"""Submodular selection (facility location, graph cut, stochastic greedy) and MMR re-ranking
against exhaustive and brute-force references on small point sets."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from point_sets import array_space, clustered, unit

from gradstore.selection import SelectionError, submodular
from gradstore.selection.mmr import mmr_rerank
from gradstore.selection.submodular import (
    FacilityLocation,
    GraphCut,
    dense_graph,
    greedy,
    knn_graph,
    relevance_weights,
    sample_size,
    taylor_softmax,
)


def facility_value(similarity: np.ndarray, chosen, weights=None) -> float:
    weights = np.ones(len(similarity)) if weights is None else weights
    if not len(chosen):
        return 0.0
    return float((weights * np.maximum(similarity[:, list(chosen)], 0).max(axis=1)).sum())


def graph_cut_value(similarity: np.ndarray, chosen, penalty: float) -> float:
    chosen = list(chosen)
    s = np.maximum(similarity, 0)
    return float(s[:, chosen].sum() - penalty * s[np.ix_(chosen, chosen)].sum())


@pytest.mark.parametrize("seed", range(6))
def test_greedy_facility_location_reaches_the_bound_of_the_exhaustive_optimum(seed):
    points = unit(np.random.default_rng(seed).standard_normal((11, 3)))
    similarity = points @ points.T
    budget = 3
    optimum = max(facility_value(similarity, c) for c in itertools.combinations(range(11), budget))
    objective = FacilityLocation(dense_graph(points))
    chosen, gains = greedy(objective, budget)
    value = facility_value(similarity, chosen)
    assert value >= (1 - 1 / math.e) * optimum - 1e-6
    assert objective.value == pytest.approx(value, rel=1e-5)
    assert gains.sum() == pytest.approx(value, rel=1e-5)
    assert np.all(np.diff(gains) <= 1e-6)  # a submodular function's greedy gains never grow


@pytest.mark.parametrize("seed", range(4))
def test_greedy_graph_cut_value_and_bound(seed):
    points = unit(np.random.default_rng(seed).standard_normal((10, 3)))
    similarity = points @ points.T
    penalty, budget = 0.4, 3
    optimum = max(graph_cut_value(similarity, c, penalty) for c in itertools.combinations(range(10), budget))
    objective = GraphCut(dense_graph(points), penalty=penalty)
    chosen, _ = greedy(objective, budget)
    value = graph_cut_value(similarity, chosen, penalty)
    assert objective.value == pytest.approx(value, rel=1e-5)
    assert value >= (1 - 1 / math.e) * optimum - 1e-6


@pytest.mark.parametrize("graph", ["dense", "knn"])
def test_facility_location_covers_every_cluster_before_repeating_one(graph):
    points, labels = clustered([40, 25, 60, 30, 45], dim=8, spread=0.15, seed=0)
    similarity_graph = dense_graph(points) if graph == "dense" else knn_graph(array_space(points),
                                                                              np.arange(len(points)), 70)
    chosen, _ = greedy(FacilityLocation(similarity_graph), 12)
    assert sorted(labels[chosen[:5]].tolist()) == [0, 1, 2, 3, 4]


def test_weighting_by_targets_covers_what_resembles_them_first():
    points, labels = clustered([40, 40, 40, 40], dim=8, spread=0.15, seed=1)
    targets = unit(np.eye(8, dtype=np.float32)[[1, 3]] + 0.05)
    space = array_space(points, targets)
    weights = relevance_weights(space, np.arange(len(points)))
    assert weights.mean() == pytest.approx(1, rel=1e-5)
    chosen, _ = greedy(FacilityLocation(knn_graph(space, np.arange(len(points)), 50), weights), 6)
    assert set(labels[chosen[:2]].tolist()) == {1, 3}


@pytest.mark.parametrize("epsilon", [0.1, 0.3])
def test_stochastic_greedy_is_within_its_bound_of_greedy(epsilon):
    points, _ = clustered([60] * 6, dim=10, spread=0.5, seed=2)
    graph = dense_graph(points)
    budget = 15
    _, plain = greedy(FacilityLocation(graph), budget)
    values = []
    for seed in range(10):
        objective = FacilityLocation(graph)
        greedy(objective, budget, epsilon=epsilon, seed=seed)
        values.append(objective.value)
    assert np.mean(values) >= (1 - 1 / math.e - epsilon) * plain.sum()
    assert sample_size(len(points), budget, epsilon) == math.ceil(len(points) / budget * math.log(1 / epsilon))


def test_ivf_graph_matches_exact_neighbours(monkeypatch):
    points, _ = clustered([800] * 4, dim=16, spread=0.4, seed=3)
    rows = np.arange(len(points))
    monkeypatch.setattr(submodular, "EXACT_NEIGHBORS_BELOW", 100)
    approximate = knn_graph(array_space(points), rows, 8, nprobe=4096)  # probing every list: exact
    similarity = points @ points.T
    np.fill_diagonal(similarity, -np.inf)
    expected = np.argsort(-similarity, axis=1)[:, :8]
    for i in range(0, len(points), 97):
        span = slice(approximate.indptr[i], approximate.indptr[i + 1])
        linked = set(approximate.indices[span].tolist()) - {i}
        assert set(expected[i].tolist()) <= linked
    dense = approximate.dense()
    assert np.array_equal(dense, dense.T)
    assert np.allclose(np.diag(dense), 1, atol=1e-5)


def test_taylor_softmax():
    gains = np.array([4.0, 2.0, 1.0, 0.0])
    p = taylor_softmax(gains, temperature=0.5)
    x = gains / 4 / 0.5
    expected = (1 + x + x * x / 2) / (1 + x + x * x / 2).sum()
    assert np.allclose(p, expected) and np.all(np.diff(p) < 0)


def test_bad_inputs_are_named():
    with pytest.raises(SelectionError, match="epsilon"):
        greedy(FacilityLocation(dense_graph(np.eye(3, dtype=np.float32))), 2, epsilon=1.5)
    with pytest.raises(SelectionError, match="neighbors"):
        knn_graph(array_space(np.eye(3, dtype=np.float32)), np.arange(3), 0)
    with pytest.raises(SelectionError, match="positive similarity"):
        relevance_weights(array_space(np.eye(3, dtype=np.float32), -np.eye(3, dtype=np.float32)), np.arange(3))


# --------------------------------------------------------------------------------------------- MMR


def brute_mmr(ranking, scores, vectors, budget, weight):
    """MMR by its definition: every step scans every remaining candidate."""
    chosen: list[int] = []
    remaining = list(range(len(ranking)))
    while len(chosen) < budget and remaining:
        def value(i):
            if not chosen:
                return scores[i]
            return scores[i] - weight * max(0.0, float((vectors[chosen] @ vectors[i]).max()))
        best = max(remaining, key=lambda i: (value(i), -i))
        chosen.append(best)
        remaining.remove(best)
    return ranking[chosen]


def ranked_problem(n=300, dim=12, seed=0):
    rng = np.random.default_rng(seed)
    vectors = unit(rng.standard_normal((n, dim)))
    # Near-duplicates of the best few, a little below them in score.
    vectors[1:40:3] = unit(vectors[0:39:3] + 0.01 * rng.standard_normal((13, dim)))
    scores = np.sort(rng.random(n))[::-1]
    ranking = rng.permutation(10_000)[:n]
    lookup = {row: i for i, row in enumerate(ranking)}
    gather = lambda rows: vectors[[lookup[r] for r in rows]]
    return ranking, scores, vectors, gather


def test_mmr_without_weight_is_the_ranking():
    ranking, scores, _, gather = ranked_problem()
    assert np.array_equal(mmr_rerank(ranking, scores, gather, 50, 0.0), ranking[:50])


@pytest.mark.parametrize("weight", [0.05, 0.3, 2.0])
def test_mmr_matches_its_definition(weight):
    ranking, scores, vectors, gather = ranked_problem()
    got = mmr_rerank(ranking, scores, gather, 40, weight, block=16)
    expected = brute_mmr(ranking, scores, vectors.astype(np.float16).astype(np.float32), 40, weight)
    assert np.array_equal(got, expected)


def test_mmr_avoids_near_duplicates():
    ranking, scores, vectors, gather = ranked_problem()
    position = {row: i for i, row in enumerate(ranking)}
    plain = ranking[:30]
    diverse = mmr_rerank(ranking, scores, gather, 30, 1.0)
    def duplicates(rows):
        v = vectors[[position[r] for r in rows]]
        gram = v @ v.T
        np.fill_diagonal(gram, 0)
        return int((gram > 0.95).sum() // 2)
    assert duplicates(plain) >= 8 and duplicates(diverse) == 0
    assert len(set(diverse.tolist())) == 30


def test_mmr_bad_weight():
    ranking, scores, _, gather = ranked_problem(n=60)
    with pytest.raises(SelectionError, match="diversity weight"):
        mmr_rerank(ranking, scores, gather, 5, -1.0)
