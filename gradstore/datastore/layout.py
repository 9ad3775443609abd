"""The on-disk datastore format, schema version 2 (this docstring is its specification).

A datastore holds, for every training example of a corpus and for each of several model
checkpoints, the example's L2-normalised projected gradient ("feature", ``k`` dims, float16) and
its per-example scores (gradient norm, feature norm, loss and, in stores that have them, gradient
spectra), plus the examples themselves (with their VoG), their representation vectors, an
optional approximate FAISS index and a manifest that describes and checksums everything. What
representation vectors, gradient spectra and VoG are is specified in ``gradstore.indexer.extras``.

A store is a sequence of immutable **versions**. Each version is one manifest naming the files it
consists of; files are written once, under names no earlier version used, and never modified, so
a reader holding version ``v`` keeps reading it while ``v + 1`` is published beside it.

Layout of a store directory
===========================

::

    STORE/
      manifest.json                           the current version's manifest (replaced atomically)
      versions/v000001.json ...               every published version's manifest, kept
      segments/seg-000001/                    the rows one indexing run added (immutable)
        examples/part-00000.parquet ...       one file per shard, rows in order, zstd
        scores/<checkpoint>/part-00000.parquet ...   per-example scores, uncompressed
        features/<checkpoint>/part-00000.npy ...     the features: the one stored copy
        representations/part-00000.npy ...    representation vectors (stores with extras.representations)
        quantized/<kind>/<checkpoint>/part-00000.{codes,scales}.npy ...   optional quantised features
        skipped.jsonl                         records this run skipped (only when there were some)
      index/v000001.faiss                     FAISS index (only with an approximate index kind)
      index/v000001.ivfdata                   its inverted lists (index kind "ivf-ondisk" only)
      tombstones/v000002.npy                  rows removed as of that version (only after a removal)

Rows, segments and shards
    Every stored example has a global ``row``, 0-based and dense: rows ``0..R-1`` with no gap or
    duplicate, ``R`` = ``counts.rows``. ``row`` is the example's FAISS id. The manifest's
    ``segments`` lists the segments in row order; each covers a contiguous range of rows and holds
    them in shards (``shard_rows``: the rows of each shard, in order), so the store's shards in
    segment order read the rows in order. Shard ``i`` of a segment is file ``part-{i:05d}`` (wider
    numbers when ``i >= 100000``). The store's shards are numbered globally across segments (the
    first shard of segment 2 follows the last of segment 1); readers ask :class:`StoreLayout`
    for a global shard's files. Every checkpoint has exactly the rows of the examples shard.

Removed rows
    ``gradstore remove`` marks rows removed without rewriting anything: the version's
    ``tombstones`` file lists them (``.npy``, int64, sorted, unique; every removed row of the
    version, not only the latest ones). A removed row keeps its number and its data until
    ``gradstore compact`` writes the live rows into one new segment, renumbered ``0..N-1`` in
    row order. Every reader leaves removed rows out (selection pools, searches, id lookups).

``examples/part-XXXXX.parquet`` (zstd-compressed)
    ``row`` int64, ``id`` string (the record id, unique among the live rows), ``source`` string
    (corpus name), ``location`` string (``"file:line"`` of the record), ``record`` string (the
    original record as JSON text), ``num_tokens`` int32, ``num_label_tokens`` int32 (tokens carrying
    loss), ``truncated`` bool (the example was cut to the maximum length); in stores with VoG
    (``extras.vog``), also ``vog`` float32 (the example's variance of input-embedding gradients
    across the checkpoints).

``scores/<checkpoint>/part-XXXXX.parquet`` (uncompressed, no dictionary encoding)
    ``row`` int64, ``grad_norm`` float32 (norm of the unprojected gradient), ``feature_norm``
    float32 (norm of the projection before normalisation), ``loss`` float32; in stores with
    gradient spectra (``extras.gradient_spectra``), also ``nuclear_norm`` and ``effective_rank``
    float32 (each the mean over the LoRA-adapted matrices of that statistic of the example's
    weight gradient at this checkpoint). ``<checkpoint>`` is the checkpoint's name from the
    manifest (letters, digits, ``._-``; not starting with ``.`` or ``_``).

``features/<checkpoint>/part-XXXXX.npy``
    The shard's features at that checkpoint, the only stored copy: a NumPy ``.npy`` file (format
    version 1.0, dtype ``<f2``, ``fortran_order`` false, shape ``(rows of the shard, k)``), row
    ``j`` of the matrix being the shard's ``j``-th row: the projected gradient divided by its L2
    norm (an all-zero vector stands for a zero gradient). ``numpy.load(path, mmap_mode="r")`` maps
    it without decoding, so any tool reads it and a selection scan reads it at memory speed.

``representations/part-XXXXX.npy`` (stores with ``extras.representations``)
    The shard's representation vectors (RDS+'s position-weighted mean of the last hidden states of
    the model with the first checkpoint's adapter, L2-normalised), ``<f2`` ``(rows, hidden)``, as
    the features files.

``quantized/<kind>/<checkpoint>/part-XXXXX.codes.npy`` and ``.scales.npy`` (optional)
    A compressed copy of the shard's features (``kind``: ``int8`` or ``1bit``, QLESS-style; every
    shard has the kinds ``features.quantized`` names), specified in
    :mod:`gradstore.datastore.quantized`; ``gradstore quantize`` adds one to a store as a new
    version, and appends and compactions write it for their rows.

``index/vNNNNNN.faiss``
    ``faiss.write_index`` output, metric inner product, one vector per row in row order (removed
    rows included: searches drop them): ``concat_c(sqrt(w_c) · feature_c)`` over the manifest's
    checkpoints in manifest order, with the checkpoint weights ``w`` normalised to sum to 1 (see
    ``gradstore.indexer.faiss_index``). A query built the same way scores
    ``Σ_c w_c · cos(train_c, target_c)``. Only approximate kinds are stored: exact searches scan
    the features files. Named after the version that built it; an append extends a copy (kinds
    that allow it) under the new version's name.

``index/vNNNNNN.ivfdata`` (index kind ``ivf-ondisk`` only)
    The inverted lists of the ``.faiss`` file of the same name (``faiss.OnDiskInvertedLists``),
    which that file names by its file name alone; a reader looks for it in the index's folder
    (``faiss.IO_FLAG_ONDISK_SAME_DIR``), so the store stays relocatable.

``manifest.json`` and ``versions/vNNNNNN.json``
    JSON objects validated by :class:`~gradstore.datastore.manifest.Manifest` (unknown keys are
    errors); the field list is in that class's docstring. ``files`` lists every file of the
    version with its size and SHA-256: a reader uses exactly the files the manifest lists.

    A reader refuses a ``schema_version`` it does not know. Stores of schema version 1 (one
    folder, the features also in Parquet, a Flat index) are converted by ``gradstore migrate``.

How a store is written
======================

An indexing run writes its shards into a private work directory (:mod:`.writer`: each file to a
temporary name and renamed into place, then a done marker), so a killed run resumes by rewriting
the shards without markers. :mod:`.finalize` turns the finished shards into a segment and the
manifest of the new version: of a new store (``gradstore index``), then published by renaming the
work directory into place, or of the next version of an existing one (``gradstore index
--append``; :mod:`.versions`: ``remove``, ``compact``), published by moving the segment into the
store and replacing ``manifest.json`` in one rename (:mod:`.publish`). Either way a reader sees
the old version or the new one, never a mixture, and a crash at any point leaves the old version
in place and the run resumable.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

SCHEMA_VERSION = 2
FORMAT = "gradstore-datastore"
MANIFEST_FILE = "manifest.json"
VERSIONS_DIR = "versions"
SEGMENTS_DIR = "segments"
INDEX_DIR = "index"
TOMBSTONES_DIR = "tombstones"
SKIPPED_FILE = "skipped.jsonl"
EXAMPLES_DIR = "examples"
SCORES_DIR = "scores"
FEATURES_DIR = "features"
REPRESENTATIONS_DIR = "representations"
QUANTIZED_DIR = "quantized"
#: The kinds of quantised copy (``gradstore.datastore.quantized.QUANTIZATIONS`` is this tuple).
QUANTIZATION_CHOICES = ("int8", "1bit")
#: What a selection may scan: the stored float16 features, or one of their quantised copies.
FULL_PRECISION = "fp16"
PRECISIONS = (FULL_PRECISION, *QUANTIZATION_CHOICES)
AUTO_KIND = "auto"
NO_INDEX_KIND = "none"
ONDISK_KIND = "ivf-ondisk"
#: Every value of a store's index setting (the CLI's --index, the job config, the manifest's
#: index.kind), with what it is, for help texts; auto resolves to one of the others
#: (``gradstore.indexer.faiss_index`` builds them).
INDEX_KINDS = {
    AUTO_KIND: "none for small stores, else the first approximate index that fits the memory budget",
    NO_INDEX_KIND: "no index: exact search scans the stored features",
    "flat": "exact, float32 (twice the features' bytes)",
    "sq16": "exact up to fp16 rounding (the features' bytes again)",
    "sq8": "8-bit scalar quantizer (half the features' bytes)",
    "pq": "4-bit product quantizer, fast scan (128 bytes a vector)",
    "ivf": "inverted lists of fp16 codes (approximate)",
    "ivf-sq8": "inverted lists of 8-bit codes (approximate)",
    "ivf-pq": "inverted lists of 4-bit product codes (approximate)",
    "hnsw": "HNSW graph over fp16 codes (approximate)",
    "hnsw-sq8": "HNSW graph over 8-bit codes (approximate)",
    ONDISK_KIND: "ivf with its lists merged on disk, built within the memory budget",
}
#: Bookkeeping of a work directory (done markers, job fingerprint, temporary files): never published.
SHARDS_DIR = "_shards"
TMP_DIR = "tmp"
PENDING_MANIFEST = ".manifest.json.pending"
#: Versions whose files ``compact`` and ``prune`` keep: the current one and the one before it, so a
#: query that started on the previous version finishes.
DEFAULT_KEEP_VERSIONS = 2

#: The per-example scores a store can hold, in display order: the first three of every
#: checkpoint, the spectra with ``extras.gradient_spectra``, ``vog`` (one per example) with ``extras.vog``.
SCORE_NAMES = ("loss", "grad_norm", "feature_norm", "nuclear_norm", "effective_rank", "vog")
SPECTRA_SCORES = ("nuclear_norm", "effective_rank")
CHECKPOINT_SCORES = ("grad_norm", "feature_norm", "loss")

_CHECKPOINT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_SEGMENT_NAME = re.compile(r"^seg-(\d{6,})$")


def check_checkpoint_name(name: str, error: type[Exception] | None = None) -> None:
    """Checkpoint names become directory names: refuse anything that is not a plain one."""
    if not isinstance(name, str) or not _CHECKPOINT_NAME.match(name):
        from .errors import StoreError

        raise (error or StoreError)(f"checkpoint name {name!r} is not usable as a directory name "
                                    f"(letters, digits and ._- only, not starting with . or _)")


def shard_name(shard: int) -> str:
    """``part-00012`` for shard 12."""
    return f"part-{shard:05d}"


def segment_name(number: int) -> str:
    """``seg-000003`` for the third segment a store ever had."""
    return f"seg-{number:06d}"


def segment_number(name: str) -> int:
    match = _SEGMENT_NAME.match(name)
    if match is None:
        raise ValueError(f"segment name {name!r} is not seg-NNNNNN")
    return int(match.group(1))


def version_name(version: int) -> str:
    """``v000004`` for version 4."""
    return f"v{version:06d}"


def version_manifest(version: int) -> str:
    """The store-relative path of a version's kept manifest."""
    return f"{VERSIONS_DIR}/{version_name(version)}.json"


def index_file(version: int) -> str:
    """The store-relative path of the FAISS index that ``version`` built."""
    return f"{INDEX_DIR}/{version_name(version)}.faiss"


def tombstones_file(version: int) -> str:
    return f"{TOMBSTONES_DIR}/{version_name(version)}.npy"


def work_dir_of(out: Path) -> Path:
    """The private work directory of a run that builds ``out`` or appends to it (beside it, on
    its file system, so publication is a rename)."""
    return out.parent / f".{out.name}.partial"


@dataclass(frozen=True)
class SegmentFiles:
    """Where one segment's files are, below ``root`` (a store, or a work directory)."""

    root: Path

    def examples(self, shard: int) -> Path:
        return self.root / EXAMPLES_DIR / f"{shard_name(shard)}.parquet"

    def scores(self, checkpoint: str, shard: int) -> Path:
        return self.root / SCORES_DIR / checkpoint / f"{shard_name(shard)}.parquet"

    def features(self, checkpoint: str, shard: int) -> Path:
        return self.root / FEATURES_DIR / checkpoint / f"{shard_name(shard)}.npy"

    def representations(self, shard: int) -> Path:
        return self.root / REPRESENTATIONS_DIR / f"{shard_name(shard)}.npy"

    def quantized(self, kind: str, checkpoint: str, shard: int) -> Path:
        """The stem of a quantised copy: ``STEM.codes.npy`` and ``STEM.scales.npy`` are its files."""
        return self.root / QUANTIZED_DIR / kind / checkpoint / shard_name(shard)

    @property
    def skipped(self) -> Path:
        return self.root / SKIPPED_FILE

    @property
    def data_dirs(self) -> tuple[Path, ...]:
        """The folders that hold shard files (what a finished run must account for)."""
        return tuple(self.root / d for d in (EXAMPLES_DIR, SCORES_DIR, FEATURES_DIR, REPRESENTATIONS_DIR,
                                             QUANTIZED_DIR))
