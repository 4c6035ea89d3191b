"""`shardserve router`: one OpenAI endpoint in front of several replicas.

    /v1/*      forwarded unchanged (streaming passed through as it arrives), with failover
    /health    200 while any replica is healthy, else 503 (and 503 "draining" from SIGTERM on,
               under `serve -dp N`)
    /metrics   the whole deployment: router counters and gauges (totals, and per replica), then
               every healthy replica's own series labelled replica=NAME (metrics.py says why);
               /metrics?replicas=false: the router's own series alone
    /backends  the router's view of each replica, as JSON
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from shardserve import __version__
from shardserve.dashboard import mount_router_dashboard
from shardserve.router.backends import BackendPool, DiscoveryConfig
from shardserve.router.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from shardserve.router.metrics import render_metrics
from shardserve.server.args import CorsArgs, add_cors_args, parse_port
from shardserve.server.listen import bound_port, listen_socket
from shardserve.router.policy import POLICIES, make_policy
from shardserve.router.proxy import Proxy, ProxyConfig

logger = logging.getLogger(__name__)


@dataclass
class RouterArgs:
    discovery: DiscoveryConfig = field(default_factory=DiscoveryConfig)
    policy: str = "least-load"
    host: str = "0.0.0.0"
    port: int = 8000
    health_interval_s: float = 1.0
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    max_imbalance: float = 8.0
    read_timeout_s: float = 600.0  # longest silence from a replica inside one answer
    uvicorn_log_level: str = "warning"
    cors: CorsArgs = field(default_factory=CorsArgs)  # as the server's (serve -dp N passes its own)

    @classmethod
    def from_namespace(cls, args: argparse.Namespace) -> "RouterArgs":
        return cls(
            discovery=DiscoveryConfig(static=list(args.backend or []), file=args.backends_file,
                                      dns=args.backends_dns),
            policy=args.policy, host=args.host, port=args.port,
            health_interval_s=args.health_interval,
            proxy=ProxyConfig(max_retries=args.max_retries, max_waiting=args.max_waiting,
                              max_in_flight=args.max_in_flight, prefix_chars=args.prefix_chars),
            max_imbalance=args.max_imbalance, read_timeout_s=args.read_timeout,
            uvicorn_log_level=args.uvicorn_log_level, cors=CorsArgs.from_namespace(args))


def _backend_url(text: str) -> str:
    from shardserve.router.backends import normalize_url
    try:
        return normalize_url(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _dns_name(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected NAME:PORT, e.g. my-svc-headless:8000, "
                                         f"got {text!r}")
    return text


def _number(kind: type, low: float, inclusive: bool = True) -> Callable[[str], float]:
    """An argparse type: `kind` (int or float) >= low (or > low): a zero or negative interval,
    retry count or limit would otherwise be taken and then refuse or spin on every request."""
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {'an integer' if kind is int else 'a number'}"
                                             f": {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if value < low or (value == low and not inclusive):
            raise argparse.ArgumentTypeError(
                f"must be {'at least' if inclusive else 'more than'} {low}, got {text}")
        return value
    return parse


def add_router_args(parser: argparse.ArgumentParser, standalone: bool = True) -> None:
    d = RouterArgs()
    g = parser.add_argument_group("router")
    if standalone:
        g.add_argument("--backend", action="append", metavar="URL", type=_backend_url,
                       help="a replica's base URL, e.g. http://10.0.0.5:8000 (repeatable)")
        g.add_argument("--backends-file", metavar="FILE",
                       help="file with one replica URL per line; re-read while running")
        g.add_argument("--backends-dns", metavar="NAME:PORT", type=_dns_name,
                       help="a DNS name whose addresses are the replicas (a Kubernetes headless "
                            "Service); re-resolved while running")
        g.add_argument("--host", default=d.host)
        g.add_argument("--port", type=parse_port, default=d.port, help="TCP port to listen on")
        g.add_argument("--uvicorn-log-level", default=d.uvicorn_log_level,
                       choices=["critical", "error", "warning", "info", "debug", "trace"])
        add_cors_args(parser)  # under serve -dp N, serve's own flags
    prefix = "--" if standalone else "--router-"
    g.add_argument(prefix + "policy", dest="policy", default=d.policy, choices=POLICIES,
                   help="least-load: fewest outstanding requests; prefix-aware: the same prompt "
                        "prefix goes to the same replica unless it is overloaded")
    g.add_argument(prefix + "health-interval", dest="health_interval",
                   type=_number(float, 0, False), default=d.health_interval_s, metavar="SECONDS",
                   help="how often each replica's /health and /metrics are read")
    g.add_argument(prefix + "max-retries", dest="max_retries", type=_number(int, 0),
                   default=d.proxy.max_retries,
                   help="other replicas a request that failed before its first byte may try")
    g.add_argument(prefix + "max-waiting", dest="max_waiting", type=_number(float, 0, False),
                   default=d.proxy.max_waiting,
                   help="a replica reporting this many waiting requests is saturated; when all "
                        "are, the router answers 503 + Retry-After")
    g.add_argument(prefix + "max-in-flight", dest="max_in_flight", type=_number(int, 1),
                   default=None,
                   help="most requests the router keeps open on one replica (default: no limit)")
    g.add_argument(prefix + "prefix-chars", dest="prefix_chars", type=_number(int, 1),
                   default=d.proxy.prefix_chars,
                   help="prefix-aware: how many leading prompt characters pick the replica")
    g.add_argument(prefix + "max-imbalance", dest="max_imbalance", type=_number(float, 0),
                   default=d.max_imbalance,
                   help="prefix-aware: outstanding requests over the least loaded replica "
                        "beyond which least-load decides")
    g.add_argument(prefix + "read-timeout", dest="read_timeout", type=_number(float, 0, False),
                   default=d.read_timeout_s, metavar="SECONDS",
                   help="longest silence from a replica within one answer")


def build_router_app(args: RouterArgs, on_startup: Callable[[BackendPool], None] | None = None,
                     ) -> FastAPI:
    pool = BackendPool(args.discovery, args.health_interval_s)
    holder: dict[str, Proxy] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if on_startup is not None:
            on_startup(pool)
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
        timeout = httpx.Timeout(connect=3.0, read=args.read_timeout_s, write=30.0, pool=None)
        # trust_env=False: replicas are addressed directly; an $HTTP_PROXY set for model
        # downloads must not carry (or, on 127.0.0.1 under -dp N, break) the traffic to them.
        async with httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False) as client:
            holder["proxy"] = Proxy(pool, make_policy(args.policy, args.max_imbalance),
                                    args.proxy, client)
            await pool.start()
            try:
                yield
            finally:
                await pool.stop()

    app = FastAPI(title="shardserve router", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    app.state.pool = pool
    args.cors.install(app)
    mount_router_dashboard(app, pool)  # /dashboard: every replica's health, load and numbers

    @app.get("/health")
    async def health() -> Response:
        n = len(pool.healthy)
        status = "draining" if pool.draining else "ok" if n else "no_healthy_replica"
        body = {"status": status, "healthy_replicas": n, "replicas": len(pool.backends)}
        return JSONResponse(body, status_code=200 if status == "ok" else 503)

    @app.get("/live")
    async def live() -> Response:
        return JSONResponse({"status": "alive"})

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}

    @app.get("/backends")
    async def backends() -> list[dict]:
        return [{"url": b.url, "healthy": b.healthy, "status": b.status, "pid": b.pid,
                 "in_flight": b.in_flight, "running": b.running, "waiting": b.waiting,
                 "kv_cache_usage_perc": b.kv_usage, "requests": b.num_requests,
                 "failures": b.num_failures, "retried_elsewhere": b.num_retries_from}
                for b in pool.backends.values()]

    @app.get("/metrics")
    async def metrics(replicas: bool = True) -> Response:
        return Response(await render_metrics(holder["proxy"], include_replicas=replicas),
                        media_type=METRICS_CONTENT_TYPE)

    @app.api_route("/v1/{path:path}", methods=["GET", "POST"])
    async def forward(path: str, request: Request) -> Response:
        body = await request.body()
        target = "/v1/" + path + (f"?{request.url.query}" if request.url.query else "")
        return await holder["proxy"].forward(request.method, target, dict(request.headers), body)

    return app


def run_router(ns: argparse.Namespace) -> int:
    """`shardserve router`: serve until SIGINT/SIGTERM."""
    from shardserve.errors import InvalidRequestError
    args = RouterArgs.from_namespace(ns)
    d = args.discovery
    if not (d.static or d.file or d.dns):
        raise InvalidRequestError("give at least one of --backend, --backends-file, "
                                  "--backends-dns.", "backend")
    sock = listen_socket(args.host, args.port)
    args.port = bound_port(sock)
    app = build_router_app(args)
    config = uvicorn.Config(app, host=args.host, port=args.port, access_log=False,
                            log_level=args.uvicorn_log_level, timeout_keep_alive=5)
    print(f"shardserve router {__version__} ({args.policy}) on http://{args.host}:{args.port}",
          flush=True)
    uvicorn.Server(config).run(sockets=[sock])
    return 0
