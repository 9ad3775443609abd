"""The scan kernel against numpy's own conversion and float64 products."""

from __future__ import annotations

import os

import numpy as np
import pytest

from conftest import errors_in_another_thread
from gradstore.selection import scan as scan_module
from gradstore.selection.scan import BACKENDS, ScanKernel, file_region, half_to_float


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
    for source in (features, read_only, mapped, mapped[10:]):
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


def test_a_file_backed_map_is_read_from_its_file_and_other_arrays_are_copied(tmp_path, monkeypatch):
    features = np.arange(40 * 8, dtype=np.float16).reshape(40, 8) / 64
    mapped = saved_map(tmp_path / "features.npy", features)
    assert file_region(mapped) == (str(tmp_path / "features.npy"), mapped.offset)
    copy_on_write = np.load(tmp_path / "features.npy", mmap_mode="c")
    assert [file_region(a) for a in (mapped[1:], copy_on_write, features)] == [None, None, None]
    reads, preadv = [], os.preadv

    def counting_preadv(descriptor, buffers, offset):
        reads.append(offset)
        return preadv(descriptor, buffers, offset)

    monkeypatch.setattr(scan_module.os, "preadv", counting_preadv)
    query = np.ones((1, 8), dtype=np.float32)
    for source in (mapped, copy_on_write, mapped[1:]):
        kernel = ScanKernel(8, "numpy")
        kernel.block_rows = 16
        out = np.zeros((1, 30), dtype=np.float32)
        kernel.add_products(source, query, out, start=5)
        np.testing.assert_allclose(out[0], np.asarray(source[5:35], dtype=np.float64).sum(axis=1))
    assert reads == [mapped.offset + row * 16 for row in (5, 21)]  # the file map only, per block


def test_a_file_shorter_than_its_map_is_an_error_naming_it(tmp_path):
    mapped = saved_map(tmp_path / "features.npy", np.ones((64, 8), dtype=np.float16))
    os.truncate(tmp_path / "features.npy", mapped.offset + 10 * 16)  # the map is never touched
    with pytest.raises(OSError, match=r"features\.npy: file ended 864 bytes before the mapped features did"):
        ScanKernel(8, "numpy").add_products(mapped, np.ones((1, 8), np.float32), np.zeros((1, 64), np.float32))


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
