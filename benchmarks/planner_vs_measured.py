"""The planner's per-GPU memory estimate against what the engine really allocates on a GPU.

    python benchmarks/planner_vs_measured.py [--presets llama-3-8b,qwen3-8b] [--tokens 2048,8192]
                                             [--model-dir DIR] [--enforce-eager] [--json out.json]

For each model shape and profiling size, in a fresh process (clean allocator and peak stats):
build the model the way the engine does (ModelRunner; uninitialised weights unless --model-dir
gives a checkpoint: the values do not change the memory), run the engine's own KV-cache sizing
(the profiling forward), allocate the cache (and capture CUDA graphs unless --enforce-eager),
and read torch.cuda.memory_allocated / max_memory_allocated / mem_get_info at each stage.
Prints estimate vs measured per component and the error of the total against the measured
peak (the issue's bar: within 10%).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GiB = 1 << 30


def _config_folder(preset: str, root: Path) -> str:
    """A folder with the preset's config.json and an empty weights file (the source check
    wants one); the model is then built without loading."""
    from shardserve.testing import ARCHITECTURES, PRESETS, _make_config

    shape = PRESETS[preset]
    arch = shape.architecture or "llama"
    folder = root / preset
    folder.mkdir(parents=True, exist_ok=True)
    _make_config(arch, dict(shape.config), shape.dtype).save_pretrained(folder)
    (folder / "model.safetensors").touch()
    assert ARCHITECTURES[arch]
    return str(folder)


def measure_one(args: argparse.Namespace) -> dict:
    import torch

    from shardserve.config import EngineConfig
    from shardserve.executor.model_runner import ModelRunner
    from shardserve.layers.attention import Attention
    from shardserve.models.registry import get_model_class
    from shardserve.planner import PlanRequest, load_model_shape, make_plan

    root = Path(tempfile.mkdtemp(prefix="planner_vs_measured-"))
    model_dir = args.model_dir or _config_folder(args.one, root)
    config = EngineConfig.from_kwargs(
        model=model_dir, device="cuda", dtype="bfloat16", max_model_len=args.max_model_len,
        max_num_batched_tokens=args.tokens_one, max_num_seqs=args.max_num_seqs,
        gpu_memory_utilization=args.gpu_memory_utilization, enforce_eager=args.enforce_eager
    ).resolve()
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    torch.cuda.init()
    torch.empty(1, device=device)  # the CUDA context
    runner = ModelRunner(config, device)
    if args.model_dir:
        runner.load_model()
    else:
        mc = config.model_config
        with torch.device(device):
            runner.model = get_model_class(mc.architecture)(
                mc.hf_config, dtype=mc.torch_dtype, max_model_len=mc.max_model_len).eval()
        runner.attn_layers = [m for m in runner.model.modules() if isinstance(m, Attention)]
        runner.vocab_size = int(mc.hf_config.vocab_size)
    torch.cuda.synchronize()
    weights = torch.cuda.memory_allocated(device)
    num_blocks = runner.determine_num_blocks()
    peak = torch.cuda.max_memory_allocated(device)
    free, total = torch.cuda.mem_get_info(device)
    non_torch = total - free - torch.cuda.memory_reserved(device)
    before_cache = torch.cuda.mem_get_info(device)[0]
    allocated_before = torch.cuda.memory_allocated(device)
    runner.init_kv_cache(num_blocks)
    torch.cuda.synchronize()
    kv = torch.cuda.memory_allocated(device) - allocated_before
    after = torch.cuda.mem_get_info(device)[0]
    graphs = (before_cache - after) - kv  # the graph pool and static buffers, beyond the cache
    used_total = total - after

    shape = load_model_shape(config.model_config.hf_config)
    plan = make_plan(shape, PlanRequest(
        num_gpus=1, gpu_memory_bytes=total, max_model_len=config.model_config.max_model_len,
        dtype="bfloat16", gpu_memory_utilization=args.gpu_memory_utilization,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.tokens_one,
        enforce_eager=args.enforce_eager, tensor_parallel_size=1, pipeline_parallel_size=1,
        data_parallel_size=1))
    layout = plan.layouts[0]
    stage = layout.stages[0] if layout.stages else None
    est = {"weights": stage.weights_bytes, "activations": stage.activation_bytes,
           "overhead": stage.overhead_bytes, "kv_cache": stage.kv_cache_bytes,
           "cuda_graphs": stage.cuda_graph_bytes, "total": stage.total_bytes,
           "num_blocks": layout.num_blocks, "profile_peak": stage.weights_bytes + stage.activation_bytes}
    got = {"weights": weights, "activations": peak - weights, "overhead": non_torch,
           "kv_cache": kv, "cuda_graphs": max(graphs, 0), "total": used_total,
           "num_blocks": num_blocks, "profile_peak": peak}
    return {"preset": args.one, "tokens": args.tokens_one, "estimate": est, "measured": got,
            "gpu": torch.cuda.get_device_name(device), "gpu_memory": total}


def _row(name: str, est: int, got: int, unit: str = "GiB") -> str:
    err = (est - got) / got * 100 if got else float("nan")
    scale = GiB if unit == "GiB" else 1
    return f"  {name:<14} {est / scale:>12.3f} {got / scale:>12.3f} {err:>+9.1f}%"


def report(result: dict) -> None:
    est, got = result["estimate"], result["measured"]
    print(f"\n{result['preset']}  max_num_batched_tokens={result['tokens']}  on {result['gpu']} "
          f"({result['gpu_memory'] / GiB:.1f} GiB)")
    print(f"  {'component':<14} {'estimate':>12} {'measured':>12} {'error':>10}")
    for key in ("weights", "activations", "profile_peak", "overhead", "kv_cache", "cuda_graphs",
                "total"):
        print(_row(key, est[key], got[key]))
    print(_row("num_blocks", est["num_blocks"], got["num_blocks"], unit="blocks"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="llama-3-8b,qwen3-8b,qwen2.5-7b,llama-3.2-1b")
    parser.add_argument("--tokens", default="2048,8192", help="max_num_batched_tokens values")
    parser.add_argument("--max-model-len", type=int, default=8192)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--model-dir", default=None, help="a real checkpoint instead of presets")
    parser.add_argument("--json", default=None, help="save every result here")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child process mode
    parser.add_argument("--tokens-one", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(measure_one(args)), flush=True)
        return 0
    results, worst = [], 0.0
    presets = [args.model_dir] if args.model_dir else args.presets.split(",")
    for preset in presets:
        for tokens in (int(t) for t in args.tokens.split(",")):
            cmd = [sys.executable, __file__, "--one", preset, "--tokens-one", str(tokens),
                   "--max-model-len", str(args.max_model_len), "--max-num-seqs",
                   str(args.max_num_seqs), "--gpu-memory-utilization",
                   str(args.gpu_memory_utilization)]
            cmd += ["--enforce-eager"] if args.enforce_eager else []
            cmd += ["--model-dir", args.model_dir] if args.model_dir else []
            out = subprocess.run(cmd, capture_output=True, text=True)
            line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
            if line is None:
                print(f"{preset} tokens={tokens} failed:\n{out.stderr[-3000:]}")
                continue
            result = json.loads(line[len("RESULT "):])
            report(result)
            results.append(result)
            # Both sides fill the utilization share, so the total agrees by construction; the
            # telling numbers are the profiling peak (weights + activations) and the blocks.
            for key in ("profile_peak", "num_blocks", "total"):
                e, g = result["estimate"][key], result["measured"][key]
                worst = max(worst, abs(e - g) / g)
    print(f"\nworst error (profile peak, KV blocks, total): {worst * 100:.1f}% (bar: 10%)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0 if results and worst <= 0.10 else 1


if __name__ == "__main__":
    sys.exit(main())
