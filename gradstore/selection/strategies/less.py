"""``less``: LESS influence, Σ_c w_c · cos(train_c(x), target_c), aggregated over the targets."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import Strategy, StrategyOptions

Aggregation = Literal["less", "max", "mean"]


class LessOptions(StrategyOptions):
    name: Literal["less"] = "less"
    aggregation: Aggregation = Field(
        "less", description="over the targets: less = mean within each subtask, max across subtasks; "
                            "max or mean over all targets")
    checkpoints: list[str] | None = Field(None, min_length=1, description="checkpoints to use (default: all)")
    weights: dict[str, float] | None = Field(
        None, description="checkpoint weights (default: the manifest's), normalised to sum 1")


class Less(Strategy):
    name = "less"
    summary = "LESS: checkpoint-weighted cosine of Adam-preconditioned LoRA gradients with the targets' gradients"
    cost = "one scan of the gradient features (N x checkpoints x k fp16); targets' gradients from records"
    needs_targets = "required"
    features = ("gradients",)
    Options = LessOptions

    def run(self, context, options: LessOptions):
        targets = context.require_targets(self.name)
        table = context.engine.scores(targets, options.checkpoints, options.weights)
        return table.result(options.aggregation)
