"""Selections that scan a quantised copy (``precision`` int8 or 1bit of the ``less`` strategy),
against numpy over the copy's files decoded as the format specifies them."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from conftest import decoded_features, features, weights
from gradstore.datastore import Datastore
from gradstore.datastore.layout import PRECISIONS
from gradstore.datastore.versions import quantize
from gradstore.selection import SelectionEngine, SelectionError, SelectionOptions, TargetSet
from gradstore.selection import scan as scan_module


@pytest.fixture(scope="module")
def quantized_pool(selection_stores, tmp_path_factory):
    """A copy of the engine tests' pool with an int8 and a 1bit copy of its features."""
    pool = shutil.copytree(selection_stores["pool"], tmp_path_factory.mktemp("precision") / "pool")
    for kind in ("int8", "1bit"):
        quantize(pool, kind)
    return pool


@pytest.fixture(scope="module")
def targets(selection_stores):
    return TargetSet.from_datastore(Datastore.open(selection_stores["target"]), "subtask")


def per_target_scores(pool, targets: TargetSet, precision: str) -> np.ndarray:
    """(N, T) Σ_c w_c · x̂_c · g_c, x̂ the stored fp16 rows or the decoded copy, in float64."""
    def rows(checkpoint):
        return features(pool, checkpoint) if precision == "fp16" else decoded_features(pool, precision, checkpoint)

    return sum(w * rows(c) @ targets.vectors[c].astype(np.float64).T for c, w in weights(pool).items())


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("threads", [1, 3])
def test_scores_at_each_precision_are_those_of_the_decoded_copy(quantized_pool, targets, precision, threads):
    store = Datastore.open(quantized_pool)
    expected = per_target_scores(quantized_pool, targets, precision)
    scores = SelectionEngine(store, scan_threads=threads).scores(targets, precision=precision)
    np.testing.assert_allclose(scores.best, expected.max(axis=1), rtol=1e-5, atol=1e-5)
    subtasks = np.array(targets.subtasks)
    means = np.stack([expected[:, subtasks == s].mean(axis=1) for s in scores.subtasks], axis=1)
    np.testing.assert_allclose(scores.per_subtask, means, rtol=1e-5, atol=1e-5)


def test_int8_ranks_as_fp16_and_1bit_close_to_it(quantized_pool, targets):
    exact = per_target_scores(quantized_pool, targets, "fp16").max(axis=1)
    engine = SelectionEngine(Datastore.open(quantized_pool))
    for precision, least in (("int8", 0.999), ("1bit", 0.7)):
        approximate = engine.scores(targets, precision=precision).best
        assert np.corrcoef(np.argsort(np.argsort(exact)), np.argsort(np.argsort(approximate)))[0, 1] >= least


def test_a_selection_at_int8_reports_its_precision(quantized_pool, targets):
    engine = SelectionEngine(Datastore.open(quantized_pool))
    options = SelectionOptions(k=10, strategy={"name": "less", "precision": "int8", "aggregation": "max"})
    selection = engine.select(targets, options)
    expected = per_target_scores(quantized_pool, targets, "int8").max(axis=1)
    assert selection.rows.tolist() == np.lexsort((np.arange(len(expected)), -expected))[:10].tolist()
    assert selection.report["aggregation"] == "max" and selection.report["precision"] == "int8"


def test_a_precision_the_store_lacks_is_refused_with_the_command_that_adds_it(selection_stores, targets):
    engine = SelectionEngine(Datastore.open(selection_stores["pool"]))
    with pytest.raises(SelectionError, match=r"no 1bit copy of the features to scan \(the store has none\); add one "
                                             r"with `gradstore quantize .*pool --kind 1bit`, or scan at precision fp16"):
        engine.scores(targets, precision="1bit")
    with pytest.raises(SelectionError, match="unknown precision 'int4': expected one of fp16, int8, 1bit"):
        engine.scores(targets, precision="int4")
    with pytest.raises(ValueError, match="precision"):
        SelectionOptions(k=1, strategy={"name": "less", "precision": "int4"})


@pytest.mark.parametrize("backend", scan_module.BACKENDS)
def test_every_scan_backend_gives_the_quantised_scores(quantized_pool, targets, backend):
    engine = SelectionEngine(Datastore.open(quantized_pool), scan_backend=backend)
    expected = per_target_scores(quantized_pool, targets, "1bit").max(axis=1)
    np.testing.assert_allclose(engine.scores(targets, precision="1bit").best, expected, rtol=1e-5, atol=1e-5)
