"""Nearest-neighbour search through a store's approximate index (``StoreHandle.search``, what the
``influence`` and ``similar`` routes call): candidates from lossy codes are re-scored exactly
against the stored features. numpy over the features' files is the reference."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import build_test_store, features, top_rows, weights
from gradstore.datastore import Datastore
from gradstore.indexer.checkpoints import CheckpointSpec
from gradstore.indexer.faiss_index import RESCORED_CANDIDATES
from gradstore.selection import TargetSet
from gradstore.service.registry import open_handle


@pytest.fixture(scope="module")
def pq_store(selection_stores, tmp_path_factory, tiny_model_dirs):
    """The engine tests' pool (48 examples) indexed with 4-bit product codes."""
    run = selection_stores["pool"].parent / "run"
    checkpoints = [CheckpointSpec.parse(str(run / name)) for name in ("epoch-1", "epoch-2")]
    return build_test_store(tmp_path_factory.mktemp("search") / "pool-pq", tiny_model_dirs["gpt2"],
                            selection_stores["corpus"], checkpoints, "adam", index="pq")


@pytest.fixture(scope="module")
def targets(selection_stores):
    return TargetSet.from_datastore(Datastore.open(selection_stores["target"]), None)


def exact_scores(store, targets: TargetSet) -> np.ndarray:
    """(N, T): Σ_c w_c f_c · g_c over the stored features, in float64."""
    return sum(w * features(store, c) @ targets.vectors[c].astype(np.float64).T for c, w in weights(store).items())


def test_product_codes_are_rescored_exactly(pq_store, targets):
    handle = open_handle("pool-pq", pq_store)
    assert handle.manifest.index.kind == "pq" and RESCORED_CANDIDATES["pq"] * 5 >= handle.index.ntotal
    queries = handle.index_queries(targets)
    expected = exact_scores(pq_store, targets)
    coarse, _ = handle.index.search(queries, 5)  # what the codes alone score
    assert np.abs(coarse - np.sort(expected, axis=0)[::-1][:5].T).max() > 1e-3
    for column, hits in enumerate(handle.search(queries, 5)):  # 50 candidates: every row of the store
        assert [row for row, _ in hits] == top_rows(expected[:, column], 5)
        np.testing.assert_allclose([score for _, score in hits], np.sort(expected[:, column])[::-1][:5],
                                   rtol=1e-5, atol=1e-5)


def test_rescoring_leaves_out_removed_rows(pq_store, targets, tmp_path):
    import shutil

    from gradstore.datastore.versions import remove

    store = shutil.copytree(pq_store, tmp_path / "pool-pq")
    expected = exact_scores(store, targets)[:, 0]
    best = top_rows(expected, 2)
    remove(store, ids=[Datastore.open(store).ids()[best[0]]])
    handle = open_handle("pool-pq", store)
    hits = handle.search(handle.index_queries(targets)[:1], 3)[0]
    assert best[0] not in [row for row, _ in hits] and hits[0][0] == best[1]
    np.testing.assert_allclose(hits[0][1], expected[best[1]], rtol=1e-5, atol=1e-5)
