"""Datastore routes: list the stores, describe one, read one stored example."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool

from gradstore.client.models import CheckpointSummary, DatastoreDetail, DatastoreList, DatastoreSummary, Example
from gradstore.indexer.datastore import Manifest
from gradstore.selection.overview import example_model, with_scores

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
        summaries.append(DatastoreSummary(**_summary_fields(name, manifest)))
    return summaries


def _summary_fields(name: str, manifest: Manifest) -> dict:
    return dict(
        name=name, examples=manifest.counts.examples, dim=manifest.features.dim,
        checkpoints=[CheckpointSummary(name=c.name, weight=c.weight, learning_rate=c.learning_rate)
                     for c in manifest.checkpoints],
        gradient_type=manifest.gradient_type,
        index=manifest.index.kind if manifest.index is not None else None,
    )


@router.get("/{name}", response_model=DatastoreDetail, summary="Describe a datastore", responses=STORE_ERRORS)
def get_datastore(store: StoreDep) -> DatastoreDetail:
    m = store.manifest
    return DatastoreDetail(
        **_summary_fields(store.name, m), sources=m.counts.by_source, model=m.model.model_dump(),
        lora=m.lora.model_dump(), projection=m.projection, tokens=m.tokens, created_at=m.created_at,
        gradstore_version=m.gradstore_version,
    )


@router.get("/{name}/examples/{id:path}", response_model=Example, summary="One stored example by id",
            responses=STORE_ERRORS)
async def get_example(store: StoreDep, id: str) -> Example:
    row = await run_in_threadpool(store.store.row_of, id)
    columns = await run_in_threadpool(store.store.example, row)
    return (await run_in_threadpool(with_scores, store.store, [example_model(columns)]))[0]

