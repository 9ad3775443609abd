"""The 1-bit scan kernel: unpacking each tile of rows once, against unpacking as it loads.

``gradstore.selection.numba_kernel.products`` unpacks a tile of four rows of 1-bit codes into ±1
floats once (``unpack_signs``) and multiplies them with every target. Its generic path, which the
fp16 and int8 rows take, converts each element as it loads it, once for every four targets; the
1-bit codes went that way before. Both are compiled from the same module and timed here in one
process, one thread, on random in-memory codes, for k = 1024 and 8192 and 8, 32 and 128 targets
(best of ``--repeats``), with the fp16 generic path over the same rows for scale; their results
are checked equal.

    python bench/sign_kernel.py --json sign-kernel.json
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from measure import machine_info


def best_seconds(run, repeats: int) -> float:
    run()  # compiles on the first call
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def measure(dim: int, rows: int, targets: int, repeats: int) -> dict:
    from gradstore.selection import numba_kernel

    rng = np.random.default_rng(0)
    codes = rng.integers(0, 256, (rows, dim // 8), dtype=np.uint8)
    half = rng.standard_normal((rows, dim)).astype(np.float16).view(np.int16)
    query = rng.standard_normal((targets, dim)).astype(np.float32)
    outs = {name: np.zeros((targets, rows), dtype=np.float32) for name in ("once", "as_loaded", "fp16")}
    seconds = {
        "once": best_seconds(lambda: numba_kernel.products(codes, query, outs["once"]), repeats),
        "as_loaded": best_seconds(lambda: numba_kernel._compiled_products(codes, query, outs["as_loaded"]), repeats),
        "fp16": best_seconds(lambda: numba_kernel.products(half, query, outs["fp16"]), repeats),
    }
    checked = [np.zeros((targets, rows), dtype=np.float32) for _ in range(2)]
    numba_kernel.products(codes, query, checked[0])
    numba_kernel._compiled_products(codes, query, checked[1])
    np.testing.assert_allclose(checked[0], checked[1], rtol=1e-4, atol=1e-3)  # float32 sums in other orders
    return {"dim": dim, "rows": rows, "targets": targets, **{f"{k}_s": v for k, v in seconds.items()},
            "speedup": seconds["as_loaded"] / seconds["once"], "once_vs_fp16": seconds["fp16"] / seconds["once"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    import numba

    numba.set_num_threads(1)
    results = [measure(dim, rows, targets, args.repeats)
               for dim, rows in ((1024, 100_000), (8192, 12_500)) for targets in (8, 32, 128)]
    print("| k | rows | targets | unpacked as loaded | unpacked once a tile | speed-up | fp16 rows, same count |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['dim']} | {r['rows']:,} | {r['targets']} | {r['as_loaded_s'] * 1e3:.1f} ms | "
              f"{r['once_s'] * 1e3:.1f} ms | {r['speedup']:.2f}× | {r['fp16_s'] * 1e3:.1f} ms |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine_info(), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
