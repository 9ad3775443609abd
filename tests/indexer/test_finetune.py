"""Fine-tuning a fresh LoRA and evaluating held-out loss and greedy exact-match accuracy."""

from __future__ import annotations

import pytest
import torch

from gradstore.indexer.corpus import Record
from gradstore.indexer.errors import BadRecordError, JobError
from gradstore.indexer.finetune import EvalResult, FinetuneSettings, evaluate, finetune_lora, to_records
from gradstore.indexer.formatting import Formatter
from gradstore.indexer.model import load_base_model, load_tokenizer

NAMES = ["cat", "tac", "paris", "france", "word", "capital", "reverse", "meters"]
SETTINGS = dict(epochs=4, learning_rate=1e-2, lora_r=8, lora_alpha=16, lora_dropout=0.0, lora_targets="all-linear",
                batch_size=8, max_length=48, device="cpu", progress=False)


def chat(record_id: str, question: str, answer: str, with_answer: bool = False) -> dict:
    record = {"id": record_id, "dataset": "toy",
              "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
    if with_answer:
        record["answer"] = answer
    return record


def questions(prefix: str, start: int, count: int) -> list[str]:
    """Distinct short questions in the tiny tokenizer's words."""
    return [f"{prefix} {NAMES[i % len(NAMES)]} {NAMES[(i // len(NAMES)) % len(NAMES)]} {i}"
            for i in range(start, start + count)]


@pytest.fixture(scope="module")
def model_dir(tiny_model_dirs):
    return tiny_model_dirs["llama"]


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return load_tokenizer(model_dir)


@pytest.fixture(scope="module")
def fours(model_dir):
    """A LoRA fine-tuned on one family whose answer is always "4"."""
    train = [chat(f"train-{i}", q, "4") for i, q in enumerate(questions("add", 0, 48))]
    return finetune_lora(train, model_dir, seed=0, **SETTINGS)


@pytest.fixture(scope="module")
def heldout():
    """Held-out questions never trained on: five answered "4", three answered "5"."""
    fours = [chat(f"four-{i}", q, "4", with_answer=True) for i, q in enumerate(questions("add", 100, 5))]
    fives = [chat(f"five-{i}", q, "5", with_answer=True) for i, q in enumerate(questions("add", 200, 3))]
    return fours, fives


def test_prompt_text_is_the_rendering_up_to_the_assistant_header(tokenizer):
    formatter = Formatter(tokenizer, 64, "default")
    record = to_records([chat("x", "add cat", "4")])[0]
    prompt = formatter.prompt_text(record)
    assert prompt == f"{tokenizer.bos_token}<|user|>\nadd cat\n<|assistant|>\n"
    # The prompt's tokens are exactly the record's tokens before its first label.
    encoded = formatter.encode(record)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    first_label = int((encoded.labels != -100).argmax())
    assert list(encoded.input_ids[:first_label]) == ids
    completion = Record("y", "s", "y", {"prompt": "Q: add", "completion": " 4"}, "prompt_completion")
    assert formatter.prompt_text(completion) == f"{tokenizer.bos_token}Q: add"
    with pytest.raises(BadRecordError, match="no prompt"):
        formatter.prompt_text(Record("z", "s", "z", {"text": "plain"}, "text"))


def test_finetuning_lowers_the_heldout_loss_of_the_trained_family(fours, heldout, model_dir, tokenizer):
    records = heldout[0]
    base = load_base_model(model_dir, "fp32", torch.device("cpu"))
    before = evaluate(base, tokenizer, records, max_length=48, max_new_tokens=4)
    after = evaluate(fours, tokenizer, records, max_length=48, max_new_tokens=4)
    assert isinstance(after, EvalResult) and after.n == len(records)
    assert after.loss < 0.8 * before.loss
    assert after.loss == pytest.approx(sum(after.losses) / len(after.losses))


def test_accuracy_is_exact_match_of_the_greedy_answer(fours, heldout, tokenizer):
    four, five = heldout
    assert evaluate(fours, tokenizer, four, max_length=48, max_new_tokens=4).accuracy == 1.0
    assert evaluate(fours, tokenizer, five, max_length=48, max_new_tokens=4).accuracy == 0.0
    mixed = evaluate(fours, tokenizer, four + five, max_length=48, max_new_tokens=4, batch_size=3)
    assert mixed.predictions == ["4"] * len(four + five)
    assert mixed.accuracy == pytest.approx(len(four) / len(four + five))


def test_batching_and_left_padding_do_not_change_the_results(fours, heldout, tokenizer):
    records = heldout[0] + heldout[1]
    whole = evaluate(fours, tokenizer, records, max_length=48, max_new_tokens=4, batch_size=len(records))
    single = evaluate(fours, tokenizer, records, max_length=48, max_new_tokens=4, batch_size=1)
    assert whole.predictions == single.predictions
    assert whole.losses == pytest.approx(single.losses, rel=1e-4)
    assert tokenizer.padding_side == "right"  # restored after generation


def test_same_seed_same_weights_and_invalid_settings(model_dir):
    train = [chat(f"t-{i}", q, "4") for i, q in enumerate(questions("add", 0, 8))]
    quick = {**SETTINGS, "epochs": 1}
    first, second = (finetune_lora(train, model_dir, seed=3, **quick) for _ in range(2))
    for (name, a), (_, b) in zip(first.named_parameters(), second.named_parameters()):
        if "lora_" in name:
            assert torch.equal(a, b), name
    with pytest.raises(JobError, match="learning_rate"):
        finetune_lora(train, model_dir, **{**quick, "learning_rate": 0.0})
    with pytest.raises(JobError, match="no records"):
        finetune_lora([], model_dir, **quick)
    with pytest.raises(JobError, match="epochs"):
        FinetuneSettings(epochs=0).validate()
