"""Kubernetes objects for a planned layout (`shardserve deploy k8s`).

    spec.py          DeploySpec: the settings, from flags or from `shardserve plan --json`
    pod.py           pod templates: container, probes, preStop, GPUs, /dev/shm, model cache
    workloads.py     Deployment | LeaderWorkerSet, Service, PodDisruptionBudget, PVC
    router.py        with several replicas: `shardserve router` pods, their Service, and a
                     headless Service over the replicas for the router to discover them
    autoscaling.py   HPA (prometheus-adapter) or KEDA ScaledObject on queue depth and QPS
    monitoring.py    ServiceMonitors (replicas; router) and the Grafana dashboard
    dockerfile.py    the image
    render.py        everything as files plus kustomization.yaml
"""

from shardserve.deploy.render import manifests, render, write
from shardserve.deploy.spec import DeploySpec, spec_from_plan

__all__ = ["DeploySpec", "manifests", "render", "spec_from_plan", "write"]
