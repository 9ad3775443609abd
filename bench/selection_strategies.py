"""Cost of the geometric strategies (gio, diversity) and of MMR re-ranking at 100k and 1M examples.

Features are synthetic and clustered: ``--clusters`` random unit centres in ``--dim`` dimensions,
each example a centre plus Gaussian noise (``--spread``), L2-normalised, stored float16 in a
``.npy`` file and memory-mapped, so a run gathers rows from a memory map as the engine's
``features_at`` does from a store's raw files. ``--targets`` targets are drawn the same way from
three of the clusters.

Every (method, N) runs in a fresh child process, which times the numerical core the strategy
calls (``gio_select``; ``knn_graph`` + ``greedy``; ``mmr_rerank``) and reports its peak resident
set (``VmHWM``: the process's whole peak, interpreter and libraries included) and its CPU time:

* ``gio``: budget 5 % of N, GIO's stopping rule, 1,500 centroids for the pool (the targets are
  fewer, so not quantised), k = 5; ``gio:budget``: the same run to the budget;
* ``diversity:facility_location`` and ``diversity:graph_cut``: budget 5 % of N, 10 neighbours,
  ε = 0.01, IVF graph (nprobe 8) from 20,000 examples on; the graph's recall of 200 random
  examples' exact 10 nearest (not timed);
* ``mmr``: λ = 0.5 over the pool ranked by its largest similarity to the targets (the ranking is
  not timed: it is the ``less`` scan's), budget 1 % of N.

    python bench/selection_strategies.py                       # N = 100k, then 1M, k = 256
    python bench/selection_strategies.py --n 100000 --json strategies.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from measure import machine_info, proc_status

METHODS = ("gio", "gio:budget", "diversity:facility_location", "diversity:graph_cut", "mmr")
MIB = 1 << 20


def write_features(path: Path, n: int, dim: int, clusters: int, spread: float, seed: int) -> None:
    """``n`` clustered unit fp16 vectors into ``path`` (an .npy file), written in blocks."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, dim))
    for start in range(0, n, 65536):
        stop = min(n, start + 65536)
        block = centres[rng.integers(0, clusters, stop - start)]
        block += spread * rng.standard_normal(block.shape).astype(np.float32) / np.sqrt(dim)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[start:stop] = block
    out.flush()
    targets = centres[rng.integers(0, 3, 500)] + spread * rng.standard_normal((500, dim)).astype(np.float32) / np.sqrt(dim)
    np.save(path.with_suffix(".targets.npy"), (targets / np.linalg.norm(targets, axis=1, keepdims=True)).astype(np.float32))


def graph_recall(graph, features: np.ndarray, probes: int) -> float:
    """The share of ``probes`` random examples' exact 10 nearest others found in their graph row."""
    rng = np.random.default_rng(1)
    found = total = 0
    for i in rng.choice(len(features), probes, replace=False):
        sims = np.empty(len(features), dtype=np.float32)
        for start in range(0, len(features), 262144):
            sims[start:start + 262144] = features[start:start + 262144].astype(np.float32) @ \
                features[i].astype(np.float32)
        sims[i] = -np.inf
        exact = np.argpartition(-sims, 10)[:10]
        row = set(graph.indices[graph.indptr[i]:graph.indptr[i + 1]].tolist())
        found += sum(int(j) in row for j in exact)
        total += 10
    return round(found / total, 3)


def child(method: str, path: Path, targets_count: int) -> dict:
    """One measurement in this process (see the module docstring)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from gradstore.selection.feature_space import FeatureSpace
    from gradstore.selection.gio import gio_select
    from gradstore.selection.mmr import mmr_rerank
    from gradstore.selection.submodular import greedy, knn_graph, make_objective

    features = np.load(path, mmap_mode="r")
    targets = np.load(path.with_suffix(".targets.npy"))[:targets_count]
    n, dim = features.shape
    space = FeatureSpace("gradients", dim, lambda rows: features[np.asarray(rows)].astype(np.float32), targets)
    pool = np.arange(n, dtype=np.int64)
    before = proc_status()
    wall, cpu = time.perf_counter(), time.process_time()
    detail: dict = {}
    elapsed = None
    if method in ("gio", "gio:budget"):
        chosen = gio_select(space, pool, budget=n // 20, k=5, centroids=1500, stop_on_rise=method == "gio")
        detail = {key: chosen.report[key] for key in ("steps", "stopped", "selected", "quantized")}
        detail["kl_first_last"] = [chosen.report["kl"][0], chosen.report["kl"][-1]]
    elif method.startswith("diversity:"):
        graph = knn_graph(space, pool, neighbors=10, nprobe=8)
        graph_wall = time.perf_counter() - wall
        objective = make_objective(method.split(":", 1)[1], graph)
        chosen, _ = greedy(objective, n // 20, epsilon=0.01)
        greedy_seconds = time.perf_counter() - wall - graph_wall
        elapsed = time.perf_counter() - wall, time.process_time() - cpu  # the recall check is not timed
        detail = {"graph_seconds": round(graph_wall, 2), "greedy_seconds": round(greedy_seconds, 2),
                  "graph_recall_at_10": graph_recall(graph, features, 200),
                  "graph_entries": len(graph.indices), "selected": len(chosen),
                  "value": round(objective.value, 3)}
    elif method == "mmr":
        relevance = np.empty(n, dtype=np.float32)
        for start in range(0, n, 65536):
            relevance[start:start + 65536] = (space.gather(pool[start:start + 65536]) @ targets.T).max(axis=1)
        ranking = pool[np.lexsort((pool, -relevance))]
        wall, cpu = time.perf_counter(), time.process_time()
        rows = mmr_rerank(ranking, relevance[ranking], space.gather, n // 100, 0.5)
        overlap = len(np.intersect1d(rows, ranking[:n // 100]))
        detail = {"selected": len(rows), "shared_with_plain_top": overlap}
    else:
        raise SystemExit(f"unknown method {method!r}: expected one of {', '.join(METHODS)}")
    wall, cpu = elapsed or (time.perf_counter() - wall, time.process_time() - cpu)
    after = proc_status()
    return {"method": method, "n": n, "dim": dim, "seconds": round(wall, 2), "cpu_seconds": round(cpu, 2),
            "peak_rss_mib": round(after["VmHWM"] / MIB), "rss_before_mib": round(before["VmRSS"] / MIB), **detail}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--clusters", type=int, default=200)
    parser.add_argument("--spread", type=float, default=0.8, help="noise norm relative to the unit centres")
    parser.add_argument("--targets", type=int, default=500)
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--work", type=Path, help="where the features are written (default: a temporary folder)")
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], Path(args.child[1]), args.targets)))
        return
    results = {"machine": machine_info(), "command": " ".join(sys.argv), "runs": []}
    with tempfile.TemporaryDirectory(dir=args.work) as work:
        for n in args.n:
            path = Path(work) / f"features-{n}.npy"
            started = time.perf_counter()
            write_features(path, n, args.dim, args.clusters, args.spread, seed=0)
            print(f"N = {n:,}: features written in {time.perf_counter() - started:.1f} s", flush=True)
            for method in args.methods:
                out = subprocess.run([sys.executable, __file__, "--targets", str(args.targets), "--child", method,
                                      str(path)], capture_output=True, text=True, check=False)
                if out.returncode:
                    raise SystemExit(f"{method} at N = {n}: {out.stderr}")
                run = json.loads(out.stdout.strip().splitlines()[-1])
                results["runs"].append(run)
                print(json.dumps(run), flush=True)
            path.unlink()
    results["loadavg_end"] = list(os.getloadavg())
    print("\n| method | N | wall | CPU | peak RSS | detail |\n| --- | ---: | ---: | ---: | ---: | --- |")
    for run in results["runs"]:
        detail = {k: v for k, v in run.items() if k not in ("method", "n", "dim", "seconds", "cpu_seconds",
                                                             "peak_rss_mib", "rss_before_mib")}
        print(f"| {run['method']} | {run['n']:,} | {run['seconds']} s | {run['cpu_seconds']} s | "
              f"{run['peak_rss_mib']} MiB | {json.dumps(detail)} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
