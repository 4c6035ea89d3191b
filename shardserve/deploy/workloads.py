"""The workload objects: a Deployment (a group inside one node) or a LeaderWorkerSet (a group
spanning nodes), its Service, PodDisruptionBudget, model-cache PVC and Namespace."""

from __future__ import annotations

from typing import Any

from shardserve.deploy.pod import pod_spec
from shardserve.deploy.spec import DeploySpec

LWS_API = "leaderworkerset.x-k8s.io/v1"
LWS_EXCLUSIVE_TOPOLOGY = "leaderworkerset.sigs.k8s.io/exclusive-topology"
ROLE_LABEL = "shardserve.io/role"  # leader | worker, on LeaderWorkerSet pods


def _meta(spec: DeploySpec, name: str, component: str | None = None,
          **extra: Any) -> dict[str, Any]:
    labels = dict(spec.labels)
    if component:
        labels["app.kubernetes.io/component"] = component
    return {"name": name, "namespace": spec.namespace, "labels": labels, **extra}


def pod_labels(spec: DeploySpec) -> dict[str, str]:
    return {**spec.labels, "app.kubernetes.io/component": "server"}


def namespace(spec: DeploySpec) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": spec.namespace, "labels": dict(spec.labels)}}


def _replicas(spec: DeploySpec) -> dict[str, int]:
    """spec.replicas only without an autoscaler: with one (HPA or KEDA) the field is left to it,
    as the Kubernetes docs advise, or every `kubectl apply` would reset the count it chose."""
    return {"replicas": spec.dp} if spec.autoscaler == "none" else {}


def deployment(spec: DeploySpec) -> dict[str, Any]:
    """dp replicas of one pod with all tp × pp GPUs of its group. Rolling updates add a new
    replica before removing an old one only if a spare group of GPUs exists; maxSurge 0 keeps
    the update within the GPUs the plan counted."""
    labels = pod_labels(spec)
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": _meta(spec, spec.name, "server"),
        "spec": {
            **_replicas(spec),
            "selector": {"matchLabels": labels},
            "strategy": {"type": "RollingUpdate",
                         "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}},
            "template": {"metadata": {"labels": labels},
                         "spec": pod_spec(spec, "server", labels)},
        },
    }


def leader_worker_set(spec: DeploySpec) -> dict[str, Any]:
    """dp groups of nodes_per_group pods, each pod one node's GPUs. The leader (index 0) runs
    `serve` with the engine and HTTP; workers run `worker`. RecreateGroupOnPodRestart: one
    lost rank breaks the whole TP × PP world, so the group restarts together. LeaderCreated
    (LWS's default), not LeaderReady: the leader turns ready (/health) only once the engine
    has loaded, which needs every worker's ranks to check in first, so waiting for a ready
    leader before creating the workers would never end. Workers wait for the leader instead
    (up to --rendezvous-timeout-s)."""
    labels = pod_labels(spec)
    annotations = ({"annotations": {LWS_EXCLUSIVE_TOPOLOGY: spec.group_topology_key}}
                   if spec.group_topology_key else {})
    return {
        "apiVersion": LWS_API, "kind": "LeaderWorkerSet",
        "metadata": _meta(spec, spec.name, "server", **annotations),
        "spec": {
            **_replicas(spec),
            "startupPolicy": "LeaderCreated",
            "rolloutStrategy": {"type": "RollingUpdate",
                                "rollingUpdateConfiguration": {"maxUnavailable": 1,
                                                               "maxSurge": 0}},
            "leaderWorkerTemplate": {
                "size": spec.nodes_per_group,
                "restartPolicy": "RecreateGroupOnPodRestart",
                "leaderTemplate": {"metadata": {"labels": {**labels, ROLE_LABEL: "leader"}},
                                   "spec": pod_spec(spec, "leader", labels)},
                "workerTemplate": {"metadata": {"labels": {**labels, ROLE_LABEL: "worker"}},
                                   "spec": pod_spec(spec, "worker", labels)},
            },
        },
    }


def serving_selector(spec: DeploySpec) -> dict[str, str]:
    """The pods that serve HTTP: every replica pod, or a LeaderWorkerSet's leaders."""
    selector = pod_labels(spec)
    if spec.spans_nodes:
        selector = {**selector, ROLE_LABEL: "leader"}
    return selector


def service(spec: DeploySpec) -> dict[str, Any]:
    """The replicas' OpenAI endpoint and /metrics (what the ServiceMonitor scrapes). With a
    router (router.py), clients use the router's Service instead."""
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": _meta(spec, spec.name, "server"),
        "spec": {"type": "ClusterIP", "selector": serving_selector(spec),
                 "ports": [{"name": "http", "port": spec.port, "targetPort": "http",
                            "protocol": "TCP"}]},
    }


def pod_disruption_budget(spec: DeploySpec) -> dict[str, Any]:
    """Voluntary disruptions (drains, upgrades) take one pod at a time: for a LeaderWorkerSet
    that is at most one group, since any pod's loss recreates its group."""
    return {
        "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
        "metadata": _meta(spec, spec.name, "server"),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": pod_labels(spec)}},
    }


def model_cache_pvc(spec: DeploySpec) -> dict[str, Any]:
    """Shared by every replica (ReadWriteMany): the weights are fetched once."""
    pvc: dict[str, Any] = {
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": _meta(spec, f"{spec.name}-model-cache", "model-cache"),
        "spec": {"accessModes": ["ReadWriteMany"],
                 "resources": {"requests": {"storage": spec.model_cache_size}}},
    }
    if spec.storage_class:
        pvc["spec"]["storageClassName"] = spec.storage_class
    return pvc
