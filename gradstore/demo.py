"""``make demo``: the whole gradstore pipeline on a generated corpus, on CPU, in a few minutes.

1. Generate a multi-task instruction corpus (several task families plus noise) and a target task
   given as a few examples (``gradstore.indexer.demo_corpus``).
2. Build a byte-level BPE tokenizer and a tiny Llama-style model locally, and pretrain it briefly on
   the corpus so that its gradients mean something.
3. Warmup: LoRA training on a random fraction of the corpus, one checkpoint per epoch with its
   optimizer state and average learning rate (``gradstore.indexer.warmup``).
4. Index the corpus (``adam`` gradients at every warmup checkpoint) into a datastore.
5. Start ``gradstore serve`` on loopback and ask it, through the Python SDK, for the top 5 % of
   the corpus for the target examples (the service computes their ``sgd`` gradients with the
   datastore's own model and checkpoints); print the selection with its precision: the share of
   selected examples from the target's family vs. its base rate.

Everything is written under ``demo-output/`` (override with ``--out``); the base model is reused
when it is already there.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path



def log(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def pretrain(model_dir: Path, texts: list[str], steps: int, seed: int = 0) -> None:
    """A short full-parameter causal-LM pretraining of the tiny model on ``texts``."""
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    rng = random.Random(seed)
    for _ in tqdm(range(steps), desc="pretraining", unit="step", dynamic_ncols=True):
        batch = tokenizer(rng.sample(texts, 32), return_tensors="pt", padding=True, truncation=True,
                          max_length=96)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(model_dir)


def build_base_model(out: Path, corpus: list[dict], steps: int) -> Path:
    from gradstore.indexer.tiny import build_model, build_tokenizer

    model_dir = out / "base-model"
    if (model_dir / "config.json").exists():
        log(f"reusing the base model in {model_dir}")
        return model_dir
    texts = [" ".join(m["content"] for m in r["messages"]) for r in corpus]
    tokenizer = build_tokenizer(texts, vocab_size=768)
    build_model("llama", tokenizer, model_dir, hidden=128, layers=4, heads=4, max_positions=256)
    pretrain(model_dir, texts, steps)
    return model_dir


def index_corpus(corpus_file: Path, model_dir: Path, run_dir: Path, out: Path) -> Path:
    from gradstore.indexer.corpus import CorpusSource
    from gradstore.indexer.job import IndexJob, IndexJobConfig
    from gradstore.indexer.projection import ProjectionSpec
    from gradstore.indexer.warmup import read_run_manifest

    config = IndexJobConfig(
        corpus=[CorpusSource.parse(str(corpus_file))], model=model_dir, out=out, tokenizer=run_dir,
        checkpoints=read_run_manifest(run_dir), gradient_type="adam",
        projection=ProjectionSpec(dim=2048, seed=0), max_length=128, device="cpu", overwrite=True,
    )
    summary = IndexJob(config, log=log).run()
    for line in summary.lines():
        log(f"  {line}")
    return out


def select_through_service(root: Path, store: str, targets: list[dict], fraction: float, out: Path):
    """Start ``gradstore serve`` and select through the SDK; returns the selected items."""
    from gradstore.client import Client
    from gradstore.service.process import ServiceProcess

    api_key = "demo-key"
    with ServiceProcess(root, api_key=api_key, log_file=out / "service.log") as service:
        log(f"service listening on {service.url} (log: {out / 'service.log'})")
        with Client(service.url, api_key=api_key, timeout=300) as client:
            return client.select_all(store, targets, fraction=fraction)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gradstore.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("demo-output"))
    parser.add_argument("--examples", type=int, default=3000, help="corpus size")
    parser.add_argument("--target", default="unit_conversion", help="target task family")
    parser.add_argument("--fraction", type=float, default=0.05, help="share of the corpus to select")
    parser.add_argument("--pretrain-steps", type=int, default=300)
    args = parser.parse_args(argv)

    from gradstore.indexer.demo_corpus import FAMILIES, generate_corpus, generate_targets, write_jsonl
    from gradstore.indexer.corpus import CorpusSource
    from gradstore.indexer.warmup import WarmupConfig, run_warmup

    if args.target not in FAMILIES:
        parser.error(f"--target must be one of {', '.join(FAMILIES)}")
    start = time.perf_counter()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    corpus = generate_corpus(args.examples, seed=0)
    corpus_file = write_jsonl(corpus, out / "corpus.jsonl")
    targets = generate_targets(args.target, 8, seed=1)
    write_jsonl(targets, out / f"target-{args.target}.jsonl")
    log(f"corpus: {len(corpus)} examples in {len(FAMILIES)} families + noise -> {corpus_file}")

    model_dir = build_base_model(out, corpus, args.pretrain_steps)
    log("warmup: LoRA training on a random 10% of the corpus, one checkpoint per epoch")
    run_dir = run_warmup(WarmupConfig(
        corpus=[CorpusSource.parse(str(corpus_file))], model=model_dir, out=out / "warmup", fraction=0.1,
        epochs=2, learning_rate=2e-3, lora_r=8, lora_alpha=16, batch_size=8, max_length=128,
        device="cpu", overwrite=True), log=log).out

    log("indexing the corpus (adam gradients at every checkpoint)")
    stores = out / "stores"
    stores.mkdir(exist_ok=True)
    index_corpus(corpus_file, model_dir, run_dir, stores / "corpus")

    log(f"selecting the top {args.fraction:.0%} for {len(targets)} '{args.target}' target examples "
        "through the REST service and the Python SDK")
    selected = select_through_service(stores, "corpus", targets, args.fraction, out)
    family_of = {record["id"]: record["dataset"] for record in corpus}
    precision = sum(family_of[item.id] == args.target for item in selected) / len(selected)
    base_rate = sum(family == args.target for family in family_of.values()) / len(family_of)
    prompts = {record["id"]: record["messages"][0]["content"] for record in corpus}
    print(f"\nTop {len(selected)} of {len(corpus)} examples ({args.fraction:.0%}) for target '{args.target}':")
    for item in selected[:10]:
        print(f"  {item.rank:>2}. {item.score:+.4f}  {item.id:<24} {prompts[item.id][:60]!r}")
    print(f"\nselection precision {precision:.1%} vs base rate {base_rate:.1%} "
          f"({precision / max(base_rate, 1e-9):.1f}x); finished in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
