"""New versions of a published store: append, remove, compact, prune.

Every change publishes a new version the same way: the files it adds go into the store under
names no version has used (a new segment, ``index/vNNNNNN.faiss``, ``tombstones/vNNNNNN.npy``),
then :func:`~.finalize.commit_manifest` writes ``versions/vNNNNNN.json`` and replaces
``manifest.json`` in one rename. Until that rename readers see the old version, whose files are
untouched; a reader that opened the old version keeps reading it afterwards. Changes take the
store's lock (``.lock``, ``flock``), so two of them never publish over each other; an append
computes without it and is refused at publication if another change was published meanwhile.

* **append** (:func:`publish_append`): a run's finished segment (``gradstore index --append``)
  is checked against the store (dimension, checkpoints, extras), moved into ``segments/``, its
  rows added to a copy of the index (or the index rebuilt, for ``ivf-ondisk``), rows it replaces
  marked removed. The new manifest is written into the run's work directory first, so a run killed
  at any point after it completes the publication when rerun.
* **remove** (:func:`remove`): rows of a source, or of given ids, marked removed.
* **compact** (:func:`compact`): the live rows rewritten into one new segment (rows renumbered
  ``0..N-1``, shards of the store's shard size), the index rebuilt, no removed rows; then
  :func:`prune`.
* **quantize** (:func:`quantize`): a quantised copy (``int8``, ``1bit``) of every shard's
  features added; appends and compactions then write one for their rows too.
* **prune** (:func:`prune`): files and version manifests that none of the last ``keep`` versions
  uses are deleted (default 2: the current and the previous version, so a query that started on
  the previous one finishes).
"""

from __future__ import annotations

import fcntl
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gradstore.indexer.faiss_index import can_extend, factory_for

from .errors import StoreError
from .files import file_infos, map_matrix, rename, write_matrix, written_atomically
from .finalize import (FinishedSegment, commit_manifest, live_summary, now, version_files)
from .index import build_store_index, extend_store_index
from .layout import (DEFAULT_KEEP_VERSIONS, INDEX_DIR, MANIFEST_FILE, PENDING_MANIFEST, SEGMENTS_DIR, SHARDS_DIR, SKIPPED_FILE,
                     TMP_DIR, TOMBSTONES_DIR, VERSIONS_DIR, SegmentFiles, index_file, segment_name,
                     segment_number, tombstones_file, version_manifest)
from .manifest import IndexInfo, Manifest, SegmentInfo
from .quantized import QUANTIZATIONS, encode
from .quantized import save as save_quantized
from .reader import FEATURE_DTYPE, Datastore, Shard, store_shards

LOCK_FILE = ".lock"


@contextmanager
def store_lock(store: Path) -> Iterator[None]:
    """Hold the store's change lock (blocking until other changes finish)."""
    try:
        handle = open(Path(store) / LOCK_FILE, "a+")
    except OSError as err:
        raise StoreError(f"{store}: cannot take the store's lock ({err.strerror}); is it a writable datastore?") from None
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def next_segment_name(store: Path, manifest: Manifest) -> str:
    """A segment name no version of the store has used (one above the highest any kept
    version names)."""
    numbers = [segment_number(s.name) for s in manifest.segments]
    for kept in (Path(store) / VERSIONS_DIR).glob("v*.json"):
        try:
            numbers += [segment_number(s.name) for s in Manifest.load(kept).segments]
        except StoreError:
            continue  # a damaged history entry names nothing this store serves
    return segment_name(max(numbers, default=0) + 1)


def _next(manifest: Manifest, action: str, rows_added: int = 0, rows_removed: int = 0) -> dict:
    """The fields of the version after ``manifest`` that every change updates."""
    version, at = manifest.version + 1, now()
    history = [h.model_dump() for h in manifest.history]
    history.append({"version": version, "at": at, "action": action, "rows_added": rows_added,
                    "rows_removed": rows_removed})
    return {"version": version, "updated_at": at, "history": history}


# ---------------------------------------------------------------------------------------- append


def publish_append(store: Path, work_dir: Path, base_version: int, segment: FinishedSegment,
                   replaced_rows: np.ndarray, job: dict, index_memory_budget: int = 4 << 30) -> Manifest:
    """Publish the finished segment of an append run as the store's next version (see the
    module docstring). ``replaced_rows`` are live rows whose ids the new rows take over."""
    store, work_dir = Path(store), Path(work_dir)
    with store_lock(store):
        current = Manifest.load(store / MANIFEST_FILE)
        pending = work_dir / PENDING_MANIFEST
        if pending.exists():
            manifest = Manifest.load(pending)
            if current.version not in (base_version, manifest.version):
                raise StoreError(f"{store}: changed since this append started (version {base_version} -> "
                                 f"{current.version}); rerun the append with --restart")
        else:
            if current.version != base_version:
                raise StoreError(f"{store}: changed since this append started (version {base_version} -> "
                                 f"{current.version}); rerun the append with --restart")
            manifest = _append_manifest(store, work_dir, current, segment, replaced_rows, job, index_memory_budget)
            manifest.write(pending, work_dir / SHARDS_DIR / TMP_DIR)
        if current.version != manifest.version:
            _move_new_files(work_dir, store)
            commit_manifest(store, manifest, store / SHARDS_DIR)
    shutil.rmtree(work_dir, ignore_errors=True)
    shutil.rmtree(store / SHARDS_DIR, ignore_errors=True)
    return manifest


def _append_manifest(store: Path, work_dir: Path, base: Manifest, segment: FinishedSegment,
                     replaced_rows: np.ndarray, job: dict, budget: int) -> Manifest:
    _check_compatible(store, base, segment)
    fields = _next(base, "append", rows_added=segment.info.num_rows, rows_removed=len(replaced_rows))
    version, tmp_dir = fields["version"], work_dir / SHARDS_DIR / TMP_DIR
    old_shards = store_shards(store, base.segments)
    new_shards = store_shards(work_dir, [segment.info])
    removed = np.union1d(Datastore(store, base).removed_rows(), np.asarray(replaced_rows, dtype=np.int64))
    tombstones = _write_tombstones(work_dir, version, removed, tmp_dir) if len(removed) else None
    index = _appended_index(store, work_dir, base, old_shards, new_shards, version, budget, tmp_dir)
    counts, tokens = live_summary(old_shards + new_shards, removed)
    write_quantized(new_shards, [c.name for c in base.checkpoints], base.features.quantized, base.features.dim,
                    tmp_dir)
    new_files = file_infos(work_dir, version_files(work_dir))
    kept = {path: info.model_dump() for path, info in base.files.items()
            if path != base.tombstones and (base.index is None or index is None or
                                            not path.startswith(_index_stem(base.index.file)))}
    data = base.model_dump(mode="json")
    data.update(fields, job=job, index=index, tombstones=tombstones and tombstones_file(version),
                counts={**counts, "skipped": base.counts.skipped + segment.skipped}, tokens=tokens,
                segments=data["segments"] + [segment.info.model_dump()],
                shards={"size": base.shards.size, "count": base.shards.count + len(segment.info.shard_rows)},
                files={**kept, **new_files})
    return Manifest.validated(data, work_dir)


def _check_compatible(store: Path, base: Manifest, segment: FinishedSegment) -> None:
    names = [c.name for c in base.checkpoints]
    theirs = (segment.dim, sorted(segment.checkpoints), segment.representation_dim, segment.gradient_spectra,
              segment.vog)
    representation = base.extras.representations
    ours = (base.features.dim, sorted(names), representation and representation.dim,
            base.extras.gradient_spectra, base.extras.vog)
    if theirs != ours:
        fields = ("feature dim", "checkpoints", "representation dim", "gradient spectra", "vog")
        differ = [f"{f}: store {o!r}, new rows {t!r}" for f, o, t in zip(fields, ours, theirs) if o != t]
        raise StoreError(f"{store}: the new rows were indexed differently from the store ({'; '.join(differ)})")
    if segment.info.first_row != base.counts.rows:
        raise StoreError(f"{store}: the new rows start at row {segment.info.first_row}, the store ends at "
                         f"{base.counts.rows}")


def _appended_index(store: Path, work_dir: Path, base: Manifest, old_shards, new_shards, version: int,
                    budget: int, tmp_dir: Path) -> dict | None:
    if base.index is None:
        return None
    rows = base.counts.rows + sum(s.num_rows for s in new_shards)
    names, weights, dim = [c.name for c in base.checkpoints], base.weights, base.features.dim
    kind = base.index.kind
    info = IndexInfo(**{**base.index.model_dump(), "file": index_file(version), "ntotal": rows})
    path = work_dir / info.file
    if can_extend(kind):
        extend_store_index(store / base.index.file, path, info, new_shards, names, weights, dim, tmp_dir)
    else:
        info = IndexInfo(**{**info.model_dump(), "factory": factory_for(kind, rows, info.dim)})
        build_store_index(path, info, list(old_shards) + list(new_shards), names, weights, dim, budget, tmp_dir)
    return info.model_dump()


def _index_stem(file: str) -> str:
    return file[: -len(".faiss")] if file.endswith(".faiss") else file


def _move_new_files(work_dir: Path, store: Path) -> None:
    """Move the run's new segment, index and tombstones into the store (what an earlier attempt
    already moved is skipped; a leftover under the same name, which no version uses, is replaced)."""
    for folder in (SEGMENTS_DIR, INDEX_DIR, TOMBSTONES_DIR):
        if not (work_dir / folder).is_dir():
            continue
        for item in sorted((work_dir / folder).iterdir()):
            target = store / folder / item.name
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():
                shutil.rmtree(target) if target.is_dir() else target.unlink()
            rename(item, target)


def _write_tombstones(root: Path, version: int, removed: np.ndarray, tmp_dir: Path) -> str:
    relative = tombstones_file(version)
    write_matrix(np.asarray(removed, dtype=np.int64), root / relative, tmp_dir)
    return relative


# ---------------------------------------------------------------------------------------- remove


def rows_to_remove(store: Datastore, source: str | None = None, ids: Sequence[str] | None = None) -> np.ndarray:
    """The live rows of ``source`` or of ``ids`` (every id must be a live example's)."""
    if (source is None) == (ids is None):
        raise StoreError("give a source or ids to remove, not both")
    if source is not None:
        codes, names = store.source_codes()
        if source not in names:
            raise StoreError(f"{store.path}: no source {source!r} (the store has {sorted(store.manifest.counts.by_source)})")
        rows = np.flatnonzero(codes == names.index(source)).astype(np.int64)
        return rows[store.is_live(rows)]
    missing = []
    rows = []
    for id in ids:
        try:
            rows.append(store.row_of(id))
        except KeyError:
            missing.append(id)
    if missing:
        raise StoreError(f"{store.path}: {len(missing)} of the ids to remove are not live examples of the store, "
                         f"e.g. {missing[:3]}")
    return np.unique(np.asarray(rows, dtype=np.int64))


def remove(store: str | Path, source: str | None = None, ids: Sequence[str] | None = None) -> Manifest:
    """Mark the rows of ``source`` (or of ``ids``) removed, as a new version."""
    store = Path(store)
    with store_lock(store):
        current = Datastore.open(store)
        rows = rows_to_remove(current, source, ids)
        if not len(rows):
            raise StoreError(f"{store}: nothing to remove (source {source!r} has no live examples)")
        base = current.manifest
        fields = _next(base, "remove", rows_removed=len(rows))
        removed = np.union1d(current.removed_rows(), rows)
        if len(removed) == base.counts.rows:
            raise StoreError(f"{store}: removing these {len(rows)} rows would leave the store empty")
        relative = _write_tombstones(store, fields["version"], removed, store / SHARDS_DIR)
        counts, tokens = live_summary(current.shards, removed)
        files = {path: info.model_dump() for path, info in base.files.items() if path != base.tombstones}
        files.update(file_infos(store, [relative]))
        data = base.model_dump(mode="json")
        data.update(fields, tombstones=relative, counts={**counts, "skipped": base.counts.skipped}, tokens=tokens,
                    files=files)
        manifest = Manifest.validated(data, store)
        commit_manifest(store, manifest, store / SHARDS_DIR)
    shutil.rmtree(store / SHARDS_DIR, ignore_errors=True)
    return manifest


# --------------------------------------------------------------------------------------- compact


def compact(store: str | Path, keep_versions: int = DEFAULT_KEEP_VERSIONS,
            index_memory_budget: int = 4 << 30) -> Manifest:
    """Rewrite the live rows into one new segment as a new version, then :func:`prune`."""
    store = Path(store)
    with store_lock(store):
        current = Datastore.open(store)
        base = current.manifest
        name = next_segment_name(store, base)
        root, tmp_dir = store / SEGMENTS_DIR / name, store / SHARDS_DIR
        shutil.rmtree(root, ignore_errors=True)  # a crashed compaction's leftover: no version uses it
        live = current.live_rows()
        info = _copy_rows(current, live, SegmentFiles(root), base.shards.size, tmp_dir)
        fields = _next(base, "compact", rows_removed=base.counts.removed)
        version = fields["version"]
        shards = store_shards(store, [info])
        write_quantized(shards, current.checkpoint_names, base.features.quantized, base.features.dim, tmp_dir)
        counts, tokens = live_summary(shards, np.empty(0, np.int64))
        index = None
        if base.index is not None:
            kind = base.index.kind
            index = IndexInfo(**{**base.index.model_dump(), "file": index_file(version), "ntotal": len(live),
                                 "factory": factory_for(kind, len(live), base.index.dim)})
            build_store_index(store / index.file, index, shards, current.checkpoint_names, base.weights,
                              base.features.dim, index_memory_budget, tmp_dir)
            index = index.model_dump()
        relatives = sorted(p.relative_to(store).as_posix() for p in root.rglob("*") if p.is_file())
        if index is not None:
            relatives += [p.relative_to(store).as_posix() for p in (store / INDEX_DIR).glob(f"{Path(index['file']).stem}.*")]
        data = base.model_dump(mode="json")
        data.update(fields, index=index, tombstones=None, counts={**counts, "skipped": base.counts.skipped},
                    tokens=tokens, segments=[info.model_dump()],
                    shards={"size": base.shards.size, "count": len(info.shard_rows)},
                    files=file_infos(store, relatives))
        manifest = Manifest.validated(data, store)
        commit_manifest(store, manifest, tmp_dir)
        prune(store, keep_versions, locked=True)
    shutil.rmtree(store / SHARDS_DIR, ignore_errors=True)
    return manifest


def _copy_rows(store: Datastore, rows: np.ndarray, target: SegmentFiles, shard_size: int,
               tmp_dir: Path) -> SegmentInfo:
    """Write ``rows`` of ``store`` as shards of ``target``, renumbered from 0 in the given order."""
    skipped = [store.path / SEGMENTS_DIR / s.name / SKIPPED_FILE for s in store.manifest.segments]
    lines = b"".join(p.read_bytes() for p in skipped if p.exists())
    if lines:
        with written_atomically(target.skipped, tmp_dir) as tmp:
            tmp.write_bytes(lines)
    shard_rows = []
    for shard, start in enumerate(range(0, len(rows), shard_size)):
        chosen = rows[start:start + shard_size]
        renumbered = pa.array(np.arange(start, start + len(chosen), dtype=np.int64))
        examples = _gather_table(store, chosen, store.examples_file)
        _write_table(examples.set_column(0, "row", renumbered), target.examples(shard), tmp_dir, "zstd")
        for checkpoint in store.checkpoint_names:
            scores = _gather_table(store, chosen, lambda s, c=checkpoint: store.scores_file(c, s))
            _write_table(scores.set_column(0, "row", renumbered), target.scores(checkpoint, shard), tmp_dir, "none")
            write_matrix(store.features_at(checkpoint, chosen), target.features(checkpoint, shard), tmp_dir)
        if store.has_representations:
            write_matrix(store.representations_at(chosen), target.representations(shard), tmp_dir)
        shard_rows.append(len(chosen))
    return SegmentInfo(name=target.root.name, first_row=0, shard_rows=shard_rows)


def _gather_table(store: Datastore, rows: np.ndarray, path_of) -> pa.Table:
    """The Parquet rows ``rows`` (ascending) of the files ``path_of(shard)``, in that order."""
    parts = []
    for shard, _, local in store._by_shard(rows):
        parts.append(pq.read_table(path_of(shard), memory_map=True).take(pa.array(local)))
    return pa.concat_tables(parts)


def _write_table(table: pa.Table, final: Path, tmp_dir: Path, compression: str) -> None:
    with written_atomically(final, tmp_dir) as tmp:
        pq.write_table(table, tmp, compression=compression, use_dictionary=compression != "none")


# -------------------------------------------------------------------------------------- quantize


def quantize(store: str | Path, kind: str) -> Manifest:
    """Add a quantised copy of ``kind`` (:data:`~.quantized.QUANTIZATIONS`) of every shard's
    features, as a new version."""
    store = Path(store)
    if kind not in QUANTIZATIONS:
        raise StoreError(f"unknown quantisation {kind!r}: expected one of {', '.join(QUANTIZATIONS)}")
    with store_lock(store):
        current = Datastore.open(store)
        base = current.manifest
        if kind in base.features.quantized:
            raise StoreError(f"{store}: already holds a {kind} copy of its features")
        tmp_dir = store / SHARDS_DIR
        written = write_quantized(current.shards, current.checkpoint_names, [kind], current.dim, tmp_dir)
        data = base.model_dump(mode="json")
        data.update(_next(base, "quantize"), features={**data["features"], "quantized": base.features.quantized + [kind]},
                    files={**data["files"], **file_infos(store, [p.relative_to(store).as_posix() for p in written])})
        manifest = Manifest.validated(data, store)
        commit_manifest(store, manifest, tmp_dir)
    shutil.rmtree(store / SHARDS_DIR, ignore_errors=True)
    return manifest


def write_quantized(shards: Sequence[Shard], checkpoints: Sequence[str], kinds: Sequence[str], dim: int,
                    tmp_dir: Path) -> list[Path]:
    """Write the ``kinds`` of quantised copy of every shard's features beside them; returns the files."""
    written = []
    for shard in shards:
        for checkpoint in checkpoints:
            features = map_matrix(shard.files.features(checkpoint, shard.local), (shard.num_rows, dim), FEATURE_DTYPE)
            for kind in kinds:
                written += save_quantized(encode(features, kind), shard.files.quantized(kind, checkpoint, shard.local),
                                          tmp_dir)
    return written


# ----------------------------------------------------------------------------------------- prune


def prune(store: str | Path, keep: int = DEFAULT_KEEP_VERSIONS, locked: bool = False) -> list[str]:
    """Delete what none of the last ``keep`` versions uses: data files, and the manifests of
    older versions in ``versions/``. Returns the store-relative paths deleted."""
    if keep < 1:
        raise StoreError(f"keep must be at least 1 (the current version), got {keep}")
    store = Path(store)
    if not locked:
        with store_lock(store):
            return prune(store, keep, locked=True)
    current = Manifest.load(store / MANIFEST_FILE)
    kept_versions = range(max(1, current.version - keep + 1), current.version + 1)
    used = set(current.files)
    for version in kept_versions:
        path = store / version_manifest(version)
        if path.exists():
            used |= set(Manifest.load(path).files)
    deleted = [relative for relative in version_files(store) if relative not in used]
    for relative in deleted:
        (store / relative).unlink()
    for path in (store / VERSIONS_DIR).glob("v*.json"):
        if path.stem[1:].isdigit() and int(path.stem[1:]) < kept_versions.start:
            path.unlink()
            deleted.append(path.relative_to(store).as_posix())
    for folder in sorted((store / SEGMENTS_DIR).rglob("*"), reverse=True):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    return sorted(deleted)
