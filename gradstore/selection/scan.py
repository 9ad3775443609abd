"""The selection scan's inner loop: float16 feature rows times float32 query matrices.

Scoring a store reads N × k float16 values per checkpoint to multiply them with a few target
vectors, so its speed is that of reading, converting and multiplying the features, not of the
arithmetic. :meth:`ScanKernel.add_products` adds ``query @ features[start:stop].T`` (targets
first) into a float32 ``(targets, rows)`` result; the products of every checkpoint are added
into one result. Memory is the kernel's buffers and the result, whatever the batch size and N.

Reading
=======
The kernel brings a batch's rows, one block of ``_STAGING_BYTES`` at a time, into a float16
staging buffer of its own, where they stay in the core's cache while they are converted and
multiplied. A read-only ``np.memmap`` of a whole file region (what ``Datastore.raw_features``
gives) is read with ``os.preadv`` from its file at the map's offset, never through the map:
touching a map makes the kernel map each 4 KiB page into the process and unmap it again, which
costs more than reading the bytes (bench/RESULTS.md: the raw files copied out of their maps at
8–14 GB/s, read into a reused buffer at 12–24 GB/s, on one thread). Any other array (a map
without a file name, a slice of one, a decoded Parquet batch) is copied into the buffer.

Kernels
=======
Three implementations compute the same thing (to float32 rounding); ``BACKENDS`` lists those
installed, the fastest first, and the first that imports is the default:

* ``numba`` (numba comes with the ``cpu`` and ``gpu`` extras): one compiled call per block,
  without the GIL, that converts four rows at a time exactly to float32 (the integer operations
  of :func:`half_to_float`) into a small tile and multiplies the tile with four targets at a
  time, sixteen sums in registers. numba is imported, and the kernel compiled (about 2 s; cached
  on disk where numba can write), on the first scan that uses it; the import adds about 35 MiB of
  private memory and 100 MiB of shared library pages to the process.
* ``torch`` (the ``indexer`` extra): torch's vectorised (F16C) fp16→fp32 conversion of the block
  into a float32 buffer, then its single-threaded MKL product.
* ``numpy``: an exact fp16→fp32 conversion by integer operations (:func:`half_to_float`), several
  times faster than numpy's own scalar cast, and ``np.matmul``.

Threads
=======
One kernel serves one thread. A scan runs its kernels in worker threads of its own (see
:func:`scan_threads`), split by shards. Each step of a block (the read, the conversion, the
product) is one native call that releases the GIL, so the workers run in parallel (two threads
used 1.7–1.8 of 2 cores when the machine had them free, bench/RESULTS.md): the Python work left
is a few calls per block of ``_STAGING_BYTES`` and each shard's set-up and reductions. Each kernel is single-threaded: a
multi-threaded BLAS wakes its threads for every small block product, which on a busy machine
costs far more than the arithmetic. torch's thread count belongs to the calling thread with its
OpenMP backend (that of the PyPI wheels), so each worker sets its own to one
(:func:`single_threaded_worker`). numpy's OpenBLAS has only a process-wide thread count, left as
the process has it; instead the numpy kernel multiplies pieces small enough for OpenBLAS to run
them on the calling thread by its own rule (see ``_OPENBLAS_ONE_THREAD_MNK``).
"""

from __future__ import annotations

import functools
import importlib.util
import mmap
import os
import threading

import numpy as np

try:
    import torch
except ImportError:  # the engine works without torch, more slowly
    torch = None

BACKENDS = tuple(name for name, installed in (("numba", importlib.util.find_spec("numba") is not None),
                                             ("torch", torch is not None), ("numpy", True)) if installed)
# float16 bytes per staged block. Large enough that the few Python calls per block are a small
# share of its time (they hold the GIL), small enough to stay in a core's L2 or L3 cache while it
# is converted and multiplied: 1 MiB measured best of 128 KiB-2 MiB with the numba and torch
# kernels (k = 1024, 8 targets, CPU time per byte, on the machine of bench/RESULTS.md).
_STAGING_BYTES = 1 << 20
# OpenBLAS computes a GEMM on the calling thread alone when M·N·K <= 65536 × GEMM_MULTITHREAD_THRESHOLD
# (4 unless built otherwise; interface/gemm.c). Measured: the numpy kernel at k = 1024 and 8
# targets ran 2.4 GB/s with such blocks and 0.7 GB/s with 4× larger ones, which OpenBLAS threads.
_OPENBLAS_ONE_THREAD_MNK = 65536 * 4
# torch's thread count when this module was imported, restored after each scan (see below).
_TORCH_THREADS = torch.get_num_threads() if torch is not None else 1
# An fp16 value's bits, sign-extended to 32 bits and shifted left by 13, hold the float32 bits of
# the value times 2**-112 once the three copies of the sign (bits 28-30) are cleared.
_HALF_SIGN_COPIES = np.int32(~(0x7 << 28))
_HALF_EXPONENT_SHIFT = np.float32(2.0 ** 112)
# Rows converted together by the numba kernel (its tile), and targets multiplied together.
_TILE_ROWS = _TILE_TARGETS = 4


def scan_threads() -> int:
    """Worker threads for one scan: the CPUs this process may use, at most 4 (a scan is bound by
    memory bandwidth, which a few cores saturate)."""
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(4, available))


def default_backend() -> str:
    """The first of ``BACKENDS`` that works here (numba's only if it imports)."""
    return next(backend for backend in BACKENDS if backend != "numba" or _numba_import_error() is None)


@functools.cache
def _numba_import_error() -> str | None:
    """Why numba, installed, cannot be imported (say, built for another numpy), or None."""
    try:
        import numba  # noqa: F401
    except ImportError as err:
        return str(err)
    return None


def single_threaded_worker() -> None:
    """Make the calling worker thread's torch kernels single-threaded (a pool initializer).

    torch keeps this per thread, but also takes it as the default for threads that first use
    torch afterwards; :func:`restore_torch_threads` puts that default back once the scan ends.
    """
    if torch is not None:
        torch.set_num_threads(1)


def restore_torch_threads() -> None:
    """Give threads that start using torch from now on the thread count torch had at import."""
    if torch is not None:
        torch.set_num_threads(_TORCH_THREADS)


def half_to_float(half: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Exact fp16 → fp32 conversion of ``half`` into ``out`` (same shape), in numpy.

    Every finite fp16 value, signed zeros and subnormals included, becomes exactly the float32
    ``half.astype(np.float32)`` gives; infinities and NaNs do not (they become large finite
    values), which is fine for features: the writer refuses non-finite ones.
    """
    bits = out.view(np.int32)
    np.copyto(bits, half.view(np.int16), casting="unsafe")  # sign-extends
    np.left_shift(bits, 13, out=bits)
    np.bitwise_and(bits, _HALF_SIGN_COPIES, out=bits)
    np.multiply(out, _HALF_EXPONENT_SHIFT, out=out)
    return out


def file_region(features: np.ndarray) -> tuple[str, int] | None:
    """``(path, byte offset of row 0)`` when ``features`` is a read-only ``np.memmap`` of a file
    as mapped (not a view of one, whose ``offset`` would be its parent's), else None."""
    if (isinstance(features, np.memmap) and isinstance(features.base, mmap.mmap) and features.mode == "r"
            and features.filename and features.flags.c_contiguous):
        return os.fspath(features.filename), features.offset
    return None


class ScanKernel:
    """``out += query @ features[start:start + out.shape[1]].T`` for float16 features, a staged
    block at a time; one per thread."""

    def __init__(self, dim: int, backend: str | None = None):
        backend = backend or default_backend()
        if backend not in BACKENDS:
            raise ValueError(f"unknown scan backend {backend!r}: available here are {', '.join(BACKENDS)}")
        if backend == "numba" and _numba_import_error() is not None:
            raise ValueError(f"scan backend 'numba' is installed but cannot be imported: {_numba_import_error()}")
        self.backend = backend
        self.dim = dim
        self.block_rows = max(1, _STAGING_BYTES // (2 * dim))
        self._staging = np.empty((self.block_rows, dim), dtype=np.float16)
        self._multiply = {"numba": self._multiply_numba, "torch": self._multiply_torch,
                          "numpy": self._multiply_numpy}[backend]
        self._owner = threading.get_ident()
        # Each backend's own scratch, made on its first block: the float32 block (torch, numpy) or
        # the tile and the compiled function (numba).
        self._buffer = self._tile = self._products = None

    def add_products(self, features: np.ndarray, query: np.ndarray, out: np.ndarray, start: int = 0) -> None:
        """``out += query @ features[start:start + n].astype(float32).T``: ``features`` float16
        ``(rows, k)``, ``query`` float32 ``(t, k)`` C-contiguous, ``out`` float32 ``(t, n)``
        with unit stride along rows."""
        if threading.get_ident() != self._owner:
            raise RuntimeError("a ScanKernel is used by the thread that made it only (it owns a buffer)")
        if features.dtype != np.float16 or features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(f"features must be float16 (rows, {self.dim}), got {features.dtype} {features.shape}")
        count = out.shape[1]
        if not 0 <= start <= start + count <= len(features):
            raise ValueError(f"rows {start}..{start + count} are not all among the {len(features)} rows")
        for first, block in self._staged(features, start, count):
            self._multiply(block, query, out[:, first:first + len(block)])

    def _staged(self, features: np.ndarray, start: int, count: int):
        """``(position in out, float16 block)`` for rows ``start..start+count``, each block read
        into the staging buffer (from the file of a file-backed map, see the module docstring)."""
        region = file_region(features)
        descriptor = os.open(region[0], os.O_RDONLY) if region else None
        try:
            for first in range(0, count, self.block_rows):
                block = self._staging[:min(self.block_rows, count - first)]
                if region:
                    _read_exactly(descriptor, block, region[1] + (start + first) * features.strides[0], region[0])
                else:
                    np.copyto(block, features[start + first:start + first + len(block)])
                yield first, block
        finally:
            if descriptor is not None:
                os.close(descriptor)

    def _multiply_numba(self, block: np.ndarray, query: np.ndarray, out: np.ndarray) -> None:
        if self._tile is None:
            self._tile, self._products = np.empty((_TILE_ROWS, self.dim), dtype=np.float32), _numba_products()
        self._products(block.view(np.int16), query, out, self._tile)

    def _multiply_torch(self, block: np.ndarray, query: np.ndarray, out: np.ndarray) -> None:
        if self._buffer is None:
            self._buffer = torch.empty((self.block_rows, self.dim), dtype=torch.float32)
        converted = self._buffer[:len(block)]
        converted.copy_(torch.from_numpy(block))
        torch.from_numpy(out).addmm_(torch.from_numpy(query), converted.T)

    def _multiply_numpy(self, block: np.ndarray, query: np.ndarray, out: np.ndarray) -> None:
        if self._buffer is None:
            self._buffer = np.empty((self.block_rows, self.dim), dtype=np.float32)
        piece_rows = max(1, _OPENBLAS_ONE_THREAD_MNK // (self.dim * query.shape[0]))
        product = np.empty((min(piece_rows, len(block)), query.shape[0]), dtype=np.float32)
        converted = half_to_float(block, self._buffer[:len(block)])
        for start in range(0, len(block), piece_rows):
            stop = min(len(block), start + piece_rows)
            np.matmul(converted[start:stop], query.T, out=product[:stop - start])
            out[:, start:stop] += product[:stop - start].T


def _read_exactly(descriptor: int, block: np.ndarray, offset: int, path: str) -> None:
    """Fill ``block`` with the bytes of the file at ``offset`` (``os.preadv`` releases the GIL)."""
    view = memoryview(block).cast("B")
    done = 0
    while done < len(view):
        got = os.preadv(descriptor, [view[done:]], offset + done)
        if got == 0:
            raise OSError(f"{path}: file ended {len(view) - done} bytes before the mapped features did")
        done += got


def _products(bits, query, out, tile):  # pragma: no cover (runs compiled by numba)
    """``out[:, i] += query @ float32(bits[i])`` for every row ``i`` of ``bits`` (the int16
    view of float16 rows); ``tile`` is float32 ``(_TILE_ROWS, k)`` scratch. Four rows are
    converted at a time, then multiplied with four targets at a time: sixteen sums in registers,
    each value loaded used four times."""
    rows, dim = bits.shape
    targets = query.shape[0]
    tile_bits = tile.view(np.int32)
    for first in range(0, rows, _TILE_ROWS):
        count = min(_TILE_ROWS, rows - first)
        for i in range(_TILE_ROWS):  # rows past the end are zeros, their sums dropped
            if i < count:
                for j in range(dim):
                    tile_bits[i, j] = (np.int32(bits[first + i, j]) << 13) & _HALF_SIGN_COPIES
                for j in range(dim):
                    tile[i, j] *= _HALF_EXPONENT_SHIFT
            else:
                tile[i, :] = 0
        target = 0
        while target + _TILE_TARGETS <= targets:
            s00 = s01 = s02 = s03 = s10 = s11 = s12 = s13 = np.float32(0)
            s20 = s21 = s22 = s23 = s30 = s31 = s32 = s33 = np.float32(0)
            for j in range(dim):
                q0, q1, q2, q3 = query[target, j], query[target + 1, j], query[target + 2, j], query[target + 3, j]
                x0, x1, x2, x3 = tile[0, j], tile[1, j], tile[2, j], tile[3, j]
                s00 += x0 * q0; s01 += x0 * q1; s02 += x0 * q2; s03 += x0 * q3  # noqa: E702
                s10 += x1 * q0; s11 += x1 * q1; s12 += x1 * q2; s13 += x1 * q3  # noqa: E702
                s20 += x2 * q0; s21 += x2 * q1; s22 += x2 * q2; s23 += x2 * q3  # noqa: E702
                s30 += x3 * q0; s31 += x3 * q1; s32 += x3 * q2; s33 += x3 * q3  # noqa: E702
            sums = ((s00, s01, s02, s03), (s10, s11, s12, s13), (s20, s21, s22, s23), (s30, s31, s32, s33))
            for i in range(count):
                for u in range(_TILE_TARGETS):
                    out[target + u, first + i] += sums[i][u]
            target += _TILE_TARGETS
        for u in range(target, targets):  # the last targets, one at a time
            for i in range(count):
                total = np.float32(0)
                for j in range(dim):
                    total += tile[i, j] * query[u, j]
                out[u, first + i] += total


_compiled: dict = {}
_compile_lock = threading.Lock()


def _numba_products():
    """:func:`_products` compiled by numba, once per process on first use (cached on disk where
    numba can write its cache): without the GIL; ``reassoc`` lets it sum in vector lanes and
    ``contract`` use fused multiply-adds, differences of float32 rounding only."""
    with _compile_lock:
        if "products" not in _compiled:
            import numba

            options = dict(nogil=True, fastmath={"reassoc", "contract"})
            signature = "void(int16[:, ::1], float32[:, ::1], float32[:, :], float32[:, ::1])"
            try:
                _compiled["products"] = numba.njit(signature, cache=True, **options)(_products)
            except RuntimeError:  # numba found no writable cache location: compile in memory only
                _compiled["products"] = numba.njit(signature, **options)(_products)
        return _compiled["products"]
