"""Tests of gradstore.indexer.corpus: formats, shapes, ids, bad records and skip mode."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gradstore.indexer import corpus as corpus_module
from gradstore.indexer.corpus import (
    Corpus,
    CorpusSource,
    read_corpus,
    validate_record,
    write_skipped_report,
)
from gradstore.indexer.errors import BadRecordError, CorpusError

CHAT = {
    "id": "tulu-1",
    "dataset": "flan_v2",
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ],
}
PROMPT_COMPLETION = {"id": "pc-1", "prompt": "2 + 2 =", "completion": " 4"}
TEXT = {"id": "t-1", "text": "Plain pretraining-style text."}


def write_jsonl(path: Path, lines: list) -> Path:
    """Write each item as a JSON line; strings are written verbatim (for malformed lines)."""
    with path.open("w", encoding="utf-8") as out:
        for line in lines:
            out.write((line if isinstance(line, str) else json.dumps(line, ensure_ascii=False)) + "\n")
    return path


def read_one(path: Path, **kwargs) -> Corpus:
    return read_corpus([CorpusSource(path)], **kwargs)


def sha_id(record: dict) -> str:
    """The content-hash id as the corpus format defines it."""
    canonical = json.dumps(record, sort_keys=True, ensure_ascii=False)
    return "h-" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Sources


def test_source_name_defaults_to_file_stem_and_parse_accepts_name(tmp_path):
    path = write_jsonl(tmp_path / "tulu_subset.jsonl", [CHAT])
    assert CorpusSource(path).name == "tulu_subset"
    assert CorpusSource.parse(str(path)) == CorpusSource(path, "tulu_subset")
    assert CorpusSource.parse(f"mine={path}") == CorpusSource(path, "mine")


def test_source_parse_rejects_missing_path(tmp_path):
    with pytest.raises(CorpusError, match="does not exist"):
        CorpusSource.parse(f"x={tmp_path / 'missing.jsonl'}")


def test_duplicate_source_names_are_rejected(tmp_path):
    first = write_jsonl(tmp_path / "a.jsonl", [CHAT])
    second = write_jsonl(tmp_path / "b.jsonl", [TEXT])
    with pytest.raises(CorpusError, match="duplicate corpus source name 'same'"):
        read_corpus([CorpusSource(first, "same"), CorpusSource(second, "same")])


def test_unsupported_format_names_file_and_formats(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("id,text\n1,hello\n")
    with pytest.raises(CorpusError) as info:
        read_one(path)
    assert str(path) in str(info.value)
    assert "*.jsonl" in str(info.value) and "*.parquet" in str(info.value)


def test_multiline_json_array_is_reported_as_not_json_lines(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([CHAT, TEXT], indent=2))
    with pytest.raises(CorpusError, match="JSON Lines"):
        read_one(path)


# --------------------------------------------------------------------------------------------
# JSON Lines


def test_jsonl_reads_every_shape_with_line_locations(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [CHAT, "", PROMPT_COMPLETION, "   ", TEXT])
    corpus = read_one(path)
    assert [r.shape for r in corpus.records] == ["messages", "prompt_completion", "text"]
    assert [r.id for r in corpus.records] == [CHAT["id"], PROMPT_COMPLETION["id"], TEXT["id"]]
    # Blank lines are skipped but still counted: records are on lines 1, 3 and 5.
    assert [r.location for r in corpus.records] == [f"{path}:1", f"{path}:3", f"{path}:5"]
    assert corpus.records[0].record == CHAT
    assert {r.source for r in corpus.records} == {"mixed"}
    assert corpus.skipped == []
    assert corpus.counts_by_source() == {"mixed": 3}


def test_json_suffix_is_read_as_json_lines(tmp_path):
    corpus = read_one(write_jsonl(tmp_path / "data.json", [TEXT, PROMPT_COMPLETION]))
    assert [r.shape for r in corpus.records] == ["text", "prompt_completion"]


def test_integer_id_becomes_string(tmp_path):
    corpus = read_one(write_jsonl(tmp_path / "a.jsonl", [{"id": 7, "text": "seven"}]))
    assert corpus.records[0].id == "7"
    assert corpus.records[0].record["id"] == 7  # the record itself is kept as read


def test_content_hash_id_is_stable_and_ignores_key_order(tmp_path):
    record = {"text": "no id here", "meta": {"b": 1, "a": "é"}}
    reordered = {"meta": {"a": "é", "b": 1}, "text": "no id here"}
    first = read_one(write_jsonl(tmp_path / "a.jsonl", [record])).records[0]
    again = read_one(write_jsonl(tmp_path / "b.jsonl", [reordered])).records[0]
    assert first.id == sha_id(record)
    assert first.id.startswith("h-") and len(first.id) == 2 + 16
    assert again.id == first.id


def test_content_hash_id_differs_for_different_content(tmp_path):
    corpus = read_one(write_jsonl(tmp_path / "a.jsonl", [{"text": "one"}, {"text": "two"}]))
    assert corpus.records[0].id != corpus.records[1].id


def test_malformed_line_raises_with_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "broken.jsonl", [CHAT, "", '{"text": "unterminated', TEXT])
    with pytest.raises(BadRecordError) as info:
        read_one(path)
    assert info.value.location == f"{path}:3"
    assert str(info.value).startswith(f"{path}:3: invalid JSON")


def test_skip_mode_collects_bad_records_and_writes_report(tmp_path):
    path = write_jsonl(
        tmp_path / "broken.jsonl",
        [CHAT, '{"text": "unterminated', "[1, 2]", TEXT, {"text": ""}],
    )
    corpus = read_one(path, on_bad_record="skip")
    assert [r.id for r in corpus.records] == [CHAT["id"], TEXT["id"]]
    assert [s.location for s in corpus.skipped] == [f"{path}:2", f"{path}:3", f"{path}:5"]
    assert corpus.skipped[1].reason == "expected a JSON object, got an array"
    assert corpus.skipped[2].reason == "text is empty: nothing to train on"
    assert {s.source for s in corpus.skipped} == {"broken"}

    report = write_skipped_report(corpus.skipped, tmp_path / "out" / "skipped.jsonl")
    lines = [json.loads(line) for line in report.read_text(encoding="utf-8").splitlines()]
    assert lines == [
        {"location": s.location, "source": s.source, "reason": s.reason} for s in corpus.skipped
    ]


def test_on_bad_record_must_be_known(tmp_path):
    with pytest.raises(ValueError, match="on_bad_record"):
        read_one(write_jsonl(tmp_path / "a.jsonl", [TEXT]), on_bad_record="ignore")


def test_duplicate_ids_across_sources_are_bad_records(tmp_path):
    first = write_jsonl(tmp_path / "first.jsonl", [TEXT, CHAT])
    second = write_jsonl(tmp_path / "second.jsonl", [{"id": CHAT["id"], "text": "other"}])
    sources = [CorpusSource(first), CorpusSource(second)]
    with pytest.raises(BadRecordError) as info:
        read_corpus(sources)
    assert info.value.location == f"{second}:1"
    assert info.value.reason == f"duplicate id '{CHAT['id']}' (first seen at {first}:2)"

    corpus = read_corpus(sources, on_bad_record="skip")
    assert [r.location for r in corpus.records] == [f"{first}:1", f"{first}:2"]
    assert [(s.location, s.source) for s in corpus.skipped] == [(f"{second}:1", "second")]
    assert corpus.counts_by_source() == {"first": 2, "second": 0}


def test_identical_records_without_id_are_duplicates(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "same"}, {"text": "same"}])
    with pytest.raises(BadRecordError, match=r"duplicate id 'h-[0-9a-f]{16}' \(first seen at .*:1\)"):
        read_one(path)


# --------------------------------------------------------------------------------------------
# Record validation


def chat(*messages: dict) -> dict:
    return {"messages": list(messages)}


USER = {"role": "user", "content": "hi"}
ASSISTANT = {"role": "assistant", "content": "hello"}


@pytest.mark.parametrize(
    "record, reason",
    [
        (chat(USER, ASSISTANT, {"role": "bot", "content": "x"}),
         "messages[2].role is 'bot': expected one of system, user, assistant"),
        (chat(USER, {"content": "x"}), "messages[1] has no role"),
        (chat(USER, {"role": "assistant"}), "messages[1] has no content"),
        (chat(USER, {"role": "assistant", "content": 3}),
         "messages[1].content is a number: expected a string"),
        (chat("hi"), "messages[0] is a string: expected an object with role and content"),
        ({"messages": "hi"}, "messages is a string: expected a list of {role, content} objects"),
        ({"messages": []}, "messages is an empty list"),
        (chat(USER, {"role": "assistant", "content": ""}),
         "messages has no assistant message with non-empty content: nothing to train on"),
        (chat(USER), "messages has no assistant message with non-empty content: nothing to train on"),
        ({"prompt": "p"}, "has prompt but no completion"),
        ({"completion": "c"}, "has completion but no prompt"),
        ({"prompt": ["p"], "completion": "c"}, "prompt is an array: expected a string"),
        ({"prompt": "p", "completion": ""}, "completion is empty: nothing to train on"),
        ({"text": 5}, "text is a number: expected a string"),
        ({"id": "", "text": "x"}, "id is an empty string"),
        ({"id": 1.5, "text": "x"}, "id is a number: expected a string or an integer"),
        ({"id": True, "text": "x"}, "id is a boolean: expected a string or an integer"),
    ],
)
def test_validate_record_names_what_is_wrong(record, reason):
    with pytest.raises(BadRecordError) as info:
        validate_record(record, "f.jsonl:4")
    assert info.value.reason == reason
    assert info.value.location == "f.jsonl:4"


def test_validate_record_lists_found_keys_when_no_shape_matches():
    with pytest.raises(BadRecordError, match=r"found keys: instruction, output"):
        validate_record({"instruction": "a", "output": "b"}, "f.jsonl:1")


def test_messages_take_priority_and_null_fields_count_as_absent():
    assert validate_record({**chat(USER, ASSISTANT), "text": "also"}, "x") == "messages"
    assert validate_record({"messages": None, "prompt": "p", "completion": "c"}, "x") == "prompt_completion"
    assert validate_record({"messages": None, "prompt": None, "completion": None, "text": "t"}, "x") == "text"


# --------------------------------------------------------------------------------------------
# Parquet and datasets folders


def test_parquet_rows_have_row_locations_across_batches(tmp_path, monkeypatch):
    rows = [{"id": f"r{i}", "text": f"row {i}"} for i in range(5)]
    rows[3] = {"id": "r3", "text": ""}
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=2)
    # Batches of two rows, so the row counter has to carry over between record batches.
    monkeypatch.setattr(corpus_module, "PARQUET_BATCH_ROWS", 2)

    with pytest.raises(BadRecordError) as info:
        read_one(path)
    assert info.value.location == f"{path}:row 3"

    corpus = read_one(path, on_bad_record="skip")
    assert [r.id for r in corpus.records] == ["r0", "r1", "r2", "r4"]
    assert corpus.records[3].location == f"{path}:row 4"
    assert corpus.records[3].record == rows[4]
    assert [s.location for s in corpus.skipped] == [f"{path}:row 3"]


def test_parquet_messages_and_mixed_shapes(tmp_path):
    rows = [
        {"id": "c", "messages": CHAT["messages"], "prompt": None, "completion": None},
        {"id": "p", "messages": None, "prompt": "Q:", "completion": " A"},
    ]
    path = tmp_path / "mixed.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    corpus = read_one(path)
    assert [r.shape for r in corpus.records] == ["messages", "prompt_completion"]
    assert corpus.records[0].record["messages"] == CHAT["messages"]


def test_content_hash_matches_between_jsonl_and_parquet(tmp_path):
    record = {"prompt": "Q: one", "completion": " A: two"}
    jsonl = read_one(write_jsonl(tmp_path / "a.jsonl", [record])).records[0]
    path = tmp_path / "a.parquet"
    pq.write_table(pa.Table.from_pylist([record]), path)
    parquet = read_one(path).records[0]
    assert parquet.id == jsonl.id == sha_id(record)


@pytest.fixture
def datasets():
    return pytest.importorskip("datasets")


def test_datasets_folder(tmp_path, datasets):
    folder = tmp_path / "tulu_saved"
    datasets.Dataset.from_list([CHAT, {**CHAT, "id": "tulu-2"}]).save_to_disk(str(folder))
    corpus = read_corpus([CorpusSource.parse(str(folder))])
    assert [r.id for r in corpus.records] == ["tulu-1", "tulu-2"]
    assert [r.location for r in corpus.records] == [f"{folder}:row 0", f"{folder}:row 1"]
    assert corpus.records[0].source == "tulu_saved"
    assert corpus.records[0].record["messages"] == CHAT["messages"]


def test_datasets_dict_needs_exactly_one_split(tmp_path, datasets):
    folder = tmp_path / "dd"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_list([TEXT]),
        "test": datasets.Dataset.from_list([PROMPT_COMPLETION]),
    }).save_to_disk(str(folder))
    with pytest.raises(CorpusError, match="splits train, test"):
        read_one(folder)
    # One split's folder is itself a dataset folder.
    assert [r.id for r in read_one(folder / "test").records] == [PROMPT_COMPLETION["id"]]

    single = tmp_path / "single"
    datasets.DatasetDict({"train": datasets.Dataset.from_list([TEXT])}).save_to_disk(str(single))
    assert [r.id for r in read_one(single).records] == [TEXT["id"]]


def test_plain_folder_is_not_a_corpus(tmp_path):
    folder = tmp_path / "plain"
    folder.mkdir()
    with pytest.raises(CorpusError, match="not a datasets save_to_disk folder"):
        read_one(folder)
