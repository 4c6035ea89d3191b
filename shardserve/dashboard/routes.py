"""Mounts the dashboard on a FastAPI app (the server's or the router's):

    GET /dashboard                the page (static HTML; public: it holds no data and no key)
    GET /dashboard/static/NAME    its JavaScript and CSS, shipped inside the package (no CDN)
    GET /dashboard/data           the numbers, as JSON; behind --api-key like /v1

The page's Content-Security-Policy allows scripts, styles and fetches from this origin only, so
nothing it shows can load or send anything elsewhere.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from importlib import resources
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response

_STATIC = resources.files("shardserve.dashboard") / "static"
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8"}
_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "img-src 'self' data:; connect-src 'self'; base-uri 'none'; "
                               "form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def _static_files() -> dict[str, tuple[bytes, str]]:
    """Every shipped asset, read once: name -> (bytes, content type)."""
    out = {}
    for entry in _STATIC.iterdir():
        suffix = "." + entry.name.rpartition(".")[2]
        if entry.is_file() and suffix in _TYPES:
            out[entry.name] = (entry.read_bytes(), _TYPES[suffix])
    return out


def finite(value: Any) -> Any:
    """`value` with NaN and infinities as None: JSON has no such numbers."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def _mount_page(app: FastAPI) -> None:
    files = _static_files()

    @app.get("/dashboard", include_in_schema=False)
    async def dashboard_page() -> Response:
        body, media_type = files["index.html"]
        return Response(body, media_type=media_type, headers=_HEADERS)

    @app.get("/dashboard/static/{name}", include_in_schema=False)
    async def dashboard_static(name: str) -> Response:
        if name not in files or name == "index.html":  # a fixed set: no path tricks possible
            return JSONResponse({"error": "not found"}, status_code=404)
        body, media_type = files[name]
        return Response(body, media_type=media_type, headers=_HEADERS)


def mount_server_dashboard(app: FastAPI, state: Any,
                           require_api_key: Callable[..., Any] | None = None) -> None:
    """The server's dashboard; `require_api_key` is the same dependency /v1 uses."""
    from shardserve.dashboard.server_view import ServerDashboard

    _mount_page(app)
    view = ServerDashboard(state)
    deps = [Depends(require_api_key)] if require_api_key is not None else []

    @app.get("/dashboard/data", dependencies=deps, include_in_schema=False)
    async def dashboard_data() -> Response:
        return JSONResponse(finite(view.data()), headers={"Cache-Control": "no-store"})


def mount_router_dashboard(app: FastAPI, pool: Any) -> None:
    """The router's dashboard over the replicas in `pool` (router.backends.BackendPool)."""
    from shardserve.dashboard.router_view import ReplicaAuthError, RouterDashboard

    _mount_page(app)
    view = RouterDashboard(pool)

    @app.get("/dashboard/data", include_in_schema=False)
    async def dashboard_data(request: Request) -> Response:
        try:
            body = await view.data(request.headers.get("authorization"))
        except ReplicaAuthError:
            return JSONResponse(
                {"error": {"message": "A replica refused the API key: send the header "
                                      "'Authorization: Bearer <key>' the replicas expect.",
                           "type": "invalid_request_error", "param": None,
                           "code": "invalid_api_key"}},
                status_code=401, headers={"WWW-Authenticate": "Bearer"})
        return JSONResponse(finite(body), headers={"Cache-Control": "no-store"})
