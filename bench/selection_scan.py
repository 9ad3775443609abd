"""Exact selection scan: scoring every example of a store against a target set, versus bandwidth.

For each store size N, a synthetic store is written through the real writer
(``datastore.write_shard`` + ``finalize_store`` with index kind ``none`` + ``publish_store``):
random L2-normalised fp16 features, ``--checkpoints`` checkpoints, the indexer's default shard
size; the features are stored once, as ``.npy`` fp16 matrices
(``segments/<segment>/features/<checkpoint>/part-NNNNN.npy``); then ``gradstore quantize`` adds
its int8 and 1bit copies (timed). A fresh child process opens it and times
``SelectionEngine(store).scores(targets)`` for ``--targets`` random targets in two subtasks (warm
page cache: the store was just written), for each engine set-up (the default: the first of
``scan.BACKENDS`` installed, numba's kernel with the ``cpu`` extra, one scan thread per CPU up to
4; then one scan thread; then each other kernel), over the store as ``Datastore`` opens it:
``raw_features`` gives each feature file as a read-only ``np.memmap`` that the store keeps open,
and the kernels read the rows in place. The first scan of the process maps the files' pages
(one page fault each) and is reported apart; the timed scans read maps already made, as every
query after the first does in a serving process. It checks that all set-ups give the same
scores, then times the default set-up scanning the int8 and the 1bit copies (``precision``),
and measures, in the same process, the machine's copy bandwidth:

* ``mmap copy``: every feature file the scan reads, memory-mapped with ``np.memmap`` and copied
  with ``np.copyto`` into a reused buffer: the same bytes, files and page cache as the scan;
* ``RAM copy``: ``np.copyto`` between two in-memory arrays of the scanned size (at most 1 GiB,
  repeated to the same total bytes), on one thread (and once on two threads, halves in parallel);
* ``read() copy``: every feature file read with ``readinto`` into a reused 1 MiB buffer.

The machine may be shared, so the copies are timed before and after the scans, and the best copy
is compared with the best timed scan of each set-up. The kernels are compiled (numba) and loaded
before any timing: once per process, reported as ``kernel_warm_up``.

The throughput of a scan is the feature bytes it reads (N × k × 2 bytes × checkpoints) over its
wall time (for a quantised copy, also its codes and scales over the wall time). Each timed scan
also records the process's CPU time (user + system, all threads): CPU time over wall time is how
many cores the scan actually ran on, which on a shared machine can be fewer than its threads.
Memory, for the default set-up: ``VmHWM`` (peak resident set, reset just before the scans) of
the child after the scans, its resident set before them, and the peaks of ``RssAnon``
(anonymous memory) and ``RssFile`` (store pages mapped, which the open maps keep) sampled every
10 ms during them. A fresh process per N makes the peaks comparable.

For reference, two processes then scan the whole store at the same moment, one scan thread each.

With ``--profile`` (on by default, largest store) the conversion and product kernels are timed on
one in-memory block, and the scan kernels on the same block given as a file map.
``--no-fallback`` is accepted and does nothing (there is no Parquet fallback any more).

    python bench/selection_scan.py                      # N = 125k, 250k, 500k at k = 1024, 2 checkpoints
    python bench/selection_scan.py --n 50000 --dim 8192 --json scan.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from measure import RssSampler, machine_info, proc_status, reset_peak_rss

GIB = 1 << 30


# ------------------------------------------------------------------------------------ helpers


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


def build_store(out: Path, n: int, dim: int, checkpoints: list[str], shard_size: int, seed: int,
                index_kind: str = "none", index_memory_budget: int = 4 << 30) -> dict:
    """Write a synthetic store of ``n`` examples at ``out`` through the real writer (with an index
    of ``index_kind``, none by default, built within ``index_memory_budget``)."""
    from gradstore.datastore import FeatureBatch, examples_table, finalize_store, publish_store, write_shard

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
    finalize_store(work, manifest_fields(checkpoints, dim), index_kind=index_kind,
                   index_memory_budget=index_memory_budget, expected_shards=-(-n // shard_size))
    publish_store(work, out, overwrite=False)
    done = time.perf_counter()
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    feature_bytes = sum(p.stat().st_size for p in out.glob("segments/*/features/*/*.npy"))
    return {"write_s": written - start, "finalize_s": done - written, "store_bytes": size,
            "feature_file_bytes": feature_bytes}


def add_quantized_copies(store: Path) -> dict:
    """``gradstore quantize`` of each kind, in seconds each."""
    from gradstore.datastore.layout import QUANTIZATION_CHOICES
    from gradstore.datastore.versions import quantize

    seconds = {}
    for kind in QUANTIZATION_CHOICES:
        start = time.perf_counter()
        quantize(store, kind)
        seconds[kind] = time.perf_counter() - start
    return seconds


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
    return {"bytes": passes * size, "array_bytes": size, "threads": threads, "seconds": min(times),
            "gbps": gbps(passes * size, min(times))}


# ---------------------------------------------------------------------------------- profile


def profile_kernels(dim: int, num_targets: int, scratch: Path, seed: int = 0) -> dict:
    """Conversion and product kernels on one in-memory 128 MiB fp16 block (out of the L2 cache
    like a scan's input), and the scan kernels on the same block saved to ``scratch`` and given
    as a file map (read from the page cache), on one thread with single-threaded torch; GB/s of
    fp16 input."""
    import torch

    from gradstore.selection.scan import BACKENDS, ScanKernel, half_to_float

    rows = max(1, (128 << 20) // (2 * dim))
    rng = np.random.default_rng(seed)
    half = rng.standard_normal((rows, dim), dtype=np.float32).astype(np.float16)
    query = rng.standard_normal((num_targets, dim), dtype=np.float32)
    out = np.zeros((num_targets, rows), dtype=np.float32)
    source, target = np.ones(half.nbytes, dtype=np.uint8), np.ones(half.nbytes, dtype=np.uint8)
    np.save(scratch, half)
    mapped = np.load(scratch, mmap_mode="r")
    kernel = {backend: ScanKernel(dim, backend) for backend in BACKENDS}
    block_rows = kernel["numpy"].block_rows
    buffer = np.ones((block_rows, dim), dtype=np.float32)
    torch_half, torch_buffer = torch.from_numpy(half), torch.from_numpy(buffer)

    def blocks(convert):
        def run():
            for start in range(0, rows, block_rows):
                stop = min(rows, start + block_rows)
                convert(start, stop)
        return run

    kernels = {
        "memcpy of the same bytes (reference)": lambda: np.copyto(target, source),
        "numpy astype fp16->fp32, whole block (the old engine)": lambda: half.astype(np.float32),
        f"numpy cast into a reused {block_rows}-row buffer": blocks(
            lambda a, b: np.copyto(buffer[:b - a], half[a:b], casting="unsafe")),
        f"integer-op conversion (scan.half_to_float), {block_rows}-row buffer": blocks(
            lambda a, b: half_to_float(half[a:b], buffer[:b - a])),
        f"torch conversion (F16C), {block_rows}-row buffer": blocks(
            lambda a, b: torch_buffer[:b - a].copy_(torch_half[a:b])),
        **{f"ScanKernel({backend!r}): conversion + product, {block_rows}-row blocks":
           (lambda k=k: k.add_products(half, query, out)) for backend, k in kernel.items()},
        **{f"ScanKernel({backend!r}) on the block's file map (read in place, convert, multiply)":
           (lambda k=k: k.add_products(mapped, query, out)) for backend, k in kernel.items()},
    }
    results = {}
    for name, run in kernels.items():
        run()
        seconds = min(_timed(run) for _ in range(3))
        results[name] = {"seconds": seconds, "gbps": gbps(half.nbytes, seconds)}
    scratch.unlink()
    return {"block_bytes": half.nbytes, "rows": rows, "kernels": results}


def _cpu_seconds() -> float:
    """User + system CPU time of this process, all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# ----------------------------------------------------------------------------------- worker


def scan_configs(threads: int) -> list[dict]:
    """The engine set-ups timed on every store: the default first (its memory is measured), then
    one scan thread, then the other kernels."""
    from gradstore.selection.scan import BACKENDS

    default = BACKENDS[0]
    configs = [{"label": f"default: {default} kernel, {threads} scan threads", "backend": default,
                "threads": threads}]
    if threads > 1:
        configs.append({"label": f"{default} kernel, 1 scan thread", "backend": default, "threads": 1})
    configs += [{"label": f"{backend} kernel, {threads} scan threads", "backend": backend, "threads": threads}
                for backend in BACKENDS[1:]]
    return configs


def read_copy(paths: list[Path], repeats: int) -> dict:
    """Best of ``repeats`` passes reading every file into a reused 1 MiB buffer (``readinto``)."""
    buffer = memoryview(np.empty(1 << 20, dtype=np.uint8))
    total = sum(p.stat().st_size for p in paths)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for path in paths:
            with open(path, "rb", buffering=0) as file:
                while file.readinto(buffer):
                    pass
        times.append(time.perf_counter() - start)
    return {"bytes": total, "seconds": min(times), "gbps": gbps(total, min(times))}


def random_targets(store, num_targets: int, seed: int):
    """``num_targets`` random target vectors per checkpoint, in two subtasks."""
    from gradstore.selection import TargetSet

    rng = np.random.default_rng(seed)
    subtasks = [f"s{i * 2 // num_targets}" for i in range(num_targets)]
    return TargetSet.from_vectors({name: rng.standard_normal((num_targets, store.dim))
                                   for name in store.checkpoint_names}, subtasks)


def process_pair(store_path: Path, num_targets: int, repeats: int, seed: int) -> dict:
    """Two processes scanning the whole store at once, one scan thread each (numba's kernel where
    installed): the aggregate GB/s of each round (both scans' bytes over the time from the first
    start to the last end) and the cores the two used together; the best round is reported."""
    start_at = time.time() + 10  # after both have imported, opened the store and scanned once
    command = [sys.executable, __file__, "--pair-scan", str(store_path), "--targets", str(num_targets),
               "--repeats", str(repeats), "--seed", str(seed), "--start-at", str(start_at)]
    children = [subprocess.Popen(command, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for _ in range(2)]
    runs = []
    for child in children:
        out, err = child.communicate()
        line = next((l for l in out.splitlines() if l.startswith("RESULT ")), None)
        if child.returncode != 0 or line is None:
            raise RuntimeError(f"pair scan failed ({child.returncode}):\n{out}\n{err}")
        runs.append(json.loads(line[len("RESULT "):]))
    rounds = []
    for first, second in zip(runs[0]["rounds"], runs[1]["rounds"]):
        wall = max(first["end"], second["end"]) - min(first["start"], second["start"])
        rounds.append({"wall_s": wall, "gbps": gbps(2 * runs[0]["feature_bytes"], wall),
                       "cores": (first["cpu_s"] + second["cpu_s"]) / wall})
    return {"rounds": rounds, "best": max(rounds, key=lambda r: r["gbps"])}


def pair_scan(store_path: Path, num_targets: int, repeats: int, seed: int, start_at: float) -> dict:
    """One process of :func:`process_pair`: one untimed scan, then ``repeats`` from ``start_at``."""
    from gradstore.datastore import Datastore
    from gradstore.selection import SelectionEngine

    store = Datastore.open(store_path)
    targets = random_targets(store, num_targets, seed)
    engine = SelectionEngine(store, scan_threads=1)
    engine.scores(targets)
    time.sleep(max(0.0, start_at - time.time()))
    rounds = []
    for _ in range(repeats):
        cpu, start = _cpu_seconds(), time.time()
        engine.scores(targets)
        rounds.append({"start": start, "end": time.time(), "cpu_s": _cpu_seconds() - cpu})
    return {"feature_bytes": store.num_examples * store.dim * 2 * len(store.checkpoint_names), "rounds": rounds}


def timed_scans(engine, targets, repeats: int, measure_memory: bool, precision: str = "fp16") -> tuple[dict, object]:
    """One ``scores()`` (timed apart: the process's first maps the files), then ``repeats`` timed;
    with ``measure_memory``, the process's resident set before and its peaks during them."""
    if measure_memory:
        reset_peak_rss()  # the copy buffers are not the engine's memory
        rss_before = proc_status()["VmRSS"]
        sampler = RssSampler().__enter__()
    start = time.perf_counter()
    scores = engine.scores(targets, precision=precision)
    first = time.perf_counter() - start
    times, cpu = [], []
    for _ in range(repeats):
        before = _cpu_seconds()
        times.append(_timed(lambda: engine.scores(targets, precision=precision)))
        cpu.append(_cpu_seconds() - before)
    best = int(np.argmin(times))
    result = {"scores_first_s": first, "scores_s": times, "scores_best_s": times[best], "cpu_s": cpu,
              "cpu_of_best_s": cpu[best]}
    if measure_memory:
        sampler.__exit__()
        result["memory"] = {"rss_before_bytes": rss_before, "vmhwm_after_scores_bytes": proc_status()["VmHWM"],
                            "peak_rss_anon_during_scores_bytes": sampler.peak_anon,
                            "peak_rss_file_during_scores_bytes": sampler.peak_file}
    return result, scores


def worker(store_path: Path, num_targets: int, repeats: int, profile: bool, seed: int) -> dict:
    """Runs in a fresh process: scans, memory peaks, bandwidths (and the kernel profile)."""
    from concurrent.futures import ThreadPoolExecutor

    from gradstore.datastore import Datastore
    from gradstore.selection import SelectionEngine, SelectionOptions
    from gradstore.selection.scan import ScanKernel, scan_threads, single_threaded_worker

    store = Datastore.open(store_path)
    names = store.checkpoint_names
    targets = random_targets(store, num_targets, seed)
    feature_bytes = store.num_examples * store.dim * 2 * len(names)
    paths = [shard.files.features(name, shard.local) for name in names for shard in store.shards]
    configs = scan_configs(scan_threads())

    # Copy bandwidth is measured before and after the scans (the machine is shared: the best of
    # each is compared with the best scan).
    copies_before = {"mmap": mmap_copy(paths, repeats=1), "ram": ram_copy(feature_bytes, 1, repeats=1),
                     "read": read_copy(paths, repeats=1)}
    # The kernels compile (numba) or load (torch) on first use: once per process, not the scan's.
    start = time.perf_counter()
    for backend in {config["backend"] for config in configs}:
        ScanKernel(store.dim, backend).add_products(np.zeros((1, store.dim), np.float16),
                                                    np.zeros((1, store.dim), np.float32), np.zeros((1, 1), np.float32))
    warm_up = {"seconds": time.perf_counter() - start, "vmrss_after_bytes": proc_status()["VmRSS"]}
    results, reference, memory = [], None, None
    for config in configs:
        engine = SelectionEngine(store, scan_threads=config["threads"], scan_backend=config["backend"])
        # Memory is measured for the first (default) set-up.
        measured = not results
        result, scores = timed_scans(engine, targets, repeats, measured)
        if reference is None:
            reference = scores
        elif not (np.allclose(scores.best, reference.best, atol=1e-5)
                  and np.allclose(scores.per_subtask, reference.per_subtask, atol=1e-5)):
            raise AssertionError(f"{config['label']}: scores differ from the default set-up's")
        if measured:
            memory = result.pop("memory")
        results.append({**config, **result, "scores_gbps": gbps(feature_bytes, result["scores_best_s"])})
        del scores

    quantized = {}
    for precision in store.manifest.features.quantized:
        engine = SelectionEngine(store)
        result, _ = timed_scans(engine, targets, repeats, False, precision)
        stored = sum(store.quantized_features(precision, name, shard).nbytes
                     for name in names for shard in range(len(store.shards)))
        quantized[precision] = {**result, "bytes_read": stored, "scores_gbps": gbps(feature_bytes, result["scores_best_s"]),
                                "read_gbps": gbps(stored, result["scores_best_s"])}

    engine = SelectionEngine(store)
    start = time.perf_counter()
    selection = engine.select(targets, SelectionOptions(fraction=0.05))
    select_s = time.perf_counter() - start
    after_select = proc_status()
    del selection

    copies_after = {"mmap": mmap_copy(paths, repeats=1), "ram": ram_copy(feature_bytes, 1, repeats=1),
                    "read": read_copy(paths, repeats=1)}
    result = {
        "n": store.num_examples, "dim": store.dim, "checkpoints": len(names), "targets": num_targets,
        "shards": len(store.shards), "feature_bytes": feature_bytes, "scans": results, "quantized_scans": quantized,
        "first_scan_s": results[0]["scores_first_s"],
        "scores_best_s": results[0]["scores_best_s"], "scores_gbps": results[0]["scores_gbps"],
        **memory,
        "select_fraction_0.05_s": select_s, "vmhwm_after_select_bytes": after_select["VmHWM"],
        "mmap_copy": max(copies_before["mmap"], copies_after["mmap"], key=lambda c: c["gbps"]),
        "ram_copy_1thread": max(copies_before["ram"], copies_after["ram"], key=lambda c: c["gbps"]),
        "read_copy": max(copies_before["read"], copies_after["read"], key=lambda c: c["gbps"]),
        "kernel_warm_up": warm_up,
        "copies_before_after": [copies_before, copies_after],
        "ram_copy_2threads": ram_copy(feature_bytes, 2, repeats=1),
        "two_processes": process_pair(store_path, num_targets, repeats, seed),
    }
    if profile:
        with ThreadPoolExecutor(1, initializer=single_threaded_worker) as pool:
            result["profile_kernels"] = pool.submit(profile_kernels, store.dim, num_targets,
                                                    store_path.parent / "profile-block.npy", seed).result()
    return result


# ----------------------------------------------------------------------------------- report


def fmt_bytes(value: float) -> str:
    return f"{value / 2**20:,.0f} MiB" if value < GIB else f"{value / GIB:,.2f} GiB"


def print_report(results: list[dict], target_share: float) -> None:
    header = (f"{'N':>9} {'k':>5} {'shards':>6} {'scanned':>10} {'scores() s':>10} {'GB/s':>6} {'mmap copy':>9} "
              f"{'RAM copy':>8} {'of mmap':>7} {'of RAM':>6} {'RSS before':>10} {'VmHWM':>9} "
              f"{'peak anon':>9} {'peak file':>9} {'select s':>8} {'VmHWM sel':>9}")
    print("\nExact scan: SelectionEngine.scores() (default set-up) vs copy bandwidth (GB/s = 1e9 bytes of fp16 "
          "features / s; best scan vs best copy of the run)")
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r['n']:>9,} {r['dim']:>5} {r['shards']:>6} {fmt_bytes(r['feature_bytes']):>10} "
              f"{r['scores_best_s']:>10.2f} {r['scores_gbps']:>6.2f} {r['mmap_copy']['gbps']:>9.2f} "
              f"{r['ram_copy_1thread']['gbps']:>8.2f} {r['scores_gbps'] / r['mmap_copy']['gbps']:>7.0%} "
              f"{r['scores_gbps'] / r['ram_copy_1thread']['gbps']:>6.0%} {fmt_bytes(r['rss_before_bytes']):>10} "
              f"{fmt_bytes(r['vmhwm_after_scores_bytes']):>9} {fmt_bytes(r['peak_rss_anon_during_scores_bytes']):>9} "
              f"{fmt_bytes(r['peak_rss_file_during_scores_bytes']):>9} {r['select_fraction_0.05_s']:>8.2f} "
              f"{fmt_bytes(r['vmhwm_after_select_bytes']):>9}")
    print("\nFirst scan of the process (maps made, one page fault per page), default set-up:")
    for r in results:
        print(f"  N={r['n']:,} k={r['dim']}: {r['first_scan_s']:.2f} s = {gbps(r['feature_bytes'], r['first_scan_s']):.2f} "
              f"GB/s ({gbps(r['feature_bytes'], r['first_scan_s']) / r['ram_copy_1thread']['gbps']:.0%} of RAM copy)")
    print("\nQuantised copies, default set-up (GB/s of the fp16 features they stand for; of their own bytes):")
    for r in results:
        fp16 = r["scores_best_s"]
        for precision, q in r.get("quantized_scans", {}).items():
            print(f"  N={r['n']:,} k={r['dim']}: {precision:<5} {q['scores_best_s']:.2f} s "
                  f"({fp16 / q['scores_best_s']:.2f}x fp16's speed), {q['scores_gbps']:.2f} GB/s fp16-equivalent, "
                  f"{q['read_gbps']:.2f} GB/s of {fmt_bytes(q['bytes_read'])} read, "
                  f"CPU {q['cpu_of_best_s']:.2f} s; quantize took {r['build']['quantize_s'][precision]:.1f} s")
    print("\nEvery set-up (best timed scan, GB/s, share of the run's mmap / RAM copy):")
    for r in results:
        mmap_gbps, ram_gbps = r["mmap_copy"]["gbps"], r["ram_copy_1thread"]["gbps"]
        for scan in r["scans"]:
            print(f"  N={r['n']:,} k={r['dim']}: {scan['label']:<48} {scan['scores_best_s']:>7.2f} s "
                  f"{scan['scores_gbps']:>6.2f} GB/s {scan['scores_gbps'] / mmap_gbps:>5.0%} "
                  f"{scan['scores_gbps'] / ram_gbps:>5.0%}  CPU {scan['cpu_of_best_s']:.2f} s "
                  f"({scan['cpu_of_best_s'] / scan['scores_best_s']:.2f} cores, "
                  f"{gbps(r['feature_bytes'], scan['cpu_of_best_s']):.2f} GB per CPU-s)  "
                  f"(scans {', '.join(f'{t:.2f}' for t in scan['scores_s'])} s)")
        best = r["two_processes"]["best"]
        print(f"  N={r['n']:,} k={r['dim']}: two processes at once (1 scan thread each): "
              f"{best['gbps']:.2f} GB/s together, {best['gbps'] / mmap_gbps:.0%} / {best['gbps'] / ram_gbps:.0%}, "
              f"{best['cores']:.2f} cores")
        print(f"  N={r['n']:,} k={r['dim']}: read() copy {r['read_copy']['gbps']:.2f} GB/s; "
              f"RAM copy on 2 threads {r['ram_copy_2threads']['gbps']:.2f} GB/s; "
              f"store {fmt_bytes(r['build']['store_bytes'])}, feature files "
              f"{fmt_bytes(r['build']['feature_file_bytes'])}")
    print()
    for reference, name in (("mmap_copy", "the memory-mapped copy of the same files"),
                            ("ram_copy_1thread", "the in-memory copy")):
        worst = min(r["scores_gbps"] / r[reference]["gbps"] for r in results)
        print(f"Target: the default set-up >= {target_share:.0%} of {name}: "
              f"{'MET' if worst >= target_share else 'NOT MET'} (worst {worst:.0%})")
    for r in results:
        if "profile_kernels" in r:
            kernels = r["profile_kernels"]
            print(f"\nKernels on one 128 MiB block ({fmt_bytes(kernels['block_bytes'])} fp16, "
                  f"{kernels['rows']:,} x {r['dim']}, {r['targets']} targets), one thread, GB/s of fp16 input:")
            for name, value in kernels["kernels"].items():
                print(f"  {name:<72} {value['gbps']:>7.2f} GB/s")


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
    parser.add_argument("--repeats", type=int, default=2, help="timed scans per set-up (after one untimed)")
    parser.add_argument("--no-profile", action="store_true", help="skip the kernel profile")
    parser.add_argument("--no-fallback", action="store_true",
                        help="no effect (kept for older commands: there is no Parquet fallback any more)")
    parser.add_argument("--tmp", default=None, help="folder for the temporary stores (default: system temp)")
    parser.add_argument("--max-disk-gb", type=float, default=10.0, help="refuse stores larger than this")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--pair-scan", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--start-at", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.pair_scan is not None:
        result = pair_scan(args.pair_scan, args.targets, args.repeats, args.seed, args.start_at)
        print("RESULT " + json.dumps(result))
        return 0
    if args.worker is not None:
        result = worker(args.worker, args.targets, args.repeats, args.profile, args.seed)
        print("RESULT " + json.dumps(result))
        return 0

    sizes = sorted(int(v) for v in args.n.split(","))
    checkpoints = [f"epoch-{i + 1}" for i in range(args.checkpoints)]
    # The features (stored once) plus the examples and scores.
    largest = sizes[-1] * args.dim * 2 * args.checkpoints * 1.02 + sizes[-1] * 200
    tmp_root = Path(args.tmp or tempfile.gettempdir())
    free = shutil.disk_usage(tmp_root).free
    print(f"largest store about {fmt_bytes(largest)}; {fmt_bytes(free)} free in {tmp_root}")
    if largest > args.max_disk_gb * 1e9 or largest > free - 2 * GIB:
        print("the largest store would not fit the disk budget; lower --n or raise --max-disk-gb", file=sys.stderr)
        return 2

    info = machine_info()
    print(f"{info['cpu']}, {info['cores']} cores, {fmt_bytes(info['memory_bytes'])}; python {info['python']}, "
          f"numpy {info['numpy']}, torch {info['torch']}, pyarrow {info['pyarrow']}; "
          f"load average {info['loadavg_start']}")
    results = []
    root = Path(tempfile.mkdtemp(prefix="gradstore-scan-", dir=tmp_root))
    try:
        for n in sizes:
            store = root / f"store-{n}"
            print(f"N={n:,}: writing the store ...", flush=True)
            built = build_store(store, n, args.dim, checkpoints, args.shard_size, args.seed)
            built["quantize_s"] = add_quantized_copies(store)
            print(f"  written in {built['write_s']:.1f} s + finalised in {built['finalize_s']:.1f} s, "
                  f"{fmt_bytes(built['store_bytes'])}; scanning in a fresh process ...", flush=True)
            command = [sys.executable, __file__, "--worker", str(store), "--targets", str(args.targets),
                       "--repeats", str(args.repeats), "--seed", str(args.seed)]
            if n == sizes[-1] and not args.no_profile:
                command.append("--profile")
            result = {**run_child(command), "build": built, "loadavg_after": os.getloadavg()}
            results.append(result)
            print(f"  scores(): {result['scores_best_s']:.2f} s = {result['scores_gbps']:.2f} GB/s; "
                  f"mmap copy {result['mmap_copy']['gbps']:.2f} GB/s; RAM copy "
                  f"{result['ram_copy_1thread']['gbps']:.2f} GB/s; load average {result['loadavg_after']}",
                  flush=True)
            shutil.rmtree(store)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    info["loadavg_end"] = os.getloadavg()
    print_report(results, 0.6)
    print(f"\nload average at start {info['loadavg_start']}, at end {info['loadavg_end']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"benchmark": "selection_scan", "args": vars(args) | {"json": str(args.json)},
                                         "machine": info, "results": results}, indent=2, default=str) + "\n")
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
