"""The gradstore datastore: the on-disk format, its writer, its versions and its reader.

Shared by the indexer (which writes stores), the selection engine and the service (which read
them) and the CLI (which changes them); it needs numpy, pyarrow and FAISS, never torch. One module
per part of the format:

============== ==================================================================================
``layout``     the format's specification (its docstring), folder and file names, Parquet schemas
``manifest``   ``manifest.json``: the pydantic model of one version, validated on load
``files``      atomic writes, checksums, ``.npy`` matrices read through memory maps
``writer``     a run's shards in its work directory, with done markers (resumable)
``finalize``   a run's shards → a segment; a new store's first version
``index``      the approximate FAISS index: built from the features files, extended on append
``publish``    atomic publication of a finished folder (a new store, a warmup run)
``versions``   the next version of a store: append, remove, compact, prune
``migrate``    schema version 1 stores → this format
``reader``     :class:`Datastore`: one version, opened read-only
``quantized``  optional quantised copies of the features
``errors``     the exception hierarchy
============== ==================================================================================
"""

from importlib import import_module

# Public names and the module each lives in, imported on first use: the CLI's parser reads this
# package's commands with the base install (no numpy, pyarrow or FAISS).
_EXPORTS = {
    "ExampleNotFoundError": "errors", "FeatureNotStoredError": "errors", "SettingsMismatchError": "errors",
    "StoreError": "errors", "os_reason": "files", "finalize_segment": "finalize", "finalize_store": "finalize",
    "MANIFEST_FILE": "layout", "PENDING_MANIFEST": "layout", "SCHEMA_VERSION": "layout", "SCORE_NAMES": "layout",
    "SHARDS_DIR": "layout", "SPECTRA_SCORES": "layout", "SegmentFiles": "layout", "work_dir_of": "layout",
    "Manifest": "manifest", "publish_folder": "publish", "publish_store": "publish", "Datastore": "reader",
    "compact": "versions", "prune": "versions", "publish_append": "versions", "quantize": "versions",
    "remove": "versions",
    "FeatureBatch": "writer", "completed_shards": "writer", "examples_table": "writer", "write_shard": "writer",
    "migrate": "migrate",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value
