"""Errors raised by the indexer and the datastore.

Every error names what is wrong and where (a file and line, a parameter name, a store path), so a
user can fix the input without reading gradstore's code.

    IndexerError
    ├── CorpusError            a corpus file cannot be read, or a record in it is malformed
    │   └── BadRecordError     one record: carries ``location`` ("file:line") and ``reason``
    ├── ModelError             the model, tokenizer or LoRA set-up cannot be loaded or used
    ├── CheckpointError        a checkpoint directory is incomplete or inconsistent
    │   └── OptimizerStateError  optimizer state missing, unreadable or not matching the LoRA params
    └── JobError               an indexing job cannot start or resume as asked

The datastore's own errors (``StoreError`` and its subclasses) are defined in
:mod:`gradstore.datastore.errors` and re-exported here, since the indexer raises them too.
"""

from __future__ import annotations

from gradstore.datastore.errors import FeatureNotStoredError, StoreError  # noqa: F401 (re-exported)


class IndexerError(Exception):
    """Base class of every error raised by ``gradstore.indexer``."""


class CorpusError(IndexerError):
    """A corpus file cannot be read."""


class BadRecordError(CorpusError):
    """One malformed record; ``location`` is ``"path:line"`` (JSONL) or ``"path:row N"``."""

    def __init__(self, location: str, reason: str):
        self.location = location
        self.reason = reason
        super().__init__(f"{location}: {reason}")


class ModelError(IndexerError):
    """The model, tokenizer or LoRA configuration cannot be loaded or used."""


class CheckpointError(IndexerError):
    """A checkpoint directory is incomplete or inconsistent."""


class OptimizerStateError(CheckpointError):
    """Optimizer state is missing, unreadable, or does not match the trainable LoRA parameters."""


class JobError(IndexerError):
    """An indexing job cannot start or resume as asked."""
