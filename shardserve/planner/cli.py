"""`shardserve plan`: the planner from the command line (table, or --json for `deploy k8s`)."""

from __future__ import annotations

import argparse
import json
import sys

from shardserve.config import KV_CACHE_DTYPES
from shardserve.config_defaults import DEFAULT_MAX_CUDA_GRAPH_BATCH_SIZE, QUANTIZATION_METHODS
from shardserve.errors import InvalidRequestError


def add_plan_parser(sub: argparse._SubParsersAction) -> None:
    from shardserve.engine_args import parse_size

    p = sub.add_parser("plan", help="memory per GPU and the TP/PP/DP layout for a model on N GPUs",
                       description="Plan the parallel layout from config.json alone (no weights).")
    p.add_argument("--model", required=True,
                   help="config.json, a Hugging Face folder, a .gguf file, or a known model "
                        "name (llama-3-8b, llama-3-70b, qwen3-32b, deepseek-v2-lite, ...)")
    p.add_argument("--gpus", type=int, required=True, help="number of GPUs in the pool")
    p.add_argument("--gpu-memory", type=parse_size, required=True,
                   help="memory of one GPU, e.g. 80GiB or 141GB")
    p.add_argument("--gpus-per-node", type=int, default=None, help="default: min(--gpus, 8)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="default: the model's max_position_embeddings (times its RoPE "
                        "scaling factor, as the engine and vLLM count it)")
    p.add_argument("--target-concurrency", type=int, default=None,
                   help="sequences of max_model_len that should fit at once, over all replicas")
    p.add_argument("--dtype", default="auto", help="bf16, fp16, fp32 (default: the checkpoint's)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    p.add_argument("--max-cuda-graph-batch-size", "--max-cudagraph-capture-size", type=int,
                   default=DEFAULT_MAX_CUDA_GRAPH_BATCH_SIZE)
    p.add_argument("--no-mixed-cuda-graphs", dest="mixed_cuda_graphs", action="store_false",
                   help="the engine's: only decode steps are CUDA graphs")
    p.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                   help="the engine's --kv-cache-dtype: fp8 stores one byte per element")
    p.add_argument("--quantization", "-q", default=None, choices=QUANTIZATION_METHODS,
                   help="the engine's --quantization: fp8 keeps the attention and dense MLP "
                        "weights in one byte per element plus a scale per row and 128 columns")
    p.add_argument("--enable-expert-parallel", action="store_true",
                   help="the engine's flag: MoE layers hold num_experts / TP whole experts per "
                        "GPU instead of a 1/TP slice of every expert (their width need not "
                        "divide by TP; where their number does not, the first GPUs hold one "
                        "more, as in vLLM)")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=None, help="pin TP")
    p.add_argument("--pipeline-parallel-size", "-pp", type=int, default=None, help="pin PP")
    p.add_argument("--data-parallel-size", "-dp", type=int, default=None, help="pin DP")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=cmd_plan)


def cmd_plan(args: argparse.Namespace) -> int:
    from shardserve.planner.plan import PlanRequest, make_plan
    from shardserve.planner.report import format_plan
    from shardserve.planner.shape import load_model_shape

    shape = load_model_shape(args.model)
    request = PlanRequest(
        num_gpus=args.gpus, gpu_memory_bytes=args.gpu_memory, gpus_per_node=args.gpus_per_node,
        max_model_len=args.max_model_len, dtype=args.dtype,
        gpu_memory_utilization=args.gpu_memory_utilization, block_size=args.block_size,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        target_concurrency=args.target_concurrency, enforce_eager=args.enforce_eager,
        max_cuda_graph_batch_size=args.max_cuda_graph_batch_size,
        mixed_cuda_graphs=args.mixed_cuda_graphs,
        kv_cache_dtype=args.kv_cache_dtype, quantization=args.quantization,
        enable_expert_parallel=args.enable_expert_parallel,
        tensor_parallel_size=args.tensor_parallel_size,
        pipeline_parallel_size=args.pipeline_parallel_size,
        data_parallel_size=args.data_parallel_size)
    try:
        plan = make_plan(shape, request)
    except ValueError as err:
        raise InvalidRequestError(str(err)) from err
    if args.json:
        json.dump(plan.to_dict(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(format_plan(plan))
    # Exit 1 when nothing fits, so scripts can tell; the output says why.
    return 0 if plan.best is not None else 1
