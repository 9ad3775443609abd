"""The selection engine against plain numpy on real stores (tiny models, real warmup checkpoints)."""

from __future__ import annotations

import json
import math
import shutil
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from gradstore.indexer.checkpoints import CheckpointSpec
from gradstore.datastore import (Datastore, FeatureBatch, examples_table, finalize_store, publish_store,
                                         write_shard)
from gradstore.indexer.errors import StoreError
from gradstore.indexer.projection import ProjectionSpec
from gradstore.datastore import reader as reader_module
from gradstore.selection import engine as engine_module
from gradstore.selection import scan as scan_module
from gradstore.selection import SelectionEngine, SelectionError, SelectionOptions, TargetSet

from conftest import SELECTION_DIM as DIM
from conftest import features
from conftest import SELECTION_SUBTASKS as SUBTASKS
from conftest import build_test_store as build_store

@pytest.fixture(scope="module")
def stores(selection_stores):
    return selection_stores


@pytest.fixture(scope="module")
def engine(stores):
    return SelectionEngine(Datastore.open(stores["pool"]))


@pytest.fixture(scope="module")
def targets(stores):
    return TargetSet.from_datastore(Datastore.open(stores["target"]), "subtask")


# ------------------------------------------------------------------------------ numpy reference


def read_features(store: Path, checkpoint: str) -> np.ndarray:
    return features(store, checkpoint)


def read_examples(store: Path) -> pd.DataFrame:
    return (pq.read_table(store / "segments" / "seg-000001" / "examples").to_pandas().sort_values("row")
            .reset_index(drop=True))


def manifest_weights(store: Path) -> dict[str, float]:
    manifest = json.loads((store / "manifest.json").read_text())
    return {c["name"]: c["weight"] for c in manifest["checkpoints"]}


def reference_scores(pool: Path, target: Path, aggregation: str, weights: dict[str, float] | None = None,
                     subtask_field: str | None = "subtask") -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(aggregated scores (N,), per-subtask means (N, S), subtask names) in plain numpy."""
    weights = weights or manifest_weights(pool)
    total = sum(weights.values())
    per_target = 0
    for name, weight in weights.items():
        train = read_features(pool, name)
        query = read_features(target, name)
        query /= np.linalg.norm(query, axis=1, keepdims=True)
        per_target = per_target + weight / total * train @ query.T
    records = [json.loads(r) for r in read_examples(target)["record"]]
    labels = [r[subtask_field] for r in records] if subtask_field else ["all"] * len(records)
    names = list(dict.fromkeys(labels))
    means = np.stack([per_target[:, [l == s for l in labels]].mean(axis=1) for s in names], axis=1)
    aggregated = {"less": means.max(axis=1), "max": per_target.max(axis=1), "mean": per_target.mean(axis=1)}
    return aggregated[aggregation], means, names


def reference_ranking(scores: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    rows = np.arange(len(scores)) if rows is None else rows
    return rows[np.lexsort((rows, -scores[rows]))]


# ------------------------------------------------------------------------------------ the key test


@pytest.mark.parametrize("aggregation", ["less", "max", "mean"])
def test_selection_equals_numpy_less_scores(stores, engine, targets, aggregation):
    expected, means, subtasks = reference_scores(stores["pool"], stores["target"], aggregation)
    order = reference_ranking(expected)
    ids = read_examples(stores["pool"])["id"].to_numpy()
    selection = engine.select(targets, SelectionOptions(aggregation=aggregation, k=48))
    assert selection.ids == ids[order].tolist()
    np.testing.assert_array_equal(selection.rows, order)
    np.testing.assert_allclose(selection.scores, expected[order], atol=1e-5)
    assert selection.subtasks == subtasks == list(SUBTASKS)
    np.testing.assert_allclose(selection.subtask_scores, means[order], atol=1e-5)
    assert selection.pool == 48 and selection.checkpoints == ["epoch-1", "epoch-2"]
    np.testing.assert_allclose(selection.weights, list(manifest_weights(stores["pool"]).values()), rtol=1e-6)
    top = engine.select(targets, SelectionOptions(aggregation=aggregation, k=5))
    assert top.ids == selection.ids[:5]
    assert top.items()[0] == {"rank": 1, "row": int(order[0]), "id": ids[order[0]], "source": top.sources[0],
                              "score": float(top.scores[0]),
                              "subtask_scores": dict(zip(subtasks, map(float, top.subtask_scores[0])))}


def test_aggregations_differ_and_one_subtask_makes_less_equal_mean(stores, engine):
    plain = TargetSet.from_datastore(Datastore.open(stores["target"]))
    assert plain.subtasks == ["all"] * 7
    table = engine.scores(plain)
    np.testing.assert_allclose(table.aggregate("less"), table.aggregate("mean"), atol=1e-6)
    expected, _, _ = reference_scores(stores["pool"], stores["target"], "mean", subtask_field=None)
    np.testing.assert_allclose(table.aggregate("mean"), expected, atol=1e-5)
    assert not np.allclose(table.aggregate("max"), table.aggregate("mean"))


def given_shard(given: dict, checkpoint: str, shard: int) -> np.ndarray:
    return next(raw for key_checkpoint, key_shard, raw in given.values()
                if (key_checkpoint, key_shard) == (checkpoint, shard))


def test_scan_reads_the_raw_maps_in_small_batches_of_every_row_once(stores, targets, monkeypatch):
    store = Datastore.open(stores["pool"])
    reference = SelectionEngine(store).scores(targets)
    monkeypatch.setattr(engine_module, "_BATCH_BYTES", 4 * DIM * 5)  # 5 rows per batch (one worker)
    monkeypatch.setattr(Datastore, "features", lambda *a, **k: pytest.fail("features() loads a whole checkpoint"))
    given, original_raw = {}, Datastore.raw_features

    def recording_raw(self, checkpoint, shard, *args, **kwargs):
        raw = original_raw(self, checkpoint, shard, *args, **kwargs)
        given[id(raw)] = (checkpoint, shard, raw)  # kept alive, so ids stay unique
        return raw

    calls, original_add = [], scan_module.ScanKernel.add_products

    def recording_add(self, features, query, out, start=0):
        calls.append((given[id(features)][:2], start, out.shape[1]))
        original_add(self, features, query, out, start)

    monkeypatch.setattr(Datastore, "raw_features", recording_raw)
    monkeypatch.setattr(scan_module.ScanKernel, "add_products", recording_add)
    streamed = SelectionEngine(store, scan_threads=1).scores(targets)
    assert max(width for _, _, width in calls) == 5
    for checkpoint in store.checkpoint_names:  # each shard's rows once, in batches, from its raw map
        for shard in range(store.manifest.shards.count):
            batches = sorted((start, width) for key, start, width in calls if key == (checkpoint, shard))
            rows = len(given_shard(given, checkpoint, shard))
            assert [start for start, _ in batches] == list(range(0, rows, 5))
            assert sum(width for _, width in batches) == rows
    np.testing.assert_allclose(streamed.per_subtask, reference.per_subtask, atol=1e-6)
    np.testing.assert_allclose(streamed.best, reference.best, atol=1e-6)


def test_checkpoints_with_different_rows_in_a_shard_are_an_error(stores, targets, monkeypatch):
    original_raw = Datastore.raw_features

    def one_row_short(self, checkpoint, shard, *args, **kwargs):
        raw = original_raw(self, checkpoint, shard, *args, **kwargs)
        return raw[:-1] if (checkpoint, shard) == ("epoch-2", 1) else raw

    monkeypatch.setattr(Datastore, "raw_features", one_row_short)
    engine = SelectionEngine(Datastore.open(stores["pool"]), scan_threads=2)
    with pytest.raises(StoreError, match=r"shard 1: checkpoint 'epoch-2' has 15 feature rows, checkpoint "
                                         r"'epoch-1' has 16"):
        engine.scores(targets)


def test_scans_read_the_store_s_open_maps_and_map_each_file_once(stores, targets, monkeypatch):
    store = Datastore.open(stores["pool"])
    reference = reference_scores(stores["pool"], stores["target"], "max")
    mapped = []

    def recording_map(path, *args, **kwargs):
        mapped.append(Path(path).relative_to(store.path).as_posix())
        return original_map(path, *args, **kwargs)

    original_map = reader_module.map_matrix
    monkeypatch.setattr(reader_module, "map_matrix", recording_map)
    for backend in scan_module.BACKENDS:
        scores = SelectionEngine(store, scan_threads=2, scan_backend=backend).scores(targets)
        np.testing.assert_allclose(scores.best, reference[0], atol=1e-5)
        np.testing.assert_allclose(scores.per_subtask, reference[1], atol=1e-5)
    assert sorted(mapped) == sorted(name for name in store.manifest.files if "/features/" in name)


# ---------------------------------------------------------------------------- features files, kernels


@pytest.mark.parametrize("backend", scan_module.BACKENDS)
def test_every_kernel_and_thread_count_gives_the_numpy_scores(stores, targets, backend):
    store = Datastore.open(stores["pool"])
    expected, means, _ = reference_scores(stores["pool"], stores["target"], "max")
    results = [SelectionEngine(store, scan_threads=threads, scan_backend=backend).scores(targets)
               for threads in (1, 3)]
    for table in results:
        np.testing.assert_allclose(table.best, expected, atol=1e-5)
        np.testing.assert_allclose(table.per_subtask, means, atol=1e-5)
        np.testing.assert_allclose(table.best, results[0].best, atol=1e-6)


def test_a_scan_leaves_torch_threads_as_it_found_them(engine, targets):
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    engine.scores(targets)  # its workers run torch single-threaded
    in_new_thread = []
    thread = threading.Thread(target=lambda: in_new_thread.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    assert torch.get_num_threads() == before and in_new_thread == [before]


def test_a_damaged_raw_file_is_an_error_naming_it(stores, targets, tmp_path):
    path = tmp_path / "pool"
    shutil.copytree(stores["pool"], path)
    engine = SelectionEngine(Datastore.open(path), scan_threads=2)
    raw = path / "segments" / "seg-000001" / "features" / "epoch-2" / "part-00001.npy"
    good = np.load(raw)
    # Same size, so opening does not notice (only verify=True would): a header with another shape.
    np.save(raw, good.reshape(good.shape[0] * 2, -1))
    assert raw.stat().st_size == Datastore.open(path).manifest.files["segments/seg-000001/features/epoch-2/part-00001.npy"].bytes
    with pytest.raises(StoreError, match=r"epoch-2/part-00001\.npy: the file holds row-major <f2 "
                                         r"\(32, 128\), expected row-major <f2 \(16, 256\)"):
        engine.scores(targets)
    raw.unlink()
    with pytest.raises(StoreError, match=r"epoch-2/part-00001\.npy: cannot read the matrix file"):
        engine.scores(targets)
    with pytest.raises(StoreError, match=r"epoch-2/part-00001\.npy: listed in the manifest but missing"):
        Datastore.open(path)


# --------------------------------------------------------------------------- weights and checkpoints


def test_weights_override_and_checkpoint_choice(stores, engine, targets):
    ids = read_examples(stores["pool"])["id"].to_numpy()
    for options, weights in [
        (dict(weights={"epoch-1": 3.0, "epoch-2": 1.0}), {"epoch-1": 0.75, "epoch-2": 0.25}),
        (dict(checkpoints=["epoch-2"]), {"epoch-2": 1.0}),
        (dict(checkpoints=["epoch-1"], weights={"epoch-1": 5.0}), {"epoch-1": 1.0}),
        (dict(weights={"epoch-1": 0.0, "epoch-2": 2.0}), {"epoch-2": 1.0}),
    ]:
        expected, _, _ = reference_scores(stores["pool"], stores["target"], "less", weights)
        order = reference_ranking(expected)
        selection = engine.select(targets, SelectionOptions(k=48, **options))
        assert selection.ids == ids[order].tolist(), options
        np.testing.assert_allclose(selection.scores, expected[order], atol=1e-5)
        assert dict(zip(selection.checkpoints, selection.weights)) == pytest.approx(
            {**dict.fromkeys(selection.checkpoints, 0.0), **weights})


# ------------------------------------------------------------------------- sources, caps, budgets


def test_sources_filter(stores, engine, targets):
    examples = read_examples(stores["pool"])
    expected, _, _ = reference_scores(stores["pool"], stores["target"], "less")
    more_rows = examples.index[examples["source"] == "more"].to_numpy()
    selection = engine.select(targets, SelectionOptions(k=100, sources=["more"]))
    assert selection.pool == 18 and len(selection) == 18
    assert set(selection.sources) == {"more"}
    np.testing.assert_array_equal(selection.rows, reference_ranking(expected, more_rows))
    assert len(engine.select(targets, SelectionOptions(fraction=0.5, sources=["more"]))) == 9


def test_per_source_cap(stores, engine, targets):
    examples = read_examples(stores["pool"])
    expected, _, _ = reference_scores(stores["pool"], stores["target"], "less")
    taken, counts = [], {}
    for row in reference_ranking(expected):
        source = examples["source"][row]
        if counts.get(source, 0) < 3:
            taken.append(row)
            counts[source] = counts.get(source, 0) + 1
    selection = engine.select(targets, SelectionOptions(k=5, per_source_cap=3))
    np.testing.assert_array_equal(selection.rows, taken[:5])
    assert max(pd.Series(selection.sources).value_counts()) == 3
    # The cap can leave the selection short of the budget.
    assert len(engine.select(targets, SelectionOptions(k=10, per_source_cap=2))) == 4


def greedy_dedup_reference(store: Path, order: np.ndarray, budget: int, threshold: float,
                           weights: dict[str, float]) -> list[int]:
    total = sum(weights.values())
    similarity = sum(w / total * read_features(store, name) @ read_features(store, name).T
                     for name, w in weights.items())
    kept = []
    for row in order:
        if all(similarity[row, other] <= threshold for other in kept):
            kept.append(int(row))
        if len(kept) == budget:
            break
    return kept


@pytest.mark.parametrize("block", [None, 4])
def test_dedup_equals_numpy_greedy(stores, engine, targets, monkeypatch, block):
    if block is not None:  # several blocks, and several chunks of kept vectors per block
        monkeypatch.setattr(engine_module, "_DEDUP_BLOCK_MIN", block)
        monkeypatch.setattr(engine_module, "_DEDUP_BLOCK_MAX", block)
        monkeypatch.setattr(engine_module, "_DEDUP_CHUNK", 3)
    weights = manifest_weights(stores["pool"])
    expected, _, _ = reference_scores(stores["pool"], stores["target"], "less")
    order = reference_ranking(expected)
    similarity = sum(w * read_features(stores["pool"], n) @ read_features(stores["pool"], n).T
                     for n, w in weights.items())
    threshold = float(np.quantile(similarity[np.triu_indices(48, 1)], 0.6))
    selection = engine.select(targets, SelectionOptions(k=12, dedup_threshold=threshold))
    assert selection.rows.tolist() == greedy_dedup_reference(stores["pool"], order, 12, threshold, weights)
    assert len(selection) == 12 and selection.rows.tolist() != order[:12].tolist()
    pairs = similarity[np.ix_(selection.rows, selection.rows)][np.triu_indices(12, 1)]
    assert pairs.max() <= threshold


# ------------------------------------------------------- a synthetic store with exact ties (one-hot)


SYNTH_DIM = 16


@pytest.fixture(scope="module")
def onehot_store(tmp_path_factory):
    """100 examples whose features are one-hot: row r is e_(r mod 16) at both checkpoints."""
    root = tmp_path_factory.mktemp("onehot")
    work, n = root / "work", 100
    feature = np.zeros((n, SYNTH_DIM), np.float16)
    feature[np.arange(n), np.arange(n) % SYNTH_DIM] = 1
    for shard, start in enumerate(range(0, n, 32)):
        rows = list(range(start, min(n, start + 32)))
        examples = examples_table(rows=rows, ids=[f"ex-{r}" for r in rows],
                                  sources=["a" if r % 2 else "b" for r in rows],
                                  locations=[f"x.jsonl:{r + 1}" for r in rows],
                                  records=[{"text": f"r{r}"} for r in rows],
                                  num_tokens=[5] * len(rows), num_label_tokens=[4] * len(rows),
                                  truncated=[False] * len(rows))
        batch = FeatureBatch(rows=np.array(rows), feature=feature[rows], grad_norm=np.ones(len(rows), np.float32),
                             feature_norm=np.ones(len(rows), np.float32), loss=np.ones(len(rows), np.float32))
        write_shard(work, shard, examples, {"c0": batch, "c1": batch})
    finalize_store(work, {
        "model": {"path": "m", "sha256": "0" * 64, "architecture": "X", "dtype": "fp32", "device": "cpu"},
        "tokenizer": {"template": "gradstore-default", "max_length": 8},
        "lora": {"r": 1, "alpha": 1.0, "target_modules": ["x"], "params": {"x": [1, 1]}, "num_params": 1},
        "checkpoints": [{"name": "c0", "weight": 1.0}, {"name": "c1", "weight": 1.0}],
        "gradient_type": "adam", "projection": {"kind": "rademacher", "dim": SYNTH_DIM, "seed": 0},
        "tokens": {}, "job": {}}, index_kind="none")
    publish_store(work, root / "store", overwrite=False)
    return SelectionEngine(Datastore.open(root / "store"))


def onehot_targets(*columns: int) -> TargetSet:
    vectors = np.zeros((len(columns), SYNTH_DIM))
    vectors[np.arange(len(columns)), columns] = 1
    return TargetSet.from_vectors({"c0": vectors, "c1": vectors})


def test_ties_are_broken_by_row(onehot_store):
    selection = onehot_store.select(onehot_targets(3), SelectionOptions(k=100))
    tied = [r for r in range(100) if r % SYNTH_DIM == 3]
    assert selection.rows.tolist() == tied + [r for r in range(100) if r not in tied]
    assert selection.scores.tolist() == [1.0] * len(tied) + [0.0] * (100 - len(tied))
    zero = TargetSet.from_vectors({"c0": np.zeros((1, SYNTH_DIM)), "c1": np.zeros((1, SYNTH_DIM))})
    assert onehot_store.select(zero, SelectionOptions(k=10)).rows.tolist() == list(range(10))


def test_dedup_keeps_one_of_each_duplicate(onehot_store):
    selection = onehot_store.select(onehot_targets(3), SelectionOptions(k=20, dedup_threshold=0.5))
    assert selection.rows.tolist() == [3] + [r for r in range(SYNTH_DIM) if r != 3]
    capped = onehot_store.select(onehot_targets(3), SelectionOptions(k=20, dedup_threshold=0.5, per_source_cap=4))
    assert capped.rows.tolist() == [3, 0, 1, 2, 4, 5, 6, 7]  # a: odd rows, b: even rows
    assert capped.sources.count("a") == 4 and capped.sources.count("b") == 4


@pytest.mark.parametrize("fraction, expected", [(0.07, 7), (0.071, 8), (0.1, 10), (0.001, 1), (1.0, 100)])
def test_fraction_budget_is_the_ceiling(onehot_store, fraction, expected):
    selection = onehot_store.select(onehot_targets(0), SelectionOptions(fraction=fraction))
    assert len(selection) == expected == math.ceil(round(fraction * 100, 9))


# ------------------------------------------------------------------------------------- output


def corpus_lines(paths) -> dict[str, str]:
    lines = {}
    for path in paths:
        for line in Path(path).read_text().splitlines():
            lines[json.loads(line)["id"]] = line
    return lines


def test_export_jsonl_is_the_corpus_lines_in_rank_order(stores, engine, targets, tmp_path):
    selection = engine.select(targets, SelectionOptions(k=10, aggregation="max"))
    out = engine.export(selection, tmp_path / "sel" / "selected.jsonl")
    lines = corpus_lines(stores["corpus"])
    assert out.read_text().splitlines() == [lines[i] for i in selection.ids]
    assert [p.name for p in out.parent.iterdir()] == ["selected.jsonl"]  # no temporary file left


def test_export_parquet_reads_back_with_pandas(stores, engine, targets, tmp_path):
    selection = engine.select(targets, SelectionOptions(k=10))
    frame = pd.read_parquet(engine.export(selection, tmp_path / "selected.parquet"))
    assert frame["id"].tolist() == selection.ids
    lines = corpus_lines(stores["corpus"])
    for row, id_ in zip(frame.to_dict("records"), selection.ids):
        original = json.loads(lines[id_])
        assert row["dataset"] == original["dataset"]
        assert [dict(m) for m in row["messages"]] == original["messages"]
    out = engine.export(selection, tmp_path / "any.name", fmt="jsonl")
    assert len(out.read_text().splitlines()) == 10
    with pytest.raises(SelectionError, match="suffix"):
        engine.export(selection, tmp_path / "selected.csv")


def test_scores_parquet_is_sorted_and_complete(stores, engine, targets, tmp_path):
    expected, means, subtasks = reference_scores(stores["pool"], stores["target"], "less")
    selection = engine.select(targets, SelectionOptions(k=3, sources=["toy", "more"]))
    frame = pd.read_parquet(engine.write_scores(selection, tmp_path / "scores.parquet"))
    order = reference_ranking(expected)
    assert list(frame.columns) == ["rank", "row", "id", "source", "score"] + [f"score_{s}" for s in subtasks]
    assert frame["rank"].tolist() == list(range(1, 49))
    assert frame["row"].tolist() == order.tolist()
    assert frame["id"].tolist() == read_examples(stores["pool"])["id"].to_numpy()[order].tolist()
    assert frame["score"].is_monotonic_decreasing
    np.testing.assert_allclose(frame["score"], expected[order], atol=1e-5)
    np.testing.assert_allclose(frame[[f"score_{s}" for s in subtasks]].to_numpy(), means[order], atol=1e-5)


# ----------------------------------------------------------------------------------- bad inputs


def test_target_vectors_are_validated(engine):
    good = np.ones((2, DIM))
    with pytest.raises(SelectionError, match=r"target vectors for checkpoint 'epoch-1' have dimension 512, "
                                             r"the datastore has 256"):
        engine.scores(TargetSet.from_vectors({"epoch-1": np.ones((2, 512)), "epoch-2": np.ones((2, 512))}))
    with pytest.raises(SelectionError, match="have dimension 512, the datastore has 256"):
        TargetSet.from_vectors({"epoch-1": np.ones((2, 512))}, dim=256)
    bad = good.copy()
    bad[1, 7] = np.nan
    with pytest.raises(SelectionError, match=r"checkpoint 'epoch-2': row 1 has a non-finite value \(nan\)"):
        TargetSet.from_vectors({"epoch-1": good, "epoch-2": bad})
    bad[1, 7] = np.inf
    with pytest.raises(SelectionError, match="row 1 has a non-finite value"):
        TargetSet.from_vectors({"epoch-1": bad})
    with pytest.raises(SelectionError, match="differ in the number of targets"):
        TargetSet.from_vectors({"epoch-1": good, "epoch-2": np.ones((3, DIM))})
    with pytest.raises(SelectionError, match="rectangular"):
        TargetSet.from_vectors({"epoch-1": [[1.0, 2.0], [1.0]]})
    with pytest.raises(SelectionError, match=r"shape \(256,\)"):
        TargetSet.from_vectors({"epoch-1": np.ones(DIM)})
    with pytest.raises(SelectionError, match="3 subtask labels for 2 target examples"):
        TargetSet.from_vectors({"epoch-1": good}, subtasks=["a", "b", "c"])
    with pytest.raises(SelectionError, match=r"no vectors for checkpoint 'epoch-2'"):
        engine.scores(TargetSet.from_vectors({"epoch-1": good}))
    # Vectors for epoch-1 alone are enough when only epoch-1 is used; rows come out normalised.
    one = TargetSet.from_vectors({"epoch-1": good})
    np.testing.assert_allclose(np.linalg.norm(one.vectors["epoch-1"], axis=1), 1.0, rtol=1e-6)
    assert engine.scores(one, checkpoints=["epoch-1"]).per_subtask.shape == (48, 1)


def test_bad_options_name_what_is_wrong(engine, targets):
    known = r"\['epoch-1', 'epoch-2'\]"
    cases = [  # options as a mapping, as the REST body and the CLI give them
        ({}, "exactly one of k or fraction"),
        ({"k": 3, "fraction": 0.1}, "exactly one of k or fraction"),
        ({"k": 0}, "k: Input should be greater than or equal to 1"),
        ({"fraction": 1.5}, "fraction: Input should be less than or equal to 1"),
        ({"k": 3, "aggregation": "median"}, r"strategy.aggregation: Input should be 'less', 'max' or 'mean'"),
        ({"k": 3, "strategy": "median"}, r"strategy: Input tag 'median' .* 'less', 'rds', 'quality', 'random'"),
        ({"k": 3, "strategy": {"name": "quality", "sharpness": 2}}, "strategy.sharpness: Extra inputs"),
        ({"k": 3, "strategy": "rds", "aggregation": "max"}, "aggregation: options of the less strategy"),
        ({"k": 3, "checkpoints": ["epoch-9"]}, rf"unknown checkpoint 'epoch-9': the datastore has {known}"),
        ({"k": 3, "weights": {"epoch-9": 1.0, "epoch-1": 1.0}}, rf"unknown checkpoint 'epoch-9'.*{known}"),
        ({"k": 3, "weights": {"epoch-1": 1.0}}, "no weight for checkpoint 'epoch-2'"),
        ({"k": 3, "weights": {"epoch-1": -1.0, "epoch-2": 1.0}}, "'epoch-1' must be a finite number >= 0"),
        ({"k": 3, "weights": {"epoch-1": 0.0, "epoch-2": 0.0}}, "not all 0"),
        ({"k": 3, "sources": ["dolly"]}, r"unknown source 'dolly': the datastore has \['toy', 'more'\]"),
        ({"k": 3, "per_source_cap": 0}, "per_source_cap: Input should be greater than or equal to 1"),
        ({"k": 3, "dedup_threshold": 1.5}, "dedup_threshold: Input should be less than or equal to 1"),
        ({"k": 3, "filters": [{"score": "loss", "keep": "middle", "quantile": 0.5}]}, "filters.0.keep"),
        ({"k": 3, "filters": [{"score": "loss", "keep": "above", "quantile": 1.5}]}, "filters.0.quantile"),
        ({"k": 3, "strategy": "random"}, "strategy 'random' does not use targets"),
    ]
    for options, message in cases:
        with pytest.raises(SelectionError, match=message):
            engine.select(targets, options)
    with pytest.raises(SelectionError, match="strategy 'less' needs targets"):
        engine.select(None, {"k": 3})
    with pytest.raises(SelectionError, match=r"no score 'sparkle' in this datastore \(it has loss, grad_norm"):
        engine.select(None, {"k": 3, "strategy": {"name": "quality", "score": "sparkle"}})


def test_missing_subtask_field_names_the_example(stores):
    with pytest.raises(SelectionError, match=r"target example 't-0' \(row 0\) has no field 'task'"):
        TargetSet.from_datastore(Datastore.open(stores["target"]), "task")


def test_targets_from_another_projection_are_refused(stores, engine, tmp_path, tiny_model_dirs):
    other = build_store(tmp_path / "other", tiny_model_dirs["gpt2"], [stores["targets"]],
                        [CheckpointSpec.parse(str(Path(c.path))) for c in engine.store.manifest.checkpoints], "sgd",
                        projection=ProjectionSpec(dim=DIM, seed=1))
    with pytest.raises(SelectionError, match="projected with"):
        engine.scores(TargetSet.from_datastore(Datastore.open(other)))
