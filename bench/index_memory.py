"""Memory of a served FAISS index: read into memory vs memory-mapped (what the service does).

A store's index is built once and then only searched. ``indexer.faiss_index.read_index`` maps its
vectors read-only (``IO_FLAG_MMAP_IFC``), so they live in the page cache — shared between
processes, evictable under memory pressure — instead of in the reader's private memory. This
benchmark writes an index of N synthetic unit vectors of dimension d for each kind, then, in a
fresh process per (kind, mode), reads it, runs one batch of queries twice and reports:

- the read time;
- private memory (``RssAnon``) and mapped file pages (``RssFile``) after the read and after the
  searches, from ``/proc/self/status``;
- queries/s of the second (warm) batch, and whether both modes return the same ids.

    python bench/index_memory.py                          # N = 1M, d = 1024, flat and sq16
    python bench/index_memory.py --n 200000 --kinds flat,sq16,ivf --json memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import faiss
import numpy as np

from gradstore.indexer.faiss_index import build_index, choose_factory, read_index, train_sample_size
from measure import proc_status

MIB = 1 << 20


def unit_batches(n: int, dim: int, seed: int, batch: int = 65536):
    rng = np.random.default_rng(seed)
    for start in range(0, n, batch):
        x = rng.standard_normal((min(batch, n - start), dim), dtype=np.float32)
        yield x / np.linalg.norm(x, axis=1, keepdims=True)


def write_index(path: Path, kind: str, n: int, dim: int, seed: int) -> str:
    _, factory = choose_factory(kind, n, dim, 1 << 40)
    sample_rows = train_sample_size(factory, n, dim, 8 << 30)
    sample = next(unit_batches(sample_rows, dim, seed + 1, batch=max(1, sample_rows))) if sample_rows else None
    faiss.write_index(build_index(unit_batches(n, dim, seed), factory, dim, sample), str(path))
    return factory


def measure(path: str, memory_mapped: bool, dim: int, queries: int, k: int) -> dict:
    """Run in a fresh process: read, search twice, report memory and speed."""
    start = time.perf_counter()
    index = read_index(path, memory_mapped)
    read_seconds = time.perf_counter() - start
    after_read = proc_status()
    q = next(unit_batches(queries, dim, seed=99))
    index.search(q, k)
    start = time.perf_counter()
    _, ids = index.search(q, k)
    search_seconds = time.perf_counter() - start
    return {"read_seconds": read_seconds, "after_read": after_read, "after_search": proc_status(),
            "queries_per_second": queries / search_seconds, "ids_checksum": int(np.asarray(ids, np.int64).sum())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000, help="vectors in the index")
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--kinds", default="flat,sq16", help="comma-separated index kinds (flat, sq16, ivf, hnsw)")
    parser.add_argument("--queries", type=int, default=64)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--workdir", type=Path, help="folder for the index files (default: a temporary one)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--measure", nargs=2, metavar=("PATH", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        path, mode = args.measure
        print(json.dumps(measure(path, mode == "mmap", args.dim, args.queries, args.k)))
        return 0
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="gradstore-index-memory-"))
    workdir.mkdir(parents=True, exist_ok=True)
    results = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "n": args.n, "dim": args.dim,
               "faiss": faiss.__version__, "loadavg_start": os.getloadavg(), "command": " ".join(sys.argv), "kinds": {}}
    print(f"{'kind':<6} {'mode':<9} {'file MiB':>9} {'read s':>7} {'anon MiB':>9} {'file-backed MiB':>16} "
          f"{'queries/s':>10}", flush=True)
    for kind in args.kinds.split(","):
        path = workdir / f"{kind}.faiss"
        start = time.perf_counter()
        factory = write_index(path, kind, args.n, args.dim, seed=0)
        entry = {"factory": factory, "build_seconds": time.perf_counter() - start,
                 "file_bytes": path.stat().st_size, "modes": {}}
        for mode in ("memory", "mmap"):
            out = subprocess.run([sys.executable, __file__, "--measure", str(path), mode, "--dim", str(args.dim),
                                  "--queries", str(args.queries), "--k", str(args.k)],
                                 check=True, capture_output=True, text=True).stdout
            entry["modes"][mode] = measured = json.loads(out)
            memory = measured["after_search"]
            print(f"{kind:<6} {mode:<9} {entry['file_bytes'] / MIB:>9,.0f} {measured['read_seconds']:>7.2f} "
                  f"{memory['RssAnon'] / MIB:>9,.0f} {memory['RssFile'] / MIB:>16,.0f} "
                  f"{measured['queries_per_second']:>10,.1f}", flush=True)
        entry["same_ids"] = entry["modes"]["memory"]["ids_checksum"] == entry["modes"]["mmap"]["ids_checksum"]
        results["kinds"][kind] = entry
        path.unlink()
    results["loadavg_end"] = os.getloadavg()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
