"""Representation vectors, gradient spectra and VoG against independent references on tiny models:
a direct forward pass with ``output_hidden_states``, numpy's SVD of the explicitly formed weight
gradient, and VoG computed by hand from plain autograd; then as stored and read back."""

from __future__ import annotations

import json
from dataclasses import replace

import duckdb
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from conftest import chat_records, write_jsonl
from gradstore.indexer.checkpoints import CheckpointSpec
from gradstore.indexer.corpus import CorpusSource
from gradstore.datastore import SCORE_NAMES, Datastore
from gradstore.indexer.errors import FeatureNotStoredError, JobError, StoreError
from gradstore.indexer.extras import ExtraFeatures
from gradstore.indexer.featurize import length_batches
from gradstore.indexer.grads import Batch, PerExampleGradients
from gradstore.indexer.job import IndexJob, IndexJobConfig, prepare
from gradstore.indexer.model import LoraSpec
from gradstore.indexer.projection import ProjectionSpec

TARGETS = {"gpt2": ["c_attn", "c_proj"], "llama": ["q_proj", "k_proj", "v_proj", "o_proj"]}
LENGTHS = [23, 7, 15, 40, 16]  # one padded batch: very different lengths


def lora_model(model_dir, kind, seed=0, alpha=8):
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    # init_lora_weights=False: B is random, so the adapter changes the hidden states and gradients.
    config = LoraConfig(r=4, lora_alpha=alpha, target_modules=TARGETS[kind], init_lora_weights=False)
    return get_peft_model(base, config).eval()


def make_examples(lengths, vocab, seed=0):
    gen = torch.Generator().manual_seed(seed)
    examples = []
    for n in lengths:
        ids = torch.randint(3, vocab, (n,), generator=gen)
        labels = ids.clone()
        labels[: n // 3] = -100
        examples.append((ids.tolist(), labels.tolist()))
    return examples


def sgpt_mean(hidden: np.ndarray) -> np.ndarray:
    """RDS+'s pooling written out: token t of T weighted t / (1 + ... + T), then normalised."""
    T = hidden.shape[0]
    weights = np.arange(1, T + 1) / (T * (T + 1) / 2)
    pooled = (weights[:, None] * hidden).sum(axis=0)
    return pooled / np.linalg.norm(pooled)


def direct_representation(model, ids) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.tensor(np.array([ids]), dtype=torch.int64), output_hidden_states=True)
    return sgpt_mean(out.hidden_states[-1][0].double().numpy())


def spectra_by_svd(model, ids, labels) -> tuple[float, float]:
    """Mean over adapted modules of N and R of the explicitly formed gradient of each base weight
    (plain autograd on one unpadded example), from numpy's SVD."""
    layers = [m for _, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]
    for layer in layers:
        layer.base_layer.weight.requires_grad_(True)
        layer.base_layer.weight.grad = None
    try:
        model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss.backward()
        nuclear, rank = [], []
        for layer in layers:
            sigma = np.linalg.svd(layer.base_layer.weight.grad.double().numpy(), compute_uv=False)
            p = sigma / sigma.sum()
            p = p[p > 0]
            nuclear.append(sigma.sum())
            rank.append(np.exp(-(p * np.log(p)).sum()))
    finally:
        for layer in layers:
            layer.base_layer.weight.requires_grad_(False)
            layer.base_layer.weight.grad = None
        model.zero_grad()
    return float(np.mean(nuclear)), float(np.mean(rank))


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_representations_equal_a_direct_forward_pass_with_output_hidden_states(tiny_model_dirs, tiny_tokenizer,
                                                                                kind):
    model = lora_model(tiny_model_dirs[kind], kind)
    examples = make_examples(LENGTHS, len(tiny_tokenizer))
    result = PerExampleGradients(model).compute(Batch.collate(examples, pad_id=0, device="cpu"),
                                                representations=True)
    ours = result.representations.double().numpy()
    ours /= np.linalg.norm(ours, axis=1, keepdims=True)
    for row, (ids, _) in enumerate(examples):
        np.testing.assert_allclose(ours[row], direct_representation(model, ids), rtol=1e-4, atol=1e-6)
    # The adapter matters: the base model alone gives other vectors.
    with model.disable_adapter():
        base = direct_representation(model, examples[0][0])
    assert np.abs(base - ours[0]).max() > 1e-3


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_gradient_spectra_equal_numpy_svd_of_the_formed_gradient(tiny_model_dirs, tiny_tokenizer, kind):
    # alpha 12 over r 4: a LoRA scaling of 3, which the gradient read at lora_B's output must undo.
    model = lora_model(tiny_model_dirs[kind], kind, alpha=12)
    examples = make_examples(LENGTHS, len(tiny_tokenizer), seed=1)
    result = PerExampleGradients(model).compute(Batch.collate(examples, pad_id=0, device="cpu"), spectra=True)
    for row, (ids, labels) in enumerate(examples):
        nuclear, rank = spectra_by_svd(model, ids, labels)
        assert result.nuclear_norm[row].item() == pytest.approx(nuclear, rel=1e-4)
        assert result.effective_rank[row].item() == pytest.approx(rank, rel=1e-4)
        assert 1.0 < rank <= len(ids)  # rank at most T: the T x T route loses nothing


# ------------------------------------------------------------------------------------------------
# Stores: three checkpoints (random adapters saved as PEFT checkpoints), every extra on.
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, tiny_model_dirs):
    root = tmp_path_factory.mktemp("extras")
    model_dir = tiny_model_dirs["llama"]
    checkpoints = []
    for k in range(3):
        lora_model(model_dir, "llama", seed=10 + k).save_pretrained(root / f"ck-{k}")
        checkpoints.append(CheckpointSpec(name=f"ck-{k}", path=root / f"ck-{k}", weight=float(k + 1)))
    corpus = write_jsonl(root / "pool.jsonl", chat_records(19, seed=4, prefix="p"))
    config = IndexJobConfig(corpus=[CorpusSource.parse(str(corpus))], model=model_dir, out=root / "store",
                            checkpoints=checkpoints, gradient_type="sgd", projection=ProjectionSpec(dim=64, seed=0),
                            max_length=64, shard_size=7, max_tokens_per_batch=160, device="cpu", index="none",
                            progress=False)
    job = IndexJob(config, log=lambda *_: None)
    job.run()
    job.load()
    config = job.config  # with the device's batch limits resolved
    encoded = prepare(config, job.formatter).encoded
    return {"root": root, "model": model_dir, "checkpoints": checkpoints, "corpus": corpus, "config": config,
            "encoded": encoded, "store": Datastore.open(config.out, verify=True)}


def checkpoint_model(model_dir, checkpoint: CheckpointSpec):
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(checkpoint.path)).eval()


def test_stored_representations_are_those_of_the_first_checkpoints_model(indexed):
    store, encoded = indexed["store"], indexed["encoded"]
    lengths = [e.num_tokens for e in encoded]
    shard_rows = list(range(7))  # the first shard is batched with padding
    batches = length_batches(shard_rows, lengths, 160, indexed["config"].max_batch_size)
    assert any(len({lengths[r] for r in b}) > 1 for b in batches)
    assert store.has_representations and store.manifest.extras.representations.checkpoint == "ck-0"
    model = checkpoint_model(indexed["model"], indexed["checkpoints"][0])
    assert store.representation_dim == model.config.hidden_size
    stored = store.representations().astype(np.float64)
    assert stored.shape == (19, model.config.hidden_size)
    for row, example in enumerate(encoded):
        np.testing.assert_allclose(stored[row], direct_representation(model, example.input_ids), atol=2e-3)
    # Gathers in the order asked for, across shards; batches per shard as the features are.
    rows = [18, 0, 7, 7, 3]
    np.testing.assert_array_equal(store.representations_at(rows), store.representations()[rows])
    batches = [(r, v) for s in range(store.manifest.shards.count) for r, v in store.shard_representations(s, 4)]
    assert np.concatenate([r for r, _ in batches]).tolist() == list(range(19))
    with pytest.raises(ValueError, match=r"rows must be in 0\.\.18"):
        store.representations_at([1, 19])


def test_vog_equals_a_hand_computation(indexed):
    encoded = indexed["encoded"]
    grads = {}  # example -> [S_k (T, H) for each checkpoint]
    for checkpoint in indexed["checkpoints"]:
        model = checkpoint_model(indexed["model"], checkpoint)
        for row, example in enumerate(encoded):
            embeds = model.get_input_embeddings()(torch.tensor(np.array([example.input_ids]), dtype=torch.int64)).detach().requires_grad_(True)
            loss = model(inputs_embeds=embeds, labels=torch.tensor(np.array([example.labels]), dtype=torch.int64)).loss
            (s,) = torch.autograd.grad(loss, embeds)
            grads.setdefault(row, []).append(s[0].double().numpy())
    expected = np.array([np.sqrt(((np.stack(g) - np.stack(g).mean(0)) ** 2).mean(0)).mean() for _, g in
                         sorted(grads.items())])
    np.testing.assert_allclose(indexed["store"].scores("vog"), expected, rtol=1e-4)


def test_scores_are_parquet_columns_and_vectors_npy_files_that_other_tools_read(indexed):
    store = indexed["store"]
    path = store.path
    assert store.score_names == list(SCORE_NAMES)
    frame = pd.read_parquet(path / "segments" / "seg-000001" / "scores" / "ck-1")
    assert {"loss", "grad_norm", "nuclear_norm", "effective_rank"} <= set(frame.columns)
    np.testing.assert_array_equal(store.scores("nuclear_norm", "ck-1"), frame["nuclear_norm"].to_numpy())
    combined = sum(w * pd.read_parquet(path / "segments" / "seg-000001" / "scores" / c)["effective_rank"].to_numpy(np.float64)
                   for w, c in zip(store.weights, store.checkpoint_names))
    np.testing.assert_allclose(store.scores("effective_rank"), combined, rtol=1e-6)
    assert store.weights.tolist() == pytest.approx([1 / 6, 2 / 6, 3 / 6])
    # Every segment's examples at once, as another tool reads them.
    vog = duckdb.sql(f"SELECT row, vog FROM read_parquet('{path}/segments/*/examples/*.parquet') ORDER BY row")
    np.testing.assert_array_equal(np.array([v for _, v in vog.fetchall()], np.float32), store.scores("vog"))
    reps = np.concatenate([np.load(p) for p in sorted(path.glob("segments/*/representations/part-*.npy"))])
    assert reps.shape == (19, store.representation_dim) and reps.dtype == np.float16
    # Spectra of a real gradient: positive, rank above one; stored per checkpoint, different between them.
    assert (frame["nuclear_norm"] > 0).all() and (frame["effective_rank"] > 1).all()
    assert not np.allclose(store.scores("nuclear_norm", "ck-0"), store.scores("nuclear_norm", "ck-2"))
    with pytest.raises(FeatureNotStoredError, match="no score 'ifd' in this datastore"):
        store.scores("ifd")
    with pytest.raises(StoreError, match="not per checkpoint"):
        store.scores("vog", "ck-0")


def test_stores_without_extras_say_what_is_missing_and_how_to_add_it(indexed, tmp_path):
    config = IndexJobConfig(corpus=[CorpusSource.parse(str(indexed["corpus"]))], model=indexed["model"],
                            out=tmp_path / "plain", lora=LoraSpec(r=4, alpha=8), gradient_type="sgd",
                            projection=ProjectionSpec(dim=64, seed=0), max_length=64, shard_size=7, device="cpu",
                            index="none", progress=False,
                            extras=ExtraFeatures(representations=False, gradient_spectra=False, vog=False))
    IndexJob(config, log=lambda *_: None).run()
    plain = Datastore.open(config.out, verify=True)
    assert not plain.has_representations and plain.representation_dim is None
    assert plain.score_names == ["loss", "grad_norm", "feature_norm"]
    assert not list(config.out.glob("segments/*/representations"))
    with pytest.raises(FeatureNotStoredError, match="no representation vectors.*--no-representations"):
        plain.representations_at([0])
    with pytest.raises(FeatureNotStoredError, match="no nuclear_norm.*--no-gradient-spectra"):
        plain.scores("nuclear_norm")
    with pytest.raises(FeatureNotStoredError, match="VoG is a variance across checkpoints.*two or more"):
        plain.scores("vog")  # one checkpoint (a fresh LoRA): no VoG whatever the flag


def test_the_job_fingerprint_covers_the_extras(indexed, tmp_path):
    config = IndexJobConfig(**{**indexed["config"].__dict__, "out": tmp_path / "store"})
    job = IndexJob(config, log=lambda *_: None)
    job.load()
    prepared = prepare(config, job.formatter)
    fingerprint = job._fingerprint(prepared)
    job.config = replace(job.config, extras=ExtraFeatures(vog=False))
    assert job._fingerprint(prepared) != fingerprint
    config.extras = ExtraFeatures(vog=False)
    (config.work_dir / "_shards").mkdir(parents=True)
    (config.work_dir / "_shards" / "job.json").write_text(json.dumps(fingerprint, sort_keys=True))
    with pytest.raises(JobError, match="different settings"):
        IndexJob(config, log=lambda *_: None).run()


def test_cli_flags_turn_each_extra_off(indexed, tmp_path, capsys):
    from gradstore.cli import main

    common = ["index", "--corpus", str(indexed["corpus"]), "--model", str(indexed["model"]), "--proj-dim", "64",
              "--max-length", "64", "--gradient-type", "sgd", "--device", "cpu", "--index", "none", "--no-progress"]
    for checkpoint in indexed["checkpoints"][:2]:
        common += ["--checkpoint", f"{checkpoint.name}={checkpoint.path}"]
    stores = {}
    for name, flags in {"no-reps": ["--no-representations"], "no-spectra": ["--no-gradient-spectra"],
                        "no-vog": ["--no-vog"]}.items():
        assert main(common + ["--out", str(tmp_path / name)] + flags) == 0
        stores[name] = Datastore.open(tmp_path / name)
    assert not stores["no-reps"].has_representations and "vog" in stores["no-reps"].score_names
    assert stores["no-spectra"].has_representations
    assert stores["no-spectra"].score_names == ["loss", "grad_norm", "feature_norm", "vog"]
    assert stores["no-vog"].score_names == ["loss", "grad_norm", "feature_norm", "nuclear_norm", "effective_rank"]
    assert "vog" not in pq.read_schema(tmp_path / "no-vog" / "segments" / "seg-000001" / "examples" / "part-00000.parquet").names
    capsys.readouterr()
    assert main(["info", str(tmp_path / "no-vog")]) == 0
    assert "scores: loss, grad_norm, feature_norm, nuclear_norm, effective_rank" in capsys.readouterr().out
