"""Map route: 2-D PCA coordinates of a seeded sample of a datastore's examples, computed from the
stored features, with given rows (a selection) and targets placed on the same axes
(``gradstore.selection.overview.pool_map``)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool

from gradstore.client.models import MapRequest, MapResponse
from gradstore.selection.overview import pool_map

from ..deps import JsonBody, RegistryDep, SettingsDep, StoreDep, check_limit, resolve_targets
from ..errors import error_responses, invalid_query

router = APIRouter(prefix="/v1/datastores/{name}", tags=["overview"], responses=error_responses(400, 404, 503))



@router.post("/map", response_model=MapResponse, summary="2-D PCA map of the pool, with rows and targets",
             dependencies=[JsonBody], responses=error_responses(413, 415))
async def pool_map_route(body: MapRequest, store: StoreDep, registry: RegistryDep,
                         settings: SettingsDep) -> MapResponse:
    check_limit("rows", len(body.rows), settings.max_k)
    last = store.store.num_rows - 1
    bad = next((row for row in body.rows if not 0 <= row <= last), None)
    if bad is not None:
        raise invalid_query(f"rows: {bad} is not a row of datastore {store.name!r} (0..{last})", {"field": "rows"})
    targets = None if body.targets is None else await resolve_targets(body.targets, store, registry, settings)
    return await run_in_threadpool(pool_map, store.engine, store.name, body.sample, body.seed, body.rows, targets)
