"""FastAPI dependencies shared by the routers: settings, registry, selection cache, a store by
name, API-key authentication, the checks of JSON request bodies, and the target resolution and
limit checks of the query routes.

The app keeps its state on ``app.state`` (set up by ``create_app`` and its lifespan); these
functions hand it to the routes, so tests can build several apps side by side.
"""

from __future__ import annotations

import json
import math
import re
import secrets
from collections.abc import Callable
from email.message import Message
from typing import Annotated, Any

from fastapi import Depends, Path, Request, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.security import APIKeyHeader

from gradstore.client.models import TargetDatastore, TargetRecords, Targets
from gradstore.indexer.corpus import validate_record
from gradstore.indexer.errors import BadRecordError

from gradstore.selection import SelectionError, TargetSet
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
            raise _unauthorized(f"invalid API key in the {header_name} header")

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


# -- JSON request bodies ----------------------------------------------------------------------------

# A \uD800-\uDFFF escape: only such a body can decode to a lone surrogate (JSON allows one, but it
# is no Unicode character, so it can be neither a name, a path nor a response).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


async def require_json_body(request: Request) -> None:
    """Refuse a body that is not JSON (415 ``unsupported_media_type``) or whose strings are not
    valid Unicode (422 ``validation_error`` at the first lone surrogate).

    FastAPI would otherwise hand a ``text/plain`` body to the model as bytes ("Input should be a
    valid dictionary") and echo lone surrogates into names, paths and responses.
    """
    body = await request.body()
    if not body:
        return  # nothing sent: the body model says what is missing
    content_type = request.headers.get("content-type")
    if not _is_json(content_type):
        raise ServiceError(415, "unsupported_media_type",
                           f"the request body must be JSON: send the header Content-Type: application/json "
                           f"(got {content_type!r})", {"header": "Content-Type", "value": content_type})
    if _SURROGATE_ESCAPE.search(body):
        _check_unicode(body)


def _is_json(content_type: str | None) -> bool:
    if not content_type:
        return False
    message = Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (subtype == "json" or subtype.endswith("+json"))


def _check_unicode(body: bytes) -> None:
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return  # FastAPI already refused a body that does not parse
    location = _lone_surrogate_at(data)
    if location is not None:
        where = ".".join(str(part) for part in location)
        raise ServiceError(422, "validation_error",
                           f"invalid request: {where}: the string contains a lone UTF-16 surrogate (\\ud800-\\udfff), "
                           f"which is not a Unicode character",
                           [{"loc": location, "msg": "lone UTF-16 surrogate in a string", "type": "unicode_surrogate"}])


def _lone_surrogate_at(data: Any) -> list | None:
    """The location (``["body", key or index, ...]``) of a string, key or value, in the parsed
    body that holds a lone surrogate; walked without recursion, however deep the nesting."""
    pending = [(data, ["body"])]
    while pending:
        value, location = pending.pop()
        if isinstance(value, str) and _has_surrogate(value):
            return location
        if isinstance(value, dict):
            for key, item in value.items():
                if _has_surrogate(key):
                    return location + [key]
                pending.append((item, location + [key]))
        elif isinstance(value, list):
            pending.extend((item, location + [index]) for index, item in enumerate(value))
    return None


def _has_surrogate(text: str) -> bool:
    return any("\ud800" <= char <= "\udfff" for char in text)


JsonBody = Depends(require_json_body)


# -- request helpers shared by the query routers --------------------------------------------------


async def resolve_targets(spec: Targets, store: StoreHandle, registry: DatastoreRegistry,
                          settings: Settings) -> TargetSet:
    """The request's targets as a :class:`TargetSet` for ``store``, within ``max_targets``.

    Records are featurised with the store's model (loaded on first use), another datastore's
    examples are read from it, raw vectors are validated (finite, the store's dimension).
    """
    if isinstance(spec, TargetRecords):
        check_limit("targets", len(spec.records), settings.max_targets)
        check_records(spec.records, settings.max_target_record_chars)
        featurizer = await run_in_threadpool(store.featurizer)
        return await run_in_threadpool(featurizer.featurize, spec.records, spec.subtask_field)
    if isinstance(spec, TargetDatastore):
        source = await run_in_threadpool(registry.get, spec.datastore)
        check_limit("targets", source.store.num_examples, settings.max_targets)
        return await run_in_threadpool(TargetSet.from_datastore, source.store, spec.subtask_field)
    check_limit("targets", max(len(rows) for rows in spec.vectors.values()), settings.max_targets)
    check_checkpoints(spec.vectors, store)
    return await run_in_threadpool(vectors_target_set, "targets.vectors", spec.vectors, spec.subtasks, store.store.dim)


def vectors_target_set(field: str, vectors: dict, subtasks: list[str] | None, dim: int) -> TargetSet:
    """``TargetSet.from_vectors`` with its errors (NaN, infinity, wrong dimension, ragged rows)
    answered as 422 ``invalid_query`` naming the request field."""
    try:
        return TargetSet.from_vectors(vectors, subtasks, dim)
    except SelectionError as err:
        raise invalid_query(f"{field}: {err}", {"field": field}) from None


def check_limit(name: str, value: int, limit: int) -> None:
    if value > limit:
        raise limit_exceeded(name, value, limit)


def check_weight_sum(weights: dict[str, float] | None, checkpoints: list[str] | None, store: StoreHandle) -> None:
    """The weights used are divided by their sum: refuse finite weights whose sum overflows to
    infinity (``1e308 + 1e308``), which would scale every weight to 0."""
    if not weights:
        return
    used = [weights[name] for name in checkpoints or store.store.checkpoint_names if name in weights]
    if all(math.isfinite(weight) for weight in used) and not math.isfinite(sum(used)):
        raise invalid_query("weights: their sum overflows a float; scale them down (only their ratios matter)",
                            {"field": "weights"})


def check_records(records: list[dict], max_chars: int) -> None:
    """Target records must be corpus records of at most ``max_chars`` characters of text: checked
    before the store's model (possibly many GB) is loaded and before anything is tokenised (a
    6 MB record takes seconds to tokenise, then is truncated to the store's maximum length)."""
    for index, record in enumerate(records):
        chars = text_chars(record)
        if chars > max_chars:
            raise ServiceError(400, "limit_exceeded", f"targets.records[{index}]: {chars} characters of text "
                               f"exceed the limit of {max_chars} per target record",
                               {"limit": "max_target_record_chars", "value": chars, "max": max_chars,
                                "field": f"targets.records[{index}]"})
        try:
            validate_record(record, f"targets.records[{index}]")
        except BadRecordError as err:
            raise invalid_query(str(err), {"field": f"targets.records[{index}]"}) from None


def text_chars(value: Any) -> int:
    """Characters in every string (keys included) of a parsed JSON value, walked without recursion."""
    total, pending = 0, [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            total += len(item)
        elif isinstance(item, dict):
            total += sum(len(key) for key in item)
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return total


def check_checkpoints(names, store: StoreHandle) -> None:
    """Vectors must be keyed by the store's checkpoint names."""
    known = store.store.checkpoint_names
    unknown = [name for name in names if name not in known]
    if unknown:
        raise invalid_query(f"unknown checkpoint {unknown[0]!r}: the datastore has {known}",
                            {"checkpoint": unknown[0], "checkpoints": known})
