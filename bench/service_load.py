"""Service under load: ``select`` and ``influence`` with 1, 8 and 32 concurrent clients on loopback.

A real datastore (by default a synthetic one written by the real writer, as in
``selection_scan.py``: random unit fp16 features, ``--n`` examples × k = ``--dim`` × ``--checkpoints``,
with a Flat FAISS index; or an existing store with ``--store``) is served by ``gradstore serve`` in
its own process on a free loopback port (:class:`gradstore.service.process.ServiceProcess`). For
each endpoint and each concurrency level, that many client threads, each with its own SDK
:class:`~gradstore.client.Client` (no retries, so every error is counted), send requests back to
back for ``--duration`` seconds; requests started before the end are awaited. Every request
carries fresh random target vectors (``--targets`` per request), so the selection cache never
answers: each ``select`` scores the whole store, each ``influence`` searches the index (an exact
scan when the store has none).

Reported per endpoint and level: requests/s (completed requests over the time from the start to
the last completion), latency p50/p99 as the client sees it (JSON encoding of the targets
included), errors (HTTP status or exception; the target is 0), and the server's memory from
``/proc/<pid>/status``: ``VmRSS`` at the start and end of the level, its peak sampled every 0.25 s,
and ``VmHWM``; and ``RssAnon`` (the process's private memory) at the end and its sampled peak, apart
from ``RssFile`` (pages of mapped files such as a memory-mapped index, which belong to the page
cache). A sample of the responses (``--check`` per endpoint and level, evenly spaced) is
checked against the exact computation in numpy over the store's Parquet files: the rows must be a
top k of Σ_c w_c cos(feature_c, target_c) (mean over the targets for ``select``) with those scores.

    python bench/service_load.py                                   # 100k × 1024 × 2, clients 1, 8, 32
    python bench/service_load.py --n 20000 --duration 5 --json /tmp/load.json   # quick
    python bench/service_load.py --store /data/stores/pool --clients 1,4
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from measure import RssSampler, machine_info, proc_status
from selection_scan import build_store, fmt_bytes

API_KEY = "bench-key"
SCORE_TOLERANCE = 1e-3  # float32 in the service vs float32 (float64 sums) here, on unit vectors
WARM_UP_LEVEL = 1_000  # seeds the warm-up requests apart from every level's


# ------------------------------------------------------------------------------ the exact reference


class ExactReference:
    """The store's weighted features, read straight from its Parquet files and manifest, to
    score targets exactly: ``features @ concat_c unit(target_c)`` = Σ_c w_c cos(f_c, t_c)."""

    def __init__(self, store: Path):
        manifest = json.loads((store / "manifest.json").read_text())
        raw = {c["name"]: c["weight"] for c in manifest["checkpoints"]}
        total = sum(raw.values())
        self.checkpoints = list(raw)
        self.dim = manifest["projection"]["dim"]
        self.features = np.concatenate([np.float32(raw[name] / total) * read_features(store, name, self.dim)
                                        for name in self.checkpoints], axis=1)

    def influence(self, vectors: dict[str, np.ndarray]) -> np.ndarray:
        """``(examples, targets)`` float32 influence of every example on every target."""
        queries = np.concatenate([unit_rows(vectors[name]) for name in self.checkpoints], axis=1)
        return self.features @ queries.astype(np.float32).T


def read_features(store: Path, checkpoint: str, dim: int) -> np.ndarray:
    """float32 ``(N, dim)`` features of ``checkpoint`` in row order."""
    table = pq.read_table(store / "features" / checkpoint, columns=["row", "feature"]).sort_by("row")
    column = table.column("feature").combine_chunks()
    return column.flatten().to_numpy().astype(np.float32).reshape(len(table), dim)


def unit_rows(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def top_k_mismatch(rows: list[int], scores: list[float], exact: np.ndarray, k: int) -> str | None:
    """Why ``(rows, scores)`` is not a top ``k`` of ``exact`` (None when it is): ``k`` distinct
    rows with their exact scores, in non-increasing order, none below the exact ``k``-th best
    (ties within the tolerance may come in either order)."""
    expected = min(k, len(exact))
    if len(rows) != expected or len(set(rows)) != len(rows):
        return f"{len(rows)} rows ({len(set(rows))} distinct), expected {expected}"
    if not np.allclose(scores, exact[rows], atol=SCORE_TOLERANCE):
        worst = float(np.max(np.abs(np.asarray(scores) - exact[rows])))
        return f"scores differ from the exact ones by up to {worst:.2e}"
    if np.any(np.diff(scores) > SCORE_TOLERANCE):
        return "scores not in decreasing order"
    kth_best = np.partition(exact, len(exact) - expected)[len(exact) - expected]
    if exact[rows].min() < kth_best - SCORE_TOLERANCE:
        return (f"a better example was left out (exact k-th best {kth_best:.6f}, lowest returned "
                f"{exact[rows].min():.6f})")
    return None


# --------------------------------------------------------------------------------------- the load


@dataclass
class Answer:
    """One completed request: when it ended, its latency, and the answer's ``(rows, scores)`` lists
    (one per target for ``influence``, one for ``select``)."""

    client: int
    request: int
    end: float
    latency: float
    answers: list[tuple[list[int], list[float]]]


@dataclass
class LevelRun:
    answers: list[Answer] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # "status code" or "ExceptionType"
    lock: threading.Lock = field(default_factory=threading.Lock)


def request_targets(seed: int, level: int, client: int, request: int, checkpoints: list[str], num_targets: int,
                    dim: int) -> dict[str, np.ndarray]:
    """The random target vectors of one request, reproducible from its coordinates."""
    rng = np.random.default_rng([seed, level, client, request])
    return {name: rng.standard_normal((num_targets, dim)) for name in checkpoints}


def send(client, endpoint: str, store: str, vectors: dict[str, np.ndarray], args) -> list[tuple[list, list]]:
    from gradstore.client import TargetVectors

    targets = TargetVectors(vectors={name: v.tolist() for name, v in vectors.items()})
    if endpoint == "select":
        page = client.select(store, targets, k=args.k, page_size=args.k)
        return [([item.row for item in page.items], [item.score for item in page.items])]
    response = client.influence(store, targets, k=args.influence_k)
    return [([n.row for n in result.neighbors], [n.score for n in result.neighbors]) for result in response.results]


def client_loop(url: str, endpoint: str, store: str, number: int, level: int, checkpoints: list[str], dim: int,
                start: threading.Barrier, deadline: list[float], run: LevelRun, args) -> None:
    from gradstore.client import APIError, Client

    with Client(url, API_KEY, max_retries=0, timeout=args.request_timeout) as client:
        start.wait()
        request = 0
        while time.perf_counter() < deadline[0]:
            vectors = request_targets(args.seed, level, number, request, checkpoints, args.targets, dim)
            began = time.perf_counter()
            try:
                answers = send(client, endpoint, store, vectors, args)
            except APIError as err:
                with run.lock:
                    run.errors.append(f"{err.status} {err.code}")
            except Exception as err:  # noqa: BLE001 - transport errors and bad responses are errors too
                with run.lock:
                    run.errors.append(type(err).__name__)
            else:
                ended = time.perf_counter()
                with run.lock:
                    run.answers.append(Answer(number, request, ended, ended - began, answers))
            request += 1


def run_level(url: str, pid: int, endpoint: str, store: str, clients: int, level: int, reference: ExactReference,
              args) -> dict:
    """``clients`` threads on ``endpoint`` for ``args.duration`` seconds; the level's figures."""
    run = LevelRun()
    start = threading.Barrier(clients + 1)
    deadline = [float("inf")]
    threads = [threading.Thread(target=client_loop, daemon=True,
                                args=(url, endpoint, store, i, level, reference.checkpoints, reference.dim, start,
                                      deadline, run, args))
               for i in range(clients)]
    for thread in threads:
        thread.start()
    memory_before = proc_status(pid)
    with RssSampler(interval=0.25, pid=pid) as sampler:
        began = time.perf_counter()
        deadline[0] = began + args.duration
        start.wait()
        for thread in threads:
            thread.join()
    memory_after = proc_status(pid)
    latencies = np.array([answer.latency for answer in run.answers])
    elapsed = max((answer.end for answer in run.answers), default=time.perf_counter()) - began
    checked, mismatches = check_sample(run.answers, endpoint, level, reference, args)
    return {
        "endpoint": endpoint, "clients": clients, "requests": len(run.answers), "errors": len(run.errors),
        "error_kinds": sorted(set(run.errors)), "server_errors_5xx": sum(e[:1] == "5" for e in run.errors),
        "elapsed_s": elapsed, "requests_per_s": len(run.answers) / elapsed,
        "latency_p50_s": float(np.percentile(latencies, 50)) if len(latencies) else None,
        "latency_p99_s": float(np.percentile(latencies, 99)) if len(latencies) else None,
        "latency_max_s": float(latencies.max()) if len(latencies) else None,
        "rss_before_bytes": memory_before["VmRSS"], "rss_after_bytes": memory_after["VmRSS"],
        "rss_peak_sampled_bytes": sampler.peak, "vmhwm_after_bytes": memory_after["VmHWM"],
        "anon_before_bytes": memory_before["RssAnon"], "anon_after_bytes": memory_after["RssAnon"],
        "anon_peak_sampled_bytes": sampler.peak_anon, "file_after_bytes": memory_after["RssFile"],
        "checked": checked, "mismatches": mismatches,
    }


def check_sample(answers: list[Answer], endpoint: str, level: int, reference: ExactReference,
                 args) -> tuple[int, list[str]]:
    """Check ``args.check`` evenly spaced answers against the exact scores; (checked, mismatches)."""
    if not answers or args.check <= 0:
        return 0, []
    picks = sorted({int(i) for i in np.linspace(0, len(answers) - 1, min(args.check, len(answers)))})
    mismatches = []
    for answer in (answers[i] for i in picks):
        vectors = request_targets(args.seed, level, answer.client, answer.request, reference.checkpoints,
                                  args.targets, reference.dim)
        exact = reference.influence(vectors)
        if endpoint == "select":  # LESS with one subtask: the mean over the targets
            columns, k = [exact.mean(axis=1)], args.k
        else:
            columns, k = [exact[:, t] for t in range(exact.shape[1])], args.influence_k
        if len(answer.answers) != len(columns):
            mismatches.append(f"client {answer.client} request {answer.request}: {len(answer.answers)} results "
                              f"for {len(columns)} targets")
            continue
        for target, ((rows, scores), column) in enumerate(zip(answer.answers, columns)):
            why = top_k_mismatch(rows, scores, column, k)
            if why:
                mismatches.append(f"client {answer.client} request {answer.request} target {target}: {why}")
    return len(picks), mismatches


def warm_up(url: str, store: str, reference: ExactReference, args) -> dict:
    """One request per endpoint (the server opens the store and its index on the first)."""
    from gradstore.client import Client

    timings = {}
    with Client(url, API_KEY, max_retries=0, timeout=args.request_timeout) as client:
        for endpoint in ("select", "influence"):
            vectors = request_targets(args.seed, WARM_UP_LEVEL, 0, 0, reference.checkpoints, args.targets,
                                      reference.dim)
            began = time.perf_counter()
            send(client, endpoint, store, vectors, args)
            timings[f"first_{endpoint}_s"] = time.perf_counter() - began
    return timings


# ------------------------------------------------------------------------------------------- main


def print_report(levels: list[dict]) -> None:
    header = (f"{'endpoint':<9} {'clients':>7} {'requests':>8} {'req/s':>7} {'p50 s':>7} {'p99 s':>7} "
              f"{'errors':>6} {'checked':>7} {'wrong':>5} {'RSS before':>10} {'RSS after':>10} {'RSS peak':>9} "
              f"{'anon after':>10} {'anon peak':>9}")
    print("\n" + header + "\n" + "-" * len(header))
    for r in levels:
        p50 = f"{r['latency_p50_s']:.3f}" if r["latency_p50_s"] is not None else "-"
        p99 = f"{r['latency_p99_s']:.3f}" if r["latency_p99_s"] is not None else "-"
        print(f"{r['endpoint']:<9} {r['clients']:>7} {r['requests']:>8} {r['requests_per_s']:>7.2f} {p50:>7} "
              f"{p99:>7} {r['errors']:>6} {r['checked']:>7} {len(r['mismatches']):>5} "
              f"{fmt_bytes(r['rss_before_bytes']):>10} {fmt_bytes(r['rss_after_bytes']):>10} "
              f"{fmt_bytes(r['rss_peak_sampled_bytes']):>9} {fmt_bytes(r['anon_after_bytes']):>10} "
              f"{fmt_bytes(r['anon_peak_sampled_bytes']):>9}")
        for line in r["mismatches"][:3]:
            print(f"    wrong: {line}")
        if r["error_kinds"]:
            print(f"    errors: {', '.join(r['error_kinds'])}")


def parse_env(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise SystemExit(f"--server-env {pair!r}: expected NAME=VALUE")
        env[name] = value
    return env


def parse_clients(text: str) -> list[int]:
    try:
        levels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise SystemExit(f"--clients {text!r}: expected comma-separated positive integers") from None
    if not levels or min(levels) < 1:
        raise SystemExit(f"--clients {text!r}: expected comma-separated positive integers")
    return levels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", type=Path, default=None,
                        help="an existing datastore to serve (its parent folder is the service root); "
                             "default: write a synthetic one")
    parser.add_argument("--n", type=int, default=100_000, help="examples of the synthetic store")
    parser.add_argument("--dim", type=int, default=1024, help="feature dimension k of the synthetic store")
    parser.add_argument("--checkpoints", type=int, default=2, help="checkpoints of the synthetic store")
    parser.add_argument("--shard-size", type=int, default=1024, help="rows per shard of the synthetic store")
    parser.add_argument("--index", default="flat", help="FAISS index kind of the synthetic store")
    parser.add_argument("--clients", default="1,8,32", help="concurrency levels, comma-separated")
    parser.add_argument("--endpoints", default="influence,select", help="endpoints to load, comma-separated")
    parser.add_argument("--duration", type=float, default=20.0,
                        help="seconds each level sends new requests (started ones are awaited)")
    parser.add_argument("--targets", type=int, default=8, help="target examples per request")
    parser.add_argument("--k", type=int, default=100, help="examples selected per select request")
    parser.add_argument("--influence-k", type=int, default=10, help="neighbours per target of influence")
    parser.add_argument("--check", type=int, default=20, help="answers checked against numpy per endpoint and level")
    parser.add_argument("--request-timeout", type=float, default=900.0, help="client timeout per request, s")
    parser.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                        help="environment of the server process (e.g. OPENBLAS_NUM_THREADS=1); repeatable")
    parser.add_argument("--tmp", default=None, help="folder for the synthetic store (default: system temp)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    clients = parse_clients(args.clients)
    endpoints = [e.strip() for e in args.endpoints.split(",") if e.strip()]
    unknown = [e for e in endpoints if e not in ("select", "influence")]
    if unknown or not endpoints:
        parser.error(f"--endpoints {args.endpoints!r}: expected select and/or influence")
    server_env = parse_env(args.server_env)
    if args.store is not None and not (args.store / "manifest.json").is_file():
        parser.error(f"--store {args.store}: no manifest.json there, not a datastore")

    info = machine_info()
    print(f"{info['cpu']}, {info['cores']} cores, {fmt_bytes(info['memory_bytes'])}; python {info['python']}, "
          f"numpy {info['numpy']}, faiss {info['faiss']}, pyarrow {info['pyarrow']}; "
          f"load average {info['loadavg_start']}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="gradstore-load-", dir=args.tmp))
    results: dict = {"benchmark": "service_load", "args": {**vars(args), "store": str(args.store),
                                                           "json": str(args.json)}, "machine": info}
    try:
        if args.store is None:
            store = work / "root" / "pool"
            store.parent.mkdir()
            print(f"writing a synthetic store: {args.n:,} examples × k={args.dim} × {args.checkpoints} checkpoints, "
                  f"{args.index} index ...", flush=True)
            checkpoints = [f"epoch-{i + 1}" for i in range(args.checkpoints)]
            results["build"] = build_store(store, args.n, args.dim, checkpoints, args.shard_size, args.seed,
                                           index_kind=args.index)
            print(f"  {results['build']['write_s'] + results['build']['finalize_s']:.1f} s, "
                  f"{fmt_bytes(results['build']['store_bytes'])}", flush=True)
        else:
            store = args.store.resolve()
        reference = ExactReference(store)
        print(f"exact reference loaded: {reference.features.shape[0]:,} × {reference.features.shape[1]} float32",
              flush=True)
        from gradstore.service.process import ServiceProcess

        with ServiceProcess(store.parent, api_key=API_KEY, log_file=work / "serve.log", env=server_env,
                            startup_timeout=120) as service:
            pid = service.process.pid
            results["server_memory_started"] = proc_status(pid)
            results["warm_up"] = warm_up(service.url, store.name, reference, args)
            results["server_memory_warm"] = proc_status(pid)
            print(f"server pid {pid} on {service.url}; first select {results['warm_up']['first_select_s']:.2f} s, "
                  f"first influence {results['warm_up']['first_influence_s']:.2f} s; RSS after warm-up "
                  f"{fmt_bytes(results['server_memory_warm']['VmRSS'])} (anon "
                  f"{fmt_bytes(results['server_memory_warm']['RssAnon'])})", flush=True)
            levels = []
            for endpoint in endpoints:
                for level, count in enumerate(clients):
                    print(f"{endpoint}: {count} clients for {args.duration:.0f} s ...", flush=True)
                    result = run_level(service.url, pid, endpoint, store.name, count, level, reference, args)
                    levels.append(result)
                    print(f"  {result['requests']} requests, {result['requests_per_s']:.2f}/s, "
                          f"{result['errors']} errors, {len(result['mismatches'])} wrong of {result['checked']} "
                          f"checked; load average {os.getloadavg()[0]:.2f}", flush=True)
            results["server_memory_end"] = proc_status(pid)
        results["levels"] = levels
    finally:
        shutil.rmtree(work, ignore_errors=True)
    info["loadavg_end"] = os.getloadavg()
    print_report(levels)
    warm, end = results["server_memory_warm"], results["server_memory_end"]
    print(f"\nserver VmRSS after warm-up {fmt_bytes(warm['VmRSS'])} (anon {fmt_bytes(warm['RssAnon'])}, file "
          f"{fmt_bytes(warm['RssFile'])}), at the end {fmt_bytes(end['VmRSS'])} (anon {fmt_bytes(end['RssAnon'])}, "
          f"file {fmt_bytes(end['RssFile'])}); VmHWM {fmt_bytes(end['VmHWM'])}; "
          f"load average at the end {info['loadavg_end']}")
    errors = sum(r["errors"] for r in levels)
    wrong = sum(len(r["mismatches"]) for r in levels)
    print(f"Target: 0 errors: {'MET' if errors == 0 else 'NOT MET'} ({errors}); "
          f"checked answers exact: {'MET' if wrong == 0 else 'NOT MET'} "
          f"({sum(r['checked'] for r in levels) - wrong} of {sum(r['checked'] for r in levels)})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"results written to {args.json}")
    return 0 if errors == 0 and wrong == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
