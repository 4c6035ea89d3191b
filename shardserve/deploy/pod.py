"""Pod templates: the serving container (probes, preStop, GPUs, /dev/shm, model cache), the
init container that pre-loads the weights, and the placement rules.

    leader / single-node pod:  shardserve serve  ... HTTP on `port`, probes on /health, /live
    LWS worker pod:            shardserve worker ... no HTTP; exits when node 0 goes away, and
                               RecreateGroupOnPodRestart restarts the whole group
"""

from __future__ import annotations

import math
from typing import Any

from shardserve.deploy.serve_args import engine_only
from shardserve.deploy.spec import MODEL_MOUNT, DeploySpec

# The LeaderWorkerSet controller injects these into every pod of a group.
LWS_LEADER_ADDRESS = "LWS_LEADER_ADDRESS"
LWS_GROUP_SIZE = "LWS_GROUP_SIZE"
LWS_WORKER_INDEX = "LWS_WORKER_INDEX"
PROBE_PERIOD_S = 10


def engine_args(spec: DeploySpec, multi_node: bool, worker: bool = False) -> list[str]:
    """The engine flags common to `serve` and `worker`. The parallel sizes come from the
    pod's TENSOR_PARALLEL_SIZE / PIPELINE_PARALLEL_SIZE (one source, expanded by the kubelet);
    a multi-node group gets its node flags from the LWS variables. A worker gets only the
    engine flags of --serve-arg (`shardserve worker` refuses the server's, e.g. --api-key)."""
    args = [f"--model={spec.model_path}",
            "--tensor-parallel-size=$(TENSOR_PARALLEL_SIZE)",
            "--pipeline-parallel-size=$(PIPELINE_PARALLEL_SIZE)"]
    if multi_node:
        args += [f"--nnodes=$({LWS_GROUP_SIZE})", f"--node-rank=$({LWS_WORKER_INDEX})",
                 f"--master-addr=$({LWS_LEADER_ADDRESS})", f"--master-port={spec.master_port}"]
    return args + (engine_only(spec.serve_args) if worker else list(spec.serve_args))


def serve_args(spec: DeploySpec) -> list[str]:
    args = ["serve", *engine_args(spec, spec.spans_nodes), "--host=0.0.0.0",
            f"--port={spec.port}", f"--shutdown-timeout={spec.shutdown_timeout_s}"]
    names = spec.served_model_name
    if isinstance(names, str):
        names = [names]
    if names and len(names) == 1:
        args.append(f"--served-model-name={names[0]}")
    elif names:  # not --flag=A B: argparse would refuse B as an unrecognized argument
        args += ["--served-model-name", *names]
    return args


def worker_args(spec: DeploySpec) -> list[str]:
    return ["worker", *engine_args(spec, True, worker=True)]


def _env(spec: DeploySpec) -> list[dict[str, Any]]:
    env = {"TENSOR_PARALLEL_SIZE": str(spec.tp), "PIPELINE_PARALLEL_SIZE": str(spec.pp),
           "HF_HOME": f"{MODEL_MOUNT}/.hf", "HF_HUB_OFFLINE": "1", **spec.env}
    return [{"name": k, "value": v} for k, v in env.items()]


def _resources(spec: DeploySpec) -> dict[str, Any]:
    gpus = spec.gpus_per_pod
    memory = f"{spec.memory_per_gpu_gib * gpus}Gi"
    return {"requests": {"cpu": str(spec.cpu_per_gpu * gpus), "memory": memory,
                         "nvidia.com/gpu": gpus},
            "limits": {"memory": memory, "nvidia.com/gpu": gpus}}


def _probes(spec: DeploySpec) -> dict[str, Any]:
    """startup: /health may take model_load_s to turn 200 (loading, profiling, graphs); until
    then liveness and readiness wait. readiness: /health (503 while loading or draining);
    liveness: /live (the process and its engine are alive, even when busy)."""
    http = {"port": "http"}
    return {
        "startupProbe": {"httpGet": {**http, "path": "/health"}, "periodSeconds": PROBE_PERIOD_S,
                         "timeoutSeconds": 5,
                         "failureThreshold": math.ceil(spec.model_load_s / PROBE_PERIOD_S)},
        "readinessProbe": {"httpGet": {**http, "path": "/health"}, "periodSeconds": 5,
                           "timeoutSeconds": 5, "failureThreshold": 3},
        "livenessProbe": {"httpGet": {**http, "path": "/live"}, "periodSeconds": PROBE_PERIOD_S,
                          "timeoutSeconds": 10, "failureThreshold": 6},
    }


def _volumes(spec: DeploySpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(volumes, mounts): a memory-backed /dev/shm (NCCL and the engine's shared-memory
    broadcast need more than the container default 64 MiB) and the model cache."""
    if spec.model_cache == "hostpath":
        cache = {"name": "model-cache",
                 "hostPath": {"path": spec.model_cache_path, "type": "DirectoryOrCreate"}}
    else:
        cache = {"name": "model-cache",
                 "persistentVolumeClaim": {"claimName": f"{spec.name}-model-cache"}}
    volumes = [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.shm_size}},
               cache]
    mounts = [{"name": "dshm", "mountPath": "/dev/shm"},
              {"name": "model-cache", "mountPath": MODEL_MOUNT}]
    return volumes, mounts


def preload_container(spec: DeploySpec) -> dict[str, Any]:
    """Fetch the weights into the cache if asked and absent, then read them once so the page
    cache is warm: the server's start then costs GPU copies, not disk or network reads."""
    fetch = ""
    if spec.download_from:
        # `hf`: huggingface_hub 1.0 dropped the old `huggingface-cli` command.
        fetch = (f'if [ ! -f "$MODEL_PATH/config.json" ]; then HF_HUB_OFFLINE=0 '
                 f'hf download {spec.download_from} --local-dir "$MODEL_PATH"; fi; ')
    script = (f"set -e; {fetch}"
              'if [ ! -e "$MODEL_PATH" ]; then echo "no model at $MODEL_PATH: copy it into the '
              'model cache volume or pass --download-from" >&2; exit 1; fi; '
              'find "$MODEL_PATH" -type f \\( -name "*.safetensors" -o -name "*.gguf" \\) '
              '-exec cat {} + > /dev/null; echo "model pre-loaded"')
    env: list[dict[str, Any]] = [{"name": "MODEL_PATH", "value": spec.model_path}]
    if spec.download_from and spec.hf_token_secret:  # `hf download` reads $HF_TOKEN
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {
            "name": spec.hf_token_secret, "key": "token"}}})
    return {"name": "preload-model", "image": spec.image, "command": ["sh", "-c", script],
            "env": env, "volumeMounts": [{"name": "model-cache", "mountPath": MODEL_MOUNT}]}


def _affinity(spec: DeploySpec) -> dict[str, Any] | None:
    """Require nodes of the named GPU product (--gpu-product), if one is named. Nothing else:
    the nvidia.com/gpu request already keeps the pod off nodes without free GPUs, and a label
    such as nvidia.com/gpu.present exists only where NVIDIA's GPU feature discovery runs
    (not on GKE's or AKS's own GPU nodes), where requiring it leaves every pod Pending."""
    if not spec.gpu_product:
        return None
    terms = [{"key": "nvidia.com/gpu.product", "operator": "In", "values": [spec.gpu_product]}]
    return {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": terms}]}}}


def pod_spec(spec: DeploySpec, role: str, pod_labels: dict[str, str]) -> dict[str, Any]:
    """role: 'server' (a single-node replica), 'leader' or 'worker' (LWS)."""
    volumes, mounts = _volumes(spec)
    container: dict[str, Any] = {
        "name": "shardserve", "image": spec.image, "imagePullPolicy": "IfNotPresent",
        "command": ["shardserve"],
        "args": worker_args(spec) if role == "worker" else serve_args(spec),
        "env": _env(spec), "resources": _resources(spec), "volumeMounts": mounts,
    }
    ports = []
    if role != "worker":
        ports.append({"name": "http", "containerPort": spec.port, "protocol": "TCP"})
        container.update(_probes(spec))
        # Endpoints controllers and proxies drop the pod before SIGTERM reaches the server.
        container["lifecycle"] = {"preStop": {"exec": {
            "command": ["sleep", str(spec.prestop_sleep_s)]}}}
    if spec.spans_nodes:
        # The torch.distributed store, then the engine's step/result/heartbeat sockets.
        ports += [{"name": f"dist-{i}", "containerPort": spec.master_port + i, "protocol": "TCP"}
                  for i in range(5)]
    if ports:
        container["ports"] = ports
    affinity = _affinity(spec)
    out: dict[str, Any] = {
        "terminationGracePeriodSeconds": spec.grace_period_s,
        # The image's user; fsGroup lets it write the (PVC) model cache.
        "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "fsGroup": 1000},
        **({"affinity": affinity} if affinity else {}),
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "initContainers": [preload_container(spec)],
        "containers": [container],
        "volumes": volumes,
    }
    if not spec.spans_nodes:
        out["topologySpreadConstraints"] = [{
            "maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
            "whenUnsatisfiable": "ScheduleAnyway",
            "labelSelector": {"matchLabels": dict(pod_labels)}}]
    return out
