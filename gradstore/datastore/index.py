"""The store's approximate FAISS index: built from the features files, extended on append.

The vectors are ``concat_c(sqrt(w_c) · feature_c)`` per row (``gradstore.indexer.faiss_index``),
streamed from the memory-mapped features files in batches of about 256 MiB of float32, so
building needs the index, one batch and, for kinds that train, a seeded sample of rows. The index
file is named after the version that wrote it (:func:`~.layout.index_file`); an append adds the
new rows to a copy of the previous version's index where its kind allows (every kind but
``ivf-ondisk``, whose lists file would have to be rewritten whole: it is rebuilt), so earlier
rows are not re-encoded and a reader of the previous version keeps its file.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import faiss
import numpy as np

from gradstore.indexer.faiss_index import (ONDISK_KIND, build_index, build_ondisk_ivf, concat_weighted, extend_index,
                                           lists_path, train_sample_size, trained_index)

from .errors import StoreError
from .files import check_free_space, map_matrix, written_atomically
from .manifest import IndexInfo
from .reader import FEATURE_DTYPE, Shard

_BATCH_BYTES = 256 << 20
# faiss reports a failed write as a RuntimeError ending in "(<the system's reason>)".
_FAISS_WRITE_ERROR = re.compile(r"write error in .*\(([^()]+)\)\s*$", re.DOTALL)


def weighted_vectors(shards: Sequence[Shard], checkpoints: Sequence[str], weights: np.ndarray, dim: int,
                     batch_rows: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(rows, concat_weighted vectors)`` batches over ``shards`` in row order."""
    batch_rows = batch_rows or max(1, _BATCH_BYTES // (4 * dim * len(checkpoints)))
    for shard in shards:
        matrices = [map_matrix(shard.files.features(name, shard.local), (shard.num_rows, dim), FEATURE_DTYPE)
                    for name in checkpoints]
        for start in range(0, shard.num_rows, batch_rows):
            stop = min(shard.num_rows, start + batch_rows)
            rows = np.arange(shard.first_row + start, shard.first_row + stop, dtype=np.int64)
            yield rows, concat_weighted([m[start:stop] for m in matrices], weights)


def build_store_index(path: Path, info: IndexInfo, shards: Sequence[Shard], checkpoints: Sequence[str],
                      weights: np.ndarray, dim: int, budget: int, tmp_dir: Path) -> None:
    """Write the index ``info`` describes over ``shards`` to ``path`` (and its lists file for
    ivf-ondisk), each file atomically."""
    def vectors():
        return weighted_vectors(shards, checkpoints, weights, dim)

    path.parent.mkdir(parents=True, exist_ok=True)
    sample_size = train_sample_size(info.factory, info.ntotal, info.dim, budget)
    sample = _training_sample(vectors(), info.ntotal, info.dim, sample_size) if sample_size else None
    if info.kind == ONDISK_KIND:
        index = trained_index(info.factory, info.dim, sample)
        del sample  # never in memory beside a part of the lists
        check_free_space(path.parent, 2 * info.ntotal * (faiss.extract_index_ivf(index).code_size + 8),
                         "the ivf-ondisk index's build")
        parts_dir = tmp_dir / "ivf-parts"
        parts_dir.mkdir(parents=True, exist_ok=True)
        lists_file = lists_path(path)
        with written_atomically(lists_file, tmp_dir) as tmp:
            build_ondisk_ivf(vectors(), index, tmp, lists_file.name, parts_dir, max(1, budget // 2))
    else:
        index = build_index((v for _, v in vectors()), info.factory, info.dim, sample)
    _check_count(index, info, path)
    write_index(index, path, tmp_dir)


def extend_store_index(base: Path, path: Path, info: IndexInfo, new_shards: Sequence[Shard],
                       checkpoints: Sequence[str], weights: np.ndarray, dim: int, tmp_dir: Path) -> None:
    """Write to ``path`` the index at ``base`` with the rows of ``new_shards`` added
    (``faiss_index.extend_index``: ids continue the row numbering, nothing is retrained)."""
    first = new_shards[0].first_row if new_shards else info.ntotal
    vectors = (v for _, v in weighted_vectors(new_shards, checkpoints, weights, dim))
    try:
        index = extend_index(base, vectors, first)
    except ValueError as err:
        raise StoreError(str(err)) from None
    _check_count(index, info, path)
    write_index(index, path, tmp_dir)


def write_index(index: faiss.Index, path: Path, tmp_dir: Path) -> None:
    """``faiss.write_index`` atomically, with a failed write raised as a StoreError naming ``path``."""
    with written_atomically(path, tmp_dir) as tmp:
        try:
            faiss.write_index(index, str(tmp))
        except RuntimeError as err:
            match = _FAISS_WRITE_ERROR.search(str(err))
            if match is None:
                raise
            raise OSError(match.group(1)) from err


def _check_count(index: faiss.Index, info: IndexInfo, path: Path) -> None:
    if index.ntotal != info.ntotal:
        raise StoreError(f"{path}: the index holds {index.ntotal} vectors, the store {info.ntotal} rows")


def _training_sample(batches: Iterator[tuple[np.ndarray, np.ndarray]], n: int, dim: int, size: int) -> np.ndarray:
    """``size`` vectors at seeded random rows, gathered in one streaming pass."""
    chosen = np.sort(np.random.default_rng(0).choice(n, size=size, replace=False))
    sample = np.empty((size, dim), dtype=np.float32)
    filled = 0
    for rows, vectors in batches:
        if len(rows) == 0:
            continue
        lo, hi = np.searchsorted(chosen, [rows[0], rows[-1] + 1])
        sample[filled:filled + hi - lo] = vectors[chosen[lo:hi] - rows[0]]
        filled += hi - lo
    return sample[:filled]
