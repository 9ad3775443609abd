"""The gio and diversity strategies end to end through SelectionEngine on a small real store
(written by the datastore writer), against their numerical cores run on numpy-read features."""

from __future__ import annotations

import numpy as np
import pytest
from gradstore.datastore import (
    Datastore,
    FeatureBatch,
    examples_table,
    finalize_store,
    publish_store,
    write_shard,
)
from point_sets import array_space, clustered

from gradstore.selection import SelectionEngine, SelectionError, TargetSet
from gradstore.selection.gio import gio_select
from gradstore.selection.strategies import registry
from gradstore.selection.submodular import (
    FacilityLocation,
    greedy,
    knn_graph,
    relevance_weights,
)

DIM, REP_DIM, SIZES = 16, 12, (90, 60, 50)
WEIGHTS = {"c0": 3.0, "c1": 1.0}


@pytest.fixture(scope="module")
def clustered_store(tmp_path_factory):
    """200 examples in three clusters (rows shuffled), two checkpoints whose features differ."""
    root = tmp_path_factory.mktemp("clustered")
    work = root / "work"
    c0, labels = clustered(SIZES, DIM, spread=0.2, seed=0)
    c1, _ = clustered(SIZES, DIM, spread=0.3, seed=1)
    order = np.random.default_rng(2).permutation(len(labels))
    features = {"c0": c0[order].astype(np.float16), "c1": c1[order].astype(np.float16)}
    representations = clustered(SIZES, REP_DIM, spread=0.2, seed=3)[0][order].astype(np.float16)
    labels = labels[order]
    n = len(labels)
    for shard, start in enumerate(range(0, n, 64)):
        rows = list(range(start, min(n, start + 64)))
        examples = examples_table(rows=rows, ids=[f"ex-{r}" for r in rows], sources=["s"] * len(rows),
                                  locations=[f"x.jsonl:{r + 1}" for r in rows],
                                  records=[{"text": f"r{r}"} for r in rows], num_tokens=[5] * len(rows),
                                  num_label_tokens=[4] * len(rows), truncated=[False] * len(rows))
        ones = np.ones(len(rows), np.float32)
        write_shard(work, shard, examples, {
            name: FeatureBatch(rows=np.array(rows), feature=f[rows], grad_norm=ones, feature_norm=ones, loss=ones)
            for name, f in features.items()}, representations=representations[rows])
    finalize_store(work, {
        "model": {"path": "m", "sha256": "0" * 64, "architecture": "X", "dtype": "fp32", "device": "cpu"},
        "tokenizer": {"template": "gradstore-default", "max_length": 8},
        "lora": {"r": 1, "alpha": 1.0, "target_modules": ["x"], "params": {"x": [1, 1]}, "num_params": 1},
        "checkpoints": [{"name": name, "weight": w} for name, w in WEIGHTS.items()],
        "gradient_type": "adam", "projection": {"kind": "rademacher", "dim": DIM, "seed": 0},
        "tokens": {}, "job": {}}, index_kind="none")
    publish_store(work, root / "store", overwrite=False)
    store = Datastore.open(root / "store")
    return SelectionEngine(store), labels


def weighted_space_by_numpy(engine, targets=None):
    """The checkpoint-weighted gradient space, from the whole feature arrays."""
    w = np.array(list(WEIGHTS.values())) / sum(WEIGHTS.values())
    points = np.concatenate([engine.store.features(name).astype(np.float32) * np.sqrt(wc)
                             for name, wc in zip(WEIGHTS, w)], axis=1)
    target_points = None if targets is None else np.concatenate(
        [targets.vectors[name] * np.sqrt(wc) for name, wc in zip(WEIGHTS, w)], axis=1)
    return array_space(points, target_points)


def cluster_targets(engine, labels, clusters, count, seed=5):
    rng = np.random.default_rng(seed)
    rows = np.concatenate([rng.choice(np.flatnonzero(labels == c), n, replace=False)
                           for c, n in zip(clusters, count)])
    return TargetSet.from_vectors({name: engine.store.features(name)[rows].astype(np.float32)
                                   + 0.05 * rng.standard_normal((len(rows), DIM)) for name in WEIGHTS})


def test_strategies_are_registered():
    found = registry()
    assert found["gio"].needs_targets == "required" and found["diversity"].needs_targets == "optional"
    assert set(found["gio"].describe()["options_schema"]["properties"]) >= {"features", "neighbors", "centroids",
                                                                           "stop"}


def test_gio_through_the_engine_is_its_core_on_the_weighted_space(clustered_store):
    engine, labels = clustered_store
    targets = cluster_targets(engine, labels, (0, 1), (20, 10))
    selection = engine.select(targets, {"k": 120, "strategy": {"name": "gio", "neighbors": 3, "centroids": 0}})
    expected = gio_select(weighted_space_by_numpy(engine, targets), np.arange(len(labels)), 120, k=3, centroids=0)
    assert selection.rows.tolist() == expected.rows.tolist()
    assert np.allclose(selection.scores, expected.kl_after, rtol=1e-4, atol=1e-4)
    assert selection.report["kl"] == pytest.approx(expected.report["kl"], rel=1e-4, abs=1e-4)
    assert selection.report["stopped"] == "kl_rises" and len(selection.rows) < 120
    assert selection.checkpoints == list(WEIGHTS) and selection.weights == pytest.approx([0.75, 0.25])
    counts = np.bincount(labels[selection.rows], minlength=3)
    assert counts[2] == 0 and counts[0] > counts[1] > 0


def test_gio_to_the_budget_and_with_quantisation(clustered_store):
    engine, labels = clustered_store
    targets = cluster_targets(engine, labels, (0, 1), (20, 10))
    selection = engine.select(targets, {"k": 60, "strategy": {"name": "gio", "stop": "budget", "centroids": 20}})
    assert len(selection.rows) == 60 and selection.report["quantized"]["pool"] <= 20
    assert selection.report["stopped"] == "budget"


def test_diversity_without_targets_covers_every_cluster_first(clustered_store):
    engine, labels = clustered_store
    selection = engine.select(None, {"k": 10, "strategy": {"name": "diversity", "neighbors": 100, "epsilon": 0}})
    assert sorted(labels[selection.rows[:3]].tolist()) == [0, 1, 2]
    space = weighted_space_by_numpy(engine)
    expected, gains = greedy(FacilityLocation(knn_graph(space, np.arange(len(labels)), 100)), 10)
    assert selection.rows.tolist() == expected.tolist()
    assert np.allclose(selection.scores, gains, rtol=1e-4)
    assert selection.report["weighted_by_targets"] is False and selection.report["objective"] == "facility_location"


def test_diversity_weighted_by_targets_and_its_curriculum_outputs(clustered_store):
    engine, labels = clustered_store
    targets = cluster_targets(engine, labels, (2,), (8,))
    options = {"name": "diversity", "neighbors": 100, "epsilon": 0}
    weighted = engine.select(targets, {"k": 10, "strategy": options})
    space = weighted_space_by_numpy(engine, targets)
    rows = np.arange(len(labels))
    expected, _ = greedy(FacilityLocation(knn_graph(space, rows, 100), relevance_weights(space, rows)), 10)
    assert weighted.rows.tolist() == expected.tolist() and labels[weighted.rows[0]] == 2
    assert weighted.report["weighted_by_targets"] is True
    reversed_ = engine.select(targets, {"k": 10, "strategy": {**options, "order": "hard_to_easy",
                                                              "order_scores": "probability"}})
    assert reversed_.rows.tolist() == weighted.rows.tolist()[::-1]
    assert np.all(np.diff(reversed_.scores) >= -1e-7) and 0 < reversed_.scores.sum() <= 1 + 1e-6
    cut = engine.select(None, {"k": 10, "strategy": {"name": "diversity", "objective": "graph_cut"}})
    assert len(set(cut.rows.tolist())) == 10 and cut.report["objective"] == "graph_cut"


def test_both_strategies_on_representations(clustered_store):
    engine, labels = clustered_store
    representations = engine.store.representations().astype(np.float32)
    rng = np.random.default_rng(4)
    rows = np.concatenate([rng.choice(np.flatnonzero(labels == c), n, replace=False) for c, n in ((0, 16), (2, 8))])
    vectors = {name: engine.store.features(name)[rows].astype(np.float32) for name in WEIGHTS}
    targets = TargetSet.from_vectors(vectors, representations=representations[rows]
                                     + 0.05 * rng.standard_normal((len(rows), REP_DIM)))
    strategy = {"name": "gio", "features": "representations", "neighbors": 3, "centroids": 0}
    selection = engine.select(targets, {"k": 100, "strategy": strategy})
    expected = gio_select(array_space(representations, targets.representations), np.arange(len(labels)), 100,
                          k=3, centroids=0)
    assert selection.rows.tolist() == expected.rows.tolist()
    assert selection.report["features"] == "representations" and selection.report["dim"] == REP_DIM
    assert set(labels[selection.rows].tolist()) <= {0, 2}
    diverse = engine.select(None, {"k": 6, "strategy": {"name": "diversity", "features": "representations",
                                                        "neighbors": 100, "epsilon": 0}})
    core, _ = greedy(FacilityLocation(knn_graph(array_space(representations), np.arange(len(labels)), 100)), 6)
    assert diverse.rows.tolist() == core.tolist()
    assert sorted(labels[diverse.rows[:3]].tolist()) == [0, 1, 2]


def test_bad_uses_are_named(clustered_store):
    engine, labels = clustered_store
    with pytest.raises(SelectionError, match="strategy 'gio' needs targets"):
        engine.select(None, {"k": 3, "strategy": "gio"})
    targets = cluster_targets(engine, labels, (0,), (4,))
    with pytest.raises(SelectionError, match="the targets have no representation vectors"):
        engine.select(targets, {"k": 3, "strategy": {"name": "gio", "features": "representations"}})
    with pytest.raises(SelectionError, match="checkpoints and weights apply to gradient features"):
        engine.select(None, {"k": 3, "strategy": {"name": "diversity", "features": "representations",
                                                  "checkpoints": ["c0"]}})
    with pytest.raises(SelectionError, match="objective"):
        engine.select(None, {"k": 3, "strategy": {"name": "diversity", "objective": "coverage"}})
    with pytest.raises(SelectionError, match="unknown checkpoint"):
        engine.select(None, {"k": 3, "strategy": {"name": "diversity", "checkpoints": ["c9"]}})
    with pytest.raises(SelectionError, match="epsilon"):
        engine.select(None, {"k": 3, "strategy": {"name": "diversity", "epsilon": 1}})
