"""The web console at ``/console``: static files (``static/``, shipped in the package;
nothing from a CDN at run time) that call the public API with the user's key.  The
page itself is public, as the login form must be; every call it makes is authenticated
as any other.  A strict Content-Security-Policy: only this origin's scripts, styles and
connections, never framed."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.responses import Response
from starlette.types import Scope

STATIC = Path(__file__).parent / "static"
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
    "img-src 'self' data: blob:; connect-src 'self'; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


@router.get("/console")
@router.get("/console/")
async def console() -> FileResponse:
    return FileResponse(STATIC / "index.html", headers=HEADERS)


class _Static(StaticFiles):
    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(HEADERS)
        return response


def install(app: FastAPI) -> None:
    app.include_router(router)
    app.mount("/console/static", _Static(directory=STATIC), name="console")
