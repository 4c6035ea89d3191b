"""`shardserve deploy k8s`: write the Kubernetes objects for a layout (flags or a saved plan)."""

from __future__ import annotations

import argparse

from shardserve.errors import InvalidRequestError
from shardserve.router.policy import POLICIES

DEFAULT_GPUS_PER_NODE = 8  # `shardserve plan`'s default too: min(--gpus, 8)


def add_deploy_parser(sub: argparse._SubParsersAction) -> None:
    deploy = sub.add_parser("deploy", help="write deployment files for a layout")
    targets = deploy.add_subparsers(dest="deploy_target", required=True)
    k8s = targets.add_parser(
        "k8s", help="Kubernetes YAML + kustomization.yaml (kubectl apply -k DIR)",
        description="A Deployment (a group inside one node) or a LeaderWorkerSet (a group "
                    "spanning nodes), Service, PDB, autoscaler, ServiceMonitor, dashboard; "
                    "with several replicas, a router in front of them.")
    k8s.add_argument("--plan", default=None, help="plan.json from `shardserve plan --json`")
    k8s.add_argument("--model", default=None,
                     help="model folder inside the container; relative paths are under /models")
    k8s.add_argument("--tensor-parallel-size", "-tp", type=int, default=None)
    k8s.add_argument("--pipeline-parallel-size", "-pp", type=int, default=None)
    k8s.add_argument("--data-parallel-size", "-dp", type=int, default=None)
    k8s.add_argument("--gpus-per-node", type=int, default=None,
                     help="GPUs of one node (default: the plan's, or min(TP x PP, 8), as "
                          "`shardserve plan` assumes): a larger group becomes a "
                          "LeaderWorkerSet over whole nodes")
    k8s.add_argument("--out", required=True, help="folder to write")
    g = k8s.add_argument_group("objects")
    g.add_argument("--name", default=None, help="object name (default shardserve)")
    g.add_argument("--namespace", default=None)
    g.add_argument("--image", default=None, help="container image (default shardserve:latest)")
    g.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                   help="the server's --served-model-name: one name, or several (the first is "
                        "reported, all are accepted)")
    g.add_argument("--gpu-product", default=None,
                   help="require nodes labelled nvidia.com/gpu.product=VALUE "
                        "(e.g. NVIDIA-H100-80GB-HBM3)")
    g.add_argument("--group-topology-key", default=None,
                   help="LeaderWorkerSet: node label (e.g. a rack or NVLink-domain label) "
                        "whose domains each hold one whole group and no other (LWS exclusive "
                        "topology; default: none, groups placed anywhere)")
    g.add_argument("--allow-tp-across-nodes", action="store_true", default=None,
                   help="let a TP group span nodes (only on a fast inter-node fabric)")
    g.add_argument("--router", action=argparse.BooleanOptionalAction, default=None,
                   help="also deploy `shardserve router` pods in front of the replicas, found "
                        "through a headless Service (default: on when there can be more than "
                        "one replica, i.e. -dp or --max-replicas above 1)")
    g.add_argument("--router-policy", default=None, choices=POLICIES,
                   help="the router's policy (default prefix-aware)")
    g.add_argument("--router-replicas", type=int, default=None, help="router pods (default 2)")
    g.add_argument("--autoscaler", choices=["hpa", "keda", "none"], default=None)
    g.add_argument("--min-replicas", type=int, default=None)
    g.add_argument("--max-replicas", type=int, default=None)
    g.add_argument("--standby-replicas", type=int, default=None,
                   help="warm replicas kept above --min-replicas")
    g.add_argument("--target-waiting-per-replica", type=float, default=None)
    g.add_argument("--target-qps-per-replica", type=float, default=None)
    g.add_argument("--prometheus-url", default=None, help="KEDA's Prometheus")
    g.add_argument("--model-cache", choices=["pvc", "hostpath"], default=None)
    g.add_argument("--model-cache-size", default=None)
    g.add_argument("--model-cache-path", default=None, help="hostPath on each node's NVMe")
    g.add_argument("--storage-class", default=None)
    g.add_argument("--download-from", default=None,
                   help="Hugging Face repo id the init container fetches into the cache")
    g.add_argument("--hf-token-secret", default=None, metavar="SECRET",
                   help="Secret whose key 'token' holds a Hugging Face token, for "
                        "--download-from of gated repos (kubectl create secret generic SECRET "
                        "--from-literal=token=hf_...)")
    g.add_argument("--model-load-seconds", dest="model_load_s", type=int, default=None)
    g.add_argument("--shutdown-timeout", dest="shutdown_timeout_s", type=int, default=None)
    g.add_argument("--prestop-sleep", dest="prestop_sleep_s", type=int, default=None)
    g.add_argument("--termination-grace-period", dest="termination_grace_s", type=int,
                   default=None)
    g.add_argument("--serve-arg", action="append", default=None, dest="serve_args",
                   help="extra flag for `shardserve serve` (repeatable), e.g. --serve-arg=--max-model-len=8192")
    k8s.set_defaults(func=cmd_deploy_k8s)


_SPEC_FIELDS = ("name", "namespace", "image", "served_model_name", "gpu_product",
                "group_topology_key", "allow_tp_across_nodes", "router", "router_policy",
                "router_replicas", "autoscaler", "min_replicas",
                "max_replicas", "standby_replicas", "target_waiting_per_replica",
                "target_qps_per_replica", "prometheus_url", "model_cache", "model_cache_size",
                "model_cache_path", "storage_class", "download_from", "hf_token_secret",
                "model_load_s",
                "shutdown_timeout_s", "prestop_sleep_s", "termination_grace_s")


def spec_from_args(args: argparse.Namespace):
    from shardserve.deploy.spec import DeploySpec, spec_from_plan

    values = {k: getattr(args, k) for k in _SPEC_FIELDS if getattr(args, k) is not None}
    layout = {"model": args.model, "tp": args.tensor_parallel_size,
              "pp": args.pipeline_parallel_size, "dp": args.data_parallel_size,
              "gpus_per_node": args.gpus_per_node}
    if args.plan:
        spec = spec_from_plan(args.plan, **layout, **values)
        spec.serve_args += args.serve_args or []
        return spec
    if args.model is None:
        raise InvalidRequestError("deploy k8s needs --model (or --plan plan.json).", "model")
    layout = {k: v for k, v in layout.items() if v is not None}
    # The planner's default node (8 GPUs, an HGX/DGX): a TP 8 x PP 2 group is then a
    # LeaderWorkerSet of two nodes, not one pod asking for 16 GPUs that no node has.
    layout.setdefault("gpus_per_node",
                      min(layout.get("tp", 1) * layout.get("pp", 1), DEFAULT_GPUS_PER_NODE))
    return DeploySpec(**layout, **values, serve_args=list(args.serve_args or []))


def cmd_deploy_k8s(args: argparse.Namespace) -> int:
    from shardserve.deploy.render import write

    spec = spec_from_args(args)
    paths = write(spec, args.out)
    kind = "LeaderWorkerSet" if spec.spans_nodes else "Deployment"
    print(f"{kind} {spec.name}: TP {spec.tp} × PP {spec.pp} × DP {spec.dp}, "
          f"{spec.nodes_per_group} node(s) × {spec.gpus_per_pod} GPUs per replica")
    for path in paths:
        print(f"  wrote {path}")
    if spec.with_router:
        from shardserve.deploy.router import router_name
        print(f"clients: http://{router_name(spec)}.{spec.namespace}.svc:{spec.port} "
              f"({spec.router_replicas} router pods, {spec.router_policy})")
    print(f"apply with: kubectl apply -k {args.out}")
    return 0
