"""Strategy routes: the selection strategies this service runs, with their options' schemas."""

from __future__ import annotations

from fastapi import APIRouter

from gradstore.client.models import StrategyInfo, StrategyList
from gradstore.selection.strategies import registry

router = APIRouter(prefix="/v1/strategies", tags=["strategies"])


@router.get("", response_model=StrategyList, summary="List the selection strategies and their options")
def list_strategies() -> StrategyList:
    """Every strategy of the registry: name, summary, whether it needs targets, the stored
    features it reads, its cost and the JSON schema of its options (the ``strategy`` field of a
    select request)."""
    return StrategyList(strategies=[StrategyInfo(**cls.describe()) for cls in registry().values()])
