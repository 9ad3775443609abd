"""Warmup training on a real tiny model: checkpoints, learning rates, optimizer state, determinism."""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gradstore.indexer.checkpoints import CheckpointSpec, recorded_learning_rate
from gradstore.indexer.corpus import CorpusSource
from gradstore.indexer.errors import CheckpointError, JobError
from gradstore.indexer.model import LoraSpec, attach_lora, load_base_model
from gradstore.indexer.optimizer_state import canonical_param_name, find_optimizer_file, load_optimizer_state
from gradstore.indexer.tiny import build_model, build_tokenizer
from gradstore.indexer.warmup import RUN_MANIFEST, WarmupConfig, read_run_manifest, run_warmup

NUM_RECORDS = 60
FRACTION = 0.5
EPOCHS = 2
BATCH_SIZE = 4
LEARNING_RATE = 1e-3
CHECKPOINT_FILES = ("adapter_config.json", "adapter_model.safetensors", "optimizer.pt",
                    "gradstore_checkpoint.json")

ANIMALS = ["cat", "dog", "owl", "fox", "bee", "cow"]
COLOURS = ["red", "blue", "green", "gold"]


def chat_records(n: int) -> list[dict]:
    """Short, regular question/answer pairs a tiny model picks up within a few steps."""
    records = []
    for i in range(n):
        animal, colour = ANIMALS[i % len(ANIMALS)], COLOURS[i % len(COLOURS)]
        records.append({
            "id": f"rec-{i:03d}",
            "dataset": "toy",
            "messages": [
                {"role": "user", "content": f"what colour is the {animal} number {i}?"},
                {"role": "assistant", "content": f"the {animal} is {colour}."},
            ],
        })
    return records


def linear_schedule(total_steps: int, warmup_steps: int, peak: float) -> list[float]:
    """The learning rate of every step: linear warmup from 0, then linear decay to 0."""
    rates = []
    for step in range(total_steps):
        if step < warmup_steps:
            factor = step / max(1, warmup_steps)
        else:
            factor = max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
        rates.append(peak * factor)
    return rates


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny Llama model with its tokenizer, and a 60-record chat corpus."""
    root = tmp_path_factory.mktemp("warmup-setup")
    records = chat_records(NUM_RECORDS)
    texts = [m["content"] for r in records for m in r["messages"]] + ["<|user|>\n<|assistant|>\n"] * 10
    tokenizer = build_tokenizer(texts, vocab_size=320)
    model_dir = build_model("llama", tokenizer, root / "llama", seed=1)
    corpus = root / "chat.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in records))
    return {"model": model_dir, "corpus": corpus, "root": root}


def make_config(setup, out: Path, **overrides) -> WarmupConfig:
    settings = dict(corpus=[CorpusSource(setup["corpus"])], model=setup["model"], out=out, fraction=FRACTION,
                    epochs=EPOCHS, learning_rate=LEARNING_RATE, lora_r=4, lora_alpha=8, batch_size=BATCH_SIZE,
                    max_length=64, device="cpu", progress=False)
    settings.update(overrides)
    return WarmupConfig(**settings)


@pytest.fixture(scope="module")
def run(setup):
    out = setup["root"] / "runs" / "main"
    messages = []
    result = run_warmup(make_config(setup, out), log=messages.append)
    return result, messages


def test_writes_one_complete_checkpoint_per_epoch(run):
    result, messages = run
    assert result.checkpoints == [result.out / "epoch-1", result.out / "epoch-2"]
    for checkpoint in result.checkpoints:
        for name in CHECKPOINT_FILES:
            assert (checkpoint / name).is_file(), checkpoint / name
    assert (result.out / RUN_MANIFEST).is_file()
    assert (result.out / "tokenizer.json").is_file()
    # Nothing is left beside the run: the temporary folder was renamed into place.
    assert [p.name for p in result.out.parent.iterdir()] == ["main"]
    assert any("epoch 2/2" in line for line in messages)


def test_average_learning_rates_follow_the_linear_schedule(run):
    result, _ = run
    num_examples = int(NUM_RECORDS * FRACTION)
    assert result.num_examples == num_examples
    steps_per_epoch = math.ceil(num_examples / BATCH_SIZE)
    total = steps_per_epoch * EPOCHS
    rates = linear_schedule(total, math.ceil(0.03 * total), LEARNING_RATE)
    expected = [sum(rates[e * steps_per_epoch:(e + 1) * steps_per_epoch]) / steps_per_epoch for e in range(EPOCHS)]
    assert result.average_learning_rates == pytest.approx(expected, rel=1e-9)
    assert expected[0] > expected[1]  # the decay is visible in the weights
    for checkpoint, average, epoch in zip(result.checkpoints, expected, range(1, EPOCHS + 1)):
        info = json.loads((checkpoint / "gradstore_checkpoint.json").read_text())
        assert info["epoch"] == epoch
        assert info["global_step"] == epoch * steps_per_epoch
        assert info["average_learning_rate"] == pytest.approx(average, rel=1e-9)
        assert recorded_learning_rate(checkpoint) == pytest.approx(average, rel=1e-9)


def test_training_loss_decreases(run):
    result, _ = run
    assert len(result.losses) == EPOCHS
    assert all(math.isfinite(loss) for loss in result.losses)
    assert result.losses[1] < result.losses[0]
    infos = [json.loads((c / "gradstore_checkpoint.json").read_text()) for c in result.checkpoints]
    assert [i["train_loss"] for i in infos] == pytest.approx(result.losses)


def test_optimizer_state_reads_back_with_the_step_count(run, setup):
    result, _ = run
    steps_per_epoch = math.ceil(result.num_examples / BATCH_SIZE)
    base = load_base_model(setup["model"], "fp32", torch.device("cpu"))
    model = attach_lora(base, [CheckpointSpec.parse(str(result.checkpoints[0]))], LoraSpec())
    shapes = OrderedDict((canonical_param_name(n), p.shape) for n, p in model.named_parameters() if p.requires_grad)
    assert shapes and all("lora_" in name for name in shapes)
    for epoch, checkpoint in enumerate(result.checkpoints, start=1):
        states = load_optimizer_state(checkpoint / "optimizer.pt", shapes)
        assert set(states) == set(shapes)
        for state in states.values():
            assert state.step == epoch * steps_per_epoch
            assert (state.beta1, state.beta2, state.eps) == (0.9, 0.999, 1e-8)
            assert bool((state.exp_avg_sq > 0).any())
    # The adapter was trained: B is no longer zero, and the two epochs differ.
    first, second = (load_file(str(c / "adapter_model.safetensors")) for c in result.checkpoints)
    assert any("lora_B" in key and bool(value.abs().sum() > 0) for key, value in first.items())
    assert any(not torch.equal(first[key], second[key]) for key in first)


def test_name_keyed_optimizer_bin_holds_the_same_state(run, setup):
    result, _ = run
    named = run_warmup(make_config(setup, setup["root"] / "runs" / "bin", optimizer_format="bin"),
                       log=lambda *_: None)
    base = load_base_model(setup["model"], "fp32", torch.device("cpu"))
    model = attach_lora(base, [CheckpointSpec.parse(str(named.checkpoints[0]))], LoraSpec())
    shapes = OrderedDict((canonical_param_name(n), p.shape) for n, p in model.named_parameters() if p.requires_grad)
    for pt_checkpoint, bin_checkpoint in zip(result.checkpoints, named.checkpoints, strict=True):
        found = find_optimizer_file(bin_checkpoint)
        assert found == bin_checkpoint / "optimizer.bin" and not (bin_checkpoint / "optimizer.pt").exists()
        saved = torch.load(found, weights_only=True)
        assert all(isinstance(key, str) and ".lora_" in key for key in saved["state"])
        assert all(isinstance(name, str) for name in saved["param_groups"][0]["params"])
        # The same seeded run: the name-keyed file holds exactly the integer-keyed file's moments.
        from_bin = load_optimizer_state(found, shapes)
        from_pt = load_optimizer_state(pt_checkpoint / "optimizer.pt", shapes)
        assert from_bin.keys() == from_pt.keys() == shapes.keys()
        for name, state in from_bin.items():
            other = from_pt[name]
            assert (state.step, state.beta1, state.beta2, state.eps) == (other.step, other.beta1, other.beta2, other.eps)
            assert torch.equal(state.exp_avg, other.exp_avg) and torch.equal(state.exp_avg_sq, other.exp_avg_sq)


def test_run_manifest_lists_checkpoints_in_epoch_order(run):
    result, _ = run
    specs = read_run_manifest(result.out)
    assert [s.name for s in specs] == ["epoch-1", "epoch-2"]
    assert [s.path for s in specs] == result.checkpoints
    assert all(s.weight is None for s in specs)
    manifest = json.loads((result.out / RUN_MANIFEST).read_text())
    assert manifest["format"] == "gradstore-warmup-run" and manifest["version"] == 1
    assert manifest["average_learning_rates"] == result.average_learning_rates
    assert manifest["num_examples"] == result.num_examples == len(manifest["example_ids"])
    assert len(set(manifest["example_ids"])) == result.num_examples
    assert set(manifest["example_ids"]) <= {f"rec-{i:03d}" for i in range(NUM_RECORDS)}
    assert manifest["config"]["lora_r"] == 4 and manifest["config"]["fraction"] == FRACTION


def test_read_run_manifest_rejects_a_folder_without_one(tmp_path):
    with pytest.raises(CheckpointError, match=RUN_MANIFEST):
        read_run_manifest(tmp_path)


def test_existing_out_is_refused_without_overwrite(run, setup):
    result, _ = run
    with pytest.raises(JobError, match="already exists"):
        run_warmup(make_config(setup, result.out), log=lambda *_: None)
    assert read_run_manifest(result.out)  # untouched


def test_same_seed_gives_identical_adapters_and_overwrite_replaces(setup):
    root = setup["root"] / "seeded"
    tiny = dict(fraction=0.2, epochs=1)
    first = run_warmup(make_config(setup, root / "a", **tiny), log=lambda *_: None)
    second = run_warmup(make_config(setup, root / "b", **tiny), log=lambda *_: None)
    weights_a = load_file(str(first.checkpoints[0] / "adapter_model.safetensors"))
    weights_b = load_file(str(second.checkpoints[0] / "adapter_model.safetensors"))
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    assert first.losses == second.losses
    # A different seed samples and trains differently; overwrite replaces the old run in place.
    third = run_warmup(make_config(setup, root / "a", seed=1, overwrite=True, **tiny), log=lambda *_: None)
    weights_c = load_file(str(third.checkpoints[0] / "adapter_model.safetensors"))
    assert any(not torch.equal(weights_a[k], weights_c[k]) for k in weights_a)
    assert json.loads((root / "a" / RUN_MANIFEST).read_text())["config"]["seed"] == 1
    assert sorted(p.name for p in root.iterdir()) == ["a", "b"]


@pytest.mark.parametrize("overrides, message", [
    ({"fraction": 0.0}, "fraction"),
    ({"fraction": 1.5}, "fraction"),
    ({"epochs": 0}, "epochs"),
    ({"learning_rate": -1.0}, "learning_rate"),
    ({"warmup_ratio": 1.0}, "warmup_ratio"),
    ({"batch_size": 0}, "batch_size"),
    ({"lora_r": 0}, "lora_r"),
    ({"lora_dropout": 1.0}, "lora_dropout"),
    ({"betas": (0.9, 1.0)}, "beta2"),
    ({"template": "chatml"}, "template"),
    ({"dtype": "int8"}, "dtype"),
    ({"optimizer_format": "safetensors"}, "optimizer_format"),
    ({"corpus": []}, "corpus"),
])
def test_invalid_settings_raise_job_error(setup, tmp_path, overrides, message):
    with pytest.raises(JobError, match=message):
        run_warmup(make_config(setup, tmp_path / "out", **overrides), log=lambda *_: None)
    assert not (tmp_path / "out").exists()
