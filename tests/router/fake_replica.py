"""A stand-in replica for router tests: /health, /metrics and /v1/* with switchable behaviour,
served by uvicorn on a thread of the test process (starts in well under a second)."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from tests.ports import free_port


class FakeReplica:
    """mode: 'ok' answers; '500' answers 500; 'break' streams two chunks then drops the
    connection (non-streamed: drops it before answering); 'hang' streams two chunks then goes
    silent (non-streamed: never answers); 'long' streams 200 chunks, 50 ms apart. hung: /health and
    /metrics never answer either. num_streams_closed counts streams that ended for any reason."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.healthy = True
        self.waiting = 0
        self.mode = "ok"
        self.hung = False
        self.num_streams_closed = 0
        self.num_requests = 0
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(self._app(), host="127.0.0.1", port=self.port,
                                                    log_level="error", access_log=False,
                                                    timeout_graceful_shutdown=1))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "FakeReplica":
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        assert self.server.started
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(5)

    def _app(self) -> FastAPI:
        app = FastAPI()

        @app.get("/health")
        async def health():
            while self.hung:
                await asyncio.sleep(0.1)
            return JSONResponse({"status": "ok" if self.healthy else "loading"},
                                status_code=200 if self.healthy else 503)

        @app.get("/metrics")
        async def metrics():
            while self.hung:
                await asyncio.sleep(0.1)
            return PlainTextResponse(
                "# TYPE shardserve:num_requests_running gauge\n"
                'shardserve:num_requests_running{model_name="m"} 0\n'
                "# TYPE shardserve:num_requests_waiting gauge\n"
                f'shardserve:num_requests_waiting{{model_name="m"}} {self.waiting}\n')

        @app.get("/v1/models")
        async def models():
            return {"object": "list", "data": [{"id": "m", "object": "model",
                                                "owned_by": self.name}]}

        @app.post("/v1/completions")
        async def completions(request: Request):
            self.num_requests += 1
            body = await request.json()
            if self.mode == "500":
                return JSONResponse({"error": {"message": "boom", "type": "internal_error",
                                               "param": None, "code": "internal_error"}},
                                    status_code=500)
            if self.mode == "hang" and not body.get("stream"):
                await asyncio.sleep(3600)
            if self.mode == "break" and not body.get("stream"):
                raise RuntimeError("dropped")  # uvicorn answers 500
            if not body.get("stream"):
                return {"object": "text_completion", "model": "m", "served_by": self.name,
                        "choices": [{"index": 0, "text": "ok", "finish_reason": "length"}]}

            async def events():
                num = 200 if self.mode == "long" else 3
                try:
                    for i in range(num):
                        chunk = {"choices": [{"index": 0, "text": f"t{i}", "finish_reason":
                                              "length" if i == num - 1 else None}],
                                 "served_by": self.name}
                        yield f"data: {json.dumps(chunk)}\n\n"
                        await asyncio.sleep(0.05)
                        if self.mode == "break" and i == 1:
                            raise RuntimeError("replica died mid-stream")
                        if self.mode == "hang" and i == 1:
                            await asyncio.sleep(3600)
                    yield "data: [DONE]\n\n"
                finally:
                    self.num_streams_closed += 1

            return StreamingResponse(events(), media_type="text/event-stream")

        return app
