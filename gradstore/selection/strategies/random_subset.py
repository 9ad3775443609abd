"""``random``: a seeded uniformly random subset of the pool, every comparison's baseline."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import Strategy, StrategyOptions


class RandomOptions(StrategyOptions):
    name: Literal["random"] = "random"
    seed: int = Field(0, ge=0, le=1 << 53, description="seed of the draw (the same seed, the same subset)")


class Random(Strategy):
    name = "random"
    summary = "a seeded uniformly random subset of the pool (the baseline)"
    cost = "nothing read but the pool"
    needs_targets = "none"
    features = ()
    Options = RandomOptions
    shorthand = "seed"

    def run(self, context, options: RandomOptions):
        import numpy as np  # imported when run, not when registered (see .base)

        from ..context import StrategyResult

        # One uniform draw per example of the store, so a row's draw does not depend on the pool
        # and ranking the pool by it is a uniformly random order.
        draws = np.random.default_rng(options.seed).random(context.store.num_rows, dtype=np.float32)
        return StrategyResult(scores=draws, report={"seed": options.seed})
