"""Scaling: indexing and selection cost against corpus size, and their peak memory.

Two parts, each size measured by a fresh child process (so every peak is its own):

* **Indexing** — the real :class:`~gradstore.indexer.job.IndexJob` (``IndexJob.run()``: model
  load, per-example gradients, projection, Parquet shards, FAISS index, manifest) on the first
  ``n`` records of one corpus from the demo generator
  (:func:`gradstore.indexer.demo_corpus.generate_corpus`), for ``--index-n`` sizes. The model is a
  tiny Llama built here with :mod:`gradstore.indexer.tiny` (random weights; the tokenizer trained
  on the corpus), a fresh LoRA, gradient type ``sgd``, the default ``sjlt`` projection at
  k = ``--index-dim``, one checkpoint, the ``--index-kind`` FAISS index (``auto``: Flat at these
  sizes), CPU, ``--index-threads`` torch threads (1 by default: on a shared machine two threads
  wait on each other's barriers and the timings scatter).
* **Selection** — ``SelectionEngine.select(targets, fraction=0.05)`` over synthetic stores of
  ``--select-n`` examples written by the real writer (``selection_scan.build_store``: random unit
  fp16 features, k = ``--select-dim``, 2 checkpoints, no index), 8 random targets; one untimed
  call, then the best of ``--repeats`` timed calls.

Reported per size: wall time and CPU time (``time.process_time``, every thread of the child),
each per example, and the child's peak resident set (``VmHWM``) with its resident set before the
measured work. Linear cost is judged on CPU time — on a machine shared with other jobs the wall
time mostly measures their load — by the marginal cost per example between consecutive sizes
(fixed costs such as loading the model cancel out) and a least-squares line ``cpu = a + b·n``;
flat memory on the peak at the largest size against the smallest.

    python bench/scaling.py                                      # indexing 4k/8k/16k, selection 100k/200k/400k
    python bench/scaling.py --index-n 200,400,800 --select-n 10000,20000,40000 --json /tmp/scaling.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from measure import machine_info, proc_status
from selection_scan import build_store, fmt_bytes, run_child

GIB = 1 << 30
# "Linear" and "flat" on a shared 2-core machine: marginal costs per example within ±30 % of each
# other (proportional), or at least no later one above the first by more than that (not
# super-linear); the peak at the largest size at most 25 % (or 64 MiB) above the smallest's.
LINEAR_TOLERANCE = 0.30
FLAT_RATIO = 1.25
FLAT_SLACK_BYTES = 64 << 20


# ------------------------------------------------------------------------------------ children


def index_worker(config: dict) -> dict:
    """Run one indexing job in this (fresh) process; its time and memory."""
    import torch

    from gradstore.indexer.corpus import CorpusSource
    from gradstore.indexer.job import IndexJob, IndexJobConfig
    from gradstore.indexer.projection import ProjectionSpec

    torch.set_num_threads(config["threads"])
    rss_before = proc_status()["VmRSS"]
    job = IndexJob(IndexJobConfig(corpus=[CorpusSource.parse(config["corpus"])], model=Path(config["model"]),
                                  out=Path(config["out"]), gradient_type="sgd",
                                  projection=ProjectionSpec(dim=config["dim"], seed=0),
                                  max_length=config["max_length"], device="cpu", index=config["index"],
                                  progress=False),
                   log=lambda *_: None)
    start, cpu_start = time.perf_counter(), time.process_time()
    summary = job.run()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return {"n": summary.examples, "wall_s": wall, "cpu_s": cpu, "job_wall_s": summary.wall_seconds,
            "tokens": summary.tokens,
            "store_bytes": summary.store_bytes, "rss_before_bytes": rss_before, "vmhwm_bytes": proc_status()["VmHWM"],
            "torch_threads": torch.get_num_threads()}


def select_worker(store_path: Path, repeats: int, seed: int) -> dict:
    """Select the top 5 % of one store in this (fresh) process; best time and memory."""
    from gradstore.datastore import Datastore
    from gradstore.selection import SelectionEngine, SelectionOptions, TargetSet

    store = Datastore.open(store_path)
    engine = SelectionEngine(store)
    rng = np.random.default_rng(seed)
    targets = TargetSet.from_vectors({name: rng.standard_normal((8, store.dim)) for name in store.checkpoint_names})
    options = SelectionOptions(fraction=0.05)
    rss_before = proc_status()["VmRSS"]
    start = time.perf_counter()
    engine.select(targets, options)
    first = time.perf_counter() - start
    times, cpu_times = [], []
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        selection = engine.select(targets, options)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    return {"n": store.num_examples, "selected": len(selection), "first_s": first, "times_s": times,
            "cpu_times_s": cpu_times, "wall_s": min(times), "cpu_s": min(cpu_times),
            "rss_before_bytes": rss_before, "vmhwm_bytes": proc_status()["VmHWM"]}


# ------------------------------------------------------------------------------------- parents


def build_tiny_model(root: Path, corpus: list[dict]) -> Path:
    """A tiny Llama (random weights) with a tokenizer trained on the corpus as the demo renders it."""
    from gradstore.demo import pretraining_texts
    from gradstore.indexer.tiny import build_model, build_tokenizer

    tokenizer = build_tokenizer(pretraining_texts(corpus[:2000]), vocab_size=512)
    return build_model("llama", tokenizer, root / "model", hidden=64, layers=2, heads=4, max_positions=256)


def measure_indexing(sizes: list[int], root: Path, args) -> list[dict]:
    from gradstore.indexer.demo_corpus import generate_corpus, write_jsonl

    corpus = generate_corpus(sizes[-1], seed=args.seed)
    model = build_tiny_model(root, corpus)
    results = []
    for n in sizes:
        corpus_file = write_jsonl(corpus[:n], root / f"corpus-{n}.jsonl")
        config = {"corpus": str(corpus_file), "model": str(model), "out": str(root / f"store-{n}"),
                  "dim": args.index_dim, "max_length": 128, "threads": args.index_threads, "index": args.index_kind}
        print(f"indexing {n:,} examples in a fresh process ...", flush=True)
        result = run_child([sys.executable, __file__, "--index-worker", json.dumps(config)])
        results.append(result)
        print(f"  {result['wall_s']:.1f} s wall, {result['cpu_s']:.1f} s CPU, "
              f"{1e3 * result['cpu_s'] / n:.2f} ms CPU/example, "
              f"peak RSS {fmt_bytes(result['vmhwm_bytes'])}; load average {os.getloadavg()[0]:.2f}", flush=True)
        shutil.rmtree(root / f"store-{n}")
    return results


def measure_selection(sizes: list[int], root: Path, args) -> list[dict]:
    results = []
    for n in sizes:
        store = root / f"select-{n}"
        print(f"selection: writing a {n:,}-example store ...", flush=True)
        built = build_store(store, n, args.select_dim, ["epoch-1", "epoch-2"], 1024, args.seed)
        print(f"  written in {built['write_s'] + built['finalize_s']:.1f} s ({fmt_bytes(built['store_bytes'])}); "
              f"selecting in a fresh process ...", flush=True)
        result = {**run_child([sys.executable, __file__, "--select-worker", str(store),
                               "--repeats", str(args.repeats), "--seed", str(args.seed)]), "build": built}
        results.append(result)
        print(f"  {result['wall_s']:.2f} s wall, {result['cpu_s']:.2f} s CPU, "
              f"{1e6 * result['cpu_s'] / n:.2f} µs CPU/example, "
              f"peak RSS {fmt_bytes(result['vmhwm_bytes'])}; load average {os.getloadavg()[0]:.2f}", flush=True)
        shutil.rmtree(store)
    return results


def linearity(results: list[dict], measure: str = "cpu_s") -> dict:
    """Marginal cost per example between consecutive sizes, a least-squares line and its fit, of
    the CPU time (``cpu_s``; wall time on a shared machine mostly measures the other jobs)."""
    n = np.array([r["n"] for r in results], dtype=np.float64)
    t = np.array([r[measure] for r in results], dtype=np.float64)
    marginal = (np.diff(t) / np.diff(n)).tolist()
    slope, intercept = np.polyfit(n, t, 1)
    residual = t - (intercept + slope * n)
    r_squared = 1 - float(residual @ residual) / float(((t - t.mean()) ** 2).sum()) if len(n) > 2 else 1.0
    spread = max(marginal) / min(marginal) - 1 if min(marginal) > 0 else float("inf")
    return {"marginal_s_per_example": marginal, "slope_s_per_example": float(slope), "intercept_s": float(intercept),
            "r_squared": r_squared, "marginal_spread": spread,
            "linear": bool(min(marginal) > 0 and max(marginal) <= (1 + LINEAR_TOLERANCE) * min(marginal)),
            "not_superlinear": bool(max(marginal) <= (1 + LINEAR_TOLERANCE) * marginal[0])}


def flatness(results: list[dict]) -> dict:
    first, last = results[0]["vmhwm_bytes"], results[-1]["vmhwm_bytes"]
    return {"peak_ratio": last / first, "peak_growth_bytes": last - first,
            "flat": bool(last <= max(FLAT_RATIO * first, first + FLAT_SLACK_BYTES))}


def print_part(title: str, results: list[dict], unit: str, scale: float) -> dict:
    fit, memory = linearity(results), flatness(results)
    print(f"\n{title}")
    header = (f"{'N':>9} {'wall s':>8} {'wall ' + unit:>17} {'CPU s':>8} {'CPU ' + unit:>16} {'RSS before':>10} "
              f"{'peak RSS':>9}")
    print(header + "\n" + "-" * len(header))
    for r in results:
        print(f"{r['n']:>9,} {r['wall_s']:>8.2f} {scale * r['wall_s'] / r['n']:>17.2f} {r['cpu_s']:>8.2f} "
              f"{scale * r['cpu_s'] / r['n']:>16.2f} {fmt_bytes(r['rss_before_bytes']):>10} "
              f"{fmt_bytes(r['vmhwm_bytes']):>9}")
    marginal = ", ".join(f"{scale * m:.2f}" for m in fit["marginal_s_per_example"])
    print(f"CPU time: marginal cost {marginal} {unit} between consecutive sizes (spread "
          f"{fit['marginal_spread']:.0%}); fit = {fit['intercept_s']:.2f} s + {scale * fit['slope_s_per_example']:.2f} "
          f"{unit} × N, R² = {fit['r_squared']:.4f}")
    print(f"Target: cost grows linearly (marginal costs within ±{LINEAR_TOLERANCE:.0%}): "
          f"{'MET' if fit['linear'] else 'NOT MET'}; no super-linear growth (no marginal cost above the first's "
          f"+{LINEAR_TOLERANCE:.0%}): {'MET' if fit['not_superlinear'] else 'NOT MET'}; "
          f"peak memory flat (largest ≤ {FLAT_RATIO:.2f}× smallest or "
          f"+{FLAT_SLACK_BYTES >> 20} MiB): {'MET' if memory['flat'] else 'NOT MET'} "
          f"({memory['peak_ratio']:.2f}×, {memory['peak_growth_bytes'] / 2**20:+.0f} MiB)")
    return {"linearity": fit, "memory": memory}


def parse_sizes(text: str, flag: str) -> list[int]:
    try:
        sizes = sorted(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise SystemExit(f"{flag} {text!r}: expected comma-separated positive integers") from None
    if len(sizes) < 2 or sizes[0] < 1 or len(set(sizes)) != len(sizes):
        raise SystemExit(f"{flag} {text!r}: expected at least two distinct positive sizes")
    return sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--index-n", default="4000,8000,16000", help="indexing corpus sizes, comma-separated")
    parser.add_argument("--index-dim", type=int, default=1024, help="projection dimension k of the indexing jobs")
    parser.add_argument("--index-kind", default="auto",
                        help="FAISS index of the indexing jobs (auto: Flat at these sizes, built in memory)")
    parser.add_argument("--index-threads", type=int, default=1,
                        help="torch threads of the indexing jobs (1: steadiest on a shared machine)")
    parser.add_argument("--select-n", default="100000,200000,400000", help="selection store sizes, comma-separated")
    parser.add_argument("--select-dim", type=int, default=1024, help="feature dimension k of the selection stores")
    parser.add_argument("--repeats", type=int, default=3, help="timed selections per store (after one untimed)")
    parser.add_argument("--skip", choices=["indexing", "selection"], default=None, help="leave one part out")
    parser.add_argument("--tmp", default=None, help="folder for the temporary stores (default: system temp)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--index-worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--select-worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.index_worker is not None:
        print("RESULT " + json.dumps(index_worker(json.loads(args.index_worker))))
        return 0
    if args.select_worker is not None:
        print("RESULT " + json.dumps(select_worker(args.select_worker, args.repeats, args.seed)))
        return 0
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    index_sizes = parse_sizes(args.index_n, "--index-n")
    select_sizes = parse_sizes(args.select_n, "--select-n")
    tmp_root = Path(args.tmp or tempfile.gettempdir())
    largest = select_sizes[-1] * args.select_dim * 2 * 2 * 1.05
    if args.skip != "selection" and largest > shutil.disk_usage(tmp_root).free - 2 * GIB:
        parser.error(f"the largest selection store (~{fmt_bytes(largest)}) does not fit in {tmp_root}")

    info = machine_info()
    print(f"{info['cpu']}, {info['cores']} cores, {fmt_bytes(info['memory_bytes'])}; python {info['python']}, "
          f"torch {info['torch']}, numpy {info['numpy']}, faiss {info['faiss']}, pyarrow {info['pyarrow']}; "
          f"load average {info['loadavg_start']}", flush=True)
    results: dict = {"benchmark": "scaling", "args": {**vars(args), "json": str(args.json)}, "machine": info}
    root = Path(tempfile.mkdtemp(prefix="gradstore-scaling-", dir=tmp_root))
    started = time.perf_counter()
    try:
        if args.skip != "indexing":
            results["indexing"] = measure_indexing(index_sizes, root, args)
        if args.skip != "selection":
            results["selection"] = measure_selection(select_sizes, root, args)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    info["loadavg_end"] = os.getloadavg()
    info["wall_s"] = time.perf_counter() - started
    verdicts = {}
    if "indexing" in results:
        verdicts["indexing"] = print_part("Indexing (IndexJob.run, tiny Llama, sgd, one checkpoint)",
                                          results["indexing"], "ms/example", 1e3)
    if "selection" in results:
        verdicts["selection"] = print_part("Selection (SelectionEngine.select, fraction 0.05, 8 targets)",
                                           results["selection"], "µs/example", 1e6)
    results["verdicts"] = verdicts
    print(f"\n{info['wall_s']:.0f} s in all; load average at the end {info['loadavg_end']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
