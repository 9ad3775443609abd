"""The demo pipeline in small: generated corpus -> warmup -> adam index -> strategies' selections -> compare."""

from __future__ import annotations

import json
import math

import pytest

from gradstore.evaluate import (ComparisonResult, compare, family_share, format_table, pool_records,
                                select_with_strategies, to_json)
from gradstore.datastore import Datastore
from gradstore.indexer.corpus import CorpusSource
from gradstore.indexer.demo_corpus import generate_corpus, generate_heldout, generate_targets, write_jsonl
from gradstore.indexer.finetune import FinetuneSettings
from gradstore.indexer.job import IndexJob, IndexJobConfig
from gradstore.indexer.projection import ProjectionSpec
from gradstore.indexer.tiny import build_model, build_tokenizer
from gradstore.indexer.warmup import WarmupConfig, read_run_manifest, run_warmup

TARGET = "unit_conversion"
NUM_EXAMPLES = 400
FRACTION = 0.05
STRATEGIES = ("less", "quality:score=loss,order=low", "random")


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A 400-example demo corpus indexed with adam gradients at two warmup checkpoints."""
    root = tmp_path_factory.mktemp("evaluate")
    corpus = generate_corpus(NUM_EXAMPLES, seed=0)
    corpus_file = write_jsonl(corpus, root / "corpus.jsonl")
    texts = [" ".join(m["content"] for m in r["messages"]) for r in corpus]
    tokenizer = build_tokenizer(texts + ["<|user|>\n<|assistant|>\n"] * 10, vocab_size=512)
    model = build_model("llama", tokenizer, root / "model", hidden=64, layers=2, heads=4, max_positions=128, seed=0)
    source = [CorpusSource.parse(str(corpus_file))]
    run = run_warmup(WarmupConfig(corpus=source, model=model, out=root / "warmup", fraction=0.25, epochs=2,
                                  learning_rate=2e-3, lora_r=8, lora_alpha=16, batch_size=8, max_length=64,
                                  device="cpu", progress=False), log=lambda *_: None)
    store = root / "store"
    IndexJob(IndexJobConfig(corpus=source, model=model, out=store, tokenizer=run.out,
                            checkpoints=read_run_manifest(run.out), gradient_type="adam",
                            projection=ProjectionSpec(dim=512, seed=0), max_length=64, device="cpu",
                            index="flat", progress=False), log=lambda *_: None).run()
    return {"corpus": corpus, "store": store, "targets": generate_targets(TARGET, 8, seed=1),
            "heldout": generate_heldout(TARGET, 12)}


@pytest.fixture(scope="module")
def result(pipeline) -> ComparisonResult:
    settings = FinetuneSettings(epochs=2, learning_rate=1e-2, lora_r=8, lora_alpha=16, lora_dropout=0.0, batch_size=8,
                                max_length=64)
    return compare(pipeline["store"], pipeline["targets"], pipeline["heldout"], fraction=FRACTION,
                   strategies=STRATEGIES, seeds=(0,),
                   include_full=False, settings=settings, max_new_tokens=6, family_field="dataset",
                   target_family=TARGET, device="cpu", progress=False, log=lambda *_: None)


def test_selection_precision_is_well_above_the_base_rate(result, pipeline):
    assert result.pool == NUM_EXAMPLES
    assert result.selected == math.ceil(FRACTION * NUM_EXAMPLES)
    assert result.base_rate == pytest.approx(family_share(pipeline["corpus"], "dataset", TARGET))
    assert 0.05 < result.base_rate < 0.15
    less = result.arms["less"]
    assert less.precision_mean >= 3 * result.base_rate
    by_id = {record["id"]: record for record in pipeline["corpus"]}
    for label in ("less", "quality:score=loss,order=low", "random"):
        ids = result.selected_ids[label][0]
        assert result.arms[label].precisions == [pytest.approx(
            sum(by_id[i]["dataset"] == TARGET for i in ids) / result.selected)]


def test_compare_returns_every_arm_well_formed(result, pipeline):
    assert list(result.arms) == ["base", "less", "quality:score=loss,order=low", "random"]  # no full arm asked for
    base = result.arms["base"]
    assert (base.examples, base.seeds, len(base.losses), base.precisions) == (0, [], 1, [])
    for name in STRATEGIES[:1] + ("quality:score=loss,order=low", "random"):
        arm = result.arms[name]
        assert arm.examples == result.selected and arm.seeds == [0] and arm.epochs == 2
        assert len(arm.losses) == len(arm.accuracies) == len(arm.train_seconds) == len(arm.precisions) == 1
        assert arm.loss_std == 0.0
    for arm in result.arms.values():
        assert all(math.isfinite(loss) and loss > 0 for loss in arm.losses)
        assert all(0.0 <= accuracy <= 1.0 for accuracy in arm.accuracies)
    assert result.heldout == len(pipeline["heldout"])
    # Training on anything in the chat format beats the untrained base model on its answers.
    assert result.arms["less"].loss_mean < base.loss_mean


def test_each_strategy_selects_as_the_engine_does(pipeline):
    from gradstore.selection import SelectionEngine

    store = Datastore.open(pipeline["store"])
    specs = [{"name": "quality", "score": "loss", "order": "low"}, {"name": "random"}, {"name": "random", "seed": 9}]
    chosen = select_with_strategies(store, specs, [], FRACTION, seeds=(0, 1))
    engine = SelectionEngine(store)
    lowest = engine.select(None, {"strategy": specs[0], "fraction": FRACTION}).rows.tolist()
    assert chosen["quality:score=loss,order=low"] == {0: lowest, 1: lowest}  # deterministic: one selection
    draws = chosen["random"]  # seeded by the fine-tuning seed
    assert draws[0] != draws[1]
    assert draws[1] == engine.select(None, {"strategy": {"name": "random", "seed": 1}, "fraction": FRACTION}).rows.tolist()
    assert chosen["random:seed=9"][0] == chosen["random:seed=9"][1]  # a seed given is kept


def test_selected_records_come_from_the_store_in_original_form(result, pipeline):
    pool = pool_records(pipeline["store"])
    assert pool == pipeline["corpus"]
    for by_seed in result.selected_ids.values():
        assert len(set(by_seed[0])) == result.selected


def test_table_and_json(result):
    table = format_table(result)
    for label in ("base model", "less", "quality:score=loss,order=low", "random", "precision", "base rate"):
        assert label in table
    assert "full corpus" not in table
    document = json.loads(to_json(result))
    assert document["arms"]["less"]["losses"] == result.arms["less"].losses
    assert document["arms"]["less"]["precisions"] == result.arms["less"].precisions
    assert document["fraction"] == FRACTION and document["base_rate"] == result.base_rate
    assert document["settings"]["epochs"] == 2


def test_cli_eval_prints_the_table_and_writes_json(pipeline, tmp_path, capsys):
    from gradstore.cli import main

    targets = write_jsonl(pipeline["targets"], tmp_path / "targets.jsonl")
    heldout = write_jsonl(pipeline["heldout"][:4], tmp_path / "heldout.jsonl")
    out = tmp_path / "eval.json"
    code = main(["eval", "--store", str(pipeline["store"]), "--targets", str(targets), "--heldout", str(heldout),
                 "--seeds", "1", "--no-full", "--strategies", "less,quality:grad_norm,random", "--epochs", "1", "--learning-rate", "1e-2", "--lora-r", "4",
                 "--lora-alpha", "8", "--max-new-tokens", "4", "--family-field", "dataset", "--json", str(out),
                 "--device", "cpu", "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "precision: share of a selection from dataset = unit_conversion" in printed
    assert "quality:score=vog" not in printed and "quality:score=grad_norm" in printed
    document = json.loads(out.read_text())
    assert document["target_family"] == TARGET  # taken from the targets' common family
    assert document["arms"]["random"]["seeds"] == [1] and "full" not in document["arms"]
    assert document["settings"]["lora_r"] == 4 and document["heldout"] == 4
