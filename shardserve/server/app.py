"""The FastAPI app and `shardserve serve`.

Start-up: the port opens at once and the model loads in the background, so probes see
/live 200 (alive) and /health 503 (not ready) while a big model loads, then /health 200.
If loading fails the server exits 1.

SIGTERM (Kubernetes' stop): /health turns 503 and new /v1 requests get 503 at once, requests
in flight run to the end (up to --shutdown-timeout; those still running then end with an
error: a stream's error event and [DONE], or a 503), then the engine stops and the process
exits 0. A second SIGTERM, or SIGINT, stops without waiting, ending requests the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import logging
import os
import signal
import socket
from collections.abc import AsyncIterator
from types import FrameType

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from shardserve import __version__
from shardserve.dashboard import mount_server_dashboard
from shardserve.engine.async_llm import AsyncLLM
from shardserve.executor.profiler import PROFILER_DIR_ENV
from shardserve.server.args import API_KEY_ENV, ServerArgs
from shardserve.server.listen import bound_port, serving_socket
from shardserve.server.errors import APIError, install_error_handlers
from shardserve.server.metrics import CONTENT_TYPE, ServerMetrics
from shardserve.server.protocol import (DetokenizeResponse, ModelCard, ModelList,
                                        TokenizeResponse)
from shardserve.server.serving_chat import create_chat_completion
from shardserve.server.serving_completions import create_completion
from shardserve.server.serving_tokenize import detokenize, tokenize
from shardserve.server.state import ServerState

logger = logging.getLogger(__name__)

# Once the server stops (drained, drain timed out, SIGINT, a second SIGTERM), how long uvicorn
# waits for connections still open. Every generation request has been answered or aborted by
# then, so what is left is quick (an error event being sent) or a client that stopped reading;
# --shutdown-timeout again here would double the bound on the time to exit.
_STOP_GRACE_S = 5


def build_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="shardserve", version=__version__, lifespan=_lifespan,
                  docs_url=None, redoc_url=None)
    app.state.server = state
    install_error_handlers(app)
    state.args.cors.install(app)

    @app.get("/health")
    async def health() -> Response:
        if state.ready:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": _phase(state)}, status_code=503)

    # vLLM's /ping (SageMaker's health route): the same answer as /health, for GET and POST.
    app.add_api_route("/ping", health, methods=["GET", "POST"])

    @app.get("/live")
    async def live() -> Response:
        if state.engine.is_alive and state.startup_error is None:
            return JSONResponse({"status": "alive"})
        return JSONResponse({"status": "dead", "reason": state.engine.dead_reason
                             or state.startup_error}, status_code=503)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(_require_api_key)])

    def model_card(name: str) -> ModelCard:
        mc = state.config.model_config
        return ModelCard(id=name, created=int(state.start_time), root=str(mc.source.path),
                         max_model_len=mc.max_model_len, vocab_size=int(mc.hf_config.vocab_size))

    @v1.get("/models")
    async def models() -> ModelList:
        return ModelList(data=[model_card(name) for name in state.served_model_names])

    # A path parameter: names like meta-llama/Llama-3-8B hold slashes (the openai client's
    # models.retrieve(name) sends them as they are).
    @v1.get("/models/{model_id:path}")
    async def model(model_id: str) -> ModelCard:
        if model_id not in state.served_model_names:  # "" too: only a request's model defaults
            raise state.model_not_found(model_id)
        return model_card(model_id)

    @v1.post("/completions")
    async def completions(request: Request) -> Response:
        return await create_completion(request, state)

    @v1.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await create_chat_completion(request, state)

    app.include_router(v1)

    # vLLM's tokenizer routes sit outside /v1; here they need the key like /v1.
    @app.post("/tokenize", dependencies=[Depends(_require_api_key)])
    async def tokenize_route(request: Request) -> TokenizeResponse:
        return await tokenize(request, state)

    @app.post("/detokenize", dependencies=[Depends(_require_api_key)])
    async def detokenize_route(request: Request) -> DetokenizeResponse:
        return await detokenize(request, state)

    if os.environ.get(PROFILER_DIR_ENV):
        mount_profiler_routes(app, state)
    # /dashboard: the page is public (no data, no key in it); its data needs the key like /v1.
    mount_server_dashboard(app, state, _require_api_key)
    return app


def mount_profiler_routes(app: FastAPI, state: ServerState) -> None:
    """POST /start_profile and /stop_profile (vLLM's), only when $SHARDSERVE_TORCH_PROFILER_DIR
    names where every rank writes its trace; they need the API key like /v1."""
    guard = [Depends(_require_api_key)]

    @app.post("/start_profile", dependencies=guard)
    async def start_profile() -> dict:
        try:
            await state.engine.start_profile()
        except RuntimeError as exc:
            raise APIError(409, str(exc), code="profiler_state") from exc
        return {"status": "profiling", "dir": os.environ[PROFILER_DIR_ENV]}

    @app.post("/stop_profile", dependencies=guard)
    async def stop_profile() -> dict:
        try:
            summaries = await state.engine.stop_profile()
        except RuntimeError as exc:
            raise APIError(409, str(exc), code="profiler_state") from exc
        return {"status": "stopped", "ranks": summaries}


def _phase(state: ServerState) -> str:
    if not state.engine.is_alive or state.startup_error:
        return "dead"
    if state.draining:
        return "draining"
    return "loading"


async def _require_api_key(request: Request) -> None:
    key = request.app.state.server.args.api_key
    if key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise APIError(401, "Missing API key: send the header 'Authorization: Bearer <key>'.",
                       code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    # Constant time, so the key cannot be guessed byte by byte from response times.
    if not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise APIError(401, "Incorrect API key provided.", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    state: ServerState = app.state.server
    loader = asyncio.create_task(_start_engine(state), name="engine-start")
    try:
        yield
    finally:
        loader.cancel()
        await asyncio.gather(loader, return_exceptions=True)
        await state.engine.shutdown()


async def _start_engine(state: ServerState) -> None:
    try:
        await state.engine.start()
    except Exception as exc:
        state.startup_error = f"{type(exc).__name__}: {exc}"
        logger.error("The engine failed to start: %s", state.startup_error)
        if state.on_fatal is not None:
            state.on_fatal()
        return
    print(f"Ready: serving {state.model_name} on http://{state.args.host}:{state.args.port}",
          flush=True)


class _Server(uvicorn.Server):
    """uvicorn, with SIGTERM turned into a drain instead of an immediate stop."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state
        self.exit_code = 0
        self._drain_task: asyncio.Task | None = None
        state.on_fatal = self._fatal
        delay = state.args.exit_on_engine_death
        if delay >= 0:
            def exit_later() -> None:
                logger.error("The engine is dead: exiting with status 1 in %.0f s", delay)
                asyncio.get_running_loop().call_later(delay, self._fatal)
            state.engine.on_dead = exit_later

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGTERM and not self.state.draining and not self.should_exit:
            # Not recorded in _captured_signals: uvicorn would re-raise it after shutdown, and
            # the process would die by SIGTERM instead of exiting 0.
            self.state.draining = True
            asyncio.get_event_loop().call_soon_threadsafe(self._begin_drain)
            return
        # SIGINT, or SIGTERM again: stop now. Streams still open end with an error event at
        # once; uvicorn would otherwise wait for them up to --shutdown-timeout. The exit status
        # says so (128 + the signal, as a shell reports a process the signal killed) even where
        # uvicorn's re-raising of the signal after shutdown does not end the process.
        if self.exit_code == 0:
            self.exit_code = 128 + int(sig)
        asyncio.get_event_loop().call_soon_threadsafe(
            self.state.engine.abort_all, "The server is stopping (interrupted); the request "
            "did not finish.")
        super().handle_exit(sig, frame)

    def _begin_drain(self) -> None:
        self._drain_task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        timeout = self.state.args.shutdown_timeout
        logger.warning("SIGTERM: draining %d in-flight requests (up to %.0f s)",
                       self.state.num_inflight, timeout)
        try:
            await asyncio.wait_for(self.state.idle.wait(), timeout)
        except asyncio.TimeoutError:
            logger.warning("%d requests still in flight after %g s; stopping anyway",
                           self.state.num_inflight, timeout)
            # End them with an error now (a stream gets an error event and [DONE], the others
            # a 503): left to uvicorn they would be cancelled mid-response, the connections
            # dropped without an end and a traceback logged for each.
            self.state.engine.abort_all(
                f"The server is stopping: the request did not finish within the {timeout:g} s "
                "of --shutdown-timeout.")
        self.should_exit = True

    def _fatal(self) -> None:
        self.exit_code = 1
        self.should_exit = True


def run_server(args: argparse.Namespace, sock: socket.socket | None = None) -> int:
    """`shardserve serve`: bind the port, resolve the model (fail fast on a bad path), then
    serve until stopped. sock: the port already bound (the data-parallel front's -dp auto
    that came out as one replica)."""
    from shardserve.engine_args import engine_config_from_args

    server_args = ServerArgs.from_namespace(args)
    if sock is None:
        sock = serving_socket(server_args.host, server_args.port)
    server_args.port = bound_port(sock)
    try:
        config = engine_config_from_args(args).resolve()
    except BaseException:
        sock.close()
        raise
    names = config.model_config.served_model_names
    name = names[0]
    metrics = ServerMetrics(name, config.model_config.max_model_len)
    engine = AsyncLLM(config, metrics, server_args.max_queue_time)
    state = ServerState(config, server_args, engine, metrics, names)
    if server_args.api_key is None:
        logger.warning("No --api-key (or %s): /v1 is open to anyone who can reach port %d",
                       API_KEY_ENV, server_args.port)
    uv_config = uvicorn.Config(build_app(state), host=server_args.host, port=server_args.port,
                               log_level=server_args.uvicorn_log_level, access_log=False,
                               timeout_graceful_shutdown=_STOP_GRACE_S,
                               timeout_keep_alive=5)
    server = _Server(uv_config, state)
    print(f"shardserve {__version__}: serving {name} on http://{server_args.host}:"
          f"{server_args.port} (loading the model...)", flush=True)
    server.run(sockets=[sock])
    return server.exit_code
