"""Autoscaling on the server's own metrics: waiting requests per replica and requests per
second per replica, through an autoscaling/v2 HPA (metrics from prometheus-adapter) or a KEDA
ScaledObject (its Prometheus scaler).

A replica takes model_load_s to become ready, so the windows follow it: scale up by at most
half the range per load time (the HPA would otherwise keep adding replicas while the first
new ones load), and scale down only after twice the load time of low load (a replica thrown
away costs a full reload to get back). minReplicas stays >= 1: a warm replica is always up.
"""

from __future__ import annotations

from typing import Any

from shardserve.deploy.spec import DeploySpec
from shardserve.deploy.workloads import LWS_API

# The server's Prometheus names (server/metrics.py: vLLM's names under `shardserve:`).
METRIC_WAITING = "shardserve:num_requests_waiting"
METRIC_REQUESTS = "shardserve:request_success_total"
# prometheus-adapter exposes them to the HPA under these names (':' is not allowed there).
ADAPTER_WAITING = "shardserve_num_requests_waiting"
ADAPTER_QPS = "shardserve_requests_per_second"


def _clamp(value: int, low: int, high: int) -> int:
    return max(low, min(high, value))


def scale_target(spec: DeploySpec) -> dict[str, str]:
    if spec.spans_nodes:
        return {"apiVersion": LWS_API, "kind": "LeaderWorkerSet", "name": spec.name}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "name": spec.name}


def behavior(spec: DeploySpec) -> dict[str, Any]:
    load = spec.model_load_s
    return {
        "scaleUp": {"stabilizationWindowSeconds": 30, "selectPolicy": "Max",
                    "policies": [{"type": "Pods", "value": max(1, spec.replicas_max // 2),
                                  "periodSeconds": _clamp(load, 60, 1800)}]},
        "scaleDown": {"stabilizationWindowSeconds": _clamp(2 * load, 300, 3600),
                      "selectPolicy": "Min",
                      "policies": [{"type": "Pods", "value": 1,
                                    "periodSeconds": _clamp(load, 60, 1800)}]},
    }


def _meta(spec: DeploySpec) -> dict[str, Any]:
    return {"name": spec.name, "namespace": spec.namespace,
            "labels": {**spec.labels, "app.kubernetes.io/component": "autoscaler"}}


def hpa(spec: DeploySpec) -> dict[str, Any]:
    def pods_metric(name: str, target: float) -> dict[str, Any]:
        return {"type": "Pods", "pods": {"metric": {"name": name},
                                         "target": {"type": "AverageValue",
                                                    "averageValue": _quantity(target)}}}

    return {
        "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
        "metadata": _meta(spec),
        "spec": {"scaleTargetRef": scale_target(spec),
                 "minReplicas": spec.replicas_min, "maxReplicas": spec.replicas_max,
                 "metrics": [pods_metric(ADAPTER_WAITING, spec.target_waiting_per_replica),
                             pods_metric(ADAPTER_QPS, spec.target_qps_per_replica)],
                 "behavior": behavior(spec)},
    }


def _quantity(value: float) -> str:
    """A Kubernetes quantity: whole numbers plain, fractions in milli-units."""
    return str(int(value)) if float(value).is_integer() else f"{int(round(value * 1000))}m"


def prometheus_queries(spec: DeploySpec) -> dict[str, str]:
    """Totals over the deployment's serving pods (the ServiceMonitor labels each series with
    its Service); KEDA divides them by the replica count (AverageValue)."""
    where = f'namespace="{spec.namespace}",service="{spec.name}"'
    return {"waiting": f"sum({METRIC_WAITING}{{{where}}})",
            "qps": f"sum(rate({METRIC_REQUESTS}{{{where}}}[1m]))"}


def keda_scaled_object(spec: DeploySpec) -> dict[str, Any]:
    queries = prometheus_queries(spec)

    def trigger(name: str, query: str, threshold: float) -> dict[str, Any]:
        return {"type": "prometheus", "name": name, "metricType": "AverageValue",
                "metadata": {"serverAddress": spec.prometheus_url, "query": query,
                             "threshold": str(threshold)}}

    return {
        "apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject",
        "metadata": _meta(spec),
        "spec": {"scaleTargetRef": scale_target(spec),
                 "minReplicaCount": spec.replicas_min, "maxReplicaCount": spec.replicas_max,
                 "pollingInterval": 15,
                 "advanced": {"horizontalPodAutoscalerConfig": {"name": spec.name,
                                                                "behavior": behavior(spec)}},
                 "triggers": [trigger("waiting-requests", queries["waiting"],
                                      spec.target_waiting_per_replica),
                              trigger("requests-per-second", queries["qps"],
                                      spec.target_qps_per_replica)]},
    }


def prometheus_adapter_values() -> dict[str, Any]:
    """Helm values for prometheus-community/prometheus-adapter that expose the two metrics the
    HPA reads, per pod. Install once per cluster; not part of the kustomization."""
    resources = {"overrides": {"namespace": {"resource": "namespace"},
                               "pod": {"resource": "pod"}}}
    return {"rules": {"default": False, "custom": [
        {"seriesQuery": f'{METRIC_WAITING}{{namespace!="",pod!=""}}', "resources": resources,
         "name": {"matches": f"^{METRIC_WAITING}$", "as": ADAPTER_WAITING},
         "metricsQuery": "sum(<<.Series>>{<<.LabelMatchers>>}) by (<<.GroupBy>>)"},
        {"seriesQuery": f'{METRIC_REQUESTS}{{namespace!="",pod!=""}}', "resources": resources,
         "name": {"matches": f"^{METRIC_REQUESTS}$", "as": ADAPTER_QPS},
         "metricsQuery": "sum(rate(<<.Series>>{<<.LabelMatchers>>}[1m])) by (<<.GroupBy>>)"},
    ]}}
