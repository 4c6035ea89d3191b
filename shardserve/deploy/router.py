"""The router in front of the replicas (on when there can be more than one; `--router`,
`--no-router`): clients call `<name>-router`, which balances each request over the replica pods.

    <name>-replicas   headless Service over the serving pods (LWS: leaders): its DNS name
                      resolves to one address per ready pod, which the router re-reads every
                      probe interval (`shardserve router --backends-dns NAME:PORT`)
    <name>-router     Deployment of `shardserve router` pods and the ClusterIP Service clients
                      use, plus a PodDisruptionBudget

Why a router rather than the replicas' own ClusterIP Service alone: kube-proxy picks a pod per
connection, so a client on one keep-alive connection loads one replica; the router picks per
request (fewest outstanding, or the replica whose prefix cache holds the prompt's prefix),
retries a request that failed before its first byte elsewhere and answers 503 + Retry-After when
every replica is saturated. The default policy is prefix-aware: separate pods have separate
prefix caches, and rendezvous hashing over the pod addresses sends a prefix to the same replica
from every router pod, so several routers agree without talking to each other.

The `<name>` Service stays: the ServiceMonitor scrapes the replicas through it (the routers'
own series come from a ServiceMonitor of their own, without the replicas' series; see
monitoring.py), and it still reaches the replicas directly.
"""

from __future__ import annotations

from typing import Any

from shardserve.deploy.spec import DeploySpec
from shardserve.deploy.workloads import serving_selector

COMPONENT = "app.kubernetes.io/component"
# One asyncio event loop per router: a core's worth of CPU, no CPU limit (throttling a proxy
# adds latency to every stream through it); memory for buffers of many open streams.
ROUTER_CPU, ROUTER_MEMORY, ROUTER_MEMORY_LIMIT = "1", "512Mi", "1Gi"


def router_name(spec: DeploySpec) -> str:
    return f"{spec.name}-router"


def headless_name(spec: DeploySpec) -> str:
    return f"{spec.name}-replicas"


def router_labels(spec: DeploySpec) -> dict[str, str]:
    return {**spec.labels, COMPONENT: "router"}


def _meta(spec: DeploySpec, name: str, component: str) -> dict[str, Any]:
    return {"name": name, "namespace": spec.namespace,
            "labels": {**spec.labels, COMPONENT: component}}


def router_args(spec: DeploySpec) -> list[str]:
    # <service>.<namespace>.svc: resolves through the pod's DNS search list whatever the
    # cluster's domain is.
    dns = f"{headless_name(spec)}.{spec.namespace}.svc:{spec.port}"
    return ["router", "--host=0.0.0.0", f"--port={spec.port}", f"--backends-dns={dns}",
            f"--policy={spec.router_policy}"]


def headless_service(spec: DeploySpec) -> dict[str, Any]:
    """Only ready pods are listed: one that is loading or draining (its /health is 503, so its
    readiness fails) leaves the router's set with the next DNS read. Its own component label
    keeps it out of the replicas' ServiceMonitor, which would scrape every pod twice."""
    return _http_service(spec, headless_name(spec), "replicas", serving_selector(spec),
                         {"clusterIP": "None"})


def _probes() -> dict[str, Any]:
    """readiness: /health, 503 while no replica is healthy, so the Service sends nothing to a
    router that cannot reach one; liveness: /live (the process answers)."""
    http = {"port": "http"}
    return {
        "startupProbe": {"httpGet": {**http, "path": "/live"}, "periodSeconds": 2,
                         "timeoutSeconds": 2, "failureThreshold": 30},
        "readinessProbe": {"httpGet": {**http, "path": "/health"}, "periodSeconds": 5,
                           "timeoutSeconds": 5, "failureThreshold": 2},
        "livenessProbe": {"httpGet": {**http, "path": "/live"}, "periodSeconds": 10,
                          "timeoutSeconds": 5, "failureThreshold": 3},
    }


def router_deployment(spec: DeploySpec) -> dict[str, Any]:
    """Stateless pods without GPUs. A stopping router first leaves the Service (preStop sleep),
    then finishes its open streams within the same grace period as a replica's."""
    labels = router_labels(spec)
    container = {
        "name": "router", "image": spec.image, "imagePullPolicy": "IfNotPresent",
        "command": ["shardserve"], "args": router_args(spec),
        "ports": [{"name": "http", "containerPort": spec.port, "protocol": "TCP"}],
        "resources": {"requests": {"cpu": ROUTER_CPU, "memory": ROUTER_MEMORY},
                      "limits": {"memory": ROUTER_MEMORY_LIMIT}},
        **_probes(),
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", str(spec.prestop_sleep_s)]}}},
    }
    pod = {
        "terminationGracePeriodSeconds": spec.grace_period_s,
        "securityContext": {"runAsNonRoot": True, "runAsUser": 1000},
        "containers": [container],
        "topologySpreadConstraints": [{
            "maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
            "whenUnsatisfiable": "ScheduleAnyway", "labelSelector": {"matchLabels": labels}}],
    }
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": _meta(spec, router_name(spec), "router"),
        "spec": {
            "replicas": spec.router_replicas,
            "selector": {"matchLabels": labels},
            # Cheap pods: start the new one before the old one goes, so the endpoint stays up.
            "strategy": {"type": "RollingUpdate",
                         "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {"metadata": {"labels": labels}, "spec": pod},
        },
    }


def router_service(spec: DeploySpec) -> dict[str, Any]:
    """What clients call: http://<name>-router.<namespace>.svc:<port>/v1/..."""
    return _http_service(spec, router_name(spec), "router", router_labels(spec),
                         {"type": "ClusterIP"})


def _http_service(spec: DeploySpec, name: str, component: str, selector: dict[str, str],
                  kind_fields: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": _meta(spec, name, component),
        "spec": {**kind_fields, "selector": selector,
                 "ports": [{"name": "http", "port": spec.port, "targetPort": "http",
                            "protocol": "TCP"}]},
    }


def router_pdb(spec: DeploySpec) -> dict[str, Any]:
    return {
        "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
        "metadata": _meta(spec, router_name(spec), "router"),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": router_labels(spec)}},
    }
