"""Indexing throughput: gradstore against a plain training step, the LESS reference method and bergson.

One command measures, side by side in one process (bergson in its own virtual environment), how
fast per-example projected LoRA gradients are computed for the same model, corpus, LoRA and
projection dimension (k = 8192):

* ``gradstore`` — the real indexing job: :class:`~gradstore.indexer.job.IndexJob` loaded on a JSONL
  corpus written here, gradient type ``adam`` at a real checkpoint made by a short
  :func:`~gradstore.indexer.warmup.run_warmup` on the same model, the default ``sjlt`` projection.
  The timed part is :meth:`IndexJob.compute_features` on the encoded corpus (no model load, no
  Parquet writes); one full ``IndexJob.run()`` (load, compute, write, FAISS, manifest) is timed too.
* ``floor`` — a plain batched training step over the same batches (gradstore's length-bucketed
  batching): forward with the padding mask and full logits, then backward of the summed
  per-example losses into the LoRA parameters' ``.grad``; no per-example work, no optimizer step.
  ``floor, gradstore's forward`` is the same step with the forward gradstore runs (all-ones mask
  for right padding, logits only at label positions: the same losses), so that gradstore's time
  over it is the cost of its per-example work alone.
* ``reference`` — the LESS method as its reference code runs it
  (``less/data_selection/collect_grad_reps.py``): batch size 1, ``loss.backward()``, the full
  LoRA gradient flattened in ``named_parameters`` order, the Adam transform, and every 16 examples
  (LESS's ``project_interval``) the stacked fp16 gradients projected by a dense Rademacher matrix
  regenerated on every call in column blocks of 128 (``block_size``), each block from a
  ``torch.Generator`` seeded with ``seed + 1000 * block`` and ``bernoulli_(0.5) * 2 - 1``, as
  TRAK's CPU ``BasicProjector`` does. It runs on a length-stratified subset (every call projects
  16 vectors, the subset's own rows repeated when it is smaller); its time per example is compared
  with gradstore's over the whole corpus, and gradstore is also timed on the same subset.
* ``bergson`` — ``bergson build`` (another virtual environment, ``--bergson-python``) on the same
  token ids and labels (a pre-tokenized JSONL dataset), the warmup checkpoint as its PEFT model,
  ``--optimizer_state`` from the same checkpoint, ``--projection_target global
  --projection_type rademacher --projection_dim 8192 --loss_reduction mean``, the same token
  budget per batch. The timed part is its gradient-collection loop (``collect_gradients``), read
  by a small wrapper around its CLI entry point; its whole command is timed too.

Data: chat records whose token lengths are drawn from a log-normal distribution with median 180
tokens and sigma 0.8 (mean ~250, p90 ~500), clipped to [16, 1024] — the long right tail of
instruction-tuning data — filled with pseudo-words from a seeded generator; between 15 % and 70 %
of each example's tokens are the prompt (no loss), the rest the answer. The tokenizer is a
byte-level BPE trained here on the same kind of text (:func:`gradstore.indexer.tiny.build_tokenizer`).

Models (random weights, built locally with :mod:`gradstore.indexer.tiny`): ``tiny`` is a GPT-2
(hidden 128, 4 layers, 4 heads, vocab 4096); ``100m`` a Llama (hidden 768, 12 layers, 12 heads,
intermediate 2048, vocab 8192: 97.6 M parameters). For a GPU: ``350m``, a Llama of hidden 1024,
24 layers, 16 heads, intermediate 2816, vocab 32000 (374 M parameters), and ``1b``, hidden 2048,
22 layers, 32 heads, intermediate 5632, vocab 32000 (TinyLlama's sizes with full multi-head
attention: 1.26 B). LoRA r = 8,
alpha = 16 on the attention's q/k/v/o projections (GPT-2: the fused ``c_attn`` and ``attn.c_proj``).

Extras (``--extras``, the default, or ``--no-extras``): the job computes what ``gradstore index``
computes by default besides the features (representation vectors, gradient spectra and, with two
or more checkpoints, VoG; see :mod:`gradstore.indexer.extras`), and ``gradstore, no extras`` times
the same job with them turned off, interleaved with the others, so that their cost is the ratio
of the two. ``--checkpoints N`` makes the warmup write N checkpoints (one per epoch) and indexes
at all of them (default 1; VoG needs 2).

Device and precision: ``--device`` (``cpu``, the default, or ``cuda``) and ``--dtype`` (``fp32``,
the default, or ``bf16``) go to the indexing job (``IndexJobConfig.device`` / ``.dtype``: the base
model's weights are loaded in that dtype, the LoRA weights stay fp32 as PEFT keeps them); the
warmup that makes the checkpoint runs on the same device in fp32 (its LoRA weights and Adam state
do not depend on the base dtype, and fp32 keeps its short training stable). The floor steps run
on the job's own loaded model, so they use the same device and the same weights in the same
dtype: the ratio compares like with like. On CUDA every clock is read after
``torch.cuda.synchronize()``, and each method's peak GPU memory is recorded.
On CUDA the reference method and bergson are skipped unless asked for (``--reference``,
``--bergson``): the reference runs at batch size 1 and takes far longer than the rest, and bergson
needs its own environment with a CUDA build; on CPU both run as before (``--no-reference`` and
``--bergson-python ''`` skip them).

Usage::

    python bench/indexing_throughput.py --config both --json /tmp/throughput.json
    python bench/indexing_throughput.py --config tiny --examples 64 --reference-examples 8   # quick
    python bench/indexing_throughput.py --config 100m --checkpoints 2 --no-reference --bergson-python ''   # extras' cost
    python bench/indexing_throughput.py --config 350m --device cuda --dtype bf16 --json /tmp/gpu.json

Nothing is downloaded; bergson runs with ``HF_HUB_OFFLINE=1`` on a model folder written here.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from gradstore.indexer.checkpoints import CheckpointSpec
from gradstore.indexer.corpus import CorpusSource
from gradstore.indexer.extras import ExtraFeatures
from gradstore.indexer.featurize import length_batches
from gradstore.indexer.grads import Batch, batch_losses, output_head, per_example_losses
from gradstore.indexer.job import IndexJob, IndexJobConfig, prepare
from gradstore.indexer.model import resolve_device
from gradstore.indexer.optimizer_state import canonical_param_name
from gradstore.indexer.projection import ProjectionSpec

PROJ_DIM = 8192
LENGTH_MEDIAN, LENGTH_SIGMA, LENGTH_MIN, LENGTH_MAX = 180, 0.8, 16, 1024
LESS_PROJECT_INTERVAL = 16  # collect_grad_reps.py: project every 16 examples
TRAK_BLOCK_SIZE = 128  # collect_grad_reps.py: block_size for the projector


@dataclass
class BenchConfig:
    name: str
    kind: str
    hidden: int
    layers: int
    heads: int
    intermediate: int | None
    vocab: int
    lora_targets: tuple[str, ...]
    examples: int
    reference_examples: int
    repeats: int
    max_tokens_per_batch: int
    max_batch_size: int = 64
    warmup_examples: int = 8


CONFIGS = {
    "tiny": BenchConfig("tiny", "gpt2", hidden=128, layers=4, heads=4, intermediate=None, vocab=4096,
                        lora_targets=("c_attn", "attn.c_proj"), examples=512, reference_examples=32,
                        repeats=3, max_tokens_per_batch=8192),
    "100m": BenchConfig("100m", "llama", hidden=768, layers=12, heads=12, intermediate=2048, vocab=8192,
                        lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"), examples=32,
                        reference_examples=8, repeats=2, max_tokens_per_batch=8192),
    # GPU sizes. 8192 tokens per batch keeps the eager attention's saved scores well inside 80 GB.
    "350m": BenchConfig("350m", "llama", hidden=1024, layers=24, heads=16, intermediate=2816, vocab=32000,
                        lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"), examples=2048,
                        reference_examples=16, repeats=3, max_tokens_per_batch=8192),
    "1b": BenchConfig("1b", "llama", hidden=2048, layers=22, heads=32, intermediate=5632, vocab=32000,
                      lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"), examples=1024,
                      reference_examples=16, repeats=3, max_tokens_per_batch=8192),
}


# ------------------------------------------------------------------------------------------------
# Corpus: pseudo-word texts with realistic token lengths
# ------------------------------------------------------------------------------------------------

_ONSETS = ["", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z",
           "br", "ch", "cl", "dr", "fl", "gr", "pl", "pr", "sh", "st", "th", "tr"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "ou", "io", "ee"]
_CODAS = ["", "", "", "n", "r", "s", "t", "l", "m", "nd", "st", "ng"]


class PseudoLanguage:
    """A seeded lexicon of pseudo-words used with Zipfian frequencies, in sentences."""

    def __init__(self, seed: int, words: int = 40000):
        self.rng = np.random.default_rng(seed)
        lexicon = set()
        while len(lexicon) < words:
            syllables = int(self.rng.integers(1, 5))
            lexicon.add("".join(self.rng.choice(_ONSETS) + self.rng.choice(_VOWELS) + self.rng.choice(_CODAS)
                                for _ in range(syllables)))
        self.lexicon = np.array(sorted(lexicon))
        self.rng.shuffle(self.lexicon)
        weights = 1.0 / np.arange(1, len(self.lexicon) + 1) ** 1.05
        self.p = weights / weights.sum()

    def text(self, words: int) -> str:
        picks = self.rng.choice(self.lexicon, size=words, p=self.p)
        out, sentence = [], 0
        for word in picks:
            if sentence == 0:
                word = word.capitalize()
            sentence += 1
            if self.rng.random() < 0.04:
                word = f"{word} {int(self.rng.integers(0, 2000))}"
            if sentence >= 6 and self.rng.random() < 0.12:
                word += "." if self.rng.random() < 0.8 else "?"
                sentence = 0
            elif self.rng.random() < 0.06:
                word += ","
            out.append(word)
        return " ".join(out) + "."


def sample_lengths(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    lengths = rng.lognormal(mean=math.log(LENGTH_MEDIAN), sigma=LENGTH_SIGMA, size=n)
    return np.clip(np.round(lengths), LENGTH_MIN, LENGTH_MAX).astype(int)


def cut_to_tokens(tokenizer, text: str, tokens: int) -> str:
    """The prefix of ``text`` made of its first ``tokens`` tokens (at a token boundary)."""
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    offsets = encoding["offset_mapping"]
    if tokens >= len(offsets):
        return text
    return text[: offsets[tokens - 1][1]].rstrip()


def make_corpus(tokenizer, language: PseudoLanguage, n: int, seed: int) -> list[dict]:
    """``n`` chat records whose formatted length is close to a log-normal draw."""
    rng = np.random.default_rng(seed + 1)
    records = []
    template_overhead = 8  # <|user|>\n … \n<|assistant|>\n … </s>\n in the LESS/tulu format
    for i, total in enumerate(sample_lengths(n, seed)):
        content = max(8, int(total) - template_overhead)
        prompt_tokens = max(2, int(round(content * rng.uniform(0.15, 0.7))))
        answer_tokens = max(4, content - prompt_tokens)
        prompt = cut_to_tokens(tokenizer, language.text(prompt_tokens + 16), prompt_tokens)
        answer = cut_to_tokens(tokenizer, language.text(answer_tokens + 16), answer_tokens)
        records.append({"id": f"ex-{i}", "dataset": "bench",
                        "messages": [{"role": "user", "content": prompt},
                                     {"role": "assistant", "content": answer}]})
    return records


def write_jsonl(path: Path, rows) -> Path:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


# ------------------------------------------------------------------------------------------------
# Set-up: tokenizer, model, corpus, warmup checkpoint
# ------------------------------------------------------------------------------------------------


@dataclass
class Setup:
    cfg: BenchConfig
    root: Path
    model_dir: Path
    corpus: Path
    checkpoints: list[Path]
    device: str = "cpu"
    dtype: str = "fp32"
    seconds: dict = field(default_factory=dict)


def build_setup(cfg: BenchConfig, root: Path, seed: int, log, device: str = "cpu", dtype: str = "fp32",
                checkpoints: int = 1) -> Setup:
    from gradstore.indexer.tiny import build_model, build_tokenizer
    from gradstore.indexer.warmup import WarmupConfig, run_warmup

    root.mkdir(parents=True, exist_ok=True)
    seconds = {}
    start = time.perf_counter()
    language = PseudoLanguage(seed)
    tokenizer = build_tokenizer([language.text(60) for _ in range(6000)], vocab_size=cfg.vocab)
    model_dir = build_model(cfg.kind, tokenizer, root / "model", seed=seed, hidden=cfg.hidden, layers=cfg.layers,
                            heads=cfg.heads, intermediate=cfg.intermediate, max_positions=8192)
    seconds["model"] = time.perf_counter() - start
    start = time.perf_counter()
    corpus = write_jsonl(root / "corpus.jsonl", make_corpus(tokenizer, language, cfg.examples, seed))
    seconds["corpus"] = time.perf_counter() - start
    start = time.perf_counter()
    warmup = WarmupConfig(corpus=[CorpusSource.parse(str(corpus))], model=model_dir, out=root / "warmup",
                          fraction=min(1.0, cfg.warmup_examples / cfg.examples), epochs=checkpoints,
                          learning_rate=1e-3,
                          warmup_ratio=0.0, lora_r=8, lora_alpha=16, lora_targets=cfg.lora_targets,
                          batch_size=4, max_length=LENGTH_MAX, device=device, progress=False, overwrite=True)
    result = run_warmup(warmup, log=lambda *_: None)
    seconds["warmup"] = time.perf_counter() - start
    log(f"[{cfg.name}] set-up: model {seconds['model']:.1f} s, corpus {seconds['corpus']:.1f} s, "
        f"warmup {seconds['warmup']:.1f} s ({result.num_examples} examples)")
    return Setup(cfg, root, model_dir, corpus, list(result.checkpoints), device, dtype, seconds)


def job_config(setup: Setup, out: Path, **overrides) -> IndexJobConfig:
    """The indexing job: at every warmup checkpoint (the first named ``warmup``), all extras on."""
    names = ["warmup"] + [f"warmup-{i + 1}" for i in range(1, len(setup.checkpoints))]
    settings = dict(
        corpus=[CorpusSource.parse(str(setup.corpus))], model=setup.model_dir, out=out,
        checkpoints=[CheckpointSpec(name=n, path=p) for n, p in zip(names, setup.checkpoints)], gradient_type="adam",
        projection=ProjectionSpec(kind="sjlt", dim=PROJ_DIM, seed=0), max_length=LENGTH_MAX,
        max_tokens_per_batch=setup.cfg.max_tokens_per_batch, max_batch_size=setup.cfg.max_batch_size,
        shard_size=4096, device=setup.device, dtype=setup.dtype, progress=False, overwrite=True,
    )
    settings.update(overrides)
    return IndexJobConfig(**settings)


# ------------------------------------------------------------------------------------------------
# The methods
# ------------------------------------------------------------------------------------------------


def clock(device: torch.device) -> float:
    """``time.perf_counter()`` once the work queued on ``device`` has finished: CUDA kernels run
    asynchronously, so reading the clock without waiting would time their launch only."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def run_floor(job: IndexJob, encoded, batches, same_forward: bool = False) -> None:
    """Forward + backward of the summed per-example losses over the job's own batches.

    Plain: the padding mask and full logits, as a training step computes them. ``same_forward``:
    the forward gradstore runs (:func:`gradstore.indexer.grads.batch_losses`: an all-ones mask for
    right padding, logits only where a label is predicted; the same loss values), so the difference
    to gradstore is its per-example work alone.
    """
    model = job.peft_model
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    head = output_head(model, [m for pair in job.featurizer.grads.pairs for m in (pair.a, pair.b)])
    for rows in batches:
        batch = Batch.collate([(encoded[i].input_ids, encoded[i].labels) for i in rows],
                              job.tokenizer.pad_token_id, job.device)
        with torch.enable_grad():
            if same_forward:
                losses = batch_losses(model, batch, head)
            else:
                logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
                losses = per_example_losses(logits, batch.labels)
            losses.sum().backward()
        for p in params:
            p.grad = None


class TrakStyleProjector:
    """A dense Rademacher projection regenerated in column blocks on every call, as TRAK's CPU
    ``BasicProjector`` does: block ``b`` is ``bernoulli_(0.5) * 2 - 1`` from a generator seeded
    with ``seed + 1000 * b``, and the gradients are cast to the projector's dtype per block.
    On a GPU the same algorithm runs there (TRAK's own CUDA projector is a different kernel)."""

    def __init__(self, grad_dim: int, proj_dim: int, seed: int = 0, block_size: int = TRAK_BLOCK_SIZE,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.proj_dim, self.seed, self.dtype = proj_dim, seed, dtype
        self.block_size = min(proj_dim, block_size)
        self.num_blocks = math.ceil(proj_dim / self.block_size)
        self.matrix = torch.empty(grad_dim, self.block_size, dtype=dtype, device=device)
        self.generator = torch.Generator(device=device)

    def project(self, grads: torch.Tensor) -> torch.Tensor:
        sketch = torch.zeros(grads.shape[0], self.proj_dim, dtype=self.dtype, device=grads.device)
        for block in range(self.num_blocks):
            self.generator.manual_seed(self.seed + 1000 * block)
            self.matrix.bernoulli_(0.5, generator=self.generator)
            self.matrix.mul_(2.0).sub_(1.0)
            start, stop = block * self.block_size, min((block + 1) * self.block_size, self.proj_dim)
            sketch[:, start:stop] = grads.type(self.dtype) @ self.matrix[:, : stop - start]
        return sketch


def run_reference(job: IndexJob, encoded, checkpoint_state) -> dict:
    """The LESS method at batch size 1 on ``encoded``; returns timings, features and full vectors."""
    model = job.peft_model
    model.eval()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    states = checkpoint_state.transform.states
    order = [canonical_param_name(n) for n, _ in named]
    exp_avg = torch.cat([states[n].exp_avg.flatten() for n in order]).to(job.device)
    exp_avg_sq = torch.cat([states[n].exp_avg_sq.flatten() for n in order]).to(job.device)
    state = states[order[0]]
    step = state.step + 1
    projector = TrakStyleProjector(exp_avg.numel(), PROJ_DIM, device=job.device)

    def adam(g: torch.Tensor) -> torch.Tensor:  # gradstore's `adam` transform on the flat vector
        m = state.beta1 * exp_avg + (1 - state.beta1) * g
        v = state.beta2 * exp_avg_sq + (1 - state.beta2) * g * g
        return (m / (1 - state.beta1 ** step)) / ((v / (1 - state.beta2 ** step)).sqrt() + state.eps)

    def gradient(example) -> torch.Tensor:
        ids = torch.as_tensor(example.input_ids, dtype=torch.int64, device=job.device)[None]
        labels = torch.as_tensor(example.labels, dtype=torch.int64, device=job.device)[None]
        with torch.enable_grad():
            model(input_ids=ids, labels=labels).loss.backward()
        flat = torch.cat([p.grad.view(-1) for _, p in named if p.grad is not None])
        model.zero_grad()
        return adam(flat)

    gradient(min(encoded, key=lambda e: e.num_tokens))  # untimed: first-call initialisation
    grad_seconds = project_seconds = 0.0
    pending, features, full = [], [], []
    for i, example in enumerate(encoded):
        start = clock(job.device)
        pending.append(gradient(example))
        grad_seconds += clock(job.device) - start
        if len(pending) == LESS_PROJECT_INTERVAL or i == len(encoded) - 1:
            full.extend(g.clone() for g in pending)
            stack = torch.stack(pending).to(torch.float16)
            # Every call projects a full interval of 16, as LESS does on a long corpus; a shorter
            # stack (a small subset) is filled up with its own rows so the cost per example is not
            # overstated.
            stack = stack[torch.arange(LESS_PROJECT_INTERVAL) % len(pending)]
            start = clock(job.device)
            features.append(projector.project(stack)[: len(pending)])
            project_seconds += clock(job.device) - start
            pending = []
    calls = math.ceil(len(encoded) / LESS_PROJECT_INTERVAL)
    per_example = grad_seconds / len(encoded) + project_seconds / (calls * LESS_PROJECT_INTERVAL)
    return {"gradient_seconds": grad_seconds, "projection_seconds": project_seconds, "projection_calls": calls,
            "projection_seconds_per_call": project_seconds / calls, "seconds_per_example": per_example,
            "seconds": per_example * len(encoded), "features": torch.cat(features).cpu(),
            "full": torch.stack(full).cpu()}


BERGSON_DRIVER = r"""
import json, sys, time
import bergson.build as build_module
timing = {}
collect = build_module.collect_gradients
def timed(*args, **kwargs):
    start = time.perf_counter()
    try:
        return collect(*args, **kwargs)
    finally:
        timing["collect_seconds"] = time.perf_counter() - start
build_module.collect_gradients = timed
from bergson.__main__ import main
out = sys.argv[1]
sys.argv = ["bergson"] + sys.argv[2:]
start = time.perf_counter()
try:
    main()
finally:
    timing["main_seconds"] = time.perf_counter() - start
    open(out, "w").write(json.dumps(timing))
"""


def run_bergson(python: str, setup: Setup, encoded, log) -> dict:
    """``bergson build`` on the same token ids and labels; its timings, or why it could not run."""
    work = setup.root / "bergson"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    data = write_jsonl(work / "data.jsonl", ({"input_ids": e.input_ids.tolist(), "labels": e.labels.tolist()}
                                               for e in encoded))
    driver = work / "driver.py"
    driver.write_text(BERGSON_DRIVER)
    timing_file = work / "timing.json"
    cmd = [python, str(driver), str(timing_file), "build", str(work / "index"),
           "--model", str(setup.checkpoints[0]), "--tokenizer", str(setup.model_dir), "--dataset", str(data),
           "--precision", setup.dtype,
           "--projection_dim", str(PROJ_DIM), "--projection_target", "global", "--projection_type", "rademacher",
           "--optimizer_state", str(setup.checkpoints[0]), "--loss_reduction", "mean",
           "--token_batch_size", str(setup.cfg.max_tokens_per_batch),
           "--max_batch_size", str(setup.cfg.max_batch_size), "--overwrite", "true"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HOME": str(work / "hf-home"), "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PYTHONPATH", None)
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=work)
    wall = time.perf_counter() - start
    (work / "stdout.txt").write_text(result.stdout)
    (work / "stderr.txt").write_text(result.stderr)
    command = " ".join(["bergson"] + cmd[3:])
    if result.returncode != 0 or not timing_file.exists() or "collect_seconds" not in json.loads(timing_file.read_text()):
        tail = (result.stderr or result.stdout).strip().splitlines()[-15:]
        log(f"[{setup.cfg.name}] bergson failed (exit {result.returncode}):\n  " + "\n  ".join(tail))
        return {"ok": False, "returncode": result.returncode, "error_tail": tail, "command": command}
    timing = json.loads(timing_file.read_text())
    versions = subprocess.run([python, "-c", "import importlib.metadata as m; import json; print(json.dumps("
                               "{p: m.version(p) for p in ('bergson', 'torch', 'transformers', 'peft')}))"],
                              capture_output=True, text=True, env=env)
    info = json.loads((work / "index" / "info.json").read_text())
    grads = np.memmap(work / "index" / "gradients.bin", dtype=np.dtype(info.get("base_dtype", "float16")), mode="r",
                      shape=(info["num_grads"], sum(info["grad_sizes"].values())))
    return {"ok": True, "seconds": timing["collect_seconds"], "command_seconds": wall,
            "main_seconds": timing["main_seconds"], "shape": list(grads.shape), "command": command,
            "versions": json.loads(versions.stdout) if versions.returncode == 0 else None,
            "vectors": np.array(grads, dtype=np.float32)}


# ------------------------------------------------------------------------------------------------
# Measurement
# ------------------------------------------------------------------------------------------------


def pairwise_cosines(x: np.ndarray) -> np.ndarray:
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-30)
    return (x @ x.T)[np.triu_indices(len(x), 1)]


def stratified(encoded, n: int) -> list[int]:
    """``n`` example indices spread evenly over the length distribution."""
    order = sorted(range(len(encoded)), key=lambda i: (encoded[i].num_tokens, i))
    if n >= len(order):
        return sorted(order)
    return sorted(order[round(j * (len(order) - 1) / (n - 1))] for j in range(n)) if n > 1 else [order[len(order) // 2]]


def rate(examples: int, tokens: int, seconds: float) -> dict:
    return {"seconds": seconds, "examples_per_second": examples / seconds, "tokens_per_second": tokens / seconds}


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> int | None:
    """Peak bytes allocated on ``device`` since the last reset (None off CUDA: not tracked there)."""
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


NO_EXTRAS = ExtraFeatures(representations=False, gradient_spectra=False, vog=False)


def time_methods(job: IndexJob, encoded, batches, repeats: int, log, name: str) -> tuple[dict, dict]:
    """Interleaved repeats of the two floors, gradstore and (when the job computes extras) gradstore
    without them: seconds per repeat and peak GPU bytes."""
    times = {"floor": [], "floor_same_forward": [], "gradstore": []}
    if job.config.extras != NO_EXTRAS:
        times["gradstore_no_extras"] = []
    peaks = {method: None for method in times}
    for repeat in range(repeats):
        order = list(times) if repeat % 2 == 0 else list(times)[::-1]
        for method in order:
            reset_peak_memory(job.device)
            start = clock(job.device)
            if method == "gradstore":
                job.compute_features(encoded)
            elif method == "gradstore_no_extras":
                job.featurizer.settings.extras = NO_EXTRAS
                try:
                    job.compute_features(encoded)
                finally:
                    job.featurizer.settings.extras = job.config.extras
            else:
                run_floor(job, encoded, batches, same_forward=method == "floor_same_forward")
            times[method].append(clock(job.device) - start)
            peak = peak_memory(job.device)
            if peak is not None:
                peaks[method] = max(peaks[method] or 0, peak)
        log(f"[{name}] repeat {repeat + 1}: " + ", ".join(f"{m} {t[-1]:.2f} s" for m, t in times.items()))
    return times, peaks


def compare_with_reference(job: IndexJob, encoded, checkpoint, cfg: BenchConfig, gradstore_s: float,
                           log) -> tuple[dict, list[int], np.ndarray]:
    """The reference method on a length-stratified subset, gradstore on the same subset, and how
    well both projections keep the exact pairwise cosines of the full Adam vectors.

    Returns the result fields, the subset's rows and the exact cosines (for bergson's check)."""
    subset = stratified(encoded, cfg.reference_examples)
    sub_encoded = [encoded[i] for i in subset]
    sub_tokens = sum(e.num_tokens for e in sub_encoded)
    start = clock(job.device)
    sub_features = job.compute_features(sub_encoded).checkpoints["warmup"]
    gradstore_subset = clock(job.device) - start
    job.featurizer.activate(0)  # the reference runs on the model as it is: the first checkpoint's
    reference = run_reference(job, sub_encoded, checkpoint)
    log(f"[{cfg.name}] reference on {len(subset)} examples: gradients {reference['gradient_seconds']:.1f} s, "
        f"{reference['projection_calls']} projection call(s) of {LESS_PROJECT_INTERVAL} vectors "
        f"{reference['projection_seconds']:.1f} s: {reference['seconds_per_example']:.2f} s/example; "
        f"gradstore on the same examples {gradstore_subset:.2f} s")

    # Agreement: exact cosines between the subset's full Adam vectors vs. both projections.
    exact = pairwise_cosines(reference["full"].double().numpy())
    ours = pairwise_cosines(sub_features["feature"].astype(np.float64))
    theirs = pairwise_cosines(reference["features"].double().numpy())
    agreement = {"pairs": int(exact.size), "gradstore_max_abs_error": float(np.abs(ours - exact).max()),
                 "reference_max_abs_error": float(np.abs(theirs - exact).max()),
                 "gradstore_rms_error": float(np.sqrt(np.mean((ours - exact) ** 2))),
                 "reference_rms_error": float(np.sqrt(np.mean((theirs - exact) ** 2)))}
    fields = {
        "reference": {**rate(len(sub_encoded), sub_tokens, reference["seconds"]),
                      **{k: reference[k] for k in ("gradient_seconds", "projection_seconds", "projection_calls",
                                                   "projection_seconds_per_call", "seconds_per_example")},
                      "examples": len(sub_encoded), "tokens": sub_tokens, "rows": subset},
        "gradstore_on_reference_subset": rate(len(sub_encoded), sub_tokens, gradstore_subset),
        # Per example: the reference on its length-stratified subset, gradstore on the whole corpus.
        "reference_over_gradstore": reference["seconds_per_example"] / (gradstore_s / len(encoded)),
        "reference_over_gradstore_same_examples": reference["seconds"] / gradstore_subset,
        "cosine_agreement": agreement,
    }
    return fields, subset, exact


def bench_config(cfg: BenchConfig, args, log) -> dict:
    root = Path(args.workdir) / cfg.name
    setup = build_setup(cfg, root, args.seed, log, args.device, args.dtype, args.checkpoints)
    extras = ExtraFeatures() if args.extras else NO_EXTRAS
    job = IndexJob(job_config(setup, root / "store", extras=extras), log=lambda *_: None)
    start = time.perf_counter()
    job.load()
    load_seconds = clock(job.device) - start
    prepared = prepare(job.config, job.formatter)
    encoded = prepared.encoded
    lengths = [e.num_tokens for e in encoded]
    tokens = sum(lengths)
    batches = length_batches(list(range(len(encoded))), lengths, job.config.max_tokens_per_batch,
                             job.config.max_batch_size)
    checkpoint = job.checkpoints[0]
    job.featurizer.activate(0)
    params = sum(p.numel() for p in job.peft_model.get_base_model().parameters())
    lora_params = sum(p.numel() for p in job.peft_model.parameters() if p.requires_grad)
    log(f"[{cfg.name}] {params / 1e6:.1f} M parameters, {lora_params:,} LoRA parameters on {job.device} "
        f"({setup.dtype}); {len(encoded)} examples, {tokens:,} tokens (median {int(np.median(lengths))}, "
        f"max {max(lengths)}), {len(batches)} batches")

    # Untimed warm-up: the sjlt matrices are built and cached on a job's first batch.
    start = clock(job.device)
    shortest = [min(encoded, key=lambda e: e.num_tokens)]
    job.compute_features(shortest)
    cache_seconds = clock(job.device) - start
    run_floor(job, shortest, [[0]])
    run_floor(job, shortest, [[0]], same_forward=True)

    times, peaks = time_methods(job, encoded, batches, cfg.repeats, log, cfg.name)
    gradstore_s = statistics.median(times["gradstore"])
    floor_s = statistics.median(times["floor"])
    floor_same_s = statistics.median(times["floor_same_forward"])

    subset, exact = None, None
    reference_fields = {"reference": {"skipped": True, "reason": "not asked for (--reference)"}}
    if args.reference:
        reference_fields, subset, exact = compare_with_reference(job, encoded, checkpoint, cfg, gradstore_s, log)

    bergson = {"ok": False, "skipped": True}
    if args.bergson:
        bergson = run_bergson(args.bergson_python, setup, encoded, log)
        if bergson["ok"]:
            vectors = bergson.pop("vectors")
            if exact is not None:
                bergson["gradstore_cosine_correlation"] = float(np.corrcoef(
                    pairwise_cosines(vectors[subset].astype(np.float64)), exact)[0, 1])
            log(f"[{cfg.name}] bergson: {bergson['seconds']:.2f} s collecting, {bergson['command_seconds']:.1f} s command")

    # The whole job once, end to end (load, compute, Parquet, FAISS, manifest, publish).
    start = clock(job.device)
    summary = IndexJob(job_config(setup, root / "store", extras=extras), log=lambda *_: None).run()
    end_to_end = clock(job.device) - start

    result = {
        "config": {**cfg.__dict__, "lora_targets": list(cfg.lora_targets), "parameters": params,
                   "lora_parameters": lora_params, "proj_dim": PROJ_DIM, "device": str(job.device),
                   "dtype": setup.dtype, "checkpoints": len(setup.checkpoints), "extras": extras.to_dict()},
        "data": {"examples": len(encoded), "tokens": tokens, "median_tokens": float(np.median(lengths)),
                 "mean_tokens": float(np.mean(lengths)), "p90_tokens": float(np.percentile(lengths, 90)),
                 "max_tokens": max(lengths), "truncated": sum(e.truncated for e in encoded), "batches": len(batches),
                 "padded_tokens": sum(len(b) * max(lengths[i] for i in b) for b in batches)},
        "setup_seconds": {**setup.seconds, "job_load": load_seconds, "projection_cache": cache_seconds},
        "times": times,
        "peak_gpu_memory_bytes": peaks,
        "gradstore": rate(len(encoded), tokens, gradstore_s),
        "floor": rate(len(encoded), tokens, floor_s),
        "floor_same_forward": rate(len(encoded), tokens, floor_same_s),
        "gradstore_over_floor": gradstore_s / floor_s,
        **({"gradstore_no_extras": rate(len(encoded), tokens, statistics.median(times["gradstore_no_extras"])),
            "extras_overhead": gradstore_s / statistics.median(times["gradstore_no_extras"]) - 1}
           if "gradstore_no_extras" in times else {}),
        "gradstore_over_floor_same_forward": gradstore_s / floor_same_s,
        # Issue 5's target is on this one: gradstore's tokens/s as a share of the training step's.
        "gradstore_tokens_per_second_over_floor": floor_s / gradstore_s,
        **reference_fields,
        "bergson": bergson,
        "end_to_end": {"job_run_seconds": end_to_end, "summary_examples_per_second": summary.examples_per_second,
                       "summary_tokens_per_second": summary.tokens_per_second},
    }
    if bergson.get("ok"):
        result["bergson"].update(rate(len(encoded), tokens, bergson["seconds"]))
        result["bergson_over_gradstore"] = bergson["seconds"] / gradstore_s
    return result


def indexed_device(device: str) -> str:
    """``cuda`` as ``cuda:N``, N the current GPU; other devices as given. The job treats an
    unindexed ``cuda`` as "this rank's GPU" and hands it to ``torch.cuda.set_device``, which wants
    an index; this benchmark is one process on one GPU, so it names that GPU."""
    if device == "cuda" and torch.cuda.is_available():
        return f"cuda:{torch.cuda.current_device()}"
    return device


def environment() -> dict:
    import peft
    import transformers

    def load():
        try:
            return os.getloadavg()
        except OSError:
            return None

    gpu = None
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        gpu = {"name": properties.name, "memory_bytes": properties.total_memory, "cuda": torch.version.cuda,
               "count": torch.cuda.device_count()}
    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "platform": platform.platform(), "gpu": gpu, "load_average_at_start": load()}


def report(name: str, r: dict) -> list[str]:
    lines = [f"== {name}: {r['config']['parameters'] / 1e6:.1f} M params, {r['data']['examples']} examples, "
             f"{r['data']['tokens']:,} tokens, {r['config']['device']}, {r['config']['dtype']} =="]

    def row(label, x, extra=""):
        lines.append(f"{label:<34} {x['seconds']:8.2f} s {x['examples_per_second']:9.2f} ex/s "
                     f"{x['tokens_per_second']:10.0f} tok/s {extra}")

    row("floor (plain training step)", r["floor"])
    row("floor, gradstore's forward", r["floor_same_forward"])
    row("gradstore", r["gradstore"], f"{r['gradstore_over_floor']:.2f}x floor, "
        f"{r['gradstore_over_floor_same_forward']:.2f}x same-forward floor "
        f"(tokens/s {r['gradstore_tokens_per_second_over_floor']:.2f}x floor's)")
    if "gradstore_no_extras" in r:
        row("gradstore, no extras", r["gradstore_no_extras"],
            f"extras (representations, spectra, vog at {r['config']['checkpoints']} checkpoint(s)) cost "
            f"{100 * r['extras_overhead']:+.1f} %")
    peaks = r["peak_gpu_memory_bytes"]
    if any(peak is not None for peak in peaks.values()):
        lines.append("peak GPU memory: " + ", ".join(f"{m} {peak / 2**30:.1f} GiB" for m, peak in peaks.items()))
    if r["reference"].get("skipped"):
        lines.append(f"reference (LESS): not run ({r['reference']['reason']})")
    else:
        row(f"gradstore, {r['reference']['examples']}-example subset", r["gradstore_on_reference_subset"])
        row("reference (LESS), same subset", r["reference"],
            f"{r['reference_over_gradstore']:.1f}x gradstore per example "
            f"({r['reference_over_gradstore_same_examples']:.1f}x on the same examples)")
    if r["bergson"].get("ok"):
        row("bergson build", r["bergson"], f"{r['bergson_over_gradstore']:.2f}x gradstore")
    else:
        lines.append(f"bergson: not run ({r['bergson'].get('error_tail', ['skipped'])[-1]})")
    a = r.get("cosine_agreement")
    if a is None:
        return lines
    lines.append(f"pairwise cosine vs exact (rms/max abs error): gradstore {a['gradstore_rms_error']:.4f}/"
                 f"{a['gradstore_max_abs_error']:.4f}, reference {a['reference_rms_error']:.4f}/"
                 f"{a['reference_max_abs_error']:.4f} over {a['pairs']} pairs")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=[*CONFIGS, "both"], default="both",
                        help="model size; both = tiny and 100m (350m and 1b are sized for a GPU)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda (cuda:N for one GPU)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                        help="base model weights of the indexing job and of the floor steps alike")
    parser.add_argument("--json", type=Path, help="write every figure here")
    parser.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one, removed)")
    parser.add_argument("--examples", type=int, help="override the number of corpus examples")
    parser.add_argument("--reference-examples", type=int, help="override the reference method's subset size")
    parser.add_argument("--repeats", type=int, help="override the number of interleaved floor/gradstore repeats")
    parser.add_argument("--bergson-python", default="/tmp/bergson-venv/bin/python",
                        help="python of a virtual environment with bergson installed ('' to skip bergson)")
    parser.add_argument("--bergson", action=argparse.BooleanOptionalAction, default=None,
                        help="run bergson (default: on CPU when --bergson-python exists, never on CUDA)")
    parser.add_argument("--reference", action=argparse.BooleanOptionalAction, default=None,
                        help="run the LESS reference method (default: on CPU yes, on CUDA no)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch / OpenMP threads for every method, bergson included (default: torch's)")
    parser.add_argument("--extras", action=argparse.BooleanOptionalAction, default=True,
                        help="compute the extras (representations, gradient spectra, VoG) as gradstore index does "
                             "by default, and time the job without them too (--no-extras: features only)")
    parser.add_argument("--checkpoints", type=int, default=1,
                        help="warmup checkpoints to index at (one per epoch; VoG needs two)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    resolve_device(args.device)  # no CUDA here: fail now rather than after building the model
    args.device = indexed_device(args.device)
    on_cpu = torch.device(args.device).type == "cpu"
    if args.reference is None:
        args.reference = on_cpu
    if args.bergson is None:
        args.bergson = on_cpu and bool(args.bergson_python)
    if args.bergson and not (args.bergson_python and Path(args.bergson_python).exists()):
        print(f"note: {args.bergson_python or 'no --bergson-python'} not found; bergson is skipped", file=sys.stderr)
        args.bergson = False

    def log(message):
        print(message, file=sys.stderr, flush=True)

    # The 1-minute load average every 30 s while the benchmark runs (other jobs on the machine).
    load_samples, stop = [], threading.Event()

    def sample_load():
        while not stop.wait(30.0):
            load_samples.append(round(os.getloadavg()[0], 2))

    threading.Thread(target=sample_load, daemon=True).start()
    temporary = args.workdir is None
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="gradstore-throughput-")
    results = {"environment": environment(), "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "configs": {}}
    try:
        for name in (["tiny", "100m"] if args.config == "both" else [args.config]):
            cfg = CONFIGS[name]
            for key in ("examples", "reference_examples", "repeats"):
                if getattr(args, key) is not None:
                    setattr(cfg, key, getattr(args, key))
            start, load_before = time.perf_counter(), os.getloadavg()
            results["configs"][name] = bench_config(cfg, args, log)
            results["configs"][name]["config_wall_seconds"] = time.perf_counter() - start
            results["configs"][name]["load_average"] = {"start": load_before, "end": os.getloadavg()}
            print("\n".join(report(name, results["configs"][name])), flush=True)
    finally:
        if temporary:
            shutil.rmtree(args.workdir, ignore_errors=True)
    stop.set()
    results["environment"]["load_average_at_end"] = os.getloadavg()
    results["environment"]["load_1min_samples"] = load_samples
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
