"""The selection scan's inner loop: float16 feature rows times float32 query matrices.

Scoring a store reads N × k float16 values per checkpoint to multiply them with a few target
vectors, so its speed is that of reading, converting and multiplying the features, not of the
arithmetic. :meth:`ScanKernel.add_products` adds ``query @ features[start:stop].T`` (targets
first) into a float32 ``(targets, rows)`` result; the products of every checkpoint are added
into one result. Memory is the kernel's buffers and the result, whatever the batch size and N.

Reading
=======
The kernel reads a batch's rows straight from the array it is given (numba's in one call, the
others one block of ``_BLOCK_BYTES`` at a time, which stays in the core's cache while it is
converted and multiplied). The arrays a scan gets are the read-only memory maps that
``Datastore.raw_features`` keeps open (``gradstore.datastore.files.MapCache``): the first scan of
a file maps its pages into the process, one fault per page, and every later scan reads them at
memory speed without a copy or a system call (bench/RESULTS.md, "Selection scan": with the
earlier kernel, 6.8–8.4 GB/s on two threads from open maps against 4.5–4.7 from maps made afresh
and 3.9 from ``os.preadv`` into a buffer). A block that is not C-contiguous (a strided view), or
a read-only one for torch (which wants writable buffers), is first copied into a float16 buffer
of the kernel's own.

Kernels
=======
Three implementations compute the same thing (to float32 rounding); ``BACKENDS`` lists those
installed, the fastest first, and the first that imports is the default:

* ``numba`` (numba comes with the ``cpu`` and ``gpu`` extras; :mod:`.numba_kernel`): one
  compiled call, without the GIL, for all the rows it can read in place: four rows times four
  targets at a time, sixteen sums in registers, each fp16 value converted exactly to float32 as
  it is loaded (by the CPU's own instruction where it has one: F16C's ``vcvtph2ps`` on x86).
  numba is imported, and the kernel compiled (about 2 s; cached on disk where numba can write),
  on the first scan that uses it; the import adds about 35 MiB of private memory and 100 MiB of
  shared library pages to the process.
* ``torch`` (the ``indexer`` extra): torch's vectorised (F16C) fp16→fp32 conversion of the block
  into a float32 buffer, then its single-threaded MKL product.
* ``numpy``: an exact fp16→fp32 conversion by integer operations (:func:`half_to_float`), several
  times faster than numpy's own scalar cast, and ``np.matmul``.

Threads
=======
One kernel serves one thread. A scan runs its kernels in worker threads of its own (see
:func:`scan_threads`), split by shards. numba's call per shard and checkpoint, and each step of
a block of the others (the conversion, the product), is one native call that releases the GIL,
so the workers run in parallel (two threads used 1.9 of 2 cores, bench/RESULTS.md): the Python
work left is each shard's set-up and reductions. Each kernel is single-threaded: a
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
import os
import threading

import numpy as np

try:
    import torch
except ImportError:  # the engine works without torch, more slowly
    torch = None

BACKENDS = tuple(name for name, installed in (("numba", importlib.util.find_spec("numba") is not None),
                                             ("torch", torch is not None), ("numpy", True)) if installed)
# float16 bytes per block. Large enough that the few Python calls per block are a small
# share of its time (they hold the GIL), small enough to stay in a core's L2 or L3 cache while it
# is converted and multiplied: 1 MiB measured best of 128 KiB-2 MiB with the numba and torch
# kernels (k = 1024, 8 targets, CPU time per byte, on the machine of bench/RESULTS.md).
_BLOCK_BYTES = 1 << 20
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


class ScanKernel:
    """``out += query @ features[start:start + out.shape[1]].T`` for float16 features, a
    cache-sized block at a time; one per thread."""

    def __init__(self, dim: int, backend: str | None = None):
        backend = backend or default_backend()
        if backend not in BACKENDS:
            raise ValueError(f"unknown scan backend {backend!r}: available here are {', '.join(BACKENDS)}")
        if backend == "numba" and _numba_import_error() is not None:
            raise ValueError(f"scan backend 'numba' is installed but cannot be imported: {_numba_import_error()}")
        self.backend = backend
        self.dim = dim
        self.block_rows = max(1, _BLOCK_BYTES // (2 * dim))
        self._staging = None  # float16 (block_rows, dim), for blocks that must be copied first
        self._multiply = {"numba": self._multiply_numba, "torch": self._multiply_torch,
                          "numpy": self._multiply_numpy}[backend]
        self._owner = threading.get_ident()
        # Each backend's own scratch, made on its first block: the float32 block (torch, numpy) or
        # the compiled function (numba).
        self._buffer = self._products = None

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
        rows = features[start:start + count]
        # numba's kernel keeps its own tiles in cache: one call for every row it can read in place.
        step = count if self.backend == "numba" and self._in_place(rows) else self.block_rows
        for first in range(0, count, max(1, step)):
            block = rows[first:first + step]
            self._multiply(self._readable(block), query, out[:, first:first + len(block)])

    def _in_place(self, block: np.ndarray) -> bool:
        """Whether this kernel reads ``block`` where it is (see the module docstring)."""
        return block.flags.c_contiguous and (block.flags.writeable or self.backend != "torch")

    def _readable(self, block: np.ndarray) -> np.ndarray:
        """``block`` itself, or a copy in the kernel's buffer where this kernel cannot read it in
        place."""
        if self._in_place(block):
            return block
        if self._staging is None:
            self._staging = np.empty((self.block_rows, self.dim), dtype=np.float16)
        staged = self._staging[:len(block)]
        np.copyto(staged, block)
        return staged

    def _multiply_numba(self, block: np.ndarray, query: np.ndarray, out: np.ndarray) -> None:
        if self._products is None:
            self._products = _numba_products()
        self._products(block.view(np.int16), query, out)

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


def _numba_products():
    """:func:`gradstore.selection.numba_kernel.products`, compiled on its module's first import
    (once per process; cached on disk where numba can write its cache)."""
    from .numba_kernel import products

    return products
