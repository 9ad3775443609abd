"""The scan kernel over quantised features (``gradstore.datastore.quantized`` specifies the codes).

:class:`QuantizedScanKernel` adds ``query @ x̂.T`` into a float32 ``(targets, rows)`` result, as
:class:`gradstore.selection.scan.ScanKernel` does for float16 features, the float32 queries
multiplied with the decoded rows (asymmetric: only the features are quantised), then scaled per
row. Two implementations, the first that works here being the default:

* ``numba`` (the ``cpu`` and ``gpu`` extras): :func:`gradstore.selection.numba_kernel.products`,
  which decodes each code as it is loaded, one compiled call per block of rows without the GIL;
* ``numpy``: the codes expanded block by block into a float32 buffer that stays in cache, then
  ``np.matmul``.

Speeds, against the fp16 scan of the same rows: bench/RESULTS.md, "Selection scan".
"""

from __future__ import annotations

import threading

import numpy as np

from gradstore.datastore.quantized import BIT_ORDER, QuantizedFeatures, _check_kind, code_columns

# The float16 scan's cache budget per block and its one-thread OpenBLAS rule apply unchanged.
from .scan import _BLOCK_BYTES, _OPENBLAS_ONE_THREAD_MNK, default_backend

BACKENDS = ("numba", "numpy")
# Rows per numba call at least: its products go into a (targets, rows) float32 buffer, then scaled.
_NUMBA_BLOCK_ROWS = 4096


class QuantizedScanKernel:
    """``out += query @ x̂.T`` for one kind of quantised rows of dimension ``dim``, in cache-sized
    blocks; one per thread (it owns its buffer)."""

    def __init__(self, kind: str, dim: int, backend: str | None = None):
        _check_kind(kind)
        self.kind = kind
        self.dim = dim
        # numba where the fp16 scan would use it (installed and importable), else numpy.
        self.backend = backend or ("numba" if default_backend() == "numba" else "numpy")
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown quantised scan backend {self.backend!r}: expected one of {', '.join(BACKENDS)}")
        # 1bit: a block is expanded to all the bits of its bytes, padding included (see add_products).
        self.columns = dim if kind == "int8" else 8 * code_columns(kind, dim)
        self.block_rows = max(1, _BLOCK_BYTES // (4 * self.columns))
        self._buffer = None  # numpy: float32 (block_rows, columns), made on its first block
        self._owner = threading.get_ident()

    def add_products(self, features: QuantizedFeatures, query: np.ndarray, out: np.ndarray, start: int = 0) -> None:
        """``out += query @ decode(features)[start:start + n].T``, as ``ScanKernel.add_products``
        for float16 rows: ``features`` a quantised copy of this kernel's kind and dimension (its
        arrays read-only or memory-mapped or not), ``query`` float32 ``(t, dim)``, ``out`` float32
        ``(t, n)``."""
        if threading.get_ident() != self._owner:
            raise RuntimeError("a QuantizedScanKernel is used by the thread that made it only (it owns a buffer)")
        if features.kind != self.kind or features.dim != self.dim:
            raise ValueError(f"features must be a {self.kind} copy of {self.dim}-dimensional rows, got "
                             f"{features.kind} of {features.dim}")
        if query.dtype != np.float32 or query.ndim != 2 or query.shape[1] != self.dim:
            raise ValueError(f"query must be float32 (targets, {self.dim}), got {query.dtype} {query.shape}")
        count = out.shape[1]
        if out.dtype != np.float32 or out.ndim != 2 or out.shape[0] != query.shape[0]:
            raise ValueError(f"out must be float32 ({query.shape[0]}, rows) (targets, rows), got "
                             f"{out.dtype} {out.shape}")
        if not 0 <= start <= start + count <= len(features):
            raise ValueError(f"rows {start}..{start + count} are not all among the {len(features)} rows")
        if self.backend == "numba":
            self._add_numba(features, query, out, start)
            return
        weights, offsets = self._weights(query)
        targets = max(1, query.shape[0])
        block_rows = max(1, min(self.block_rows, _OPENBLAS_ONE_THREAD_MNK // (self.columns * targets)))
        product = np.empty((block_rows, query.shape[0]), dtype=np.float32)
        for first in range(0, count, block_rows):
            stop = min(count, first + block_rows)
            rows = slice(start + first, start + stop)
            if self._buffer is None:
                self._buffer = np.empty((self.block_rows, self.columns), dtype=np.float32)
            block = self._expand(features.codes[rows], self._buffer[:stop - first])
            part = np.matmul(block, weights.T, out=product[:stop - first])
            if offsets is not None:
                part -= offsets
            part *= features.scales[rows, None]
            out[:, first:stop] += part.T

    def _add_numba(self, features: QuantizedFeatures, query: np.ndarray, out: np.ndarray, start: int) -> None:
        from .numba_kernel import products

        count = out.shape[1]
        block_rows = max(self.block_rows, _NUMBA_BLOCK_ROWS)
        product = np.empty((query.shape[0], min(count, block_rows)), dtype=np.float32)
        for first in range(0, count, block_rows):
            stop = min(count, first + block_rows)
            part = product[:, :stop - first]
            part[:] = 0
            products(np.ascontiguousarray(features.codes[start + first:start + stop]), query, part)
            part *= features.scales[start + first:start + stop]
            out[:, first:stop] += part

    def _weights(self, query: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """What the expanded codes are multiplied with, and what is then subtracted per target.

        int8: the query itself. 1bit: the block is expanded to its 0/1 bits (a fast copy, unlike
        a ±1 table lookup), and ``q · (2b − 1) = 2 q · b − Σ q``; the query is zero-padded over
        the last byte's unused bits, so their values never matter.
        """
        if self.kind == "int8":
            return np.ascontiguousarray(query), None
        weights = np.zeros((query.shape[0], self.columns), dtype=np.float32)
        weights[:, :self.dim] = 2 * query
        return weights, query.sum(axis=1, dtype=np.float32)

    def _expand(self, codes: np.ndarray, block: np.ndarray) -> np.ndarray:
        source = codes if self.kind == "int8" else np.unpackbits(codes, axis=1, bitorder=BIT_ORDER)
        np.copyto(block, source, casting="unsafe")
        return block
