"""The scan kernel over quantised features (``gradstore.datastore.quantized`` specifies the codes).

:class:`QuantizedScanKernel` adds ``query @ x̂.T`` into a float32 ``(targets, rows)`` result, as
:class:`gradstore.selection.scan.ScanKernel` does for float16 features and with its block rules:
the codes are expanded block by block into a float32 buffer that stays in cache, multiplied with
the float32 queries (asymmetric: only the features are quantised) and scaled per row. numpy
only: torch's kernels measured no faster on these conversions (bench/RESULTS.md, "Quantised
features").
"""

from __future__ import annotations

import threading

import numpy as np

from gradstore.datastore.quantized import (
    BIT_ORDER,
    _check_kind,
    check_codes,
    code_columns,
)

# The float16 scan's cache budget per block and its one-thread OpenBLAS rule apply unchanged.
from .scan import _OPENBLAS_ONE_THREAD_MNK
from .scan import _STAGING_BYTES as _BLOCK_BYTES


class QuantizedScanKernel:
    """``out += query @ x̂.T`` for one kind of quantised rows of dimension ``dim``, in cache-sized
    blocks; one per thread (it owns its buffer)."""

    def __init__(self, kind: str, dim: int):
        _check_kind(kind)
        self.kind = kind
        self.dim = dim
        # 1bit: a block is expanded to all the bits of its bytes, padding included (see add_products).
        self.columns = dim if kind == "int8" else 8 * code_columns(kind, dim)
        self.block_rows = max(1, _BLOCK_BYTES // (4 * self.columns))
        self._buffer = np.empty((self.block_rows, self.columns), dtype=np.float32)
        self._owner = threading.get_ident()

    def add_products(self, codes: np.ndarray, scales: np.ndarray, query: np.ndarray, out: np.ndarray) -> None:
        """``out += query @ decode(QuantizedFeatures(kind, dim, codes, scales)).T``: ``codes``
        and ``scales`` of ``n`` rows (read-only arrays and memory maps are fine), ``query`` float32
        ``(t, dim)``, ``out`` float32 ``(t, n)``."""
        if threading.get_ident() != self._owner:
            raise RuntimeError("a QuantizedScanKernel is used by the thread that made it only (it owns a buffer)")
        check_codes(self.kind, self.dim, codes, scales)
        if query.dtype != np.float32 or query.ndim != 2 or query.shape[1] != self.dim:
            raise ValueError(f"query must be float32 (targets, {self.dim}), got {query.dtype} {query.shape}")
        if out.dtype != np.float32 or out.shape != (query.shape[0], len(scales)):
            raise ValueError(f"out must be float32 {(query.shape[0], len(scales))} (targets, rows), got "
                             f"{out.dtype} {out.shape}")
        weights, offsets = self._weights(query)
        targets = max(1, query.shape[0])
        block_rows = max(1, min(self.block_rows, _OPENBLAS_ONE_THREAD_MNK // (self.columns * targets)))
        product = np.empty((block_rows, query.shape[0]), dtype=np.float32)
        for start in range(0, len(scales), block_rows):
            stop = min(len(scales), start + block_rows)
            block = self._expand(codes[start:stop], self._buffer[:stop - start])
            part = np.matmul(block, weights.T, out=product[:stop - start])
            if offsets is not None:
                part -= offsets
            part *= scales[start:stop, None]
            out[:, start:stop] += part.T

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
