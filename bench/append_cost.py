"""What an append costs: indexing M new examples into a store of N, against building N + M anew.

A demo corpus of ``--n + --m`` records is split into the first ``--n`` and the last ``--m``
(``--n`` a multiple of the shard size, so the appended store is the one-shot store bit for bit,
which is checked). Three real `gradstore index` runs, each a fresh process with one torch thread,
on a tiny Llama: the one-shot build of N + M, the build of N, and the append of M to it
(``gradstore index --append``, its settings read from the store). Printed: wall seconds of each,
the append's share of the one-shot build's time against M / (N + M), and whether the stores'
features are equal.

    python bench/append_cost.py --n 4096 --m 256
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

from measure import machine_info


def gradstore(*args) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "gradstore.cli", *map(str, args)], check=True, capture_output=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096, help="examples in the store before the append")
    parser.add_argument("--m", type=int, default=256, help="examples appended")
    parser.add_argument("--shard-size", type=int, default=256)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from scaling import build_tiny_model

    from gradstore.datastore import Datastore
    from gradstore.indexer.demo_corpus import generate_corpus, write_jsonl

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        corpus = generate_corpus(args.n + args.m, seed=0)
        model = build_tiny_model(root, corpus)
        write_jsonl(corpus[:args.n], root / "old.jsonl")
        write_jsonl(corpus[args.n:], root / "new.jsonl")
        common = ["--model", model, "--gradient-type", "sgd", "--proj-dim", 1024, "--max-length", 128,
                  "--shard-size", args.shard_size, "--device", "cpu", "--no-progress"]
        one_shot = gradstore("index", "--corpus", "old=" + str(root / "old.jsonl"),
                             "--corpus", "new=" + str(root / "new.jsonl"), "--out", root / "one-shot", *common)
        first = gradstore("index", "--corpus", "old=" + str(root / "old.jsonl"), "--out", root / "appended", *common)
        append = gradstore("index", "--append", "--corpus", "new=" + str(root / "new.jsonl"),
                           "--out", root / "appended", "--no-progress")
        a, b = Datastore.open(root / "appended"), Datastore.open(root / "one-shot")
        equal = all(np.array_equal(a.features(c), b.features(c)) for c in b.checkpoint_names)
    result = {"machine": machine_info(), "date": time.strftime("%Y-%m-%d"), "n": args.n, "m": args.m,
              "one_shot_s": one_shot, "build_n_s": first, "append_m_s": append,
              "append_share": append / one_shot, "m_share": args.m / (args.n + args.m), "bitwise_equal": equal}
    print("| N | M | build N + M | build N | append M | append / build N + M | M / (N + M) | equal |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    print(f"| {args.n:,} | {args.m:,} | {one_shot:.1f} s | {first:.1f} s | {append:.1f} s | "
          f"{append / one_shot:.3f} | {args.m / (args.n + args.m):.3f} | {equal} |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
