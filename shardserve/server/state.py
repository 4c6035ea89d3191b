"""What every handler shares: the engine, the metrics, the flags, and the server's phase."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from shardserve.config import EngineConfig
from shardserve.engine.async_llm import AsyncLLM
from shardserve.server.args import ServerArgs
from shardserve.server.errors import APIError, overloaded
from shardserve.server.metrics import ServerMetrics


@dataclass
class ServerState:
    config: EngineConfig
    args: ServerArgs
    engine: AsyncLLM
    metrics: ServerMetrics
    served_model_names: list[str]
    start_time: float = field(default_factory=time.time)
    draining: bool = False  # SIGTERM received: finish what is in flight, take nothing new
    startup_error: str | None = None
    num_inflight: int = 0  # /v1 generation requests between admission and their last byte
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    on_fatal: Callable[[], None] | None = None  # stop the server (the engine failed to start)

    def __post_init__(self) -> None:
        self.idle.set()

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]

    @property
    def ready(self) -> bool:
        """Readiness: loaded, alive and not draining (GET /health)."""
        return self.engine.ready and self.engine.is_alive and not self.draining

    def check_model(self, requested: str | None) -> None:
        """404 for a model we do not serve. An absent or empty model means the default, as in
        vLLM: clients whose model setting is left blank send "" (a 404 there broke them)."""
        if requested and requested not in self.served_model_names:
            raise self.model_not_found(requested)

    def model_not_found(self, requested: str) -> APIError:
        return APIError(404, f"The model `{requested}` does not exist; this server serves "
                             f"{', '.join(repr(n) for n in self.served_model_names)}.",
                        "invalid_request_error", "model", "model_not_found")

    def admit(self) -> None:
        """Count a generation request in flight (the SIGTERM drain waits for the count to reach
        zero); refuse it at once while draining. Pair with release()."""
        if self.draining:
            self.metrics.record_rejected("draining")
            raise overloaded("The server is shutting down; send the request to another replica.",
                             "draining")
        self.num_inflight += 1
        self.idle.clear()

    def release(self) -> None:
        self.num_inflight -= 1
        if self.num_inflight == 0:
            self.idle.set()
