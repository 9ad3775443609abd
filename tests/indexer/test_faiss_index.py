"""The weighted-influence FAISS index: factory choice, vector construction, exact and approximate search."""

import shutil

import faiss
import numpy as np
import pytest

from gradstore.indexer.faiss_index import (
    AUTO_APPROXIMATE_KINDS,
    AUTO_EXACT_MAX_BYTES,
    INDEX_KINDS,
    IVF_NPROBE,
    PQ_MAX_SUBQUANTIZERS,
    build_index,
    build_ondisk_ivf,
    can_extend,
    choose_factory,
    concat_weighted,
    extend_index,
    factory_for,
    index_bytes,
    ivf_nlist,
    lists_path,
    normalized_weights,
    pq_subquantizers,
    prefer_blas_search,
    read_index,
    train_sample_size,
    trained_index,
)


def unit_rows(rng, n, dim):
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def top_k(scores, k):
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


# Every kind an index is built with (auto resolves to one of them, none builds nothing).
BUILT_KINDS = [kind for kind in INDEX_KINDS if kind not in ("auto", "none")]


def test_auto_is_exact_for_small_stores_then_the_first_approximate_kind_that_fits():
    dim = 2048
    exact_max = AUTO_EXACT_MAX_BYTES // (2 * dim)  # rows of fp16 features the scan answers for
    assert choose_factory("auto", exact_max, dim, 1) == ("none", None)
    n = exact_max + 1
    assert AUTO_APPROXIMATE_KINDS == ("ivf-pq",)  # product codes: 0.2 % of the features at 4 x 8192
    size = index_bytes(factory_for("ivf-pq", n, dim), n, dim)
    assert size < n * dim * 2 / 10
    assert choose_factory("auto", n, dim, size) == ("ivf-pq", factory_for("ivf-pq", n, dim))
    # Below the smallest in-memory index only the on-disk build fits.
    assert choose_factory("auto", n, dim, size - 1) == ("ivf-ondisk", f"IVF{ivf_nlist(n)},SQfp16")


def test_explicit_kinds_and_their_factories():
    n, dim = 1000, 2048
    assert choose_factory("ivf", n, dim, 1) == ("ivf", f"IVF{ivf_nlist(n)},SQfp16")
    assert choose_factory("flat", n, dim, 1) == ("flat", "Flat")
    assert choose_factory("none", n, dim, 1) == ("none", None)
    assert choose_factory("pq", n, dim, 1) == ("pq", "PQ256x4fs")
    assert choose_factory("ivf-pq", n, dim, 1) == ("ivf-pq", f"IVF{ivf_nlist(n)},PQ256x4fs")
    assert choose_factory("ivf-sq8", n, dim, 1) == ("ivf-sq8", f"IVF{ivf_nlist(n)},SQ8")
    assert choose_factory("hnsw-sq8", n, dim, 1)[1].startswith("HNSW")
    with pytest.raises(ValueError, match="unknown index kind 'pq8'.*ivf-pq"):
        choose_factory("pq8", n, dim, 1)


@pytest.mark.parametrize("dim, expected", [(2048, 256), (4 * 8192, 256), (64, 16), (100, 25), (6000, 250), (7, 1)])
def test_pq_subquantizers_divide_the_dim_within_the_fast_scan_limit(dim, expected):
    m = pq_subquantizers(dim)
    assert m == expected and dim % m == 0 and m <= PQ_MAX_SUBQUANTIZERS


@pytest.mark.parametrize("kind", BUILT_KINDS)
def test_index_bytes_is_the_size_of_the_built_index(kind):
    rng = np.random.default_rng(8)
    n, dim = 5000, 64
    x = unit_rows(rng, n, dim)
    _, factory = choose_factory(kind, n, dim, 1 << 30)
    index = build_index([x], factory, dim, x[: train_sample_size(factory, n, dim, 1 << 30)])
    written = faiss.serialize_index(index).size
    # index_bytes leaves out the small tables (a PQ's 16 centroids per dimension, SQ8's ranges).
    assert written == pytest.approx(index_bytes(factory, n, dim), rel=0.05, abs=16 * dim * 4 + 1024)


def test_ivf_nlist_is_about_four_sqrt_n():
    assert ivf_nlist(10_000) == 400
    assert ivf_nlist(5_000) == 283
    assert ivf_nlist(3) == 3  # never more lists than vectors
    assert train_sample_size("Flat", 5000, 64, 1 << 30) == 0
    assert 283 <= train_sample_size("IVF283,SQfp16", 5000, 64, 1 << 30) <= 5000


def test_concat_weighted_gives_weighted_sum_of_dot_products():
    rng = np.random.default_rng(0)
    train = [unit_rows(rng, 20, 8).astype(np.float16), unit_rows(rng, 20, 8).astype(np.float16)]
    query = [unit_rows(rng, 3, 8), unit_rows(rng, 3, 8)]
    weights = [1.0, 3.0]
    x, q = concat_weighted(train, weights), concat_weighted(query, weights)
    assert x.dtype == np.float32 and x.shape == (20, 16)
    expected = 0.25 * query[0] @ train[0].astype(np.float32).T + 0.75 * query[1] @ train[1].astype(np.float32).T
    np.testing.assert_allclose(q @ x.T, expected, atol=1e-5)
    single = concat_weighted([query[0][0], query[1][0]], weights)
    np.testing.assert_allclose(single, q[0])
    np.testing.assert_allclose(normalized_weights([2, 6]), [0.25, 0.75])


@pytest.mark.parametrize("weights", [[], [1.0, -1.0], [0.0, 0.0], [np.nan, 1.0], [1e308, 1e308]])
def test_bad_weights_are_refused(weights):
    with pytest.raises(ValueError, match="weights"):
        normalized_weights(weights)


def test_concat_weighted_refuses_mismatched_inputs():
    with pytest.raises(ValueError, match="2 feature arrays for 1"):
        concat_weighted([np.ones((2, 4)), np.ones((2, 4))], [1.0])
    with pytest.raises(ValueError, match="disagree"):
        concat_weighted([np.ones((2, 4)), np.ones((3, 4))], [1.0, 1.0])


def test_flat_index_is_exact_with_ids_in_insertion_order():
    rng = np.random.default_rng(1)
    x, q = unit_rows(rng, 500, 32), unit_rows(rng, 10, 32)
    batches = [x[:123], x[123:400], x[400:]]
    index = build_index(iter(batches), "Flat", 32)
    assert index.ntotal == 500 and index.metric_type == faiss.METRIC_INNER_PRODUCT
    scores, ids = index.search(q, 10)
    exact = q @ x.T
    np.testing.assert_array_equal(ids, top_k(exact, 10))
    np.testing.assert_allclose(scores, np.take_along_axis(exact, ids, axis=1), atol=1e-5)


def test_index_that_needs_training_refuses_to_build_without_a_sample():
    with pytest.raises(ValueError, match="train_sample"):
        build_index([np.zeros((10, 8), np.float32)], "IVF4,SQfp16", 8)
    with pytest.raises(ValueError, match=r"shape \(10, 7\)"):
        build_index([np.zeros((10, 7), np.float32)], "Flat", 8)


# Uniformly random vectors are the worst case for quantizers and IVF alike; the product
# quantizers' (4 bits per 4 dimensions here) top 10 is coarse, but holds most of the true top 10
# within its top 100, from which an exact re-ranking would recover them.
@pytest.mark.parametrize("kind, candidates, min_recall, score_atol", [
    ("sq16", 10, 0.9, 2e-3), ("sq8", 10, 0.9, 5e-3), ("pq", 100, 0.7, None), ("ivf", 10, 0.9, 2e-3),
    ("ivf-sq8", 10, 0.9, 5e-3), ("ivf-pq", 100, 0.7, None), ("hnsw", 10, 0.9, 2e-3), ("hnsw-sq8", 10, 0.9, 5e-3)])
def test_approximate_kinds_reach_recall_at_10(kind, candidates, min_recall, score_atol):
    rng = np.random.default_rng(2)
    n, dim = 5000, 64
    x, q = unit_rows(rng, n, dim), unit_rows(rng, 50, dim)
    _, factory = choose_factory(kind, n, dim, 1 << 30)
    sample = x[: train_sample_size(factory, n, dim, 1 << 30)]
    index = build_index((x[i:i + 1000] for i in range(0, n, 1000)), factory, dim, sample)
    assert index.metric_type == faiss.METRIC_INNER_PRODUCT and index.ntotal == n
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        # nprobe is a query-time choice; uniformly random vectors are IVF's worst case.
        ivf.nprobe = ivf.nlist // 2
    scores, ids = index.search(q, candidates)
    truth = top_k(q @ x.T, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, truth)])
    assert recall >= min_recall, f"{kind}: recall@10 within the top {candidates} = {recall:.3f}"
    if score_atol is not None:
        # Returned scores are inner products with the returned ids (quantization error only).
        np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", q, x[ids]), atol=score_atol)
    # Every stored vector finds itself first, under its row.
    _, own = index.search(x[::50], 1)
    np.testing.assert_array_equal(own[:, 0], np.arange(0, n, 50))


@pytest.mark.parametrize("kind", [kind for kind in BUILT_KINDS if kind != "ivf-ondisk"])
def test_memory_mapped_index_answers_like_the_one_in_memory(kind, tmp_path):
    rng = np.random.default_rng(3)
    n, dim = 3000, 32
    x, q = unit_rows(rng, n, dim), unit_rows(rng, 20, dim)
    _, factory = choose_factory(kind, n, dim, 1 << 30)
    index = build_index([x], factory, dim, x[: train_sample_size(factory, n, dim, 1 << 30)])
    faiss.write_index(index, str(tmp_path / "index.faiss"))
    in_memory = read_index(tmp_path / "index.faiss", memory_mapped=False)
    mapped = read_index(tmp_path / "index.faiss")
    expected, found = in_memory.search(q, 10), mapped.search(q, 10)
    np.testing.assert_array_equal(found[1], expected[1])
    np.testing.assert_array_equal(found[0], expected[0])
    assert mapped.ntotal == n


def test_ivf_stores_a_small_default_nprobe():
    rng = np.random.default_rng(4)
    for n in (50, 20000):
        x = unit_rows(rng, n, 8)
        _, factory = choose_factory("ivf", n, 8, 1 << 30)
        ivf = faiss.extract_index_ivf(build_index([x], factory, 8, x))
        assert ivf.nprobe == min(ivf.nlist, IVF_NPROBE)


def test_blas_search_of_a_small_batch_gives_the_same_answers():
    rng = np.random.default_rng(5)
    x, q = unit_rows(rng, 4000, 48), unit_rows(rng, 6, 48)
    index = build_index([x], "Flat", 48)
    saved = faiss.cvar.distance_compute_blas_threshold
    try:
        faiss.cvar.distance_compute_blas_threshold = 1 << 30
        scanned = index.search(q, 20)
        prefer_blas_search()
        assert faiss.cvar.distance_compute_blas_threshold == 1
        blas = index.search(q, 20)
    finally:
        faiss.cvar.distance_compute_blas_threshold = saved
    np.testing.assert_array_equal(blas[1], scanned[1])
    np.testing.assert_allclose(blas[0], scanned[0], atol=1e-5)


def write_ondisk_ivf(folder, x, factory, sample, part_rows):
    """An ivf-ondisk index of ``x`` (ids = rows) in ``folder``, built in parts of ``part_rows``."""
    index = trained_index(factory, x.shape[1], sample)
    parts = folder / "parts"
    parts.mkdir(parents=True)
    batches = ((np.arange(i, min(len(x), i + 250)), x[i:i + 250]) for i in range(0, len(x), 250))
    code_bytes = faiss.extract_index_ivf(index).code_size + 8
    built = build_ondisk_ivf(batches, index, folder / "lists.tmp", "index.ivfdata", parts, part_rows * code_bytes)
    faiss.write_index(built, str(folder / "index.faiss"))
    (folder / "lists.tmp").rename(lists_path(folder / "index.faiss"))
    assert not any(parts.iterdir())  # the part files are gone
    return built


def test_ondisk_ivf_answers_like_the_same_ivf_in_memory(tmp_path):
    rng = np.random.default_rng(6)
    n, dim = 4000, 32
    x, q = unit_rows(rng, n, dim), unit_rows(rng, 25, dim)
    _, factory = choose_factory("ivf-ondisk", n, dim, 1 << 30)
    sample = x[: train_sample_size(factory, n, dim, 1 << 30)]
    in_memory = build_index([x], factory, dim, sample)
    write_ondisk_ivf(tmp_path / "built", x, factory, sample, part_rows=700)  # 6 parts, batches straddling them
    # Moved elsewhere, the index finds its lists in its own folder.
    moved = tmp_path / "elsewhere" / "moved"
    shutil.move(tmp_path / "built", moved)
    on_disk = read_index(moved / "index.faiss", lists_on_disk=True)
    assert on_disk.ntotal == n
    lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(on_disk).invlists)
    assert isinstance(lists, faiss.OnDiskInvertedLists) and lists.filename == str(moved / "index.ivfdata")
    for nprobe in (IVF_NPROBE, ivf_nlist(n)):
        for index in (in_memory, on_disk):
            faiss.extract_index_ivf(index).nprobe = nprobe
        expected, found = in_memory.search(q, 10), on_disk.search(q, 10)
        np.testing.assert_array_equal(found[1], expected[1])
        np.testing.assert_array_equal(found[0], expected[0])
    # Every list holds the same ids in the same order.
    for index in (in_memory, on_disk):
        faiss.extract_index_ivf(index).make_direct_map()
    np.testing.assert_array_equal(on_disk.reconstruct_n(0, n), in_memory.reconstruct_n(0, n))


def test_ondisk_ivf_without_its_lists_file_cannot_be_read(tmp_path):
    rng = np.random.default_rng(7)
    x = unit_rows(rng, 600, 16)
    _, factory = choose_factory("ivf-ondisk", 600, 16, 1 << 30)
    write_ondisk_ivf(tmp_path, x, factory, x, part_rows=600)
    lists_path(tmp_path / "index.faiss").unlink()
    with pytest.raises(RuntimeError, match="index.ivfdata"):
        read_index(tmp_path / "index.faiss", lists_on_disk=True)


def half_then_extended(tmp_path, kind, x, sample):
    """An index of ``kind`` built on the first half of ``x``, written, then extended with the rest."""
    n, dim = x.shape
    _, factory = choose_factory(kind, n, dim, 1 << 30)
    faiss.write_index(build_index([x[: n // 2]], factory, dim, sample), str(tmp_path / "index.faiss"))
    rest = (x[i:i + 700] for i in range(n // 2, n, 700))
    return extend_index(tmp_path / "index.faiss", rest, first_row=n // 2), factory


# Kinds whose codes do not depend on the other vectors: built in two steps, they hold the very
# index built in one (same training sample), so every search answers the same.
@pytest.mark.parametrize("kind", ["flat", "sq16", "sq8", "pq", "ivf", "ivf-sq8", "ivf-pq"])
def test_an_extended_index_answers_like_one_built_on_all_rows(kind, tmp_path):
    rng = np.random.default_rng(9)
    n, dim = 4000, 32
    x, q = unit_rows(rng, n, dim), unit_rows(rng, 30, dim)
    sample = x[: n // 2]
    extended, factory = half_then_extended(tmp_path, kind, x, sample)
    whole = build_index([x], factory, dim, sample)
    assert extended.ntotal == n
    for index in (extended, whole):
        if faiss.try_extract_index_ivf(index) is not None:
            faiss.extract_index_ivf(index).nprobe = ivf_nlist(n)
    expected, found = whole.search(q, 20), extended.search(q, 20)
    np.testing.assert_array_equal(found[1], expected[1])
    np.testing.assert_array_equal(found[0], expected[0])
    assert (found[1] >= n // 2).any()  # the appended rows are searched


# A graph depends on insertion batches (and threads), so its results may differ; the appended
# rows must carry their row numbers.
@pytest.mark.parametrize("kind", ["hnsw", "hnsw-sq8"])
def test_an_extended_graph_index_finds_the_appended_rows_under_their_rows(kind, tmp_path):
    rng = np.random.default_rng(10)
    n, dim = 3000, 32
    x = unit_rows(rng, n, dim)
    extended, _ = half_then_extended(tmp_path, kind, x, x[: n // 2])
    assert extended.ntotal == n
    _, own = extended.search(x, 1)
    np.testing.assert_array_equal(own[:, 0], np.arange(n))


def test_extension_must_continue_the_row_numbering(tmp_path):
    rng = np.random.default_rng(11)
    x = unit_rows(rng, 100, 16)
    faiss.write_index(build_index([x], "Flat", 16), str(tmp_path / "index.faiss"))
    for first_row in (99, 101):
        with pytest.raises(ValueError, match="appended rows start at 100, not"):
            extend_index(tmp_path / "index.faiss", [x[:1]], first_row)
    with pytest.raises(ValueError, match=r"shape \(1, 15\)"):
        extend_index(tmp_path / "index.faiss", [x[:1, :15]], 100)


def test_only_ivf_ondisk_needs_a_rebuild_to_take_appended_rows(tmp_path):
    assert [kind for kind in INDEX_KINDS if kind != "auto" and not can_extend(kind)] == ["ivf-ondisk"]
    with pytest.raises(ValueError, match="built with"):
        can_extend("auto")
    rng = np.random.default_rng(12)
    x = unit_rows(rng, 600, 16)
    _, factory = choose_factory("ivf-ondisk", 600, 16, 1 << 30)
    write_ondisk_ivf(tmp_path, x, factory, x, part_rows=600)
    with pytest.raises(ValueError, match="ivf-ondisk index .* cannot be extended; rebuild"):
        extend_index(tmp_path / "index.faiss", [x], 600)


def test_a_product_quantizer_refuses_too_few_training_vectors():
    x = unit_rows(np.random.default_rng(13), 10, 64)  # fewer than its 16 centroids
    with pytest.raises(ValueError, match="cannot train index 'PQ16x4fs' on 10 vectors"):
        build_index([x], factory_for("pq", 10, 64), 64, x)
