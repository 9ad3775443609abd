"""Shared fixtures: a tiny tokenizer and tiny GPT-2 / Llama models built locally (no hub), and the
service datastores built on them with the numpy references that check queries over them."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from gradstore.client.models import IndexJobRequest

CORPUS_TEXTS = [
    "add 12 and 30 to get 42",
    "reverse the word cat to get tac",
    "the capital of france is paris",
    "convert 3 km to meters: 3000 m",
    "<|user|>\n<|assistant|>\n<|system|>\n",
] * 20


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from gradstore.indexer.tiny import build_tokenizer

    return build_tokenizer(CORPUS_TEXTS, vocab_size=384)


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory, tiny_tokenizer):
    """``{"gpt2": path, "llama": path}``: tiny models saved with their tokenizer."""
    from gradstore.indexer.tiny import build_model

    root = tmp_path_factory.mktemp("models")
    return {kind: build_model(kind, tiny_tokenizer, root / kind, seed=1) for kind in ("gpt2", "llama")}


# ------------------------------------------------------------------------------------------------
# Service datastores, shared by tests/service and tests/client.
#
# The numpy helpers below read a store's files and manifest directly, so the service and the SDK
# are checked against the datastore format, not against their own code.
# ------------------------------------------------------------------------------------------------

WORDS = "alpha beta gamma delta add reverse capital paris cat tac number seven".split()
DIM = 256


def chat_records(n, seed, prefix, subtasks=None):
    """``n`` chat records with ids ``<prefix>-<i>`` and a ``task`` field (``task-0`` / ``task-1``);
    with ``subtasks``, also a ``subtask`` field cycling through them."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        prompt = " ".join(rng.choice(WORDS, size=int(rng.integers(2, 12))))
        answer = " ".join(rng.choice(WORDS, size=int(rng.integers(1, 8))))
        record = {"id": f"{prefix}-{i}", "dataset": "toy", "task": f"task-{i % 2}",
                  "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}
        if subtasks:
            record["subtask"] = subtasks[i % len(subtasks)]
        records.append(record)
    return records


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="session")
def service_corpus(tmp_path_factory):
    """``(folder, {source: records})``: ``toy`` (28), ``more`` (12) and the targets ``tgt`` (6) as
    JSONL files in ``folder``."""
    folder = tmp_path_factory.mktemp("service-corpus")
    records = {"toy": chat_records(28, 0, "ex"), "more": chat_records(12, 1, "more"), "tgt": chat_records(6, 2, "tgt")}
    for name, items in records.items():
        write_jsonl(folder / f"{name}.jsonl", items)
    return folder, records


@pytest.fixture(scope="session")
def service_run(tmp_path_factory, tiny_model_dirs, service_corpus):
    """The warmup run of the service stores (tiny GPT-2, LoRA r=4, checkpoints ``epoch-1`` and
    ``epoch-2`` with adapter and optimizer state). Read-only."""
    from gradstore.indexer.corpus import CorpusSource
    from gradstore.indexer.warmup import WarmupConfig, run_warmup

    folder, _ = service_corpus
    run = tmp_path_factory.mktemp("service-build") / "run"
    run_warmup(WarmupConfig(corpus=[CorpusSource.parse(str(folder / "toy.jsonl"))], model=tiny_model_dirs["gpt2"],
                            out=run, fraction=0.5, epochs=2, learning_rate=1e-3, lora_r=4, lora_alpha=8,
                            batch_size=4, max_length=64, progress=False), log=lambda *_: None)
    return run


@pytest.fixture(scope="session")
def service_root(tmp_path_factory, tiny_model_dirs, service_corpus, service_run):
    """A folder of datastores built by the indexer on the tiny GPT-2: ``pool`` (toy + more, adam,
    two warmup checkpoints, Flat index), ``targets`` (tgt, sgd, same model and checkpoints) and
    ``pool-noindex`` (the pool without its index). Read-only: copy it to add or change stores."""
    from gradstore.indexer.checkpoints import CheckpointSpec
    from gradstore.indexer.corpus import CorpusSource
    from gradstore.indexer.job import IndexJob, IndexJobConfig
    from gradstore.indexer.projection import ProjectionSpec

    folder, _ = service_corpus
    model = tiny_model_dirs["gpt2"]
    run = service_run
    checkpoints = [CheckpointSpec.parse(str(run / name)) for name in ("epoch-1", "epoch-2")]
    stores = tmp_path_factory.mktemp("service-root")

    def index(name, files, gradient_type):
        config = IndexJobConfig(corpus=[CorpusSource.parse(str(folder / f)) for f in files], model=model,
                                out=stores / name, checkpoints=checkpoints, gradient_type=gradient_type,
                                projection=ProjectionSpec(dim=DIM, seed=0), max_length=64, shard_size=16,
                                max_tokens_per_batch=512, device="cpu", index="flat", progress=False)
        IndexJob(config, log=lambda *_: None).run()

    index("pool", ["toy.jsonl", "more.jsonl"], "adam")
    index("targets", ["tgt.jsonl"], "sgd")
    shutil.copytree(stores / "pool", stores / "pool-noindex")
    drop_index(stores / "pool-noindex")
    return stores


def copy_stores(root, dest):
    """The datastores of ``root`` (not its service state: exports, jobs) copied into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    for store in root.iterdir():
        if not store.name.startswith("."):
            shutil.copytree(store, dest / store.name)
    return dest


def drop_index(store) -> None:
    manifest = json.loads((store / "manifest.json").read_text())
    index = manifest["index"]["file"]
    manifest["index"] = None
    del manifest["files"][index]
    (store / index).unlink()
    (store / "manifest.json").write_text(json.dumps(manifest))


def id_of(row: int) -> str:
    """The id of a ``pool`` row (28 ``toy`` examples, then 12 ``more``)."""
    return f"ex-{row}" if row < 28 else f"more-{row - 28}"


def features(store, checkpoint: str):
    """float64 (N, k) features of a checkpoint, read straight from the ``.npy`` files the manifest's
    segments name."""
    return np.concatenate(feature_files(store, checkpoint)).astype(np.float64)


def feature_files(store, checkpoint: str) -> list:
    """Every shard's float16 features of a checkpoint, in row order, as ``numpy.load`` reads them."""
    manifest = json.loads((store / "manifest.json").read_text())
    return [np.load(store / "segments" / segment["name"] / "features" / checkpoint / f"part-{shard:05d}.npy")
            for segment in manifest["segments"] for shard in range(len(segment["shard_rows"]))]


def decoded_features(store, kind: str, checkpoint: str):
    """float64 (N, k): a checkpoint's quantised copy decoded as the format specifies it, from the
    ``.codes.npy`` and ``.scales.npy`` files alone: ``int8`` codes × scale; ``1bit`` bits
    (most significant first) as ±1 × scale."""
    manifest = json.loads((store / "manifest.json").read_text())
    dim = manifest["features"]["dim"]
    rows = []
    for segment in manifest["segments"]:
        folder = store / "segments" / segment["name"] / "quantized" / kind / checkpoint
        for shard in range(len(segment["shard_rows"])):
            codes, scales = (np.load(folder / f"part-{shard:05d}.{part}.npy") for part in ("codes", "scales"))
            if kind == "1bit":
                codes = np.unpackbits(codes, axis=1, count=dim, bitorder="big").astype(np.float64) * 2 - 1
            rows.append(codes.astype(np.float64) * scales[:, None])
    return np.concatenate(rows)


def weights(store) -> dict[str, float]:
    """The manifest's checkpoint weights, normalised to sum 1."""
    manifest = json.loads((store / "manifest.json").read_text())
    raw = {c["name"]: c["weight"] for c in manifest["checkpoints"]}
    total = sum(raw.values())
    return {name: w / total for name, w in raw.items()}


def unit(rows):
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def less_scores(root, target_vectors, subtasks=None, precision="fp16"):
    """LESS by hand over ``root/pool``: per subtask the mean of Σ_c w_c cos(train_c, target_c),
    then the max; with ``precision`` int8 or 1bit, over that quantised copy decoded."""
    w = weights(root / "pool")

    def train(c):
        return features(root / "pool", c) if precision == "fp16" else decoded_features(root / "pool", precision, c)

    per_target = sum(w[c] * train(c) @ unit(target_vectors[c]).T for c in w)
    labels = np.array(subtasks or ["all"] * per_target.shape[1])
    return np.max([per_target[:, labels == s].mean(axis=1) for s in dict.fromkeys(labels)], axis=0)


def top_rows(scores, k: int) -> list[int]:
    """The rows of the ``k`` highest scores, ties broken by row."""
    return np.lexsort((np.arange(len(scores)), -scores))[:k].tolist()


def numpy_top_k(root, target_vectors, k):
    """Exact influence over ``root/pool``: per target, (top ``k`` rows, their scores)."""
    w = weights(root / "pool")
    scores = sum(w[c] * features(root / "pool", c) @ unit(target_vectors[c]).T for c in w)
    return [(top_rows(scores[:, t], k), np.sort(scores[:, t])[::-1][:k]) for t in range(scores.shape[1])]


def sgd_job_request(corpus, model, **overrides):
    """An ``IndexJobRequest`` for a tiny fresh-LoRA ``sgd`` job (rank 4, 256 dimensions, CPU)
    that writes datastore ``pool`` from the ``corpus`` paths."""
    fields = dict(datastore="pool", corpus=[str(path) for path in corpus], model=str(model),
                  gradient_type="sgd", lora_r=4, lora_alpha=8, proj_dim=DIM, max_length=64, device="cpu")
    fields.update(overrides)
    return IndexJobRequest(**fields)


# ---------------------------------------------------------------- selection: real stores from warmup checkpoints


SELECTION_WORDS = "alpha beta gamma delta add reverse capital paris cat tac number seven".split()
SELECTION_SUBTASKS = ("math", "words", "geo")
SELECTION_DIM = 256


def word_chat_records(n, seed, prefix, subtasks=None):
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        prompt = " ".join(rng.choice(SELECTION_WORDS, size=int(rng.integers(2, 12))))
        answer = " ".join(rng.choice(SELECTION_WORDS, size=int(rng.integers(1, 8))))
        record = {"id": f"{prefix}-{i}", "dataset": prefix,
                  "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}
        if subtasks:
            record["subtask"] = subtasks[i % len(subtasks)]
        records.append(record)
    return records


def build_test_store(out, model, corpus, checkpoints, gradient_type: str, **overrides):
    """A store of ``corpus`` built by a real indexing job with the selection tests' settings."""
    from gradstore.indexer.corpus import CorpusSource
    from gradstore.indexer.job import IndexJob, IndexJobConfig
    from gradstore.indexer.model import LoraSpec
    from gradstore.indexer.projection import ProjectionSpec

    settings = dict(corpus=[CorpusSource.parse(str(p)) for p in corpus], model=model, out=out,
                    checkpoints=checkpoints, gradient_type=gradient_type, lora=LoraSpec(r=4, alpha=8),
                    projection=ProjectionSpec(dim=SELECTION_DIM, seed=0), max_length=64, shard_size=16,
                    max_tokens_per_batch=256, device="cpu", index="flat", progress=False)
    settings.update(overrides)
    IndexJob(IndexJobConfig(**settings), log=lambda *_: None).run()
    return out


@pytest.fixture(scope="session")
def selection_stores(tmp_path_factory, tiny_model_dirs):
    """A 2-checkpoint adam pool (two sources) and an sgd target store with subtasks."""
    from gradstore.indexer.checkpoints import CheckpointSpec
    from gradstore.indexer.corpus import CorpusSource
    from gradstore.indexer.warmup import WarmupConfig, run_warmup

    root = tmp_path_factory.mktemp("engine")
    toy = write_jsonl(root / "toy.jsonl", word_chat_records(30, seed=0, prefix="toy"))
    more = write_jsonl(root / "more.jsonl", word_chat_records(18, seed=1, prefix="more"))
    targets = write_jsonl(root / "targets.jsonl",
                          word_chat_records(7, seed=2, prefix="t", subtasks=SELECTION_SUBTASKS))
    run = root / "run"
    run_warmup(WarmupConfig(corpus=[CorpusSource.parse(str(toy))], model=tiny_model_dirs["gpt2"], out=run,
                            fraction=0.5, epochs=2, learning_rate=1e-3, lora_r=4, lora_alpha=8, batch_size=4,
                            max_length=64, progress=False), log=lambda *_: None)
    checkpoints = [CheckpointSpec.parse(str(run / name)) for name in ("epoch-1", "epoch-2")]
    pool = build_test_store(root / "pool", tiny_model_dirs["gpt2"], [toy, more], checkpoints, "adam")
    target = build_test_store(root / "target", tiny_model_dirs["gpt2"], [targets], checkpoints, "sgd")
    return {"pool": pool, "target": target, "corpus": [toy, more], "targets": targets}


# ------------------------------------------------------------------------------------------------
# Killing a `gradstore` command at a chosen point (tests/indexer/test_faults.py, tests/datastore)
# ------------------------------------------------------------------------------------------------

# One thread per process, as torchrun gives each rank: every run computes the same bits.
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}

# A `gradstore` command (argv[2:]) in a process where one function is wrapped to SIGKILL the process
# at its n-th call whose arguments mention a text, just before or just after that call runs
# (argv[1]: [owner, function, text, n, "before" | "after"]). Only this child is patched.
KILL_AT = """
import json, os, signal, sys
from gradstore import cli
from gradstore.datastore import files, versions
from gradstore.indexer import featurize, job

owner_name, function, text, nth, moment = json.loads(sys.argv[1])
owner = {"files": files, "versions": versions, "job": job, "ExampleFeaturizer": featurize.ExampleFeaturizer}[owner_name]
original = getattr(owner, function)
matching_calls = 0

def killing(*args, **kwargs):
    global matching_calls
    chosen = text in " ".join(map(str, args))
    matching_calls += chosen
    fire = chosen and matching_calls == nth
    if fire and moment == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    result = original(*args, **kwargs)
    if fire:
        os.kill(os.getpid(), signal.SIGKILL)
    return result

setattr(owner, function, killing)
sys.exit(cli.main(sys.argv[2:]))
"""



def kill_at(command: list[str], owner: str, function: str, text: str, nth: int, moment: str) -> None:
    """Run ``command`` (a `gradstore` command line) and check that it was killed where asked."""
    spec = json.dumps([owner, function, text, nth, moment])
    result = subprocess.run([sys.executable, "-c", KILL_AT, spec, *command[3:]], capture_output=True, text=True,
                            env=ONE_THREAD)
    where = f"{function} ({text!r}, call {nth}, {moment})"
    assert result.returncode == -signal.SIGKILL, f"not killed at {where}:\n{result.stderr[-3000:]}"


def errors_in_another_thread(call) -> list[str]:
    """The messages of the RuntimeErrors ``call()`` raises when run in a new thread."""
    import threading

    errors = []

    def run():
        try:
            call()
        except RuntimeError as err:
            errors.append(str(err))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return errors
