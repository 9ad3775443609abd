"""What to select: the one model of a selection's options, shared by the CLI, the REST API and the SDK.

:class:`SelectionOptions` is the strategy with its own options (``strategy``, a discriminated
union of every registered strategy's ``Options`` model, see :mod:`.strategies`), the budget
(exactly one of ``k`` and ``fraction``) and what applies to every strategy: source filter,
quality filters, per-source cap, near-duplicate suppression. The REST select request
(:class:`gradstore.client.models.SelectRequest`) is this model plus targets and paging, so the
wire contract, the OpenAPI schema and the in-process API have one definition. It needs pydantic
only.

``strategy`` may be given as a name (``"rds"``) or an object (``{"name": "quality", "score":
"vog"}``); without it the strategy is ``less``. For requests written before strategies existed,
``aggregation``, ``checkpoints`` and ``weights`` at the top level are the ``less`` strategy's
options (refused beside another strategy).

``diversity_weight`` (λ) re-ranks a ranked strategy's result by maximal marginal relevance
(:mod:`gradstore.selection.mmr`): each pick maximises ``score − λ · max similarity to the picks so
far``, similarity in the strategy's feature space (representations for ``rds``, the
checkpoint-weighted gradients otherwise).

Quality filters run before the strategy, on the pool left by the source filter: each keeps the
examples whose score is above (``keep: above``) or below (``keep: below``) the given quantile of
the pool's scores, inclusive, one filter after the other (``{"score": "vog", "keep": "below",
"quantile": 0.95}`` drops the top 5 % by VoG).
"""

from __future__ import annotations

import math
from decimal import Decimal
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .strategies import DEFAULT_STRATEGY, options_type
from .strategies.less import Aggregation

ExportFormat = Literal["jsonl", "parquet"]
EXPORT_FORMATS: tuple[str, ...] = ExportFormat.__args__
# Top-level fields of requests older than strategies, now the less strategy's options.
_LEGACY_LESS_FIELDS = ("aggregation", "checkpoints", "weights")

StrategyChoice = options_type()


class QualityFilter(BaseModel):
    """Keep the pool's examples whose ``score`` is at or above / at or below its ``quantile``."""

    model_config = ConfigDict(extra="forbid")

    score: str = Field(min_length=1, description="a stored score (loss, grad_norm, nuclear_norm, effective_rank, "
                                                 "vog, ...)")
    keep: Literal["above", "below"] = Field(description="keep examples at or above, or at or below, the quantile")
    quantile: float = Field(ge=0, le=1, description="quantile of the score over the pool, in [0, 1]")
    checkpoint: str | None = Field(None, description="one checkpoint's score (default: weighted over checkpoints)")


class SelectionOptions(BaseModel):
    """A selection: strategy and its options, budget, filters (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    strategy: StrategyChoice = Field(default_factory=lambda: {"name": DEFAULT_STRATEGY},
                                     description="the strategy and its options (a name alone takes its defaults)",
                                     validate_default=True)
    k: int | None = Field(None, ge=1, description="select k examples")
    fraction: float | None = Field(None, gt=0, le=1, description="or ceil(fraction x pool) examples")
    sources: list[str] | None = Field(None, min_length=1, description="only examples of these sources")
    filters: list[QualityFilter] | None = Field(None, description="quality filters applied to the pool first")
    per_source_cap: int | None = Field(None, ge=1, description="at most this many examples per source")
    dedup_threshold: float | None = Field(
        None, gt=-1, le=1, description="skip a candidate whose checkpoint-weighted gradient cosine to an already "
                                       "selected example exceeds this")
    diversity_weight: float | None = Field(
        None, ge=0, le=1e6, description="maximal marginal relevance on a ranking (less, rds, quality, random): each "
                                        "pick maximises score - weight x its largest similarity to those picked")
    # Requests older than strategies: moved into the less strategy's options on validation, so
    # they are always None on a validated model. Declared so that the schema says they exist.
    aggregation: Aggregation | None = Field(None, deprecated=True, description="legacy: strategy.aggregation")
    checkpoints: list[str] | None = Field(None, min_length=1, deprecated=True,
                                          description="legacy: strategy.checkpoints")
    weights: dict[str, float] | None = Field(None, deprecated=True, description="legacy: strategy.weights")

    @model_validator(mode="before")
    @classmethod
    def _strategy_forms(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        strategy = data.get("strategy")
        if isinstance(strategy, str):
            strategy = data["strategy"] = {"name": strategy}
        legacy = {key: data.pop(key) for key in _LEGACY_LESS_FIELDS if key in data}
        if legacy:
            legacy = {key: value for key, value in legacy.items() if value is not None}
            name = strategy.get("name") if isinstance(strategy, dict) else getattr(strategy, "name", None)
            if strategy is not None and name != DEFAULT_STRATEGY:
                if legacy:
                    raise ValueError(f"{', '.join(legacy)}: options of the less strategy, given with strategy "
                                     f"{name!r}; put a strategy's options inside 'strategy'")
            elif legacy:
                merged = dict(strategy if isinstance(strategy, dict) else
                              (strategy.model_dump(exclude_unset=True) if strategy is not None else {}))
                merged.setdefault("name", DEFAULT_STRATEGY)
                for key, value in legacy.items():
                    merged.setdefault(key, value)
                data["strategy"] = merged
        return data

    @model_validator(mode="after")
    def _one_budget(self):
        if (self.k is None) == (self.fraction is None):
            raise ValueError("give exactly one of k or fraction")
        if self.diversity_weight and (self.per_source_cap is not None or self.dedup_threshold is not None):
            raise ValueError("diversity_weight re-ranks the whole budget; give it without per_source_cap and "
                             "dedup_threshold")
        return self

    def budget(self, pool: int) -> int:
        """``k``, or ``ceil(fraction × pool)`` computed in decimal (0.07 × 100 is 7, not 8)."""
        if self.k is not None:
            return min(self.k, pool)
        return min(pool, math.ceil(Decimal(repr(float(self.fraction))) * pool))
