"""Quantised copies of a store's features: int8 and 1-bit codes (scanned by ``selection.quantized_scan``).

A feature row ``x`` is an L2-normalised float16 vector of ``k`` values (one example, one
checkpoint). A quantised copy keeps, per row, a code array and one float32 scale ``s``; the
row it stands for is the decoded float32 row ``x̂``. The kinds (:data:`QUANTIZATIONS`):

``int8`` (``k + 4`` bytes per row)
    ``s = max_i |x_i| / 127`` (absmax), ``c_i = rint(x_i / s)`` as int8 in ``[-127, 127]``
    (round half to even; -128 is never used, so the code range is symmetric), ``x̂_i = s · c_i``.
    ``|x_i − x̂_i| <= s / 2`` for every element, up to float32 rounding. A zero row has
    ``s = 0`` and codes 0. Codes: int8 ``(rows, k)``.

``1bit`` (``ceil(k / 8) + 4`` bytes per row)
    ``b_i = 1`` if ``x_i > 0`` else 0 (zeros count as negative), ``s = mean_i |x_i|``,
    ``x̂_i = s · (2 b_i − 1)``. This ``s`` is the least-squares factor: it minimises
    ``||x − s · sign||₂`` for the row's signs, so ``q · x̂`` is the best estimate of ``q · x``
    for an unknown ``q`` that one scale per row allows, and a zero row (``s = 0``) decodes to
    zeros. On real features it ranks as a constant ``s = 1/√k`` does (bench/RESULTS.md,
    "Quantised features": projected gradients spread their mass alike), so it costs 4 bytes per
    row for the same layout as int8 and for zero rows, not for ranking.
    Codes: ``np.packbits(b, axis=1, bitorder="big")``, uint8 ``(rows, ceil(k / 8))``: element
    ``i`` is bit ``7 − i % 8`` (the most significant bit first) of byte ``i // 8``; the unused
    low bits of a row's last byte (when ``k`` is not a multiple of 8) are 0.

Scales: float32 ``(rows,)``, both kinds. On disk (:func:`save`, :func:`load`) a copy is two
``.npy`` files beside each other, ``STEM.codes.npy`` and ``STEM.scales.npy``; the kind and ``k``
are not in them (the store's manifest records them), so :func:`load` is told both and checks the
files against them.

Scanning: :class:`gradstore.selection.quantized_scan.QuantizedScanKernel` adds ``query @ x̂.T`` into a float32 ``(targets, rows)``
result, as :class:`gradstore.selection.scan.ScanKernel` does for float16 features and with its
block sizes: the codes are expanded block by block into a float32 buffer that stays in cache,
multiplied with the float32 queries (asymmetric: only the features are quantised) and scaled
per row. numpy only: torch's kernels measured no faster on these conversions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .layout import QUANTIZATION_CHOICES

QUANTIZATIONS = QUANTIZATION_CHOICES
BIT_ORDER = "big"
_INT8_LEVELS = 127
# Rows encoded at once: bounds the float32 working copy of a large input (4 MiB at k = 1024).
_ENCODE_ROWS = 1024


def code_columns(kind: str, dim: int) -> int:
    """Columns of the code array of ``dim``-dimensional rows: ``dim`` (int8), ``ceil(dim / 8)`` (1bit)."""
    _check_kind(kind)
    return dim if kind == "int8" else -(-dim // 8)


def bytes_per_row(kind: str, dim: int) -> int:
    """Bytes a quantised row takes: its codes and its float32 scale."""
    return code_columns(kind, dim) + 4


@dataclass(frozen=True)
class QuantizedFeatures:
    """A quantised copy of ``rows`` feature rows of dimension ``dim`` (see the module docstring)."""

    kind: str
    dim: int
    codes: np.ndarray   # int8 (rows, dim) or uint8 (rows, ceil(dim / 8))
    scales: np.ndarray  # float32 (rows,)

    def __post_init__(self):
        check_codes(self.kind, self.dim, self.codes, self.scales)

    def __len__(self) -> int:
        return len(self.scales)

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scales.nbytes


def check_codes(kind: str, dim: int, codes: np.ndarray, scales: np.ndarray) -> None:
    """Raise ValueError naming what is wrong unless ``codes`` and ``scales`` are a quantised copy
    of ``kind`` of ``dim``-dimensional rows (dtypes and shapes)."""
    _check_kind(kind)
    if not isinstance(dim, (int, np.integer)) or dim < 1:
        raise ValueError(f"feature dimension must be a positive integer, got {dim!r}")
    dtype = np.int8 if kind == "int8" else np.uint8
    shape = (len(scales), code_columns(kind, dim))
    if codes.dtype != dtype or codes.shape != shape:
        raise ValueError(f"{kind} codes of {dim}-dimensional rows must be {np.dtype(dtype)} {shape}, "
                         f"got {codes.dtype} {codes.shape}")
    if scales.dtype != np.float32 or scales.ndim != 1:
        raise ValueError(f"scales must be a float32 vector (one per row), got {scales.dtype} {scales.shape}")


def encode(features: np.ndarray, kind: str) -> QuantizedFeatures:
    """The ``kind`` quantised copy of float ``(rows, k)`` feature rows (float16 as stored; any
    float dtype is taken); refuses non-finite values."""
    _check_kind(kind)
    if features.ndim != 2 or features.shape[1] < 1 or features.dtype.kind != "f":
        raise ValueError(f"features must be a float (rows, k) matrix with k >= 1, got {features.dtype} "
                         f"{features.shape}")
    rows, dim = features.shape
    codes = np.empty((rows, code_columns(kind, dim)), dtype=np.int8 if kind == "int8" else np.uint8)
    scales = np.empty(rows, dtype=np.float32)
    encode_block = _encode_int8 if kind == "int8" else _encode_1bit
    for start in range(0, rows, _ENCODE_ROWS):
        stop = min(rows, start + _ENCODE_ROWS)
        block = features[start:stop].astype(np.float32)
        if not np.isfinite(block).all():
            bad = start + int(np.flatnonzero(~np.isfinite(block).all(axis=1))[0])
            raise ValueError(f"feature row {bad} has a non-finite value: cannot quantise it")
        codes[start:stop], scales[start:stop] = encode_block(block)
    return QuantizedFeatures(kind, dim, codes, scales)


def _encode_int8(block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scales = np.abs(block).max(axis=1) / np.float32(_INT8_LEVELS)
    levels = np.divide(block, scales[:, None], out=np.zeros_like(block), where=scales[:, None] > 0)
    # x / s can exceed 127 by a float32 rounding step at the row's maximum.
    return np.clip(np.rint(levels), -_INT8_LEVELS, _INT8_LEVELS).astype(np.int8), scales


def _encode_1bit(block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.packbits(block > 0, axis=1, bitorder=BIT_ORDER), np.abs(block).mean(axis=1, dtype=np.float32)


def decode(quantized: QuantizedFeatures) -> np.ndarray:
    """The decoded float32 ``(rows, k)`` rows ``x̂`` of a quantised copy."""
    if quantized.kind == "int8":
        values = quantized.codes.astype(np.float32)
    else:
        bits = np.unpackbits(quantized.codes, axis=1, count=quantized.dim, bitorder=BIT_ORDER)
        values = bits.astype(np.float32) * 2 - 1
    return values * quantized.scales[:, None]


def code_paths(stem: str | Path) -> tuple[Path, Path]:
    """The files of a quantised copy saved at ``stem``: ``STEM.codes.npy``, ``STEM.scales.npy``."""
    stem = Path(stem)
    return stem.with_name(stem.name + ".codes.npy"), stem.with_name(stem.name + ".scales.npy")


def save(quantized: QuantizedFeatures, stem: str | Path, tmp_dir: Path | None = None) -> tuple[Path, Path]:
    """Write ``quantized`` as :func:`code_paths` ``(stem)``, each file atomically
    (:func:`gradstore.datastore.files.write_matrix`); return the two paths."""
    from .files import write_matrix

    codes_path, scales_path = code_paths(stem)
    write_matrix(quantized.codes, codes_path, tmp_dir)
    write_matrix(quantized.scales.reshape(-1), scales_path, tmp_dir)
    return codes_path, scales_path


def load(stem: str | Path, kind: str, dim: int, mmap: bool = True) -> QuantizedFeatures:
    """The quantised copy saved at ``stem``, memory-mapped read-only unless ``mmap`` is false;
    ValueError naming the file when its dtype or shape is not that of ``kind`` and ``dim``."""
    codes_path, scales_path = code_paths(stem)
    mode = "r" if mmap else None
    codes = np.load(codes_path, mmap_mode=mode, allow_pickle=False)
    scales = np.load(scales_path, mmap_mode=mode, allow_pickle=False)
    try:
        return QuantizedFeatures(kind, dim, codes, scales)
    except ValueError as err:
        raise ValueError(f"{codes_path} / {scales_path}: {err}") from None


def _check_kind(kind: str) -> None:
    if kind not in QUANTIZATIONS:
        raise ValueError(f"unknown quantisation {kind!r}: expected one of {', '.join(QUANTIZATIONS)}")
