"""Influence route: the most influential training examples of each target, one list per target.

The store's FAISS index answers with one inner-product search per target (its vectors are
``concat_c sqrt(w_c)·f_c``, so the inner product is the LESS influence). When the request
chooses its own checkpoints or weights, or the store has no index, the engine scores every
example exactly instead.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool

from gradstore.client.models import InfluenceRequest, InfluenceResponse, Neighbor, TargetInfluence

from ..deps import JsonBody, RegistryDep, SettingsDep, StoreDep, check_limit, check_weight_sum, resolve_targets
from gradstore.selection import TargetSet
from ..errors import error_responses
from ..registry import StoreHandle

router = APIRouter(prefix="/v1/datastores/{name}", tags=["influence"], responses=error_responses(400, 404, 503))


@router.post("/influence", response_model=InfluenceResponse, summary="Top-k influential examples per target",
             dependencies=[JsonBody], responses=error_responses(413, 415))
async def influence(body: InfluenceRequest, store: StoreDep, registry: RegistryDep,
                    settings: SettingsDep) -> InfluenceResponse:
    check_limit("k", body.k, settings.max_k)
    check_weight_sum(body.weights, body.checkpoints, store)
    targets = await resolve_targets(body.targets, store, registry, settings)
    exact, found = await run_in_threadpool(top_k, store, targets, body)
    results = [TargetInfluence(target=i, neighbors=neighbors(store, hits)) for i, hits in enumerate(found)]
    return InfluenceResponse(datastore=store.name, exact=exact, results=results)


def top_k(store: StoreHandle, targets: TargetSet, body: InfluenceRequest) -> tuple[bool, list[list[tuple[int, float]]]]:
    """``(exact, per-target [(row, score)])`` through the index when it can answer, else exactly."""
    overridden = body.checkpoints is not None or body.weights is not None
    if store.index is None or overridden:
        return True, store.exact_search(targets, body.k, body.checkpoints, body.weights)
    exact = store.manifest.index.kind == "flat"
    return exact, store.search(store.index_queries(targets), body.k)


def neighbors(store: StoreHandle, hits: list[tuple[int, float]]) -> list[Neighbor]:
    """Wire neighbours (with ids and sources) of ``(row, score)`` hits."""
    if not hits:
        return []
    ids, sources = store.engine.ids_and_sources([row for row, _ in hits])
    return [Neighbor(row=row, id=id_, source=source, score=score)
            for (row, score), id_, source in zip(hits, ids, sources)]
