"""GPU extras: the projection's throughput on a device, and FAISS index builds on faiss-cpu vs faiss-gpu.

Two measurements that issue 5's GPU benchmark asks for besides indexing throughput
(``bench/indexing_throughput.py --device cuda``), in one command:

* ``projection`` — gradstore's projector (:func:`gradstore.indexer.projection.make_projector`, the
  ``sjlt`` and ``rademacher`` kinds, k = 8192) on ``--device``, fed per-example gradient vectors
  of D elements (``--numel``, 1M to 100M by default) for batches of 8 to 64 examples. The D
  elements are laid out as a model's LoRA matrices (pairs of 8 × 4096 and 4096 × 8, the last one
  cut short) and grouped exactly as the indexing job groups them
  (``PerExampleGradients.group_params``: consecutive matrices up to ``GROUP_ELEMENTS`` per group,
  one contiguous fp32 tensor each); the timed call is the job's projection loop
  (``Featurizer._features``: ``project_many`` per group, summed into one (B, k) result) on
  random normal values. The first call of a projector builds and caches its matrices (cache of
  2 GiB, as in the job); it is timed apart, then ``--repeats`` calls per batch size, median
  reported as GB/s of fp32 gradient input and examples/s. A dense Rademacher matrix of D × 8192
  outgrows the cache beyond D = 65,536 and is regenerated from its hash on every call, which
  is slow. Calls are kept under ``--max-call-seconds``: once a timed call (the first, building
  one aside) takes longer, or a call at the next D is expected to (the slowest call so far scaled
  linearly in D; before the first size, for ``rademacher``, one uncached call on 4,096 elements),
  the larger sizes of that kind are skipped and recorded as such. A Rademacher size whose matrix
  still fits the cache is timed cached, which under-predicts the next, uncached size: the
  default sizes start above that.
* ``faiss`` — index builds through :mod:`gradstore.indexer.faiss_index` for ``--n`` clustered unit
  vectors of ``--faiss-dim`` (k = 8192: a one-checkpoint store), the kinds ``Flat`` and
  ``IVF{4·sqrt(n)},SQfp16`` (the training sample sized by ``train_sample_size`` with the job's
  default memory budget). On the CPU: :func:`build_index`, as a datastore builds its index. On a
  GPU (``faiss.StandardGpuResources``, ``faiss.index_cpu_to_gpu``), when this faiss has GPU
  support and sees a GPU: the same factory string trained and filled on the GPU, then copied back
  with ``index_gpu_to_cpu`` (the datastore writes a CPU index), all of it timed. Both indexes are
  checked against exact search: recall@10 of ``--queries`` queries, searched on the CPU. Without
  faiss-gpu the JSON records ``"faiss-gpu: not available"`` and why.

Usage::

    python bench/gpu_extras.py --device cuda --json /tmp/gpu_extras.json          # all defaults
    python bench/gpu_extras.py --device cpu --numel 1000000 --n 20000              # a quick CPU check

The vectors come from ``bench/approximate_search.py``'s cluster mixture; clocks on CUDA are read
after ``torch.cuda.synchronize()`` (``indexing_throughput.clock``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import torch

from approximate_search import Mixture, recall
from indexing_throughput import PROJ_DIM, clock, environment
from gradstore.indexer.faiss_index import IVF_NPROBE, build_index, factory_for, train_sample_size
from gradstore.indexer.grads import GROUP_ELEMENTS, PerExampleGradients
from gradstore.indexer.job import IndexJobConfig
from gradstore.indexer.model import resolve_device
from gradstore.indexer.projection import PROJECTION_KINDS, ProjectionSpec, make_projector

LORA_RANK, LORA_WIDTH = 8, 4096  # one LoRA matrix of a 7B-class attention projection: 32,768 elements
# Gradient elements of the uncached Rademacher probe: two blocks at k = 8192, seconds on a CPU.
PROBE_ELEMENTS = 4096
FAISS_BATCH_ROWS = 65536
GB = 1e9


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# Projection throughput
# ------------------------------------------------------------------------------------------------


def lora_shapes(numel: int) -> list[tuple[str, tuple[int, ...]]]:
    """``numel`` gradient elements as LoRA matrices hold them: A (r, h) and B (h, r) in turn, the
    last one a 1-D remainder when ``numel`` is not a whole number of matrices."""
    full = LORA_RANK * LORA_WIDTH
    shapes = []
    for index, offset in enumerate(range(0, numel, full)):
        size = min(full, numel - offset)
        if size < full:
            shape = (size,)
        else:
            shape = (LORA_RANK, LORA_WIDTH) if index % 2 == 0 else (LORA_WIDTH, LORA_RANK)
        shapes.append((f"layers.{index // 2}.lora_{'AB'[index % 2]}.weight", shape))
    return shapes


def gradient_groups(numel: int, batch: int, device: torch.device, seed: int) -> list[tuple[list, torch.Tensor]]:
    """Random per-example gradients of ``numel`` elements for ``batch`` examples, grouped as the
    indexing job groups its LoRA gradients before projecting them."""
    generator = torch.Generator(device=device).manual_seed(seed)
    per_param = ((name, torch.randn(batch, *shape, generator=generator, device=device))
                 for name, shape in lora_shapes(numel))
    return list(PerExampleGradients.group_params(per_param, GROUP_ELEMENTS))


def project_batch(projector, groups, rows: int, device: torch.device) -> torch.Tensor:
    """The job's projection of one batch: every group's share summed into one (rows, k) result."""
    projected = torch.zeros(rows, projector.spec.dim, device=device)
    for params, grads in groups:
        projected += projector.project_many(params, grads[:rows]).float()
    return projected


def timed_projection(projector, groups, rows: int, device: torch.device) -> float:
    start = clock(device)
    project_batch(projector, groups, rows, device)
    return clock(device) - start


def timed_calls(projector, groups, batch: int, args, device: torch.device) -> list[float]:
    """Up to ``--repeats`` timed calls, fewer when one runs over ``--max-call-seconds``."""
    seconds = []
    for _ in range(args.repeats):
        seconds.append(timed_projection(projector, groups, batch, device))
        if seconds[-1] > args.max_call_seconds:
            break
    return seconds


def measure_kind(kind: str, groups, numel: int, args, device: torch.device) -> tuple[list[dict], str | None]:
    """Rows for every batch size of one projection kind at one D; the second value says why the
    larger sizes of this kind are to be skipped (a call over the time limit), else None."""
    projector = make_projector(ProjectionSpec(kind=kind, dim=args.proj_dim, seed=args.seed), device)
    first_call = timed_projection(projector, groups, args.batch_sizes[0], device)  # builds the matrices
    rows, over = [], None
    for batch in args.batch_sizes:
        if over:
            rows.append({"kind": kind, "numel": numel, "batch": batch, "skipped": over})
            continue
        seconds = timed_calls(projector, groups, batch, args, device)
        if max(seconds) > args.max_call_seconds:
            over = (f"a call at D = {numel:,}, B = {batch} took {max(seconds):.1f} s "
                    f"(over --max-call-seconds {args.max_call_seconds:g})")
        median = statistics.median(seconds)
        rows.append({"kind": kind, "numel": numel, "batch": batch, "calls": len(seconds), "seconds": median,
                     "first_call_seconds": first_call if batch == args.batch_sizes[0] else None,
                     "gb_per_second": batch * numel * 4 / median / GB, "examples_per_second": batch / median})
        log(f"[projection] {kind:<10} D {numel:>11,} B {batch:>3}: {median * 1e3:9.1f} ms "
            f"{rows[-1]['gb_per_second']:7.2f} GB/s {rows[-1]['examples_per_second']:9.1f} ex/s")
    return rows, over


def free_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def predicted_stops(slowest: dict, numel: int, stopped: dict, limit: float) -> None:
    """Mark the kinds whose call at ``numel`` is expected to take over ``limit`` seconds: a call's
    cost grows about linearly with D, so the slowest call at the previous size predicts it."""
    for kind, (seconds, at) in slowest.items():
        expected = seconds * numel / at
        if kind not in stopped and expected > limit:
            stopped[kind] = (f"expected about {expected:.0f} s a call at D = {numel:,} ({seconds:.1f} s at "
                             f"D = {at:,}), over --max-call-seconds {limit:g}")


def probe_seconds(kind: str, args, device: torch.device) -> float:
    """One call on a small gradient with nothing cached (matrices generated during the call), to
    predict the first size's calls before making one. Meant for ``rademacher``, whose cost is
    then its hash generation, linear in D; a sparse call this small is mostly fixed overhead."""
    projector = make_projector(ProjectionSpec(kind=kind, dim=args.proj_dim, seed=args.seed), device, cache_bytes=0)
    groups = gradient_groups(PROBE_ELEMENTS, args.batch_sizes[0], device, args.seed)
    timed_projection(projector, groups, args.batch_sizes[0], device)  # libraries and kernels warm up
    return timed_projection(projector, groups, args.batch_sizes[0], device)


def measure_projection(args, device: torch.device) -> dict:
    # Only the dense kind can run away (regenerated on every call once D * k outgrows the cache).
    probes = {kind: probe_seconds(kind, args, device) for kind in args.kinds if kind == "rademacher"}
    rows, stopped = [], {}
    slowest = {kind: (seconds, PROBE_ELEMENTS) for kind, seconds in probes.items()}
    for numel in args.numel:
        predicted_stops(slowest, numel, stopped, args.max_call_seconds)
        rows.extend({"kind": kind, "numel": numel, "batch": b, "skipped": stopped[kind]}
                    for kind in args.kinds if kind in stopped for b in args.batch_sizes)
        kinds = [kind for kind in args.kinds if kind not in stopped]
        if not kinds:
            continue
        try:
            groups = gradient_groups(numel, max(args.batch_sizes), device, args.seed)
        except (torch.OutOfMemoryError, MemoryError):
            rows.append({"numel": numel, "error": f"out of memory holding {max(args.batch_sizes)} x {numel:,} fp32"})
            free_memory(device)
            continue
        for kind in kinds:
            try:
                kind_rows, over = measure_kind(kind, groups, numel, args, device)
            except (torch.OutOfMemoryError, MemoryError):
                kind_rows, over = [{"kind": kind, "numel": numel, "error": "out of memory"}], "out of memory"
            rows.extend(kind_rows)
            measured = [row["seconds"] for row in kind_rows if "seconds" in row]
            if measured:
                slowest[kind] = (max(measured), numel)
            if over:
                stopped[kind] = over
            free_memory(device)
        del groups
        free_memory(device)
    return {"device": str(device), "proj_dim": args.proj_dim, "input_dtype": "float32",
            "probe_elements": PROBE_ELEMENTS, "probe_seconds": probes, "group_elements": GROUP_ELEMENTS,
            "lora_matrix": [LORA_RANK, LORA_WIDTH], "rows": rows}


# ------------------------------------------------------------------------------------------------
# FAISS index builds
# ------------------------------------------------------------------------------------------------


def clustered_vectors(n: int, dim: int, queries: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` unit vectors and ``queries`` more from the same cluster mixture (float32)."""
    mixture = Mixture(dim, clusters=256, subspace=16, seed=seed)
    vectors = np.empty((n, dim), dtype=np.float32)
    for index, start in enumerate(range(0, n, FAISS_BATCH_ROWS)):
        stop = min(n, start + FAISS_BATCH_ROWS)
        vectors[start:stop] = mixture.batch(0, index, stop - start)
    return vectors, mixture.batch(1, 0, queries)


def vector_batches(vectors: np.ndarray):
    return (vectors[start:start + FAISS_BATCH_ROWS] for start in range(0, len(vectors), FAISS_BATCH_ROWS))


def faiss_gpu_status() -> str | None:
    """None when faiss can build on a GPU here, else why not."""
    if not hasattr(faiss, "StandardGpuResources"):
        return f"faiss-gpu: not available (faiss {faiss.__version__} is a CPU-only build)"
    if faiss.get_num_gpus() == 0:
        return "faiss-gpu: not available (faiss has GPU support but sees no GPU)"
    return None


def build_on_gpu(resources, factory: str, vectors: np.ndarray, sample: np.ndarray | None) -> tuple[faiss.Index, dict]:
    """``factory`` trained and filled on GPU 0, copied back to a CPU index; the timings of each step."""
    dim = vectors.shape[1]
    start = time.perf_counter()
    index = faiss.index_cpu_to_gpu(resources, 0, faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT))
    if not index.is_trained:
        index.train(sample)
    trained = time.perf_counter()
    for batch in vector_batches(vectors):
        index.add(batch)
    added = time.perf_counter()
    cpu_index = faiss.index_gpu_to_cpu(index)
    done = time.perf_counter()
    ivf = faiss.try_extract_index_ivf(cpu_index)
    if ivf is not None:  # the default the datastore stores in its IVF indexes
        ivf.nprobe = min(ivf.nlist, IVF_NPROBE)
    return cpu_index, {"seconds": done - start, "train_seconds": trained - start, "add_seconds": added - trained,
                       "to_cpu_seconds": done - added}


def training_sample(factory: str, vectors: np.ndarray, seed: int) -> np.ndarray | None:
    n, dim = vectors.shape
    size = train_sample_size(factory, n, dim, IndexJobConfig.index_memory_budget)
    if size == 0:
        return None
    rows = np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))
    return vectors[rows]


def measure_faiss(args) -> dict:
    log(f"[faiss] generating {args.n:,} vectors of d = {args.faiss_dim}")
    vectors, queries = clustered_vectors(args.n, args.faiss_dim, args.queries, args.seed)
    exact_index = build_index(vector_batches(vectors), "Flat", args.faiss_dim)
    _, truth = exact_index.search(queries, args.k)
    del exact_index
    gpu_missing = faiss_gpu_status()
    resources = None if gpu_missing else faiss.StandardGpuResources()
    results = {"n": args.n, "dim": args.faiss_dim, "queries": args.queries, "k": args.k,
               "faiss": faiss.__version__, "cpu_threads": faiss.omp_get_max_threads(), "kinds": {},
               "gpu": gpu_missing or {"devices": faiss.get_num_gpus()}}
    for kind in args.index_kinds:
        factory = factory_for(kind, args.n, args.faiss_dim)
        sample = training_sample(factory, vectors, args.seed)
        start = time.perf_counter()
        index = build_index(vector_batches(vectors), factory, args.faiss_dim, sample)
        cpu = {"seconds": time.perf_counter() - start, "recall": recall(index.search(queries, args.k)[1], truth)}
        del index
        entry = {"factory": factory, "train_rows": 0 if sample is None else len(sample), "cpu": cpu}
        if resources is not None:
            try:
                index, gpu = build_on_gpu(resources, factory, vectors, sample)
                gpu["recall"] = recall(index.search(queries, args.k)[1], truth)
                gpu["speedup_over_cpu"] = cpu["seconds"] / gpu["seconds"]
                entry["gpu"] = gpu
                del index
            except RuntimeError as err:  # a factory this faiss-gpu cannot hold, or GPU memory
                entry["gpu"] = {"error": str(err).strip().splitlines()[-1]}
        results["kinds"][kind] = entry
        gpu_text = entry.get("gpu", {}).get("seconds")
        log(f"[faiss] {factory:<20} cpu {cpu['seconds']:7.2f} s (recall@{args.k} {cpu['recall']:.3f})"
            + (f", gpu {gpu_text:7.2f} s (recall@{args.k} {entry['gpu']['recall']:.3f})" if gpu_text else
               f", gpu: {entry.get('gpu', {}).get('error') or gpu_missing}"))
    return results


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------


def report(results: dict) -> list[str]:
    lines = []
    projection = results.get("projection")
    if projection:
        lines.append(f"== projection to k = {projection['proj_dim']} on {projection['device']} (fp32 input) ==")
        lines.append(f"{'kind':<10} {'D':>13} {'B':>4} {'ms/call':>10} {'GB/s':>8} {'ex/s':>10} {'first call s':>13}")
        for row in projection["rows"]:
            head = f"{row.get('kind', '-'):<10} {row['numel']:>13,} {row.get('batch', '-'):>4}"
            if "seconds" in row:
                first = row["first_call_seconds"]
                lines.append(f"{head} {row['seconds'] * 1e3:10.1f} {row['gb_per_second']:8.2f} "
                             f"{row['examples_per_second']:10.1f} {'' if first is None else f'{first:13.2f}'}")
            else:
                lines.append(f"{head} not run: {row.get('skipped') or row.get('error')}")
    index = results.get("faiss")
    if index:
        lines.append(f"== FAISS builds: {index['n']:,} vectors, d = {index['dim']}, faiss {index['faiss']}, "
                     f"{index['cpu_threads']} CPU threads ==")
        for entry in index["kinds"].values():
            cpu, gpu = entry["cpu"], entry.get("gpu")
            text = f"{entry['factory']:<20} cpu {cpu['seconds']:8.2f} s (recall@{index['k']} {cpu['recall']:.3f})"
            if gpu and "seconds" in gpu:
                text += (f"  gpu {gpu['seconds']:8.2f} s = train {gpu['train_seconds']:.2f} + add "
                         f"{gpu['add_seconds']:.2f} + to cpu {gpu['to_cpu_seconds']:.2f} "
                         f"(recall@{index['k']} {gpu['recall']:.3f}, {gpu['speedup_over_cpu']:.1f}x)")
            else:
                text += f"  gpu: {gpu['error'] if gpu else index['gpu']}"
            lines.append(text)
    return lines


def integers(text: str) -> list[int]:
    return [int(float(part)) for part in text.split(",") if part]


def names(choices):
    def parse(text: str) -> list[str]:
        picked = [part for part in text.split(",") if part]
        unknown = sorted(set(picked) - set(choices))
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {unknown}: expected some of {list(choices)}")
        return picked
    return parse


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="projection device: cpu, cuda, cuda:N or auto (default)")
    parser.add_argument("--parts", type=names(("projection", "faiss")), default=["projection", "faiss"],
                        help="comma-separated: projection, faiss (default both)")
    parser.add_argument("--json", type=Path, help="write every figure here")
    parser.add_argument("--seed", type=int, default=0)
    group = parser.add_argument_group("projection")
    group.add_argument("--kinds", type=names(PROJECTION_KINDS), default=list(PROJECTION_KINDS),
                       help="comma-separated projection kinds (default sjlt,rademacher)")
    group.add_argument("--numel", type=integers, default=[1_000_000, 10_000_000, 100_000_000],
                       help="gradient elements per example, comma-separated (1e6 style accepted)")
    group.add_argument("--batch-sizes", type=integers, default=[8, 16, 32, 64], help="examples per call")
    group.add_argument("--proj-dim", type=int, default=PROJ_DIM, help="k, the projection's dimension")
    group.add_argument("--repeats", type=int, default=3, help="timed calls per batch size (median reported)")
    group.add_argument("--max-call-seconds", type=float, default=10.0,
                       help="a kind whose call takes (or is expected to take) longer is not run at larger sizes")
    group = parser.add_argument_group("faiss")
    group.add_argument("--n", type=int, default=200_000, help="vectors to index")
    group.add_argument("--faiss-dim", type=int, default=PROJ_DIM, help="dimension of the indexed vectors")
    group.add_argument("--index-kinds", type=names(("flat", "ivf")), default=["flat", "ivf"],
                       help="comma-separated gradstore index kinds (default flat,ivf)")
    group.add_argument("--queries", type=int, default=100, help="queries of the recall check")
    group.add_argument("--k", type=int, default=10, help="recall@k of the recall check")
    args = parser.parse_args(argv)
    args.numel, args.batch_sizes = sorted(args.numel), sorted(args.batch_sizes)
    device = resolve_device(args.device)

    results = {"environment": environment(), "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}
    if "projection" in args.parts:
        results["projection"] = measure_projection(args, device)
    if "faiss" in args.parts:
        results["faiss"] = measure_faiss(args)
    print("\n".join(report(results)), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
