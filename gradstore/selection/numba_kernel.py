"""The ``numba`` scan kernel: ``out += query @ float32(rows).T``, compiled, for the rows of the
stored fp16 features and of their int8 and 1-bit quantised copies.

Imported by the scan kernels (:class:`gradstore.selection.scan.ScanKernel`,
:class:`gradstore.selection.quantized_scan.QuantizedScanKernel`) on the first scan that uses
numba (importing numba costs about 35 MiB and 0.4 s, so the rest of the package never does).
:func:`products` is compiled without the GIL, so scan threads run it in parallel, once per kind
of rows on its first call (about 2 s each the first time, then read from numba's disk cache
where it can write one).

The kind of rows is their dtype, and :func:`row_value` the float32 value of element ``j`` of row
``i``, converted as it is loaded:

* int16, the bits of fp16 features: exactly, by :func:`half_to_float32`: LLVM's ``fpext`` from
  half where the CPU converts halves itself (vectorised to F16C's ``vcvtph2ps`` on x86, to
  ``fcvtl`` on ARM), else the integer operations of :func:`gradstore.selection.scan.half_to_float`
  (without F16C, LLVM would call a runtime function that numba's JIT may not provide).
  Converting as it loads rather than into a float32 tile first made the scan 1.3× faster
  (bench/RESULTS.md, "Selection scan");
* int8 codes: their value (the row's scale is applied by the caller);
* uint8, 1-bit codes packed most significant bit first: ``2 b − 1``, ±1 (the scale likewise).
  :func:`products` unpacks each tile of four such rows once (:func:`unpack_signs`) and multiplies
  the ±1 floats with every target, rather than unpacking them for each four targets as it loads:
  1.5× faster at 8 targets, 2.1–2.3× at 32, 2.4–2.7× at 128 (bench/RESULTS.md, "1-bit kernel").

``reassoc`` lets the sums run in vector lanes and ``contract`` use fused multiply-adds:
differences of float32 rounding only.
"""

from __future__ import annotations

import platform

import numba
import numpy as np
from llvmlite import binding, ir
from numba import types
from numba.extending import intrinsic, overload

from .scan import _HALF_EXPONENT_SHIFT, _HALF_SIGN_COPIES

# Rows and targets multiplied together: 4 × 4 sums held in registers.
TILE_ROWS = TILE_TARGETS = 4
# For rows shorter than _SHORT_ROW_BYTES, before multiplying each chunk of _READ_AHEAD_BYTES of
# rows the kernel loads one element of every cache line of the next chunk (read_ahead): short
# rows (2 KiB at k = 1024) give the hardware prefetchers too little to learn from, and loads,
# unlike prefetch instructions, also fill the TLB. Measured on one core, fp16 rows in memory:
# k = 1024 6.3 GB/s without, 8.7 with (prefetch instructions instead: +8 %); k = 2048 the same
# either way; k = 4096 and 8192 3 % and 11 % slower with it (bench/RESULTS.md, "Selection scan").
_SHORT_ROW_BYTES = 4 << 10
_READ_AHEAD_BYTES = 128 << 10
_CACHE_LINE = 64
_FASTMATH = {"reassoc", "contract"}


def _converts_halves() -> bool:
    """Whether this CPU has an instruction that converts fp16 to fp32 (see the module docstring)."""
    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        return True
    return machine in ("x86_64", "amd64") and bool(binding.get_host_cpu_features().get("f16c", False))


NATIVE_CONVERSION = _converts_halves()


@intrinsic
def half_to_float32(typingctx, bits):
    """The float32 value of fp16 ``bits`` (an int16), exactly, for every finite value."""
    def codegen(context, builder, signature, args):
        float32 = ir.FloatType()
        if NATIVE_CONVERSION:
            return builder.fpext(builder.bitcast(args[0], ir.HalfType()), float32)
        int32 = ir.IntType(32)
        shifted = builder.shl(builder.sext(args[0], int32), ir.Constant(int32, 13))
        cleared = builder.and_(shifted, ir.Constant(int32, int(_HALF_SIGN_COPIES)))
        return builder.fmul(builder.bitcast(cleared, float32), ir.Constant(float32, float(_HALF_EXPONENT_SHIFT)))

    return types.float32(types.int16), codegen


def row_value(rows, i, j):
    """The float32 value of element ``j`` of row ``i`` of ``rows`` (see the module docstring)."""
    raise NotImplementedError("row_value runs compiled, inside products")


@overload(row_value, inline="always")
def _row_value(rows, i, j):
    if rows.dtype == types.int16:
        return lambda rows, i, j: half_to_float32(rows[i, j])
    if rows.dtype == types.int8:
        return lambda rows, i, j: np.float32(rows[i, j])
    if rows.dtype == types.uint8:
        return lambda rows, i, j: np.float32((((rows[i, j >> 3] >> (7 - (j & 7))) & 1) << 1) - 1)
    if rows.dtype == types.float32:  # rows already decoded (unpack_signs)
        return lambda rows, i, j: rows[i, j]
    return None


@numba.njit(nogil=True, fastmath=_FASTMATH)  # compiled into products, cached with it
def add_row_product(rows, row, query, target, out, column):
    """``out[target, column] += query[target] · row_value(rows[row])``."""
    total = np.float32(0)
    for j in range(query.shape[1]):
        total += row_value(rows, row, j) * query[target, j]
    out[target, column] += total


@numba.njit(nogil=True, fastmath=_FASTMATH)  # compiled into products, cached with it
def add_tile(rows, first, query, out, column):
    """``out[:, column + i] += query · row_value(rows[first + i])`` for the ``TILE_ROWS`` rows from
    ``first``: four targets at a time, their 4 × 4 sums in registers."""
    targets, dim = query.shape
    target = 0
    while target + TILE_TARGETS <= targets:
        s00 = s01 = s02 = s03 = s10 = s11 = s12 = s13 = np.float32(0)
        s20 = s21 = s22 = s23 = s30 = s31 = s32 = s33 = np.float32(0)
        for j in range(dim):
            q0, q1, q2, q3 = query[target, j], query[target + 1, j], query[target + 2, j], query[target + 3, j]
            x0, x1 = row_value(rows, first, j), row_value(rows, first + 1, j)
            x2, x3 = row_value(rows, first + 2, j), row_value(rows, first + 3, j)
            s00 += x0 * q0; s01 += x0 * q1; s02 += x0 * q2; s03 += x0 * q3  # noqa: E702
            s10 += x1 * q0; s11 += x1 * q1; s12 += x1 * q2; s13 += x1 * q3  # noqa: E702
            s20 += x2 * q0; s21 += x2 * q1; s22 += x2 * q2; s23 += x2 * q3  # noqa: E702
            s30 += x3 * q0; s31 += x3 * q1; s32 += x3 * q2; s33 += x3 * q3  # noqa: E702
        sums = ((s00, s01, s02, s03), (s10, s11, s12, s13), (s20, s21, s22, s23), (s30, s31, s32, s33))
        for i in range(TILE_ROWS):
            for u in range(TILE_TARGETS):
                out[target + u, column + i] += sums[i][u]
        target += TILE_TARGETS
    for u in range(target, targets):  # the last targets, one at a time
        for i in range(TILE_ROWS):
            add_row_product(rows, first + i, query, u, out, column + i)


@numba.njit(nogil=True)  # compiled into products, cached with it
def unpack_signs(codes, first, signs):
    """``signs[i] = ±1.0``, the 1-bit codes of row ``first + i`` (most significant bit first), for
    each row of ``signs``: eight constant shifts a byte, which the compiler keeps in registers."""
    for i in range(signs.shape[0]):
        for p in range(codes.shape[1]):
            b = np.int32(codes[first + i, p])
            o = p * 8
            signs[i, o] = np.float32(((b >> 6) & 2) - 1)
            signs[i, o + 1] = np.float32(((b >> 5) & 2) - 1)
            signs[i, o + 2] = np.float32(((b >> 4) & 2) - 1)
            signs[i, o + 3] = np.float32(((b >> 3) & 2) - 1)
            signs[i, o + 4] = np.float32(((b >> 2) & 2) - 1)
            signs[i, o + 5] = np.float32(((b >> 1) & 2) - 1)
            signs[i, o + 6] = np.float32((b & 2) - 1)
            signs[i, o + 7] = np.float32(((b << 1) & 2) - 1)


@numba.njit(nogil=True)  # compiled into products, cached with it
def read_ahead(rows, first, count):
    """Load one element per cache line of rows ``first..first+count`` (those that exist) and
    return their sum, which the caller returns so that the loads are kept."""
    step = max(1, _CACHE_LINE // rows.itemsize)
    touched = 0
    for row in range(first, min(first + count, rows.shape[0])):
        for j in range(0, rows.shape[1], step):
            touched += rows[row, j]
    return touched


def _products(rows, query, out):  # pragma: no cover (runs compiled)
    count, targets = out.shape[1], query.shape[0]
    whole = count - count % TILE_ROWS
    row_bytes = rows.shape[1] * rows.itemsize
    chunk = max(TILE_ROWS, _READ_AHEAD_BYTES // row_bytes // TILE_ROWS * TILE_ROWS)
    read_ahead_rows = row_bytes < _SHORT_ROW_BYTES
    touched = 0
    for first in range(0, whole, TILE_ROWS):
        if read_ahead_rows and first % chunk == 0:  # the next chunk comes in while this one is multiplied
            touched += read_ahead(rows, first + chunk, min(chunk, count - first - chunk))
        add_tile(rows, first, query, out, first)
    for row in range(whole, count):  # the last rows, one at a time
        for u in range(targets):
            add_row_product(rows, row, query, u, out, row)
    return touched


def _sign_products(codes, query, out):  # pragma: no cover (runs compiled)
    """:func:`_products` for 1-bit codes: each tile of rows is unpacked to ±1 once, then
    multiplied with every target (unpacking them anew for each four targets, as ``row_value``
    would, cost more than the products: bench/RESULTS.md, "1-bit kernel")."""
    count, targets = out.shape[1], query.shape[0]
    whole = count - count % TILE_ROWS
    signs = np.empty((TILE_ROWS, codes.shape[1] * 8), dtype=np.float32)  # whole bytes: k rounded up to 8
    for first in range(0, whole, TILE_ROWS):
        unpack_signs(codes, first, signs)
        add_tile(signs, 0, query, out, first)
    for row in range(whole, count):
        for u in range(targets):
            add_row_product(codes, row, query, u, out, row)
    return 0


def _compiled(function):
    try:
        return numba.njit(nogil=True, fastmath=_FASTMATH, cache=True)(function)
    except RuntimeError:  # numba found no writable cache location: compile in memory only
        return numba.njit(nogil=True, fastmath=_FASTMATH)(function)


_compiled_products, _compiled_sign_products = _compiled(_products), _compiled(_sign_products)


def products(rows: np.ndarray, query: np.ndarray, out: np.ndarray) -> int:
    """``out[:, i] += query @ row_value(rows[i])`` for the first ``out.shape[1]`` rows of ``rows``
    (C-contiguous: int16, the bits of fp16 features; int8 or uint8 codes), ``query`` float32
    ``(t, k)`` C-contiguous, ``out`` float32 ``(t, n)``. Compiled for each kind of rows (and
    read-only or not) on its first call. Returns a meaningless integer (the read-ahead loads' sum,
    returned so that the compiler keeps them)."""
    if rows.dtype == np.uint8:
        return _compiled_sign_products(rows, query, out)
    return _compiled_products(rows, query, out)
