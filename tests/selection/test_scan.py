"""The scan kernel against numpy's own conversion and float64 products."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from gradstore.selection.scan import BACKENDS, ScanKernel, half_to_float


def test_half_to_float_is_exact_for_every_finite_half():
    every = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    finite = every[np.isfinite(every)]  # signed zeros, subnormals, normals
    converted = half_to_float(finite, np.empty(finite.shape, dtype=np.float32))
    np.testing.assert_array_equal(converted.view(np.uint32), finite.astype(np.float32).view(np.uint32))


@pytest.mark.parametrize("backend", BACKENDS)
def test_kernel_adds_products_block_by_block(backend):
    rng = np.random.default_rng(0)
    dim, rows, targets = 96, 1000, 5
    features = rng.standard_normal((rows, dim)).astype(np.float16)
    features.flags.writeable = False  # as decoded Parquet batches are
    query = rng.standard_normal((targets, dim)).astype(np.float32)
    kernel = ScanKernel(dim, backend)
    kernel.block_rows = 64  # many blocks, the last one partial
    out = np.ones((targets, rows), dtype=np.float32)
    kernel.add_products(features, query, out)
    np.testing.assert_allclose(out, 1 + query @ features.astype(np.float64).T, rtol=1e-5, atol=1e-4)
    kernel.add_products(features[:0], query, out[:, :0])  # an empty shard


def test_kernel_refuses_an_unknown_backend_and_other_threads():
    with pytest.raises(ValueError, match="unknown scan backend 'fortran'"):
        ScanKernel(8, "fortran")
    kernel = ScanKernel(8, "numpy")
    errors = []

    def use():
        try:
            kernel.add_products(np.zeros((2, 8), np.float16), np.zeros((1, 8), np.float32),
                                np.zeros((1, 2), np.float32))
        except RuntimeError as err:
            errors.append(str(err))

    thread = threading.Thread(target=use)
    thread.start()
    thread.join()
    assert errors == ["a ScanKernel is used by the thread that made it only (it owns a buffer)"]
