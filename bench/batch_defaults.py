"""Batch limits of ``gradstore index`` on this machine: peak memory and time per setting.

Each setting (``--max-tokens-per-batch`` x ``--max-batch-size``) runs the real ``gradstore index``
command line in a fresh process, so its peak resident memory (``VmHWM``, read by the child at its
end) is its own: model load, tokenising, per-example gradients, projection, Parquet writes and the
FAISS index. Time is the child's wall time of the whole command, and its CPU time (user + system,
all threads); each setting runs ``--repeats`` times, interleaved with the others, and the fastest
run is kept (other work on the machine only makes a run slower).

Model: a GPT-2 built locally (hidden 256, 4 layers, 4 heads, vocab 1024; random weights) with a
fresh LoRA r=8 on its default targets, ``sgd`` gradients projected to k = 8192 (the default
``sjlt``), on ``--device`` (``cpu`` by default). Corpora:

* ``short`` — 400 records of the demo corpus (:mod:`gradstore.indexer.demo_corpus`): prompts and
  answers of a few words, about 30 tokens each;
* ``long`` — 200 chat records whose token lengths follow the throughput benchmark's log-normal
  draw (median 180 tokens, p90 ~500, clipped to [16, 1024]; ``bench/indexing_throughput.py``).

Usage (from the repository root)::

    python bench/batch_defaults.py --json /tmp/batch-defaults.json
    python bench/batch_defaults.py --settings 16384x64,16384x8 --repeats 1 --corpus short   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from measure import machine_info, proc_status

DEFAULT_SETTINGS = ("16384x64", "16384x32", "16384x16", "16384x8", "16384x4", "16384x1",
                    "8192x64", "4096x64", "2048x64", "4096x8", "2048x8")


def build_inputs(folder: Path, corpora: list[str]) -> dict[str, Path]:
    """The model folder and one JSONL file per corpus, written into ``folder``."""
    from gradstore.indexer.demo_corpus import generate_corpus, write_jsonl
    from gradstore.indexer.tiny import build_model, build_tokenizer
    from indexing_throughput import PseudoLanguage, make_corpus

    language = PseudoLanguage(seed=0, words=4000)
    short = generate_corpus(400, seed=0)
    sample = [m["content"] for r in short for m in r["messages"]] + [language.text(60) for _ in range(300)]
    tokenizer = build_tokenizer(sample, vocab_size=1024)
    paths = {"model": build_model("gpt2", tokenizer, folder / "model", seed=0, hidden=256, layers=4, heads=4,
                                  max_positions=1024)}
    if "short" in corpora:
        paths["short"] = write_jsonl(short, folder / "short.jsonl")
    if "long" in corpora:
        records = make_corpus(tokenizer, language, 200, seed=0)
        paths["long"] = folder / "long.jsonl"
        paths["long"].write_text("".join(json.dumps(r) + "\n" for r in records))
    return paths


def child(argv: list[str]) -> None:
    """Run ``gradstore index ARGV`` in this process; print its wall time and peak memory as JSON."""
    from gradstore.cli import main

    start, cpu_start = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    code = main(["index", *argv])
    seconds = time.perf_counter() - start
    cpu_end = resource.getrusage(resource.RUSAGE_SELF)
    cpu_seconds = (cpu_end.ru_utime - cpu_start.ru_utime) + (cpu_end.ru_stime - cpu_start.ru_stime)
    print(json.dumps({"exit": code, "seconds": seconds, "cpu_seconds": cpu_seconds, "peak_rss": proc_status()["VmHWM"]}))


def run_setting(paths: dict[str, Path], corpus: str, setting: str, device: str, out: Path) -> dict:
    tokens, examples = (int(v) for v in setting.split("x"))
    argv = ["--corpus", str(paths[corpus]), "--model", str(paths["model"]), "--out", str(out), "--overwrite",
            "--gradient-type", "sgd", "--lora-r", "8", "--device", device, "--no-progress",
            "--max-tokens-per-batch", str(tokens), "--max-batch-size", str(examples)]
    result = subprocess.run([sys.executable, __file__, "--child", json.dumps(argv)], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{setting} on {corpus}: {result.stderr[-2000:]}")
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    manifest = json.loads((out / "manifest.json").read_text())
    return {**measured, "examples": manifest["counts"]["examples"], "tokens": manifest["tokens"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", default=",".join(DEFAULT_SETTINGS),
                        help="comma-separated TOKENSxEXAMPLES batch limits")
    parser.add_argument("--corpus", default="short,long", help="short, long or both (comma-separated)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    corpora = args.corpus.split(",")
    settings = args.settings.split(",")
    info = machine_info()
    results: dict[str, dict[str, dict]] = {c: {} for c in corpora}
    with tempfile.TemporaryDirectory() as tmp:
        paths = build_inputs(Path(tmp), corpora)
        for repeat in range(args.repeats):
            for corpus in corpora:
                for setting in settings:
                    measured = run_setting(paths, corpus, setting, args.device, Path(tmp) / "store")
                    best = results[corpus].get(setting)
                    runs = (best or {}).get("runs", []) + [round(measured["seconds"], 2)]
                    if best is None or measured["seconds"] < best["seconds"]:
                        best = measured
                    results[corpus][setting] = {**best, "runs": runs}
                    print(f"{corpus:<6} {setting:>9}  {measured['seconds']:7.2f} s  cpu {measured['cpu_seconds']:7.2f} s  "
                          f"peak {measured['peak_rss'] / 2**30:5.2f} GiB  (repeat {repeat + 1})", flush=True)
    info["loadavg_end"] = os.getloadavg()
    print(f"\n{'corpus':<6} {'tokens x examples':>17} {'best s':>8} {'its cpu s':>9} {'peak GiB':>9}  runs")
    for corpus, by_setting in results.items():
        for setting, r in by_setting.items():
            print(f"{corpus:<6} {setting:>17} {r['seconds']:8.2f} {r['cpu_seconds']:9.2f} {r['peak_rss'] / 2**30:9.2f}"
                  f"  {r['runs']}")
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "device": args.device, "results": results}, indent=2))


if __name__ == "__main__":
    main()
