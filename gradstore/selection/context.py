"""What a strategy gets (:class:`SelectionContext`) and gives back (:class:`StrategyResult`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .errors import SelectionError

if TYPE_CHECKING:
    from .engine import SelectionEngine
    from .targets import TargetSet


@dataclass
class SelectionContext:
    """One selection's inputs: the engine over the store, the targets (None for a target-free
    run), the candidate rows (ascending, after the source and quality filters) and the budget."""

    engine: "SelectionEngine"
    targets: "TargetSet | None"
    pool: np.ndarray
    budget: int

    @property
    def store(self):
        return self.engine.store

    def require_targets(self, strategy: str) -> "TargetSet":
        if self.targets is None:
            raise SelectionError(f"strategy {strategy!r} needs targets: give target records, a target datastore "
                                 f"or target vectors")
        return self.targets


@dataclass
class StrategyResult:
    """A strategy's answer: ``scores`` for every example (float32, row order, higher first) to
    rank the pool by, or ``order``: the chosen rows of the pool, best first, with a value each in
    ``order_scores`` (a gain, a similarity). ``per_subtask`` (float32 ``(N, S)``, row order) holds
    per-subtask scores where the strategy has them; ``checkpoints`` and ``weights`` the gradient
    checkpoints it used; ``report`` anything worth showing about the run (a trace, a stopping
    point), JSON-serialisable."""

    scores: np.ndarray | None = None
    order: np.ndarray | None = None
    order_scores: np.ndarray | None = None
    per_subtask: np.ndarray | None = None
    subtasks: list[str] = field(default_factory=list)
    checkpoints: list[str] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    report: dict = field(default_factory=dict)

    def __post_init__(self):
        if (self.scores is None) == (self.order is None):
            raise ValueError("a strategy result has either scores or an order")
        if self.order is not None and (self.order_scores is None or len(self.order_scores) != len(self.order)):
            raise ValueError("an ordered strategy result needs one order score per row")
