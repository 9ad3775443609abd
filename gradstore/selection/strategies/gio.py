"""``gio``: GIO, the subset whose distribution is closest in KL divergence to the targets'.

Greedy minimisation of a k-nearest-neighbour estimate of ``KL(targets ‖ selected)`` in the
gradient (or representation) space, pool and targets k-means quantised for large pools (chosen
centroids expanded to their members), stopping when the estimate would rise (or at the budget
only); the estimate after every step is in the report. See :mod:`gradstore.selection.gio`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ._geometric import SpaceOptions
from .base import Strategy


class GioOptions(SpaceOptions):
    name: Literal["gio"] = "gio"
    neighbors: int = Field(5, ge=1, le=100, description="k of the k-nearest-neighbour KL estimate")
    centroids: int = Field(1500, ge=0, le=100_000,
                           description="k-means centroids for the pool and for the targets when they have more "
                                       "points than this (0: never quantise)")
    stop: Literal["kl_rises", "budget"] = Field(
        "kl_rises", description="kl_rises: stop when the estimate would rise (GIO's rule; may select fewer than "
                                "the budget); budget: run to the budget")
    seed: int = Field(0, ge=0, le=(1 << 31) - 1, description="seed of the k-means sampling and initialisation")


class Gio(Strategy):
    name = "gio"
    summary = ("GIO: greedy minimisation of a k-NN estimate of KL(targets || selected) in gradient or "
               "representation space, k-means quantised at scale; stops when the estimate rises")
    cost = ("k-means of the pool (a sample of 128 x centroids, ~20 iterations) and one assignment pass over the "
            "pool's features; then O(steps x target centroids x pool centroids)")
    needs_targets = "required"
    features = ("gradients", "representations")
    Options = GioOptions

    def run(self, context, options: GioOptions):
        # numpy-backed: imported when run, not when registered (see .base)
        from ..context import StrategyResult
        from ..gio import gio_select

        context.require_targets(self.name)
        space = options.space(context)
        chosen = gio_select(space, context.pool, context.budget, options.neighbors, options.centroids,
                            options.stop == "kl_rises", options.seed)
        report = {**space.describe(), **chosen.report, "order_scores": "the KL estimate after the step that "
                                                                      "added the example"}
        return StrategyResult(order=chosen.rows, order_scores=chosen.kl_after, checkpoints=space.checkpoints,
                              weights=space.weights, report=report)
