"""OpenAI-style errors: every failure is {"error": {"message", "type", "param", "code"}} with
the matching HTTP status, and a message that names the field to fix.

    400 invalid_request_error   bad field, bad JSON
    400 context_length_exceeded prompt (+ max_tokens) over the context (OpenAI's code)
    401 invalid_api_key         missing or wrong Bearer token
    404 model_not_found         unknown model; unknown route (not_found)
    413 request_too_large       body over --max-request-body-bytes
    503 overloaded / draining / engine_dead   with Retry-After where retrying can help
    500 internal_error          a bug: logged with its traceback; the server keeps serving
"""

from __future__ import annotations

import http
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shardserve.errors import EngineDeadError, OverloadedError, ShardserveError

logger = logging.getLogger(__name__)

RETRY_AFTER_S = 1  # what a 503 tells a client to wait before trying again


class APIError(Exception):
    """An error to send as OpenAI error JSON."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | int | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def overloaded(message: str, code: str = "overloaded") -> APIError:
    return APIError(503, message, "overloaded", None, code, {"Retry-After": str(RETRY_AFTER_S)})


def from_exception(exc: BaseException) -> APIError:
    """Map any exception a handler can meet to the error the client should see."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, OverloadedError):
        return overloaded(exc.message)
    if isinstance(exc, EngineDeadError):
        return APIError(503, exc.message, exc.error_type, None, "engine_dead")
    if isinstance(exc, ShardserveError):
        return APIError(exc.http_status, exc.message, exc.error_type, exc.param,
                        exc.error_code or (exc.error_type if exc.http_status >= 500 else None))
    logger.error("Internal error", exc_info=exc)
    return APIError(500, f"Internal server error ({type(exc).__name__}); see the server log.",
                    "internal_error", None, "internal_error")


def validation_error(err: ValidationError, model: type[BaseModel] | None = None) -> APIError:
    """400 naming the first bad field, in a sentence (never pydantic's raw error list)."""
    errors = err.errors(include_url=False)
    if not errors:
        return APIError(400, "The request body is invalid.")
    first = errors[0]
    loc = first.get("loc", ())
    if not loc:
        return APIError(400, "The request body must be a JSON object.", param=None)
    field = str(loc[0])
    if first.get("type") == "missing" and len(loc) == 1:
        return APIError(400, f"Missing required field '{field}'.", param=field)
    same_field = [e for e in errors if e.get("loc", ())[:1] == (loc[0],)]
    got = _describe(first.get("input"))
    if len(same_field) > 1 and model is not None and field in model.model_fields:
        # A union (prompt, stop, ...): pydantic reports one error per branch; say what fits.
        expected = _type_name(model.model_fields[field].annotation)
        return APIError(400, f"Invalid value for '{field}': expected {expected}, got {got}.",
                        param=field)
    path = _path(loc)
    return APIError(400, f"Invalid value for '{path}': {first.get('msg', 'invalid')} (got {got}).",
                    param=field)


def _path(loc: tuple[Any, ...]) -> str:
    out = str(loc[0])
    for part in loc[1:]:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60] + '...' if len(text) > 60 else text}"


def _type_name(annotation: Any) -> str:
    return str(annotation).replace("typing.", "").replace("NoneType", "null")


def install_error_handlers(app: FastAPI) -> None:
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    async def shardserve_error(_: Request, exc: ShardserveError) -> JSONResponse:
        return from_exception(exc).response()

    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else None
        err = APIError(exc.status_code, _http_message(request, exc), "invalid_request_error",
                       None, code, dict(exc.headers or {}))
        return err.response()

    async def request_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        # Our endpoints validate bodies themselves; this covers query/path parameters.
        return APIError(400, _first_message(exc.errors())).response()

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(ShardserveError, shardserve_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, request_validation)
    app.add_middleware(_InternalErrors)


class _InternalErrors:
    """An exception no handler took becomes a 500 error JSON, and the connection stays usable.

    Not Starlette's handler for Exception: that one sends the 500 and then re-raises, so
    uvicorn closes the connection, and the client's next request on it (sent as soon as the 500
    arrived) fails with a connection reset. Mid-response (a stream) there is nothing to send
    instead: re-raise, and closing the connection tells the client."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_tracked)
        except Exception as exc:
            if started:
                raise
            await from_exception(exc).response()(scope, receive, send)


# OpenAI endpoints this server does not have (path prefix -> what they are), so that a client
# calling one learns that, rather than a bare "Not Found" that reads like a wrong base_url.
_NOT_SERVED = {
    "/v1/embeddings": "embeddings", "/v1/responses": "the Responses API",
    "/v1/audio": "audio", "/v1/images": "images", "/v1/moderations": "moderations",
    "/v1/files": "files", "/v1/batches": "batches", "/v1/fine_tuning": "fine-tuning",
    "/v1/assistants": "assistants", "/v1/threads": "threads",
    "/v1/vector_stores": "vector stores", "/v1/realtime": "the Realtime API",
    "/v1/uploads": "uploads",
}
_SERVED = "/v1/completions and /v1/chat/completions (with /v1/models, /tokenize, /detokenize)"


def _http_message(request: Request, exc: StarletteHTTPException) -> str:
    """Starlette's routing errors ("Not Found", "Method Not Allowed") in words that say what
    to change; any other HTTPException keeps its own detail."""
    method, path = request.method, request.url.path
    default = exc.detail == http.HTTPStatus(exc.status_code).phrase
    if exc.status_code == 405 and default:
        allowed = (exc.headers or {}).get("Allow", "")
        return f"Method {method} is not allowed on {path}" + (f"; use {allowed}." if allowed
                                                               else ".")
    if exc.status_code != 404 or not default:
        return str(exc.detail)
    for prefix, what in _NOT_SERVED.items():
        if path == prefix or path.startswith(prefix + "/"):
            return (f"This server does not serve {what} ({method} {path}): it generates text, "
                    f"at {_SERVED}.")
    # The commonest mistake: an OpenAI client's base_url without /v1.
    scope = {**request.scope, "path": "/v1" + path}
    if not path.startswith("/v1/") and any(
            route.matches(scope)[0] != Match.NONE for route in request.app.routes):
        return (f"Unknown route {path}: did you mean /v1{path}? An OpenAI client's base_url "
                "ends in /v1.")
    return f"Unknown route {method} {path}; this server generates text at {_SERVED}."


def _first_message(errors: Any) -> str:
    errors = list(errors)
    if not errors:
        return "The request is invalid."
    loc = [p for p in errors[0].get("loc", ()) if p != "body"]
    where = _path(tuple(loc)) if loc else "body"
    return f"Invalid value for '{where}': {errors[0].get('msg', 'invalid')}."
