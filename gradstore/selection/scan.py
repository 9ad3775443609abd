"""The selection scan's inner loop: float16 feature rows times float32 query matrices.

Scoring a store reads N × k float16 values per checkpoint to multiply them with a few target
vectors, so its speed is that of reading, converting and multiplying the features, not of the
arithmetic. :class:`ScanKernel` works through a batch in blocks of rows small enough (about
512 KiB of float32) to stay in the CPU's L2 cache: a block is converted into a float32 buffer
that is reused for every block, multiplied with the queries while still in cache, and the
products of every checkpoint are added into one float32 ``(targets, rows)`` result (targets
first: with a handful of targets, MKL computes ``queries @ block.T`` faster than
``block @ queries.T``, 1.2-2× in our measurements). Memory is the buffer and the result,
whatever the batch size and N.

Two implementations compute the same thing (to float32 rounding):

* ``torch``, used when torch is installed (it comes with the service's ``indexer`` extra):
  torch's vectorised (F16C/AVX-512) fp16→fp32 conversion and its single-threaded MKL product.
* ``numpy``: an exact fp16→fp32 conversion by integer operations (sign-extend, shift, mask,
  rescale), about 3× faster than numpy's own scalar cast, and ``np.matmul``.

Threads. One kernel serves one thread. A scan runs its kernels in worker threads of its own (see
:func:`scan_threads`), split by shards, each kernel single-threaded: a multi-threaded BLAS wakes
its threads for every small block product, which on a busy machine costs far more than the
arithmetic (bench/RESULTS.md). torch's thread count belongs to the calling thread with its
OpenMP backend (that of the PyPI wheels), so each worker sets its own to one
(:func:`single_threaded_worker`). numpy's OpenBLAS has only a process-wide thread count, left as
the process has it; instead the numpy kernel multiplies blocks small enough for OpenBLAS to run
them on the calling thread by its own rule (see ``_OPENBLAS_ONE_THREAD_MNK``).
"""

from __future__ import annotations

import os
import threading

import numpy as np

try:
    import torch
except ImportError:  # the engine works without torch, more slowly
    torch = None

BACKENDS = ("torch", "numpy") if torch is not None else ("numpy",)
# float32 bytes per converted block: a fraction of a core's L2 cache (256-512 KiB measured best
# at k = 1024 and 8192).
_BLOCK_BYTES = 512 << 10
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
    return BACKENDS[0]


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
    """``out += query @ features.T`` for float16 features, in cache-sized blocks; one per thread."""

    def __init__(self, dim: int, backend: str | None = None):
        backend = backend or default_backend()
        if backend not in BACKENDS:
            raise ValueError(f"unknown scan backend {backend!r}: available here are {', '.join(BACKENDS)}")
        self.backend = backend
        self.dim = dim
        self.block_rows = max(1, _BLOCK_BYTES // (4 * dim))
        self._buffer = np.empty((self.block_rows, dim), dtype=np.float32)
        self._owner = threading.get_ident()

    def add_products(self, features: np.ndarray, query: np.ndarray, out: np.ndarray) -> None:
        """``out += query @ features.astype(float32).T``: ``features`` float16 ``(n, k)``
        (writable for the torch backend, else copied), ``query`` float32 ``(t, k)``
        C-contiguous, ``out`` float32 ``(t, n)`` C-contiguous."""
        if threading.get_ident() != self._owner:
            raise RuntimeError("a ScanKernel is used by the thread that made it only (it owns a buffer)")
        if self.backend == "torch":
            self._add_torch(features, query, out)
        else:
            self._add_numpy(features, query, out)

    def _add_torch(self, features: np.ndarray, query: np.ndarray, out: np.ndarray) -> None:
        # torch takes writable arrays only (the engine passes copy-on-write maps); a read-only
        # one (a decoded Parquet batch) is copied, which costs little next to decoding it.
        features = np.require(features, requirements="W")
        source, result = torch.from_numpy(features), torch.from_numpy(out)
        weights, buffer = torch.from_numpy(query), torch.from_numpy(self._buffer)
        for start in range(0, len(features), self.block_rows):
            stop = min(len(features), start + self.block_rows)
            block = buffer[:stop - start]
            block.copy_(source[start:stop])
            result[:, start:stop].addmm_(weights, block.T)

    def _add_numpy(self, features: np.ndarray, query: np.ndarray, out: np.ndarray) -> None:
        block_rows = max(1, min(self.block_rows, _OPENBLAS_ONE_THREAD_MNK // (self.dim * query.shape[0])))
        product = np.empty((block_rows, query.shape[0]), dtype=np.float32)
        for start in range(0, len(features), block_rows):
            stop = min(len(features), start + block_rows)
            block = half_to_float(features[start:stop], self._buffer[:stop - start])
            np.matmul(block, query.T, out=product[:stop - start])
            out[:, start:stop] += product[:stop - start].T
