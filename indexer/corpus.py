"""Corpus input: read instruction-tuning corpus files into validated records.

A corpus is one or more sources, each a file or folder:

* ``*.jsonl`` / ``*.json`` — JSON Lines, one object per line (blank lines are ignored);
* ``*.parquet`` — one record per row;
* a folder written by Hugging Face ``datasets`` ``save_to_disk`` — one record per row (needs the
  optional ``datasets`` package: ``pip install gradstore[datasets]``).

Every record has one of three shapes, checked in this order:

* ``messages`` — a chat: ``{"id", "dataset", "messages": [{"role", "content"}, ...]}`` (the
  LESS / tulu format). Roles are ``system``, ``user`` and ``assistant``; at least one assistant
  message must have non-empty content, since assistant turns are what the loss is computed on;
* ``prompt_completion`` — ``{"prompt": str, "completion": str}`` with a non-empty completion;
* ``text`` — ``{"text": str}``, non-empty; the loss covers the whole text.

A field whose value is ``null`` counts as absent: Parquet and ``datasets`` store a column for every
field, so a row of a mixed file carries ``null`` for the fields it does not use.

Each record keeps its ``id`` field (string or integer, as a string); a record without one gets a
content hash, ``"h-"`` + the first 16 hex digits of the SHA-256 of its canonical JSON, so the same
record gets the same id on every run. Ids must be unique across all sources.

A malformed record raises :class:`BadRecordError` naming where it is (``path:LINE`` for JSON Lines,
``path:row N`` for row formats, rows counted from 0) and what is wrong. With
``on_bad_record="skip"`` each one is collected in :attr:`Corpus.skipped` instead, and
:func:`write_skipped_report` writes them out; nothing is dropped silently.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import BadRecordError, CorpusError

JSON_LINES_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
# A ``save_to_disk`` folder holds these files (``dataset_dict.json`` for a DatasetDict, whose
# splits are sub-folders holding the other two).
DATASETS_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
ACCEPTED_FORMATS = "*.jsonl or *.json (JSON Lines), *.parquet, or a datasets save_to_disk folder"

ROLES = ("system", "user", "assistant")
SHAPES = ("messages", "prompt_completion", "text")
BAD_RECORD_POLICIES = ("error", "skip")
PARQUET_BATCH_ROWS = 1024


@dataclass(frozen=True)
class CorpusSource:
    """One corpus file or folder and the name its records are reported under."""

    path: Path
    name: str = ""  # default: the file stem, or the folder name for a datasets folder

    def __post_init__(self) -> None:
        path = Path(self.path)
        object.__setattr__(self, "path", path)
        if not self.name:
            object.__setattr__(self, "name", path.name if path.is_dir() else path.stem)

    @classmethod
    def parse(cls, spec: str) -> CorpusSource:
        """Parse the CLI syntax ``path`` or ``name=path``; the path must exist."""
        name, path = "", spec
        # A path may itself contain "=", so only split when the whole spec is not a path.
        if "=" in spec and not Path(spec).exists():
            name, path = spec.split("=", 1)
            if not name:
                raise CorpusError(f"corpus source {spec!r}: empty name before '='")
        if not Path(path).exists():
            raise CorpusError(f"corpus source {spec!r}: {path} does not exist")
        return cls(Path(path), name)


@dataclass(frozen=True)
class Record:
    """One valid corpus record."""

    id: str
    source: str  # CorpusSource.name
    location: str  # "path:LINE" (JSON Lines, from 1) or "path:row N" (Parquet, datasets, from 0)
    record: dict  # the record exactly as read, so it can be exported in its original form
    shape: str  # one of SHAPES


@dataclass(frozen=True)
class SkippedRecord:
    """A malformed record left out with ``on_bad_record="skip"``."""

    location: str
    reason: str
    source: str


@dataclass
class Corpus:
    """The records read from all sources, in source order, and the ones skipped."""

    records: list[Record]
    skipped: list[SkippedRecord]
    source_names: list[str] = field(default_factory=list)  # every source read, in order

    def counts_by_source(self) -> dict[str, int]:
        """Number of records kept per source (sources left with no records count 0)."""
        counts = dict.fromkeys(self.source_names, 0)
        for record in self.records:
            counts[record.source] = counts.get(record.source, 0) + 1
        return counts


@dataclass(frozen=True)
class _RawRow:
    """A row as read from a file: the parsed value, or why it could not be parsed."""

    location: str
    value: Any = None
    parse_error: str | None = None


# --------------------------------------------------------------------------------------------
# Reading


def read_corpus(sources: Sequence[CorpusSource], on_bad_record: str = "error") -> Corpus:
    """Read and validate every record of ``sources``.

    ``on_bad_record="error"`` raises the first :class:`BadRecordError`; ``"skip"`` collects each
    malformed record (bad JSON, wrong shape, duplicate id) in :attr:`Corpus.skipped` and goes on.
    A source that cannot be read at all raises :class:`CorpusError` in both modes.
    """
    if on_bad_record not in BAD_RECORD_POLICIES:
        raise ValueError(
            f"on_bad_record={on_bad_record!r}: expected one of {', '.join(BAD_RECORD_POLICIES)}"
        )
    _check_unique_names(sources)
    # Find every source's reader before reading any, so a missing file or unknown format is
    # reported at once rather than after the earlier sources were read.
    readers = [_reader_for(source) for source in sources]
    corpus = Corpus(records=[], skipped=[], source_names=[s.name for s in sources])
    first_seen: dict[str, str] = {}  # id -> location of the record that has it
    for source, read_rows in zip(sources, readers):
        for row in read_rows(source.path):
            try:
                record = _to_record(row, source, first_seen)
            except BadRecordError as error:
                if on_bad_record == "error":
                    raise
                corpus.skipped.append(SkippedRecord(error.location, error.reason, source.name))
                continue
            first_seen[record.id] = record.location
            corpus.records.append(record)
    return corpus


def write_skipped_report(skipped: Sequence[SkippedRecord], path: str | Path) -> Path:
    """Write one JSON line ``{"location", "source", "reason"}`` per skipped record."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for item in skipped:
            line = {"location": item.location, "source": item.source, "reason": item.reason}
            out.write(json.dumps(line, ensure_ascii=False) + "\n")
    return path


def _check_unique_names(sources: Sequence[CorpusSource]) -> None:
    seen: dict[str, Path] = {}
    for source in sources:
        if source.name in seen:
            raise CorpusError(
                f"duplicate corpus source name {source.name!r}: used by {seen[source.name]} and "
                f"{source.path}; give each a distinct name with the name=path syntax"
            )
        seen[source.name] = source.path


def _to_record(row: _RawRow, source: CorpusSource, first_seen: dict[str, str]) -> Record:
    if row.parse_error is not None:
        raise BadRecordError(row.location, row.parse_error)
    shape = validate_record(row.value, row.location)
    record_id = _record_id(row.value)
    if record_id in first_seen:
        reason = f"duplicate id {record_id!r} (first seen at {first_seen[record_id]})"
        if _field(row.value, "id") is None:
            reason += ": the record has no id and the same content as that one"
        raise BadRecordError(row.location, reason)
    return Record(record_id, source.name, row.location, row.value, shape)


def _reader_for(source: CorpusSource) -> Callable[[Path], Iterator[_RawRow]]:
    """The row reader for the source's format, chosen by its path."""
    path = source.path
    if not path.exists():
        raise CorpusError(f"corpus source {source.name!r}: {path} does not exist")
    if path.is_dir():
        if any((path / marker).is_file() for marker in DATASETS_MARKERS):
            return _read_datasets_folder
        raise CorpusError(
            f"{path}: a folder without {' or '.join(DATASETS_MARKERS)}, so not a datasets "
            f"save_to_disk folder; accepted formats: {ACCEPTED_FORMATS}"
        )
    suffix = path.suffix.lower()
    if suffix in JSON_LINES_SUFFIXES:
        return _read_json_lines
    if suffix in PARQUET_SUFFIXES:
        return _read_parquet
    raise CorpusError(f"{path}: unsupported corpus format; accepted formats: {ACCEPTED_FORMATS}")


def _read_json_lines(path: Path) -> Iterator[_RawRow]:
    try:
        handle = path.open("rb")
    except OSError as error:
        raise CorpusError(f"{path}: cannot open: {error}") from error
    seen_content = False
    with handle:
        # Binary lines so that a bad byte sequence is one bad record, not an unreadable file.
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                yield _RawRow(f"{path}:{number}", parse_error=f"not valid UTF-8: {error.reason}")
                continue
            if not line.strip():
                continue
            row = _parse_json_line(line, f"{path}:{number}")
            if not seen_content and row.parse_error and line.lstrip().startswith("["):
                raise CorpusError(
                    f"{path}: looks like a JSON array spread over several lines; gradstore reads "
                    "JSON Lines: one JSON object per line"
                )
            seen_content = True
            yield row


def _parse_json_line(line: str, location: str) -> _RawRow:
    try:
        return _RawRow(location, value=json.loads(line))
    except json.JSONDecodeError as error:
        return _RawRow(location, parse_error=f"invalid JSON: {error.msg} at column {error.colno}")


def _read_parquet(path: Path) -> Iterator[_RawRow]:
    import pyarrow.parquet as pq

    try:
        parquet_file = pq.ParquetFile(path)
    except Exception as error:  # pyarrow raises several types for corrupt or non-Parquet files
        raise CorpusError(f"{path}: cannot read as Parquet: {error}") from error
    row = 0
    with parquet_file:
        for batch in parquet_file.iter_batches(batch_size=PARQUET_BATCH_ROWS):
            for value in batch.to_pylist():
                yield _RawRow(f"{path}:row {row}", value=value)
                row += 1


def _read_datasets_folder(path: Path) -> Iterator[_RawRow]:
    dataset = _load_datasets_folder(path)
    row = 0
    # Arrow batches give the stored values as they are, without datasets' feature decoding.
    for table in dataset.with_format("arrow").iter(batch_size=PARQUET_BATCH_ROWS):
        for value in table.to_pylist():
            yield _RawRow(f"{path}:row {row}", value=value)
            row += 1


def _load_datasets_folder(path: Path):
    try:
        import datasets
    except ImportError as error:
        raise CorpusError(
            f"{path}: reading a datasets save_to_disk folder needs the datasets package: "
            "pip install gradstore[datasets]"
        ) from error
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as error:  # datasets raises several types for incomplete folders
        raise CorpusError(f"{path}: cannot load datasets folder: {error}") from error
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded.keys())
        if len(splits) != 1:
            raise CorpusError(
                f"{path}: a DatasetDict with splits {', '.join(splits) or '(none)'}; pass one "
                f"split's folder instead, e.g. {path / (splits[0] if splits else 'train')}"
            )
        return loaded[splits[0]]
    return loaded


# --------------------------------------------------------------------------------------------
# Validation


def validate_record(record: dict, location: str) -> str:
    """Return the record's shape (one of ``SHAPES``) or raise :class:`BadRecordError`."""
    if not isinstance(record, dict):
        raise BadRecordError(location, f"expected a JSON object, got {_type_name(record)}")
    _validate_id(record, location)
    if _field(record, "messages") is not None:
        _validate_messages(record["messages"], location)
        return "messages"
    if _field(record, "prompt") is not None or _field(record, "completion") is not None:
        _validate_prompt_completion(record, location)
        return "prompt_completion"
    if _field(record, "text") is not None:
        _validate_text(record["text"], location)
        return "text"
    keys = ", ".join(map(str, record)) or "none"
    raise BadRecordError(
        location,
        f"no messages, prompt/completion or text field (found keys: {keys}); expected one of "
        "{'messages': [...]}, {'prompt': ..., 'completion': ...} or {'text': ...}",
    )


def _validate_id(record: dict, location: str) -> None:
    value = _field(record, "id")
    if value is None:
        return
    # bool is an int subclass, but true/false is no identifier.
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise BadRecordError(location, f"id is {_type_name(value)}: expected a string or an integer")
    if value == "":
        raise BadRecordError(location, "id is an empty string")


def _validate_messages(messages: Any, location: str) -> None:
    if not isinstance(messages, list):
        raise BadRecordError(
            location, f"messages is {_type_name(messages)}: expected a list of {{role, content}} objects"
        )
    if not messages:
        raise BadRecordError(location, "messages is an empty list")
    for index, message in enumerate(messages):
        _validate_message(message, f"messages[{index}]", location)
    if not any(m["role"] == "assistant" and m["content"] for m in messages):
        raise BadRecordError(
            location, "messages has no assistant message with non-empty content: nothing to train on"
        )


def _validate_message(message: Any, where: str, location: str) -> None:
    if not isinstance(message, dict):
        raise BadRecordError(
            location, f"{where} is {_type_name(message)}: expected an object with role and content"
        )
    role = _field(message, "role")
    if role is None:
        raise BadRecordError(location, f"{where} has no role")
    if role not in ROLES:
        raise BadRecordError(location, f"{where}.role is {role!r}: expected one of {', '.join(ROLES)}")
    content = _field(message, "content")
    if content is None:
        raise BadRecordError(location, f"{where} has no content")
    if not isinstance(content, str):
        raise BadRecordError(location, f"{where}.content is {_type_name(content)}: expected a string")


def _validate_prompt_completion(record: dict, location: str) -> None:
    for name in ("prompt", "completion"):
        value = _field(record, name)
        if value is None:
            other = "completion" if name == "prompt" else "prompt"
            raise BadRecordError(location, f"has {other} but no {name}")
        if not isinstance(value, str):
            raise BadRecordError(location, f"{name} is {_type_name(value)}: expected a string")
    if not record["completion"]:
        raise BadRecordError(location, "completion is empty: nothing to train on")


def _validate_text(text: Any, location: str) -> None:
    if not isinstance(text, str):
        raise BadRecordError(location, f"text is {_type_name(text)}: expected a string")
    if not text:
        raise BadRecordError(location, "text is empty: nothing to train on")


# --------------------------------------------------------------------------------------------
# Helpers


def _record_id(record: dict) -> str:
    value = _field(record, "id")
    if value is not None:
        return str(value)
    return content_hash_id(record)


def content_hash_id(record: dict) -> str:
    """``"h-"`` + 16 hex digits of the SHA-256 of the record's canonical JSON."""
    # default=str only matters for values JSON cannot hold (Parquet timestamps, bytes), which
    # would otherwise make the record unhashable.
    canonical = json.dumps(record, sort_keys=True, ensure_ascii=False, default=str)
    return "h-" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def _field(mapping: dict, name: str) -> Any:
    """The value of ``name``, with a null value counted as absent (see the module docstring)."""
    return mapping.get(name)


def _type_name(value: Any) -> str:
    """The JSON name of a value's type, with an article, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return f"a {type(value).__name__}"
