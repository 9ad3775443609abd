"""The service under load: 32 concurrent clients against a real ``gradstore serve`` on loopback.

For a bounded time every client sends ``select`` and ``influence`` requests with fresh random
target vectors (so the selection cache never answers and every request is computed), alternating
between the store with a FAISS index and the one without. Every response is checked against the
exact LESS computation in numpy over the store's Parquet files; the server must answer no 5xx (no
error at all) and its resident memory must not keep growing once warmed up. Throughput and latency
figures belong to ``bench/service_load.py``, not here.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np
import pytest

from gradstore.client import APIError, Client, TargetVectors
from gradstore.service.process import ServiceProcess

from conftest import DIM, copy_stores, features, unit, weights

KEY = "load-key"
CLIENTS = 32
WARMUP_SECONDS = 3.0
LOAD_SECONDS = 10.0
TARGETS_PER_REQUEST = 3
SELECT_K = 8
INFLUENCE_K = 5
# The index holds the features as float32 and the engine computes in float32; numpy in float64.
SCORE_TOLERANCE = 1e-3
# Allowed growth of the server's resident set between the end of the warm-up and the end of the load:
# generous (allocator arenas and caches settle at different times), yet far below what a per-request
# leak over thousands of requests would add.
RSS_GROWTH_BOUND = 64 << 20


@dataclass
class ClientLog:
    """What one client thread saw: answers by endpoint, answers after the warm-up, failures
    (``(HTTP status or None for an exception, description)``) and answers that differ from the
    exact computation."""

    answers: dict[str, int] = field(default_factory=lambda: {"select": 0, "influence": 0})
    answers_after_warmup: int = 0
    failures: list[tuple[int | None, str]] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def load_server(service_root, tmp_path_factory):
    root = copy_stores(service_root, tmp_path_factory.mktemp("load-root"))
    with ServiceProcess(root, api_key=KEY, log_file=root.parent / "serve.log") as process:
        yield process


def weighted_features(store) -> dict[str, np.ndarray]:
    """Per checkpoint, ``w_c`` × the stored features (float64, read from the features files)."""
    return {c: w * features(store, c) for c, w in weights(store).items()}


def exact_influence(weighted: dict[str, np.ndarray], vectors: dict[str, np.ndarray]) -> np.ndarray:
    """``(examples, targets)`` LESS influence: Σ_c w_c cos(train_c, target_c)."""
    return sum(f @ unit(vectors[c]).T for c, f in weighted.items())


def top_k_mismatch(rows: list[int], scores: list[float], exact: np.ndarray, k: int) -> str | None:
    """Why ``(rows, scores)`` is not a top ``k`` of ``exact`` (None when it is). Ties within the
    tolerance may come in either order, so the check is: ``k`` distinct rows, each with its exact
    score, in non-increasing order, none below the exact ``k``-th best score."""
    expected_len = min(k, len(exact))
    if len(rows) != expected_len or len(set(rows)) != len(rows):
        return f"{len(rows)} rows ({len(set(rows))} distinct), expected {expected_len}"
    if not np.allclose(scores, exact[rows], atol=SCORE_TOLERANCE):
        return f"scores {scores} differ from the exact {exact[rows].tolist()}"
    if np.any(np.diff(scores) > SCORE_TOLERANCE):
        return f"scores not in decreasing order: {scores}"
    kth_best = np.sort(exact)[::-1][expected_len - 1]
    if exact[rows].min() < kth_best - SCORE_TOLERANCE:
        return f"rows {rows} miss a better example (k-th best exact score {kth_best:.6f})"
    return None


def run_client(url: str, number: int, stores: dict[str, dict[str, np.ndarray]], start: threading.Barrier,
               warm_until: list[float], deadline: list[float], log: ClientLog) -> None:
    """Alternate ``select`` and ``influence`` until ``deadline``, checking every answer against
    ``stores`` (name -> its :func:`weighted_features`)."""
    rng = np.random.default_rng(1000 + number)
    names = list(stores)
    checkpoints = list(stores[names[0]])
    with Client(url, KEY, max_retries=0, timeout=120) as client:
        start.wait()
        request = 0
        while time.monotonic() < deadline[0]:
            name = names[(number + request) % len(names)]
            vectors = {c: rng.normal(size=(TARGETS_PER_REQUEST, DIM)) for c in checkpoints}
            endpoint = "select" if request % 2 == 0 else "influence"
            request += 1
            targets = TargetVectors(vectors={c: v.tolist() for c, v in vectors.items()})
            try:
                if endpoint == "select":
                    page = client.select(name, targets, k=SELECT_K)
                    answers = [([i.row for i in page.items], [i.score for i in page.items], 0)]
                else:
                    response = client.influence(name, targets, k=INFLUENCE_K)
                    answers = [([n.row for n in r.neighbors], [n.score for n in r.neighbors], r.target + 1)
                               for r in response.results]
            except APIError as err:
                log.failures.append((err.status, f"{endpoint} {name}: {err.status} {err.code}: {err.message}"))
                continue
            except Exception as err:  # noqa: BLE001 - transport errors and bad responses are failures too
                log.failures.append((None, f"{endpoint} {name}: {type(err).__name__}: {err}"))
                continue
            log.answers[endpoint] += 1
            log.answers_after_warmup += time.monotonic() >= warm_until[0]
            # Column 0: the LESS score of select (the mean over targets: one subtask); column t + 1:
            # target t's own influence.
            per_target = exact_influence(stores[name], vectors)
            exact = np.column_stack([per_target.mean(axis=1), per_target])
            k = SELECT_K if endpoint == "select" else INFLUENCE_K
            if endpoint == "influence" and len(answers) != TARGETS_PER_REQUEST:
                log.mismatches.append(f"influence {name}: {len(answers)} results for {TARGETS_PER_REQUEST} targets")
            for rows, scores, column in answers:
                why = top_k_mismatch(rows, scores, exact[:, column], k)
                if why is not None:
                    log.mismatches.append(f"{endpoint} {name} (column {column}): {why}")


def server_rss(process: ServiceProcess) -> int:
    """The server process's resident set in bytes (``VmRSS``)."""
    with open(f"/proc/{process.process.pid}/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


@pytest.mark.slow
def test_32_concurrent_clients_get_exact_answers_and_no_5xx_with_stable_memory(load_server):
    stores = {name: weighted_features(load_server.root / name) for name in ("pool", "pool-noindex")}
    logs = [ClientLog() for _ in range(CLIENTS)]
    start = threading.Barrier(CLIENTS + 1)
    warm_until, deadline = [0.0], [0.0]
    threads = [threading.Thread(target=run_client, args=(load_server.url, i, stores, start, warm_until, deadline,
                                                         logs[i]), daemon=True)
               for i in range(CLIENTS)]
    for thread in threads:
        thread.start()
    warm_until[0] = time.monotonic() + WARMUP_SECONDS
    deadline[0] = warm_until[0] + LOAD_SECONDS
    start.wait()
    time.sleep(max(0.0, warm_until[0] - time.monotonic()))
    rss_warm = server_rss(load_server)
    for thread in threads:
        thread.join(timeout=LOAD_SECONDS + 120)
    assert not any(thread.is_alive() for thread in threads), "a client is still waiting for an answer"
    rss_end = server_rss(load_server)

    failures = [failure for log in logs for failure in log.failures]
    server_errors = [text for status, text in failures if status is not None and status >= 500]
    assert not server_errors, f"{len(server_errors)} 5xx answers, e.g. {server_errors[:3]}"
    assert not failures, f"{len(failures)} failed requests, e.g. {failures[:3]}"
    mismatches = [mismatch for log in logs for mismatch in log.mismatches]
    assert not mismatches, f"{len(mismatches)} answers differ from numpy, e.g. {mismatches[:3]}"
    for number, log in enumerate(logs):  # every client was served throughout, on both endpoints
        assert log.answers["select"] >= 1 and log.answers["influence"] >= 1, (number, log.answers)
        assert log.answers_after_warmup >= 1, f"client {number} got no answer after the warm-up"
    assert rss_end - rss_warm <= RSS_GROWTH_BOUND, (
        f"server RSS grew from {rss_warm / 2**20:.0f} MiB after the warm-up to {rss_end / 2**20:.0f} MiB")
