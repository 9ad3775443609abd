"""Finalising a run's work directory: its finished shards become a segment, and a manifest.

:func:`finalize_segment` checks that the done markers cover shards ``0..count-1`` and the rows
the run was given, that every shard file has the marker's rows (and the features files the
dimension), that the shards agree on what they hold, and moves the shard folders into
``segments/<name>/`` of the work directory. :func:`finalize_store` does that for a new store and
writes its first version: the index (approximate kinds only), every file's checksum, the manifest
(``versions/v000001.json`` and ``manifest.json``, last). Both are idempotent: rerun after a crash
at any point, they give the same files, checksums and manifest. Appends finalise through
:func:`finalize_segment` too and are published by :mod:`.versions`.

Counts and token statistics of a version are derived from its examples files
(:func:`live_summary`), never carried over by hand, so removals and appends keep them true.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gradstore.indexer.faiss_index import ONDISK_KIND, choose_factory, lists_path

from .. import __version__
from .errors import StoreError
from .files import atomic_write_bytes, file_infos, fsync_dir, matrix_offset, rename
from .index import build_store_index
from .layout import (FORMAT, INDEX_DIR, MANIFEST_FILE, PENDING_MANIFEST, SCHEMA_VERSION, SEGMENTS_DIR, SHARDS_DIR,
                     TMP_DIR, TOMBSTONES_DIR, SegmentFiles, index_file, segment_name, shard_name, version_manifest)
from .manifest import POOLING, IndexInfo, Manifest, SegmentInfo
from .reader import FEATURE_DTYPE, Shard, store_shards
from .writer import ShardDone, read_markers

_INDEX_STATE = "index.json"
_FINALIZE_STATE = "finalize.json"


@dataclass
class FinishedSegment:
    """What a run's shards hold, from their markers."""

    info: SegmentInfo
    dim: int
    checkpoints: list[str]
    representation_dim: int | None
    gradient_spectra: bool
    vog: bool
    skipped: int

    def extras(self, first_checkpoint: str) -> dict:
        return {"representations": None if self.representation_dim is None else {
                    "dim": self.representation_dim, "dtype": "float16", "normalized": True, "pooling": POOLING,
                    "checkpoint": first_checkpoint},
                "gradient_spectra": self.gradient_spectra, "vog": self.vog}


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def finalize_segment(work_dir: Path, name: str, first_row: int, expected_shards: int | None) -> FinishedSegment:
    """Check the work directory's shards and move them into ``segments/<name>/`` (see the module
    docstring); rerun after a partial move, it completes the move."""
    markers = read_markers(work_dir)
    count = _check_coverage(work_dir, markers, expected_shards, first_row)
    held = {(m.dim, tuple(m.checkpoints), m.representation_dim, m.gradient_spectra, m.vog) for m in markers.values()}
    if len(held) != 1:
        raise StoreError(f"{work_dir}: shards disagree on what they hold (dim, checkpoints, representation dim, "
                         f"gradient spectra, vog): {sorted(held, key=str)}; rerun the job with --restart")
    dim, checkpoints, representation_dim, spectra, vog = held.pop()
    segment_root = work_dir / SEGMENTS_DIR / name
    _move_shard_folders(SegmentFiles(work_dir), SegmentFiles(segment_root))
    info = SegmentInfo(name=name, first_row=first_row, shard_rows=[markers[s].num_rows for s in range(count)])
    finished = FinishedSegment(info, dim, list(checkpoints), representation_dim, spectra, vog,
                               skipped=_count_lines(SegmentFiles(segment_root).skipped))
    _check_shard_files(segment_root, finished)
    return finished


def finalize_store(work_dir: str | Path, manifest_fields: dict, index_kind: str = "auto",
                   index_memory_budget: int = 4 << 30, *, expected_shards: int | None = None) -> Manifest:
    """Turn a work directory whose shards are all written into a complete store (version 1).

    ``manifest_fields`` gives what only the job knows: ``model``, ``tokenizer``, ``lora``,
    ``checkpoints``, ``gradient_type``, ``projection``, ``job``, ``settings``, and optionally
    ``created_at`` and ``shards.size`` (default: the largest shard). Everything else is derived
    from the shards; a derived field the caller also passes must agree. ``expected_shards``, when
    given, is the number of shards the job meant to write (otherwise the highest marker decides,
    which cannot notice missing trailing shards).
    """
    work_dir = Path(work_dir)
    finished = _resume_commit(work_dir)
    if finished is not None:
        return finished
    segment = finalize_segment(work_dir, segment_name(1), 0, expected_shards)
    fields = json.loads(json.dumps(manifest_fields))  # a deep copy that also rejects non-JSON values
    checkpoints = [c.get("name") for c in fields.get("checkpoints") or []]
    created = fields.pop("created_at", None) or _creation_time(work_dir)
    shards = store_shards(work_dir, [segment.info])
    counts, tokens = live_summary(shards, np.empty(0, np.int64))
    derived = {
        "format": FORMAT, "schema_version": SCHEMA_VERSION, "status": "complete", "version": 1,
        "created_at": created, "updated_at": created, "gradstore_version": __version__,
        "features": {"dim": segment.dim, "dtype": "float16", "normalized": True, "quantized": []},
        "index": index_info(index_kind, segment.info.num_rows, segment.dim, len(checkpoints), index_memory_budget, 1),
        "counts": {**counts, "skipped": segment.skipped},
        "tokens": tokens,
        "extras": segment.extras(checkpoints[0] if checkpoints else ""),
        "segments": [segment.info.model_dump()],
        "shards": {"count": len(segment.info.shard_rows)},
        "tombstones": None,
        "history": [{"version": 1, "at": created, "action": "build", "rows_added": segment.info.num_rows}],
        "files": {},
    }
    merged = _merge_derived(fields, derived, work_dir)
    merged.setdefault("shards", {}).setdefault("size", max(segment.info.shard_rows))
    if sorted(checkpoints) != sorted(segment.checkpoints):
        raise StoreError(f"{work_dir}: the shards hold checkpoints {segment.checkpoints}, the manifest lists "
                         f"{checkpoints}")
    draft = Manifest.validated(merged, work_dir)
    _ensure_index(work_dir, draft, shards, index_memory_budget)
    files = file_infos(work_dir, version_files(work_dir))
    manifest = Manifest.validated({**draft.model_dump(mode="json"), "files": files}, work_dir)
    commit_manifest(work_dir, manifest, work_dir / SHARDS_DIR / TMP_DIR)
    shutil.rmtree(work_dir / SHARDS_DIR, ignore_errors=True)
    return manifest


def index_info(kind: str, rows: int, dim: int, checkpoints: int, budget: int, version: int) -> dict | None:
    """The manifest's ``index`` section for ``rows`` vectors, or None when exact scans serve."""
    kind, factory = choose_factory(kind, rows, dim * checkpoints, budget)
    if kind == "none":
        return None
    return {"file": index_file(version), "kind": kind, "factory": factory, "metric": "inner_product",
            "dim": dim * checkpoints, "ntotal": rows}


def live_summary(shards: Sequence[Shard], removed: np.ndarray) -> tuple[dict, dict]:
    """``(counts, tokens)`` of the live rows of ``shards``: counts {examples, rows, removed,
    by_source, truncated}, tokens {total, label_tokens, mean, p50, p95, max, truncated}."""
    columns = ["row", "source", "num_tokens", "num_label_tokens", "truncated"]
    tables = [pq.read_table(s.files.examples(s.local), columns=columns, memory_map=True) for s in shards]
    table = pa.concat_tables(tables) if tables else None
    if table is None or table.num_rows == 0:
        raise StoreError("a store needs at least one example")
    rows = table.column("row").to_numpy()
    live = ~np.isin(rows, removed)
    sources = Counter(np.asarray(table.column("source").to_pylist(), dtype=object)[live].tolist())
    lengths = table.column("num_tokens").to_numpy()[live]
    labels = table.column("num_label_tokens").to_numpy()[live]
    truncated = int(table.column("truncated").to_numpy(zero_copy_only=False)[live].sum())
    counts = {"examples": int(live.sum()), "rows": len(rows), "removed": int((~live).sum()),
              "by_source": dict(sources), "truncated": truncated}  # in order of first row
    return counts, token_statistics(lengths, labels, truncated)


def token_statistics(lengths: np.ndarray, labels: np.ndarray, truncated: int) -> dict:
    if len(lengths) == 0:
        return {"total": 0, "label_tokens": 0, "mean": 0.0, "p50": 0.0, "p95": 0.0, "max": 0, "truncated": 0}
    return {"total": int(lengths.sum()), "label_tokens": int(labels.sum()), "mean": float(lengths.mean()),
            "p50": float(np.percentile(lengths, 50)), "p95": float(np.percentile(lengths, 95)),
            "max": int(lengths.max()), "truncated": truncated}


def version_files(root: Path) -> list[str]:
    """Store-relative paths of every data file under ``root`` (not manifests, not bookkeeping)."""
    files = []
    for folder in (SEGMENTS_DIR, INDEX_DIR):
        files += [p.relative_to(root).as_posix() for p in (root / folder).rglob("*") if p.is_file()]
    files += [p.relative_to(root).as_posix() for p in (root / TOMBSTONES_DIR).glob("*.npy")]
    return sorted(files)


def commit_manifest(root: Path, manifest: Manifest, tmp_dir: Path) -> None:
    """Publish ``manifest`` as ``root``'s current version: its copy in ``versions/``, then a
    pending ``manifest.json`` renamed into place (a crash in between leaves the pending file for
    the next run to commit)."""
    manifest.write(root / version_manifest(manifest.version), tmp_dir)
    pending = root / PENDING_MANIFEST
    atomic_write_bytes(pending, manifest.to_json().encode(), tmp_dir)
    rename(pending, root / MANIFEST_FILE)


def _resume_commit(work_dir: Path) -> Manifest | None:
    """Finish a finalise that already wrote its manifest (pending or final); None if none did."""
    final, pending = work_dir / MANIFEST_FILE, work_dir / PENDING_MANIFEST
    if final.exists():
        shutil.rmtree(work_dir / SHARDS_DIR, ignore_errors=True)
        pending.unlink(missing_ok=True)
        return Manifest.load(final)
    if pending.exists():
        rename(pending, final)
        shutil.rmtree(work_dir / SHARDS_DIR, ignore_errors=True)
        return Manifest.load(final)
    if not (work_dir / SHARDS_DIR).is_dir():
        raise StoreError(f"{work_dir}: no {SHARDS_DIR}/ folder and no manifest: not a work directory "
                         f"with written shards")
    return None


def _check_coverage(work_dir: Path, markers: dict[int, ShardDone], expected_shards: int | None,
                    first_row: int) -> int:
    """Markers must cover shards 0..count-1 and rows first_row.. in order; returns count."""
    count = expected_shards if expected_shards is not None else max(markers) + 1
    missing = [s for s in range(count) if s not in markers]
    if missing:
        raise StoreError(f"{work_dir}: shard {missing[0]} ({shard_name(missing[0])}) has no done marker "
                         f"({len(missing)} of {count} shards missing); rerun the job to write it")
    if max(markers) >= count:
        raise StoreError(f"{work_dir}: shard {max(markers)} is done but only {count} shards were expected")
    next_row = first_row
    for shard in range(count):
        marker = markers[shard]
        if marker.num_rows and marker.row_start != next_row:
            problem = "gap" if marker.row_start > next_row else "overlap"
            raise StoreError(f"{work_dir}: shard {shard} ({shard_name(shard)}) starts at row {marker.row_start} "
                             f"but the shards before it end at row {next_row} ({problem})")
        next_row = marker.row_stop if marker.num_rows else next_row
    return count


def _move_shard_folders(source: SegmentFiles, target: SegmentFiles) -> None:
    """Move the shard files into the segment folder. Where an earlier attempt moved them already,
    files rewritten since (a shard rerun after a failed finalise) replace their moved copies one by
    one, and the others stay."""
    target.root.mkdir(parents=True, exist_ok=True)
    for folder, destination in zip(source.data_dirs + (source.skipped,), target.data_dirs + (target.skipped,)):
        if not folder.exists():
            continue
        if not destination.exists() or folder.is_file():
            rename(folder, destination)
            continue
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            moved = destination / path.relative_to(folder)
            moved.parent.mkdir(parents=True, exist_ok=True)
            rename(path, moved)
        shutil.rmtree(folder)
    fsync_dir(target.root)


def _check_shard_files(root: Path, segment: FinishedSegment) -> None:
    """Every shard's files exist with the marker's rows, and no other shard file lies around."""
    files, expected = SegmentFiles(root), set()
    for shard, rows in enumerate(segment.info.shard_rows):
        parquet = [files.examples(shard)] + [files.scores(c, shard) for c in segment.checkpoints]
        matrices = [(files.features(c, shard), segment.dim) for c in segment.checkpoints]
        if segment.representation_dim is not None:
            matrices.append((files.representations(shard), segment.representation_dim))
        for path in parquet:
            try:
                found = pq.read_metadata(path).num_rows
            except (OSError, pa.ArrowException) as err:
                raise StoreError(f"{path}: missing or unreadable shard file ({err})") from None
            if found != rows:
                raise StoreError(f"{path}: {found} rows, its done marker says {rows}")
        for path, dim in matrices:
            matrix_offset(path, (rows, dim), FEATURE_DTYPE)
        expected.update(parquet + [path for path, _ in matrices])
    present = {p for folder in files.data_dirs for p in folder.rglob("*") if p.is_file()}
    stray = sorted(present - expected)
    if stray:
        raise StoreError(f"{stray[0]}: not part of any completed shard (a shard without its done marker, "
                         f"or a checkpoint the manifest does not list); remove it or rerun that shard")


def _merge_derived(given: dict, derived: dict, work_dir: Path, prefix: str = "") -> dict:
    merged = dict(given)
    for key, value in derived.items():
        if key not in given:
            merged[key] = value
        elif isinstance(value, dict) and isinstance(given[key], dict) and value:
            merged[key] = _merge_derived(given[key], value, work_dir, f"{prefix}{key}.")
        elif given[key] != value:
            raise StoreError(f"{work_dir}: manifest field {prefix}{key} = {given[key]!r} disagrees with "
                             f"{value!r} found in the shards")
    return merged


def _creation_time(work_dir: Path) -> str:
    """Fixed by the first finalise attempt, so a rerun writes the same manifest."""
    state = work_dir / SHARDS_DIR / _FINALIZE_STATE
    if state.exists():
        return json.loads(state.read_text())["created_at"]
    created = now()
    atomic_write_bytes(state, json.dumps({"created_at": created}).encode(), work_dir / SHARDS_DIR / TMP_DIR)
    return created


def _count_lines(path: Path) -> int:
    if not path.exists():
        return 0
    with open(path, "rb") as file:
        return sum(1 for line in file if line.strip())


def _ensure_index(work_dir: Path, manifest: Manifest, shards: Sequence[Shard], budget: int) -> None:
    """Build the index unless an earlier attempt already built this very index (and remove
    what an attempt with another index kind left)."""
    info = manifest.index
    keep = set() if info is None else {work_dir / info.file}
    if info is not None and info.kind == ONDISK_KIND:
        keep.add(lists_path(work_dir / info.file))
    for leftover in set((work_dir / INDEX_DIR).glob("*")) - keep:
        leftover.unlink()
    if info is None:
        return
    state = work_dir / SHARDS_DIR / _INDEX_STATE
    wanted = info.model_dump()
    if (work_dir / info.file).exists() and state.exists() and json.loads(state.read_text()) == wanted:
        return
    state.unlink(missing_ok=True)
    tmp_dir = work_dir / SHARDS_DIR / TMP_DIR
    build_store_index(work_dir / info.file, IndexInfo(**wanted), shards, [c.name for c in manifest.checkpoints],
                      manifest.weights, manifest.features.dim, budget, tmp_dir)
    atomic_write_bytes(state, json.dumps(wanted).encode(), tmp_dir)
