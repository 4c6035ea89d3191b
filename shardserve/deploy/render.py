"""Assemble every object of a DeploySpec into files: plain YAML (one object per file), the
Grafana dashboard JSON, a Dockerfile and a kustomization.yaml that `kubectl apply -k` takes.

    namespace.yaml                 (unless the namespace is 'default')
    deployment.yaml | leaderworkerset.yaml
    service.yaml  pdb.yaml  model-cache-pvc.yaml (pvc cache)
    replicas-headless-service.yaml  router-deployment.yaml  router-service.yaml  router-pdb.yaml
                                   (with a router: more than one replica, or --router)
    hpa.yaml | keda-scaledobject.yaml       servicemonitor.yaml  router-servicemonitor.yaml
    grafana-dashboard.json         -> a ConfigMap through kustomize's configMapGenerator
    prometheus-adapter-values.yaml (HPA: Helm values for the cluster's prometheus-adapter)
    Dockerfile   kustomization.yaml
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from shardserve.deploy import autoscaling, monitoring, router, workloads
from shardserve.deploy.dockerfile import dockerfile
from shardserve.deploy.spec import DeploySpec


def manifests(spec: DeploySpec) -> dict[str, dict[str, Any]]:
    """file name -> Kubernetes object, in apply order."""
    spec.check()
    out: dict[str, dict[str, Any]] = {}
    if spec.namespace != "default":
        out["namespace.yaml"] = workloads.namespace(spec)
    if spec.model_cache == "pvc":
        out["model-cache-pvc.yaml"] = workloads.model_cache_pvc(spec)
    if spec.spans_nodes:
        out["leaderworkerset.yaml"] = workloads.leader_worker_set(spec)
    else:
        out["deployment.yaml"] = workloads.deployment(spec)
    out["service.yaml"] = workloads.service(spec)
    out["pdb.yaml"] = workloads.pod_disruption_budget(spec)
    if spec.with_router:
        out["replicas-headless-service.yaml"] = router.headless_service(spec)
        out["router-deployment.yaml"] = router.router_deployment(spec)
        out["router-service.yaml"] = router.router_service(spec)
        out["router-pdb.yaml"] = router.router_pdb(spec)
    if spec.autoscaler == "hpa":
        out["hpa.yaml"] = autoscaling.hpa(spec)
    elif spec.autoscaler == "keda":
        out["keda-scaledobject.yaml"] = autoscaling.keda_scaled_object(spec)
    out["servicemonitor.yaml"] = monitoring.service_monitor(spec)
    if spec.with_router:
        out["router-servicemonitor.yaml"] = monitoring.router_service_monitor(spec)
    return out


def kustomization(spec: DeploySpec, resources: list[str]) -> dict[str, Any]:
    return {
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "namespace": spec.namespace,
        "resources": resources,
        # Grafana's sidecar loads ConfigMaps labelled grafana_dashboard=1.
        "configMapGenerator": [{
            "name": f"{spec.name}-grafana-dashboard", "files": ["grafana-dashboard.json"],
            "options": {"disableNameSuffixHash": True,
                        "labels": {"grafana_dashboard": "1", **spec.labels}}}],
    }


def dump_yaml(obj: Any) -> str:
    # Keys keep their logical order (apiVersion, kind, metadata, spec); block style reads best.
    return yaml.safe_dump(obj, sort_keys=False, default_flow_style=False, width=100)


def render(spec: DeploySpec) -> dict[str, str]:
    """file name -> text, everything `write` puts in the output folder."""
    objects = manifests(spec)
    files = {name: dump_yaml(obj) for name, obj in objects.items()}
    files["grafana-dashboard.json"] = json.dumps(monitoring.grafana_dashboard(spec), indent=2) + "\n"
    if spec.autoscaler == "hpa":
        files["prometheus-adapter-values.yaml"] = (
            "# Helm values for prometheus-community/prometheus-adapter: exposes the metrics the "
            "HPA reads.\n" + dump_yaml(autoscaling.prometheus_adapter_values()))
    files["Dockerfile"] = dockerfile()
    files["kustomization.yaml"] = dump_yaml(kustomization(spec, list(objects)))
    return files


def write(spec: DeploySpec, out_dir: str | Path) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in render(spec).items():
        path = out / name
        path.write_text(text)
        paths.append(path)
    return paths
