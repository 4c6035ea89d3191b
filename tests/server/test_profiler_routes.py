"""POST /start_profile and /stop_profile (vLLM's): only with $SHARDSERVE_TORCH_PROFILER_DIR,
behind the API key, every TP rank writing its own trace, requests in flight unharmed."""

from __future__ import annotations

import json
import threading

import httpx

from tests.server.conftest import start_server


def _post(server, path: str, **kwargs) -> httpx.Response:
    return httpx.post(f"{server.base_url}{path}", headers=server.headers, timeout=120, **kwargs)


def test_routes_are_absent_without_the_directory(tiny_server):
    assert _post(tiny_server, "/start_profile").status_code == 404


def test_profile_every_rank_while_requests_run(tmp_path, tiny_llama_dir):
    out = tmp_path / "profiles"
    server = start_server(tmp_path, "-tp", "2", "--async-scheduling", model=tiny_llama_dir,
                          env_extra={"SHARDSERVE_TORCH_PROFILER_DIR": str(out)})
    try:
        assert httpx.post(f"{server.base_url}/start_profile", timeout=30).status_code == 401
        early = _post(server, "/stop_profile")
        assert early.status_code == 409 and early.json()["error"]["code"] == "profiler_state"

        results: list[httpx.Response] = []

        def complete() -> None:
            results.append(_post(server, "/v1/completions", json={
                "prompt": "Once upon a time", "max_tokens": 96, "ignore_eos": True}))

        worker = threading.Thread(target=complete)
        worker.start()  # profiling starts and stops with this request's steps in flight
        started = _post(server, "/start_profile")
        assert started.status_code == 200, started.text
        assert _post(server, "/start_profile").status_code == 409
        stopped = _post(server, "/stop_profile")
        worker.join(120)
        assert stopped.status_code == 200, stopped.text
        ranks = stopped.json()["ranks"]
        assert [r["rank"] for r in ranks] == [0, 1]
        for r in ranks:
            with open(r["trace"]) as fh:
                assert json.load(fh)["traceEvents"]
        assert sorted(p.name for p in out.iterdir()) == [
            "kernels_rank0.txt", "kernels_rank1.txt", "trace_rank0.json", "trace_rank1.json"]
        assert results and results[0].status_code == 200, results
        assert results[0].json()["usage"]["completion_tokens"] == 96
        # Still serving afterwards.
        again = _post(server, "/v1/completions", json={"prompt": "Hi", "max_tokens": 4})
        assert again.status_code == 200
    finally:
        server.stop()
