"""The error of a selection query that cannot be answered as asked.

:class:`SelectionError` (a ``ValueError``) names what is wrong: a bad target, option, strategy,
score or source name, or a feature the store lacks. A damaged store raises the indexer's
``StoreError`` instead; the service maps the first to 422 and the second to 503.
"""


class SelectionError(ValueError):
    """A selection query that cannot be answered as asked (bad targets, options or names)."""
