"""The generated LeaderWorkerSet's commands, run for real on loopback: a leader and a worker
started with the LWS_* variables set by hand (as the LWS controller would), their $(VAR)
arguments expanded as the kubelet does, form one TP 2 group over two "nodes" and serve a
request over HTTP."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request

import pytest

from shardserve.deploy import DeploySpec, manifests
from tests.ports import free_port_range


def _kubelet_expand(args: list[str], env: dict[str, str]) -> list[str]:
    """$(NAME) -> env[NAME], as Kubernetes expands container args."""
    return [re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env[m.group(1)], a) for a in args]


def _container(template: dict) -> tuple[list[str], dict[str, str]]:
    container = template["spec"]["containers"][0]
    return container["args"], {e["name"]: e["value"] for e in container["env"]}


def _wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"leader exited with {proc.returncode}: {proc.stdout.read()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} not healthy within {timeout_s} s")


@pytest.mark.multiproc
@pytest.mark.slow
def test_lws_leader_and_worker_serve_a_request(tiny_model_dirs) -> None:
    pytest.importorskip("fastapi")
    master_port, http_port = free_port_range(5), free_port_range(1)
    # TP 2 over two one-"GPU" nodes (PP across nodes is the production shape; TP is what runs
    # on CPU today).
    spec = DeploySpec(model=tiny_model_dirs["llama"], tp=2, pp=1, gpus_per_node=1,
                      allow_tp_across_nodes=True, port=http_port, master_port=master_port,
                      serve_args=["--device=cpu", "--dtype=float32", "--max-model-len=128",
                                  "--kv-cache-memory=4MiB", "--rendezvous-timeout-s=90"])
    lws = manifests(spec)["leaderworkerset.yaml"]
    lwt = lws["spec"]["leaderWorkerTemplate"]
    assert lwt["size"] == 2
    procs: list[subprocess.Popen] = []
    try:
        for index, template in ((1, lwt["workerTemplate"]), (0, lwt["leaderTemplate"])):
            args, env = _container(template)
            env.update(LWS_LEADER_ADDRESS="127.0.0.1", LWS_GROUP_SIZE="2",
                       LWS_WORKER_INDEX=str(index))
            # Loopback only: the pod listens on all interfaces, the test on 127.0.0.1.
            args = [a.replace("--host=0.0.0.0", "--host=127.0.0.1")
                    for a in _kubelet_expand(args, env)]
            proc_env = {**os.environ, **{k: v for k, v in env.items() if not k.startswith("HF_")}}
            procs.append(subprocess.Popen([sys.executable, "-m", "shardserve.cli", *args],
                                          env=proc_env, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))
        leader = procs[1]
        _wait_healthy(f"http://127.0.0.1:{http_port}/health", leader, 150)
        body = json.dumps({"model": spec.model_path, "prompt": "Hello", "max_tokens": 4,
                           "temperature": 0}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{http_port}/v1/completions", body,
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as resp:
            reply = json.loads(resp.read())
        assert reply["choices"][0]["text"] is not None
        assert reply["usage"]["completion_tokens"] == 4
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
