"""Quantised features vs float16: agreement of LESS selections, bytes per example, scan speed.

Store: the one ``make demo`` builds, with real gradients (``gradstore/demo.py``'s pieces): the
generated multi-task corpus (``--examples``, 8 task families + 20 % noise), the tiny Llama-style
model pretrained on it (``--pretrain-steps``; reused from ``--out`` when built with the same
recipe), a LoRA warmup on 10 % (two checkpoints), ``adam`` features at k = 2048.

For each task family as the target (8 generated target examples, one subtask), the LESS scores
of every pool example, ``Σ_c w_c · cos(f_c(x), g_c(t))`` averaged over the targets:

* ``fp16``: :meth:`SelectionEngine.scores`, the engine's own scan of the stored features;
* ``int8``, ``1bit``: the same sum with each checkpoint's features encoded by
  :func:`gradstore.datastore.quantized.encode` and scanned by its kernel, queries float32;
* ``1bit, s = 1/√k``: 1-bit codes with a constant scale (every decoded row unit-norm) instead of
  the least-squares ``mean |x|``, to show what the per-row scale is worth.

Measures against ``fp16``: Spearman correlation over the pool; overlap ``|A ∩ B| / |A|`` of the
top 1 %, 5 %, 10 % (ranked as the engine ranks: score descending, then row); precision of each
top 5 % (share from the target's family; base rate 10 %). Also the cosine of each feature row
with its decoded row, and bytes per example. Scan throughput: each kernel on one in-memory block
of ``--scan-rows`` random unit rows at the same k, ``--scan-targets`` queries, one thread (as
each of the engine's scan workers runs), best of 5.

    python bench/quantized_agreement.py --out /tmp/quantized-agreement

prints a markdown report and writes ``results.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
from measure import machine_info

SHARES = (0.01, 0.05, 0.10)
PRECISION_SHARE = 0.05


def log(message: str) -> None:
    print(f"[quantized] {message}", flush=True)


def build_store(out: Path, examples: int, pretrain_steps: int) -> Path:
    """The demo's store (see the module docstring) at ``out/store``."""
    from gradstore.indexer.corpus import CorpusSource
    from gradstore.indexer.demo_corpus import generate_corpus, write_jsonl
    from gradstore.indexer.warmup import WarmupConfig, run_warmup

    from gradstore.demo import build_base_model, index_corpus

    corpus = generate_corpus(examples, seed=0)
    corpus_file = write_jsonl(corpus, out / "corpus.jsonl")
    model_dir = build_base_model(out, corpus, pretrain_steps)
    run_dir = run_warmup(WarmupConfig(
        corpus=[CorpusSource.parse(str(corpus_file))], model=model_dir, out=out / "warmup", fraction=0.1,
        epochs=2, learning_rate=2e-3, lora_r=8, lora_alpha=16, batch_size=8, max_length=128,
        device="cpu", overwrite=True), log=log).out
    return index_corpus(corpus_file, model_dir, run_dir, out / "store")


# ---------------------------------------------------------------------------------- scoring


def quantized_scores(codes: dict, targets, names: list[str], weights: np.ndarray) -> np.ndarray:
    """LESS scores (one subtask: the mean over targets) from each checkpoint's quantised copy."""
    from gradstore.selection.quantized_scan import QuantizedScanKernel

    first = codes[names[0]]
    total = np.zeros((targets.num_targets, len(first)), dtype=np.float32)
    kernel = QuantizedScanKernel(first.kind, first.dim)
    for name, weight in zip(names, weights):
        query = np.ascontiguousarray(np.float32(weight) * targets.vectors[name])
        kernel.add_products(codes[name], query, total)
    return total.mean(axis=0)


def check_reference(reference: np.ndarray, features: dict, targets, names: list[str], weights: np.ndarray) -> None:
    """The engine's fp16 scores must be the sum :func:`quantized_scores` computes (float64 here)."""
    exact = sum(w * features[name].astype(np.float64) @ targets.vectors[name].T.astype(np.float64)
                for name, w in zip(names, weights))
    gap = np.abs(exact.mean(axis=1) - reference).max()
    if gap > 1e-4:
        raise SystemExit(f"the engine's LESS scores differ from the checkpoint-weighted mean cosine by {gap:.2g}")


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1 of ``values`` ascending, tied values sharing their mean rank (as Spearman wants)."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return ((ends - counts + ends - 1) / 2)[inverse]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(average_ranks(a), average_ranks(b))[0, 1])


def agreement(reference: np.ndarray, approx: np.ndarray, in_family: np.ndarray) -> dict:
    from gradstore.selection.engine import rank

    pool = np.arange(len(reference))
    ranked_ref, ranked = rank(pool, reference), rank(pool, approx)
    result = {"spearman": spearman(reference, approx)}
    for share in SHARES:
        budget = math.ceil(share * len(pool))
        result[f"overlap_{share:.0%}"] = len(np.intersect1d(ranked_ref[:budget], ranked[:budget])) / budget
    budget = math.ceil(PRECISION_SHARE * len(pool))
    result["precision"] = float(in_family[ranked[:budget]].mean())
    return result


def row_cosines(features: np.ndarray, quantized) -> np.ndarray:
    from gradstore.datastore.quantized import decode

    exact, approx = features.astype(np.float64), decode(quantized).astype(np.float64)
    norms = np.linalg.norm(exact, axis=1) * np.linalg.norm(approx, axis=1)
    return (exact * approx).sum(axis=1)[norms > 0] / norms[norms > 0]


# ------------------------------------------------------------------------------- throughput


def best_seconds(run, repeats: int = 5) -> float:
    run()  # untimed: first-touch of the output and buffers
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def scan_throughput(rows: int, dim: int, targets: int) -> dict:
    """Rows per second and input bytes per second of each kernel on one in-memory block."""
    from gradstore.selection.quantized_scan import QuantizedScanKernel, encode
    from gradstore.selection.scan import BACKENDS, ScanKernel, single_threaded_worker

    single_threaded_worker()
    rng = np.random.default_rng(0)
    features = np.empty((rows, dim), dtype=np.float16)
    for start in range(0, rows, 8192):  # in pieces: a float64 copy of the whole block is large
        block = rng.standard_normal((min(8192, rows - start), dim))
        features[start:start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    query = rng.standard_normal((targets, dim)).astype(np.float32)
    out = np.zeros((targets, rows), dtype=np.float32)
    results = {}
    for backend in BACKENDS:
        kernel = ScanKernel(dim, backend)
        seconds = best_seconds(lambda: kernel.add_products(features, query, out))
        results[f"fp16 ({backend} kernel)"] = {"seconds": seconds, "bytes": features.nbytes}
    for kind in ("int8", "1bit"):
        quantized, kernel = encode(features, kind), QuantizedScanKernel(kind, dim)
        seconds = best_seconds(lambda: kernel.add_products(quantized, query, out))
        results[kind] = {"seconds": seconds, "bytes": quantized.nbytes}
    for item in results.values():
        item |= {"rows_per_s": rows / item["seconds"], "gb_per_s": item["bytes"] / item["seconds"] / 1e9}
    return results


# ----------------------------------------------------------------------------------- report


def markdown(results: dict) -> str:
    arms = results["arms"]
    lines = ["| target family | features | Spearman | top 1 % overlap | top 5 % overlap | top 10 % overlap | "
             "precision of top 5 % |", "|---|---|---:|---:|---:|---:|---:|"]
    for family, by_arm in results["families"].items():
        for arm in arms:
            m = by_arm[arm]
            lines.append(f"| {family} | {arm} | {m['spearman']:.4f} | {m['overlap_1%']:.1%} | {m['overlap_5%']:.1%} | "
                         f"{m['overlap_10%']:.1%} | {m['precision']:.1%} |")
    lines += ["", "| features | mean Spearman | min Spearman | mean top 1 % | mean top 5 % | mean top 10 % | "
              "mean precision | row cosine with fp16 (mean, min) | bytes per example |",
              "|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    for arm in arms:
        rows = [by_arm[arm] for by_arm in results["families"].values()]
        mean = {key: float(np.mean([r[key] for r in rows])) for key in rows[0]}
        cosine = results["row_cosine"].get(arm)
        cosine_text = f"{cosine['mean']:.5f}, {cosine['min']:.5f}" if cosine else "-"
        lines.append(f"| {arm} | {mean['spearman']:.4f} | {min(r['spearman'] for r in rows):.4f} | "
                     f"{mean['overlap_1%']:.1%} | {mean['overlap_5%']:.1%} | {mean['overlap_10%']:.1%} | "
                     f"{mean['precision']:.1%} | {cosine_text} | {results['bytes_per_example'][arm]:,} |")
    scan = results["scan"]
    lines += ["", f"Scan of {scan['rows']:,} in-memory rows, k = {scan['dim']}, {scan['targets']} targets, one thread:",
              "", "| kernel | seconds | rows/s | input GB/s |", "|---|---:|---:|---:|"]
    for name, item in scan["kernels"].items():
        lines.append(f"| {name} | {item['seconds']:.4f} | {item['rows_per_s']:,.0f} | {item['gb_per_s']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("quantized-agreement"))
    parser.add_argument("--examples", type=int, default=3000, help="corpus size")
    parser.add_argument("--pretrain-steps", type=int, default=1500)
    parser.add_argument("--targets", type=int, default=8, help="target examples per family")
    parser.add_argument("--reuse-store", action="store_true", help="use out/store when it exists")
    parser.add_argument("--scan-rows", type=int, default=65536)
    parser.add_argument("--scan-targets", type=int, default=8)
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see gradstore/demo.py

    from gradstore.indexer.datastore import Datastore
    from gradstore.indexer.demo_corpus import FAMILIES, generate_targets

    from gradstore.datastore.quantized import QuantizedFeatures, bytes_per_row, encode
    from gradstore.evaluate import pool_records
    from gradstore.selection import SelectionEngine, TargetFeaturizer

    started = time.perf_counter()
    results = {"machine": machine_info(), "command": " ".join([sys.executable, *sys.argv]), "settings": {
        k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    args.out.mkdir(parents=True, exist_ok=True)
    store_dir = args.out / "store"
    if not (args.reuse_store and (store_dir / "manifest.json").is_file()):
        build_store(args.out, args.examples, args.pretrain_steps)
    results["store_seconds"] = time.perf_counter() - started
    log(f"store ready ({results['store_seconds']:.0f} s)")

    store = Datastore.open(store_dir)
    engine = SelectionEngine(store)
    names, weights = engine.resolve_checkpoints()
    features = {name: store.features(name) for name in names}
    codes = {kind: {name: encode(f, kind) for name, f in features.items()} for kind in ("int8", "1bit")}
    unit_scale = np.float32(1 / math.sqrt(store.dim))
    codes["1bit, s = 1/√k"] = {name: QuantizedFeatures(q.kind, q.dim, q.codes, np.full(len(q), unit_scale))
                               for name, q in codes["1bit"].items()}
    arms = ["fp16", *codes]
    results["arms"] = arms
    results["row_cosine"] = {}
    for kind in ("int8", "1bit"):
        cosines = np.concatenate([row_cosines(features[name], codes[kind][name]) for name in names])
        results["row_cosine"][kind] = {"mean": float(cosines.mean()), "min": float(cosines.min())}
    fp16_bytes = 2 * store.dim * len(names)
    results["bytes_per_example"] = {"fp16": fp16_bytes, **{
        arm: len(names) * bytes_per_row(codes[arm][names[0]].kind, store.dim) for arm in codes}}

    families = np.array([record["dataset"] for record in pool_records(store)])
    featurizer = TargetFeaturizer(store, device="cpu")
    results["families"] = {}
    for family in FAMILIES:
        targets = featurizer.featurize(generate_targets(family, args.targets, seed=1))
        reference = engine.scores(targets).aggregate("less")
        check_reference(reference, features, targets, names, weights)
        in_family = families == family
        by_arm = {"fp16": agreement(reference, reference, in_family)}
        for arm, copies in codes.items():
            by_arm[arm] = agreement(reference, quantized_scores(copies, targets, names, weights), in_family)
        results["families"][family] = by_arm
        log(f"{family}: " + ", ".join(f"{arm} Spearman {m['spearman']:.4f}" for arm, m in by_arm.items()))

    results["scan"] = {"rows": args.scan_rows, "dim": store.dim, "targets": args.scan_targets,
                       "kernels": scan_throughput(args.scan_rows, store.dim, args.scan_targets)}
    results["pool"] = store.num_examples
    results["checkpoints"] = names
    results["seconds"] = time.perf_counter() - started
    results["machine"]["loadavg_end"] = os.getloadavg()
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(markdown(results))
    print(f"\npool {store.num_examples} examples, checkpoints {names} (weights {np.round(weights, 4).tolist()}), "
          f"k = {store.dim}; finished in {results['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
