"""Forward one OpenAI request to a replica, with failover.

Until the first byte of the answer reaches the client, a failure (connection refused or reset,
a 5xx, a stream that ends before its first chunk) moves the request to another replica, up to
`max_retries` times. After that, a broken stream ends with an OpenAI-style error event and
`data: [DONE]`, so a client never waits on a stream that will not finish.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
from fastapi.responses import JSONResponse, Response

from shardserve.closing_response import ClosingStreamingResponse
from shardserve.router.backends import Backend, BackendPool
from shardserve.router.policy import Policy, prefix_key

logger = logging.getLogger(__name__)

# Hop-by-hop and framing headers: never copied between the two connections.
_HOP = {"host", "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
        "trailer", "transfer-encoding", "upgrade", "content-length"}


@dataclass
class ProxyConfig:
    max_retries: int = 2  # other replicas a failed request may move to
    max_waiting: float = 16  # a replica reporting this many waiting requests is saturated
    max_in_flight: int | None = None  # per replica, from this router; None: no limit
    prefix_chars: int = 256
    retry_after_s: int = 1


@dataclass
class RouterStats:
    num_requests: int = 0
    num_rejected: int = 0  # 503 from the router itself: nothing healthy or all saturated
    num_retries: int = 0
    num_failures: int = 0  # requests the client saw fail (error status or broken stream)
    in_flight: int = 0


class ReplicaLost(Exception):
    """The replica stopped answering its health probes while a request waited on it."""


async def _unless_lost(backend: Backend, awaitable):
    """Await `awaitable`, unless the replica is declared lost first (then ReplicaLost): the
    prober cancels every task in `backend.waiters` when it declares the replica lost.

    The work runs in its own task, and this waits with asyncio.wait rather than awaiting it: a
    cancelled caller (a client gone; anyio re-delivers that cancel on every await) then cancels
    the work exactly once, so httpcore's shielded close of the connection can finish and the
    replica sees the disconnect and aborts the request."""
    if backend.lost.is_set():
        raise ReplicaLost()
    task = asyncio.ensure_future(awaitable)
    backend.waiters.add(task)
    try:
        await asyncio.wait({task})
    except BaseException:
        task.cancel()
        task.add_done_callback(_consume)
        raise
    finally:
        backend.waiters.discard(task)
    if task.cancelled():  # only the prober cancels it while we wait
        raise ReplicaLost()
    return task.result()


def _consume(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()  # retrieved, so asyncio does not log it


def error_body(message: str, type_: str, code: str) -> dict:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


class Proxy:
    def __init__(self, pool: BackendPool, policy: Policy, config: ProxyConfig,
                 client: httpx.AsyncClient) -> None:
        self.pool = pool
        self.policy = policy
        self.config = config
        self.client = client
        self.stats = RouterStats()

    def _pick(self, exclude: set[Backend], key: str | None) -> tuple[Backend | None, str]:
        healthy = [b for b in self.pool.healthy if b not in exclude]
        if not healthy:
            return None, "no_healthy_replica"
        c = self.config
        free = [b for b in healthy if not self.pool.is_saturated(b, c.max_waiting, c.max_in_flight)]
        if not free:
            return None, "overloaded"
        return self.policy.choose(free, key), ""

    def _reject(self, code: str) -> JSONResponse:
        self.stats.num_rejected += 1
        self.stats.num_failures += 1
        message = ("Every replica is saturated; retry shortly." if code == "overloaded" else
                   "No healthy replica is available; retry shortly.")
        return JSONResponse(error_body(message, "overloaded", code), status_code=503,
                            headers={"Retry-After": str(self.config.retry_after_s)})

    async def forward(self, method: str, path: str, headers: dict[str, str],
                      body: bytes) -> Response:
        self.stats.num_requests += 1
        key = (prefix_key(path, body, self.config.prefix_chars)
               if self.policy.needs_prefix and body else None)
        out_headers = {k: v for k, v in headers.items() if k.lower() not in _HOP}
        tried: set[Backend] = set()
        last_error: Response | None = None
        # True while every replica tried refused the connection: the request reached no engine,
        # so running out of replicas is the router's 503 + Retry-After (safe to retry), not a
        # 502 naming the last refusal.
        all_unsent = True
        for attempt in range(self.config.max_retries + 1):
            backend, why = self._pick(tried, key)
            if backend is None:
                if last_error is not None and not all_unsent:
                    self.stats.num_failures += 1
                    return last_error
                return self._reject(why)
            if attempt:
                self.stats.num_retries += 1
            tried.add(backend)
            result = await self._try(backend, method, path, out_headers, body)
            if isinstance(result, Response):
                return result
            _, error, unsent = result
            if all_unsent or not unsent:  # a replica's own error says more than a refusal
                last_error = error
            all_unsent = all_unsent and unsent
            backend.num_retries_from += 1
        if last_error is None or all_unsent:
            return self._reject("no_healthy_replica")
        self.stats.num_failures += 1
        return last_error

    async def _try(self, backend: Backend, method: str, path: str, headers: dict[str, str],
                   body: bytes) -> Response | tuple[None, Response, bool]:
        """The response to send, or (None, the error to send if no other replica can help,
        whether the request surely never reached the replica: its connection was refused)."""
        backend.in_flight += 1
        backend.num_requests += 1
        self.stats.in_flight += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                backend.in_flight -= 1
                self.stats.in_flight -= 1

        try:
            request = self.client.build_request(method, backend.url + path, headers=headers,
                                                content=body)
            upstream = await _unless_lost(backend, self.client.send(request, stream=True))
        except (httpx.HTTPError, ReplicaLost) as exc:
            release()
            backend.num_failures += 1
            if isinstance(exc, httpx.TransportError):
                backend.mark_down(f"request failed: {type(exc).__name__}")
            logger.warning("Replica %s failed before answering (%s: %s)", backend.url,
                           type(exc).__name__, exc)
            return None, JSONResponse(error_body(
                f"The replica failed before answering ({type(exc).__name__}).", "server_error",
                "replica_failed"), status_code=502), isinstance(exc, httpx.ConnectError)
        except BaseException:  # cancelled (router shutting down): do not leak the counts
            release()
            raise
        if upstream.status_code >= 500:
            content = await _read_quietly(upstream)
            release()
            backend.num_failures += 1
            if upstream.status_code == 503:  # overloaded or draining: skip it for a while
                retry_after = _int(upstream.headers.get("retry-after"), 1)
                backend.busy_until = time.monotonic() + retry_after
            resp_headers = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP}
            return (None, Response(content, status_code=upstream.status_code,
                                   headers=resp_headers), False)
        chunks = upstream.aiter_raw()
        try:
            first = await _unless_lost(backend, chunks.__anext__())
        except StopAsyncIteration:
            first = b""
        except (httpx.HTTPError, ReplicaLost) as exc:
            await upstream.aclose()
            release()
            backend.num_failures += 1
            backend.mark_down(f"stream broke before its first byte: {type(exc).__name__}")
            return None, JSONResponse(error_body(
                f"The replica failed before answering ({type(exc).__name__}).", "server_error",
                "replica_failed"), status_code=502), False
        except BaseException:
            await upstream.aclose()
            release()
            raise
        is_sse = upstream.headers.get("content-type", "").startswith("text/event-stream")
        resp_headers = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP}
        queue: asyncio.Queue = asyncio.Queue()
        pump = asyncio.ensure_future(_pump(backend, chunks, queue))
        backend.waiters.add(pump)
        pump.add_done_callback(backend.waiters.discard)

        async def relay() -> AsyncIterator[bytes]:
            tail = first[-2:]
            if first:
                yield first
            try:
                while True:
                    # What has piled up goes out in one write: a router that falls behind
                    # catches up instead of paying the per-write cost for every event. The end
                    # (_END or an error) is always the last thing the pump puts.
                    items = [await queue.get()]
                    while not queue.empty():
                        items.append(queue.get_nowait())
                    end = None if isinstance(items[-1], bytes) else items.pop()
                    if items:
                        data = b"".join(items)
                        tail = (tail + data)[-2:]
                        yield data
                    if end is _END:
                        break
                    if end is not None:
                        raise end
            except (httpx.HTTPError, ReplicaLost) as exc:
                backend.num_failures += 1
                self.stats.num_failures += 1
                backend.mark_down(f"stream broke: {type(exc).__name__}")
                logger.warning("Stream from %s broke mid-way (%s)", backend.url, exc)
                if is_sse:
                    sep = b"" if tail == b"\n\n" else b"\n\n"
                    event = error_body(
                        f"The replica serving this request failed mid-stream "
                        f"({type(exc).__name__}); the output is incomplete.",
                        "server_error", "replica_failed")
                    yield sep + f"data: {json.dumps(event)}\n\ndata: [DONE]\n\n".encode()

        async def close() -> None:
            # The pump first, once, and to its end: a read it had pending is cancelled inside
            # httpcore, whose shielded clean-up closes the connection, so the replica sees the
            # disconnect and aborts the request. Only then is the response closed here.
            try:
                pump.cancel()
                await asyncio.wait({pump})
                await upstream.aclose()
            finally:
                release()

        # Closes upstream and drops the in-flight counts however the stream ends.
        return ClosingStreamingResponse(relay(), close, status_code=upstream.status_code,
                                        headers=resp_headers)


# The end of a stream's body, in a relay's queue.
_END = object()


async def _pump(backend: Backend, chunks: AsyncIterator[bytes], queue: asyncio.Queue) -> None:
    """Read the rest of a replica's answer into `queue`, ending with _END, or with the error
    that broke it (ReplicaLost when the prober gave the replica up and cancelled this task,
    which it finds in backend.waiters).

    One task for the whole stream: a task per chunk (as the first chunk is awaited) cost about
    15% of the router's time. The queue is not bounded, as the replica's own output is not: a
    client that reads slowly holds its answer in one of the two."""
    try:
        if backend.lost.is_set():
            raise ReplicaLost()
        async for chunk in chunks:
            if chunk:
                queue.put_nowait(chunk)
    except asyncio.CancelledError:
        if backend.lost.is_set():
            queue.put_nowait(ReplicaLost())
        raise
    except (httpx.HTTPError, ReplicaLost) as exc:
        queue.put_nowait(exc)
        return
    queue.put_nowait(_END)


async def _read_quietly(upstream: httpx.Response) -> bytes:
    try:
        return await upstream.aread()
    except httpx.HTTPError:
        return b""
    finally:
        await upstream.aclose()


def _int(text: str | None, default: int) -> int:
    try:
        return max(0, int(float(text))) if text else default
    except ValueError:
        return default
