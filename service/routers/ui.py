"""The web UI: static pages at ``/ui/`` and the one thing they need before a key, ``/ui/config.json``.

The pages (``service/static/ui/``, shipped as package data and read with ``importlib.resources``,
so they come from the installed package) are plain HTML and JavaScript with the vendored uPlot
chart library; they call the ``/v1`` API like any client, with the key the user types in, kept
in the browser's ``sessionStorage`` and sent as the API-key header. Nothing here needs a key:
the files are public, and ``config.json`` tells the page whether it must ask for one.
"""

from __future__ import annotations

import mimetypes
from importlib import resources
from importlib.resources.abc import Traversable

from fastapi import APIRouter, Request, Response
from fastapi.responses import RedirectResponse

from gradstore import __version__
from gradstore.client.models import UIConfig

from ..errors import ServiceError

router = APIRouter(tags=["ui"])

# The pages load only their own files and call only this service.
CONTENT_SECURITY_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
                           "img-src 'self' data: blob:; connect-src 'self'; frame-ancestors 'none'")
MEDIA_TYPES = {".js": "text/javascript", ".css": "text/css", ".html": "text/html", ".png": "image/png",
               ".svg": "image/svg+xml", ".txt": "text/plain"}


def static_root() -> Traversable:
    """The UI's files inside the installed package."""
    return resources.files("gradstore.service").joinpath("static", "ui")


@router.get("/ui/config.json", response_model=UIConfig, summary="What the web UI needs before it has a key")
def ui_config(request: Request) -> UIConfig:
    settings = request.app.state.settings
    return UIConfig(auth_required=request.app.state.api_keys is not None, api_key_header=settings.api_key_header,
                    version=__version__)


@router.get("/ui", include_in_schema=False)
def ui_root() -> RedirectResponse:
    return RedirectResponse("/ui/", status_code=307)


@router.get("/ui/{path:path}", include_in_schema=False)
def ui_file(path: str) -> Response:
    file = static_file(path or "index.html")
    suffix = "." + file.name.rpartition(".")[2]
    media_type = MEDIA_TYPES.get(suffix) or mimetypes.guess_type(file.name)[0] or "application/octet-stream"
    return Response(file.read_bytes(), media_type=media_type,
                    headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY, "Cache-Control": "no-cache",
                             "X-Content-Type-Options": "nosniff"})


def static_file(path: str) -> Traversable:
    """The UI file at ``path`` (404 for anything else: no hidden names, no ``..``)."""
    parts = path.split("/")
    if any(not part or part.startswith(".") for part in parts):
        raise _not_found(path)
    file = static_root()
    for part in parts:
        file = file.joinpath(part)
    if not file.is_file():
        raise _not_found(path)
    return file


def _not_found(path: str) -> ServiceError:
    return ServiceError(404, "not_found", f"no UI file {path!r}", {"path": path})
