"""Indexing jobs end to end: real tiny models, real files, real FAISS (faults and torchrun: test_faults.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gradstore.indexer.checkpoints import CheckpointSpec
from gradstore.indexer.corpus import CorpusSource
from gradstore.datastore import Datastore
from gradstore.indexer.errors import BadRecordError, JobError
from gradstore.indexer.featurize import ExampleFeaturizer, length_batches
from gradstore.indexer.job import IndexJob, IndexJobConfig
from gradstore.indexer.model import LoraSpec
from gradstore.indexer.projection import ProjectionSpec

WORDS = "alpha beta gamma delta add reverse capital paris cat tac number seven".split()


def chat_records(n, seed=0, prefix="ex"):
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        prompt = " ".join(rng.choice(WORDS, size=int(rng.integers(2, 12))))
        answer = " ".join(rng.choice(WORDS, size=int(rng.integers(1, 8))))
        records.append({"id": f"{prefix}-{i}", "dataset": "toy",
                        "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]})
    return records


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    write_jsonl(root / "toy.jsonl", chat_records(30, seed=0))
    write_jsonl(root / "more.jsonl", chat_records(13, seed=1, prefix="more"))
    return root


@pytest.fixture(scope="module")
def warmup_run(tmp_path_factory, tiny_model_dirs, corpus_dir):
    """Two real warmup checkpoints (adapter + optimizer.pt + recorded learning rate)."""
    from gradstore.indexer.warmup import WarmupConfig, run_warmup

    out = tmp_path_factory.mktemp("warmup") / "run"
    config = WarmupConfig(corpus=[CorpusSource.parse(str(corpus_dir / "toy.jsonl"))], model=tiny_model_dirs["gpt2"],
                          out=out, fraction=0.5, epochs=2, learning_rate=1e-3, lora_r=4, lora_alpha=8,
                          batch_size=4, max_length=64, progress=False)
    run_warmup(config, log=lambda *_: None)
    return out


def make_config(tmp_path, model_dir, corpus_dir, **overrides) -> IndexJobConfig:
    settings = dict(
        corpus=[CorpusSource.parse(str(corpus_dir / "toy.jsonl")), CorpusSource.parse(str(corpus_dir / "more.jsonl"))],
        model=model_dir, out=tmp_path / "store", gradient_type="sgd", lora=LoraSpec(r=4, alpha=8),
        projection=ProjectionSpec(dim=256, seed=0), max_length=64, shard_size=8, max_tokens_per_batch=256,
        device="cpu", progress=False,
    )
    settings.update(overrides)
    return IndexJobConfig(**settings)


def store_files(path: Path) -> dict[str, bytes]:
    """Every data file of a store (not the manifests, which record times: compare them apart)."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and p.name != "manifest.json" and p.parent.name != "versions"}


def test_length_batches_respect_budget_and_cover_rows():
    lengths = {r: n for r, n in enumerate([5, 50, 7, 30, 30, 2, 64])}
    batches = length_batches(list(lengths), lengths, max_tokens=100, max_batch=3)
    assert sorted(r for b in batches for r in b) == list(lengths)
    for batch in batches:
        assert len(batch) <= 3 and len(batch) * max(lengths[r] for r in batch) <= 100 or len(batch) == 1


def test_fresh_lora_store_matches_single_example_features(tmp_path, tiny_model_dirs, corpus_dir):
    config = make_config(tmp_path, tiny_model_dirs["llama"], corpus_dir)
    summary = IndexJob(config, log=lambda *_: None).run()
    store = Datastore.open(config.out, verify=True)
    assert summary.examples == store.num_examples == 43
    assert store.manifest.counts.by_source == {"toy": 30, "more": 13}
    examples = store.examples().to_pandas()
    assert examples["row"].tolist() == list(range(43))
    assert examples["id"].iloc[0] == "ex-0" and examples["source"].iloc[-1] == "more"
    feats = store.features("fresh").astype(np.float32)
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=2e-3)

    # The same examples featurised one at a time (batch size 1) give the same vectors.
    single = make_config(tmp_path / "single", tiny_model_dirs["llama"], corpus_dir, max_batch_size=1)
    IndexJob(single, log=lambda *_: None).run()
    alone = Datastore.open(single.out).features("fresh").astype(np.float32)
    cosines = np.sum(feats * alone, axis=1)
    assert cosines.min() > 0.999


def test_adam_store_with_two_checkpoints_scores_weighted_influence(tmp_path, tiny_model_dirs, corpus_dir, warmup_run):
    checkpoints = [CheckpointSpec.parse(str(warmup_run / name)) for name in ("epoch-1", "epoch-2")]
    config = make_config(tmp_path, tiny_model_dirs["gpt2"], corpus_dir, checkpoints=checkpoints,
                         gradient_type="adam", index="flat")  # exact FAISS search, to compare with numpy
    IndexJob(config, log=lambda *_: None).run()
    store = Datastore.open(config.out)
    lrs = [json.loads((warmup_run / n / "gradstore_checkpoint.json").read_text())["average_learning_rate"]
           for n in ("epoch-1", "epoch-2")]
    np.testing.assert_allclose(store.weights, np.array(lrs) / sum(lrs), rtol=1e-6)
    f1, f2 = (store.features(n).astype(np.float32) for n in ("epoch-1", "epoch-2"))
    assert not np.allclose(f1, f2)  # the checkpoints differ, so do their Adam directions
    w1, w2 = store.weights
    exact = w1 * f1 @ f1[:5].T + w2 * f2 @ f2[:5].T  # every example against examples 0..4 as targets
    query = np.concatenate([np.sqrt(w1) * f1[:5], np.sqrt(w2) * f2[:5]], axis=1)
    scores, ids = store.index().search(np.ascontiguousarray(query, dtype=np.float32), 43)
    for t in range(5):
        np.testing.assert_allclose(scores[t], exact[ids[t], t], atol=1e-3)
        assert ids[t][0] == t  # an example is its own most influential neighbour


def test_adam_needs_optimizer_state(tmp_path, tiny_model_dirs, corpus_dir, warmup_run):
    with pytest.raises(JobError, match="needs checkpoints with optimizer state"):
        IndexJob(make_config(tmp_path, tiny_model_dirs["gpt2"], corpus_dir, gradient_type="adam")).run()
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (bare / name).write_bytes((warmup_run / "epoch-1" / name).read_bytes())
    config = make_config(tmp_path, tiny_model_dirs["gpt2"], corpus_dir, gradient_type="adam",
                         checkpoints=[CheckpointSpec.parse(str(bare))])
    with pytest.raises(JobError, match="optimizer.pt or optimizer.bin"):
        IndexJob(config, log=lambda *_: None).run()
    assert not config.out.exists()


def test_malformed_record_names_file_and_line_and_skip_reports_it(tmp_path, tiny_model_dirs, corpus_dir):
    bad = tmp_path / "bad.jsonl"
    lines = [json.dumps(r) for r in chat_records(6, seed=5)]
    lines.insert(3, '{"id": "broken", "messages": [')
    bad.write_text("\n".join(lines) + "\n")
    config = make_config(tmp_path, tiny_model_dirs["gpt2"], corpus_dir, corpus=[CorpusSource.parse(str(bad))])
    with pytest.raises(BadRecordError, match=rf"{bad}:4"):
        IndexJob(config, log=lambda *_: None).run()
    assert not config.out.exists()
    config.on_bad_record = "skip"
    IndexJob(config, log=lambda *_: None).run()
    store = Datastore.open(config.out)
    assert store.num_examples == 6 and store.manifest.counts.skipped == 1
    report = store.skipped_records()
    assert [r["location"] for r in report] == [f"{bad}:4"]


def test_out_of_memory_batches_are_split_and_retried(tmp_path, tiny_model_dirs, corpus_dir, monkeypatch):
    original = ExampleFeaturizer._batch_once

    def fail_on_large_batches(self, examples):
        if len(examples) > 2:  # stands in for an allocator failure on big batches
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return original(self, examples)

    reference = make_config(tmp_path / "ref", tiny_model_dirs["gpt2"], corpus_dir, max_batch_size=2)
    IndexJob(reference, log=lambda *_: None).run()
    monkeypatch.setattr(ExampleFeaturizer, "_batch_once", fail_on_large_batches)
    config = make_config(tmp_path, tiny_model_dirs["gpt2"], corpus_dir)
    summary = IndexJob(config, log=lambda *_: None).run()
    assert summary.oom_retries > 0
    ours = Datastore.open(config.out).features("fresh").astype(np.float32)
    ref = Datastore.open(reference.out).features("fresh").astype(np.float32)
    assert np.sum(ours * ref, axis=1).min() > 0.999


def test_resume_refuses_other_settings(tmp_path, tiny_model_dirs, corpus_dir):
    config = make_config(tmp_path, tiny_model_dirs["gpt2"], corpus_dir)
    (config.work_dir / "_shards").mkdir(parents=True)
    (config.work_dir / "_shards" / "job.json").write_text(json.dumps({"something": "else"}))
    with pytest.raises(JobError, match="different settings"):
        IndexJob(config, log=lambda *_: None).run()
    config.restart = True
    IndexJob(config, log=lambda *_: None).run()
    assert Datastore.open(config.out).num_examples == 43


def cli_index_command(model_dir, corpus_dir, out, *extra):
    return [sys.executable, "-m", "gradstore.cli", "index", "--corpus", str(corpus_dir / "toy.jsonl"),
            "--corpus", str(corpus_dir / "more.jsonl"), "--model", str(model_dir), "--out", str(out),
            "--gradient-type", "sgd", "--lora-r", "4", "--lora-alpha", "8", "--proj-dim", "256",
            "--max-length", "64", "--shard-size", "4", "--max-tokens-per-batch", "64", "--device", "cpu",
            "--no-progress", *extra]


def test_cli_reports_bad_input_in_one_line(tmp_path, tiny_model_dirs, corpus_dir):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"id": "x", "messages": [{"role": "bot", "content": "hi"}]}])
    cmd = cli_index_command(tiny_model_dirs["gpt2"], corpus_dir, tmp_path / "out")
    cmd[cmd.index(str(corpus_dir / "more.jsonl"))] = str(bad)
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 1
    assert f"{bad}:1" in result.stderr and "role" in result.stderr and "Traceback" not in result.stderr


def test_batch_limits_are_the_devices_defaults_unless_given(tmp_path, tiny_model_dirs, corpus_dir):
    from gradstore.indexer.batching import default_batching
    from gradstore.indexer.job import prepare

    config = make_config(tmp_path, tiny_model_dirs["gpt2"], corpus_dir, max_tokens_per_batch=None)
    cpu_tokens, cpu_examples = default_batching("cpu")
    assert default_batching("cuda") != default_batching("cpu")
    assert default_batching("mps") == default_batching("cpu")
    for device in ("cpu", "cuda"):
        resolved = config.with_device_batching(device)
        assert (resolved.max_tokens_per_batch, resolved.max_batch_size) == default_batching(device)
    given = make_config(tmp_path, tiny_model_dirs["gpt2"], corpus_dir, max_tokens_per_batch=300, max_batch_size=3)
    assert given.with_device_batching("cuda").max_tokens_per_batch == 300
    assert given.with_device_batching("cuda").max_batch_size == 3
    assert config.max_tokens_per_batch is None and config.max_batch_size is None  # the caller's config is kept

    # The job batches with the resolved limits and records them: in the manifest, and in the resume
    # fingerprint, where the defaults and the same values given explicitly are one job.
    job = IndexJob(config, log=lambda *_: None)
    job.run()
    recorded = json.loads((config.out / "manifest.json").read_text())["job"]
    assert (recorded["max_tokens_per_batch"], recorded["max_batch_size"]) == (cpu_tokens, cpu_examples)

    def fingerprint(cfg):
        job = IndexJob(cfg, log=lambda *_: None)
        job.load()
        return job._fingerprint(prepare(job.config, job.formatter))

    explicit = make_config(tmp_path, tiny_model_dirs["gpt2"], corpus_dir, max_tokens_per_batch=cpu_tokens,
                           max_batch_size=cpu_examples)
    other = make_config(tmp_path, tiny_model_dirs["gpt2"], corpus_dir, max_tokens_per_batch=cpu_tokens,
                        max_batch_size=cpu_examples + 1)
    assert fingerprint(config) == fingerprint(explicit) != fingerprint(other)
