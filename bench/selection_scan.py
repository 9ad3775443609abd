"""Exact selection scan: scoring every example of a store against a target set, versus bandwidth.

For each store size N, a synthetic store is written through the real writer
(``datastore.write_shard`` + ``finalize_store`` with index kind ``none`` + ``publish_store``):
random L2-normalised fp16 features, ``--checkpoints`` checkpoints, the indexer's default shard
size. A fresh child process then opens it and times ``SelectionEngine(store).scores(targets)``
for ``--targets`` random targets in two subtasks (warm page cache: the store was just written and
one untimed scan runs first), and, in the same process, the machine's copy bandwidth:

* ``mmap copy``: every feature file the scan reads, memory-mapped with ``np.memmap`` and copied
  with ``np.copyto`` into a reused buffer: the same bytes, files and page cache as the scan;
* ``RAM copy``: ``np.copyto`` between two in-memory 1 GiB arrays (far larger than the CPU caches),
  repeated to the same total bytes, on one thread (and once on two threads, halves in parallel).

The machine may be shared, so both copies are timed before and after the scans, and the best
copy is compared with the best timed scan.

The throughput of a scan is the feature bytes it reads (N × k × 2 bytes × checkpoints) over its
wall time. Memory: ``VmHWM`` (peak resident set, reset just before the scans) of the child after the scans,
its resident set before them, and the peak of ``RssAnon`` (anonymous memory, i.e. not page cache mapped from the
store's files) sampled every 10 ms during them. A fresh process per N makes the peaks comparable.

With ``--profile`` (on by default) the largest store is also scanned stage by stage (Parquet
decode only; + fp16→fp32 conversion; + the matrix product), and candidate kernels for the
conversion and product are timed on one in-memory block, to show where the time goes and what
would close a gap to the bandwidth.

    python bench/selection_scan.py                      # N = 125k, 250k, 500k at k = 1024, 2 checkpoints
    python bench/selection_scan.py --n 100000 --dim 8192 --json scan.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

GIB = 1 << 30


# ------------------------------------------------------------------------------------ helpers


def proc_status() -> dict[str, int]:
    """``/proc/self/status`` memory lines in bytes."""
    values = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key.startswith(("Vm", "Rss")):
                values[key] = int(rest.split()[0]) * 1024
    return values


def reset_peak_rss() -> None:
    """Reset ``VmHWM`` to the current resident set (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


class RssSampler:
    """Peak ``RssAnon`` and ``RssFile`` sampled every ``interval`` seconds in a thread."""

    def __init__(self, interval: float = 0.01):
        self.interval = interval
        self.peak_anon = 0
        self.peak_file = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            status = proc_status()
            self.peak_anon = max(self.peak_anon, status.get("RssAnon", 0))
            self.peak_file = max(self.peak_file, status.get("RssFile", 0))
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def machine_info() -> dict:
    import faiss
    import pyarrow
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    mem = next(int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemTotal"))
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_bytes": mem, "python": platform.python_version(),
            "numpy": np.__version__, "torch": torch.__version__, "faiss": faiss.__version__,
            "pyarrow": pyarrow.__version__, "loadavg_start": os.getloadavg(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def gbps(num_bytes: float, seconds: float) -> float:
    return num_bytes / seconds / 1e9


# ------------------------------------------------------------------------------ store writer


def manifest_fields(checkpoints: list[str], dim: int) -> dict:
    return {
        "model": {"path": "synthetic", "sha256": "0" * 64, "architecture": "synthetic", "dtype": "float32",
                  "device": "cpu"},
        "tokenizer": {"template": "synthetic"},
        "lora": {"r": 8, "alpha": 16.0, "target_modules": ["q_proj", "v_proj"], "params": {}, "num_params": 0},
        "checkpoints": [{"name": name, "weight": 1.0} for name in checkpoints],
        "gradient_type": "adam",
        "projection": {"kind": "rademacher", "dim": dim, "seed": 0, "version": "gradstore-rademacher-v1"},
        "tokens": {},
        "job": {"synthetic": True},
    }


def build_store(out: Path, n: int, dim: int, checkpoints: list[str], shard_size: int, seed: int) -> dict:
    """Write a synthetic store of ``n`` examples at ``out`` through the real writer."""
    from gradstore.indexer.datastore import FeatureBatch, examples_table, finalize_store, publish_store, write_shard

    work = out.parent / f".{out.name}.partial"
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    for shard, first in enumerate(range(0, n, shard_size)):
        rows = np.arange(first, min(n, first + shard_size), dtype=np.int64)
        m = len(rows)
        examples = examples_table(
            rows=rows.tolist(), ids=[f"ex-{r}" for r in rows], sources=["pool"] * m,
            locations=[f"synthetic.jsonl:{r + 1}" for r in rows], records=[f'{{"text": "{r}"}}' for r in rows],
            num_tokens=[64] * m, num_label_tokens=[32] * m, truncated=[False] * m)
        features = {}
        for name in checkpoints:
            x = rng.standard_normal((m, dim), dtype=np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            ones = np.ones(m, dtype=np.float32)
            features[name] = FeatureBatch(rows=rows, feature=x.astype(np.float16), grad_norm=ones,
                                          feature_norm=ones, loss=ones)
        write_shard(work, shard, examples, features)
    written = time.perf_counter()
    finalize_store(work, manifest_fields(checkpoints, dim), index_kind="none",
                   expected_shards=-(-n // shard_size))
    publish_store(work, out, overwrite=False)
    done = time.perf_counter()
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    feature_bytes = sum(p.stat().st_size for p in (out / "features").rglob("*.parquet"))
    return {"write_s": written - start, "finalize_s": done - written, "store_bytes": size,
            "feature_file_bytes": feature_bytes}


# ------------------------------------------------------------------------------- bandwidths


def mmap_copy(paths: list[Path], repeats: int) -> dict:
    """Best of ``repeats`` passes copying every file from a memory map into a reused buffer."""
    chunk = 64 << 20
    buffer = np.empty(chunk, dtype=np.uint8)
    total = sum(p.stat().st_size for p in paths)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for path in paths:
            mapped = np.memmap(path, dtype=np.uint8, mode="r")
            for offset in range(0, len(mapped), chunk):
                piece = mapped[offset:offset + chunk]
                np.copyto(buffer[:len(piece)], piece)
            del mapped
        times.append(time.perf_counter() - start)
    return {"bytes": total, "seconds": min(times), "gbps": gbps(total, min(times))}


def ram_copy(total: int, threads: int, repeats: int) -> dict:
    """``np.copyto`` between in-memory arrays of up to 1 GiB, repeated to ``total`` bytes."""
    size = min(total, GIB)
    source = np.empty(size, dtype=np.uint8)
    source[:] = 1  # touch every page before timing
    target = np.empty_like(source)
    target[:] = 0
    passes = max(1, round(total / size))
    bounds = np.linspace(0, size, threads + 1).astype(np.int64)

    def copy_part(i):
        np.copyto(target[bounds[i]:bounds[i + 1]], source[bounds[i]:bounds[i + 1]])

    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(passes):
            if threads == 1:
                copy_part(0)
            else:
                workers = [threading.Thread(target=copy_part, args=(i,)) for i in range(threads)]
                for w in workers:
                    w.start()
                for w in workers:
                    w.join()
        times.append(time.perf_counter() - start)
    del source, target
    return {"bytes": passes * size, "array_bytes": size, "threads": threads, "seconds": min(times),
            "gbps": gbps(passes * size, min(times))}


# ---------------------------------------------------------------------------------- profile


def profile_functions(engine, targets, top: int = 10) -> dict:
    """cProfile of one ``scores()`` call: the functions with the most own time."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    engine.scores(targets)
    profiler.disable()
    total = time.perf_counter() - start
    stats = pstats.Stats(profiler).stats
    rows = []
    for (filename, line, function), (_, calls, own, cumulative, _) in stats.items():
        where = function if filename == "~" else f"{Path(filename).name}:{line}({function})"
        rows.append({"function": where, "calls": calls, "own_s": own, "cumulative_s": cumulative})
    rows.sort(key=lambda r: r["own_s"], reverse=True)
    return {"wall_s": total, "top": rows[:top]}


def profile_stages(store, targets, names: list[str]) -> dict:
    """The scan's stages on the whole store: decode; + conversion; + product (engine batches)."""
    from gradstore.service import engine as engine_module

    dim = store.dim
    batch_rows = max(1, min(65536, engine_module._BATCH_BYTES // (4 * max(dim, targets.num_targets))))
    queries = {name: np.ascontiguousarray(targets.vectors[name].T) for name in names}
    feature_bytes = store.num_examples * dim * 2 * len(names)

    def run(stage: str) -> float:
        start = time.perf_counter()
        for name in names:
            for _, feature in store.iter_features(name, batch_rows):
                if stage == "decode":
                    continue
                converted = feature.astype(np.float32)
                if stage == "decode+convert+matmul":
                    converted @ queries[name]
        return time.perf_counter() - start

    out = {}
    for stage in ("decode", "decode+convert", "decode+convert+matmul"):
        seconds = run(stage)
        out[stage] = {"seconds": seconds, "gbps": gbps(feature_bytes, seconds)}
    return out


def profile_kernels(dim: int, num_targets: int, tmp: Path, seed: int = 0) -> dict:
    """Decode, conversion and product kernels on one fp16 block (GB/s of fp16 input).

    Output buffers are allocated and touched beforehand, except where a kernel allocates as the
    engine does (``astype``): on this VM a page fault per fresh 4 KiB page is part of that cost.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from gradstore.indexer.datastore import _FEATURE_ROW_GROUP_BYTES

    rows = max(1, (128 << 20) // (2 * dim))  # a 128 MiB fp16 block, out of cache like a scan
    block = 1024
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    half = x.astype(np.float16)
    del x
    nbytes = half.nbytes
    query = rng.standard_normal((dim, num_targets), dtype=np.float32)
    out = np.ones((rows, num_targets), dtype=np.float32)
    converted = np.ones((rows, dim), dtype=np.float32)
    np.copyto(converted, half, casting="unsafe")
    buffer = np.ones((block, dim), dtype=np.float32)

    # The same block as Parquet files: the store's layout, and one fixed_size_binary value per row.
    layouts = {
        "store layout: fixed_size_list<float16>[k]":
            pa.FixedSizeListArray.from_arrays(pa.array(half.reshape(-1), type=pa.float16()), dim),
        "alternative: fixed_size_binary(2k), one value per row":
            pa.FixedSizeBinaryArray.from_buffers(pa.binary(2 * dim), rows, [None, pa.py_buffer(half.tobytes())]),
    }
    files = {}
    for i, (name, column) in enumerate(layouts.items()):
        path = tmp / f"layout-{i}.parquet"
        pq.write_table(pa.table({"row": pa.array(np.arange(rows, dtype=np.int64)), "feature": column}), path,
                       compression="none", use_dictionary=False,
                       row_group_size=max(1024, _FEATURE_ROW_GROUP_BYTES // (2 * dim)))
        files[name] = path

    def decode(path: Path):
        def run():
            parquet = pq.ParquetFile(path, memory_map=True)
            for batch in parquet.iter_batches(batch_size=16384, columns=["row", "feature"]):
                column = batch.column(1)
                if isinstance(column, pa.FixedSizeBinaryArray):
                    np.frombuffer(column.buffers()[1], dtype=np.float16)
                else:
                    column.flatten().to_numpy()
        return run

    def numpy_blocks(product: bool):
        result = np.ones((block, num_targets), dtype=np.float32)

        def run():
            for s in range(0, rows, block):
                e = min(rows, s + block)
                np.copyto(buffer[:e - s], half[s:e], casting="unsafe")
                if product:
                    np.matmul(buffer[:e - s], query, out=result[:e - s])
        return run

    torch_half, torch_query = torch.from_numpy(half), torch.from_numpy(query)
    torch_buffer, torch_result = torch.from_numpy(buffer), torch.ones((block, num_targets))

    def torch_blocks(product: bool):
        def run():
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                for s in range(0, rows, block):
                    e = min(rows, s + block)
                    torch_buffer[:e - s].copy_(torch_half[s:e])
                    if product:
                        torch.mm(torch_buffer[:e - s], torch_query, out=torch_result[:e - s])
            finally:
                torch.set_num_threads(threads)
        return run

    source = np.ones(nbytes, dtype=np.uint8)
    target = np.ones(nbytes, dtype=np.uint8)
    kernels = {
        "memcpy of the same bytes (reference)": lambda: np.copyto(target, source),
        **{f"Parquet decode, {name}": decode(path) for name, path in files.items()},
        "numpy astype fp16->fp32, fresh array (engine)": lambda: half.astype(np.float32),
        "numpy fp32 matmul, whole block (engine)": lambda: np.matmul(converted, query, out=out),
        "numpy astype + matmul (engine kernel)": lambda: half.astype(np.float32) @ query,
        f"numpy cast into a reused {block}-row buffer": numpy_blocks(False),
        f"numpy cast + matmul, {block}-row blocks": numpy_blocks(True),
        f"vectorised (F16C) cast, {block}-row blocks, 1 thread (torch)": torch_blocks(False),
        f"vectorised cast + matmul, {block}-row blocks, 1 thread (torch)": torch_blocks(True),
    }
    results = {}
    for name, kernel in kernels.items():
        kernel()
        seconds = min(_timed(kernel) for _ in range(3))
        results[name] = {"seconds": seconds, "gbps": gbps(nbytes, seconds)}
    for path in files.values():
        path.unlink()
    return {"block_bytes": nbytes, "rows": rows, "kernels": results}


def prototype_pipelines(dim: int, num_targets: int, tmp: Path, seed: int = 0) -> dict:
    """Whole scans (Parquet file in page cache -> scores for the targets) of one 128 MiB block, as
    the engine does it and as a fix could: the engine's kernel on the store layout; then the
    features as one fixed_size_binary(2k) value per row (decoded without a per-value loop) with a
    cache-blocked cast into a reused buffer and a product, with numpy's scalar cast or a
    vectorised (F16C) one, on one thread or two (row groups split between two threads).
    Meant to run with single-threaded BLAS (``OPENBLAS_NUM_THREADS=1``)."""
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    rows = max(1, (128 << 20) // (2 * dim))
    group_rows = max(1024, rows // 4)  # four row groups, so two threads share them evenly
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    half = x.astype(np.float16)
    del x
    query = rng.standard_normal((dim, num_targets), dtype=np.float32)
    store_path, binary_path = tmp / "proto-store.parquet", tmp / "proto-binary.parquet"
    row_ids = pa.array(np.arange(rows, dtype=np.int64))
    pq.write_table(pa.table({"row": row_ids, "feature": pa.FixedSizeListArray.from_arrays(
        pa.array(half.reshape(-1), type=pa.float16()), dim)}), store_path, compression="none",
        use_dictionary=False, row_group_size=group_rows)
    pq.write_table(pa.table({"row": row_ids, "feature": pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(2 * dim), rows, [None, pa.py_buffer(half.tobytes())])}), binary_path, compression="none",
        use_dictionary=False, row_group_size=group_rows)
    expected = half.astype(np.float32) @ query
    del half
    block = 1024
    torch_query = torch.from_numpy(query)

    def engine_kernel():
        out = np.empty((rows, num_targets), dtype=np.float32)
        parquet = pq.ParquetFile(store_path, memory_map=True)
        start = 0
        for batch in parquet.iter_batches(batch_size=16384, columns=["feature"]):
            feature = batch.column(0).flatten().to_numpy().reshape(-1, dim)
            out[start:start + len(feature)] = feature.astype(np.float32) @ query
            start += len(feature)
        return out

    def groups(vectorised: bool, out: np.ndarray):
        def run(group: int):
            table = pq.ParquetFile(binary_path, memory_map=True).read_row_group(group, columns=["row", "feature"])
            first = int(table.column("row")[0].as_py())
            buffer = np.empty((block, dim), dtype=np.float32)
            result = np.empty((block, num_targets), dtype=np.float32)
            for chunk in table.column("feature").chunks:
                feature = np.frombuffer(chunk.buffers()[1], dtype=np.float16,
                                        count=len(chunk) * dim, offset=chunk.offset * 2 * dim).reshape(-1, dim)
                for s in range(0, len(feature), block):
                    e = min(len(feature), s + block)
                    if vectorised:
                        torch_buffer = torch.from_numpy(buffer[:e - s])
                        torch_buffer.copy_(torch.from_numpy(feature[s:e]))
                        torch.mm(torch_buffer, torch_query, out=torch.from_numpy(result[:e - s]))
                    else:
                        np.copyto(buffer[:e - s], feature[s:e], casting="unsafe")
                        np.matmul(buffer[:e - s], query, out=result[:e - s])
                    out[first + s:first + e] = result[:e - s]
                first += len(feature)
        return run

    def pipeline(vectorised: bool, threads: int):
        def run():
            out = np.empty((rows, num_targets), dtype=np.float32)
            task = groups(vectorised, out)
            count = pq.ParquetFile(binary_path).num_row_groups
            if threads == 1:
                for group in range(count):
                    task(group)
            else:
                with ThreadPoolExecutor(threads) as pool:
                    list(pool.map(task, range(count)))
            return out
        return run

    pipelines = {
        "engine kernel on the store layout (astype + matmul), 1 file": engine_kernel,
        "fixed_size_binary + numpy cast/matmul in 1024-row blocks, 1 thread": pipeline(False, 1),
        "fixed_size_binary + numpy cast/matmul in 1024-row blocks, 2 threads": pipeline(False, 2),
        "fixed_size_binary + vectorised cast/matmul in 1024-row blocks, 1 thread": pipeline(True, 1),
        "fixed_size_binary + vectorised cast/matmul in 1024-row blocks, 2 threads": pipeline(True, 2),
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    results = {}
    try:
        for name, run in pipelines.items():
            out = run()
            if not np.allclose(out, expected, atol=1e-4):
                raise AssertionError(f"{name}: wrong scores")
            seconds = min(_timed(run) for _ in range(3))
            results[name] = {"seconds": seconds, "gbps": gbps(rows * dim * 2, seconds)}
    finally:
        torch.set_num_threads(threads)
        store_path.unlink()
        binary_path.unlink()
    return {"block_bytes": rows * dim * 2, "rows": rows, "pipelines": results}


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# ----------------------------------------------------------------------------------- worker


def worker(store_path: Path, num_targets: int, repeats: int, profile: bool, seed: int,
           blas1: bool = False) -> dict:
    """Runs in a fresh process: scans, memory peaks, bandwidths (and the profile).

    ``blas1``: the process runs with single-threaded BLAS; only the scans, the stage profile and
    the prototype pipelines are measured."""
    from gradstore.indexer.datastore import Datastore, features_path
    from gradstore.service.engine import SelectionEngine, SelectionOptions, TargetSet

    store = Datastore.open(store_path)
    engine = SelectionEngine(store)
    names = store.checkpoint_names
    rng = np.random.default_rng(seed)
    subtasks = [f"s{i * 2 // num_targets}" for i in range(num_targets)]
    targets = TargetSet.from_vectors({name: rng.standard_normal((num_targets, store.dim)) for name in names},
                                     subtasks)
    feature_bytes = store.num_examples * store.dim * 2 * len(names)
    rss_before = proc_status()["VmRSS"]
    paths = [features_path(store.path, name, s) for name in names for s in range(store.manifest.shards.count)]
    if blas1:
        engine.scores(targets)
        times = [_timed(lambda: engine.scores(targets)) for _ in range(repeats)]
        return {"n": store.num_examples, "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
                "scores_s": times, "scores_median_s": float(np.median(times)), "scores_best_s": min(times),
                "scores_gbps": gbps(feature_bytes, min(times)),
                "profile_stages": profile_stages(store, targets, names),
                "prototype_pipelines": prototype_pipelines(store.dim, num_targets, store_path.parent, seed)}

    # Copy bandwidth is measured before and after the scans (the machine is shared: the best of
    # each is compared with the best scan).
    copies_before = {"mmap": mmap_copy(paths, repeats=1), "ram": ram_copy(feature_bytes, 1, repeats=1)}
    reset_peak_rss()  # the copy buffers are not the engine's memory
    rss_before = proc_status()["VmRSS"]
    with RssSampler() as sampler:
        start = time.perf_counter()
        engine.scores(targets)
        first = time.perf_counter() - start
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            scores = engine.scores(targets)
            times.append(time.perf_counter() - start)
    after_scores = proc_status()
    del scores

    start = time.perf_counter()
    selection = engine.select(targets, SelectionOptions(fraction=0.05))
    select_s = time.perf_counter() - start
    after_select = proc_status()
    del selection

    result = {
        "n": store.num_examples, "dim": store.dim, "checkpoints": len(names), "targets": num_targets,
        "shards": store.manifest.shards.count, "feature_bytes": feature_bytes,
        "scores_first_s": first, "scores_s": times, "scores_median_s": float(np.median(times)),
        "scores_best_s": min(times), "scores_gbps": gbps(feature_bytes, min(times)),
        "select_fraction_0.05_s": select_s,
        "rss_before_bytes": rss_before, "vmhwm_after_scores_bytes": after_scores["VmHWM"],
        "peak_rss_anon_during_scores_bytes": sampler.peak_anon,
        "peak_rss_file_during_scores_bytes": sampler.peak_file,
        "vmhwm_after_select_bytes": after_select["VmHWM"],
    }
    copies_after = {"mmap": mmap_copy(paths, repeats=1), "ram": ram_copy(feature_bytes, 1, repeats=1)}
    result["mmap_copy"] = max(copies_before["mmap"], copies_after["mmap"], key=lambda c: c["gbps"])
    result["ram_copy_1thread"] = max(copies_before["ram"], copies_after["ram"], key=lambda c: c["gbps"])
    result["copies_before_after"] = [copies_before, copies_after]
    result["ram_copy_2threads"] = ram_copy(feature_bytes, 2, repeats=1)
    if profile:
        result["profile_functions"] = profile_functions(engine, targets)
        result["profile_stages"] = profile_stages(store, targets, names)
        result["profile_kernels"] = profile_kernels(store.dim, num_targets, store_path.parent, seed)
    return result


# ----------------------------------------------------------------------------------- report


def fmt_bytes(value: float) -> str:
    return f"{value / 2**20:,.0f} MiB" if value < GIB else f"{value / GIB:,.2f} GiB"


def print_report(results: list[dict], target_share: float) -> None:
    header = (f"{'N':>9} {'shards':>6} {'scanned':>10} {'scores() s':>10} {'GB/s':>6} {'mmap copy':>9} "
              f"{'RAM copy':>8} {'of mmap':>7} {'of RAM':>6} {'RSS before':>10} {'VmHWM':>9} "
              f"{'peak anon':>9} {'select s':>8} {'VmHWM sel':>9}")
    print("\nExact scan: SelectionEngine.scores() vs copy bandwidth (GB/s = 1e9 bytes of fp16 features / s; "
          "best scan vs best copy of the run)")
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r['n']:>9,} {r['shards']:>6} {fmt_bytes(r['feature_bytes']):>10} {r['scores_best_s']:>10.2f} "
              f"{r['scores_gbps']:>6.2f} {r['mmap_copy']['gbps']:>9.2f} {r['ram_copy_1thread']['gbps']:>8.2f} "
              f"{r['scores_gbps'] / r['mmap_copy']['gbps']:>7.0%} {r['scores_gbps'] / r['ram_copy_1thread']['gbps']:>6.0%} "
              f"{fmt_bytes(r['rss_before_bytes']):>10} {fmt_bytes(r['vmhwm_after_scores_bytes']):>9} "
              f"{fmt_bytes(r['peak_rss_anon_during_scores_bytes']):>9} {r['select_fraction_0.05_s']:>8.2f} "
              f"{fmt_bytes(r['vmhwm_after_select_bytes']):>9}")
    for r in results:
        print(f"  N={r['n']:,}: RAM copy on 2 threads {r['ram_copy_2threads']['gbps']:.2f} GB/s; "
              f"first (untimed) scan {r['scores_first_s']:.2f} s; scans {', '.join(f'{t:.2f}' for t in r['scores_s'])} s")
    worst = min(r["scores_gbps"] / max(r["mmap_copy"]["gbps"], r["ram_copy_1thread"]["gbps"]) for r in results)
    print(f"\nTarget: scan >= {target_share:.0%} of copy bandwidth: "
          f"{'MET' if worst >= target_share else 'NOT MET'} (worst {worst:.0%} of the higher copy figure)")
    profiled = next((r for r in results if "profile_stages" in r), None)
    if profiled:
        print(f"\nProfile of the scan, N={profiled['n']:,} (whole store, engine batch sizes):")
        for stage, value in profiled["profile_stages"].items():
            print(f"  {stage:<40} {value['seconds']:>7.2f} s {value['gbps']:>7.2f} GB/s")
        functions = profiled["profile_functions"]
        print(f"\ncProfile of one scores() call ({functions['wall_s']:.2f} s), by own time:")
        for row in functions["top"][:8]:
            print(f"  {row['function'][:70]:<70} {row['calls']:>7} calls {row['own_s']:>7.2f} s "
                  f"{row['own_s'] / functions['wall_s']:>5.0%}")
        kernels = profiled["profile_kernels"]
        print(f"\nKernels on one in-memory block ({fmt_bytes(kernels['block_bytes'])} fp16, "
              f"{kernels['rows']:,} x {profiled['dim']}, {profiled['targets']} targets), GB/s of fp16 input:")
        for name, value in kernels["kernels"].items():
            print(f"  {name:<62} {value['gbps']:>7.2f} GB/s")
        blas1 = profiled.get("blas1")
        if blas1:
            mmap_gbps, ram_gbps = profiled["mmap_copy"]["gbps"], profiled["ram_copy_1thread"]["gbps"]
            print(f"\nWith single-threaded BLAS (OPENBLAS_NUM_THREADS=1), N={profiled['n']:,}: scores() "
                  f"{blas1['scores_best_s']:.2f} s = {blas1['scores_gbps']:.2f} GB/s "
                  f"({blas1['scores_gbps'] / mmap_gbps:.0%} of mmap copy, {blas1['scores_gbps'] / ram_gbps:.0%} of RAM copy)")
            for stage, value in blas1["profile_stages"].items():
                print(f"  {stage:<40} {value['seconds']:>7.2f} s {value['gbps']:>7.2f} GB/s")
            proto = blas1["prototype_pipelines"]
            print(f"Whole-file scans of one {fmt_bytes(proto['block_bytes'])} block, Parquet in page cache -> "
                  f"scores (single-threaded BLAS), GB/s of fp16 and share of mmap / RAM copy:")
            for name, value in proto["pipelines"].items():
                print(f"  {name:<72} {value['gbps']:>6.2f} GB/s {value['gbps'] / mmap_gbps:>5.0%} "
                      f"{value['gbps'] / ram_gbps:>5.0%}")


def run_child(command: list[str], env: dict | None = None) -> dict:
    child = subprocess.run(command, capture_output=True, text=True, env=env)
    line = next((l for l in child.stdout.splitlines() if l.startswith("RESULT ")), None)
    if child.returncode != 0 or line is None:
        raise RuntimeError(f"worker failed ({child.returncode}):\n{child.stdout}\n{child.stderr}")
    return json.loads(line[len("RESULT "):])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", default="125000,250000,500000", help="store sizes, comma-separated")
    parser.add_argument("--dim", type=int, default=1024, help="feature dimension k")
    parser.add_argument("--checkpoints", type=int, default=2)
    parser.add_argument("--targets", type=int, default=8)
    parser.add_argument("--shard-size", type=int, default=1024, help="rows per shard (the indexer's default)")
    parser.add_argument("--repeats", type=int, default=2, help="timed scans per store (after one untimed)")
    parser.add_argument("--no-profile", action="store_true", help="skip the stage and kernel profile")
    parser.add_argument("--tmp", default=None, help="folder for the temporary stores (default: system temp)")
    parser.add_argument("--max-disk-gb", type=float, default=10.0, help="refuse stores larger than this")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--blas1", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker is not None:
        result = worker(args.worker, args.targets, args.repeats, args.profile, args.seed, args.blas1)
        print("RESULT " + json.dumps(result))
        return 0

    sizes = sorted(int(v) for v in args.n.split(","))
    checkpoints = [f"epoch-{i + 1}" for i in range(args.checkpoints)]
    largest = sizes[-1] * args.dim * 2 * args.checkpoints * 1.02 + sizes[-1] * 200
    tmp_root = Path(args.tmp or tempfile.gettempdir())
    free = shutil.disk_usage(tmp_root).free
    print(f"largest store about {fmt_bytes(largest)}; {fmt_bytes(free)} free in {tmp_root}")
    if largest > args.max_disk_gb * 1e9 or largest > free - 2 * GIB:
        print("the largest store would not fit the disk budget; lower --n or raise --max-disk-gb", file=sys.stderr)
        return 2

    info = machine_info()
    print(f"{info['cpu']}, {info['cores']} cores, {fmt_bytes(info['memory_bytes'])}; python {info['python']}, "
          f"numpy {info['numpy']}, pyarrow {info['pyarrow']}; load average {info['loadavg_start']}")
    results = []
    root = Path(tempfile.mkdtemp(prefix="gradstore-scan-", dir=tmp_root))
    try:
        for n in sizes:
            store = root / f"store-{n}"
            print(f"N={n:,}: writing the store ...", flush=True)
            built = build_store(store, n, args.dim, checkpoints, args.shard_size, args.seed)
            print(f"  written in {built['write_s']:.1f} s + finalised in {built['finalize_s']:.1f} s, "
                  f"{fmt_bytes(built['store_bytes'])}; scanning in a fresh process ...", flush=True)
            command = [sys.executable, __file__, "--worker", str(store), "--targets", str(args.targets),
                       "--repeats", str(args.repeats), "--seed", str(args.seed)]
            if n == sizes[-1] and not args.no_profile:
                command.append("--profile")
            result = {**run_child(command), "build": built}
            results.append(result)
            print(f"  scores(): {result['scores_best_s']:.2f} s = {result['scores_gbps']:.2f} GB/s; "
                  f"mmap copy {result['mmap_copy']['gbps']:.2f} GB/s", flush=True)
            if n == sizes[-1] and not args.no_profile:
                print("  again with single-threaded BLAS, and prototype pipelines ...", flush=True)
                env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
                result["blas1"] = run_child(command[:-1] + ["--blas1"], env)
            shutil.rmtree(store)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    info["loadavg_end"] = os.getloadavg()
    print_report(results, 0.5)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"benchmark": "selection_scan", "args": vars(args) | {"json": str(args.json)},
                                         "machine": info, "results": results}, indent=2, default=str) + "\n")
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
