"""The datastore format end to end: shards written, finalised, published, read back by every tool."""

import json
import os
import shutil
from pathlib import Path

import duckdb
import faiss
import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import chat_records, top_rows, write_jsonl
from conftest import features as stored_features
from conftest import weights as stored_weights
from gradstore.indexer import datastore as ds
from gradstore.indexer.corpus import CorpusSource
from gradstore.indexer.datastore import (
    SCHEMA_VERSION,
    Datastore,
    ExampleNotFoundError,
    FeatureBatch,
    Manifest,
    completed_shards,
    examples_table,
    finalize_store,
    publish_store,
    shard_name,
    write_shard,
)
from gradstore.indexer.errors import StoreError
from gradstore.indexer.faiss_index import ivf_nlist
from gradstore.indexer.job import IndexJob, IndexJobConfig
from gradstore.indexer.model import LoraSpec
from gradstore.indexer.projection import ProjectionSpec
from gradstore.service.registry import open_handle

CHECKPOINTS = ("c0", "c1")
WEIGHTS = (1.0, 3.0)
DIM = 16
NUM_EXAMPLES = 250
SHARD_SIZE = 64


def unit_fp16(rng, n, dim=DIM):
    x = rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def make_examples(rows):
    return examples_table(
        rows=rows, ids=[f"ex-{r}" for r in rows], sources=["alpaca" if r % 3 else "dolly" for r in rows],
        locations=[f"train.jsonl:{r + 1}" for r in rows], records=[{"text": f"record {r}", "n": r} for r in rows],
        num_tokens=[10 + r % 7 for r in rows], num_label_tokens=[5 + r % 3 for r in rows],
        truncated=[r % 50 == 0 for r in rows])


def make_batch(rows, feature, rng):
    n = len(rows)
    return FeatureBatch(rows=np.asarray(rows, np.int64), feature=feature,
                        grad_norm=rng.random(n, dtype=np.float32), feature_norm=rng.random(n, dtype=np.float32),
                        loss=rng.random(n, dtype=np.float32))


def write_all_shards(work, n=NUM_EXAMPLES, seed=0):
    """Random shards into ``work``; returns the fp16 features written, per checkpoint."""
    rng = np.random.default_rng(seed)
    features = {name: unit_fp16(rng, n) for name in CHECKPOINTS}
    for shard, start in enumerate(range(0, n, SHARD_SIZE)):
        rows = list(range(start, min(n, start + SHARD_SIZE)))
        write_shard(work, shard, make_examples(rows),
                    {name: make_batch(rows, features[name][rows], rng) for name in CHECKPOINTS})
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
        "tokens": {"total": 12345},
        "job": {"world_size": 1, "wall_seconds": 1.5},
    }
    fields.update(overrides)
    return fields


@pytest.fixture
def work(tmp_path):
    return tmp_path / "work"


@pytest.fixture
def store(tmp_path, work):
    """A published store and the features it was written from."""
    features = write_all_shards(work)
    finalize_store(work, manifest_fields(), index_kind="flat")
    out = tmp_path / "store"
    publish_store(work, out, overwrite=False)
    return out, features


def test_store_layout_and_manifest(store):
    path, _ = store
    manifest = Manifest.load(path)
    shards = -(-NUM_EXAMPLES // SHARD_SIZE)
    assert manifest.counts.examples == NUM_EXAMPLES and manifest.shards.count == shards
    assert manifest.shards.size == SHARD_SIZE
    assert manifest.counts.by_source == {"alpaca": 166, "dolly": 84}
    assert manifest.counts.truncated == 5 and manifest.counts.skipped == 0
    assert manifest.index.kind == "flat" and manifest.index.dim == DIM * 2 and manifest.index.ntotal == NUM_EXAMPLES
    expected = {f"examples/{shard_name(s)}.parquet" for s in range(shards)}
    expected |= {f"features/{c}/{shard_name(s)}.parquet" for c in CHECKPOINTS for s in range(shards)}
    expected |= {f"raw_features/{c}/{shard_name(s)}.npy" for c in CHECKPOINTS for s in range(shards)}
    assert set(manifest.files) == expected | {"index.faiss"}
    assert not (path / "_shards").exists()
    assert sorted(p.name for p in path.iterdir()) == ["examples", "features", "index.faiss", "manifest.json",
                                                      "raw_features"]


def test_plain_tools_read_the_store(store):
    path, features = store
    examples = pq.read_table(path / "examples")
    assert examples.num_rows == NUM_EXAMPLES
    assert sorted(examples.column("row").to_pylist()) == list(range(NUM_EXAMPLES))
    table = pq.read_table(path / "features" / "c0")
    assert table.schema.field("feature").type == pa.list_(pa.float16(), DIM)
    order = np.argsort(table.column("row").to_numpy())
    stored = table.column("feature").combine_chunks().flatten().to_numpy().reshape(-1, DIM)[order]
    np.testing.assert_array_equal(stored, features["c0"])
    frame = pd.read_parquet(path / "examples" / "part-00000.parquet")
    assert json.loads(frame.loc[3, "record"]) == {"text": "record 3", "n": 3}
    polars_frame = pl.read_parquet(str(path / "features" / "c1" / "*.parquet"))
    assert polars_frame.height == NUM_EXAMPLES
    count = duckdb.sql(f"SELECT count(*) FROM '{path}/features/c0/*.parquet'").fetchall()[0][0]
    assert count == NUM_EXAMPLES
    assert duckdb.sql(f"SELECT max(row) FROM '{path}/examples/*.parquet'").fetchall()[0][0] == NUM_EXAMPLES - 1
    assert faiss.read_index(str(path / "index.faiss")).ntotal == NUM_EXAMPLES
    # Features are stored uncompressed, examples with zstd.
    meta = pq.read_metadata(path / "features" / "c0" / "part-00000.parquet")
    assert meta.row_group(0).column(1).compression == "UNCOMPRESSED"
    assert pq.read_metadata(path / "examples" / "part-00000.parquet").row_group(0).column(0).compression == "ZSTD"


def test_flat_index_scores_the_weighted_influence(store):
    path, features = store
    store_ = Datastore.open(path)
    rng = np.random.default_rng(7)
    queries = {name: unit_fp16(rng, 5).astype(np.float32) for name in CHECKPOINTS}
    w = np.asarray(WEIGHTS) / sum(WEIGHTS)
    np.testing.assert_allclose(store_.weights, w)
    expected = sum(wc * queries[c] @ features[c].astype(np.float32).T for wc, c in zip(w, CHECKPOINTS))
    query = ds.concat_weighted([queries[c] for c in CHECKPOINTS], store_.weights)
    index = store_.index()
    scores, ids = index.search(query, 10)
    np.testing.assert_array_equal(ids, np.argsort(-expected, axis=1, kind="stable")[:, :10])
    np.testing.assert_allclose(scores, np.take_along_axis(expected, ids, axis=1), atol=1e-3)
    every = index.reconstruct_n(0, NUM_EXAMPLES) @ query.T
    np.testing.assert_allclose(every.T, expected, atol=1e-3)


def test_reader_api(store):
    path, features = store
    store_ = Datastore.open(path, verify=True)
    assert store_.num_examples == NUM_EXAMPLES and store_.dim == DIM
    assert store_.checkpoint_names == list(CHECKPOINTS)
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
    assert store_.feature_stats("c0").column_names == ["row", "grad_norm", "feature_norm", "loss"]
    with pytest.raises(StoreError, match="no checkpoint 'c9'"):
        store_.features("c9")


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


def test_manifest_round_trip_and_validation(store, tmp_path):
    path, _ = store
    manifest = Manifest.load(path / "manifest.json")
    copy = tmp_path / "copy.json"
    manifest.write(copy)
    assert Manifest.load(copy) == manifest
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

    data = json.loads(copy.read_text())
    copy.write_text(json.dumps({**data, "schema_version": SCHEMA_VERSION + 1}))
    with pytest.raises(StoreError, match=r"copy\.json: schema_version 2 is not supported"):
        Manifest.load(copy)
    copy.write_text(json.dumps({**data, "surprise": 1}))
    with pytest.raises(StoreError, match=r"copy\.json: invalid manifest:\n  surprise: Extra inputs"):
        Manifest.load(copy)
    data["features"]["dtype"] = "float32"
    copy.write_text(json.dumps(data))
    with pytest.raises(StoreError, match="features.dtype"):
        Manifest.load(copy)
    copy.write_text("{not json")
    with pytest.raises(StoreError, match="cannot read the manifest"):
        Manifest.load(copy)


def test_open_detects_missing_and_corrupt_files(store, tmp_path):
    path, _ = store
    with pytest.raises(StoreError, match="directory missing"):
        Datastore.open(tmp_path / "elsewhere")
    target = path / "features" / "c1" / "part-00002.parquet"
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


def test_finalize_refuses_a_missing_shard(work):
    write_all_shards(work)
    (work / "_shards" / "part-00002.done").unlink()
    with pytest.raises(StoreError, match=r"shard 2 \(part-00002\) has no done marker"):
        finalize_store(work, manifest_fields())
    assert not (work / "manifest.json").exists()


def test_finalize_refuses_missing_trailing_shards_when_told_the_count(work):
    write_all_shards(work)
    with pytest.raises(StoreError, match=r"shard 4 \(part-00004\) has no done marker"):
        finalize_store(work, manifest_fields(), expected_shards=5)


def test_finalize_refuses_a_row_gap_and_stray_files(work):
    rng = np.random.default_rng(0)
    for shard, rows in enumerate([range(0, 10), range(12, 20)]):
        rows = list(rows)
        write_shard(work, shard, make_examples(rows), {c: make_batch(rows, unit_fp16(rng, len(rows)), rng)
                                                       for c in CHECKPOINTS})
    with pytest.raises(StoreError, match=r"shard 1 \(part-00001\) starts at row 12 .* end at row 10 \(gap\)"):
        finalize_store(work, manifest_fields())
    (work / "_shards" / "part-00001.done").unlink()
    with pytest.raises(StoreError, match=r"examples/part-00001\.parquet: not part of any completed shard"):
        finalize_store(work, manifest_fields())


def test_finalize_refuses_fields_that_disagree_with_the_shards(work):
    write_all_shards(work)
    with pytest.raises(StoreError, match="counts.examples = 7 disagrees"):
        finalize_store(work, manifest_fields(counts={"examples": 7}))
    bad_checkpoints = manifest_fields()["checkpoints"][:1]
    with pytest.raises(StoreError, match="checkpoints"):
        finalize_store(work, manifest_fields(checkpoints=bad_checkpoints))
    with pytest.raises(StoreError, match="model.sha256"):
        finalize_store(work, manifest_fields(model={"path": "m"}))


def test_finalize_is_idempotent_and_survives_a_crash(tmp_path, monkeypatch):
    clean, crashed = tmp_path / "clean", tmp_path / "crashed"
    write_all_shards(clean)
    write_all_shards(crashed)
    reference = finalize_store(clean, manifest_fields(), index_kind="flat")
    assert finalize_store(clean, manifest_fields(), index_kind="flat") == reference

    def crash(*args):
        raise RuntimeError("killed")

    with monkeypatch.context() as patch:
        patch.setattr(ds, "_file_infos", crash)  # dies after the index is built
        with pytest.raises(RuntimeError):
            finalize_store(crashed, manifest_fields(), index_kind="flat")
    assert (crashed / "index.faiss").exists() and not (crashed / "manifest.json").exists()
    built = os.stat(crashed / "index.faiss").st_mtime_ns
    first = finalize_store(crashed, manifest_fields(), index_kind="flat")
    assert os.stat(crashed / "index.faiss").st_mtime_ns == built  # reused, not rebuilt
    assert first.files == reference.files
    # A crash between the pending manifest and its rename is finished by the next run.
    os.rename(crashed / "manifest.json", crashed / ds.PENDING_MANIFEST)
    assert finalize_store(crashed, manifest_fields(), index_kind="flat") == first
    assert (crashed / "manifest.json").read_text() == first.to_json()
    assert Datastore.open(crashed, verify=True).num_examples == NUM_EXAMPLES


def test_finalize_without_index_and_with_skipped_records(work):
    write_all_shards(work)
    (work / "skipped.jsonl").write_text('{"location": "a:1"}\n{"location": "a:9"}\n')
    manifest = finalize_store(work, manifest_fields(), index_kind="none")
    assert manifest.index is None and manifest.counts.skipped == 2
    assert "skipped.jsonl" in manifest.files and not (work / "index.faiss").exists()
    with pytest.raises(StoreError, match="has no FAISS index"):
        Datastore.open(work).index()


def test_finalize_auto_and_approximate_index_kinds(work):
    write_all_shards(work)
    manifest = finalize_store(work, manifest_fields(), index_kind="ivf")
    assert manifest.index.factory == f"IVF{round(4 * np.sqrt(NUM_EXAMPLES))},SQfp16"
    assert Datastore.open(work).index().ntotal == NUM_EXAMPLES


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


def test_write_shard_validates_its_input(work):
    rng = np.random.default_rng(0)
    rows = list(range(10))
    good = {c: make_batch(rows, unit_fp16(rng, 10), rng) for c in CHECKPOINTS}

    def fails(match, examples=None, features=None, shard=0):
        with pytest.raises(StoreError, match=match):
            write_shard(work, shard, examples if examples is not None else make_examples(rows), features or good)

    fails("checkpoint 'c1'.*rows differ",
          features={**good, "c1": make_batch(list(range(1, 11)), good["c1"].feature, rng)})
    fails("feature must be a float16 numpy array, got float32",
          features={**good, "c0": make_batch(rows, good["c0"].feature.astype(np.float32), rng)})
    fails("feature dims differ", features={**good, "c0": make_batch(rows, unit_fp16(rng, 10, DIM + 1), rng)})
    fails(r"row offset 0 has norm 2\.00", features={**good, "c0": make_batch(rows, good["c0"].feature * 2, rng)})
    fails("not usable as a directory name", features={**good, "../x": good["c0"]})
    fails(r"missing \['truncated'\]", examples=make_examples(rows).drop_columns(["truncated"]))
    fails("one increasing run", examples=make_examples(rows[::-1]),
          features={c: make_batch(rows[::-1], b.feature, rng) for c, b in good.items()})
    assert completed_shards(work) == set()
    write_shard(work, 0, make_examples(rows), good)
    assert completed_shards(work) == {0}
    assert not list((work / "examples").glob(".*")), "temporary files stay out of the data folders"


def test_empty_shard_is_allowed(work):
    rng = np.random.default_rng(0)
    for shard, rows in enumerate([list(range(5)), [], list(range(5, 9))]):
        write_shard(work, shard, make_examples(rows),
                    {c: make_batch(rows, unit_fp16(rng, len(rows)), rng) for c in CHECKPOINTS})
    manifest = finalize_store(work, manifest_fields(), index_kind="flat")
    assert manifest.counts.examples == 9 and manifest.shards.count == 3
    store_ = Datastore.open(work)
    assert store_.example(6)["id"] == "ex-6"
    assert [len(r) for r, _ in store_.iter_features("c0")] == [5, 4]


def test_shard_names():
    assert shard_name(12) == "part-00012"
    assert Path(ds.features_path(Path("s"), "c0", 3)).as_posix() == "s/features/c0/part-00003.parquet"
    assert Path(ds.raw_features_path(Path("s"), "c0", 3)).as_posix() == "s/raw_features/c0/part-00003.npy"


# ------------------------------------------------------------------------------- raw features


def parquet_features(path, checkpoint, shard):
    """float16 (n, k) feature column of one Parquet shard file, read with pyarrow alone."""
    table = pq.read_table(path / "features" / checkpoint / f"{shard_name(shard)}.parquet")
    return table.column("feature").combine_chunks().flatten().to_numpy().reshape(table.num_rows, -1)


def without_raw_features(path):
    """Turn a store into one written before raw files existed: no raw_features/, not listed."""
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"] = {k: v for k, v in manifest["files"].items() if not k.startswith("raw_features/")}
    (path / "manifest.json").write_text(json.dumps(manifest))
    for file in (path / "raw_features").rglob("*.npy"):
        file.unlink()


def test_raw_features_are_the_parquet_column_and_map_without_decoding(store):
    path, features = store
    store_ = Datastore.open(path, verify=True)  # raw files are listed and checksummed
    for checkpoint in CHECKPOINTS:
        for shard in range(store_.manifest.shards.count):
            mapped = np.load(path / "raw_features" / checkpoint / f"{shard_name(shard)}.npy", mmap_mode="r")
            assert isinstance(mapped, np.memmap) and mapped.dtype.str == "<f2" and mapped.flags.c_contiguous
            np.testing.assert_array_equal(mapped, parquet_features(path, checkpoint, shard))
            raw = store_.raw_features(checkpoint, shard)
            assert raw.dtype == np.float16 and not raw.flags.writeable
            np.testing.assert_array_equal(raw, mapped)
    assert store_.raw_features("c0", 1, writable=True).flags.writeable
    batches = list(store_.iter_features("c1", batch_rows=20))
    assert [len(r) for r, _ in batches[:4]] == [20, 20, 20, 4]
    np.testing.assert_array_equal(np.concatenate([r for r, _ in batches]), np.arange(NUM_EXAMPLES))
    np.testing.assert_array_equal(store_.features("c1"), features["c1"])


def test_store_without_raw_features_reads_the_same_from_parquet(store, tmp_path):
    path, features = store
    opened = Datastore.open(path)
    reference = {c: [(rows, np.array(f)) for rows, f in opened.iter_features(c, 30)] for c in CHECKPOINTS}
    without_raw_features(path)
    old = Datastore.open(path, verify=True)
    assert old.raw_features("c0", 0) is None
    for checkpoint in CHECKPOINTS:
        np.testing.assert_array_equal(old.features(checkpoint), features[checkpoint])
        for (rows, parquet), (raw_rows, raw) in zip(old.iter_features(checkpoint, 30), reference[checkpoint],
                                                    strict=True):
            np.testing.assert_array_equal(rows, raw_rows)
            np.testing.assert_array_equal(parquet, raw)
    # A store opened before its raw files went away says which one it cannot read.
    with pytest.raises(StoreError, match=r"raw_features/c0/part-00000\.npy: cannot read raw features file"):
        opened.features("c0")


def test_write_shard_without_raw_features_removes_an_earlier_copy(work):
    write_all_shards(work)
    assert (work / "raw_features" / "c0" / "part-00001.npy").exists()
    rng = np.random.default_rng(5)
    rows = list(range(SHARD_SIZE, 2 * SHARD_SIZE))
    write_shard(work, 1, make_examples(rows), {c: make_batch(rows, unit_fp16(rng, len(rows)), rng)
                                               for c in CHECKPOINTS}, raw_features=False)
    assert not list((work / "raw_features").rglob("part-00001.npy"))
    manifest = finalize_store(work, manifest_fields(), index_kind="none")
    assert "raw_features/c0/part-00000.npy" in manifest.files
    assert "raw_features/c0/part-00001.npy" not in manifest.files
    store_ = Datastore.open(work)
    assert store_.raw_features("c0", 1) is None and store_.raw_features("c0", 0) is not None
    assert len(store_.features("c0")) == NUM_EXAMPLES


def test_finalize_refuses_a_raw_file_that_does_not_fit_its_shard(work):
    write_all_shards(work)
    target = work / "raw_features" / "c1" / "part-00002.npy"
    np.save(target, unit_fp16(np.random.default_rng(0), SHARD_SIZE - 1))
    with pytest.raises(StoreError, match=r"c1/part-00002\.npy: raw features file holds row-major <f2 \(63, 16\), "
                                         r"expected row-major <f2 \(64, 16\)"):
        finalize_store(work, manifest_fields(), index_kind="none")
    target.write_bytes(b"not an npy file")
    with pytest.raises(StoreError, match=r"c1/part-00002\.npy: cannot read raw features file"):
        finalize_store(work, manifest_fields(), index_kind="none")
    (work / "raw_features" / "c1" / "part-00099.npy").write_bytes(b"")
    target.unlink()
    with pytest.raises(StoreError, match=r"part-00099\.npy: not part of any completed shard"):
        finalize_store(work, manifest_fields(), index_kind="none")


def test_open_detects_a_truncated_or_missing_raw_file(store):
    path, _ = store
    target = path / "raw_features" / "c0" / "part-00001.npy"
    data = target.read_bytes()
    target.write_bytes(data[:-2])
    with pytest.raises(StoreError, match=r"raw_features/c0/part-00001\.npy: \d+ bytes, the manifest says"):
        Datastore.open(path)
    target.unlink()
    with pytest.raises(StoreError, match=r"raw_features/c0/part-00001\.npy: listed in the manifest but missing"):
        Datastore.open(path)


def exact_top_k(features, queries, k):
    """Rows and scores of the exact weighted influence, per query, best first."""
    w = np.asarray(WEIGHTS) / sum(WEIGHTS)
    scores = sum(wc * queries[c] @ features[c].astype(np.float32).T for wc, c in zip(w, CHECKPOINTS))
    rows = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return rows, np.take_along_axis(scores, rows, axis=1)


def search_every_list(store, queries, k):
    """``store``'s index searched with nprobe = nlist (exhaustive over its lists)."""
    index = store.index()
    faiss.extract_index_ivf(index).nprobe = faiss.extract_index_ivf(index).nlist
    return index.search(ds.concat_weighted([queries[c] for c in CHECKPOINTS], store.weights), k)


def test_ivf_ondisk_store_is_checksummed_relocatable_and_exact_with_every_list(work, tmp_path):
    features = write_all_shards(work)
    # A budget this small puts each 64-row shard in a part of its own, merged on disk.
    manifest = finalize_store(work, manifest_fields(), index_kind="ivf-ondisk", index_memory_budget=4096)
    assert (manifest.index.kind, manifest.index.file) == ("ivf-ondisk", "index.faiss")
    assert manifest.index.factory == f"IVF{ivf_nlist(NUM_EXAMPLES)},SQfp16"
    assert {"index.faiss", "index.ivfdata"} <= set(manifest.files)
    publish_store(work, tmp_path / "store", overwrite=False)
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == [
        "examples", "features", "index.faiss", "index.ivfdata", "manifest.json", "raw_features"]
    moved = tmp_path / "copies" / "moved"
    shutil.copytree(tmp_path / "store", moved)
    shutil.rmtree(tmp_path / "store")
    store = Datastore.open(moved, verify=True)
    rng = np.random.default_rng(8)
    queries = {name: unit_fp16(rng, 6).astype(np.float32) for name in CHECKPOINTS}
    scores, rows = search_every_list(store, queries, 10)
    expected_rows, expected_scores = exact_top_k(features, queries, 10)
    np.testing.assert_allclose(scores, expected_scores, atol=2e-3)  # fp16 codes
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows, expected_rows)])
    assert recall >= 0.9


def test_ivf_ondisk_store_without_its_lists_file_fails_to_open(work):
    write_all_shards(work)
    finalize_store(work, manifest_fields(), index_kind="ivf-ondisk")
    opened = Datastore.open(work)
    (work / "index.ivfdata").unlink()
    with pytest.raises(StoreError, match="index.ivfdata: listed in the manifest but missing"):
        Datastore.open(work)
    with pytest.raises(StoreError, match="index.ivfdata: missing; the ivf-ondisk index index.faiss keeps"):
        opened.index()
    with pytest.raises(StoreError, match="index.ivfdata"):
        open_handle("pool", work)


def killed(*args):
    raise RuntimeError("killed")


def test_ivf_ondisk_finalize_resumes_without_rebuilding(tmp_path, monkeypatch):
    clean, crashed = tmp_path / "clean", tmp_path / "crashed"
    write_all_shards(clean)
    write_all_shards(crashed)
    reference = finalize_store(clean, manifest_fields(), index_kind="ivf-ondisk", index_memory_budget=4096)
    with monkeypatch.context() as patch:
        patch.setattr(ds, "_file_infos", killed)  # dies after the index is built
        with pytest.raises(RuntimeError):
            finalize_store(crashed, manifest_fields(), index_kind="ivf-ondisk", index_memory_budget=4096)
    built = [os.stat(crashed / name).st_mtime_ns for name in ("index.faiss", "index.ivfdata")]
    assert not list((crashed / "_shards").rglob("*.ivfdata"))  # the part files are gone
    resumed = finalize_store(crashed, manifest_fields(), index_kind="ivf-ondisk", index_memory_budget=4096)
    assert [os.stat(crashed / name).st_mtime_ns for name in ("index.faiss", "index.ivfdata")] == built
    assert resumed.files == reference.files  # the same bytes, built twice


def test_finalize_with_another_kind_drops_an_earlier_lists_file(work, monkeypatch):
    write_all_shards(work)
    with monkeypatch.context() as patch:
        patch.setattr(ds, "_file_infos", killed)  # dies after the index is built
        with pytest.raises(RuntimeError):
            finalize_store(work, manifest_fields(), index_kind="ivf-ondisk")
    assert (work / "index.ivfdata").exists()
    manifest = finalize_store(work, manifest_fields(), index_kind="ivf")
    assert manifest.index.kind == "ivf" and "index.ivfdata" not in manifest.files
    assert not (work / "index.ivfdata").exists()
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
    faiss.extract_index_ivf(handle.index).nprobe = faiss.extract_index_ivf(handle.index).nlist
    # Examples 0..4 as targets, scored by hand from the Parquet features.
    w = stored_weights(config.out)
    vectors = {c: stored_features(config.out, c) for c in w}
    exact = sum(w[c] * vectors[c] @ vectors[c][:5].T for c in w)
    query = ds.concat_weighted([vectors[c][:5] for c in handle.store.checkpoint_names], handle.store.weights)
    for target, hits in enumerate(handle.search(query, 10)):
        rows = [row for row, _ in hits]
        assert hits[0][0] == target  # an example is its own most influential neighbour
        assert len(set(rows) & set(top_rows(exact[:, target], 10))) >= 9
        np.testing.assert_allclose([score for _, score in hits], exact[rows, target], atol=2e-3)
