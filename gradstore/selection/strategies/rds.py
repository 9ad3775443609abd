"""``rds``: RDS+, cosine of position-weighted mean last hidden states with the targets'.

Each example's representation is the position-weighted mean of the model's last hidden states
(token t of T weighted t / Σ_j j), normalised; an example's score for a target is their cosine.
Aggregation over targets as LESS's (``less``, ``max``, ``mean``), or ``round_robin``, RDS+'s own
rule for multi-task targets: subtasks take turns, each adding its best not yet chosen example by
its mean score over its targets.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import Strategy, StrategyOptions


class RdsOptions(StrategyOptions):
    name: Literal["rds"] = "rds"
    aggregation: Literal["round_robin", "less", "max", "mean"] = Field(
        "round_robin", description="round_robin: subtasks take turns, each adding its best remaining example "
                                   "(by the mean over its targets); less, max, mean: as for the less strategy")


class Rds(Strategy):
    name = "rds"
    summary = "RDS+: cosine of position-weighted mean last hidden states with the targets' (no gradients)"
    cost = "one scan of the representations (N x hidden fp16); targets' representations from one forward pass"
    needs_targets = "required"
    features = ("representations",)
    Options = RdsOptions

    def run(self, context, options: RdsOptions):
        targets = context.require_targets(self.name)
        table = context.engine.representation_scores(targets)
        if options.aggregation == "round_robin":
            return table.round_robin(context.pool)
        return table.result(options.aggregation)
