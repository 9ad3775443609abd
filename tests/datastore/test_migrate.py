"""``gradstore migrate``: a schema version 1 store (one folder, the features in Parquet and again as
raw ``.npy`` files, a Flat index) becomes a current store with the same rows, bit for bit.

The version 1 store is written here from a current one with plain pyarrow, numpy and FAISS, as the
version 1 writer laid it out (its format specification is in the git history of
``indexer/datastore.py``), so the migration is checked against that layout, not against itself.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import ONE_THREAD
from gradstore.datastore import Datastore, StoreError
from gradstore.datastore.migrate import migrate
from gradstore.selection import SelectionEngine, SelectionOptions, TargetSet


def write_version_1(store: Datastore, out: Path, index_kind: str | None) -> None:
    """``store``'s rows in the schema version 1 layout at ``out``."""
    out.mkdir(parents=True)
    names = store.checkpoint_names
    for shard in range(len(store.shards)):
        part = f"part-{shard:05d}"
        (out / "examples").mkdir(exist_ok=True)
        shutil.copyfile(store.examples_file(shard), out / "examples" / f"{part}.parquet")
        for checkpoint in names:
            features = np.asarray(store.raw_features(checkpoint, shard))
            scores = pq.read_table(store.scores_file(checkpoint, shard))
            vectors = pa.FixedSizeListArray.from_arrays(pa.array(features.reshape(-1), pa.float16()), store.dim)
            table = scores.add_column(1, "feature", vectors)
            for folder, write in (("features", lambda p: pq.write_table(table, p, compression="none")),
                                  ("raw_features", lambda p: np.save(p, features))):
                path = out / folder / checkpoint / f"{part}.{'parquet' if folder == 'features' else 'npy'}"
                path.parent.mkdir(parents=True, exist_ok=True)
                write(path)
        if store.has_representations:
            reps = np.asarray(store.raw_representations(shard))
            path = out / "representations" / f"{part}.parquet"
            path.parent.mkdir(exist_ok=True)
            rows = pa.array(np.arange(store.shards[shard].first_row, store.shards[shard].first_row + len(reps)))
            vectors = pa.FixedSizeListArray.from_arrays(pa.array(reps.reshape(-1), pa.float16()), reps.shape[1])
            pq.write_table(pa.table({"row": rows, "representation": vectors}), path, compression="none")
    m = store.manifest.model_dump(mode="json")
    index = None
    if index_kind is not None:
        factory = {"flat": "Flat", "sq16": "SQfp16"}[index_kind]
        dim = store.dim * len(names)
        built = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        built.add(np.concatenate([np.sqrt(w) * store.features(c).astype(np.float32)
                                  for c, w in zip(names, store.weights)], axis=1))
        faiss.write_index(built, str(out / "index.faiss"))
        index = {"file": "index.faiss", "kind": index_kind, "factory": factory, "metric": "inner_product",
                 "dim": dim, "ntotal": store.num_rows}
    files = {p.relative_to(out).as_posix(): {"bytes": p.stat().st_size,
                                              "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
             for p in sorted(out.rglob("*")) if p.is_file()}
    counts = {k: m["counts"][k] for k in ("examples", "by_source", "skipped", "truncated")}
    old = {key: m[key] for key in ("format", "created_at", "gradstore_version", "model", "tokenizer", "lora",
                                   "checkpoints", "gradient_type", "projection", "extras", "tokens", "job")}
    old.update(schema_version=1, status="complete", counts=counts, index=index,
               features={k: m["features"][k] for k in ("dim", "dtype", "normalized")},
               shards={"size": m["shards"]["size"], "count": m["shards"]["count"]}, files=files)
    (out / "manifest.json").write_text(json.dumps(old, indent=2))


@pytest.fixture
def pool(service_root) -> Datastore:
    return Datastore.open(service_root / "pool")


@pytest.mark.parametrize("index_kind", ["flat", "sq16"])
def test_a_version_1_store_migrates_to_the_same_rows_bit_for_bit(pool, tmp_path, index_kind):
    old = tmp_path / "old"
    write_version_1(pool, old, index_kind)
    with pytest.raises(StoreError, match="schema version 1 store.*gradstore migrate"):
        Datastore.open(old)
    migrate(old)
    new = Datastore.open(old, verify=True)
    assert new.version == 1 and [h.action for h in new.manifest.history] == ["migrate"]
    assert new.examples().equals(pool.examples()) and new.manifest.counts == pool.manifest.counts
    for checkpoint in pool.checkpoint_names:
        np.testing.assert_array_equal(new.features(checkpoint).view(np.uint16), pool.features(checkpoint).view(np.uint16))
        assert new.feature_stats(checkpoint).equals(pool.feature_stats(checkpoint))
    np.testing.assert_array_equal(new.representations(), pool.representations())
    # A Flat index was a second copy of the features: dropped, exact searches scan them. Others are rebuilt.
    assert (new.manifest.index is None) == (index_kind == "flat")
    if index_kind != "flat":
        assert new.manifest.index.kind == index_kind and new.index().ntotal == pool.num_rows
    assert not [p for p in old.iterdir() if p.name in ("features", "raw_features", "examples", "index.faiss")]
    rows = [3, 17, 30]
    targets = TargetSet({c: pool.features_at(c, rows).astype(np.float32) for c in pool.checkpoint_names},
                        ["a", "a", "b"])
    picked = [SelectionEngine(store).select(targets, SelectionOptions(k=10)) for store in (pool, new)]
    assert picked[0].rows.tolist() == picked[1].rows.tolist()


def test_a_migrated_store_takes_appends_as_the_store_it_was(pool, service_corpus, tmp_path):
    """Its settings are read off the version 1 manifest: `--append` naming only the corpus works and
    gives the new rows the features an append to the original store gives them."""
    old, twin = tmp_path / "old", tmp_path / "twin"
    write_version_1(pool, old, None)
    migrate(old)
    shutil.copytree(pool.path, twin)
    for store in (old, twin):
        result = subprocess.run([sys.executable, "-m", "gradstore.cli", "index", "--append", "--corpus",
                                 str(service_corpus[0] / "tgt.jsonl"), "--out", str(store), "--no-progress"],
                                capture_output=True, text=True, env=ONE_THREAD)
        assert result.returncode == 0, result.stderr[-2000:]
    appended, expected = Datastore.open(old, verify=True), Datastore.open(twin)
    assert appended.num_examples == pool.num_examples + 6 and appended.row_of("tgt-5") == pool.num_rows + 5
    new_rows = np.arange(pool.num_rows, appended.num_rows)
    for checkpoint in pool.checkpoint_names:
        np.testing.assert_array_equal(appended.features_at(checkpoint, new_rows).view(np.uint16),
                                      expected.features_at(checkpoint, new_rows).view(np.uint16))


def test_migrate_from_the_command_line_and_refusals(pool, tmp_path):
    old = tmp_path / "old"
    write_version_1(pool, old, None)
    result = subprocess.run([sys.executable, "-m", "gradstore.cli", "migrate", str(old)], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
    assert "migrated to schema version 2" in result.stdout and "index none (exact scans)" in result.stdout
    again = subprocess.run([sys.executable, "-m", "gradstore.cli", "migrate", str(old)], capture_output=True,
                           text=True)
    assert again.returncode == 1 and "already schema version 2; nothing to migrate" in again.stderr
    with pytest.raises(StoreError, match="cannot read the manifest"):
        migrate(tmp_path / "nothing-here")
    # A manifest that does not describe every setting still migrates; the settings stay unrecorded.
    sparse = tmp_path / "sparse"
    write_version_1(pool, sparse, None)
    manifest = json.loads((sparse / "manifest.json").read_text())
    del manifest["tokenizer"]["max_length"]
    (sparse / "manifest.json").write_text(json.dumps(manifest))
    result = subprocess.run([sys.executable, "-m", "gradstore.cli", "migrate", str(sparse)], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
    assert "appends to it need every setting given" in result.stdout
    assert Datastore.open(sparse, verify=True).manifest.settings == {}
