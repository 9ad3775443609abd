"""Examples route: page through a datastore's stored examples in row order, or through those
whose id or record text contains a query (``gradstore.selection.overview.example_page``).

One example by id is ``GET /v1/datastores/{name}/examples/{id}`` (the ``datastores`` router).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.concurrency import run_in_threadpool

from gradstore.client.models import ExamplePage
from gradstore.selection.overview import example_page

from ..deps import StoreDep
from ..errors import error_responses

router = APIRouter(prefix="/v1/datastores/{name}", tags=["overview"], responses=error_responses(400, 404, 503))

MAX_LIMIT = 200
MAX_QUERY = 200


@router.get("/examples", response_model=ExamplePage, summary="A page of stored examples, optionally searched")
async def list_examples(
    store: StoreDep,
    offset: Annotated[int, Query(ge=0, description="examples to skip")] = 0,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT, description="examples in the page")] = 20,
    q: Annotated[str | None, Query(max_length=MAX_QUERY,
                                   description="only examples whose id or record text contains this "
                                               "(case-insensitive)")] = None,
) -> ExamplePage:
    return await run_in_threadpool(example_page, store.engine, store.name, offset, limit, q)
