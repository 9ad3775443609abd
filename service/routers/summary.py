"""Selection summary route: for a cached selection, its composition per source against the
eligible pool, the pool's score histogram with the selection's cut-off and the per-subtask
breakdown (``gradstore.selection.overview.selection_summary``)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.concurrency import run_in_threadpool

from gradstore.client.models import SelectionSummary
from gradstore.selection.overview import DEFAULT_BINS, selection_summary

from ..deps import SelectionsDep, StoreDep
from ..errors import error_responses
from .select import _ERRORS as SELECTION_ERRORS
from .select import cached_selection
from .stats import MAX_BINS

router = APIRouter(prefix="/v1/datastores/{name}", tags=["select"], responses=error_responses(400, 404, 503))


@router.get("/selections/{selection_id}/summary", response_model=SelectionSummary, responses=SELECTION_ERRORS,
            summary="Composition, score histogram and subtasks of a selection")
async def summary(store: StoreDep, selections: SelectionsDep, selection_id: str,
                  bins: Annotated[int, Query(ge=1, le=MAX_BINS)] = DEFAULT_BINS) -> SelectionSummary:
    entry = cached_selection(selections, store, selection_id)
    return await run_in_threadpool(selection_summary, entry.engine, entry.selection, store.name, selection_id, bins)
