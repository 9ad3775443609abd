"""Tests of gradstore.indexer.formatting: rendered texts, loss masks, truncation, templates."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gradstore.indexer.corpus import Record, validate_record
from gradstore.indexer.errors import BadRecordError, ModelError
from gradstore.indexer.formatting import DEFAULT_TEMPLATE_NAME, Formatter
from gradstore.indexer.tiny import build_tokenizer

TRAINING_TEXTS = [
    "You are a helpful assistant. Answer briefly and politely.",
    "What is the capital of France? The capital of France is Paris.",
    "Name a prime number. Seven is a prime number, and so is eleven.",
    "Translate to French: good morning. Bonjour, café, élève, 日本語.",
    "Question: what is two plus two? Answer: four.",
    "<|system|> <|user|> <|assistant|> ### user: ### assistant:",
] * 4

MULTI_TURN = {
    "id": "multi",
    "dataset": "tulu",
    "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."},
        {"role": "user", "content": "Name a prime number."},
        {"role": "assistant", "content": "Seven is a prime number, café 日本."},
    ],
}

# A tulu-like template with its own markers, so a test can tell which format was used. Like the
# tulu template, the last assistant turn ends at its EOS and earlier ones add a newline.
TULU_LIKE_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '### ' + message['role'] + ':\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token }}{% if not loop.last %}{{ '\\n' }}{% endif %}"
    "{% else %}{{ message['content'] + '\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### assistant:\\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(TRAINING_TEXTS)


@pytest.fixture
def templated_tokenizer():
    """A fresh tokenizer (the chat template is mutable state) with TULU_LIKE_TEMPLATE."""
    tokenizer = build_tokenizer(TRAINING_TEXTS)
    tokenizer.chat_template = TULU_LIKE_TEMPLATE
    return tokenizer


def make_record(record: dict, location: str = "corpus.jsonl:1") -> Record:
    return Record(str(record.get("id", "r")), "corpus", location, record,
                  validate_record(record, location))


def label_runs(encoded, tokenizer) -> list[str]:
    """The text of each maximal run of consecutive label tokens."""
    runs, current = [], []
    for token, label in zip(encoded.input_ids.tolist(), encoded.labels.tolist()):
        if label != -100:
            assert label == token  # a label is always the token at its position
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run, skip_special_tokens=False) for run in runs]


def decode(ids: np.ndarray, tokenizer) -> str:
    return tokenizer.decode(ids.tolist(), skip_special_tokens=False)


def assistant_contents(record: dict) -> list[str]:
    return [m["content"] for m in record["messages"] if m["role"] == "assistant"]


# --------------------------------------------------------------------------------------------
# Default chat format


def test_default_format_text_and_assistant_only_mask(tokenizer):
    formatter = Formatter(tokenizer, max_length=512)
    assert formatter.template_name == DEFAULT_TEMPLATE_NAME
    encoded = formatter.encode(make_record(MULTI_TURN))

    eos = tokenizer.eos_token
    expected_text = tokenizer.bos_token + "".join(
        f"<|{m['role']}|>\n" + m["content"] + (eos if m["role"] == "assistant" else "") + "\n"
        for m in MULTI_TURN["messages"]
    )
    assert decode(encoded.input_ids, tokenizer) == expected_text
    assert label_runs(encoded, tokenizer) == [c + eos for c in assistant_contents(MULTI_TURN)]

    assert encoded.input_ids.dtype == np.int32 and encoded.labels.dtype == np.int32
    assert encoded.input_ids.shape == encoded.labels.shape == (encoded.num_tokens,)
    assert encoded.truncated is False
    assert encoded.num_tokens < 512
    labelled_tokens = sum(len(tokenizer(run, add_special_tokens=False)["input_ids"])
                          for run in label_runs(encoded, tokenizer))
    assert encoded.num_label_tokens == labelled_tokens


def test_default_format_is_used_when_forced_despite_a_chat_template(templated_tokenizer):
    formatter = Formatter(templated_tokenizer, max_length=512, template="default")
    assert formatter.template_name == DEFAULT_TEMPLATE_NAME
    text = decode(formatter.encode(make_record(MULTI_TURN)).input_ids, templated_tokenizer)
    assert "<|assistant|>\n" in text and "### assistant:" not in text


# --------------------------------------------------------------------------------------------
# Other shapes


def test_prompt_completion_mask_covers_completion_and_eos(tokenizer):
    record = {"id": "pc", "prompt": "Question: what is two plus two?\nAnswer:", "completion": " four."}
    encoded = Formatter(tokenizer, max_length=128).encode(make_record(record))
    eos = tokenizer.eos_token
    expected_text = tokenizer.bos_token + record["prompt"] + record["completion"] + eos
    assert decode(encoded.input_ids, tokenizer) == expected_text
    assert label_runs(encoded, tokenizer) == [record["completion"] + eos]


def test_text_has_loss_on_every_token(tokenizer):
    record = {"id": "t", "text": "Seven is a prime number, and so is eleven."}
    encoded = Formatter(tokenizer, max_length=128).encode(make_record(record))
    assert decode(encoded.input_ids, tokenizer) == tokenizer.bos_token + record["text"] + tokenizer.eos_token
    np.testing.assert_array_equal(encoded.labels, encoded.input_ids)
    # The first position is never predicted after the causal shift.
    assert encoded.num_label_tokens == encoded.num_tokens - 1


# --------------------------------------------------------------------------------------------
# Truncation


def test_truncation_flag_and_right_cut(tokenizer):
    record = make_record(MULTI_TURN)
    full = Formatter(tokenizer, max_length=10_000).encode(record)

    exact = Formatter(tokenizer, max_length=full.num_tokens).encode(record)
    assert exact.truncated is False
    np.testing.assert_array_equal(exact.input_ids, full.input_ids)

    cut_at = full.num_tokens - 3
    cut = Formatter(tokenizer, max_length=cut_at).encode(record)
    assert cut.truncated is True
    assert cut.num_tokens == cut_at
    np.testing.assert_array_equal(cut.input_ids, full.input_ids[:cut_at])
    np.testing.assert_array_equal(cut.labels, full.labels[:cut_at])
    assert 0 < cut.num_label_tokens < full.num_label_tokens


def test_nothing_left_to_train_on_after_truncation(tokenizer):
    record = make_record({"id": "long", "messages": [
        {"role": "user", "content": "What is the capital of France? " * 10},
        {"role": "assistant", "content": "Paris."},
    ]}, location="corpus.jsonl:12")
    full = Formatter(tokenizer, max_length=10_000).encode(record)
    first_label = int(np.flatnonzero(full.labels != -100)[0])

    # Cut just before the answer: no label is left.
    with pytest.raises(BadRecordError) as info:
        Formatter(tokenizer, max_length=first_label).encode(record)
    assert info.value.location == "corpus.jsonl:12"
    assert "nothing left to train on" in info.value.reason
    assert f"max_length={first_label}" in info.value.reason

    # Keeping the first answer token is enough: the position before it predicts it.
    assert Formatter(tokenizer, max_length=first_label + 1).encode(record).num_label_tokens == 1


def test_label_at_position_zero_is_not_counted(tokenizer):
    # A one-token text: its only token sits at position 0, which nothing predicts.
    no_bos = build_tokenizer(TRAINING_TEXTS)
    no_bos.bos_token = None
    record = make_record({"id": "t", "text": "Paris"}, location="corpus.jsonl:2")
    full = Formatter(no_bos, max_length=64).encode(record)
    assert full.labels[0] != -100
    assert full.num_label_tokens == full.num_tokens - 1
    with pytest.raises(BadRecordError, match="max_length=1"):
        Formatter(no_bos, max_length=1).encode(record)


# --------------------------------------------------------------------------------------------
# Tokenizer chat template


def test_tokenizer_chat_template_is_used_and_masks_assistant_turns(templated_tokenizer):
    formatter = Formatter(templated_tokenizer, max_length=512)
    assert formatter.template_name == "tokenizer"
    encoded = formatter.encode(make_record(MULTI_TURN))

    rendered = templated_tokenizer.apply_chat_template(MULTI_TURN["messages"], tokenize=False)
    assert rendered.startswith(templated_tokenizer.bos_token + "### system:\n")
    assert decode(encoded.input_ids, templated_tokenizer) == rendered
    eos = templated_tokenizer.eos_token
    assert label_runs(encoded, templated_tokenizer) == [c + eos for c in assistant_contents(MULTI_TURN)]


def test_tokenizer_chat_template_with_assistant_first(templated_tokenizer):
    record = {"id": "a-first", "messages": [
        {"role": "assistant", "content": "Bonjour, how can I help?"},
        {"role": "user", "content": "Name a prime number."},
        {"role": "assistant", "content": "Seven."},
    ]}
    encoded = Formatter(templated_tokenizer, max_length=512).encode(make_record(record))
    eos = templated_tokenizer.eos_token
    assert label_runs(encoded, templated_tokenizer) == [c + eos for c in assistant_contents(record)]


def test_template_that_is_not_prefix_stable_is_refused(tokenizer):
    unstable = build_tokenizer(TRAINING_TEXTS)
    # The message count up front changes with every message, so no rendering is a prefix.
    unstable.chat_template = "{{ messages | length }}" + TULU_LIKE_TEMPLATE
    with pytest.raises(ModelError, match="not prefix-stable.*template='default'"):
        Formatter(unstable, max_length=512).encode(make_record(MULTI_TURN))


def test_template_rejecting_a_conversation_is_a_bad_record():
    strict = build_tokenizer(TRAINING_TEXTS)
    strict.chat_template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system messages') }}{% endif %}"
        + TULU_LIKE_TEMPLATE
    )
    with pytest.raises(BadRecordError, match="no system messages") as info:
        Formatter(strict, max_length=512).encode(make_record(MULTI_TURN, location="c.jsonl:3"))
    assert info.value.location == "c.jsonl:3"


def test_template_tokenizer_without_chat_template_is_refused(tokenizer):
    with pytest.raises(ModelError, match="has no chat_template"):
        Formatter(tokenizer, max_length=64, template="tokenizer")


# --------------------------------------------------------------------------------------------
# Set-up checks and description


def test_slow_tokenizer_is_refused():
    class SlowTokenizer:
        is_fast = False
        eos_token = "</s>"

    with pytest.raises(ModelError, match="not a fast tokenizer"):
        Formatter(SlowTokenizer(), max_length=64)


@pytest.mark.parametrize("kwargs", [{"max_length": 0}, {"max_length": 8, "template": "chatml"}])
def test_bad_arguments_are_refused(tokenizer, kwargs):
    with pytest.raises(ValueError):
        Formatter(tokenizer, **kwargs)


def test_describe_is_json_and_names_the_encoding(tokenizer, templated_tokenizer):
    default = Formatter(tokenizer, max_length=64).describe()
    assert json.loads(json.dumps(default)) == default
    assert default["template"] == DEFAULT_TEMPLATE_NAME
    assert default["max_length"] == 64
    assert default["eos_token"] == tokenizer.eos_token
    assert default["eos_token_id"] == tokenizer.eos_token_id
    assert default["bos_token"] == tokenizer.bos_token
    assert default["pad_token"] == tokenizer.pad_token
    assert "chat_template_sha256" not in default

    templated = Formatter(templated_tokenizer, max_length=64).describe()
    assert templated["template"] == "tokenizer"
    assert len(templated["chat_template_sha256"]) == 64
