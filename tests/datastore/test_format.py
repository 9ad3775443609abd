"""The datastore format (schema version 2) end to end: shards written, finalised into a first
version, published, and read back by plain tools (pyarrow, pandas, polars, duckdb, numpy, faiss)
and by :class:`Datastore`; the refusals of the writer, of finalisation and of opening a damaged
store; crash-safe reruns; every index kind, ivf-ondisk's lists file included.

Expectations come from what the test wrote (the features and scores it generated) or from the
store's files read with numpy and pyarrow alone, never from the code under test.
"""

import gc
import json
import os
import shutil
from collections import Counter
from pathlib import Path

import duckdb
import faiss
import numpy as np
import pandas as pd
import polars as pl
import pyarrow.parquet as pq
import pytest

from conftest import chat_records, top_rows, write_jsonl
from conftest import features as stored_features
from conftest import weights as stored_weights
from gradstore.datastore import (
    PENDING_MANIFEST,
    SCHEMA_VERSION,
    Datastore,
    ExampleNotFoundError,
    FeatureBatch,
    Manifest,
    SegmentFiles,
    StoreError,
    completed_shards,
    examples_table,
    finalize_store,
    publish_store,
    write_shard,
)
from gradstore.datastore import finalize as finalize_module
from gradstore.datastore.files import MapBudget, MapCache
from gradstore.datastore.layout import index_file, segment_name, shard_name, tombstones_file, version_manifest
from gradstore.indexer.corpus import CorpusSource
from gradstore.indexer.job import IndexJob, IndexJobConfig
from gradstore.indexer.model import LoraSpec
from gradstore.indexer.projection import ProjectionSpec
from gradstore.service.registry import open_handle

CHECKPOINTS = ("c0", "c1")
WEIGHTS = (1.0, 3.0)
DIM = 16
NUM_EXAMPLES = 250
SHARD_SIZE = 64
NUM_SHARDS = -(-NUM_EXAMPLES // SHARD_SIZE)
SEGMENT = "segments/seg-000001"
INDEX = "index/v000001.faiss"
LISTS = "index/v000001.ivfdata"


# ------------------------------------------------------------------------------- helpers


def unit_fp16(rng, n, dim=DIM):
    x = rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def source_of(row):
    return "alpaca" if row % 3 else "dolly"


def num_tokens_of(row):
    return 10 + row % 7


def make_examples(rows):
    return examples_table(
        rows=rows, ids=[f"ex-{r}" for r in rows], sources=[source_of(r) for r in rows],
        locations=[f"train.jsonl:{r + 1}" for r in rows], records=[{"text": f"record {r}", "n": r} for r in rows],
        num_tokens=[num_tokens_of(r) for r in rows], num_label_tokens=[5 + r % 3 for r in rows],
        truncated=[r % 50 == 0 for r in rows])


def expected_scores(rows, checkpoint):
    """The per-example scores make_batch writes: a function of the row and the checkpoint."""
    rows = np.asarray(rows, np.float32)
    offset = CHECKPOINTS.index(checkpoint) if checkpoint in CHECKPOINTS else 0
    return {"grad_norm": rows + 0.25 + offset, "feature_norm": rows / 8 + offset, "loss": rows / 100 + offset}


def make_batch(rows, feature, checkpoint="c0"):
    return FeatureBatch(rows=np.asarray(rows, np.int64), feature=feature, **expected_scores(rows, checkpoint))


def write_one_shard(work, shard, rows, rng, checkpoints=CHECKPOINTS):
    rows = list(rows)
    write_shard(work, shard, make_examples(rows),
                {c: make_batch(rows, unit_fp16(rng, len(rows)), c) for c in checkpoints})


def write_all_shards(work, n=NUM_EXAMPLES, seed=0):
    """Random shards into ``work``; returns the fp16 features written, per checkpoint."""
    rng = np.random.default_rng(seed)
    features = {name: unit_fp16(rng, n) for name in CHECKPOINTS}
    for shard, start in enumerate(range(0, n, SHARD_SIZE)):
        rows = list(range(start, min(n, start + SHARD_SIZE)))
        write_shard(work, shard, make_examples(rows), {c: make_batch(rows, features[c][rows], c) for c in CHECKPOINTS})
    return features


def manifest_fields(**overrides):
    fields = {
        "model": {"path": "models/tiny", "sha256": "0" * 64, "architecture": "LlamaForCausalLM",
                  "dtype": "bfloat16", "device": "cpu"},
        "tokenizer": {"template": "tulu", "max_length": 2048},
        "lora": {"r": 8, "alpha": 16.0, "target_modules": ["q_proj", "v_proj"],
                 "params": {"layers.0.q_proj.lora_A": [8, 64]}, "num_params": 512},
        "checkpoints": [{"name": name, "path": f"out/{name}", "weight": weight, "learning_rate": weight * 1e-5,
                         "adapter_sha256": None, "optimizer_sha256": None}
                        for name, weight in zip(CHECKPOINTS, WEIGHTS)],
        "gradient_type": "adam",
        "projection": {"kind": "rademacher", "dim": DIM, "seed": 0, "version": "gradstore-rademacher-v1"},
        "job": {"world_size": 1, "wall_seconds": 1.5},
        "settings": {"shard_size": SHARD_SIZE},
    }
    fields.update(overrides)
    return fields


def features_file(root, checkpoint, shard):
    return Path(root) / SEGMENT / "features" / checkpoint / f"{shard_name(shard)}.npy"


def weighted_query(queries):
    """``concat_c(sqrt(w_c) · q_c)`` with the weights normalised, built by hand."""
    w = np.asarray(WEIGHTS) / sum(WEIGHTS)
    return np.concatenate([np.sqrt(wc) * queries[c] for wc, c in zip(w, CHECKPOINTS)], axis=1).astype(np.float32)


def exact_influence(features, queries):
    """``Σ_c w_c · q_c · f_c`` for every (query, row), in float64."""
    w = np.asarray(WEIGHTS) / sum(WEIGHTS)
    return sum(wc * queries[c].astype(np.float64) @ features[c].astype(np.float64).T for wc, c in zip(w, CHECKPOINTS))


def random_queries(seed, n):
    rng = np.random.default_rng(seed)
    return {name: unit_fp16(rng, n).astype(np.float32) for name in CHECKPOINTS}


def search_every_list(index, query, k):
    """``index`` searched exhaustively (nprobe = nlist for IVF kinds)."""
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        ivf = None
    if ivf is not None:
        ivf.nprobe = ivf.nlist
    return index.search(query, k)


def recall(found, expected):
    return np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found, expected)])





def killed(*args, **kwargs):
    raise RuntimeError("killed")


@pytest.fixture
def work(tmp_path):
    return tmp_path / "work"


@pytest.fixture
def store(tmp_path, work):
    """A published store (Flat index) and the features it was written from."""
    features = write_all_shards(work)
    finalize_store(work, manifest_fields(), index_kind="flat")
    out = tmp_path / "store"
    publish_store(work, out, overwrite=False)
    return out, features


# ------------------------------------------------------------------------------- layout and tools


def test_store_layout_and_manifest(store):
    path, _ = store
    manifest = Manifest.load(path)
    rows = range(NUM_EXAMPLES)
    assert (manifest.schema_version, manifest.version, manifest.status) == (SCHEMA_VERSION, 1, "complete")
    assert manifest.counts.examples == manifest.counts.rows == NUM_EXAMPLES and manifest.counts.removed == 0
    assert manifest.counts.by_source == dict(Counter(source_of(r) for r in rows))
    assert manifest.counts.truncated == sum(r % 50 == 0 for r in rows) and manifest.counts.skipped == 0
    assert manifest.tokens["total"] == sum(num_tokens_of(r) for r in rows)
    assert (manifest.shards.size, manifest.shards.count) == (SHARD_SIZE, NUM_SHARDS)
    shard_rows = [min(SHARD_SIZE, NUM_EXAMPLES - s * SHARD_SIZE) for s in range(NUM_SHARDS)]
    assert [s.model_dump() for s in manifest.segments] == [
        {"name": "seg-000001", "first_row": 0, "shard_rows": shard_rows}]
    assert [(h.version, h.action, h.rows_added) for h in manifest.history] == [(1, "build", NUM_EXAMPLES)]
    assert manifest.tombstones is None and manifest.settings == {"shard_size": SHARD_SIZE}
    assert manifest.updated_at == manifest.created_at
    assert (manifest.index.kind, manifest.index.file) == ("flat", INDEX)
    assert (manifest.index.dim, manifest.index.ntotal) == (DIM * len(CHECKPOINTS), NUM_EXAMPLES)
    parts = [shard_name(s) for s in range(NUM_SHARDS)]
    expected = {f"{SEGMENT}/examples/{p}.parquet" for p in parts}
    expected |= {f"{SEGMENT}/scores/{c}/{p}.parquet" for c in CHECKPOINTS for p in parts}
    expected |= {f"{SEGMENT}/features/{c}/{p}.npy" for c in CHECKPOINTS for p in parts}
    assert set(manifest.files) == expected | {INDEX}
    for relative, info in manifest.files.items():
        assert info.bytes == (path / relative).stat().st_size
    assert sorted(p.name for p in path.iterdir()) == ["index", "manifest.json", "segments", "versions"]
    assert sorted(p.name for p in (path / SEGMENT).iterdir()) == ["examples", "features", "scores"]
    assert (path / "versions" / "v000001.json").read_text() == (path / "manifest.json").read_text()


def test_plain_tools_read_the_store(store):
    path, features = store
    segment = path / SEGMENT
    examples = pq.read_table(segment / "examples")
    assert examples.num_rows == NUM_EXAMPLES
    assert sorted(examples.column("row").to_pylist()) == list(range(NUM_EXAMPLES))
    for checkpoint in CHECKPOINTS:
        mapped = [np.load(features_file(path, checkpoint, s), mmap_mode="r") for s in range(NUM_SHARDS)]
        assert all(isinstance(m, np.memmap) and m.dtype.str == "<f2" and m.flags.c_contiguous for m in mapped)
        np.testing.assert_array_equal(np.concatenate(mapped), features[checkpoint])
    frame = pd.read_parquet(segment / "examples" / "part-00000.parquet")
    assert json.loads(frame.loc[3, "record"]) == {"text": "record 3", "n": 3}
    scores = pl.read_parquet(str(segment / "scores" / "c1" / "*.parquet")).sort("row")
    assert scores.height == NUM_EXAMPLES
    wanted = expected_scores(range(NUM_EXAMPLES), "c1")
    for name in ("grad_norm", "feature_norm", "loss"):
        np.testing.assert_array_equal(scores[name].to_numpy(), wanted[name])
    count = duckdb.sql(f"SELECT count(*) FROM '{segment}/scores/c0/*.parquet'").fetchall()[0][0]
    assert count == NUM_EXAMPLES
    assert duckdb.sql(f"SELECT max(row) FROM '{segment}/examples/*.parquet'").fetchall()[0][0] == NUM_EXAMPLES - 1
    assert faiss.read_index(str(path / INDEX)).ntotal == NUM_EXAMPLES
    # Scores are stored uncompressed without dictionaries, examples with zstd.
    column = pq.read_metadata(segment / "scores" / "c0" / "part-00000.parquet").row_group(0).column(1)
    assert column.compression == "UNCOMPRESSED" and not column.has_dictionary_page
    assert pq.read_metadata(segment / "examples" / "part-00000.parquet").row_group(0).column(0).compression == "ZSTD"


def test_flat_index_scores_the_weighted_influence(store):
    path, features = store
    store_ = Datastore.open(path)
    np.testing.assert_allclose(store_.weights, np.asarray(WEIGHTS) / sum(WEIGHTS))
    queries = random_queries(7, 5)
    expected = exact_influence(features, queries)
    query = weighted_query(queries)
    index = store_.index()
    scores, ids = index.search(query, 10)
    np.testing.assert_array_equal(ids, np.argsort(-expected, axis=1, kind="stable")[:, :10])
    np.testing.assert_allclose(scores, np.take_along_axis(expected, ids, axis=1), atol=1e-3)
    every = index.reconstruct_n(0, NUM_EXAMPLES) @ query.T
    np.testing.assert_allclose(every.T, expected, atol=1e-3)


@pytest.mark.parametrize("kind", ["sq16", "ivf", "hnsw"])
def test_approximate_index_kinds_find_the_exact_influence(work, kind):
    features = write_all_shards(work)
    manifest = finalize_store(work, manifest_fields(), index_kind=kind)
    assert (manifest.index.kind, manifest.index.file, manifest.index.ntotal) == (kind, INDEX, NUM_EXAMPLES)
    if kind == "ivf":
        assert manifest.index.factory == f"IVF{round(4 * np.sqrt(NUM_EXAMPLES))},SQfp16"
    queries = random_queries(9, 6)
    expected = exact_influence(features, queries)
    scores, rows = search_every_list(Datastore.open(work, verify=True).index(), weighted_query(queries), 10)
    assert recall(rows, np.argsort(-expected, axis=1, kind="stable")[:, :10]) >= 0.9
    np.testing.assert_allclose(scores, np.take_along_axis(expected, rows, axis=1), atol=2e-3)  # fp16 codes


# ------------------------------------------------------------------------------- the reader


def test_reader_api(store):
    path, features = store
    store_ = Datastore.open(path, verify=True)
    assert store_.num_examples == store_.num_rows == NUM_EXAMPLES and store_.dim == DIM
    assert store_.version == 1 and store_.checkpoint_names == list(CHECKPOINTS)
    example = store_.example(130)
    assert example["row"] == 130 and example["id"] == "ex-130" and example["location"] == "train.jsonl:131"
    assert store_.row_of("ex-200") == 200
    with pytest.raises(ExampleNotFoundError, match="'nope'") as caught:
        store_.row_of("nope")
    assert isinstance(caught.value, KeyError) and isinstance(caught.value, StoreError)
    with pytest.raises(ExampleNotFoundError, match="row 250"):
        store_.example(NUM_EXAMPLES)
    assert store_.examples(columns=["row"]).column("row").to_pylist() == list(range(NUM_EXAMPLES))
    np.testing.assert_array_equal(store_.features("c1"), features["c1"])
    rows = [249, 0, 64, 130]
    np.testing.assert_array_equal(store_.features_at("c0", rows), features["c0"][rows])
    stats = store_.feature_stats("c0")
    assert stats.column_names == ["row", "grad_norm", "feature_norm", "loss"]
    np.testing.assert_array_equal(stats.column("loss").to_numpy(), expected_scores(range(NUM_EXAMPLES), "c0")["loss"])
    with pytest.raises(StoreError, match="no checkpoint 'c9'"):
        store_.features("c9")
    assert store_.removed_rows().size == 0 and store_.skipped_records() == []
    np.testing.assert_array_equal(store_.live_rows(), np.arange(NUM_EXAMPLES))
    assert store_.is_live([0, 249]).tolist() == [True, True]


def test_reader_names_each_shards_files(store):
    path, features = store
    store_ = Datastore.open(path)
    assert len(store_.shards) == NUM_SHARDS
    assert [(s.first_row, s.num_rows) for s in store_.shards][-1] == (3 * SHARD_SIZE, NUM_EXAMPLES - 3 * SHARD_SIZE)
    assert store_.examples_file(2) == path / SEGMENT / "examples" / "part-00002.parquet"
    assert store_.scores_file("c1", 3) == path / SEGMENT / "scores" / "c1" / "part-00003.parquet"
    raw = store_.raw_features("c1", 1)
    assert raw.dtype == np.float16 and not raw.flags.writeable
    np.testing.assert_array_equal(raw, np.load(features_file(path, "c1", 1)))
    before = features_file(path, "c0", 1).read_bytes()
    writable = store_.raw_features("c0", 1, writable=True)
    writable[:] = 0  # copy-on-write: stays in this process
    assert features_file(path, "c0", 1).read_bytes() == before
    np.testing.assert_array_equal(store_.raw_features("c0", 1), features["c0"][SHARD_SIZE:2 * SHARD_SIZE])


def test_readers_keep_their_read_only_maps_open_within_one_budget(store):
    path, features = store
    store_ = Datastore.open(path)
    first = store_.raw_features("c0", 1)
    assert store_.raw_features("c0", 1) is first  # kept open: its pages stay mapped between scans
    assert store_.raw_features("c0", 1, writable=True) is not first  # copy-on-write ones are the holder's
    # Two readers sharing a budget of 3 maps: past it, the least recently used of either is closed.
    budget = MapBudget(3)
    one, two = Datastore.open(path), Datastore.open(path)
    one._maps, two._maps = MapCache(budget), MapCache(budget)
    kept = one.raw_features("c0", 1)
    one.raw_features("c1", 1)
    two.raw_features("c0", 1)
    assert one.raw_features("c0", 1) is kept  # used again: now the most recent
    two.raw_features("c1", 2)  # closes one's c1 map, the least recently used
    assert (len(one._maps), len(two._maps), len(budget)) == (1, 2, 3)
    assert one.raw_features("c0", 1) is kept
    np.testing.assert_array_equal(first, features["c0"][SHARD_SIZE:2 * SHARD_SIZE])  # still valid for its holder
    del two
    gc.collect()
    assert len(budget) == 1  # a reader that is gone leaves the budget


def test_iter_features_streams_in_shard_order(store):
    path, _ = store
    store_ = Datastore.open(path)
    batches = list(store_.iter_features("c0", batch_rows=20))
    rows = np.concatenate([r for r, _ in batches])
    np.testing.assert_array_equal(rows, np.arange(NUM_EXAMPLES))
    assert max(len(r) for r, _ in batches) == 20
    assert all(f.dtype == np.float16 and f.shape == (len(r), DIM) for r, f in batches)
    # Batches stop at shard boundaries: 64 rows -> 20, 20, 20, 4.
    assert [len(r) for r, _ in batches[:4]] == [20, 20, 20, 4]
    np.testing.assert_array_equal(np.concatenate([f for _, f in batches]), store_.features("c0"))


# ------------------------------------------------------------------------------- manifest and open


def test_manifest_round_trip_and_validation(store, tmp_path):
    path, _ = store
    manifest = Manifest.load(path / "manifest.json")
    copy = tmp_path / "copy.json"
    manifest.write(copy)
    assert Manifest.load(copy) == manifest
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

    data = json.loads(copy.read_text())

    def refused(match, **changes):
        copy.write_text(json.dumps({**data, **changes}))
        with pytest.raises(StoreError, match=match):
            Manifest.load(copy)

    refused(rf"copy\.json: schema_version {SCHEMA_VERSION + 1} is not supported",
            schema_version=SCHEMA_VERSION + 1)
    refused(r"a schema version 1 store .*`gradstore migrate ", schema_version=1)
    refused(r"copy\.json: invalid manifest:\n  surprise: Extra inputs", surprise=1)
    refused("features.dtype", features={**data["features"], "dtype": "float32"})
    refused(f"the segments hold {NUM_EXAMPLES} rows, counts.rows is 7",
            counts={**data["counts"], "rows": 7, "removed": 7 - NUM_EXAMPLES})
    refused("tombstones must name a file", tombstones="tombstones/v000001.npy")
    refused("not a path inside the store", files={**data["files"], "../outside": {"bytes": 1, "sha256": "0"}})
    copy.write_text("{not json")
    with pytest.raises(StoreError, match="cannot read the manifest"):
        Manifest.load(copy)


def test_open_detects_missing_and_corrupt_files(store, tmp_path):
    path, _ = store
    with pytest.raises(StoreError, match="directory missing"):
        Datastore.open(tmp_path / "elsewhere")
    target = path / SEGMENT / "scores" / "c1" / "part-00002.parquet"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    Datastore.open(path)  # same size: only a checksum notices
    with pytest.raises(StoreError, match=r"c1/part-00002\.parquet: sha256 mismatch"):
        Datastore.open(path, verify=True)
    target.write_bytes(bytes(data) + b"x")
    with pytest.raises(StoreError, match=r"part-00002\.parquet: \d+ bytes, the manifest says"):
        Datastore.open(path)
    target.unlink()
    with pytest.raises(StoreError, match=r"c1/part-00002\.parquet: listed in the manifest but missing"):
        Datastore.open(path)
    (path / "manifest.json").unlink()
    with pytest.raises(StoreError, match="no manifest"):
        Datastore.open(path)


def test_open_refuses_a_manifest_that_does_not_list_a_required_file(store):
    path, _ = store
    manifest = json.loads((path / "manifest.json").read_text())
    del manifest["files"][f"{SEGMENT}/features/c0/part-00001.npy"]
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match=r"files does not list segments/seg-000001/features/c0/part-00001\.npy"):
        Datastore.open(path)


def test_open_refuses_a_features_file_that_does_not_fit_its_shard(store):
    path, _ = store
    target = features_file(path, "c0", 1)
    data = target.read_bytes()
    target.write_bytes(data[:-2])
    with pytest.raises(StoreError, match=r"features/c0/part-00001\.npy: \d+ bytes, the manifest says"):
        Datastore.open(path)
    # The same number of bytes with another shape: the header check on open (the service's) refuses it.
    np.save(target, unit_fp16(np.random.default_rng(1), 2 * SHARD_SIZE, DIM // 2))
    assert len(target.read_bytes()) == len(data)
    with pytest.raises(StoreError, match="sha256 mismatch"):
        Datastore.open(path, verify=True)
    with pytest.raises(StoreError, match=r"part-00001\.npy: the file holds row-major <f2 \(128, 8\), "
                                         r"expected row-major <f2 \(64, 16\)"):
        Datastore.open(path).check_shards()
    with pytest.raises(StoreError, match=r"part-00001\.npy: the file holds"):
        open_handle("pool", path)
    target.unlink()
    with pytest.raises(StoreError, match=r"features/c0/part-00001\.npy: listed in the manifest but missing"):
        Datastore.open(path)


# ------------------------------------------------------------------------------- finalisation


def test_finalize_refuses_a_missing_shard(work):
    write_all_shards(work)
    (work / "_shards" / "part-00002.done").unlink()
    with pytest.raises(StoreError, match=r"shard 2 \(part-00002\) has no done marker"):
        finalize_store(work, manifest_fields(), index_kind="flat")
    assert not (work / "manifest.json").exists()


def test_finalize_refuses_missing_trailing_shards_when_told_the_count(work):
    write_all_shards(work)
    with pytest.raises(StoreError, match=r"shard 4 \(part-00004\) has no done marker"):
        finalize_store(work, manifest_fields(), index_kind="flat", expected_shards=5)


def test_finalize_refuses_a_row_gap_and_stray_files(work):
    rng = np.random.default_rng(0)
    for shard, rows in enumerate([range(10), range(12, 20)]):
        write_one_shard(work, shard, rows, rng)
    with pytest.raises(StoreError, match=r"shard 1 \(part-00001\) starts at row 12 .* end at row 10 \(gap\)"):
        finalize_store(work, manifest_fields(), index_kind="flat")
    (work / "_shards" / "part-00001.done").unlink()
    with pytest.raises(StoreError, match=r"examples/part-00001\.parquet: not part of any completed shard"):
        finalize_store(work, manifest_fields(), index_kind="flat")
    assert not (work / "manifest.json").exists()


def test_finalize_refuses_fields_that_disagree_with_the_shards(work):
    write_all_shards(work)
    with pytest.raises(StoreError, match="counts.examples = 7 disagrees"):
        finalize_store(work, manifest_fields(counts={"examples": 7}), index_kind="flat")
    with pytest.raises(StoreError, match="tokens.total = 12345 disagrees"):
        finalize_store(work, manifest_fields(tokens={"total": 12345}), index_kind="flat")
    bad_checkpoints = manifest_fields()["checkpoints"][:1]
    with pytest.raises(StoreError, match="checkpoints"):
        finalize_store(work, manifest_fields(checkpoints=bad_checkpoints), index_kind="flat")
    with pytest.raises(StoreError, match="model.sha256"):
        finalize_store(work, manifest_fields(model={"path": "m"}), index_kind="flat")
    assert not (work / "manifest.json").exists()
    assert finalize_store(work, manifest_fields(), index_kind="flat").counts.examples == NUM_EXAMPLES


def test_finalize_refuses_a_features_file_that_does_not_fit_its_shard(work):
    write_all_shards(work)
    np.save(work / "features" / "c1" / "part-00002.npy", unit_fp16(np.random.default_rng(0), SHARD_SIZE - 1))
    # Finalisation has moved the shard folders into the segment by the time it checks them.
    target = features_file(work, "c1", 2)
    with pytest.raises(StoreError, match=r"c1/part-00002\.npy: the file holds row-major <f2 \(63, 16\), "
                                         r"expected row-major <f2 \(64, 16\)"):
        finalize_store(work, manifest_fields(), index_kind="none")
    np.save(target, unit_fp16(np.random.default_rng(0), SHARD_SIZE).astype(np.float32))
    with pytest.raises(StoreError, match=r"c1/part-00002\.npy: the file holds row-major <f4"):
        finalize_store(work, manifest_fields(), index_kind="none")
    np.save(target, np.asfortranarray(unit_fp16(np.random.default_rng(0), SHARD_SIZE)))
    with pytest.raises(StoreError, match=r"c1/part-00002\.npy: the file holds column-major"):
        finalize_store(work, manifest_fields(), index_kind="none")
    target.write_bytes(b"not an npy file")
    with pytest.raises(StoreError, match=r"c1/part-00002\.npy: cannot read the matrix file"):
        finalize_store(work, manifest_fields(), index_kind="none")
    repaired = unit_fp16(np.random.default_rng(0), SHARD_SIZE)
    np.save(target, repaired)
    (target.parent / "part-00099.npy").write_bytes(b"")
    with pytest.raises(StoreError, match=r"part-00099\.npy: not part of any completed shard"):
        finalize_store(work, manifest_fields(), index_kind="none")
    assert not (work / "manifest.json").exists()
    (target.parent / "part-00099.npy").unlink()
    finalize_store(work, manifest_fields(), index_kind="none")
    np.testing.assert_array_equal(Datastore.open(work, verify=True).raw_features("c1", 2), repaired)


def test_a_shard_rewritten_after_a_refused_finalize_completes_the_store(work):
    features = write_all_shards(work)
    (work / "features" / "c1" / "part-00002.npy").write_bytes(b"damaged")
    with pytest.raises(StoreError, match=r"c1/part-00002\.npy: cannot read the matrix file"):
        finalize_store(work, manifest_fields(), index_kind="none")
    # What a resumed job does: rewrite the shard (its marker removed), then finalise again.
    (work / "_shards" / "part-00002.done").unlink()
    rows = list(range(2 * SHARD_SIZE, 3 * SHARD_SIZE))
    write_shard(work, 2, make_examples(rows), {c: make_batch(rows, features[c][rows], c) for c in CHECKPOINTS})
    finalize_store(work, manifest_fields(), index_kind="none")
    store_ = Datastore.open(work, verify=True)
    for checkpoint in CHECKPOINTS:
        np.testing.assert_array_equal(store_.features(checkpoint), features[checkpoint])


def test_finalize_is_idempotent_and_survives_a_crash(tmp_path, monkeypatch):
    clean, crashed = tmp_path / "clean", tmp_path / "crashed"
    write_all_shards(clean)
    write_all_shards(crashed)
    reference = finalize_store(clean, manifest_fields(), index_kind="flat")
    assert finalize_store(clean, manifest_fields(), index_kind="flat") == reference

    with monkeypatch.context() as patch:
        patch.setattr(finalize_module, "file_infos", killed)  # dies after the index is built
        with pytest.raises(RuntimeError):
            finalize_store(crashed, manifest_fields(), index_kind="flat")
    assert (crashed / INDEX).exists() and not (crashed / "manifest.json").exists()
    built = os.stat(crashed / INDEX).st_mtime_ns
    first = finalize_store(crashed, manifest_fields(), index_kind="flat")
    assert os.stat(crashed / INDEX).st_mtime_ns == built  # reused, not rebuilt
    assert first.files == reference.files
    # A crash between the pending manifest and its rename is finished by the next run.
    os.rename(crashed / "manifest.json", crashed / PENDING_MANIFEST)
    assert finalize_store(crashed, manifest_fields(), index_kind="flat") == first
    assert (crashed / "manifest.json").read_text() == first.to_json()
    assert not (crashed / PENDING_MANIFEST).exists() and not (crashed / "_shards").exists()
    assert Datastore.open(crashed, verify=True).num_examples == NUM_EXAMPLES


def test_finalize_survives_a_crash_while_moving_the_shard_folders(work, monkeypatch):
    features = write_all_shards(work)
    moves = []

    def rename_once(source, target):
        if moves:
            raise RuntimeError("killed")
        moves.append(source)
        os.rename(source, target)

    with monkeypatch.context() as patch:
        patch.setattr(finalize_module, "rename", rename_once)
        with pytest.raises(RuntimeError):
            finalize_store(work, manifest_fields(), index_kind="flat")
    assert len(moves) == 1 and (work / "features").exists()  # one folder moved, the others not
    finalize_store(work, manifest_fields(), index_kind="flat")
    store_ = Datastore.open(work, verify=True)
    np.testing.assert_array_equal(store_.features("c1"), features["c1"])


def test_finalize_survives_a_crash_before_manifest_json_is_renamed(work, monkeypatch):
    write_all_shards(work)
    real_rename = finalize_module.rename

    def dies_at_the_manifest(source, target):
        if Path(target).name == "manifest.json":
            raise RuntimeError("killed")
        real_rename(source, target)

    with monkeypatch.context() as patch:
        patch.setattr(finalize_module, "rename", dies_at_the_manifest)
        with pytest.raises(RuntimeError):
            finalize_store(work, manifest_fields(), index_kind="flat")
    assert (work / PENDING_MANIFEST).exists() and not (work / "manifest.json").exists()
    kept = json.loads((work / "versions" / "v000001.json").read_text())
    manifest = finalize_store(work, manifest_fields(), index_kind="flat")
    assert manifest.model_dump(mode="json") == kept
    assert Datastore.open(work, verify=True).num_examples == NUM_EXAMPLES


def test_finalize_without_index_and_with_skipped_records(work):
    write_all_shards(work)
    skipped = [{"location": "a:1", "reason": "bad", "source": "a"}, {"location": "a:9", "reason": "bad", "source": "a"}]
    SegmentFiles(work).skipped.write_text("".join(json.dumps(r) + "\n" for r in skipped))
    manifest = finalize_store(work, manifest_fields(), index_kind="none")
    assert manifest.index is None and manifest.counts.skipped == 2
    assert f"{SEGMENT}/skipped.jsonl" in manifest.files and not (work / "index").exists()
    store_ = Datastore.open(work, verify=True)
    assert store_.skipped_records() == skipped
    with pytest.raises(StoreError, match="has no FAISS index"):
        store_.index()


# ------------------------------------------------------------------------------- publication


def test_publish_refuses_then_replaces(store, tmp_path):
    out, _ = store
    newer = tmp_path / "newer"
    write_all_shards(newer, n=100, seed=1)
    with pytest.raises(StoreError, match="not finalised|no manifest"):
        publish_store(newer, out, overwrite=True)
    finalize_store(newer, manifest_fields(), index_kind="flat")
    with pytest.raises(StoreError, match="already exists"):
        publish_store(newer, out, overwrite=False)
    assert Datastore.open(out).num_examples == NUM_EXAMPLES
    publish_store(newer, out, overwrite=True)
    assert Datastore.open(out, verify=True).num_examples == 100
    assert not newer.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]  # old store removed, no hidden leftovers


def test_publish_deletes_old_stores_an_interrupted_overwrite_left(store, tmp_path):
    out, _ = store
    # What a kill between the two renames of an overwrite leaves: the old store hidden, no output.
    left = tmp_path / f".{out.name}.replaced-123-456"
    out.rename(left)
    other = tmp_path / ".other.replaced-1-2"  # another output's leftover is not ours to delete
    other.mkdir()
    newer = tmp_path / "newer"
    write_all_shards(newer, n=100, seed=1)
    finalize_store(newer, manifest_fields(), index_kind="none")
    publish_store(newer, out, overwrite=True)
    assert Datastore.open(out).num_examples == 100
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.replaced-1-2", out.name]


def test_publish_never_replaces_a_foreign_directory(work, tmp_path):
    write_all_shards(work)
    finalize_store(work, manifest_fields(), index_kind="none")
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(StoreError, match="not a gradstore datastore"):
        publish_store(work, foreign, overwrite=True)
    assert (foreign / "notes.txt").exists() and work.exists()


# ------------------------------------------------------------------------------- the writer


def test_write_shard_validates_its_input(work):
    rng = np.random.default_rng(0)
    rows = list(range(10))
    good = {c: make_batch(rows, unit_fp16(rng, 10), c) for c in CHECKPOINTS}

    def fails(match, examples=None, features=None, shard=0, representations=None):
        with pytest.raises(StoreError, match=match):
            write_shard(work, shard, examples if examples is not None else make_examples(rows), features or good,
                        representations)

    fails("checkpoint 'c1'.*rows differ", features={**good, "c1": make_batch(list(range(1, 11)), good["c1"].feature)})
    fails("feature must be a float16 numpy array, got float32",
          features={**good, "c0": make_batch(rows, good["c0"].feature.astype(np.float32))})
    fails("feature dims differ", features={**good, "c0": make_batch(rows, unit_fp16(rng, 10, DIM + 1))})
    fails(r"row offset 0 has norm 2\.00", features={**good, "c0": make_batch(rows, good["c0"].feature * 2)})
    fails("not usable as a directory name", features={**good, "../x": good["c0"]})
    fails(r"missing \['truncated'\]", examples=make_examples(rows).drop_columns(["truncated"]))
    fails("one increasing run", examples=make_examples(rows[::-1]),
          features={c: make_batch(rows[::-1], b.feature) for c, b in good.items()})
    fails("representations must be a float16", representations=unit_fp16(rng, 10).astype(np.float32))
    fails(r"representations have shape \(9, 16\)", representations=unit_fp16(rng, 9))
    fails("non-negative integer", shard=-1)
    assert completed_shards(work) == set()
    write_shard(work, 0, make_examples(rows), good)
    assert completed_shards(work) == {0}
    assert not [p for p in work.rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp")], \
        "temporary files stay out of the data folders"


def test_write_shard_stores_each_file_of_the_layout(work):
    rng = np.random.default_rng(0)
    rows = list(range(5, 12))
    batches = {c: make_batch(rows, unit_fp16(rng, len(rows)), c) for c in CHECKPOINTS}
    representations = unit_fp16(rng, len(rows), 24)
    write_shard(work, 3, make_examples(rows), batches, representations)
    assert pq.read_table(work / "examples" / "part-00003.parquet").column("row").to_pylist() == rows
    for c in CHECKPOINTS:
        np.testing.assert_array_equal(np.load(work / "features" / c / "part-00003.npy"), batches[c].feature)
        scores = pq.read_table(work / "scores" / c / "part-00003.parquet")
        np.testing.assert_array_equal(scores.column("grad_norm").to_numpy(), expected_scores(rows, c)["grad_norm"])
    np.testing.assert_array_equal(np.load(work / "representations" / "part-00003.npy"), representations)
    assert not (work / "raw_features").exists()
    # Rewritten without representations, the shard drops its earlier vectors.
    write_shard(work, 3, make_examples(rows), batches)
    assert not (work / "representations" / "part-00003.npy").exists()


def test_empty_shard_is_allowed(work):
    rng = np.random.default_rng(0)
    for shard, rows in enumerate([range(5), [], range(5, 9)]):
        write_one_shard(work, shard, rows, rng)
    manifest = finalize_store(work, manifest_fields(), index_kind="flat")
    assert manifest.counts.examples == 9 and manifest.shards.count == 3
    assert manifest.segments[0].shard_rows == [5, 0, 4]
    assert np.load(features_file(work, "c0", 1)).shape == (0, DIM)
    store_ = Datastore.open(work, verify=True)
    assert store_.example(6)["id"] == "ex-6"
    assert [len(r) for r, _ in store_.iter_features("c0")] == [5, 4]


def test_shard_and_file_names():
    assert shard_name(12) == "part-00012" and shard_name(123456) == "part-123456"
    assert segment_name(3) == "seg-000003"
    assert (index_file(4), version_manifest(4), tombstones_file(4)) == (
        "index/v000004.faiss", "versions/v000004.json", "tombstones/v000004.npy")
    files = SegmentFiles(Path("s"))
    assert files.examples(3).as_posix() == "s/examples/part-00003.parquet"
    assert files.scores("c0", 3).as_posix() == "s/scores/c0/part-00003.parquet"
    assert files.features("c0", 3).as_posix() == "s/features/c0/part-00003.npy"
    assert files.representations(3).as_posix() == "s/representations/part-00003.npy"


# ------------------------------------------------------------------------------- ivf-ondisk


def test_ivf_ondisk_store_is_checksummed_relocatable_and_exact_with_every_list(work, tmp_path):
    features = write_all_shards(work)
    # A budget this small puts each 64-row shard in a part of its own, merged on disk.
    manifest = finalize_store(work, manifest_fields(), index_kind="ivf-ondisk", index_memory_budget=4096)
    assert (manifest.index.kind, manifest.index.file) == ("ivf-ondisk", INDEX)
    assert manifest.index.factory == f"IVF{round(4 * np.sqrt(NUM_EXAMPLES))},SQfp16"
    assert {INDEX, LISTS} <= set(manifest.files)
    publish_store(work, tmp_path / "store", overwrite=False)
    assert sorted(p.name for p in (tmp_path / "store" / "index").iterdir()) == ["v000001.faiss", "v000001.ivfdata"]
    moved = tmp_path / "copies" / "moved"
    shutil.copytree(tmp_path / "store", moved)
    shutil.rmtree(tmp_path / "store")
    store = Datastore.open(moved, verify=True)
    queries = random_queries(8, 6)
    expected = exact_influence(features, queries)
    scores, rows = search_every_list(store.index(), weighted_query(queries), 10)
    np.testing.assert_allclose(scores, np.take_along_axis(expected, rows, axis=1), atol=2e-3)  # fp16 codes
    assert recall(rows, np.argsort(-expected, axis=1, kind="stable")[:, :10]) >= 0.9


def test_ivf_ondisk_store_without_its_lists_file_fails_to_open(work):
    write_all_shards(work)
    finalize_store(work, manifest_fields(), index_kind="ivf-ondisk")
    opened = Datastore.open(work)
    (work / LISTS).unlink()
    with pytest.raises(StoreError, match=r"v000001\.ivfdata: listed in the manifest but missing"):
        Datastore.open(work)
    with pytest.raises(StoreError, match=r"v000001\.ivfdata: missing; the ivf-ondisk index index/v000001\.faiss keeps"):
        opened.index()
    with pytest.raises(StoreError, match=r"v000001\.ivfdata"):
        open_handle("pool", work)


def test_ivf_ondisk_finalize_resumes_without_rebuilding(tmp_path, monkeypatch):
    clean, crashed = tmp_path / "clean", tmp_path / "crashed"
    write_all_shards(clean)
    write_all_shards(crashed)
    reference = finalize_store(clean, manifest_fields(), index_kind="ivf-ondisk", index_memory_budget=4096)
    with monkeypatch.context() as patch:
        patch.setattr(finalize_module, "file_infos", killed)  # dies after the index is built
        with pytest.raises(RuntimeError):
            finalize_store(crashed, manifest_fields(), index_kind="ivf-ondisk", index_memory_budget=4096)
    built = [os.stat(crashed / name).st_mtime_ns for name in (INDEX, LISTS)]
    assert not list((crashed / "_shards").rglob("*.ivfdata"))  # the part files are gone
    resumed = finalize_store(crashed, manifest_fields(), index_kind="ivf-ondisk", index_memory_budget=4096)
    assert [os.stat(crashed / name).st_mtime_ns for name in (INDEX, LISTS)] == built
    assert resumed.files == reference.files  # the same bytes, built twice


def test_finalize_with_another_kind_drops_an_earlier_lists_file(work, monkeypatch):
    write_all_shards(work)
    with monkeypatch.context() as patch:
        patch.setattr(finalize_module, "file_infos", killed)  # dies after the index is built
        with pytest.raises(RuntimeError):
            finalize_store(work, manifest_fields(), index_kind="ivf-ondisk")
    assert (work / LISTS).exists()
    manifest = finalize_store(work, manifest_fields(), index_kind="ivf")
    assert manifest.index.kind == "ivf" and LISTS not in manifest.files
    assert not (work / LISTS).exists()
    assert Datastore.open(work, verify=True).index().ntotal == NUM_EXAMPLES


def test_index_job_with_ivf_ondisk_matches_exact_influence(tmp_path, tiny_model_dirs):
    corpus = write_jsonl(tmp_path / "toy.jsonl", chat_records(40, seed=3, prefix="ex"))
    config = IndexJobConfig(
        corpus=[CorpusSource.parse(str(corpus))], model=tiny_model_dirs["llama"], out=tmp_path / "store",
        gradient_type="sgd", lora=LoraSpec(r=4, alpha=8), projection=ProjectionSpec(dim=64, seed=0),
        max_length=64, shard_size=8, max_tokens_per_batch=256, device="cpu", progress=False,
        index="ivf-ondisk", index_memory_budget=4096)  # a part per shard
    IndexJob(config, log=lambda *_: None).run()
    handle = open_handle("pool", config.out, verify_checksums=True)
    assert handle.store.manifest.index.kind == "ivf-ondisk" and handle.index.ntotal == 40
    assert (config.out / LISTS).is_file()
    faiss.extract_index_ivf(handle.index).nprobe = faiss.extract_index_ivf(handle.index).nlist
    # Examples 0..4 as targets, scored by hand from the .npy features.
    w = stored_weights(config.out)
    vectors = {c: stored_features(config.out, c) for c in w}
    exact = sum(w[c] * vectors[c] @ vectors[c][:5].T for c in w)
    query = np.concatenate([np.sqrt(w[c]) * vectors[c][:5] for c in handle.store.checkpoint_names], axis=1)
    for target, hits in enumerate(handle.search(query.astype(np.float32), 10)):
        rows = [row for row, _ in hits]
        assert hits[0][0] == target  # an example is its own most influential neighbour
        assert len(set(rows) & set(top_rows(exact[:, target], 10))) >= 9
        np.testing.assert_allclose([score for _, score in hits], exact[rows, target], atol=2e-3)
