"""``less``: LESS influence, Σ_c w_c · cos(train_c(x), target_c), aggregated over the targets."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from gradstore.datastore.layout import FULL_PRECISION, PRECISIONS

from .base import Strategy, StrategyOptions

Aggregation = Literal["less", "max", "mean"]
Precision = Literal[PRECISIONS]


class LessOptions(StrategyOptions):
    name: Literal["less"] = "less"
    aggregation: Aggregation = Field(
        "less", description="over the targets: less = mean within each subtask, max across subtasks; "
                            "max or mean over all targets")
    checkpoints: list[str] | None = Field(None, min_length=1, description="checkpoints to use (default: all)")
    weights: dict[str, float] | None = Field(
        None, description="checkpoint weights (default: the manifest's), normalised to sum 1")
    # None rather than "fp16" by default, so that a request that does not ask for a precision is
    # the request older services take (they refuse fields they do not know).
    precision: Precision | None = Field(
        None, description="scan the stored fp16 features (default), or the store's int8 or 1bit quantised copy "
                          "(added by `gradstore quantize`): 2x or 16x fewer bytes read, approximate scores")


class Less(Strategy):
    name = "less"
    summary = "LESS: checkpoint-weighted cosine of Adam-preconditioned LoRA gradients with the targets' gradients"
    cost = "one scan of the gradient features (N x checkpoints x k fp16); targets' gradients from records"
    needs_targets = "required"
    features = ("gradients",)
    Options = LessOptions

    def run(self, context, options: LessOptions):
        targets = context.require_targets(self.name)
        precision = options.precision or FULL_PRECISION
        table = context.engine.scores(targets, options.checkpoints, options.weights, precision)
        result = table.result(options.aggregation)
        result.report["precision"] = precision
        return result
