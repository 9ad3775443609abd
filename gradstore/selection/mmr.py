"""Maximal marginal relevance: a diversity penalty on a ranking (``less``, ``rds``).

Walking a ranking, :func:`mmr_rerank` chooses, ``budget`` times, the candidate of largest::

    score(x) − λ · max(0, max_{s ∈ S} sim(x, s))

over the candidates not yet chosen, ``S`` being those already chosen (no penalty while ``S`` is
empty); ``sim`` is the inner product of the vectors ``gather`` returns (for ``less``, the
checkpoint-weighted gradient space of :mod:`.feature_space`; for ``rds``, the representations).
Ties go to the better-ranked candidate. With ``λ = 0`` the result is the ranking's head; as ``λ``
grows, near-duplicates of chosen examples fall behind.

The penalised value of a candidate only falls as ``S`` grows, and never exceeds its score, so the
walk is lazy and exact: candidates are read from the ranking in blocks only while a score could
beat the best penalised value seen, kept in a heap, and a candidate's penalty is brought up to
date (against the examples chosen since it was last looked at) only when it reaches the top.
Cost: ``O(read · d)`` to read ``read`` candidates, plus one ``O(new chosen · d)`` update per heap
visit; memory: the candidates read (float16) and the chosen (float32).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable

import numpy as np

from .errors import SelectionError

_BLOCK = 1024


def mmr_rerank(ranking: np.ndarray, scores: np.ndarray, gather: Callable[[np.ndarray], np.ndarray],
               budget: int, weight: float, block: int = _BLOCK) -> np.ndarray:
    """int64: ``budget`` rows of ``ranking`` (best first) chosen by MMR with weight ``weight``.

    ``scores[i]`` is the score of ``ranking[i]`` (non-increasing); ``gather(rows)`` returns
    float32 ``(len(rows), d)`` vectors whose inner products are the similarities.
    """
    ranking = np.asarray(ranking, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float64)
    if len(scores) != len(ranking):
        raise SelectionError(f"mmr: {len(scores)} scores for a ranking of {len(ranking)} rows")
    if not (np.isfinite(weight) and weight >= 0):
        raise SelectionError(f"the diversity weight must be a finite number >= 0, got {weight!r}")
    budget = min(int(budget), len(ranking))
    if weight == 0 or budget == 0:
        return ranking[:budget].copy()
    candidate_vectors: np.ndarray | None = None
    chosen_vectors: np.ndarray | None = None
    penalty = np.zeros(len(ranking), dtype=np.float64)  # max(0, max sim to the chosen), when checked
    heap: list[tuple[float, int, int]] = []              # (-value, position, chosen count when checked)
    chosen: list[int] = []
    read = 0
    while len(chosen) < budget:
        while read < len(ranking) and (not heap or scores[read] > -heap[0][0]):
            stop = min(len(ranking), read + block)
            vectors = np.asarray(gather(ranking[read:stop]), dtype=np.float32)
            if candidate_vectors is None:
                candidate_vectors = np.empty((len(ranking), vectors.shape[1]), dtype=np.float16)
                chosen_vectors = np.empty((budget, vectors.shape[1]), dtype=np.float32)
            candidate_vectors[read:stop] = vectors
            if chosen:
                sims = vectors @ chosen_vectors[:len(chosen)].T
                penalty[read:stop] = np.maximum(sims.max(axis=1), 0)
            for position in range(read, stop):
                heapq.heappush(heap, (-(scores[position] - weight * penalty[position]), position, len(chosen)))
            read = stop
        if not heap:
            break
        _, position, checked = heapq.heappop(heap)
        if checked < len(chosen):
            sims = chosen_vectors[checked:len(chosen)] @ candidate_vectors[position].astype(np.float32)
            penalty[position] = max(penalty[position], float(sims.max()), 0.0)
            heapq.heappush(heap, (-(scores[position] - weight * penalty[position]), position, len(chosen)))
            continue
        chosen_vectors[len(chosen)] = candidate_vectors[position]
        chosen.append(position)
    return ranking[np.asarray(chosen, dtype=np.int64)]
