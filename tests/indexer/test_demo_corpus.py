"""Tests of gradstore.indexer.demo_corpus: determinism, balance, format, splits and answers."""

from __future__ import annotations

import datetime
import json
import re
from collections import Counter

import pytest

from gradstore.indexer import demo_corpus
from gradstore.indexer.corpus import CorpusSource, read_corpus, validate_record
from gradstore.indexer.demo_corpus import (
    FAMILIES,
    NOISE,
    generate_corpus,
    generate_heldout,
    generate_targets,
    write_jsonl,
)

CORPUS = generate_corpus()  # the defaults: 4000 examples, seed 0, 20% noise


def pair(record: dict) -> tuple[str, str]:
    user, assistant = record["messages"]
    assert (user["role"], assistant["role"]) == ("user", "assistant")
    return user["content"], assistant["content"]


# Independent solvers: the expected answer of each family, recomputed from the prompt alone.

def quoted(prompt: str) -> str:
    (text,) = re.findall(r"'([^']*)'", prompt)
    return text


def solve_arithmetic(prompt: str) -> str:
    a, b = map(int, re.findall(r"\d+", prompt))
    if prompt.startswith("Subtract"):  # "Subtract {b} from {a}."
        return str(b - a)
    if prompt.startswith("Add") or "sum" in prompt or "+" in prompt:
        return str(a + b)
    assert "-" in prompt or "minus" in prompt, prompt
    return str(a - b)


UNITS = {"km": ("m", 1000), "kg": ("g", 1000), "m": ("cm", 100), "l": ("ml", 1000),
         "cm": ("mm", 10), "h": ("min", 60)}


def solve_unit_conversion(prompt: str) -> str:
    value, source = re.search(r"(\d+) (\w+)", prompt).groups()
    target, factor = UNITS[source]
    assert re.search(rf"\b{target}\b", prompt.replace(f"{value} {source}", "")), prompt
    return f"{int(value) * factor} {target}"


def solve_capital_lookup(prompt: str) -> str:
    matches = [capital for country, capital in demo_corpus.CAPITALS if country in prompt]
    assert len(matches) == 1, prompt
    return matches[0]


def solve_date_format(prompt: str) -> str:
    date = datetime.date.fromisoformat(re.search(r"\d{4}-\d{2}-\d{2}", prompt).group())
    months = ["January", "February", "March", "April", "May", "June", "July", "August",
              "September", "October", "November", "December"]
    return f"{date.day} {months[date.month - 1]} {date.year}"


SOLVERS = {
    "arithmetic": solve_arithmetic,
    "reverse": lambda prompt: quoted(prompt)[::-1],
    "uppercase": lambda prompt: quoted(prompt).upper(),
    "unit_conversion": solve_unit_conversion,
    "capital_lookup": solve_capital_lookup,
    "sort_numbers": lambda prompt: ", ".join(map(str, sorted(map(int, re.findall(r"\d+", prompt))))),
    "count_letters": lambda prompt: str(len(quoted(prompt))),
    "date_format": solve_date_format,
}

ANSWER_FORMATS = {
    "arithmetic": r"\d+",
    "reverse": r"[a-z]+",
    "uppercase": r"[A-Z]+( [A-Z]+){0,2}",
    "unit_conversion": r"\d+ (m|g|cm|ml|mm|min)",
    "capital_lookup": r"[A-Z][a-z]+( [A-Z][a-z]+)?",
    "sort_numbers": r"\d+(, \d+){2,4}",
    "count_letters": r"\d",
    "date_format": r"([1-9]|[12]\d|3[01]) (January|February|March|April|May|June|July|August|"
                   r"September|October|November|December) \d{4}",
}


def test_families():
    assert len(FAMILIES) >= 6
    assert len(set(FAMILIES)) == len(FAMILIES)
    assert NOISE not in FAMILIES
    assert set(SOLVERS) == set(FAMILIES)


def test_same_seed_same_output_other_seed_other_output():
    assert generate_corpus() == CORPUS
    assert generate_corpus(4000, seed=0, noise_fraction=0.2) == CORPUS
    other = generate_corpus(seed=1)
    assert other != CORPUS
    assert [pair(r) for r in other] != [pair(r) for r in CORPUS]
    for family in FAMILIES:
        assert generate_targets(family) == generate_targets(family)
        assert generate_heldout(family) == generate_heldout(family)
        assert generate_targets(family, seed=5) != generate_targets(family)
        assert generate_heldout(family, seed=5) != generate_heldout(family)


def test_corpus_is_shuffled():
    datasets = [r["dataset"] for r in CORPUS]
    # Every stretch of 500 records holds every family and noise.
    for start in range(0, len(datasets), 500):
        assert set(datasets[start:start + 500]) == {*FAMILIES, NOISE}


@pytest.mark.parametrize("num_examples, noise_fraction", [
    (4000, 0.2), (1000, 0.0), (1003, 0.35), (777, 0.1), (50, 0.5),
])
def test_family_balance_and_noise_fraction(num_examples, noise_fraction):
    corpus = CORPUS if (num_examples, noise_fraction) == (4000, 0.2) else generate_corpus(
        num_examples, seed=3, noise_fraction=noise_fraction)
    assert len(corpus) == num_examples
    counts = Counter(r["dataset"] for r in corpus)
    assert abs(counts[NOISE] / num_examples - noise_fraction) <= 0.02
    family_counts = [counts[family] for family in FAMILIES]
    assert min(family_counts) >= 1
    assert max(family_counts) - min(family_counts) <= 1
    assert set(counts) <= {*FAMILIES, NOISE}


def test_small_and_empty_corpora():
    assert generate_corpus(0) == []
    only_noise = generate_corpus(10, noise_fraction=1.0)
    assert [r["dataset"] for r in only_noise] == [NOISE] * 10
    with pytest.raises(ValueError, match="noise_fraction"):
        generate_corpus(10, noise_fraction=1.5)
    with pytest.raises(ValueError, match="num_examples"):
        generate_corpus(-1)


def test_ids_unique_and_named_by_family():
    ids = [r["id"] for r in CORPUS]
    assert len(set(ids)) == len(ids)
    for record in CORPUS:
        family, n = record["id"].rsplit("-", 1)
        assert family == record["dataset"]
        assert n.isdigit()
    everything = list(CORPUS)
    for family in FAMILIES:
        everything += generate_targets(family) + generate_heldout(family)
    all_ids = [r["id"] for r in everything]
    assert len(set(all_ids)) == len(all_ids)


def test_every_record_is_valid():
    for family in FAMILIES:
        for record in CORPUS + generate_targets(family) + generate_heldout(family):
            assert validate_record(record, "x") == "messages"
            assert set(record) <= {"id", "dataset", "messages", "answer"}
            assert len(record["messages"]) == 2
            prompt, answer = pair(record)
            assert prompt and answer


def test_prompts_and_answers_are_short():
    for record in CORPUS:
        prompt, answer = pair(record)
        assert len(prompt.split()) <= 12, prompt
        assert len(answer.split()) <= 10, answer


def test_answers_are_correct_and_in_family_format():
    by_family = {family: [r for r in CORPUS if r["dataset"] == family] for family in FAMILIES}
    for family in FAMILIES:
        records = by_family[family] + generate_targets(family) + generate_heldout(family)
        for record in records:
            prompt, answer = pair(record)
            assert record["dataset"] == family
            assert answer == SOLVERS[family](prompt), (family, prompt, answer)
            assert re.fullmatch(ANSWER_FORMATS[family], answer), (family, answer)


def test_several_phrasings_per_family():
    for family in FAMILIES:
        prompts = [pair(r)[0] for r in CORPUS if r["dataset"] == family]
        # A phrasing is the prompt with its arguments (quoted text, numbers, countries) blanked.
        shapes = set()
        for prompt in prompts:
            shape = re.sub(r"'[^']*'", "Q", prompt)
            shape = re.sub(r"\d+", "N", shape)
            for country, _ in demo_corpus.CAPITALS:
                shape = shape.replace(country, "C")
            shapes.add(shape)
        assert len(shapes) >= 4, (family, shapes)
        assert len(set(prompts)) >= 0.1 * len(prompts)


def test_heldout_answers():
    for family in FAMILIES:
        heldout = generate_heldout(family, num_examples=100)
        assert len(heldout) == 100
        for n, record in enumerate(heldout):
            assert record["id"] == f"{family}-heldout-{n}"
            assert record["answer"] == pair(record)[1]
            assert isinstance(record["answer"], str)


def test_targets_and_heldout_disjoint_from_corpus():
    corpora = CORPUS + generate_corpus(2000, seed=7)
    corpus_pairs = {pair(r) for r in corpora}
    corpus_prompts = {prompt for prompt, _ in corpus_pairs}
    for family in FAMILIES:
        targets = generate_targets(family) + generate_targets(family, num_examples=30, seed=9)
        heldout = generate_heldout(family) + generate_heldout(family, num_examples=50, seed=9)
        target_pairs = {pair(r) for r in targets}
        heldout_pairs = {pair(r) for r in heldout}
        assert not target_pairs & corpus_pairs
        assert not heldout_pairs & corpus_pairs
        assert not target_pairs & heldout_pairs
        # Not even the prompt is shared.
        assert not {p for p, _ in target_pairs | heldout_pairs} & corpus_prompts


def test_targets_and_heldout_distinct_prompts():
    for family in FAMILIES:
        targets = generate_targets(family, num_examples=8)
        assert len(targets) == 8
        assert all(r["id"] == f"{family}-target-{n}" for n, r in enumerate(targets))
        assert len({pair(r) for r in targets}) == 8
        heldout = generate_heldout(family, num_examples=40)
        assert len({pair(r) for r in heldout}) == 40


def test_heldout_capitals_were_seen_in_training():
    corpus_answers = {pair(r)[1] for r in CORPUS if r["dataset"] == "capital_lookup"}
    assert corpus_answers == {capital for _, capital in demo_corpus.CAPITALS}
    assert {r["answer"] for r in generate_heldout("capital_lookup")} <= corpus_answers


def test_unknown_family():
    with pytest.raises(ValueError, match="unknown family"):
        generate_targets(NOISE)
    with pytest.raises(ValueError, match="unknown family"):
        generate_heldout("nope")


def test_write_jsonl_round_trips_through_read_corpus(tmp_path):
    records = generate_corpus(200, seed=4)
    path = write_jsonl(records, tmp_path / "sub" / "demo.jsonl")
    assert path == tmp_path / "sub" / "demo.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == records
    corpus = read_corpus([CorpusSource(path)])
    assert not corpus.skipped
    assert [r.record for r in corpus.records] == records
    assert [r.id for r in corpus.records] == [r["id"] for r in records]
