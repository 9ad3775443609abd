"""``make demo``: the whole gradstore pipeline on a generated corpus, on CPU, in under ten minutes.

1. Generate a multi-task instruction corpus (several task families plus noise) and a target task
   given as a few examples (``gradstore.indexer.demo_corpus``).
2. Build a byte-level BPE tokenizer and a tiny Llama-style model locally, and pretrain it briefly on
   the corpus as plain text (task examples as prompt and answer lines, chit-chat in the chat
   format) so that its gradients mean something and it has skills for fine-tuning to bring out.
3. Warmup: LoRA training on a random fraction of the corpus, one checkpoint per epoch with its
   optimizer state and average learning rate (``gradstore.indexer.warmup``).
4. Index the corpus (``adam`` gradients at every warmup checkpoint) into a datastore.
5. Start ``gradstore serve`` on loopback (its web UI at ``/ui/``) and ask it, through the Python SDK, for 5 % of the
   corpus with every strategy of the comparison (``less``, ``rds``, ``quality`` by effective
   rank, ``random``, ``gio``, ``diversity``; the service computes the targets' ``sgd`` gradients
   and representations with the datastore's own model and checkpoints); print the LESS
   selection with each strategy's precision: the share of selected examples from the target's
   family vs. its base rate, and write ``gradstore report`` of the LESS selection (``report.html``:
   opens offline).
6. Measure the selections (``gradstore.evaluate``): fine-tune a fresh LoRA on each strategy's 5 %
   (three seeds each; ``random`` draws a subset per seed) and on the whole corpus (one seed, one
   epoch), evaluate each and the base model on 100 held-out examples of the target task, and
   print held-out loss, exact-match accuracy and precision per strategy.

Everything is written under ``demo-output/`` (override with ``--out``); the base model is reused
when it is already there and was built with the same recipe. The demo ends by printing the
report's path and how to open the web UI; with ``--serve`` it then serves the demo's datastores
with the web UI until Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

# Fine-tuning of the comparison arms: a LoRA on every linear map of the tiny model, trained hard
# enough on 150 examples to learn the task's answer format; the full corpus gets one epoch.
FINETUNE = dict(epochs=5, learning_rate=5e-3, lora_r=8, lora_alpha=16, lora_dropout=0.0, lora_targets="all-linear",
                batch_size=8, max_length=128)
FULL_EPOCHS = 1
HELDOUT_EXAMPLES = 100
# The strategies the demo compares (gradstore eval --strategies syntax).
STRATEGIES = "less,rds,quality:effective_rank,random,gio,diversity"


def log(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def pretrain(model_dir: Path, texts: list[str], steps: int, seed: int = 0) -> None:
    """A short full-parameter causal-LM pretraining of the tiny model on ``texts`` (written with
    their special tokens): AdamW at 3e-3 with 50 warmup steps and a cosine decay, batches of 32."""
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_cosine_schedule_with_warmup

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    scheduler = get_cosine_schedule_with_warmup(optimizer, min(50, steps // 10), steps)
    rng = random.Random(seed)
    with tqdm(range(steps), desc="pretraining", unit="step", dynamic_ncols=True) as bar:
        for _ in bar:
            batch = tokenizer(rng.sample(texts, min(32, len(texts))), return_tensors="pt", padding=True,
                              truncation=True, max_length=96, add_special_tokens=False)
            labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
            loss = model(**batch, labels=labels).loss
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.save_pretrained(model_dir)


RECIPE_FILE = "demo_recipe.json"
RECIPE = {"version": 2, "hidden": 128, "layers": 4, "heads": 4, "vocab_size": 768, "task_text": "prompt\\nanswer",
          "noise_text": "chat", "schedule": "cosine", "learning_rate": 3e-3}


def pretraining_texts(corpus: list[dict], bos: str = "", eos: str = "") -> list[str]:
    """The corpus as pretraining text: task examples as two plain lines (prompt, answer), the
    chit-chat (noise) in the chat format the indexer and fine-tuning use (``gradstore-default``,
    see ``gradstore.indexer.formatting``), each between ``bos`` and ``eos``.

    The model thus knows the chat format (from chit-chat) and every task (as plain text), but has
    never answered a task in the chat format: that is what fine-tuning teaches it. The line break
    before the answer makes the answer's first token the same as after the chat format's
    assistant header (byte-level BPE tokens differ with and without a leading space).
    """
    from gradstore.indexer.demo_corpus import NOISE

    texts = []
    for record in corpus:
        prompt, answer = (m["content"] for m in record["messages"])
        if record["dataset"] == NOISE:
            texts.append(f"{bos}<|user|>\n{prompt}\n<|assistant|>\n{answer}{eos}")
        else:
            texts.append(f"{bos}{prompt}\n{answer}{eos}")
    return texts


def build_base_model(out: Path, corpus: list[dict], steps: int) -> Path:
    """A tiny Llama-style model pretrained on the corpus (see :func:`pretraining_texts`).

    A model already in ``out/base-model`` is reused when it was built with the same recipe.
    """
    from gradstore.indexer.tiny import build_model, build_tokenizer

    model_dir = out / "base-model"
    recipe = {**RECIPE, "examples": len(corpus), "pretrain_steps": steps}
    recorded = model_dir / RECIPE_FILE
    if (model_dir / "config.json").exists() and recorded.is_file() and json.loads(recorded.read_text()) == recipe:
        log(f"reusing the base model in {model_dir}")
        return model_dir
    tokenizer = build_tokenizer(pretraining_texts(corpus), vocab_size=recipe["vocab_size"])
    build_model("llama", tokenizer, model_dir, hidden=recipe["hidden"], layers=recipe["layers"],
                heads=recipe["heads"], max_positions=256)
    pretrain(model_dir, pretraining_texts(corpus, tokenizer.bos_token, tokenizer.eos_token), steps)
    recorded.write_text(json.dumps(recipe) + "\n")
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


API_KEY = "demo-key"


def select_through_service(root: Path, store: str, targets: list[dict], fraction: float, out: Path,
                           strategies: list[dict], seeds: list[int]) -> dict[str, dict[int, list]]:
    """Start ``gradstore serve`` and select with each strategy through the SDK: per strategy label
    and seed, the selected items (a seeded strategy, ``random``, draws once per seed)."""
    from gradstore.client import Client
    from gradstore.evaluate import seeded_by_run
    from gradstore.selection.strategies import strategy_label
    from gradstore.service.process import ServiceProcess

    selections: dict[str, dict[int, list]] = {}
    with ServiceProcess(root, api_key=API_KEY, log_file=out / "service.log") as service:
        log(f"service listening on {service.url} (log: {out / 'service.log'}; web UI: {service.url}/ui/)")
        with Client(service.url, api_key=API_KEY, timeout=300) as client:
            needs = {info.name: info.needs_targets for info in client.list_strategies()}
            for spec in strategies:
                uses = targets if needs[spec["name"]] != "none" else None
                draws = {seed: {**spec, "seed": seed} for seed in seeds} if seeded_by_run(spec) else {None: spec}
                picked = {seed: client.select_all(store, uses, strategy=options, fraction=fraction)
                          for seed, options in draws.items()}
                selections[strategy_label(spec)] = {seed: picked[seed if seed in picked else None] for seed in seeds}
    return selections


def write_report(store_dir: Path, targets: list[dict], selected, fraction: float, out: Path) -> Path:
    """``out/report.html``: ``gradstore report`` of the service's selection (``out/selection.jsonl``,
    as ``gradstore select --json`` writes it), with the pool's scores (``out/scores.parquet``,
    as ``gradstore select --scores``, recomputed in-process for the same request) and the targets."""
    from gradstore.datastore import Datastore
    from gradstore.report import build_report
    from gradstore.selection import SelectionEngine, SelectionOptions, TargetFeaturizer

    selection_file = out / "selection.jsonl"
    selection_file.write_text("".join(item.model_dump_json() + "\n" for item in selected))
    store = Datastore.open(store_dir)
    engine = SelectionEngine(store)
    target_set = TargetFeaturizer(store, device="cpu").featurize(targets, None)
    local = engine.select(target_set, SelectionOptions(fraction=fraction))
    if [item["id"] for item in local.items()] != [item.id for item in selected]:
        log("warning: the in-process selection differs from the service's; the report's score histogram is "
            "the in-process one")
    scores = engine.write_scores(local, out / "scores.parquet")
    return build_report(store_dir, out / "report.html", selection=selection_file, scores=scores, targets=target_set)


def serve_until_interrupted(root: Path, out: Path) -> None:
    """``gradstore serve`` over the demo's stores until Ctrl-C, printing the web UI's address."""
    from gradstore.service.process import ServiceProcess

    with ServiceProcess(root, api_key=API_KEY, log_file=out / "service.log") as service:
        print(f"\nweb UI: {service.url}/ui/  (API key: {API_KEY}); serving until Ctrl-C", flush=True)
        try:
            service.process.wait()
        except KeyboardInterrupt:
            print("stopping the service", flush=True)


def measure_selections(corpus: list[dict], selections: dict[str, dict[int, list]], target: str, model_dir: Path,
                       out: Path, fraction: float, seeds: list[int]):
    """Fine-tune on each strategy's selection and on the whole corpus; print the table."""
    from gradstore.evaluate import format_table, run_comparison, to_json
    from gradstore.indexer.demo_corpus import generate_heldout, write_jsonl
    from gradstore.indexer.finetune import FinetuneSettings

    by_id = {record["id"]: record for record in corpus}
    chosen = {label: {seed: [by_id[item.id] for item in items] for seed, items in by_seed.items()}
              for label, by_seed in selections.items()}
    heldout = generate_heldout(target, HELDOUT_EXAMPLES)
    write_jsonl(heldout, out / f"heldout-{target}.jsonl")
    result = run_comparison(corpus, chosen, heldout, model_dir, model_dir, settings=FinetuneSettings(**FINETUNE),
                            seeds=seeds, full_seeds=seeds[:1], full_epochs=FULL_EPOCHS, max_new_tokens=16,
                            family_field="dataset", target_family=target, device="cpu", log=log)
    result.fraction = fraction
    (out / "comparison.json").write_text(to_json(result))
    print(f"\nFine-tuned on each strategy's {fraction:.0%} and on the full corpus; evaluated on {len(heldout)} "
          f"held-out '{target}' examples (loss: mean answer-token loss; accuracy: exact match of the greedy "
          f"answer; precision: share of the selection from '{target}'):\n")
    print(format_table(result))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gradstore.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("demo-output"))
    parser.add_argument("--examples", type=int, default=3000, help="corpus size")
    parser.add_argument("--target", default="unit_conversion", help="target task family")
    parser.add_argument("--fraction", type=float, default=0.05, help="share of the corpus to select")
    parser.add_argument("--pretrain-steps", type=int, default=1500)
    parser.add_argument("--seeds", default="0,1,2",
                        help="fine-tuning seeds of every strategy's arm (the full corpus uses the first)")
    parser.add_argument("--strategies", default=STRATEGIES,
                        help="strategies to compare, as gradstore eval --strategies takes them")
    parser.add_argument("--no-eval", action="store_true", help="stop after the selection (no fine-tuning)")
    parser.add_argument("--serve", action="store_true",
                        help="at the end, serve the demo's datastores with the web UI until Ctrl-C")
    args = parser.parse_args(argv)
    # Idle OpenMP threads sleep instead of spinning: on a small machine shared with other work,
    # spinning threads of the demo and its service fight each other and every other process for
    # the cores (training steps were measured 10-20x slower). Read when torch loads, so set first.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    from gradstore.evaluate import family_share, parse_strategy
    from gradstore.indexer.corpus import CorpusSource
    from gradstore.indexer.demo_corpus import FAMILIES, generate_corpus, generate_targets, write_jsonl
    from gradstore.indexer.warmup import WarmupConfig, run_warmup

    if args.target not in FAMILIES:
        parser.error(f"--target must be one of {', '.join(FAMILIES)}")
    try:
        seeds = [int(seed) for seed in args.seeds.split(",") if seed.strip()]
    except ValueError:
        parser.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    if not seeds or len(set(seeds)) != len(seeds):
        parser.error(f"--seeds must be distinct integers, at least one, got {args.seeds!r}")
    try:
        strategies = [parse_strategy(spec) for spec in args.strategies.split(",") if spec.strip()]
    except ValueError as err:
        parser.error(f"--strategies: {err}")
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

    log(f"selecting {args.fraction:.0%} for {len(targets)} '{args.target}' target examples with "
        f"{len(strategies)} strategies through the REST service and the Python SDK")
    selections = select_through_service(stores, "corpus", targets, args.fraction, out, strategies, seeds)
    shown = "less" if "less" in selections else next(iter(selections))
    selected = selections[shown][seeds[0]]
    by_id = {record["id"]: record for record in corpus}
    base_rate = family_share(corpus, "dataset", args.target)
    prompts = {record["id"]: record["messages"][0]["content"] for record in corpus}
    print(f"\nThe first of {len(selected)} examples ({args.fraction:.0%} of {len(corpus)}) for target "
          f"'{args.target}', by {shown}:")
    for item in selected[:10]:
        print(f"  {item.rank:>2}. {item.score:+.4f}  {item.id:<24} {prompts[item.id][:60]!r}")
    print(f"\nprecision (share from '{args.target}', base rate {base_rate:.1%}) after "
          f"{time.perf_counter() - start:.0f} s:")
    for label, by_seed in selections.items():
        shares = [family_share([by_id[item.id] for item in by_seed[seed]], "dataset", args.target) for seed in seeds]
        print(f"  {label:<28} {sum(shares) / len(shares):6.1%}  ({len(by_seed[seeds[0]])} examples)")
    report = write_report(stores / "corpus", targets, selections["less"][seeds[0]], args.fraction, out) \
        if "less" in selections else None
    if report is not None:
        log(f"report of the LESS selection: {report}")
    if not args.no_eval:
        log(f"measuring the selections: fine-tuning on each strategy's {args.fraction:.0%} ({len(seeds)} seed(s) "
            f"each) and on the full corpus")
        measure_selections(corpus, selections, args.target, model_dir, out, args.fraction, seeds)
        log(f"comparison written to {out / 'comparison.json'}")
    print(f"\nfinished in {time.perf_counter() - start:.0f} s")
    if report is not None:
        print(f"report of the LESS selection (opens offline): {report}")
    if args.serve:
        serve_until_interrupted(stores, out)
    else:
        print(f"web UI: run `gradstore serve --root {stores} --api-key {API_KEY}` and open http://127.0.0.1:8080/ui/ "
              f"(or `python -m gradstore.demo --serve` to end serving it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
