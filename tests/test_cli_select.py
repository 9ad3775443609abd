"""``gradstore select`` as a user runs it: real stores, real subprocesses, numpy as the reference."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from conftest import chat_records, decoded_features, write_jsonl
from gradstore.indexer.checkpoints import CheckpointSpec
from gradstore.indexer.corpus import CorpusSource
from gradstore.indexer.job import IndexJob, IndexJobConfig
from gradstore.indexer.model import LoraSpec
from gradstore.indexer.projection import ProjectionSpec

def build_store(out, model, corpus, checkpoints, gradient_type) -> Path:
    config = IndexJobConfig(corpus=[CorpusSource.parse(str(p)) for p in corpus], model=model, out=out,
                            checkpoints=checkpoints, gradient_type=gradient_type, lora=LoraSpec(r=4, alpha=8),
                            projection=ProjectionSpec(dim=256, seed=0), max_length=64, shard_size=16,
                            max_tokens_per_batch=256, device="cpu", progress=False)
    IndexJob(config, log=lambda *_: None).run()
    return out


@pytest.fixture(scope="module")
def stores(tmp_path_factory, tiny_model_dirs):
    from gradstore.indexer.warmup import WarmupConfig, run_warmup

    root = tmp_path_factory.mktemp("cli-select")
    alpaca = write_jsonl(root / "alpaca.jsonl", chat_records(26, seed=10, prefix="alpaca"))
    dolly = write_jsonl(root / "dolly.jsonl", chat_records(20, seed=11, prefix="dolly"))
    targets = write_jsonl(root / "targets.jsonl", chat_records(6, seed=12, prefix="t", subtasks=["x", "y", "z"]))
    model = tiny_model_dirs["gpt2"]
    run_warmup(WarmupConfig(corpus=[CorpusSource.parse(str(alpaca))], model=model, out=root / "run", fraction=0.5,
                            epochs=2, learning_rate=1e-3, lora_r=4, lora_alpha=8, batch_size=4, max_length=64,
                            progress=False), log=lambda *_: None)
    checkpoints = [CheckpointSpec.parse(str(root / "run" / n)) for n in ("epoch-1", "epoch-2")]
    return {"pool": build_store(root / "pool", model, [alpaca, dolly], checkpoints, "adam"),
            "target": build_store(root / "target", model, [targets], checkpoints, "sgd"),
            "targets": targets, "corpus": [alpaca, dolly]}


def gradstore(*args, check=True):
    result = subprocess.run([sys.executable, "-m", "gradstore.cli", *map(str, args)], capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"gradstore {' '.join(map(str, args))} failed:\n{result.stderr[-3000:]}")
    return result


def features(store: Path, checkpoint: str) -> np.ndarray:
    """float64 (N, k): the features' ``.npy`` files of the store's one segment, in shard order."""
    files = sorted((store / "segments" / "seg-000001" / "features" / checkpoint).glob("part-*.npy"))
    return np.concatenate([np.load(path) for path in files]).astype(np.float64)


def numpy_ranking(pool: Path, target: Path, aggregation: str) -> tuple[list[str], np.ndarray]:
    """Ids in LESS rank order and their scores, from the Parquet files and manifest alone."""
    manifest = json.loads((pool / "manifest.json").read_text())
    weights = {c["name"]: c["weight"] for c in manifest["checkpoints"]}
    scores = sum(w / sum(weights.values()) * features(pool, n) @ features(target, n).T for n, w in weights.items())
    examples = pq.read_table(pool / "segments" / "seg-000001" / "examples").to_pandas().sort_values("row")
    target_records = pq.read_table(target / "segments" / "seg-000001" / "examples").to_pandas().sort_values("row")["record"]
    labels = [json.loads(r)["subtask"] for r in target_records]
    means = np.stack([scores[:, [l == s for l in labels]].mean(1) for s in dict.fromkeys(labels)], axis=1)
    aggregated = {"less": means.max(1), "max": scores.max(1), "mean": scores.mean(1)}[aggregation]
    rows = examples["row"].to_numpy()
    order = np.lexsort((rows, -aggregated))
    return examples["id"].to_numpy()[order].tolist(), aggregated[order]


def test_select_json_equals_numpy_less_scores(stores):
    for aggregation in ("less", "max", "mean"):
        out = gradstore("select", stores["pool"], "--targets-store", stores["target"], "--subtask-field", "subtask",
                        "--k", 46, "--aggregation", aggregation, "--json")
        items = [json.loads(line) for line in out.stdout.splitlines()]
        ids, scores = numpy_ranking(stores["pool"], stores["target"], aggregation)
        assert [item["id"] for item in items] == ids
        np.testing.assert_allclose([item["score"] for item in items], scores, atol=1e-5)
        assert [item["rank"] for item in items] == list(range(1, 47))
        assert set(items[0]["subtask_scores"]) == {"x", "y", "z"}
        label = "less" if aggregation == "less" else f"less:aggregation={aggregation}"
        assert f"selected 46 of 46 examples (strategy {label}; 6 targets, 3 subtasks" in out.stderr


def test_select_table_with_filters_export_and_scores(stores, tmp_path):
    out = gradstore("select", stores["pool"], "--targets-store", stores["target"], "--fraction", "0.2",
                    "--sources", "dolly", "--checkpoints", "epoch-2", "--weights", "epoch-2=2",
                    "--export", tmp_path / "selected.jsonl", "--scores", tmp_path / "scores.parquet")
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["rank", "score", "id", "source"]
    table = [line.split() for line in lines[1:]]
    assert len(table) == 4  # ceil(0.2 x 20)
    assert [row[0] for row in table] == ["1", "2", "3", "4"] and {row[3] for row in table} == {"dolly"}
    corpus = {json.loads(line)["id"]: line for p in stores["corpus"] for line in p.read_text().splitlines()}
    assert (tmp_path / "selected.jsonl").read_text().splitlines() == [corpus[row[2]] for row in table]
    scores = pd.read_parquet(tmp_path / "scores.parquet")
    assert len(scores) == 20 and scores["score"].is_monotonic_decreasing
    assert scores["id"].tolist()[:4] == [row[2] for row in table]
    assert "checkpoints epoch-2=1" in out.stderr
    capped = gradstore("select", stores["pool"], "--targets-store", stores["target"], "--k", "10",
                       "--per-source-cap", "2", "--dedup-threshold", "0.9", "--json",
                       "--export", tmp_path / "selected.parquet")
    items = [json.loads(line) for line in capped.stdout.splitlines()]
    assert len(items) == 4 and sorted(i["source"] for i in items) == ["alpaca", "alpaca", "dolly", "dolly"]
    assert pd.read_parquet(tmp_path / "selected.parquet")["id"].tolist() == [i["id"] for i in items]


def test_select_with_target_records_matches_the_target_store(stores):
    from_store = gradstore("select", stores["pool"], "--targets-store", stores["target"], "--subtask-field", "subtask",
                           "--k", 15, "--json")
    from_records = gradstore("select", stores["pool"], "--targets", stores["targets"], "--subtask-field", "subtask",
                             "--k", 15, "--json", "--device", "cpu")
    a = [json.loads(line) for line in from_store.stdout.splitlines()]
    b = [json.loads(line) for line in from_records.stdout.splitlines()]
    assert [i["id"] for i in a] == [i["id"] for i in b]
    np.testing.assert_allclose([i["score"] for i in a], [i["score"] for i in b], atol=1e-4)


@pytest.mark.parametrize("args, code, message", [
    (["--k", "3", "--checkpoints", "epoch-7"], 1, "error: unknown checkpoint 'epoch-7': the datastore has "
                                                  "['epoch-1', 'epoch-2']"),
    (["--k", "3", "--sources", "flan"], 1, "error: unknown source 'flan': the datastore has ['alpaca', 'dolly']"),
    (["--k", "3", "--subtask-field", "category"], 1, "has no field 'category'"),
    (["--k", "3", "--dedup-threshold", "2"], 1, "error: dedup_threshold: Input should be less than or equal to 1"),
    (["--k", "0"], 1, "error: k: Input should be greater than or equal to 1"),
    (["--k", "3", "--score", "vog"], 2, "--score is not an option of strategy 'less' (its options: --aggregation, "
                                        "--checkpoints, --weights, --precision)"),
    (["--k", "3", "--strategy", "random"], 2, "strategy 'random' does not use targets"),
    (["--k", "3", "--strategy", "rds", "--seed", "3"], 2, "--seed is not an option of strategy 'rds'"),
    (["--k", "3", "--filter", "loss:over:0.5"], 2, "expected SCORE:above|below:Q[:CHECKPOINT]"),
    (["--k", "3", "--fraction", "0.1"], 2, "not allowed with argument"),
    ([], 2, "one of the arguments --k --fraction is required"),
    (["--k", "3", "--weights", "epoch-1:1"], 2, "expected NAME=WEIGHT pairs"),
])
def test_select_errors_are_one_line(stores, args, code, message):
    result = gradstore("select", stores["pool"], "--targets-store", stores["target"], *args, check=False)
    assert result.returncode == code, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    if code == 1:
        assert len(result.stderr.strip().splitlines()) == 1


def test_select_needs_targets_and_explains_its_options():
    missing = gradstore("select", "somewhere", "--k", "3", check=False)
    assert missing.returncode == 2 and "strategy 'less' needs targets" in missing.stderr
    help_text = gradstore("select", "--help").stdout
    for option in ("--targets-store", "--targets", "--k", "--fraction", "--aggregation", "--subtask-field",
                   "--sources", "--per-source-cap", "--dedup-threshold", "--checkpoints", "--weights",
                   "--export", "--scores", "--json", "--strategy", "--filter", "--score", "--order", "--seed"):
        assert option in help_text
    from gradstore.selection.strategies import registry

    flowing = "".join(help_text.split())  # argparse wraps lines, at spaces and hyphens
    for name, cls in registry().items():  # every strategy and its summary, from the registry
        assert "".join(f"{name}: {cls.summary}".split()) in flowing


def test_select_target_free_strategies_and_filters(stores, tmp_path):
    quality = gradstore("select", stores["pool"], "--strategy", "quality", "--score", "loss", "--order", "low",
                        "--k", 5, "--json")
    examples = pq.read_table(stores["pool"] / "segments" / "seg-000001" / "examples").to_pandas().set_index("row")
    loss = np.zeros(len(examples))
    manifest = json.loads((stores["pool"] / "manifest.json").read_text())
    for checkpoint in manifest["checkpoints"]:
        table = pq.read_table(stores["pool"] / "segments" / "seg-000001" / "scores" / checkpoint["name"],
                              columns=["row", "loss"])
        loss[table.column("row").to_numpy()] += checkpoint["weight"] * table.column("loss").to_numpy()
    expected = np.argsort(loss, kind="stable")[:5]
    assert [json.loads(line)["id"] for line in quality.stdout.splitlines()] == examples.loc[expected, "id"].tolist()
    assert "strategy quality:score=loss,order=low" in quality.stderr
    drawn = gradstore("select", stores["pool"], "--strategy", "random", "--seed", 5, "--fraction", 1.0,
                      "--filter", "loss:below:0.5", "--json")
    rows = sorted(json.loads(line)["row"] for line in drawn.stdout.splitlines())
    kept = loss.astype(np.float32)
    assert rows == np.flatnonzero(kept <= np.quantile(kept, 0.5)).tolist()
    assert "filter loss below q0.5" in drawn.stderr


def stored_representations(store: Path) -> np.ndarray:
    files = sorted((store / "segments" / "seg-000001" / "representations").glob("part-*.npy"))
    return np.concatenate([np.load(path) for path in files]).astype(np.float64)


def test_select_rds_equals_numpy_cosines_of_the_stored_representations(stores):
    out = gradstore("select", stores["pool"], "--strategy", "rds", "--aggregation", "max",
                    "--targets-store", stores["target"], "--k", 10, "--json")
    cosines = stored_representations(stores["pool"]) @ stored_representations(stores["target"]).T
    best = cosines.max(axis=1)
    items = [json.loads(line) for line in out.stdout.splitlines()]
    expected = np.lexsort((np.arange(len(best)), -best))[:10]
    assert [item["row"] for item in items] == expected.tolist()
    np.testing.assert_allclose([item["score"] for item in items], best[expected], atol=2e-3)
    assert "strategy rds:aggregation=max" in out.stderr


def test_select_at_int8_scans_the_quantised_copy_that_quantize_added(stores, tmp_path):
    pool = tmp_path / "pool"
    shutil.copytree(stores["pool"], pool)
    args = ["select", pool, "--targets-store", stores["target"], "--subtask-field", "subtask", "--k", 46,
            "--aggregation", "max", "--precision", "int8", "--json"]
    refused = gradstore(*args, check=False)
    assert refused.returncode != 0
    assert f"no int8 copy of the features to scan (the store has none); add one with `gradstore quantize {pool} " \
           f"--kind int8`" in refused.stderr
    gradstore("quantize", pool, "--kind", "int8")
    out = gradstore(*args)
    items = [json.loads(line) for line in out.stdout.splitlines()]
    manifest = json.loads((pool / "manifest.json").read_text())
    weights = {c["name"]: c["weight"] for c in manifest["checkpoints"]}
    expected = sum(w / sum(weights.values()) * decoded_features(pool, "int8", c) @ features(stores["target"], c).T
                   for c, w in weights.items()).max(axis=1)
    np.testing.assert_allclose(sorted((item["score"] for item in items), reverse=True), np.sort(expected)[::-1],
                               atol=1e-5)
    assert [item["row"] for item in items] == np.lexsort((np.arange(46), -expected)).tolist()
    assert "strategy less:aggregation=max,precision=int8" in out.stderr
