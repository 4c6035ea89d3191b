"""The router's view of its replicas: who they are (static list, a file, a DNS name; re-read
while running), whether they are healthy (/health) and how loaded they are (/metrics).

A replica leaves the healthy set the moment a request to it fails to connect, or on its next
failed /health probe (every `health_interval_s`); it comes back on the first /health 200.
A replica that stops answering probes at all (`LOST_AFTER_FAILURES` in a row: hung, or
unreachable without a connection reset) is *lost*: the requests the router has open on it are
cut loose too (retried elsewhere, or ended with an error event), so none waits on it forever.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

logger = logging.getLogger(__name__)

LOST_AFTER_FAILURES = 2  # probes in a row without any answer before in-flight requests give up
# Replica gauges read from /metrics; any `prefix:` works (shardserve:, vllm:).
_LOAD_GAUGES = {"num_requests_running": "running", "num_requests_waiting": "waiting",
                "kv_cache_usage_perc": "kv_usage"}


@dataclass(eq=False)
class Backend:
    """One replica, as the router sees it. Counters are cumulative for the router's life."""

    url: str  # base URL, no trailing slash
    # The `replica` label on the router's /metrics: the index under `serve -dp N`, else the
    # URL's host:port (what Prometheus would call the instance had it scraped the replica).
    name: str = ""
    healthy: bool = False  # in the set requests are sent to
    status: str = "unknown"  # last /health answer or failure, for /backends
    in_flight: int = 0  # requests this router has open on it now
    running: float = 0.0  # the replica's own report (lags by up to one probe interval)
    waiting: float = 0.0
    kv_usage: float = 0.0
    busy_until: float = 0.0  # monotonic time before which it counts as saturated (it sent 503)
    num_requests: int = 0
    num_failures: int = 0  # connection errors, 5xx, broken streams
    num_retries_from: int = 0  # requests moved off this replica to another
    pid: int | None = None  # set when the router's own process tree runs the replica
    num_probe_failures: int = 0  # probes in a row that got no answer at all
    # When the current run of probes that timed out began (None: the last one was answered or
    # refused). A replica that accepts connections but answers nothing is hung or frozen; one
    # still starting (or gone) refuses them instead.
    unanswered_since: float | None = None
    # Monotonic time of the last probe it answered (any status); 0: never. A replica binds its
    # port before it resolves the model and builds its app, so in that window its probes time
    # out too: only one that has answered since it (re)started can be taken for frozen.
    answered_at: float = 0.0
    lost: asyncio.Event = field(default_factory=asyncio.Event)  # set: stop waiting on it
    waiters: set = field(default_factory=set)  # tasks awaiting the replica (cancelled if lost)

    def __post_init__(self) -> None:
        if not self.name:
            self.name = self.url.partition("://")[2] or self.url

    @property
    def load(self) -> float:
        """Outstanding requests: the router's own open ones plus what the replica reports."""
        return self.in_flight + self.running + self.waiting

    def mark_down(self, reason: str) -> None:
        if self.healthy:
            logger.warning("Replica %s taken out: %s", self.url, reason)
        self.healthy = False
        self.status = reason


@dataclass
class DiscoveryConfig:
    static: list[str] = field(default_factory=list)
    file: str | None = None  # one URL per line; '#' comments
    dns: str | None = None  # NAME:PORT; every address it resolves to is a replica


def normalize_url(url: str) -> str:
    """`url` as the router keys it (http:// added when no scheme is given, no trailing slash);
    ValueError, saying what is wrong, for anything that is not an http(s) base URL with a host:
    such a replica could never be probed (or would stop the router at start-up)."""
    text = url.strip().rstrip("/")
    if "://" not in text:
        text = "http://" + text
    try:
        parsed = httpx.URL(text)
    except httpx.InvalidURL as exc:
        raise ValueError(f"{url!r} is not a replica URL ({exc})") from None
    if parsed.scheme not in ("http", "https") or not parsed.host or " " in text:
        raise ValueError(f"{url!r} is not a replica URL; give http://HOST:PORT")
    if parsed.query or parsed.fragment:
        raise ValueError(f"{url!r} is not a replica URL: drop the query/fragment")
    return text


class BackendPool:
    """Membership and health of the replicas; `refresh()` runs once per probe interval."""

    def __init__(self, discovery: DiscoveryConfig, health_interval_s: float = 1.0,
                 probe_timeout_s: float = 2.0) -> None:
        self.discovery = discovery
        self.health_interval_s = health_interval_s
        self.probe_timeout_s = probe_timeout_s
        self.backends: dict[str, Backend] = {}
        self._client: httpx.AsyncClient | None = None
        self._task: asyncio.Task | None = None
        self.changed = asyncio.Event()  # set after every refresh (tests, start-up waits)
        # Set by `serve -dp N` on SIGTERM: /health turns 503 at once, as one server's does,
        # not a probe interval later when the replicas' own 503s have been read.
        self.draining = False

    @property
    def healthy(self) -> list[Backend]:
        return [b for b in self.backends.values() if b.healthy]

    def add(self, url: str, pid: int | None = None, name: str | None = None) -> Backend:
        url = normalize_url(url)
        backend = self.backends.get(url)
        if backend is None:
            backend = self.backends[url] = Backend(url)
            logger.info("Replica %s added", url)
        if pid is not None:
            backend.pid = pid
        if name is not None:
            backend.name = name
        return backend

    async def start(self) -> None:
        # No $HTTP_PROXY: probes must take the same direct path as the requests (app.py).
        self._client = httpx.AsyncClient(timeout=self.probe_timeout_s, trust_env=False)
        await self.refresh()
        self._task = asyncio.create_task(self._loop(), name="router-health")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval_s)
            try:
                await self.refresh()
            except Exception:  # never let one bad round stop the probes
                logger.exception("Replica refresh failed")

    async def refresh(self) -> None:
        await self._discover()
        await asyncio.gather(*(self._probe(b) for b in list(self.backends.values())))
        self.changed.set()
        self.changed = asyncio.Event()

    async def _discover(self) -> None:
        d = self.discovery
        if d.file is None and d.dns is None:
            for url in d.static:
                self.add(url)
            return
        wanted = {normalize_url(u) for u in d.static}
        if d.file is not None:
            try:
                lines = Path(d.file).read_text().splitlines()
            except OSError as exc:
                logger.warning("Cannot read the backends file %s (%s); keeping the last list",
                               d.file, exc)
                wanted |= {u for u in self.backends if u not in wanted}
            else:
                for line in lines:
                    if not line.split("#")[0].strip():
                        continue
                    try:
                        wanted.add(normalize_url(line.split("#")[0]))
                    except ValueError as exc:  # one bad line must not stop the others' probes
                        logger.warning("Backends file %s: %s; line skipped", d.file, exc)
        if d.dns is not None:
            host, _, port = d.dns.rpartition(":")
            try:
                infos = await asyncio.get_running_loop().getaddrinfo(
                    host, int(port), type=socket.SOCK_STREAM)
                for family, _, _, _, sockaddr in infos:
                    addr = f"[{sockaddr[0]}]" if family == socket.AF_INET6 else sockaddr[0]
                    wanted.add(f"http://{addr}:{port}")
            except (OSError, ValueError) as exc:
                logger.warning("Cannot resolve %s (%s); keeping the last list", d.dns, exc)
                wanted |= set(self.backends)
        for url in wanted:
            self.add(url)
        for url in [u for u in self.backends if u not in wanted]:
            logger.info("Replica %s removed (no longer listed)", url)
            del self.backends[url]  # requests in flight keep their own reference

    async def _probe(self, backend: Backend) -> None:
        assert self._client is not None
        try:
            health = await self._client.get(backend.url + "/health")
        except httpx.HTTPError as exc:
            backend.mark_down(f"health check failed: {type(exc).__name__}")
            backend.num_probe_failures += 1
            if not isinstance(exc, httpx.TimeoutException):
                backend.unanswered_since = None
            elif backend.unanswered_since is None:
                backend.unanswered_since = time.monotonic()
            if backend.num_probe_failures >= LOST_AFTER_FAILURES and not backend.lost.is_set():
                if backend.in_flight:
                    logger.warning("Replica %s does not answer; giving up on its %d requests",
                                   backend.url, backend.in_flight)
                backend.lost.set()
                for task in list(backend.waiters):
                    task.cancel()
            return
        backend.num_probe_failures = 0
        backend.unanswered_since = None
        backend.answered_at = time.monotonic()
        if backend.lost.is_set():
            backend.lost = asyncio.Event()
        if health.status_code != 200:
            try:
                status = health.json().get("status", str(health.status_code))
            except ValueError:
                status = str(health.status_code)
            backend.mark_down(f"health {health.status_code} ({status})")
            return
        try:
            metrics = await self._client.get(backend.url + "/metrics")
            if metrics.status_code == 200:
                self._read_load(backend, metrics.text)
        except httpx.HTTPError:
            pass  # healthy but no load report this round: keep the last one
        if not backend.healthy:
            logger.warning("Replica %s is healthy", backend.url)
        backend.healthy = True
        backend.status = "ok"

    @staticmethod
    def _read_load(backend: Backend, text: str) -> None:
        seen: dict[str, float] = {}
        try:
            for family in text_string_to_metric_families(text):
                attr = _LOAD_GAUGES.get(family.name.rpartition(":")[2])
                if attr is not None:
                    seen[attr] = sum(s.value for s in family.samples)
        except ValueError:
            return
        for attr, value in seen.items():
            setattr(backend, attr, value)

    def is_saturated(self, backend: Backend, max_waiting: float,
                     max_in_flight: int | None) -> bool:
        if backend.busy_until > time.monotonic():
            return True
        if backend.waiting >= max_waiting:
            return True
        return max_in_flight is not None and backend.in_flight >= max_in_flight
