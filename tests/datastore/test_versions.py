"""Datastore versions end to end: append, remove, compact, prune, with real indexing runs.

A store built from half a corpus and appended with the other half (``gradstore index --append``,
taking every setting from the store) is compared with a one-shot build, bit for bit; appends with
other settings or taken ids are refused; a SIGKILL at each step of an append leaves the previous
version in place and the append resumable; removals and compaction keep every reader consistent;
a real server under load answers every query while new versions are published.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ONE_THREAD, kill_at
from gradstore.client import Client
from gradstore.client.models import TargetVectors
from gradstore.datastore import Datastore, ExampleNotFoundError, StoreError, compact, prune, remove
from gradstore.selection import SelectionEngine, SelectionOptions, TargetSet
from gradstore.service.process import ServiceProcess

SHARD_SIZE = 4  # toy has 28 examples: the first half ends on a shard boundary


def index_command(out: Path, corpus: list[Path], model: Path, run: Path) -> list[str]:
    """`gradstore index` with the pool's settings: adam gradients at two warmup checkpoints, every
    extra, an SQfp16 index. Every run has one thread (``ONE_THREAD``): float sums then add up in
    the same order in every process, so equal inputs give equal bits."""
    sources = [arg for path in corpus for arg in ("--corpus", str(path))]
    return [sys.executable, "-m", "gradstore.cli", "index", *sources, "--model", str(model), "--out", str(out),
            "--checkpoint", str(run / "epoch-1"), "--checkpoint", str(run / "epoch-2"), "--gradient-type", "adam",
            "--proj-dim", "256", "--max-length", "64", "--shard-size", str(SHARD_SIZE),
            "--max-tokens-per-batch", "256", "--device", "cpu", "--index", "sq16", "--no-progress"]


def gradstore(*args, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "gradstore.cli", *map(str, args)], capture_output=True,
                            text=True, env=ONE_THREAD)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def append_command(store: Path, corpus: Path, *extra) -> list[str]:
    """`gradstore index --append` naming only the new corpus: the rest comes from the store."""
    return [sys.executable, "-m", "gradstore.cli", "index", "--append", "--corpus", str(corpus), "--out", str(store),
            "--no-progress", *map(str, extra)]


@pytest.fixture(scope="module")
def stores(tmp_path_factory, tiny_model_dirs, service_corpus, service_run):
    """``one-shot`` (toy + more), ``half`` (toy) and ``appended`` (toy, then more appended)."""
    root = tmp_path_factory.mktemp("versions")
    folder = service_corpus[0]
    model = tiny_model_dirs["gpt2"]
    for name, files in (("one-shot", ["toy.jsonl", "more.jsonl"]), ("half", ["toy.jsonl"])):
        gradstore(*index_command(root / name, [folder / f for f in files], model, service_run)[3:])
    shutil.copytree(root / "half", root / "appended")
    gradstore(*append_command(root / "appended", folder / "more.jsonl")[3:])
    return root


def copy(stores: Path, name: str, dest: Path) -> Path:
    shutil.copytree(stores / name, dest / name)
    return dest / name


def pool_targets(store: Datastore, ids=("ex-3", "ex-20", "more-5"), subtasks=("a", "a", "b")) -> TargetSet:
    """Training examples' own features (and representations) as targets, in the given subtasks."""
    rows = [store.row_of(id) for id in ids]
    return TargetSet({c: store.features_at(c, rows).astype(np.float32) for c in store.checkpoint_names},
                     list(subtasks), representations=store.representations_at(rows).astype(np.float32))


def test_half_then_append_equals_one_shot_bit_for_bit(stores):
    one, appended = Datastore.open(stores / "one-shot", verify=True), Datastore.open(stores / "appended", verify=True)
    assert appended.version == 2 and [h.action for h in appended.manifest.history] == ["build", "append"]
    assert [s.name for s in appended.manifest.segments] == ["seg-000001", "seg-000002"]
    assert appended.manifest.counts == one.manifest.counts and appended.manifest.tokens == one.manifest.tokens
    assert appended.manifest.settings == one.manifest.settings
    ours, theirs = appended.examples(), one.examples()
    assert [c for c in ours.column_names if not ours.column(c).equals(theirs.column(c))] == []
    for checkpoint in one.checkpoint_names:
        np.testing.assert_array_equal(appended.features(checkpoint).view(np.uint16),
                                      one.features(checkpoint).view(np.uint16))
        assert appended.feature_stats(checkpoint).equals(one.feature_stats(checkpoint))
    np.testing.assert_array_equal(appended.representations().view(np.uint16), one.representations().view(np.uint16))
    for score in one.score_names:
        np.testing.assert_array_equal(appended.scores(score), one.scores(score))
    # The same selections, with every target-based strategy; the index was extended, not rebuilt.
    targets = pool_targets(one)
    for strategy in ("less", "rds"):
        options = SelectionOptions(k=12, strategy=strategy)
        picked = [SelectionEngine(store).select(targets, options) for store in (one, appended)]
        assert picked[0].rows.tolist() == picked[1].rows.tolist()
        np.testing.assert_array_equal(picked[0].scores, picked[1].scores)
    assert appended.manifest.index.file == "index/v000002.faiss"
    queries = np.concatenate([np.sqrt(w) * targets.vectors[c] for c, w in zip(one.checkpoint_names, one.weights)],
                             axis=1).astype(np.float32)
    found = [store.index().search(queries, 10) for store in (one, appended)]
    np.testing.assert_array_equal(found[0][1], found[1][1])
    np.testing.assert_array_equal(found[0][0], found[1][0])


def test_append_refuses_other_settings_and_taken_ids_and_replaces_when_asked(stores, service_corpus, tmp_path):
    store = copy(stores, "half", tmp_path)
    folder = service_corpus[0]
    before = Datastore.open(store).manifest
    other = gradstore(*append_command(store, folder / "more.jsonl", "--proj-dim", 128)[3:], check=False)
    assert other.returncode == 1 and "Traceback" not in other.stderr
    assert "projection.dim: store 256, new 128" in other.stderr
    taken = gradstore(*append_command(store, folder / "toy.jsonl")[3:], check=False)
    assert taken.returncode == 1
    assert "28 of the new records have ids the store already holds" in taken.stderr and "--replace" in taken.stderr
    assert Datastore.open(store).manifest == before  # refused before anything was written
    gradstore(*append_command(store, folder / "toy.jsonl", "--replace")[3:])
    replaced = Datastore.open(store, verify=True)
    assert replaced.version == 2 and replaced.num_examples == 28 and replaced.num_rows == 56
    assert replaced.removed_rows().tolist() == list(range(28))
    assert replaced.row_of("ex-0") == 28
    assert replaced.manifest.counts.by_source == {"toy": 28}
    # The replacing rows carry the same features (same records, same settings), the pool only them.
    for checkpoint in replaced.checkpoint_names:
        np.testing.assert_array_equal(replaced.features(checkpoint)[28:], replaced.features(checkpoint)[:28])
    engine = SelectionEngine(replaced)
    assert engine.pool().tolist() == list(range(28, 56))
    targets = pool_targets(replaced, ids=("ex-3", "ex-20"), subtasks=("a", "a"))
    assert set(engine.select(targets, SelectionOptions(k=28)).rows.tolist()) == set(range(28, 56))


def test_append_flags_equal_to_the_store_change_only_their_part_of_a_setting(tiny_model_dirs, service_corpus,
                                                                              tmp_path):
    """--proj-dim sets the projection's dim only: its kind stays the store's (here not the default)."""
    folder = service_corpus[0]
    store = tmp_path / "dense"
    gradstore("index", "--corpus", folder / "toy.jsonl", "--model", tiny_model_dirs["gpt2"], "--out", store,
              "--gradient-type", "sgd", "--projection", "rademacher", "--proj-dim", 64, "--lora-r", 4,
              "--max-length", 128, "--device", "cpu", "--no-progress")
    gradstore(*append_command(store, folder / "more.jsonl", "--proj-dim", 64, "--seed", 0, "--lora-r", 4)[3:])
    appended = Datastore.open(store, verify=True)
    assert appended.num_examples == 40 and appended.manifest.projection["kind"] == "rademacher"
    other = gradstore(*append_command(store, folder / "tgt.jsonl", "--proj-dim", 32)[3:], check=False)
    assert "projection.dim: store 64, new 32" in other.stderr and "projection.kind" not in other.stderr


@pytest.mark.slow
def test_sigkill_during_an_append_keeps_the_previous_version_and_the_append_resumes(stores, service_corpus,
                                                                                   tmp_path):
    store = copy(stores, "half", tmp_path)
    command = append_command(store, service_corpus[0] / "more.jsonl")
    before = Datastore.open(store)
    kill_points = [
        ("ExampleFeaturizer", "_batch_once", "", 3, "before"),       # computing the new rows
        ("files", "move_into_place", "v000002.faiss", 1, "after"),   # the extended index written
        ("versions", "_move_new_files", "", 1, "after"),             # new files in the store, manifest not
        ("files", "move_into_place", "versions/v000002.json", 1, "after"),  # the version's manifest kept
    ]
    for point in kill_points:
        kill_at(command, *point)
        current = Datastore.open(store, verify=True)  # the previous version, whole
        assert current.version == 1 and current.manifest == before.manifest, point
        assert current.examples().equals(before.examples())
    result = subprocess.run(command, capture_output=True, text=True, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-3000:]
    resumed, reference = Datastore.open(store, verify=True), Datastore.open(stores / "appended")
    assert resumed.version == 2 and resumed.examples().equals(reference.examples())
    for checkpoint in reference.checkpoint_names:
        np.testing.assert_array_equal(resumed.features(checkpoint), reference.features(checkpoint))
    assert not (store.parent / f".{store.name}.partial").exists()


def test_remove_then_compact_keep_every_reader_consistent(stores, tmp_path):
    store = copy(stores, "appended", tmp_path)
    original = Datastore.open(store)
    targets = pool_targets(original)
    full = SelectionEngine(original).select(targets, SelectionOptions(k=40))
    remove(store, source="more")
    removed = Datastore.open(store, verify=True)
    assert removed.version == 3 and removed.num_examples == 28 and removed.num_rows == 40
    assert removed.manifest.counts.by_source == {"toy": 28} and removed.manifest.counts.removed == 12
    with pytest.raises(ExampleNotFoundError, match="no example with id 'more-0'"):
        removed.row_of("more-0")
    with pytest.raises(ExampleNotFoundError, match="row 30 was removed"):
        removed.example(30)
    picked = SelectionEngine(removed).select(targets, SelectionOptions(k=40))
    assert len(picked.rows) == 28 and max(picked.rows) < 28
    # Removing leaves the scores of the others as they were: the same ranking without the removed rows.
    assert picked.rows.tolist() == [r for r in full.rows.tolist() if r < 28]
    _, rows = removed.index().search(np.ones((1, removed.index().d), np.float32), 40)
    assert set(rows[0]) - set(range(28)), "the index still holds removed rows; searches drop them"
    with pytest.raises(StoreError, match="nothing to remove"):
        remove(store, source="more")
    # An old reader keeps answering from its version.
    assert original.num_examples == 40 and original.row_of("more-0") == 28

    before = sum(p.stat().st_size for p in store.rglob("*") if p.is_file())
    compact(store)
    compacted = Datastore.open(store, verify=True)
    assert compacted.version == 4 and compacted.num_rows == compacted.num_examples == 28
    assert [s.name for s in compacted.manifest.segments] == ["seg-000003"] and compacted.manifest.tombstones is None
    assert compacted.examples(columns=["id"]).column("id").to_pylist() == [f"ex-{i}" for i in range(28)]
    for checkpoint in compacted.checkpoint_names:
        np.testing.assert_array_equal(compacted.features(checkpoint), original.features(checkpoint)[:28])
    again = SelectionEngine(compacted).select(targets, SelectionOptions(k=40))
    assert again.rows.tolist() == picked.rows.tolist()
    np.testing.assert_allclose(again.scores, picked.scores, rtol=1e-6)
    assert compacted.index().ntotal == 28
    # The previous version stays readable until pruned past it; then only the current one's files remain.
    assert Datastore.open(store).manifest.version == 4 and (store / "segments" / "seg-000001").exists()
    deleted = prune(store, keep=1)
    assert any(path.startswith("segments/seg-000001/") for path in deleted)
    assert sorted(p.name for p in (store / "segments").iterdir()) == ["seg-000003"]
    assert sorted(p.name for p in (store / "versions").iterdir()) == ["v000004.json"]
    assert sum(p.stat().st_size for p in store.rglob("*") if p.is_file()) < before
    Datastore.open(store, verify=True)
    history = gradstore("versions", store).stdout.splitlines()
    assert [line.split()[2] for line in history] == ["build", "append", "remove", "compact"]


def test_a_served_store_switches_versions_under_load_without_an_error(stores, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    store = copy(stores, "appended", root)
    errors, answered, stop = [], [0], threading.Event()
    vector = [[1.0] + [0.0] * 255]
    targets = TargetVectors(vectors={"epoch-1": vector, "epoch-2": vector})

    def hammer(url: str) -> None:
        with Client(url, "k", max_retries=0) as client:
            while not stop.is_set():
                try:
                    assert len(client.select("pool", targets, k=5).items) == 5
                    assert len(client.similar("pool", id="ex-5", k=5).neighbors) == 5
                    assert client.get_example("pool", "ex-5").id == "ex-5"
                    answered[0] += 1
                except Exception as err:  # noqa: BLE001 - every failure is recorded and fails the test
                    errors.append(repr(err))

    with ServiceProcess(root, api_key="k", log_file=tmp_path / "serve.log") as service:
        store.rename(root / "pool")
        threads = [threading.Thread(target=hammer, args=(service.url,)) for _ in range(4)]
        for thread in threads:
            thread.start()
        try:
            with Client(service.url, "k") as client:
                assert client.get_datastore("pool").examples == 40
                first = client.select("pool", targets, k=5).selection_id
                remove(root / "pool", ids=["ex-1", "ex-2"])
                compact(root / "pool")
                remove(root / "pool", source="more")
                counts = wait_for(lambda: client.get_datastore("pool").examples, 26)
                detail = client.get_datastore("pool")
                assert detail.version == 5 and detail.updated_at is not None
                # The same request on a new version is a new selection, not the cached one.
                assert client.select("pool", targets, k=5).selection_id != first
        finally:
            stop.set()
            for thread in threads:
                thread.join()
    assert errors == [] and answered[0] > 0
    assert counts == 26


def wait_for(read, expected, seconds: float = 30.0):
    deadline = time.monotonic() + seconds
    while (value := read()) != expected and time.monotonic() < deadline:
        time.sleep(0.1)
    return value


def test_a_quantised_copy_is_added_as_a_version_and_kept_up_to_date_by_appends(stores, service_corpus, tmp_path):
    from gradstore.datastore import quantize
    from gradstore.datastore.quantized import decode, encode

    store = copy(stores, "half", tmp_path)
    quantize(store, "int8")
    quantized = Datastore.open(store, verify=True)
    assert quantized.version == 2 and quantized.manifest.features.quantized == ["int8"]
    with pytest.raises(StoreError, match="already holds a int8 copy"):
        quantize(store, "int8")
    gradstore(*append_command(store, service_corpus[0] / "more.jsonl")[3:])
    appended = Datastore.open(store, verify=True)
    assert appended.version == 3 and appended.num_examples == 40
    for checkpoint in appended.checkpoint_names:
        for shard, info in enumerate(appended.shards):
            stored = appended.quantized_features("int8", checkpoint, shard)
            features = appended.raw_features(checkpoint, shard)
            expected = encode(np.asarray(features), "int8")
            np.testing.assert_array_equal(stored.codes, expected.codes)
            np.testing.assert_array_equal(stored.scales, expected.scales)
            assert np.abs(decode(stored) - features.astype(np.float32)).max() <= stored.scales.max() / 2 + 1e-6
    with pytest.raises(StoreError, match="no 1bit copy of the features.*gradstore quantize"):
        appended.quantized_features("1bit", "epoch-1", 0)
