"""Errors raised by the datastore.

Every error names the store or file and what is wrong with it, and where a user can act, what to do.

    StoreError                 a datastore is missing, incomplete, corrupt, or cannot take a change as asked
    ├── FeatureNotStoredError  a feature asked for that this store does not hold (and how to add it)
    ├── ExampleNotFoundError   no live example with this id or row (also a KeyError)
    └── SettingsMismatchError  an append whose settings differ from the store's (names each difference)
"""

from __future__ import annotations


class StoreError(Exception):
    """A datastore is missing, incomplete or corrupt, or cannot take a change as asked."""


class FeatureNotStoredError(StoreError):
    """The store lacks a feature asked for (representations, gradient spectra, VoG); the message
    says which, why, and how to re-index to add it."""


class ExampleNotFoundError(StoreError, KeyError):
    """No live example with this id (or row) in the store."""

    def __str__(self) -> str:
        return str(self.args[0])


class SettingsMismatchError(StoreError):
    """New data indexed with settings other than the store's: its features would not be comparable."""
