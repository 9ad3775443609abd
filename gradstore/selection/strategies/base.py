"""The strategy interface: what every selection strategy declares and implements.

A strategy is one way of choosing examples from a store's pool. It declares, as class
attributes:

* ``name``: its name on the command line (``--strategy NAME``), in the REST request
  (``"strategy": {"name": NAME, ...}``) and in ``gradstore eval --strategies``;
* ``summary`` and ``cost``: one line each, for ``--help``, ``GET /v1/strategies`` and the docs;
* ``needs_targets``: ``"required"``, ``"optional"`` or ``"none"``;
* ``features``: which stored features it reads, among :data:`FEATURES`;
* ``Options``: a pydantic model of its options (a subclass of :class:`StrategyOptions` whose
  ``name`` is ``Literal[NAME]``): the same model validates the CLI's flags, the REST request (it is
  part of the wire contract, :class:`gradstore.selection.options.SelectionOptions`) and the SDK's
  arguments, and its JSON schema is what ``GET /v1/strategies`` shows;
* ``shorthand`` (optional): the option that ``NAME:VALUE`` sets in ``gradstore eval
  --strategies`` (``quality:effective_rank``).

and implements :meth:`Strategy.run`, which gets a :class:`~gradstore.selection.context.SelectionContext`
(the engine, the targets, the candidate pool after filters, the budget) and returns a
:class:`~gradstore.selection.context.StrategyResult`: a score per example to rank by, or an
ordered subset. Budget, per-source caps and deduplication are applied by the engine afterwards,
the same way for every strategy.

Strategy modules import only pydantic at module level (numerical work happens in the engine or
in modules imported inside :meth:`Strategy.run`), so that the registry, and with it the wire
contract, loads in the SDK's base install, which has no numpy.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from ..context import SelectionContext, StrategyResult

NeedsTargets = Literal["required", "optional", "none"]
NEEDS_TARGETS: tuple[NeedsTargets, ...] = ("required", "optional", "none")
# What a strategy may read: the projected gradients (per checkpoint), the representation
# vectors, the stored per-example scores (loss, grad_norm, nuclear_norm, effective_rank, vog, ...).
FEATURES = ("gradients", "representations", "scores")


class StrategyOptions(BaseModel):
    """Base of every strategy's options; ``name`` selects the strategy."""

    model_config = ConfigDict(extra="forbid")

    name: str


class Strategy(ABC):
    """A selection strategy (see the module docstring for what a subclass declares)."""

    name: ClassVar[str]
    summary: ClassVar[str]
    cost: ClassVar[str]
    needs_targets: ClassVar[NeedsTargets]
    features: ClassVar[tuple[str, ...]]
    Options: ClassVar[type[StrategyOptions]]
    shorthand: ClassVar[str | None] = None

    @abstractmethod
    def run(self, context: "SelectionContext", options: StrategyOptions) -> "StrategyResult":
        """Score or order the pool of ``context`` (``options`` is an instance of ``Options``)."""

    @classmethod
    def describe(cls) -> dict:
        """What ``GET /v1/strategies`` and the docs show of this strategy."""
        return {"name": cls.name, "summary": cls.summary, "needs_targets": cls.needs_targets,
                "features": list(cls.features), "cost": cls.cost,
                "options_schema": cls.Options.model_json_schema()}
