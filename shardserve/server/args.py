"""The HTTP server's own flags (the engine's come from engine_args.add_engine_args)."""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from shardserve.engine_args import parse_size

API_KEY_ENV = "SHARDSERVE_API_KEY"
# vLLM's name, read too: a deployment moved over from vLLM must not lose its key silently.
VLLM_API_KEY_ENV = "VLLM_API_KEY"


@dataclass
class CorsArgs:
    """Cross-origin requests from browsers (vLLM's flags and defaults: every origin, no
    credentials), answered by Starlette's CORSMiddleware before routing and the key check."""

    allowed_origins: list[str] = field(default_factory=lambda: ["*"])
    allowed_methods: list[str] = field(default_factory=lambda: ["*"])
    allowed_headers: list[str] = field(default_factory=lambda: ["*"])
    allow_credentials: bool = False

    @classmethod
    def from_namespace(cls, args: argparse.Namespace) -> "CorsArgs":
        return cls(args.allowed_origins, args.allowed_methods, args.allowed_headers,
                   args.allow_credentials)

    def install(self, app: Any) -> None:
        from starlette.middleware.cors import CORSMiddleware
        app.add_middleware(CORSMiddleware, allow_origins=self.allowed_origins,
                           allow_methods=self.allowed_methods,
                           allow_headers=self.allowed_headers,
                           allow_credentials=self.allow_credentials)


def _json_list(text: str) -> list[str]:
    """vLLM's form, a JSON list of strings ('["https://a.example"]')."""
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise argparse.ArgumentTypeError(f"expected a JSON list of strings, e.g. "
                                         f"'[\"https://app.example\"]', got {text!r}")
    return value


def add_cors_args(parser: argparse.ArgumentParser) -> None:
    d = CorsArgs()
    g = parser.add_argument_group("CORS (browsers on other origins)")
    g.add_argument("--allowed-origins", type=_json_list, default=d.allowed_origins,
                   help="JSON list of origins browsers may call from (default: every one)")
    g.add_argument("--allowed-methods", type=_json_list, default=d.allowed_methods,
                   help="JSON list of methods (default: every one)")
    g.add_argument("--allowed-headers", type=_json_list, default=d.allowed_headers,
                   help="JSON list of request headers (default: every one)")
    g.add_argument("--allow-credentials", action="store_true",
                   help="let browsers send cookies and HTTP auth cross-origin")


@dataclass
class ServerArgs:
    host: str = "0.0.0.0"
    port: int = 8000
    api_key: str | None = None  # Bearer token required on /v1/* and /dashboard/data; None: open
    max_queue_time: float | None = None  # seconds a request may wait unscheduled before a 503
    shutdown_timeout: float = 30.0  # SIGTERM: how long in-flight requests may take to finish
    # After the engine dies, keep answering (503s, /live 503) this long, then exit 1 so a
    # supervisor restarts the process; negative: never exit, leave it to the probes.
    exit_on_engine_death: float = 5.0
    max_request_body_bytes: int = 4 << 20
    max_n: int = 128  # most samples one request may ask for (n, or prompts x n)
    uvicorn_log_level: str = "warning"
    cors: CorsArgs = field(default_factory=CorsArgs)

    @classmethod
    def from_namespace(cls, args: argparse.Namespace) -> "ServerArgs":
        return cls(host=args.host, port=args.port,
                   api_key=(args.api_key or os.environ.get(API_KEY_ENV)
                            or os.environ.get(VLLM_API_KEY_ENV) or None),
                   max_queue_time=args.max_queue_time, shutdown_timeout=args.shutdown_timeout,
                   max_request_body_bytes=args.max_request_body_bytes, max_n=args.max_n,
                   exit_on_engine_death=args.exit_on_engine_death,
                   uvicorn_log_level=args.uvicorn_log_level,
                   cors=CorsArgs.from_namespace(args))


def parse_port(text: str) -> int:
    """A TCP port, checked when the flags are read (uvicorn would find out after the model
    loaded, with a traceback)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be in [0, 65535], got {port}")
    return port


def _seconds(text: str, positive: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise argparse.ArgumentTypeError(
            f"must be a finite number of seconds {'above' if positive else 'of at least'} 0, "
            f"got {text!r}")
    return value


def positive_seconds(text: str) -> float:
    """A time limit that must be above 0 (--max-queue-time 0 would refuse every request, and
    its check would spin the event loop); leave the flag out for no limit."""
    return _seconds(text, positive=True)


def non_negative_seconds(text: str) -> float:
    """A wait that may be 0 (--shutdown-timeout 0: abort what is in flight at once)."""
    return _seconds(text, positive=False)


def add_server_args(parser: argparse.ArgumentParser) -> None:
    d = ServerArgs()
    g = parser.add_argument_group("server")
    g.add_argument("--host", default=d.host, help="address to listen on")
    g.add_argument("--port", type=parse_port, default=d.port, help="TCP port to listen on")
    g.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on /v1/*, /tokenize, /detokenize "
                        f"and /dashboard/data (or set {API_KEY_ENV} or {VLLM_API_KEY_ENV}); "
                        "/health, /live, /version, /metrics and the /dashboard page itself stay "
                        "open")
    g.add_argument("--max-queue-time", type=positive_seconds, default=None, metavar="SECONDS",
                   help="a request not scheduled within this time gets 503 + Retry-After "
                        "(with --max-waiting-requests: graceful overload)")
    g.add_argument("--shutdown-timeout", type=non_negative_seconds, default=d.shutdown_timeout,
                   metavar="SECONDS", help="on SIGTERM, how long in-flight requests may take to "
                   "finish; those still running then end with an error (0: at once)")
    g.add_argument("--exit-on-engine-death", type=float, default=d.exit_on_engine_death,
                   metavar="SECONDS", help="after the engine dies, exit with status 1 this many "
                   "seconds later (requests get 503 meanwhile); negative: keep running")
    g.add_argument("--max-request-body-bytes", type=parse_size, default=d.max_request_body_bytes,
                   metavar="SIZE", help="larger request bodies get 413 (e.g. 4MiB)")
    g.add_argument("--max-n", type=int, default=d.max_n,
                   help="most samples per request (n times the number of prompts)")
    g.add_argument("--uvicorn-log-level", default=d.uvicorn_log_level,
                   choices=["critical", "error", "warning", "info", "debug", "trace"])
    add_cors_args(parser)
