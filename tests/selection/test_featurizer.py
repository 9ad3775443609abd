"""Target gradients from records: equal to an sgd target store built by the indexer."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import chat_records, write_jsonl
from gradstore.indexer.checkpoints import CheckpointSpec
from gradstore.indexer.corpus import CorpusSource
from gradstore.datastore import Datastore, Manifest
from gradstore.indexer.job import IndexJob, IndexJobConfig
from gradstore.indexer.model import LoraSpec
from gradstore.indexer.projection import ProjectionSpec
from gradstore.selection import SelectionEngine, SelectionError, SelectionOptions, TargetSet
from gradstore.selection import TargetFeaturizer

def build_store(out, model, corpus, checkpoints=(), gradient_type="sgd", **overrides) -> Path:
    settings = dict(corpus=[CorpusSource.parse(str(corpus))], model=model, out=out, checkpoints=list(checkpoints),
                    gradient_type=gradient_type, lora=LoraSpec(r=4, alpha=8),
                    projection=ProjectionSpec(dim=128, seed=3),
                    max_length=64, shard_size=16, max_tokens_per_batch=256, device="cpu", index="none",
                    progress=False)
    settings.update(overrides)
    IndexJob(IndexJobConfig(**settings), log=lambda *_: None).run()
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_model_dirs):
    from gradstore.indexer.warmup import WarmupConfig, run_warmup

    root = tmp_path_factory.mktemp("targets")
    pool = write_jsonl(root / "pool.jsonl", chat_records(40, seed=0, prefix="p"))
    targets = chat_records(6, seed=1, prefix="t", subtasks=["a", "b"])
    targets_file = write_jsonl(root / "targets.jsonl", targets)
    model = tiny_model_dirs["gpt2"]
    run = root / "run"
    run_warmup(WarmupConfig(corpus=[CorpusSource.parse(str(pool))], model=model, out=run, fraction=0.5, epochs=2,
                            learning_rate=1e-3, lora_r=4, lora_alpha=8, batch_size=4, max_length=64, progress=False),
               log=lambda *_: None)
    checkpoints = [CheckpointSpec.parse(str(run / n)) for n in ("epoch-1", "epoch-2")]
    return {
        "root": root, "model": model, "targets": targets, "targets_file": targets_file, "run": run,
        "pool": build_store(root / "pool", model, pool, checkpoints, "adam"),
        "target_store": build_store(root / "target", model, targets_file, checkpoints),
        "fresh_pool": build_store(root / "fresh-pool", model, pool, lora=LoraSpec(r=4, alpha=8, init_seed=7)),
        "fresh_target": build_store(root / "fresh-target", model, targets_file,
                                    lora=LoraSpec(r=4, alpha=8, init_seed=7)),
    }


@pytest.fixture(scope="module")
def featurizer(data):
    return TargetFeaturizer(Datastore.open(data["pool"]), device="cpu")


def assert_same_targets(ours: TargetSet, theirs: TargetSet):
    assert ours.subtasks == theirs.subtasks
    assert ours.checkpoints == theirs.checkpoints
    for name in theirs.checkpoints:
        np.testing.assert_allclose(ours.vectors[name], theirs.vectors[name], atol=1e-3)
    # Representation vectors come with the targets when the stores have them (fp16 in the store).
    assert (ours.representations is None) == (theirs.representations is None)
    if theirs.representations is not None:
        np.testing.assert_allclose(ours.representations, theirs.representations, atol=2e-3)


def test_records_give_the_vectors_of_an_sgd_target_store(data, featurizer):
    ours = featurizer.featurize(data["targets"], subtask_field="subtask")
    theirs = TargetSet.from_datastore(Datastore.open(data["target_store"]), "subtask")
    assert theirs.representations is not None and ours.representations.shape == theirs.representations.shape
    assert ours.subtasks == ["a", "b"] * 3
    assert_same_targets(ours, theirs)
    engine = SelectionEngine(Datastore.open(data["pool"]))
    for aggregation in ("less", "max"):
        options = SelectionOptions(k=40, aggregation=aggregation)
        a, b = engine.select(ours, options), engine.select(theirs, options)
        assert a.ids == b.ids
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-4)
    # The featurizer is reusable: a second call on a subset gives the same rows.
    again = featurizer.featurize(data["targets"][2:4])
    np.testing.assert_allclose(again.vectors["epoch-1"], ours.vectors["epoch-1"][2:4], atol=1e-3)
    assert again.subtasks == ["all", "all"]


def test_fresh_lora_store_reproduces_its_recorded_init_seed(data):
    manifest = Manifest.load(data["fresh_pool"])
    assert manifest.lora.init_seed == 7 and manifest.checkpoints[0].path is None
    assert Manifest.load(data["pool"]).lora.init_seed is None  # trained checkpoints: no fresh init
    ours = TargetFeaturizer(data["fresh_pool"], device="cpu").featurize(data["targets"])
    theirs = TargetSet.from_datastore(Datastore.open(data["fresh_target"]))
    assert_same_targets(ours, theirs)
    # A target store whose fresh LoRA had another seed is refused: its gradients do not compare.
    other = build_store(data["root"] / "fresh-seed-0", data["model"], data["targets_file"],
                        lora=LoraSpec(r=4, alpha=8, init_seed=0))
    engine = SelectionEngine(Datastore.open(data["fresh_pool"]))
    with pytest.raises(SelectionError, match="initialised with seed 0, the datastore's with 7"):
        engine.scores(TargetSet.from_datastore(Datastore.open(other)))


def test_bad_record_is_named_by_its_index(featurizer, data):
    records = list(data["targets"])
    records[2] = {"id": "broken", "messages": []}
    with pytest.raises(SelectionError, match=r"target record 2: messages is an empty list"):
        featurizer.featurize(records)
    records[2] = {"prompt": "only a prompt"}
    with pytest.raises(SelectionError, match=r"target record 2: has prompt but no completion"):
        featurizer.featurize(records)
    with pytest.raises(SelectionError, match="non-empty list"):
        featurizer.featurize([])
    with pytest.raises(SelectionError, match=r"target record 0 \(id 't-0'\) has no field 'category'"):
        featurizer.featurize(data["targets"], subtask_field="category")


def test_missing_or_changed_inputs_are_clear_errors(data, tmp_path):
    manifest = Manifest.load(data["pool"])
    gone = manifest.model_copy(update={"model": manifest.model.model_copy(update={"path": str(tmp_path / "gone")})})
    with pytest.raises(SelectionError, match="model folder .*gone.* no longer exists"):
        TargetFeaturizer(gone)
    moved = [c.model_copy(update={"path": str(tmp_path / "moved")}) if c.name == "epoch-2" else c
             for c in manifest.checkpoints]
    with pytest.raises(SelectionError, match=r"checkpoint 'epoch-2': the folder .*moved no longer exists"):
        TargetFeaturizer(manifest.model_copy(update={"checkpoints": moved}))
    altered = tmp_path / "epoch-1"
    shutil.copytree(data["run"] / "epoch-1", altered)
    (altered / "adapter_model.safetensors").write_bytes(
        (data["run"] / "epoch-2" / "adapter_model.safetensors").read_bytes())
    swapped = [c.model_copy(update={"path": str(altered)}) if c.name == "epoch-1" else c for c in manifest.checkpoints]
    with pytest.raises(SelectionError, match="differs from the adapter the datastore was built with"):
        TargetFeaturizer(manifest.model_copy(update={"checkpoints": swapped}))
    fresh = Manifest.load(data["fresh_pool"])
    old = fresh.model_copy(update={"lora": fresh.lora.model_copy(update={"init_seed": None})})
    with pytest.raises(SelectionError, match="does not record its initialisation seed"):
        TargetFeaturizer(old)
