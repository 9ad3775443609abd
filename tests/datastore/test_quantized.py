"""Quantised features: the codes against the module docstring, the kernel against decode-then-matmul."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gradstore.datastore.quantized import (
    QUANTIZATIONS,
    QuantizedFeatures,
    bytes_per_row,
    decode,
    encode,
    load,
    save,
)
from conftest import errors_in_another_thread
from gradstore.selection import quantized_scan
from gradstore.selection.quantized_scan import QuantizedScanKernel
from gradstore.selection.scan import BACKENDS as FP16_BACKENDS

# numba's kernel where it is installed (as the fp16 scan's), and numpy's always.
SCAN_BACKENDS = [backend for backend in ("numba", "numpy") if backend in FP16_BACKENDS]


def unit_rows(rows: int, dim: int, seed: int = 0) -> np.ndarray:
    """float16 rows, L2-normalised as stored features are."""
    x = np.random.default_rng(seed).standard_normal((rows, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def test_int8_error_is_at_most_half_a_step():
    x = unit_rows(300, 100)
    quantized = encode(x, "int8")
    error = np.abs(x.astype(np.float64) - decode(quantized))
    # half a step, plus float32 rounding of x / s and of s · c
    assert (error <= quantized.scales[:, None] * (0.5 + 1e-5)).all()
    assert np.abs(quantized.codes).max(axis=1).tolist() == [127] * 300  # each row's absmax is ±127
    np.testing.assert_allclose(quantized.scales, np.abs(x.astype(np.float32)).max(axis=1) / 127, rtol=1e-6)


def test_1bit_codes_are_big_endian_sign_bits_with_zero_padding():
    signs = [1, -1, -1, -1, -1, -1, -1, 1, 1, 0, 1]  # k = 11: one full byte and 3 bits of a second
    x = np.array([signs], dtype=np.float16) * np.float16(0.25)
    quantized = encode(x, "1bit")
    # element i is bit 7 - i % 8 of byte i // 8; zero counts as negative; unused bits are 0
    assert quantized.codes.tolist() == [[0b10000001, 0b10100000]]
    assert quantized.scales.tolist() == pytest.approx([0.25 * 10 / 11], rel=1e-6)  # mean |x|
    np.testing.assert_allclose(decode(quantized), [[0.25 * 10 / 11 * (1 if s > 0 else -1) for s in signs]], rtol=1e-6)


def test_1bit_scale_is_the_least_squares_factor():
    x = unit_rows(50, 77).astype(np.float32)
    quantized = encode(x, "1bit")
    signs = decode(quantized) / quantized.scales[:, None]
    best = (x * signs).sum(axis=1) / (signs * signs).sum(axis=1)  # argmin_s ||x - s · signs||
    np.testing.assert_allclose(quantized.scales, best, rtol=1e-5)


@pytest.mark.parametrize("kind", QUANTIZATIONS)
@pytest.mark.parametrize("dim", [8, 13, 100])
def test_shapes_and_bytes_for_any_dimension(kind, dim):
    quantized = encode(unit_rows(5, dim), kind)
    columns = dim if kind == "int8" else math.ceil(dim / 8)
    assert quantized.codes.shape == (5, columns)
    assert decode(quantized).shape == (5, dim)
    assert bytes_per_row(kind, dim) == columns + 4
    assert quantized.nbytes == 5 * bytes_per_row(kind, dim)


@pytest.mark.parametrize("backend", SCAN_BACKENDS)
@pytest.mark.parametrize("kind", QUANTIZATIONS)
def test_zero_rows_decode_and_score_to_zero(kind, backend):
    x = unit_rows(3, 20)
    x[1] = 0
    quantized = encode(x, kind)
    assert quantized.scales[1] == 0
    assert not decode(quantized)[1].any()
    out = np.zeros((2, 3), dtype=np.float32)
    QuantizedScanKernel(kind, 20, backend).add_products(quantized, np.ones((2, 20), dtype=np.float32), out)
    assert not out[:, 1].any() and out[:, [0, 2]].all()


@pytest.mark.parametrize("backend", SCAN_BACKENDS)
@pytest.mark.parametrize("kind", QUANTIZATIONS)
@pytest.mark.parametrize("dim", [96, 101])
def test_kernel_equals_decode_then_matmul(kind, dim, backend, monkeypatch):
    quantized = encode(unit_rows(1000, dim), kind)
    quantized.codes.flags.writeable = False  # as memory-mapped codes are
    query = np.random.default_rng(1).standard_normal((5, dim)).astype(np.float32)
    kernel = QuantizedScanKernel(kind, dim, backend)
    kernel.block_rows = 64  # many blocks, the last one partial
    monkeypatch.setattr(quantized_scan, "_NUMBA_BLOCK_ROWS", 64)
    out = np.ones((5, 1000), dtype=np.float32)
    kernel.add_products(quantized, query, out)
    expected = 1 + query.astype(np.float64) @ decode(quantized).astype(np.float64).T
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    wide = np.ones((5, 1100), dtype=np.float32)
    kernel.add_products(quantized, query, wide[:, 50:50 + 901], start=7)  # rows 7..907, into a strided result
    np.testing.assert_allclose(wide[:, 50:951], expected[:, 7:908], rtol=1e-5, atol=1e-5)
    assert (wide[:, :50] == 1).all() and (wide[:, 951:] == 1).all()
    kernel.add_products(quantized, query, out[:, :0], start=1000)  # an empty batch


def test_int8_keeps_cosines_within_its_bound():
    x, q = unit_rows(2000, 1024, seed=0), unit_rows(8, 1024, seed=1).astype(np.float32)
    quantized = encode(x, "int8")
    approx = decode(quantized).astype(np.float64)
    exact = x.astype(np.float64)
    cosine = (approx * exact).sum(axis=1) / np.linalg.norm(approx, axis=1)
    assert cosine.min() >= 0.9999
    # |q · (x - x̂)| <= ||q||₁ · s / 2 for every pair, whatever q
    bound = np.abs(q).sum(axis=1)[:, None] * quantized.scales[None, :] * (0.5 + 1e-5)
    assert (np.abs(q @ approx.T - q @ exact.T) <= bound).all()


def test_1bit_keeps_the_order_of_cosines():
    rng = np.random.default_rng(2)
    x = unit_rows(2000, 1024, seed=3).astype(np.float64)
    other = unit_rows(2000, 1024, seed=4).astype(np.float64)
    other -= (other * x).sum(axis=1, keepdims=True) * x
    other /= np.linalg.norm(other, axis=1, keepdims=True)
    rho = rng.uniform(-1, 1, size=2000)
    q = rho[:, None] * x + np.sqrt(1 - rho ** 2)[:, None] * other  # cos(q, x) = rho
    approx = decode(encode(x.astype(np.float16), "1bit")).astype(np.float64)
    # cos(x, x̂) = ||x||₁ / sqrt(k) for a unit row: sqrt(2/π) ≈ 0.798 for Gaussian directions
    cosine = (approx * x).sum(axis=1) / np.linalg.norm(approx, axis=1)
    assert abs(cosine.mean() - math.sqrt(2 / math.pi)) < 0.01
    # q · x̂ ≈ (2/π) · cos(q, x) plus noise of about 0.8 / sqrt(k)
    estimate = (q * approx).sum(axis=1)
    assert np.corrcoef(estimate, rho)[0, 1] >= 0.99
    assert abs(np.polyfit(rho, estimate, 1)[0] - 2 / math.pi) < 0.02


@pytest.mark.parametrize("kind", QUANTIZATIONS)
def test_save_and_load_round_trip_memory_mapped(tmp_path, kind):
    quantized = encode(unit_rows(40, 30), kind)
    paths = save(quantized, tmp_path / "part-00000")
    assert [p.name for p in paths] == ["part-00000.codes.npy", "part-00000.scales.npy"]
    loaded = load(tmp_path / "part-00000", kind, 30)
    assert isinstance(loaded.codes, np.memmap) and not loaded.codes.flags.writeable
    np.testing.assert_array_equal(loaded.codes, quantized.codes)
    np.testing.assert_array_equal(loaded.scales, quantized.scales)
    out = np.zeros((1, 40), dtype=np.float32)
    QuantizedScanKernel(kind, 30).add_products(loaded, np.ones((1, 30), np.float32), out)
    np.testing.assert_allclose(out[0], decode(quantized).sum(axis=1), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"part-00000\.codes\.npy .*codes of 64-dimensional rows must be"):
        load(tmp_path / "part-00000", kind, 64)


def test_errors_name_what_is_wrong():
    x = unit_rows(4, 16)
    with pytest.raises(ValueError, match="unknown quantisation 'int4': expected one of int8, 1bit"):
        encode(x, "int4")
    bad = x.copy()
    bad[2, 5] = np.inf
    with pytest.raises(ValueError, match="feature row 2 has a non-finite value"):
        encode(bad, "int8")
    with pytest.raises(ValueError, match=r"features must be a float \(rows, k\) matrix"):
        encode(x[0], "1bit")
    quantized = encode(x, "1bit")
    with pytest.raises(ValueError, match=r"1bit codes of 16-dimensional rows must be uint8 \(4, 2\), got int8"):
        QuantizedFeatures("1bit", 16, quantized.codes.view(np.int8), quantized.scales)
    kernel = QuantizedScanKernel("1bit", 16)
    with pytest.raises(ValueError, match=r"query must be float32 \(targets, 16\), got float64"):
        kernel.add_products(quantized, np.ones((1, 16)), np.zeros((1, 4), np.float32))
    with pytest.raises(ValueError, match=r"out must be float32 \(1, rows\) \(targets, rows\), got float32 \(4, 1\)"):
        kernel.add_products(quantized, np.ones((1, 16), np.float32), np.zeros((4, 1), np.float32))
    with pytest.raises(ValueError, match=r"rows 2\.\.5 are not all among the 4 rows"):
        kernel.add_products(quantized, np.ones((1, 16), np.float32), np.zeros((1, 3), np.float32), start=2)
    with pytest.raises(ValueError, match="features must be a 1bit copy of 16-dimensional rows, got int8 of 16"):
        kernel.add_products(encode(x, "int8"), np.ones((1, 16), np.float32), np.zeros((1, 4), np.float32))


def test_kernel_refuses_other_threads():
    kernel = QuantizedScanKernel("int8", 8)
    zeros = QuantizedFeatures("int8", 8, np.zeros((2, 8), np.int8), np.zeros(2, np.float32))
    errors = errors_in_another_thread(lambda: kernel.add_products(
        zeros, np.zeros((1, 8), np.float32), np.zeros((1, 2), np.float32)))
    assert errors == ["a QuantizedScanKernel is used by the thread that made it only (it owns a buffer)"]
