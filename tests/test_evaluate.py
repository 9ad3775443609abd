"""The demo pipeline in small: generated corpus -> warmup -> adam index -> LESS selection -> compare."""

from __future__ import annotations

import json
import math

import pytest

from gradstore.evaluate import ARMS, ComparisonResult, compare, family_share, format_table, pool_records, to_json
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
    return compare(pipeline["store"], pipeline["targets"], pipeline["heldout"], fraction=FRACTION, seeds=(0,),
                   include_full=False, settings=settings, max_new_tokens=6, family_field="dataset",
                   target_family=TARGET, device="cpu", progress=False, log=lambda *_: None)


def test_selection_precision_is_well_above_the_base_rate(result, pipeline):
    assert result.pool == NUM_EXAMPLES
    assert result.selected == math.ceil(FRACTION * NUM_EXAMPLES)
    assert result.base_rate == pytest.approx(family_share(pipeline["corpus"], "dataset", TARGET))
    assert 0.05 < result.base_rate < 0.15
    assert result.precision >= 3 * result.base_rate
    by_id = {record["id"]: record for record in pipeline["corpus"]}
    assert result.precision == pytest.approx(
        sum(by_id[i]["dataset"] == TARGET for i in result.selected_ids) / result.selected)


def test_compare_returns_every_arm_well_formed(result, pipeline):
    assert list(result.arms) == ["base", "less", "random"]  # no full arm asked for
    assert set(result.arms) <= set(ARMS)
    base, less, rand = (result.arms[name] for name in ("base", "less", "random"))
    assert (base.examples, base.seeds, len(base.losses)) == (0, [], 1)
    for arm in (less, rand):
        assert arm.examples == result.selected and arm.seeds == [0] and arm.epochs == 2
        assert len(arm.losses) == len(arm.accuracies) == len(arm.train_seconds) == 1
        assert arm.loss_std == 0.0
    for arm in result.arms.values():
        assert all(math.isfinite(loss) and loss > 0 for loss in arm.losses)
        assert all(0.0 <= accuracy <= 1.0 for accuracy in arm.accuracies)
    assert result.heldout == len(pipeline["heldout"])
    assert len(result.random_precision) == 1 and 0.0 <= result.random_precision[0] <= 1.0
    # Training on anything in the chat format beats the untrained base model on its answers.
    assert less.loss_mean < base.loss_mean


def test_selected_records_come_from_the_store_in_original_form(result, pipeline):
    pool = pool_records(pipeline["store"])
    assert pool == pipeline["corpus"]
    assert len(set(result.selected_ids)) == result.selected


def test_table_and_json(result):
    table = format_table(result)
    for label in ("base model", "LESS 5%", "random 5%", "selection precision", "base rate"):
        assert label in table
    assert "full corpus" not in table
    document = json.loads(to_json(result))
    assert document["arms"]["less"]["losses"] == result.arms["less"].losses
    assert document["precision"] == result.precision and document["fraction"] == FRACTION
    assert document["settings"]["epochs"] == 2


def test_cli_eval_prints_the_table_and_writes_json(pipeline, tmp_path, capsys):
    from gradstore.cli import main

    targets = write_jsonl(pipeline["targets"], tmp_path / "targets.jsonl")
    heldout = write_jsonl(pipeline["heldout"][:4], tmp_path / "heldout.jsonl")
    out = tmp_path / "eval.json"
    code = main(["eval", "--store", str(pipeline["store"]), "--targets", str(targets), "--heldout", str(heldout),
                 "--seeds", "1", "--no-full", "--epochs", "1", "--learning-rate", "1e-2", "--lora-r", "4",
                 "--lora-alpha", "8", "--max-new-tokens", "4", "--family-field", "dataset", "--json", str(out),
                 "--device", "cpu", "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "LESS 5%" in printed and "selection precision (dataset = unit_conversion)" in printed
    document = json.loads(out.read_text())
    assert document["target_family"] == TARGET  # taken from the targets' common family
    assert document["arms"]["random"]["seeds"] == [1] and "full" not in document["arms"]
    assert document["settings"]["lora_r"] == 4 and document["heldout"] == 4
