"""The scan kernel against numpy's own conversion and float64 products."""

from __future__ import annotations

import os

import numpy as np
import pytest

from conftest import errors_in_another_thread
from gradstore.selection import scan as scan_module
from gradstore.selection.scan import BACKENDS, ScanKernel, half_to_float


def test_half_to_float_is_exact_for_every_finite_half():
    every = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    finite = every[np.isfinite(every)]  # signed zeros, subnormals, normals
    converted = half_to_float(finite, np.empty(finite.shape, dtype=np.float32))
    np.testing.assert_array_equal(converted.view(np.uint32), finite.astype(np.float32).view(np.uint32))


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_kernel_converts_every_finite_half_exactly(backend):
    every = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    finite = every[np.isfinite(every)].reshape(-1, 1)
    out = np.zeros((1, len(finite)), dtype=np.float32)
    ScanKernel(1, backend).add_products(finite, np.ones((1, 1), dtype=np.float32), out)
    # 1 × value is exact; a sum that starts at +0 turns -0 into +0, which compares equal.
    np.testing.assert_array_equal(out[0], finite[:, 0].astype(np.float32))


def saved_map(path, matrix: np.ndarray) -> np.memmap:
    np.save(path, matrix)
    return np.load(path, mmap_mode="r")


@pytest.mark.parametrize("backend", BACKENDS)
def test_kernel_adds_products_block_by_block(backend, tmp_path):
    rng = np.random.default_rng(0)
    dim, rows = 96, 1000
    features = rng.standard_normal((rows, dim)).astype(np.float16)
    mapped = saved_map(tmp_path / "features.npy", features)
    read_only = features.copy()
    read_only.flags.writeable = False  # as decoded Parquet batches are
    strided = np.zeros((rows, 2 * dim), dtype=np.float16)[:, ::2]
    strided[:] = features
    for source in (features, read_only, mapped, mapped[10:], strided):
        for targets in (1, 4, 5, 9):  # whole groups of four targets and the rest
            query = rng.standard_normal((targets, dim)).astype(np.float32)
            kernel = ScanKernel(dim, backend)
            kernel.block_rows = 64  # many blocks, the last one partial
            wide = np.ones((targets, 1100), dtype=np.float32)
            out = wide[:, 50:50 + 901]  # rows 7..907 of the source, into a strided result
            kernel.add_products(source, query, out, start=7)
            expected = 1 + query @ np.asarray(source[7:908], dtype=np.float64).T
            np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-4)
            assert (wide[:, :50] == 1).all() and (wide[:, 951:] == 1).all()
    kernel.add_products(features, query, np.zeros((len(query), 0), dtype=np.float32))  # an empty batch


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_map_is_read_in_place_and_only_blocks_the_kernel_cannot_read_are_copied(backend, tmp_path):
    features = np.arange(40 * 8, dtype=np.float16).reshape(40, 8) / 64
    mapped = saved_map(tmp_path / "features.npy", features)  # read-only, as a store's maps are
    strided = np.zeros((40, 16), dtype=np.float16)[:, ::2]
    strided[:] = features
    query = np.ones((1, 8), dtype=np.float32)
    for source, copied in ((mapped, backend == "torch"), (mapped[1:], backend == "torch"), (strided, True)):
        kernel = ScanKernel(8, backend)
        kernel.block_rows = 16
        given = []
        multiply = kernel._multiply
        kernel._multiply = lambda block, q, o: (given.append(block), multiply(block, q, o))
        out = np.zeros((1, 30), dtype=np.float32)
        kernel.add_products(source, query, out, start=5)
        np.testing.assert_allclose(out[0], np.asarray(source[5:35], dtype=np.float64).sum(axis=1))
        assert [np.shares_memory(block, source) for block in given] == [not copied] * len(given)
        # numba reads all rows it can read in place in one call; the others go a block at a time
        in_one_call = backend == "numba" and not copied
        assert [len(block) for block in given] == ([30] if in_one_call else [16, 14])


def test_an_installed_numba_that_does_not_import_is_not_the_default(monkeypatch):
    monkeypatch.setattr(scan_module, "BACKENDS", ("numba", "numpy"))
    monkeypatch.setattr(scan_module, "_numba_import_error", lambda: "Numba needs NumPy 2.3 or less")
    assert scan_module.default_backend() == "numpy"
    with pytest.raises(ValueError, match="scan backend 'numba' is installed but cannot be imported: Numba needs"):
        ScanKernel(8, "numba")


def test_kernel_refuses_an_unknown_backend_other_threads_and_rows_it_lacks():
    with pytest.raises(ValueError, match="unknown scan backend 'fortran'"):
        ScanKernel(8, "fortran")
    kernel = ScanKernel(8, "numpy")
    with pytest.raises(ValueError, match=r"features must be float16 \(rows, 8\), got float32 \(2, 8\)"):
        kernel.add_products(np.zeros((2, 8), np.float32), np.zeros((1, 8), np.float32), np.zeros((1, 2), np.float32))
    with pytest.raises(ValueError, match=r"rows 1\.\.3 are not all among the 2 rows"):
        kernel.add_products(np.zeros((2, 8), np.float16), np.zeros((1, 8), np.float32), np.zeros((1, 2), np.float32),
                            start=1)
    errors = errors_in_another_thread(lambda: kernel.add_products(
        np.zeros((2, 8), np.float16), np.zeros((1, 8), np.float32), np.zeros((1, 2), np.float32)))
    assert errors == ["a ScanKernel is used by the thread that made it only (it owns a buffer)"]


@pytest.mark.skipif("numba" not in BACKENDS, reason="numba is not installed")
def test_numba_kernel_stays_within_its_arrays_for_every_kind_of_rows(tmp_path):
    """Compiled with bounds checks in a fresh process (and cache): fp16, int8 and 1-bit rows whose
    length is no multiple of 8, a row count and a target count no multiple of the 4 × 4 tile."""
    import subprocess
    import sys

    program = (
        "import numpy as np\n"
        "from gradstore.selection import numba_kernel\n"
        "rng = np.random.default_rng(0)\n"
        "dim, n = 101, 1003\n"
        "query = rng.standard_normal((7, dim)).astype(np.float32)\n"
        "half = rng.standard_normal((n, dim)).astype(np.float16)\n"
        "codes = rng.integers(-127, 128, (n, dim), dtype=np.int8)\n"
        "bits = rng.integers(0, 2, (n, dim), dtype=np.uint8)\n"
        "cases = [(half.view(np.int16), half), (codes, codes), (np.packbits(bits, axis=1), 2.0 * bits - 1)]\n"
        "for rows, values in cases:\n"
        "    out = np.zeros((7, n), dtype=np.float32)\n"
        "    numba_kernel.products(rows, query, out)\n"
        "    np.testing.assert_allclose(out, query @ values.astype(np.float32).T, rtol=1e-4, atol=1e-3)\n"
        "print('within')\n")
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path), "NUMBA_BOUNDSCHECK": "1"}
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, env=env)
    assert result.returncode == 0 and result.stdout.strip() == "within", result.stderr[-2000:]


@pytest.mark.skipif("numba" not in BACKENDS, reason="numba is not installed")
def test_numba_kernel_without_the_cpu_s_half_conversion_is_exact_too(tmp_path):
    """CPUs without F16C get the integer conversion, compiled in a fresh process (and cache)."""
    import subprocess
    import sys

    program = (
        "import numpy as np\n"
        "from gradstore.selection import numba_kernel\n"
        "numba_kernel.NATIVE_CONVERSION = False\n"
        "every = np.arange(1 << 16, dtype=np.uint16).view(np.float16)\n"
        "finite = every[np.isfinite(every)].reshape(-1, 1)\n"
        "out = np.zeros((1, len(finite)), dtype=np.float32)\n"
        "numba_kernel.products(finite.view(np.int16), np.ones((1, 1), np.float32), out)\n"
        "assert (out[0] == finite[:, 0].astype(np.float32)).all()\n"
        "print('exact')\n")
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, env=env)
    assert result.returncode == 0 and result.stdout.strip() == "exact", result.stderr[-2000:]
