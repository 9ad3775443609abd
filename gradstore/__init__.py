"""gradstore: a gradient datastore and LESS-style data selection for instruction tuning.

The distribution has three parts, importable on their own:

- ``gradstore.indexer``: per-example projected LoRA gradients of a corpus -> a datastore on disk.
- ``gradstore.service``: the FastAPI service answering selection and influence queries.
- ``gradstore.client``: the Python SDK for that service (the only part the base install needs).

Importing ``gradstore`` itself pulls in nothing heavy.
"""

__version__ = "0.1.0"
