"""One tiny-model server (CPU, --api-key) shared by the dashboard tests, and a load generator
that keeps requests flowing while a test looks at the page."""

from __future__ import annotations

import threading

import httpx
import pytest

from tests.server.conftest import API_KEY, start_server

AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="session")
def dashboard_server(tmp_path_factory):
    from shardserve.testing import write_random_model
    model = write_random_model(tmp_path_factory.mktemp("dash_model"), architecture="llama",
                               preset="tiny", seed=1)
    server = start_server(tmp_path_factory.mktemp("dash_logs"), "--max-num-seqs", "8",
                          model=str(model))
    yield server
    server.stop()


class Load:
    """`num_threads` clients sending short completions back to back until stopped. The prompts
    share a prefix, so the prefix cache has hits to show."""

    def __init__(self, base_url: str, num_threads: int = 2, max_tokens: int = 12) -> None:
        self.base_url = base_url
        self.max_tokens = max_tokens
        self.stop_event = threading.Event()
        self.num_done = 0
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                        for i in range(num_threads)]

    def __enter__(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(60)

    def _run(self, index: int) -> None:
        n = 0
        with httpx.Client(timeout=60, headers=AUTH) as client:
            while not self.stop_event.is_set():
                prompt = "A prefix every request shares, for the cache. " * 4 + f"{index} {n}"
                r = client.post(f"{self.base_url}/v1/completions",
                                json={"prompt": prompt, "max_tokens": self.max_tokens,
                                      "ignore_eos": True})
                if r.status_code != 200:
                    self.errors.append(f"{r.status_code} {r.text[:200]}")
                self.num_done += 1
                n += 1
