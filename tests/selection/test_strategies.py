"""The strategy registry and the target-free strategies, quality filters and round-robin, against
plain numpy on a real store."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from gradstore.datastore import Datastore
from gradstore.selection import SelectionEngine, SelectionError, SelectionOptions, TargetSet
from gradstore.selection.engine import Scores, rank
from gradstore.selection.strategies import get_strategy, options_type, registry


@pytest.fixture(scope="module")
def engine(selection_stores):
    return SelectionEngine(Datastore.open(selection_stores["pool"]))


def stored_column(store, name: str) -> np.ndarray:
    """A per-checkpoint column combined with the manifest's weights, straight from the Parquet files."""
    opened = Datastore.open(store)
    total = np.zeros(opened.num_examples)
    for checkpoint, weight in zip(opened.checkpoint_names, opened.weights):
        table = pq.read_table(store / "segments" / "seg-000001" / "scores" / checkpoint, columns=["row", name])
        rows = table.column("row").to_numpy()
        total[rows] += weight * table.column(name).to_numpy().astype(np.float64)
    return total


def test_every_strategy_declares_itself_once():
    strategies = registry()
    assert list(strategies)[:4] == ["less", "rds", "quality", "random"]
    for name, cls in strategies.items():
        described = cls.describe()
        assert described["name"] == name and described["summary"] and described["cost"]
        assert described["needs_targets"] in ("required", "optional", "none")
        assert described["options_schema"]["properties"]["name"]["const"] == name
        assert cls.Options().name == name  # every option has a default but the name
    with pytest.raises(ValueError, match="unknown strategy 'best': expected one of less, rds"):
        get_strategy("best")
    assert set(options_type().__args__[0].__args__) == {cls.Options for cls in strategies.values()}


def test_the_registry_and_the_options_load_without_numpy():
    # The SDK's base install has pydantic but no numpy: the wire contract must load there.
    code = ("import sys; sys.modules['numpy'] = None; "
            "from gradstore.selection.options import SelectionOptions; "
            "print(SelectionOptions(k=3, strategy='quality').strategy.name)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "quality"


@pytest.mark.parametrize("order", ["high", "low"])
def test_quality_ranks_by_the_stored_score(selection_stores, engine, order):
    expected = stored_column(selection_stores["pool"], "loss")
    selection = engine.select(None, {"k": 10, "strategy": {"name": "quality", "score": "loss", "order": order}})
    signed = expected if order == "high" else -expected
    reference = np.lexsort((np.arange(len(signed)), -signed))[:10]
    assert selection.rows.tolist() == reference.tolist()
    np.testing.assert_allclose(selection.scores, signed[reference], rtol=1e-5)
    assert selection.subtasks == [] and selection.subtask_scores.shape == (10, 0)
    assert selection.strategy == {"name": "quality", "score": "loss", "order": order, "checkpoint": None}


def test_quality_of_one_checkpoint(selection_stores, engine):
    table = pq.read_table(selection_stores["pool"] / "segments" / "seg-000001" / "scores" / "epoch-2", columns=["row", "grad_norm"])
    values = np.empty(table.num_rows)
    values[table.column("row").to_numpy()] = table.column("grad_norm").to_numpy()
    selection = engine.select(None, {"k": 5, "strategy": {"name": "quality", "score": "grad_norm",
                                                          "checkpoint": "epoch-2"}})
    assert selection.rows.tolist() == np.argsort(-values, kind="stable")[:5].tolist()
    with pytest.raises(SelectionError, match="unknown checkpoint 'epoch-7'"):
        engine.select(None, {"k": 5, "strategy": {"name": "quality", "checkpoint": "epoch-7", "score": "loss"}})


def test_random_is_seeded_uniform_and_respects_the_pool(engine):
    one = engine.select(None, SelectionOptions(k=12, strategy={"name": "random", "seed": 3}))
    again = engine.select(None, SelectionOptions(k=12, strategy={"name": "random", "seed": 3}))
    other = engine.select(None, SelectionOptions(k=12, strategy={"name": "random", "seed": 4}))
    assert one.rows.tolist() == again.rows.tolist() != other.rows.tolist()
    assert len(set(one.rows.tolist())) == 12
    only_more = engine.select(None, {"fraction": 0.5, "sources": ["more"], "strategy": "random"})
    assert set(only_more.sources) == {"more"} and len(only_more) == 9  # ceil(0.5 x 18)
    # Over many seeds every example is drawn about equally often.
    counts = np.zeros(engine.store.num_examples)
    for seed in range(300):
        counts[engine.select(None, {"k": 12, "strategy": {"name": "random", "seed": seed}}).rows] += 1
    expected = 300 * 12 / engine.store.num_examples
    assert abs(counts.mean() - expected) < 1e-9 and counts.min() > expected / 3 and counts.max() < expected * 2


@pytest.mark.parametrize("keep", ["above", "below"])
def test_quality_filters_narrow_the_pool_before_any_strategy(selection_stores, engine, keep):
    loss = stored_column(selection_stores["pool"], "loss").astype(np.float32)
    threshold = np.quantile(loss, 0.75)
    kept = np.flatnonzero(loss >= threshold if keep == "above" else loss <= threshold)
    options = {"fraction": 1.0, "strategy": "random", "filters": [{"score": "loss", "keep": keep, "quantile": 0.75}]}
    selection = engine.select(None, options)
    assert sorted(selection.rows.tolist()) == kept.tolist()
    assert selection.pool == len(kept)
    step = selection.report["filters"][0]
    assert step["pool"] == len(kept) and step["threshold"] == pytest.approx(float(threshold), rel=1e-5)


def test_filters_apply_to_less_too(selection_stores, engine):
    targets = TargetSet.from_datastore(Datastore.open(selection_stores["target"]), "subtask")
    plain = engine.select(targets, {"fraction": 1.0})
    filtered = engine.select(targets, {"fraction": 1.0, "filters": [{"score": "grad_norm", "keep": "below",
                                                                     "quantile": 0.5}]})
    kept = set(filtered.rows.tolist())
    assert [r for r in plain.rows.tolist() if r in kept] == filtered.rows.tolist()  # same order, fewer rows
    # Quantiles are inclusive, so a chain of filters keeps at least the example at its extreme.
    narrowest = engine.select(targets, {"k": 5, "sources": ["more"],
                                        "filters": [{"score": "loss", "keep": "above", "quantile": 1.0},
                                                    {"score": "grad_norm", "keep": "below", "quantile": 0.0}]})
    assert narrowest.pool == 1 and len(narrowest) == 1 and narrowest.sources == ["more"]


def test_round_robin_takes_turns_across_subtasks():
    rng = np.random.default_rng(0)
    per_subtask = rng.random((40, 3)).astype(np.float32)
    scores = Scores(per_subtask, per_subtask.max(1), ["a", "b", "c"], np.array([2, 1, 4]), [], np.zeros(0))
    pool = np.arange(5, 40, dtype=np.int64)
    result = scores.round_robin(pool)
    # Reference: each subtask in turn takes its best row (by its own mean) not yet taken.
    taken, reference, turn = set(), [], 0
    while len(reference) < len(pool):
        best = next(int(r) for r in rank(pool, per_subtask[:, turn % 3]) if int(r) not in taken)
        taken.add(best)
        reference.append(best)
        turn += 1
    assert result.order.tolist() == reference
    assert result.order_scores[:3].tolist() == [per_subtask[reference[i], i] for i in range(3)]


def mmr_values(scores, vectors, chosen, candidates, weight):
    """Each candidate's MMR value given the chosen positions (float64, brute force)."""
    if not chosen:
        return scores[candidates]
    similarity = np.maximum(0.0, (vectors[candidates] @ vectors[chosen].T).max(axis=1))
    return scores[candidates] - weight * similarity


@pytest.mark.parametrize("weight", [0.0, 0.3, 5.0])
def test_diversity_weight_is_maximal_marginal_relevance(selection_stores, engine, weight):
    targets = TargetSet.from_datastore(Datastore.open(selection_stores["target"]), "subtask")
    plain = engine.select(targets, {"fraction": 1.0})
    diverse = engine.select(targets, {"k": 12, "diversity_weight": weight})
    store = engine.store
    w = dict(zip(plain.checkpoints, plain.weights))
    vectors = np.concatenate([np.sqrt(w[c]) * store.features_at(c, plain.ranking).astype(np.float64)
                              for c in plain.checkpoints], axis=1)
    scores = plain.ranking_scores.astype(np.float64)
    position = {int(row): i for i, row in enumerate(plain.ranking)}
    chosen: list[int] = []
    for row in diverse.rows.tolist():  # every pick is the best MMR value left (up to fp16 features)
        remaining = np.array([i for i in range(len(scores)) if i not in chosen])
        values = mmr_values(scores, vectors, chosen, remaining, weight)
        picked = mmr_values(scores, vectors, chosen, np.array([position[row]]), weight)[0]
        assert picked >= values.max() - 1e-3
        chosen.append(position[row])
    assert len(set(diverse.rows.tolist())) == 12
    if weight == 0.0:
        assert diverse.rows.tolist() == plain.rows[:12].tolist()
    else:
        assert diverse.report["diversity_weight"] == weight
        picked_similarity = (vectors[chosen] @ vectors[chosen].T)[np.triu_indices(12, 1)].max()
        head = list(range(12))
        assert picked_similarity <= (vectors[head] @ vectors[head].T)[np.triu_indices(12, 1)].max() + 1e-9
    with pytest.raises(SelectionError, match="without per_source_cap and dedup_threshold"):
        engine.select(targets, {"k": 3, "diversity_weight": 0.5, "dedup_threshold": 0.9})
