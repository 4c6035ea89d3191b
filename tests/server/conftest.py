"""Servers as real subprocesses (`python -m shardserve.cli serve`) on free 127.0.0.1 ports.

One SmolLM2 server (CPU, --max-model-len 512) is shared by the modules that only send requests;
modules that kill or drain their server start their own."""

from __future__ import annotations

import itertools
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

API_KEY = "test-key-123"
TINY_SERVER_NAMES = ("org/tiny-llama", "tiny")
STARTUP_TIMEOUT_S = 300.0


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    port: int
    log_path: Path
    api_key: str | None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def log_tail(self, n: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-n:]

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample of /metrics: (name, sorted labels without model_name) -> value."""
        text = httpx.get(f"{self.base_url}/metrics", timeout=10).text
        out = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "model_name"))
                out[(sample.name, labels)] = sample.value
        return out

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics().get((name, tuple(sorted(labels.items()))), 0.0)

    def wait_idle(self, timeout: float = 30.0) -> dict:
        """Wait until nothing runs or waits, no KV block is in use and the numbers have settled;
        returns the metrics. Settled: the engine sends its counters every STATS_INTERVAL_S (and
        once more when it goes idle), so a request that came and went between two sends can
        leave idle gauges beside counters that still move: two equal readings a send apart."""
        from shardserve.engine.core_proc import STATS_INTERVAL_S

        deadline = time.monotonic() + timeout
        previous = None
        while True:
            m = self.metrics()
            busy = [m.get((f"shardserve:{g}", ()), 0.0) for g in
                    ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc")]
            if (not any(busy) and m == previous) or time.monotonic() > deadline:
                return m
            previous = None if any(busy) else m
            time.sleep(max(0.2, 1.5 * STATS_INTERVAL_S))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


# The first "on http://host:port" (or the data-parallel front's "behind http://...") in a
# server's or router's output: the port it bound.
_BOUND_PORT = re.compile(r"(?: on| behind) http://127\.0\.0\.1:(\d+)\b")
_LOG_NUMBERS = itertools.count()


def launch_on_port_0(cmd: list[str], log_dir: Path, stem: str, env: dict[str, str],
                     api_key: str | None, timeout: float) -> ServerProcess:
    """Start `cmd` (a serve or router command line without --port) with --port 0 and learn its
    port from its first line. A port picked here and handed over would race every other test
    process for it (14 xdist workers on the GPU machine lost that race)."""
    log_path = log_dir / f"{stem}-{next(_LOG_NUMBERS)}.log"
    proc = subprocess.Popen([*cmd, "--port", "0"], stdout=open(log_path, "w"),
                            stderr=subprocess.STDOUT, env=env,
                            cwd=Path(__file__).resolve().parents[2])
    server = ServerProcess(proc, 0, log_path, api_key)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = _BOUND_PORT.search(log_path.read_text(errors="replace"))
        if found:
            server.port = int(found.group(1))
            return server
        if proc.poll() is not None:
            pytest.fail(f"{stem} exited with {proc.returncode}:\n{server.log_tail()}")
        time.sleep(0.1)
    server.stop()
    pytest.fail(f"{stem} named no port after {timeout:.0f} s:\n{server.log_tail()}")


def start_server(log_dir: Path, *extra: str, model: str | None = None,
                 api_key: str | None = API_KEY,
                 env_extra: dict[str, str] | None = None) -> ServerProcess:
    cmd = [sys.executable, "-m", "shardserve.cli", "serve", "--host", "127.0.0.1",
           "--device", "cpu", "--max-model-len", "512", "--kv-cache-memory", "64MiB", *extra]
    if model:
        cmd += ["--model", model]
    if api_key:
        cmd += ["--api-key", api_key]
    env = {**os.environ, "OMP_NUM_THREADS": "2", "TQDM_DISABLE": "1", **(env_extra or {})}
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    server = launch_on_port_0(cmd, log_dir, "server", env, api_key, STARTUP_TIMEOUT_S)
    proc = server.proc
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{server.log_tail()}")
        try:
            if httpx.get(f"{server.base_url}/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    server.stop()
    pytest.fail(f"server not healthy after {STARTUP_TIMEOUT_S:.0f} s:\n{server.log_tail()}")


@pytest.fixture(scope="session")
def smollm2_server(tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("server_logs"), "--max-num-seqs", "16")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> str:
    """A random-weight tiny Llama (with SmolLM2's tokenizer): a server on it starts in seconds,
    for the tests that stop or kill their server and do not care what the text says."""
    from shardserve.testing import write_random_model
    return str(write_random_model(tmp_path_factory.mktemp("tiny_llama"), architecture="llama",
                                  preset="tiny", seed=1))


def core_pid(server: ServerProcess) -> int:
    """The engine core's pid: the server's spawned child that is not multiprocessing's resource
    tracker."""
    for task in Path(f"/proc/{server.proc.pid}/task").iterdir():
        for pid in (task / "children").read_text().split():
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            if b"spawn_main" in cmdline:
                return int(pid)
    raise AssertionError("no engine core process found")


@pytest.fixture(scope="session")
def tiny_server(tmp_path_factory, tiny_llama_dir):
    """A server on the tiny model, for load-shaped tests (disconnect storms, bench serve).
    It schedules asynchronously (two steps in flight), as servers on a GPU do by default, so
    the disconnect storm also checks that aborts with a step in flight free every block; the
    shared SmolLM2 server keeps lock-step scheduling. It answers to two names (vLLM's several
    --served-model-name), the first with a slash as Hugging Face repo ids have."""
    server = start_server(tmp_path_factory.mktemp("tiny_server_logs"), "--max-num-seqs", "16",
                          "--max-model-len", "1024", "--async-scheduling",
                          "--served-model-name", *TINY_SERVER_NAMES, model=tiny_llama_dir)
    yield server
    server.stop()
