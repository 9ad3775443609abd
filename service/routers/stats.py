"""Stats route: a datastore's examples per source and histograms of its per-example columns
(token length; per checkpoint loss, gradient norm and each stored quality score), computed by
``gradstore.selection.overview.store_stats``."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.concurrency import run_in_threadpool

from gradstore.client.models import DatastoreStats
from gradstore.selection.overview import DEFAULT_BINS, store_stats

from ..deps import StoreDep
from ..errors import error_responses

router = APIRouter(prefix="/v1/datastores/{name}", tags=["overview"], responses=error_responses(400, 404, 503))

MAX_BINS = 200


@router.get("/stats", response_model=DatastoreStats, summary="Examples per source and histograms of the columns")
async def stats(store: StoreDep,
                bins: Annotated[int, Query(ge=1, le=MAX_BINS, description="bins per histogram")] = DEFAULT_BINS
                ) -> DatastoreStats:
    return await run_in_threadpool(store_stats, store.engine, store.name, bins)
