"""``diversity``: MILO-style submodular selection, covering the pool (or what resembles the targets).

Stochastic-greedy maximisation of facility location or graph cut over a sparse k-nearest-
neighbour similarity graph of the pool's features (FAISS), unweighted without targets, each
pool example weighted by its similarity to the targets with them. The greedy order is MILO's
easy-to-hard curriculum: the selection comes in that order (or reversed), scored by each
example's greedy gain or by MILO's Taylor-softmax sampling probability of that gain. See
:mod:`gradstore.selection.submodular`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ._geometric import Objective, SpaceOptions
from .base import Strategy


class DiversityOptions(SpaceOptions):
    name: Literal["diversity"] = "diversity"
    objective: Objective = Field("facility_location",
                                 description="facility_location: sum over the pool of the similarity to the "
                                             "nearest selected example; graph_cut: similarity to the pool minus "
                                             "lambda x similarity within the selection")
    graph_cut_lambda: float = Field(0.4, ge=0, le=1, description="graph cut's lambda (monotone up to 0.5)")
    neighbors: int = Field(10, ge=1, le=200, description="neighbours per example in the similarity graph")
    nprobe: int = Field(8, ge=1, le=4096, description="IVF lists probed per example when building the graph of "
                                                      "a large pool (20,000 examples or more)")
    epsilon: float = Field(0.01, ge=0, lt=1, description="stochastic greedy's epsilon: (n / budget) ln(1/epsilon) "
                                                         "candidates per step; 0: plain greedy")
    order: Literal["easy_to_hard", "hard_to_easy"] = Field(
        "easy_to_hard", description="the selection in greedy order (largest gains, the most representative, "
                                    "first: MILO's curriculum) or reversed")
    order_scores: Literal["gain", "probability"] = Field(
        "gain", description="each selected example's greedy gain, or its Taylor-softmax sampling probability")
    temperature: float = Field(1.0, gt=0, le=1000, description="Taylor-softmax temperature, on gains scaled to "
                                                               "a maximum of 1")
    seed: int = Field(0, ge=0, le=(1 << 31) - 1, description="seed of the stochastic greedy's samples")


class Diversity(Strategy):
    name = "diversity"
    summary = ("MILO-style diversity: stochastic-greedy facility location or graph cut over a k-NN similarity "
               "graph; target-free or weighted by similarity to the targets; easy-to-hard order")
    cost = ("a k-NN graph of the pool (FAISS, exact below 20,000 examples, IVF above) and "
            "O(pool x ln(1/epsilon) x neighbours) greedy gain evaluations")
    needs_targets = "optional"
    features = ("gradients", "representations")
    Options = DiversityOptions
    shorthand = "objective"

    def run(self, context, options: DiversityOptions):
        import time

        import numpy as np

        from ..context import StrategyResult
        from ..submodular import (
            greedy,
            knn_graph,
            make_objective,
            relevance_weights,
            sample_size,
            taylor_softmax,
        )

        space = options.space(context)
        pool = np.asarray(context.pool, dtype=np.int64)
        started = time.perf_counter()
        graph = knn_graph(space, pool, options.neighbors, options.nprobe, options.seed)
        weights = relevance_weights(space, pool) if space.targets is not None else None
        built = time.perf_counter()
        objective = make_objective(options.objective, graph, weights, options.graph_cut_lambda)
        chosen, gains = greedy(objective, context.budget, options.epsilon, options.seed)
        done = time.perf_counter()
        probabilities = taylor_softmax(gains, options.temperature)
        values = gains if options.order_scores == "gain" else probabilities
        if options.order == "hard_to_easy":
            chosen, values = chosen[::-1], values[::-1]
        report = {**space.describe(), "objective": options.objective, "value": round(objective.value, 6),
                  "weighted_by_targets": weights is not None, "neighbors": options.neighbors,
                  "graph_entries": len(graph.indices),
                  "candidates_per_step": sample_size(len(pool), context.budget, options.epsilon),
                  "order": options.order, "order_scores": options.order_scores,
                  "curriculum": _curriculum(gains, probabilities, options.temperature),
                  "seconds": {"graph": round(built - started, 3), "greedy": round(done - built, 3)}}
        return StrategyResult(order=pool[chosen], order_scores=values.astype(np.float32),
                              checkpoints=space.checkpoints, weights=space.weights, report=report)


def _curriculum(gains, probabilities, temperature) -> dict:
    """A summary of the greedy gains and sampling probabilities, in greedy order, at a few ranks."""
    if not len(gains):
        return {"temperature": temperature}
    at = sorted({0, len(gains) // 4, len(gains) // 2, 3 * len(gains) // 4, len(gains) - 1})
    return {"temperature": temperature, "ranks": [i + 1 for i in at],
            "gains": [round(float(gains[i]), 6) for i in at],
            "probabilities": [float(f"{probabilities[i]:.6g}") for i in at]}
