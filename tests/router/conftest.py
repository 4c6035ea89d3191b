"""Routers as real subprocesses (`python -m shardserve.cli router`) on free 127.0.0.1 ports."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import ServerProcess, launch_on_port_0


def start_router(log_dir: Path, *args: str, wait_healthy: bool = True,
                 env: dict[str, str] | None = None) -> ServerProcess:
    cmd = [sys.executable, "-m", "shardserve.cli", "router", "--host", "127.0.0.1",
           "--health-interval", "0.5", *args]
    router = launch_on_port_0(cmd, log_dir, "router",
                              {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, None, 60)
    proc = router.proc
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"router exited with {proc.returncode}:\n{router.log_tail()}")
        try:
            r = httpx.get(f"{router.base_url}/health", timeout=2)
            if r.status_code == 200 or (not wait_healthy and r.status_code == 503):
                return router
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    router.stop()
    pytest.fail(f"router not up after 60 s:\n{router.log_tail()}")


def wait_for(predicate, timeout: float, interval: float = 0.2):
    """Poll until predicate() is truthy; returns its value, or None on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return None


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    from shardserve.testing import write_random_model
    return str(write_random_model(tmp_path_factory.mktemp("tiny_llama"), architecture="llama",
                                  preset="tiny", seed=1))
