"""The strategy comparison on real text: WordNet glosses, one target category at a time.

Corpus: the WordNet 3.0 database as Debian ships it (package ``wordnet-base``, files
``/usr/share/wordnet/data.noun`` and ``data.verb``); each synset line holds its lexicographer file
number, its words and its gloss. The number -> name table (``noun.animal``, ``verb.motion``, ...) is
read from the same package's ``lexnames(5WN)`` manual page (the package does not ship the
``lexnames`` file itself; a ``lexnames`` file beside the data files is read instead when present).

Records: one per synset, for the synset's first word not already used (so that no word appears
twice, in the pool or across pool, targets and held-out): user ``What does the noun 'WORD'
mean?`` (or ``verb``), assistant: the gloss's first definition (the text before the first ``;``,
without the quoted usage examples), ``"category"``: the lexname. The synsets are shuffled with
``--seed``; for each target category the last ``--targets`` + ``--heldout`` of its synsets become
target and held-out records (with ``"answer"`` = the gloss); the pool is the first
``--examples`` of the remaining synsets of every category (so each category keeps about its
natural share of WordNet: the base rate).

Pipeline (``gradstore/demo.py``'s pieces): a byte-level BPE tokenizer and a tiny Llama-style model
built locally and pretrained briefly on the pool as plain text (``WORD`` prompt line, gloss line),
a LoRA warmup on 10 % of the pool (two checkpoints), an index with ``adam`` gradients and every
extra feature (representations, gradient spectra, VoG), then per target category
:func:`gradstore.evaluate.compare` with every strategy: held-out answer loss (the main measure:
exact match on glosses is ~0 for a tiny model) and precision against the base rate.

    python bench/strategy_comparison.py --out /tmp/wordnet-comparison  # needs wordnet-base

writes ``corpus.jsonl``, ``target-CAT.jsonl``, ``heldout-CAT.jsonl``, ``results.json`` under
``--out`` and prints one markdown table per category.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import re
import statistics
import sys
import time
from pathlib import Path

WORDNET_DIR = Path("/usr/share/wordnet")
LEXNAMES_MAN = Path("/usr/share/man/man5/lexnames.5WN.gz")
PARTS = {"noun": "data.noun", "verb": "data.verb"}
# A lexnames line (the file's or the manual page's table row): two-digit number, tab, name.
LEXNAME_LINE = re.compile(r"^(\d\d)\t\s*([a-z]+\.[A-Za-z]+)\s*(?:\t|$)")
STRATEGIES = "less,rds,quality:effective_rank,quality:score=nuclear_norm,order=low,random,gio,diversity"
TARGET_CATEGORIES = "noun.animal,noun.food,verb.motion"


def log(message: str) -> None:
    print(f"[wordnet] {message}", flush=True)


def read_lexnames(wordnet_dir: Path = WORDNET_DIR, man_page: Path = LEXNAMES_MAN) -> dict[int, str]:
    """Lexicographer file number -> name, from ``wordnet_dir/lexnames`` or the manual page's table."""
    source = wordnet_dir / "lexnames"
    text = source.read_text() if source.is_file() else gzip.open(man_page, "rt").read()
    names = {int(m.group(1)): m.group(2) for line in text.splitlines() if (m := LEXNAME_LINE.match(line))}
    if len(names) != 45:
        raise SystemExit(f"expected WordNet 3.0's 45 lexicographer files in {source if source.is_file() else man_page}, "
                         f"found {len(names)}")
    return names


def first_definition(gloss: str) -> str:
    """The gloss up to its first ``;`` that is not inside a quoted usage example, examples dropped."""
    definition = re.split(r';\s*"|;', gloss, maxsplit=1)[0]
    return re.sub(r'\s*"[^"]*"', "", definition).strip(" ;")


def read_synsets(wordnet_dir: Path = WORDNET_DIR) -> list[dict]:
    """Every noun and verb synset as ``{offset, part, category, words, definition}`` (file order)."""
    lexnames = read_lexnames(wordnet_dir)
    synsets = []
    for part, filename in PARTS.items():
        with open(wordnet_dir / filename, encoding="utf-8") as lines:
            for line in lines:
                if line.startswith("  "):  # the licence header
                    continue
                fields, _, gloss = line.partition(" | ")
                tokens = fields.split()
                count = int(tokens[3], 16)
                words = [tokens[4 + 2 * i].replace("_", " ") for i in range(count)]
                definition = first_definition(gloss.strip())
                if definition:
                    synsets.append({"offset": tokens[0], "part": part, "category": lexnames[int(tokens[1])],
                                    "words": words, "definition": definition})
    return synsets


def record(synset: dict, word: str, kind: str, n: int) -> dict:
    prompt = f"What does the {synset['part']} '{word}' mean?"
    return {"id": f"wn-{kind}-{synset['category']}-{n}", "category": synset["category"],
            "synset": f"{synset['offset']}-{synset['part'][0]}",
            "messages": [{"role": "user", "content": prompt},
                         {"role": "assistant", "content": synset["definition"]}]}


def build_corpus(synsets: list[dict], examples: int, categories: list[str], targets: int, heldout: int,
                 seed: int) -> tuple[list[dict], dict[str, list[dict]], dict[str, list[dict]]]:
    """The pool, and per target category its target and held-out records (see the module docstring)."""
    order = list(synsets)
    random.Random(seed).shuffle(order)
    used: set[str] = set()
    picked: list[tuple[dict, str]] = []
    for synset in order:  # one distinct word per synset, first come first served
        word = next((w for w in synset["words"] if w.lower() not in used), None)
        if word is not None:
            used.add(word.lower())
            picked.append((synset, word))
    target_sets: dict[str, list[dict]] = {}
    heldout_sets: dict[str, list[dict]] = {}
    reserved: set[int] = set()
    for category in categories:
        members = [i for i, (synset, _) in enumerate(picked) if synset["category"] == category]
        if len(members) < targets + heldout:
            raise SystemExit(f"category {category!r} has {len(members)} usable synsets, fewer than "
                             f"--targets + --heldout = {targets + heldout}")
        chosen = members[-(targets + heldout):]  # from the end: the pool takes the first ones
        reserved.update(chosen)
        target_sets[category] = [record(*picked[i], "target", n) for n, i in enumerate(chosen[:targets])]
        heldout_sets[category] = []
        for n, i in enumerate(chosen[targets:]):
            item = record(*picked[i], "heldout", n)
            item["answer"] = picked[i][0]["definition"]
            heldout_sets[category].append(item)
    rest = [pair for i, pair in enumerate(picked) if i not in reserved]
    if len(rest) < examples:
        raise SystemExit(f"--examples {examples}: only {len(rest)} synsets left for the pool")
    pool = [record(synset, word, "pool", n) for n, (synset, word) in enumerate(rest[:examples])]
    return pool, target_sets, heldout_sets


def pretraining_texts(pool: list[dict], bos: str = "", eos: str = "") -> list[str]:
    """The pool as plain text, prompt line then gloss line (as the demo writes task examples)."""
    return [f"{bos}{r['messages'][0]['content']}\n{r['messages'][1]['content']}{eos}" for r in pool]


def markdown_table(result: dict) -> str:
    lines = ["| arm | examples | held-out loss (mean ± std) | per seed | precision | accuracy |",
             "|---|---:|---|---|---:|---:|"]
    for name, arm in result["arms"].items():
        loss = f"{arm['loss_mean']:.4f}" + (f" ± {arm['loss_std']:.4f}" if len(arm["losses"]) > 1 else "")
        seeds = ", ".join(f"{s}: {v:.4f}" for s, v in zip(arm["seeds"], arm["losses"])) or "-"
        precision = f"{statistics.fmean(arm['precisions']):.1%}" if arm["precisions"] else "-"
        lines.append(f"| {name} | {arm['examples']} | {loss} | {seeds} | {precision} | {arm['accuracy_mean']:.1%} |")
    lines.append(f"\nbase rate of {result['target_family']}: {result['base_rate']:.1%} of {result['pool']} "
                 f"(each selection {result['selected']}, held-out {result['heldout']})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("wordnet-comparison"))
    parser.add_argument("--wordnet-dir", type=Path, default=WORDNET_DIR)
    parser.add_argument("--examples", type=int, default=4000, help="pool size")
    parser.add_argument("--categories", default=TARGET_CATEGORIES, help="target categories (lexnames)")
    parser.add_argument("--targets", type=int, default=8, help="target records per category")
    parser.add_argument("--heldout", type=int, default=50, help="held-out records per category")
    parser.add_argument("--seed", type=int, default=0, help="corpus shuffle")
    parser.add_argument("--fraction", type=float, default=0.05)
    parser.add_argument("--pretrain-steps", type=int, default=400)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--warmup-fraction", type=float, default=0.1)
    parser.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs of each arm")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--strategies", default=STRATEGIES, help="';'-separated specs (',' is in the specs)")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see gradstore/demo.py

    from gradstore.demo import FINETUNE, index_corpus, pretrain
    from gradstore.evaluate import compare
    from gradstore.indexer.corpus import CorpusSource
    from gradstore.indexer.demo_corpus import write_jsonl
    from gradstore.indexer.finetune import FinetuneSettings
    from gradstore.indexer.tiny import build_model, build_tokenizer
    from gradstore.indexer.warmup import WarmupConfig, run_warmup

    started = time.perf_counter()
    seeds = [int(s) for s in args.seeds.split(",")]
    categories = [c for c in args.categories.split(",") if c]
    strategies = [s for s in (args.strategies.split(";") if ";" in args.strategies else
                              _split_specs(args.strategies)) if s]
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    synsets = read_synsets(args.wordnet_dir)
    pool, target_sets, heldout_sets = build_corpus(synsets, args.examples, categories, args.targets, args.heldout,
                                                   args.seed)
    corpus_file = write_jsonl(pool, out / "corpus.jsonl")
    for category in categories:
        write_jsonl(target_sets[category], out / f"target-{category}.jsonl")
        write_jsonl(heldout_sets[category], out / f"heldout-{category}.jsonl")
    counts = {c: sum(r["category"] == c for r in pool) for c in categories}
    log(f"{len(synsets)} noun+verb synsets; pool {len(pool)} records in "
        f"{len({r['category'] for r in pool})} categories; targets: {counts}")

    model_dir = out / "base-model"
    tokenizer = build_tokenizer(pretraining_texts(pool), vocab_size=args.vocab_size)
    build_model("llama", tokenizer, model_dir, hidden=args.hidden, layers=args.layers, heads=4, max_positions=256)
    pretrain(model_dir, pretraining_texts(pool, tokenizer.bos_token, tokenizer.eos_token), args.pretrain_steps)
    log(f"pretrained ({time.perf_counter() - started:.0f} s)")
    run_dir = run_warmup(WarmupConfig(
        corpus=[CorpusSource.parse(str(corpus_file))], model=model_dir, out=out / "warmup",
        fraction=args.warmup_fraction, epochs=2, learning_rate=2e-3, lora_r=8, lora_alpha=16, batch_size=8,
        max_length=128, device="cpu", overwrite=True), log=log).out
    store = index_corpus(corpus_file, model_dir, run_dir, out / "store")
    log(f"indexed ({time.perf_counter() - started:.0f} s)")

    settings = FinetuneSettings(**{**FINETUNE, "epochs": args.epochs})
    results = {"settings": vars(args) | {"out": str(out), "wordnet_dir": str(args.wordnet_dir)},
               "pool_categories": len({r["category"] for r in pool}), "categories": {}}
    tables = []
    for category in categories:
        result = compare(store, target_sets[category], heldout_sets[category], fraction=args.fraction,
                         strategies=strategies, seeds=seeds, include_full=False, settings=settings,
                         max_new_tokens=args.max_new_tokens, family_field="category", target_family=category,
                         device="cpu", progress=False, log=log)
        results["categories"][category] = result.to_dict()
        results["seconds"] = time.perf_counter() - started
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        tables.append(f"### {category}\n\n{markdown_table(result.to_dict())}\n")
        print(tables[-1], flush=True)
    print("\n".join(tables))
    print(f"finished in {time.perf_counter() - started:.0f} s")
    return 0


def _split_specs(text: str) -> list[str]:
    """Comma-separated specs where a spec's own options (``score=...,order=low``) hold ``=``."""
    specs: list[str] = []
    for part in text.split(","):
        if "=" in part and specs and ":" in specs[-1] and ":" not in part:
            specs[-1] += "," + part
        else:
            specs.append(part)
    return specs


if __name__ == "__main__":
    sys.exit(main())
