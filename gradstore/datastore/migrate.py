"""Converting a schema version 1 store (gradstore before datastore versions) to this format.

A version 1 store is one folder: ``examples/``, ``features/<checkpoint>/*.parquet`` holding the
features *and* the scores, an optional raw copy in ``raw_features/``, ``representations/`` as
Parquet (and ``raw_representations/``), ``index.faiss`` and ``manifest.json``. :func:`migrate`
writes the same rows as version 1 of a new-format store beside it (``.NAME.partial``) and
publishes it over the old one: examples files are copied as they are, each features file becomes
a scores file (its columns but ``feature``) and a ``.npy`` features file (bit for bit the stored
fp16 values), representations become ``.npy`` files; a Flat index is dropped (exact searches scan
the features), an approximate one is rebuilt with the same kind. Interrupted, it starts over;
the old store stays in place until the new one is complete.

Version 1 recorded no indexing settings as such; the new manifest's ``settings.config`` (where
``gradstore index --append`` starts from) is read off the sections that describe the features:
model, tokenizer (chat format, max length), LoRA, checkpoints, projection, job (batching), shards
and extras, with today's defaults for what version 1 did not record (the index memory budget, the
bad-record policy). An append still compares the model's and checkpoints' hashes with the
manifest, so a setting read wrongly is refused, naming it, never indexed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from gradstore.indexer.faiss_index import factory_for, normalized_weights

from .errors import StoreError
from .files import file_infos, write_matrix, written_atomically
from .finalize import commit_manifest, live_summary, now, version_files
from .index import build_store_index
from .layout import (AUTO_KIND, INDEX_KINDS, MANIFEST_FILE, SCHEMA_VERSION, SEGMENTS_DIR, SHARDS_DIR, SKIPPED_FILE,
                     SegmentFiles, index_file, segment_name, shard_name, work_dir_of)
from .manifest import IndexInfo, Manifest, SegmentInfo
from .publish import publish_store
from .reader import store_shards

# Manifest sections a version 1 manifest has that carry over as they are.
_KEPT = ("format", "created_at", "gradstore_version", "model", "tokenizer", "lora", "checkpoints",
         "gradient_type", "projection", "tokens", "job")


def migrate(path: str | Path, index_memory_budget: int = 4 << 30) -> Manifest:
    """Convert the schema version 1 store at ``path`` in place (see the module docstring)."""
    path = Path(path)
    try:
        old = json.loads((path / MANIFEST_FILE).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise StoreError(f"{path / MANIFEST_FILE}: cannot read the manifest ({err})") from None
    version = old.get("schema_version")
    if version == SCHEMA_VERSION:
        raise StoreError(f"{path}: already schema version {SCHEMA_VERSION}; nothing to migrate")
    if version != 1:
        raise StoreError(f"{path}: schema version {version!r} cannot be migrated (this gradstore migrates version 1)")
    work = work_dir_of(path)
    shutil.rmtree(work, ignore_errors=True)
    tmp_dir = work / SHARDS_DIR
    segment = SegmentFiles(work / SEGMENTS_DIR / segment_name(1))
    checkpoints = [c["name"] for c in old["checkpoints"]]
    extras = old.get("extras") or {"representations": None, "gradient_spectra": False, "vog": False}
    shard_rows = [_convert_shard(path, segment, shard, checkpoints, extras["representations"] is not None, tmp_dir)
                  for shard in range(old["shards"]["count"])]
    if (path / SKIPPED_FILE).exists():
        with written_atomically(segment.skipped, tmp_dir) as tmp:
            shutil.copyfile(path / SKIPPED_FILE, tmp)
    info = SegmentInfo(name=segment.root.name, first_row=0, shard_rows=shard_rows)
    shards = store_shards(work, [info])
    counts, tokens = live_summary(shards, np.empty(0, np.int64))
    at = now()
    data = {key: old[key] for key in _KEPT if key in old}
    data.update(schema_version=SCHEMA_VERSION, status="complete", version=1, updated_at=at,
                features={**old["features"], "quantized": []}, extras=extras,
                settings=_recorded_settings(old, extras),
                counts={**counts, "skipped": old["counts"].get("skipped", 0)}, tokens=tokens or old.get("tokens"),
                segments=[info.model_dump()], shards={"size": old["shards"]["size"], "count": len(shard_rows)},
                tombstones=None, index=_index(old, work, shards, checkpoints, index_memory_budget, tmp_dir),
                history=[{"version": 1, "at": at, "action": "migrate", "rows_added": counts["rows"]}], files={})
    draft = Manifest.validated(data, path)
    manifest = Manifest.validated({**draft.model_dump(mode="json"), "files": file_infos(work, version_files(work))},
                                  path)
    commit_manifest(work, manifest, tmp_dir)
    shutil.rmtree(tmp_dir, ignore_errors=True)
    publish_store(work, path, overwrite=True)
    return manifest


def _recorded_settings(old: dict, extras: dict) -> dict:
    """The manifest's ``settings``: ``{"config": ...}`` with the indexing settings the version 1
    manifest ``old`` describes (see the module docstring), as ``IndexJobConfig.settings`` lays
    them out; empty where a section they need is missing or malformed (the store still migrates;
    an append then needs every setting given, and says so)."""
    try:
        return {"config": _recorded_config(old, extras)}
    except (KeyError, TypeError, ValueError):
        return {}


def _recorded_config(old: dict, extras: dict) -> dict:
    from gradstore.indexer.checkpoints import CheckpointSpec
    from gradstore.indexer.extras import ExtraFeatures
    from gradstore.indexer.formatting import TOKENIZER_TEMPLATE_NAME
    from gradstore.indexer.job import IndexJobConfig
    from gradstore.indexer.model import LoraSpec
    from gradstore.indexer.projection import ProjectionSpec

    lora, tokenizer, job, index = old["lora"], old["tokenizer"], old.get("job") or {}, old.get("index") or {}
    config = IndexJobConfig(
        corpus=[], out=Path(), model=Path(old["model"]["path"]), tokenizer=Path(tokenizer["path"]),
        # A fresh LoRA is recorded as a checkpoint without a path; the config names none.
        checkpoints=[CheckpointSpec(name=c["name"], path=Path(c["path"]), weight=c.get("weight"))
                     for c in old["checkpoints"] if c.get("path")],
        lora=LoraSpec(r=lora["r"], alpha=lora["alpha"], target_modules=tuple(lora.get("target_modules") or ()) or None,
                      init_seed=lora.get("init_seed") or 0),
        gradient_type=old["gradient_type"], projection=ProjectionSpec.from_dict(old["projection"]),
        max_length=tokenizer["max_length"],
        template="tokenizer" if tokenizer["template"] == TOKENIZER_TEMPLATE_NAME else "default",
        max_tokens_per_batch=job.get("max_tokens_per_batch"), max_batch_size=job.get("max_batch_size"),
        shard_size=old["shards"]["size"], dtype=old["model"]["dtype"],
        index=index["kind"] if index.get("kind") in INDEX_KINDS else AUTO_KIND,
        extras=ExtraFeatures(representations=extras["representations"] is not None,
                             gradient_spectra=bool(extras["gradient_spectra"]), vog=bool(extras["vog"])))
    return config.settings()


def _convert_shard(old: Path, new: SegmentFiles, shard: int, checkpoints: list[str], representations: bool,
                   tmp_dir: Path) -> int:
    name = shard_name(shard)
    with written_atomically(new.examples(shard), tmp_dir) as tmp:
        shutil.copyfile(old / "examples" / f"{name}.parquet", tmp)
    rows = pq.read_metadata(new.examples(shard)).num_rows
    for checkpoint in checkpoints:
        table = pq.read_table(old / "features" / checkpoint / f"{name}.parquet", memory_map=True)
        dim = table.schema.field("feature").type.list_size
        feature = table.column("feature").combine_chunks().flatten().to_numpy().reshape(-1, dim)
        write_matrix(np.asarray(feature, dtype="<f2"), new.features(checkpoint, shard), tmp_dir)
        with written_atomically(new.scores(checkpoint, shard), tmp_dir) as tmp:
            pq.write_table(table.drop_columns(["feature"]), tmp, compression="none", use_dictionary=False)
    if representations:
        table = pq.read_table(old / "representations" / f"{name}.parquet", memory_map=True)
        dim = table.schema.field("representation").type.list_size
        vectors = table.column("representation").combine_chunks().flatten().to_numpy().reshape(-1, dim)
        write_matrix(np.asarray(vectors, dtype="<f2"), new.representations(shard), tmp_dir)
    return rows


def _index(old: dict, work: Path, shards, checkpoints: list[str], budget: int, tmp_dir: Path) -> dict | None:
    """Version 1's index kind, rebuilt over the converted features; a Flat index is dropped."""
    index = old.get("index")
    if index is None or index["kind"] == "flat":
        return None
    rows = sum(s.num_rows for s in shards)
    info = IndexInfo(**{**index, "file": index_file(1), "factory": factory_for(index["kind"], rows, index["dim"])})
    weights = normalized_weights([c["weight"] for c in old["checkpoints"]])
    build_store_index(work / info.file, info, shards, checkpoints, weights, old["features"]["dim"], budget, tmp_dir)
    return info.model_dump()
