"""``quality``: rank by a stored per-example score, highest or lowest first; no targets.

Scores are those the indexing pass stored (``Datastore.score_names``): ``loss``, ``grad_norm``,
``feature_norm``, ``nuclear_norm`` and ``effective_rank`` per checkpoint (combined with the
checkpoint weights unless ``checkpoint`` names one), ``vog`` per example. The layer-wise gradient
paper finds higher-quality data at lower nuclear norm and higher effective rank; VoG is high for
hard, atypical or noisy examples.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import Strategy, StrategyOptions


class QualityOptions(StrategyOptions):
    name: Literal["quality"] = "quality"
    score: str = Field("effective_rank", min_length=1, description="a stored score: loss, grad_norm, feature_norm, "
                                                                   "nuclear_norm, effective_rank, vog")
    order: Literal["high", "low"] = Field("high", description="select the highest (high) or lowest (low) scores")
    checkpoint: str | None = Field(None, description="one checkpoint's score (default: weighted over checkpoints)")


class Quality(Strategy):
    name = "quality"
    summary = "a stored per-example score (effective rank, nuclear norm, VoG, loss, ...), highest or lowest first"
    cost = "reads one float per example; no targets, no feature scan"
    needs_targets = "none"
    features = ("scores",)
    Options = QualityOptions
    shorthand = "score"

    def run(self, context, options: QualityOptions):
        from ..context import StrategyResult  # numpy-backed: imported when run, not when registered

        values = context.engine.score_values(options.score, options.checkpoint)
        return StrategyResult(scores=values if options.order == "high" else -values,
                              report={"score": options.score, "order": options.order})
