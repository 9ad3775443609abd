"""A generated multi-task instruction corpus for the demo, the tests and benchmarks.

Nothing is downloaded: every example is generated in pure Python from fixed word lists and tables
held in this module, so the same arguments always give the same records. The texts are short
(prompts and answers mostly well under 40 tokens of a small byte-level BPE vocabulary) so that a
tiny causal LM trained for a few minutes on a CPU learns the families apart, and LESS selection
can be shown to pick the training examples of a target task's family.

Task families (:data:`FAMILIES`), each needing its own skill:

* ``arithmetic`` — add or subtract numbers below 100: ``What is 23 + 19?`` -> ``42``;
* ``reverse`` — reverse a short word: ``Spell 'garden' backwards.`` -> ``nedrag``;
* ``uppercase`` — capitalise one to three words: ``Convert 'red apple' to uppercase.`` ->
  ``RED APPLE``;
* ``unit_conversion`` — scale a whole number between units: ``Convert 7 km to m.`` -> ``7000 m``
  (the answer is always ``"<number> <unit>"``);
* ``capital_lookup`` — recall a capital from a fixed table of :data:`CAPITALS`:
  ``What is the capital of Peru?`` -> ``Lima``;
* ``sort_numbers`` — sort three to five numbers ascending: ``Sort ascending: 41, 7, 88`` ->
  ``7, 41, 88``;
* ``count_letters`` — the length of a word: ``How many letters are in the word 'river'?`` -> ``5``;
* ``date_format`` — rewrite an ISO date in words: ``Rewrite the date 2024-03-05 in long form.`` ->
  ``5 March 2024``.

Each family has several prompt phrasings; its answer format is fixed. The corpus also holds
:data:`NOISE` filler (``dataset`` ``"noise"``): word-salad prompts and answers and generic
chit-chat, making up ``noise_fraction`` of it. Noise is no family: it has no targets or
held-out set.

Records use the tulu / LESS chat format read by :mod:`gradstore.indexer.corpus`::

    {"id": "arithmetic-17", "dataset": "arithmetic",
     "messages": [{"role": "user", "content": "What is 23 + 19?"},
                  {"role": "assistant", "content": "42"}]}

Corpus ids are ``"<family>-<n>"`` (``n`` counts from 0 within the family), target ids
``"<family>-target-<n>"`` and held-out ids ``"<family>-heldout-<n>"``, so the three sets can be
read together without clashing. Held-out records also carry ``"answer"``: the exact expected
completion text (equal to the assistant content), for accuracy.

Corpus, targets and held-out examples never share content: every example has a split key (the
underlying problem — the numbers, the word, the date; for ``capital_lookup`` the country together
with the phrasing, since the table is small and a held-out fact must have been seen in training),
and a stable hash of the key puts it in exactly one of the three splits (70% corpus, 10% targets,
20% held-out) whatever the seed. Targets and held-out examples are distinct from one another
while the family's split has unused prompts left; only a small split (``capital_lookup``'s
held-out one has about 50 prompts) repeats prompts when asked for more.
"""

from __future__ import annotations

import calendar
import json
import random
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path

__all__ = [
    "CAPITALS",
    "FAMILIES",
    "NOISE",
    "generate_corpus",
    "generate_heldout",
    "generate_targets",
    "write_jsonl",
]

NOISE = "noise"

# --------------------------------------------------------------------------------------------
# Fixed tables

# Short, common, lowercase ASCII words (3-7 letters) for reverse, uppercase, count_letters and noise.
WORDS: tuple[str, ...] = (
    "apple", "river", "garden", "stone", "cloud", "table", "green", "light", "music", "paper",
    "water", "house", "bread", "chair", "dream", "field", "glass", "heart", "lemon", "money",
    "night", "ocean", "plant", "queen", "radio", "sugar", "tiger", "uncle", "voice", "whale",
    "yellow", "zebra", "cat", "dog", "sun", "moon", "star", "tree", "bird", "fish",
    "book", "door", "lamp", "milk", "rain", "snow", "wind", "fire", "gold", "iron",
    "salt", "ship", "road", "hill", "lake", "rock", "sand", "leaf", "rose", "corn",
    "bell", "coat", "desk", "drum", "frog", "goat", "hand", "king", "kite", "lion",
    "nest", "pear", "ring", "sock", "tent", "vase", "wolf", "yard", "bean", "cake",
    "cup", "hat", "pen", "box", "bus", "car", "egg", "fox", "jam", "key",
    "map", "net", "owl", "pig", "rug", "toy", "van", "web", "yak", "zoo",
    "anchor", "basket", "candle", "dinner", "engine", "forest", "guitar", "hammer", "island", "jacket",
    "kettle", "ladder", "magnet", "needle", "orange", "pencil", "rabbit", "saddle", "ticket", "violin",
    "window", "bottle", "button", "castle", "cherry", "dragon", "finger", "flower", "ginger", "hunter",
    "jungle", "letter", "marble", "monkey", "parrot", "pepper", "pillow", "planet", "pocket", "rocket",
    "silver", "spider", "summer", "tomato", "turtle", "valley", "winter", "wizard", "bridge", "carpet",
    "blanket", "kitchen", "morning", "picture", "rainbow", "teacher", "village", "weather", "captain",
    "balloon",
    "brown", "black", "white", "happy", "quiet", "quick", "small", "large", "sweet", "sharp",
    "brave", "calm", "cold", "warm", "dark", "fast", "slow", "soft", "tall", "wide",
    "red", "blue", "big", "old", "new", "hot", "wet", "dry", "odd", "shy",
    "jump", "sing", "walk", "read", "swim", "cook", "draw", "play", "ride", "sleep",
)

CAPITALS: tuple[tuple[str, str], ...] = (
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Portugal", "Lisbon"), ("Japan", "Tokyo"), ("China", "Beijing"), ("India", "New Delhi"),
    ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Canada", "Ottawa"), ("Mexico", "Mexico City"),
    ("Brazil", "Brasilia"), ("Argentina", "Buenos Aires"), ("Peru", "Lima"), ("Chile", "Santiago"),
    ("Russia", "Moscow"), ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Finland", "Helsinki"),
    ("Denmark", "Copenhagen"), ("Poland", "Warsaw"), ("Greece", "Athens"), ("Turkey", "Ankara"),
    ("Australia", "Canberra"), ("Ireland", "Dublin"), ("Austria", "Vienna"), ("Hungary", "Budapest"),
    ("Cuba", "Havana"), ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"), ("South Korea", "Seoul"),
)

# source unit -> (target unit, factor); each source unit converts to exactly one target unit.
UNITS: dict[str, tuple[str, int]] = {
    "km": ("m", 1000),
    "kg": ("g", 1000),
    "m": ("cm", 100),
    "l": ("ml", 1000),
    "cm": ("mm", 10),
    "h": ("min", 60),
}

# Spelled out rather than taken from calendar.month_name, which follows the process locale.
MONTHS: tuple[str, ...] = (
    "January", "February", "March", "April", "May", "June", "July", "August", "September",
    "October", "November", "December",
)

CHITCHAT_PROMPTS: tuple[str, ...] = (
    "Hi there!", "How are you today?", "Tell me something nice.", "What do you think?",
    "Can you help me?", "Good morning!", "Any thoughts?", "Say something.",
    "I had a long day.", "What is new?", "Thanks a lot!", "Is it going to be fine?",
    "Do you like music?", "Tell me a fun fact.", "What should I do now?", "Hello!",
)
CHITCHAT_ANSWERS: tuple[str, ...] = (
    "Sure, happy to help!", "That sounds great.", "I am doing well, thank you.",
    "Interesting, tell me more.", "Of course.", "Hello! How can I help?",
    "I am not sure, but let us see.", "Thanks for asking.", "That is a good question.",
    "Have a nice day!", "Sounds like a plan.", "Glad to hear it.", "Let me think about that.",
    "You are welcome.", "Maybe, it depends.", "Take it easy.",
)

# --------------------------------------------------------------------------------------------
# Families: each generator draws one example as (split key, prompt, answer).

Example = tuple[str, str, str]


def _arithmetic(rng: random.Random) -> Example:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    if rng.random() < 0.5:
        op, answer = "+", a + b
        template = rng.choice((
            "What is {a} + {b}?", "Compute {a} + {b}.", "Calculate {a} + {b}.", "{a} + {b} = ?",
            "Work out {a} + {b}.", "Add {a} and {b}.", "What is the sum of {a} and {b}?",
        ))
    else:
        a, b = max(a, b), min(a, b)  # no negative results
        op, answer = "-", a - b
        template = rng.choice((
            "What is {a} - {b}?", "Compute {a} - {b}.", "Calculate {a} - {b}.", "{a} - {b} = ?",
            "Work out {a} - {b}.", "Subtract {b} from {a}.", "What is {a} minus {b}?",
        ))
    return f"{a}{op}{b}", template.format(a=a, b=b), str(answer)


def _reverse(rng: random.Random) -> Example:
    word = rng.choice(WORDS)
    template = rng.choice((
        "Reverse the word '{w}'.", "Spell '{w}' backwards.", "Write '{w}' in reverse.",
        "What is '{w}' reversed?", "Reverse the letters of '{w}'.",
    ))
    return word, template.format(w=word), word[::-1]


def _uppercase(rng: random.Random) -> Example:
    phrase = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3)))
    template = rng.choice((
        "Convert '{p}' to uppercase.", "Write '{p}' in capital letters.", "Uppercase this: '{p}'",
        "Make '{p}' all caps.", "Capitalize every letter of '{p}'.",
    ))
    return phrase, template.format(p=phrase), phrase.upper()


def _unit_conversion(rng: random.Random) -> Example:
    source = rng.choice(tuple(UNITS))
    target, factor = UNITS[source]
    value = rng.randint(1, 99)
    template = rng.choice((
        "Convert {v} {s} to {t}.", "How many {t} are in {v} {s}?", "Express {v} {s} in {t}.",
        "{v} {s} is how many {t}?", "What is {v} {s} in {t}?",
    ))
    return f"{value}{source}", template.format(v=value, s=source, t=target), f"{value * factor} {target}"


_CAPITAL_TEMPLATES = (
    "What is the capital of {c}?", "Name the capital city of {c}.", "Which city is the capital of {c}?",
    "Tell me the capital of {c}.", "What city is the capital of {c}?", "Capital of {c}?",
    "In {c}, which city is the capital?", "The capital of {c} is which city?",
)


def _capital_lookup(rng: random.Random) -> Example:
    country, capital = rng.choice(CAPITALS)
    index = rng.randrange(len(_CAPITAL_TEMPLATES))
    # The phrasing is part of the key: every country is in the corpus under some phrasings.
    return f"{country}#{index}", _CAPITAL_TEMPLATES[index].format(c=country), capital


def _sort_numbers(rng: random.Random) -> Example:
    numbers = rng.sample(range(100), rng.randint(3, 5))
    listed = ", ".join(map(str, numbers))
    template = rng.choice((
        "Sort these numbers in ascending order: {x}", "Sort ascending: {x}",
        "Arrange from smallest to largest: {x}", "Put these numbers in increasing order: {x}",
    ))
    return listed, template.format(x=listed), ", ".join(map(str, sorted(numbers)))


def _count_letters(rng: random.Random) -> Example:
    word = rng.choice(WORDS)
    template = rng.choice((
        "How many letters are in the word '{w}'?", "Count the letters in '{w}'.",
        "What is the length of the word '{w}'?", "How long is the word '{w}'?",
    ))
    return word, template.format(w=word), str(len(word))


def _date_format(rng: random.Random) -> Example:
    year, month = rng.randint(1950, 2049), rng.randint(1, 12)
    day = rng.randint(1, calendar.monthrange(year, month)[1])
    iso = f"{year:04d}-{month:02d}-{day:02d}"
    template = rng.choice((
        "Write the date {d} in words.", "Format {d} as day month year.",
        "Rewrite the date {d} in long form.", "Convert {d} to a long date.", "Spell out the date {d}.",
    ))
    return iso, template.format(d=iso), f"{day} {MONTHS[month - 1]} {year}"


_GENERATORS: dict[str, Callable[[random.Random], Example]] = {
    "arithmetic": _arithmetic,
    "reverse": _reverse,
    "uppercase": _uppercase,
    "unit_conversion": _unit_conversion,
    "capital_lookup": _capital_lookup,
    "sort_numbers": _sort_numbers,
    "count_letters": _count_letters,
    "date_format": _date_format,
}

FAMILIES: tuple[str, ...] = tuple(_GENERATORS)


def _noise(rng: random.Random) -> tuple[str, str]:
    def salad(low: int, high: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))

    kind = rng.randrange(3)
    if kind == 0:
        return salad(3, 8), salad(2, 8)
    if kind == 1:
        return rng.choice(CHITCHAT_PROMPTS), rng.choice(CHITCHAT_ANSWERS)
    return salad(3, 8).capitalize() + "?", rng.choice(CHITCHAT_ANSWERS)


# --------------------------------------------------------------------------------------------
# Splits

_BUCKETS = 10
_SPLIT_BUCKETS = {"corpus": range(0, 7), "targets": range(7, 8), "heldout": range(8, 10)}
# Draws in a row without a new prompt after which a split is taken as exhausted: from then on
# its prompts may repeat.
_MAX_STALE_DRAWS = 2000


def _split_of(family: str, key: str) -> str:
    bucket = zlib.crc32(f"{family}|{key}".encode()) % _BUCKETS
    return next(name for name, buckets in _SPLIT_BUCKETS.items() if bucket in buckets)


def _draw(family: str, split: str, count: int, rng: random.Random, unique: bool) -> list[Example]:
    """``count`` examples of ``family`` whose key falls in ``split`` (distinct prompts while
    ``unique`` and the split has unused prompts left)."""
    generate = _GENERATORS[family]
    examples: list[Example] = []
    seen: set[str] = set()
    stale = 0  # draws in a row that gave no new prompt
    while len(examples) < count:
        example = generate(rng)
        if _split_of(family, example[0]) != split:
            continue
        if unique and stale < _MAX_STALE_DRAWS:
            if example[1] in seen:
                stale += 1
                continue
            stale = 0
        seen.add(example[1])
        examples.append(example)
    return examples


def _chat(record_id: str, dataset: str, prompt: str, answer: str) -> dict:
    return {
        "id": record_id,
        "dataset": dataset,
        "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
    }


def _check_family(family: str) -> None:
    if family not in _GENERATORS:
        raise ValueError(f"unknown family {family!r}: expected one of {', '.join(FAMILIES)}")


def _check_count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name}={value!r}: expected a non-negative integer")


# --------------------------------------------------------------------------------------------
# Public API


def generate_corpus(num_examples: int = 4000, seed: int = 0, noise_fraction: float = 0.2) -> list[dict]:
    """The training corpus: ``num_examples`` chat records, shuffled.

    ``round(num_examples * noise_fraction)`` are noise; the rest are shared equally among
    :data:`FAMILIES` (counts differ by at most one, the earlier families taking the remainder).
    The same arguments give identical records; another seed gives other examples and order.
    """
    _check_count("num_examples", num_examples)
    if not 0.0 <= noise_fraction <= 1.0:
        raise ValueError(f"noise_fraction={noise_fraction!r}: expected a value in [0, 1]")
    rng = random.Random(seed)
    num_noise = round(num_examples * noise_fraction)
    per_family, extra = divmod(num_examples - num_noise, len(FAMILIES))

    drawn: list[tuple[str, str, str]] = []  # (dataset, prompt, answer)
    for index, family in enumerate(FAMILIES):
        count = per_family + (1 if index < extra else 0)
        drawn += [(family, p, a) for _, p, a in _draw(family, "corpus", count, rng, unique=False)]
    drawn += [(NOISE, *_noise(rng)) for _ in range(num_noise)]
    rng.shuffle(drawn)

    counters: dict[str, int] = {}
    records = []
    for dataset, prompt, answer in drawn:
        n = counters.get(dataset, 0)
        counters[dataset] = n + 1
        records.append(_chat(f"{dataset}-{n}", dataset, prompt, answer))
    return records


def generate_targets(family: str, num_examples: int = 8, seed: int = 1) -> list[dict]:
    """Few-shot target examples of ``family``: chat records whose content never occurs in the
    corpus or the held-out set (for any seed of either)."""
    _check_family(family)
    _check_count("num_examples", num_examples)
    rng = random.Random(f"targets:{family}:{seed}")
    return [
        _chat(f"{family}-target-{n}", family, prompt, answer)
        for n, (_, prompt, answer) in enumerate(_draw(family, "targets", num_examples, rng, unique=True))
    ]


def generate_heldout(family: str, num_examples: int = 100, seed: int = 2) -> list[dict]:
    """Held-out test examples of ``family``: chat records with ``"answer"``, the exact expected
    completion (the assistant content), disjoint in content from the corpus and the targets."""
    _check_family(family)
    _check_count("num_examples", num_examples)
    rng = random.Random(f"heldout:{family}:{seed}")
    records = []
    for n, (_, prompt, answer) in enumerate(_draw(family, "heldout", num_examples, rng, unique=True)):
        record = _chat(f"{family}-heldout-{n}", family, prompt, answer)
        record["answer"] = answer
        records.append(record)
    return records


def write_jsonl(records: Iterable[dict], path: str | Path) -> Path:
    """Write ``records`` as JSON Lines (UTF-8, one object per line), creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for record in records:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path
