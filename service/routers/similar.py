"""Similar route: the training examples nearest to one example of the store, or to given vectors.

Similarity is the same weighted inner product as influence, ``Σ_c w_c · f_c(x)·f_c(y)`` with the
manifest's weights, answered by the FAISS index (exactly by the engine when the store has none).
The query example itself is left out unless ``include_self``.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool

from gradstore.client.models import SimilarRequest, SimilarResponse

from ..deps import JsonBody, SettingsDep, StoreDep, check_checkpoints, check_limit, vectors_target_set
from ..errors import error_responses
from ..registry import StoreHandle
from .influence import neighbors

router = APIRouter(prefix="/v1/datastores/{name}", tags=["similar"], responses=error_responses(400, 404, 503))


@router.post("/similar", response_model=SimilarResponse, summary="Nearest training examples",
             dependencies=[JsonBody], responses=error_responses(413, 415))
async def similar(body: SimilarRequest, store: StoreDep, settings: SettingsDep) -> SimilarResponse:
    check_limit("k", body.k, settings.max_k)
    if body.vectors is not None:
        check_checkpoints(body.vectors, store)
    hits = await run_in_threadpool(nearest, store, body)
    return SimilarResponse(datastore=store.name, neighbors=neighbors(store, hits))


def nearest(store: StoreHandle, body: SimilarRequest) -> list[tuple[int, float]]:
    if body.id is not None:
        row = store.store.row_of(body.id)
        query = store.row_vector(row)
    else:
        row = None
        query = vectors_target_set("vectors", {name: [vector] for name, vector in body.vectors.items()}, None,
                                   store.store.dim)
    wanted = body.k if body.include_self or row is None else body.k + 1
    if store.index is None:
        hits = store.exact_search(query, wanted)[0]
    else:
        hits = store.search(store.index_queries(query), wanted)[0]
    if not body.include_self and row is not None:
        hits = [hit for hit in hits if hit[0] != row]
    return hits[:body.k]
