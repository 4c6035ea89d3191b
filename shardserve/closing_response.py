"""A streaming HTTP response that always runs an `on_close` callback, however the stream ends:
finished, broken, the client gone, or cancelled before it started. The server uses it to abort
what is left of a request; the router to close the upstream and drop its in-flight counts."""

from __future__ import annotations

from typing import Any, Awaitable, Callable

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send


class ClosingStreamingResponse(StreamingResponse):
    def __init__(self, content: Any, on_close: Callable[[], Awaitable[None]], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._on_close()
