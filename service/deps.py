"""FastAPI dependencies shared by the routers: settings, registry, selection cache, a store by
name, API-key authentication, and the target resolution and limit checks of the query routes.

The app keeps its state on ``app.state`` (set up by ``create_app`` and its lifespan); these
functions hand it to the routes, so tests can build several apps side by side.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, Path, Request, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.security import APIKeyHeader

from gradstore.client.models import TargetDatastore, TargetRecords, Targets

from .engine import TargetSet
from .errors import ServiceError, invalid_query, limit_exceeded
from .registry import DatastoreRegistry, SelectionCache, StoreHandle
from .settings import Settings


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_registry(request: Request) -> DatastoreRegistry:
    return request.app.state.registry


def get_selections(request: Request) -> SelectionCache:
    return request.app.state.selections


SettingsDep = Annotated[Settings, Depends(get_settings)]
RegistryDep = Annotated[DatastoreRegistry, Depends(get_registry)]
SelectionsDep = Annotated[SelectionCache, Depends(get_selections)]


def get_store(registry: RegistryDep,
              name: Annotated[str, Path(description="datastore name (a folder under the service root)")]
              ) -> StoreHandle:
    """The datastore named in the path, loaded (sync: runs in the threadpool, loading reads files)."""
    return registry.get(name)


StoreDep = Annotated[StoreHandle, Depends(get_store)]


def api_key_auth(header_name: str) -> Callable:
    """A dependency accepting requests whose ``header_name`` holds one of ``app.state.api_keys``.

    With auth disabled (``app.state.api_keys`` is None) every request passes.
    """
    scheme = APIKeyHeader(name=header_name, auto_error=False, scheme_name="ApiKey",
                          description="an API key configured with --api-key or --api-key-file")

    def require_api_key(request: Request, key: str | None = Security(scheme)) -> None:
        keys = request.app.state.api_keys
        if keys is None:
            return
        if key is None:
            raise _unauthorized(f"missing API key: send it in the {header_name} header")
        if not _matches(key, keys):
            raise _unauthorized("invalid API key")

    return require_api_key


def _matches(key: str, keys: frozenset[str]) -> bool:
    """Constant-time comparison against every key (no early exit)."""
    given = key.encode()
    found = False
    for candidate in keys:
        found |= secrets.compare_digest(given, candidate.encode())
    return found


def _unauthorized(message: str) -> ServiceError:
    return ServiceError(401, "unauthorized", message, headers={"WWW-Authenticate": "ApiKey"})


# -- request helpers shared by the query routers --------------------------------------------------


async def resolve_targets(spec: Targets, store: StoreHandle, registry: DatastoreRegistry,
                          settings: Settings) -> TargetSet:
    """The request's targets as a :class:`TargetSet` for ``store``, within ``max_targets``.

    Records are featurised with the store's model (loaded on first use), another datastore's
    examples are read from it, raw vectors are validated (finite, the store's dimension).
    """
    if isinstance(spec, TargetRecords):
        check_limit("targets", len(spec.records), settings.max_targets)
        featurizer = await run_in_threadpool(store.featurizer)
        return await run_in_threadpool(featurizer.featurize, spec.records, spec.subtask_field)
    if isinstance(spec, TargetDatastore):
        source = await run_in_threadpool(registry.get, spec.datastore)
        check_limit("targets", source.store.num_examples, settings.max_targets)
        return await run_in_threadpool(TargetSet.from_datastore, source.store, spec.subtask_field)
    check_limit("targets", max(len(rows) for rows in spec.vectors.values()), settings.max_targets)
    check_checkpoints(spec.vectors, store)
    return await run_in_threadpool(TargetSet.from_vectors, spec.vectors, spec.subtasks, store.store.dim)


def check_limit(name: str, value: int, limit: int) -> None:
    if value > limit:
        raise limit_exceeded(name, value, limit)


def check_checkpoints(names, store: StoreHandle) -> None:
    """Vectors must be keyed by the store's checkpoint names."""
    known = store.store.checkpoint_names
    unknown = [name for name in names if name not in known]
    if unknown:
        raise invalid_query(f"unknown checkpoint {unknown[0]!r}: the datastore has {known}",
                            {"checkpoint": unknown[0], "checkpoints": known})
