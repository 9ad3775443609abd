"""GIO's greedy KL minimisation against brute-force estimates on small point sets."""

from __future__ import annotations

import math

import numpy as np
import pytest
from point_sets import array_space, clustered

from gradstore.selection import SelectionError
from gradstore.selection.gio import gio_select, greedy_kl


def brute_kl(targets: np.ndarray, selected: np.ndarray, k: int) -> float:
    """The k-NN KL estimate computed from scratch (full distance matrices, sorted)."""
    n, d = targets.shape
    m = len(selected)
    kappa = min(k, n - 1)
    within = np.linalg.norm(targets[:, None, :].astype(np.float64) - targets[None, :, :], axis=2)
    rho = np.sort(within, axis=1)[:, kappa]          # column 0 is the target itself
    across = np.linalg.norm(targets[:, None, :].astype(np.float64) - selected[None, :, :], axis=2)
    nu = across.min(axis=1)
    psi = lambda j: -0.5772156649015329 + sum(1 / i for i in range(1, j))
    return d / n * float(np.log(np.maximum(nu, 1e-6) / np.maximum(rho, 1e-6)).sum()) + psi(kappa) - psi(1) \
        + math.log(m / (n - 1))


@pytest.fixture
def problem():
    rng = np.random.default_rng(3)
    targets = rng.standard_normal((25, 4)).astype(np.float32)
    candidates = (1.3 * rng.standard_normal((60, 4))).astype(np.float32)
    return targets, candidates


def test_estimate_matches_brute_force_at_every_step(problem):
    targets, candidates = problem
    trace = greedy_kl(targets, candidates, k=3, stop_on_rise=False, budget=20)
    assert len(trace.chosen) == 20 and trace.stopped == "budget"
    for step in range(20):
        expected = brute_kl(targets, candidates[trace.chosen[:step + 1]], 3)
        assert trace.kl[step] == pytest.approx(expected, rel=1e-4, abs=1e-4)


def test_each_step_takes_the_candidate_of_lowest_estimate(problem):
    targets, candidates = problem
    trace = greedy_kl(targets, candidates, k=3, stop_on_rise=False, budget=8)
    for step, chosen in enumerate(trace.chosen):
        before = trace.chosen[:step]
        values = [brute_kl(targets, candidates[before + [c]], 3) if c not in before else np.inf
                  for c in range(len(candidates))]
        assert values[chosen] <= min(values) + 1e-4


def test_estimate_falls_until_it_would_rise(problem):
    targets, candidates = problem
    trace = greedy_kl(targets, candidates, k=3)
    assert trace.stopped == "kl_rises" and 3 < len(trace.chosen) < len(candidates)
    assert all(later <= earlier for earlier, later in zip(trace.kl, trace.kl[1:]))
    assert trace.kl[-1] < trace.kl[0]
    # One more step, the best there is, raises the estimate.
    rest = [c for c in range(len(candidates)) if c not in trace.chosen]
    next_best = min(brute_kl(targets, candidates[trace.chosen + [c]], 3) for c in rest)
    assert next_best > trace.kl[-1] - 1e-6
    # And the selection is closer to the targets than random subsets of its size.
    rng = np.random.default_rng(0)
    random_kl = [brute_kl(targets, candidates[rng.choice(len(candidates), len(trace.chosen), replace=False)], 3)
                 for _ in range(20)]
    assert trace.kl[-1] < min(random_kl)


def test_budget_counts_candidate_sizes(problem):
    targets, candidates = problem
    sizes = np.full(len(candidates), 4)
    trace = greedy_kl(targets, candidates, k=3, stop_on_rise=False, sizes=sizes, budget=10)
    assert len(trace.chosen) == 3  # 4 + 4 + 4 >= 10


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_targets_from_two_of_three_clusters_are_matched_in_proportion(seed):
    """Targets drawn 2:1 from clusters 0 and 1 of a three-cluster pool: GIO, stopping by its rule,
    takes both in about that proportion and (almost) nothing of cluster 2."""
    pool, labels = clustered([400, 400, 400], dim=8, spread=0.25, seed=seed)
    fresh, _ = clustered([60, 60, 60], dim=8, spread=0.25, seed=seed + 100)  # new draws, same clusters
    targets = np.concatenate([fresh[:40], fresh[60:80]])
    chosen = gio_select(array_space(pool, targets), np.arange(len(pool)), budget=len(pool), k=3, centroids=0)
    counts = np.bincount(labels[chosen.rows], minlength=3)
    assert chosen.report["stopped"] == "kl_rises" and chosen.report["quantized"] == {"pool": None, "targets": None}
    assert counts[2] <= 0.03 * len(chosen.rows)
    assert 1.5 <= counts[0] / counts[1] <= 2.6
    assert len(set(chosen.rows.tolist())) == len(chosen.rows) == len(chosen.kl_after) == chosen.report["steps"]


@pytest.mark.parametrize("seed", [1, 2])
def test_quantised_selection_takes_the_targets_clusters(seed):
    """The same with pool and targets k-means quantised (150 centroids each): whole centroids are
    taken, so the proportion is coarser, but both target clusters are covered and cluster 2 is not."""
    pool, labels = clustered([2000, 2000, 2000], dim=8, spread=0.25, seed=seed)
    fresh, _ = clustered([200, 200, 200], dim=8, spread=0.25, seed=seed + 100)
    targets = np.concatenate([fresh[:200], fresh[200:300]])
    chosen = gio_select(array_space(pool, targets), np.arange(len(pool)), budget=len(pool), k=3, centroids=150,
                        seed=seed)
    counts = np.bincount(labels[chosen.rows], minlength=3)
    assert chosen.report["quantized"]["pool"] <= 150 and chosen.report["quantized"]["targets"] == 150
    assert counts[2] <= 0.02 * len(chosen.rows)
    assert counts[0] >= 0.25 * len(chosen.rows) and counts[1] >= 0.25 * len(chosen.rows)
    assert counts[0] > counts[1]


def test_budget_cuts_the_last_cluster():
    pool, _ = clustered([2000, 2000, 2000], dim=8, spread=0.25, seed=1)
    fresh, _ = clustered([200, 200, 200], dim=8, spread=0.25, seed=101)
    chosen = gio_select(array_space(pool, fresh[:300]), np.arange(len(pool)), budget=100, k=3, centroids=150,
                        stop_on_rise=False)
    assert len(chosen.rows) == 100 and chosen.report["stopped"] == "budget"


def test_quantised_expansion_keeps_whole_clusters_in_order():
    pool, _ = clustered([300, 300, 300], dim=6, spread=0.3, seed=4)
    targets, _ = clustered([50], dim=6, spread=0.3, seed=5)
    space = array_space(pool, targets)
    chosen = gio_select(space, np.arange(len(pool)), budget=900, k=3, centroids=30, stop_on_rise=True)
    assert chosen.report["stopped"] in ("kl_rises", "budget", "exhausted")
    # The estimate attached to each row only falls along the order (rows come step by step).
    assert np.all(np.diff(chosen.kl_after) <= 1e-6)
    assert chosen.report["kl"] == sorted(chosen.report["kl"], reverse=True)


def test_needs_two_targets_and_refuses_huge_unquantised_pools():
    pool, _ = clustered([10], dim=4, spread=0.2, seed=0)
    with pytest.raises(SelectionError, match="at least 2 target"):
        greedy_kl(pool[:1], pool)
    space = array_space(np.zeros((3, 4), np.float32), np.ones((30_000, 4), np.float32))
    from gradstore.selection import gio as gio_module
    rows = np.arange(3)
    old = gio_module.MAX_EXACT_CELLS
    try:
        gio_module.MAX_EXACT_CELLS = 10
        with pytest.raises(SelectionError, match="set centroids"):
            gio_select(space, rows, budget=2, centroids=0)
    finally:
        gio_module.MAX_EXACT_CELLS = old
