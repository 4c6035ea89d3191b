"""DeploySpec: everything the Kubernetes generator needs, from flags or from a saved plan.

One replica is one model-parallel group of tp × pp GPUs. A group that fits one node is one
pod; a group larger than a node takes `nodes_per_group` whole nodes, one pod per node (a
LeaderWorkerSet), TP within each node and PP across them.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shardserve.config_defaults import DEFAULT_MAX_CUDA_GRAPH_BATCH_SIZE
from shardserve.errors import InvalidRequestError

MODEL_MOUNT = "/models"
_DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")  # a Secret's name
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?([KMGTPE]i|[kMGTPE])?$")  # a PVC's storage size


@dataclass
class DeploySpec:
    """The settings of one generated deployment. Times are seconds."""

    model: str  # the path the server loads, inside the container (under MODEL_MOUNT)
    tp: int = 1
    pp: int = 1
    dp: int = 1
    gpus_per_node: int = 8
    name: str = "shardserve"
    namespace: str = "default"
    image: str = "shardserve:latest"
    served_model_name: str | list[str] | None = None  # several: aliases, the first reported
    serve_args: list[str] = field(default_factory=list)  # extra engine flags (--max-model-len ...)
    gpu_product: str | None = None  # node label nvidia.com/gpu.product to require
    # LWS exclusive topology: each domain of this node label holds one whole group and no
    # other. Opt-in: a default such as the zone would leave every group past the number of
    # zones Pending (most GPU clusters are one zone).
    group_topology_key: str | None = None
    # TP's all-reduce runs twice per layer: across nodes only on a fast fabric (or in tests).
    allow_tp_across_nodes: bool = False
    port: int = 8000
    master_port: int = 29500  # torch.distributed store; the engine uses the next 4 ports too
    # Kubernetes' stop: preStop sleep (endpoints drain from Services first), then SIGTERM and
    # the server's own --shutdown-timeout for requests in flight; grace must cover both.
    prestop_sleep_s: int = 10
    shutdown_timeout_s: int = 30
    grace_margin_s: int = 15
    termination_grace_s: int | None = None  # None: prestop + shutdown + margin
    model_load_s: int = 600  # worst-case load time: startup probe budget, autoscaler windows
    autoscaler: str = "hpa"  # hpa | keda | none
    min_replicas: int = 1  # warm: never scale to zero (a cold load takes model_load_s)
    max_replicas: int | None = None  # None: dp
    standby_replicas: int = 0  # extra warm replicas kept above minReplicas
    target_waiting_per_replica: float = 4.0  # shardserve:num_requests_waiting per replica
    target_qps_per_replica: float = 8.0  # finished requests per second per replica
    prometheus_url: str = "http://prometheus-operated.monitoring.svc:9090"  # KEDA's source
    model_cache: str = "pvc"  # pvc | hostpath
    model_cache_size: str = "200Gi"
    model_cache_path: str = "/mnt/nvme/shardserve-models"  # hostPath: local NVMe on each node
    storage_class: str | None = None
    download_from: str | None = None  # a Hugging Face repo id the init container fetches
    # A Secret whose key `token` is a Hugging Face token (as in vLLM's Kubernetes guide):
    # gated repos (Llama, Gemma) refuse --download-from without one.
    hf_token_secret: str | None = None
    # A router in front of the replicas (`shardserve router` over a headless Service): clients
    # then get per-request least-load / prefix-aware balancing, failover and 503 on overload
    # instead of kube-proxy's per-connection pick. None: on when there can be more than one
    # replica (dp or --max-replicas above 1).
    router: bool | None = None
    router_policy: str = "prefix-aware"  # shared prefixes stay in one replica's prefix cache
    router_replicas: int = 2  # rendezvous hashing: every router picks the same replica
    shm_size: str = "16Gi"
    cpu_per_gpu: int = 8
    memory_per_gpu_gib: int = 32
    env: dict[str, str] = field(default_factory=dict)

    # ---- derived ---------------------------------------------------------------------------

    @property
    def gpus_per_group(self) -> int:
        return self.tp * self.pp

    @property
    def spans_nodes(self) -> bool:
        return self.gpus_per_group > self.gpus_per_node

    @property
    def nodes_per_group(self) -> int:
        return math.ceil(self.gpus_per_group / self.gpus_per_node)

    @property
    def gpus_per_pod(self) -> int:
        return self.gpus_per_group // self.nodes_per_group

    @property
    def grace_period_s(self) -> int:
        return self.termination_grace_s if self.termination_grace_s is not None else self.min_grace_s

    @property
    def min_grace_s(self) -> int:
        return self.prestop_sleep_s + self.shutdown_timeout_s + self.grace_margin_s

    @property
    def replicas_max(self) -> int:
        return self.max_replicas if self.max_replicas is not None else max(self.dp, 1)

    @property
    def replicas_min(self) -> int:
        return min(max(self.min_replicas, 1) + self.standby_replicas, self.replicas_max)

    @property
    def with_router(self) -> bool:
        return self.router if self.router is not None else self.replicas_max > 1

    @property
    def model_path(self) -> str:
        return self.model if self.model.startswith("/") else f"{MODEL_MOUNT}/{self.model}"

    @property
    def labels(self) -> dict[str, str]:
        """The selector labels every object of this deployment shares."""
        return {"app.kubernetes.io/name": "shardserve", "app.kubernetes.io/instance": self.name}

    def check(self) -> "DeploySpec":
        """Refuse settings the objects could not honour; each message says what to change."""
        if not _DNS1123.match(self.name) or len(self.name) > 40:
            raise InvalidRequestError(f"--name {self.name!r} must be a DNS-1123 label of at "
                                      "most 40 characters (lower case, digits, '-').", "name")
        if not _DNS1123.match(self.namespace):
            raise InvalidRequestError(f"--namespace {self.namespace!r} is not a DNS-1123 label.",
                                      "namespace")
        for key in ("tp", "pp", "dp", "gpus_per_node"):
            if getattr(self, key) < 1:
                raise InvalidRequestError(f"{key} must be at least 1.", key)
        tp_split = self.gpus_per_node % self.tp and not self.allow_tp_across_nodes
        if self.spans_nodes and (self.gpus_per_group % self.gpus_per_node or tp_split):
            raise InvalidRequestError(
                f"A group of TP {self.tp} × PP {self.pp} = {self.gpus_per_group} GPUs spans nodes "
                f"of {self.gpus_per_node} GPUs, so it must take whole nodes with TP inside each "
                "(TP dividing --gpus-per-node, TP × PP a multiple of it; or pass "
                "--allow-tp-across-nodes on a fast inter-node fabric).", "gpus_per_node")
        if self.grace_period_s < self.min_grace_s:
            raise InvalidRequestError(
                f"terminationGracePeriodSeconds {self.grace_period_s} is shorter than preStop "
                f"{self.prestop_sleep_s} + shutdown timeout {self.shutdown_timeout_s} + margin "
                f"{self.grace_margin_s} = {self.min_grace_s} s: requests in flight would be "
                "killed.", "termination_grace_s")
        if self.autoscaler not in ("hpa", "keda", "none"):
            raise InvalidRequestError("--autoscaler must be hpa, keda or none.", "autoscaler")
        if self.model_cache not in ("pvc", "hostpath"):
            raise InvalidRequestError("--model-cache must be pvc or hostpath.", "model_cache")
        from shardserve.router.policy import POLICIES
        if self.router_policy not in POLICIES:
            raise InvalidRequestError(f"--router-policy must be one of {', '.join(POLICIES)}.",
                                      "router_policy")
        for key, flag in (("model_load_s", "--model-load-seconds"),
                          ("target_waiting_per_replica", "--target-waiting-per-replica"),
                          ("target_qps_per_replica", "--target-qps-per-replica")):
            if getattr(self, key) <= 0:  # probe thresholds and HPA targets must be positive
                raise InvalidRequestError(f"{flag} must be positive, got {getattr(self, key)}.",
                                          key)
        for key, flag in (("shutdown_timeout_s", "--shutdown-timeout"),
                          ("prestop_sleep_s", "--prestop-sleep"),
                          ("standby_replicas", "--standby-replicas")):
            if getattr(self, key) < 0:
                raise InvalidRequestError(f"{flag} must not be negative, got "
                                          f"{getattr(self, key)}.", key)
        if self.hf_token_secret is not None and not _DNS1123_SUBDOMAIN.match(self.hf_token_secret):
            raise InvalidRequestError(f"--hf-token-secret {self.hf_token_secret!r} is not a "
                                      "Secret name (lower case, digits, '-', '.').",
                                      "hf_token_secret")
        if not _QUANTITY.match(str(self.model_cache_size)):
            raise InvalidRequestError(f"--model-cache-size {self.model_cache_size!r} is not a "
                                      "Kubernetes quantity, e.g. 200Gi.", "model_cache_size")
        from shardserve.deploy.serve_args import check_serve_args
        check_serve_args(self.serve_args)
        if self.router_replicas < 1:
            raise InvalidRequestError("--router-replicas must be at least 1.", "router_replicas")
        if self.replicas_max < 1:
            raise InvalidRequestError("--max-replicas must be at least 1.", "max_replicas")
        # replicas_min is capped at the maximum (standby replicas stop there); the floor the
        # user asked for is not, so compare that one.
        if max(self.min_replicas, 1) > self.replicas_max:
            raise InvalidRequestError(f"--min-replicas {self.min_replicas} exceeds the maximum "
                                      f"of {self.replicas_max} replicas (--max-replicas, default "
                                      "the DP size); lower it or raise --max-replicas.",
                                      "min_replicas")
        return self


def spec_from_plan(plan: dict[str, Any] | str | Path, **overrides: Any) -> DeploySpec:
    """A DeploySpec from `shardserve plan --json` output (its recommended layout and serving
    settings); `overrides` (model, image, ...) win over the plan."""
    source = "(given as a dict)" if isinstance(plan, dict) else str(plan)
    if not isinstance(plan, dict):
        try:
            plan = json.loads(Path(plan).read_text())
        except OSError as err:
            raise InvalidRequestError(f"Cannot read the plan {plan}: {err}", "plan") from err
        except ValueError as err:  # e.g. the table `shardserve plan` prints without --json
            raise InvalidRequestError(f"The plan {plan} is not JSON ({err}): write it with "
                                      "`shardserve plan ... --json > plan.json`.", "plan") from err
    if not isinstance(plan, dict) or "recommended" not in plan:
        raise InvalidRequestError(f"The plan {source} is not the output of `shardserve plan "
                                  "--json` (no 'recommended' layout); re-create it with --json.",
                                  "plan")
    try:
        values = _plan_values(plan)
    except (KeyError, TypeError, AttributeError) as err:  # edited or truncated by hand
        what = f"no {err}" if isinstance(err, KeyError) else str(err)
        raise InvalidRequestError(f"The plan {source} is incomplete ({what}); re-create it "
                                  "with `shardserve plan ... --json`.", "plan") from None
    values.update({k: v for k, v in overrides.items() if v is not None})
    return DeploySpec(**values)


def _plan_values(plan: dict[str, Any]) -> dict[str, Any]:
    """The DeploySpec fields a plan gives: its recommended layout and serving settings."""
    best = plan.get("recommended")
    if not best:
        raise InvalidRequestError("The plan has no feasible layout to deploy (its 'recommended' "
                                  "is empty); re-plan with more or larger GPUs.", "plan")
    serving, hardware = plan.get("serving", {}), plan.get("hardware", {})
    model = plan.get("model", {})
    args = [f"--max-model-len={serving['max_model_len']}",
            f"--gpu-memory-utilization={serving['gpu_memory_utilization']}",
            f"--dtype={serving['dtype']}", f"--max-num-seqs={serving['max_num_seqs']}",
            f"--max-num-batched-tokens={serving['max_num_batched_tokens']}",
            f"--block-size={serving['block_size']}"]
    # The plan's CUDA-graph memory assumed these; the server's defaults would capture graphs
    # the plan did not count (or more of them).
    if serving.get("enforce_eager"):
        args.append("--enforce-eager")
    else:
        if serving.get("max_cuda_graph_batch_size") not in (None,
                                                             DEFAULT_MAX_CUDA_GRAPH_BATCH_SIZE):
            args.append(f"--max-cuda-graph-batch-size={serving['max_cuda_graph_batch_size']}")
        if serving.get("mixed_cuda_graphs") is False:
            args.append("--no-mixed-cuda-graphs")
    if serving.get("kv_cache_dtype", "auto") != "auto":
        args.append(f"--kv-cache-dtype={serving['kv_cache_dtype']}")
    if serving.get("quantization"):  # the plan's weight bytes assumed it
        args.append(f"--quantization={serving['quantization']}")
    if serving.get("enable_expert_parallel"):  # the plan's memory per GPU assumed EP sharding
        args.append("--enable-expert-parallel")
    values: dict[str, Any] = {
        # The folder or .gguf file the plan read (a GGUF's name alone lacks its suffix).
        "model": model.get("model_file") or model.get("name", "model"),
        "tp": best["tensor_parallel_size"], "pp": best["pipeline_parallel_size"],
        "dp": best["data_parallel_size"],
        "gpus_per_node": hardware.get("gpus_per_node", best["tensor_parallel_size"]),
        "serve_args": args,
        "model_cache_size": _cache_size(plan),
    }
    return values


def _cache_size(plan: dict[str, Any]) -> str:
    """Room for the checkpoint (bf16 bytes of every parameter) with a quarter to spare."""
    params = plan.get("model", {}).get("num_params") or 0
    gib = math.ceil(params * 2 * 1.25 / 2**30) if params else 200
    return f"{max(gib, 10)}Gi"
