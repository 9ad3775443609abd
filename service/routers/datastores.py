"""Datastore routes: list the stores, describe one, read one stored example."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool

from gradstore.client.models import DatastoreDetail, DatastoreList, DatastoreSummary, Example
from gradstore.selection.overview import datastore_detail, example_model, summary_fields, with_scores

from ..deps import RegistryDep, StoreDep
from ..errors import ServiceError, error_responses
from ..registry import DatastoreRegistry

router = APIRouter(prefix="/v1/datastores", tags=["datastores"])

# A route on one datastore: a bad name, no such store, a store that cannot be opened.
STORE_ERRORS = error_responses(400, 404, 503)


@router.get("", response_model=DatastoreList, summary="List the datastores (those that open)")
def list_datastores(registry: RegistryDep) -> DatastoreList:
    return DatastoreList(datastores=_summaries(registry))


def _summaries(registry: DatastoreRegistry) -> list[DatastoreSummary]:
    summaries = []
    for name in registry.names():
        try:
            manifest = registry.manifest(name)
        except ServiceError:
            continue  # unreadable stores are reported by /readyz
        summaries.append(DatastoreSummary(**summary_fields(name, manifest)))
    return summaries


@router.get("/{name}", response_model=DatastoreDetail, summary="Describe a datastore", responses=STORE_ERRORS)
def get_datastore(store: StoreDep) -> DatastoreDetail:
    return datastore_detail(store.name, store.manifest)


@router.get("/{name}/examples/{id:path}", response_model=Example, summary="One stored example by id",
            responses=STORE_ERRORS)
async def get_example(store: StoreDep, id: str) -> Example:
    row = await run_in_threadpool(store.store.row_of, id)
    columns = await run_in_threadpool(store.store.example, row)
    return (await run_in_threadpool(with_scores, store.engine, [example_model(columns)]))[0]

