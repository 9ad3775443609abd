"""Selection routes: run a selection (any strategy), page through it by cursor, download its export.

A selection is identified by ``selection_id``, the SHA-256 of the canonical request (without
``page_size`` and ``export``), the datastore's name, creation time and version (and the target
store's, for datastore targets): the same request on the same version gives the same id, and a new
version of the store (an append, a removal) a new one. Finished selections are kept in an
LRU cache; a cursor (opaque, URL-safe) names a selection and an offset in it. A selection that
left the cache answers 410 ``selection_expired``: repeat the select request.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse

from gradstore.client.models import ErrorBody, SelectedExample, SelectPage, SelectRequest, TargetDatastore
from gradstore.selection.options import ExportFormat

from ..deps import (JsonBody, RegistryDep, SelectionsDep, SettingsDep, StoreDep, check_limit, check_weight_sum,
                    resolve_targets)
from ..errors import ServiceError, error_responses
from ..registry import CachedSelection, DatastoreRegistry, SelectionCache, StoreHandle
from ..settings import Settings

router = APIRouter(prefix="/v1/datastores/{name}", tags=["select"], responses=error_responses(400, 404, 503))

MEDIA_TYPES = {"jsonl": "application/x-ndjson", "parquet": "application/vnd.apache.parquet"}
SELECTION_ID = re.compile(r"^[0-9a-f]{64}$")
DEFAULT_PAGE_SIZE = 1000
_ERRORS = {410: {"model": ErrorBody, "description": "the selection is no longer cached (`selection_expired`)"}}


@router.post("/select", response_model=SelectPage, summary="Select training examples with a strategy",
             dependencies=[JsonBody], responses=error_responses(413, 415))
async def select(body: SelectRequest, store: StoreDep, registry: RegistryDep, settings: SettingsDep,
                 selections: SelectionsDep) -> SelectPage:
    """Run the request's strategy (``less`` by default; ``GET /v1/strategies`` lists them) on the
    store's pool after the filters and select ``k`` (or ``fraction``) examples under the caps;
    returns the first page and a cursor for the rest."""
    if body.k is not None:
        check_limit("k", body.k, settings.max_k)
    check_limit("page_size", body.page_size, settings.max_page_size)
    check_weight_sum(getattr(body.strategy, "weights", None), getattr(body.strategy, "checkpoints", None), store)
    selection_id = await run_in_threadpool(selection_key, body, store, registry)
    entry = selections.get(selection_id)
    if entry is None or entry.datastore != store.name:
        entry = await _run_selection(body, selection_id, store, registry, settings)
        selections.put(entry)
    export_path = None
    if body.export is not None:
        export_path = await run_in_threadpool(ensure_export, entry, body.export, settings)
    page = make_page(entry, 0, body.page_size)
    page.export_path = None if export_path is None else str(export_path)
    return page


async def _run_selection(body: SelectRequest, selection_id: str, store: StoreHandle,
                         registry: DatastoreRegistry, settings: Settings) -> CachedSelection:
    targets = None if body.targets is None else await resolve_targets(body.targets, store, registry, settings)
    selection = await run_in_threadpool(store.engine.select, targets, body.options())
    return CachedSelection(selection_id=selection_id, datastore=store.name, selection=selection, engine=store.engine)


def selection_key(body: SelectRequest, store: StoreHandle, registry: DatastoreRegistry) -> str:
    """The deterministic selection id of a request on a store (see the module docstring)."""
    request = body.model_dump(mode="json", exclude={"page_size", "export"})
    request["targets_kind"] = type(body.targets).__name__
    key = {"request": request, "datastore": store.name, "created_at": store.manifest.created_at,
           "version": store.manifest.version}
    if isinstance(body.targets, TargetDatastore):
        targets = registry.manifest(body.targets.datastore)
        key["targets_created_at"], key["targets_version"] = targets.created_at, targets.version
    canonical = json.dumps(key, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


@router.get("/selections/{selection_id}", response_model=SelectPage, responses=_ERRORS,
            summary="A page of a selection, from a cursor")
def get_selection_page(store: StoreDep, selections: SelectionsDep, settings: SettingsDep, selection_id: str,
                       cursor: Annotated[str | None, Query(description="next_cursor of the previous page")] = None,
                       page_size: Annotated[int, Query(ge=1)] = DEFAULT_PAGE_SIZE) -> SelectPage:
    check_limit("page_size", page_size, settings.max_page_size)
    offset = 0
    if cursor is not None:
        cursor_id, offset = decode_cursor(cursor)
        if cursor_id != selection_id:
            raise ServiceError(400, "invalid_cursor", "the cursor belongs to another selection",
                               {"selection_id": selection_id})
    entry = cached_selection(selections, store, selection_id)
    if offset > len(entry.selection):
        raise ServiceError(400, "invalid_cursor", f"cursor offset {offset} is past the end of the selection "
                           f"({len(entry.selection)} examples)")
    return make_page(entry, offset, page_size)


@router.get("/selections/{selection_id}/export", response_class=FileResponse, responses=_ERRORS,
            summary="Download the selected records in their original form")
def export_selection(store: StoreDep, selections: SelectionsDep, settings: SettingsDep, selection_id: str,
                     format: Annotated[ExportFormat | None, Query(description="default: the format exported "
                                                                              "with the selection, else jsonl")]
                     = None) -> FileResponse:
    entry = cached_selection(selections, store, selection_id)
    fmt = format or next(iter(entry.exports), "jsonl")
    path = ensure_export(entry, fmt, settings)
    return FileResponse(path, media_type=MEDIA_TYPES[fmt], filename=path.name)


def cached_selection(selections: SelectionCache, store: StoreHandle, selection_id: str) -> CachedSelection:
    if not SELECTION_ID.match(selection_id):
        raise ServiceError(400, "invalid_selection_id", f"{selection_id!r} is not a selection id")
    entry = selections.get(selection_id)
    if entry is None or entry.datastore != store.name:
        raise ServiceError(410, "selection_expired",
                           f"selection {selection_id} is no longer cached; repeat the select request "
                           f"(the same request gives the same selection)",
                           {"selection_id": selection_id, "datastore": store.name})
    return entry


def ensure_export(entry: CachedSelection, fmt: str, settings: Settings):
    """The export file of a selection in ``fmt``, written on first request."""
    path = entry.exports.get(fmt)
    if path is None or not path.is_file():
        path = entry.engine.export(entry.selection, settings.export_dir / f"{entry.selection_id}.{fmt}", fmt)
        entry.exports[fmt] = path
    return path


def make_page(entry: CachedSelection, offset: int, page_size: int) -> SelectPage:
    selection = entry.selection
    stop = min(offset + page_size, len(selection))
    items = [SelectedExample(**item) for item in selection.items(offset, stop)]
    return SelectPage(datastore=entry.datastore, selection_id=entry.selection_id, total=len(selection),
                      pool=selection.pool, strategy=selection.strategy, report=selection.report, items=items,
                      next_cursor=encode_cursor(entry.selection_id, stop) if stop < len(selection) else None)


def encode_cursor(selection_id: str, offset: int) -> str:
    raw = json.dumps({"selection_id": selection_id, "offset": offset}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[str, int]:
    try:
        data = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        selection_id, offset = data["selection_id"], data["offset"]
    except (ValueError, binascii.Error, TypeError, KeyError):
        raise ServiceError(400, "invalid_cursor", "the cursor is not one this service issued") from None
    if not isinstance(selection_id, str) or not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
        raise ServiceError(400, "invalid_cursor", "the cursor is not one this service issued")
    return selection_id, offset
