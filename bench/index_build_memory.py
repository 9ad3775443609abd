"""Memory of building a store's IVF index: in memory (``ivf``) vs in parts merged on disk (``ivf-ondisk``).

For each store size N, a fresh process writes a synthetic store (random unit fp16 features, one
checkpoint) through the real writer — shards, then ``finalize_store`` with the index kind and an
``--index-memory`` budget, then ``publish_store`` — while a thread samples its private memory
(``RssAnon``) and mapped file pages (``RssFile``). Writing the shards takes little memory, so the
peaks are the index build's: the in-memory IVF holds every list, the on-disk one one part of at most
half the budget plus the coarse quantizer (and the training sample, capped by the budget, for both).

    python bench/index_build_memory.py                     # N = 200k, 400k; k = 1024; budget 256 MiB
    python bench/index_build_memory.py --n 100000 --json build.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import faiss

from measure import RssSampler, proc_status
from selection_scan import build_store, run_child

MIB = 1 << 20


def build_in_this_process(out: Path, n: int, dim: int, kind: str, budget: int) -> dict:
    before = proc_status()
    with RssSampler(interval=0.02) as sampler:
        start = time.perf_counter()
        written = build_store(out, n, dim, ["ckpt"], shard_size=8192, seed=0, index_kind=kind,
                              index_memory_budget=budget)
        seconds = time.perf_counter() - start
    index_files = {p.name: p.stat().st_size for p in out.iterdir() if p.name.startswith("index.")}
    return {"seconds": seconds, "finalize_seconds": written["finalize_s"], "rss_anon_before": before["RssAnon"],
            "peak_rss_anon": sampler.peak_anon, "peak_rss_file": sampler.peak_file,
            "vmhwm": proc_status()["VmHWM"], "index_files": index_files}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", default="200000,400000", help="store sizes, comma-separated")
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--kinds", default="ivf,ivf-ondisk")
    parser.add_argument("--index-memory", type=int, default=256 * MIB, help="finalisation's memory budget, bytes")
    parser.add_argument("--tmp", type=Path, help="folder for the stores (default: a temporary one)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--child", nargs=3, metavar=("OUT", "N", "KIND"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        out, n, kind = args.child
        print("RESULT " + json.dumps(build_in_this_process(Path(out), int(n), args.dim, kind, args.index_memory)))
        return 0
    root = Path(tempfile.mkdtemp(prefix="gradstore-build-memory-", dir=args.tmp))
    results = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "faiss": faiss.__version__,
               "dim": args.dim, "index_memory": args.index_memory, "command": " ".join(sys.argv),
               "loadavg_start": os.getloadavg(), "runs": []}
    print(f"{'N':>9} {'kind':<11} {'finalize s':>10} {'peak anon MiB':>14} {'peak file MiB':>14} {'VmHWM MiB':>10} "
          f"{'index files MiB':>16}", flush=True)
    for n in (int(x) for x in args.n.split(",")):
        for kind in args.kinds.split(","):
            out = root / f"{kind}-{n}"
            run = run_child([sys.executable, __file__, "--child", str(out), str(n), kind, "--dim", str(args.dim),
                             "--index-memory", str(args.index_memory)])
            run.update(n=n, kind=kind)
            results["runs"].append(run)
            print(f"{n:>9,} {kind:<11} {run['finalize_seconds']:>10.1f} {run['peak_rss_anon'] / MIB:>14,.0f} "
                  f"{run['peak_rss_file'] / MIB:>14,.0f} {run['vmhwm'] / MIB:>10,.0f} "
                  f"{sum(run['index_files'].values()) / MIB:>16,.0f}", flush=True)
            shutil.rmtree(out)
    results["loadavg_end"] = os.getloadavg()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
