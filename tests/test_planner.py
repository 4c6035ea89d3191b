"""The planner on known model shapes: parameter counts, layouts, refusals, the stage partition,
the report and JSON, and `auto` parallel sizes. Pure arithmetic: no torch model is built."""

from __future__ import annotations

import argparse
import json

import pytest

from shardserve.planner import PlanRequest, load_model_shape, make_plan, pipeline_stage_layers
from shardserve.planner.auto import parse_parallel_size, resolve_auto_parallel
from shardserve.planner.layouts import MIN_KV_FRACTION
from shardserve.planner.report import format_plan
from shardserve.planner.shape import shape_from_config
from shardserve.planner.stages import parse_layer_partition, partition_layers
from shardserve.planner.weights import total_params

GiB = 1 << 30


def _plan(model: str, gpus: int, mem_gib: float, **kw):
    return make_plan(load_model_shape(model), PlanRequest(num_gpus=gpus,
                                                          gpu_memory_bytes=int(mem_gib * GiB), **kw))


@pytest.mark.parametrize("model,billions", [
    ("llama-3-8b", 8.03), ("llama-3-70b", 70.55), ("llama-3.1-405b", 405.85),
    ("qwen3-32b", 32.76), ("qwen2.5-7b", 7.62), ("qwen3-30b-a3b", 30.53),
    ("mixtral-8x7b", 46.70), ("deepseek-v2-lite", 15.71)])
def test_parameter_counts_match_published_sizes(model: str, billions: float) -> None:
    assert total_params(load_model_shape(model)) / 1e9 == pytest.approx(billions, abs=0.01)


@pytest.mark.parametrize("model", ["llama-3-8b", "llama-3-70b", "qwen3-32b", "deepseek-v2-lite"])
@pytest.mark.parametrize("gpus", [1, 2, 4, 8])
@pytest.mark.parametrize("mem_gib", [80, 141])
def test_known_shapes_plan_or_refuse(model: str, gpus: int, mem_gib: int) -> None:
    plan = _plan(model, gpus, mem_gib)
    shape = plan.shape
    # 70B in bf16 (131 GiB of weights) fits neither one 80 nor one 141 GiB GPU; Qwen3-32B on
    # one 80 GiB GPU leaves less KV cache than one 40960-token sequence needs.
    refused = {("llama-3-70b", 1, 80), ("llama-3-70b", 1, 141), ("qwen3-32b", 1, 80)}
    if (model, gpus, mem_gib) in refused:
        assert plan.best is None
        assert all("GiB missing per GPU" in p.problems[0] for p in plan.layouts)
        return
    best = plan.best
    assert best is not None and best.feasible and best.rank == 1
    assert best.tp * best.pp * best.dp <= gpus
    assert shape.num_heads % best.tp == 0
    for stage in best.stages:
        used = (stage.weights_bytes + stage.activation_bytes + stage.overhead_bytes
                + stage.kv_cache_bytes)
        assert used <= stage.usable_bytes  # the KV cache takes whole blocks of what is left
        assert stage.usable_bytes - used < stage.kv_bytes_per_block
    assert best.max_seqs_at_max_len >= 1
    # Every GPU-count layout is listed, feasible first, then the refusals with a reason.
    ranks = [p.rank for p in plan.layouts if p.feasible]
    assert ranks == list(range(1, len(ranks) + 1))
    assert all(p.problems for p in plan.layouts if not p.feasible)


def test_seventy_b_needs_four_80gb_gpus_for_a_useful_cache() -> None:
    plan = _plan("llama-3-70b", 8, 80)
    assert (plan.best.tp, plan.best.pp, plan.best.dp) == (4, 1, 2)
    tp2 = next(p for p in plan.layouts if (p.tp, p.pp) == (2, 1))
    assert tp2.feasible and tp2.kv_fraction < MIN_KV_FRACTION  # fits, but barely any cache
    assert "under 20%" in plan.reason and "DP 2" in plan.reason


def test_small_model_goes_data_parallel() -> None:
    plan = _plan("llama-3-8b", 8, 80)
    assert (plan.best.tp, plan.best.pp, plan.best.dp) == (1, 1, 8)
    assert plan.best.total_seqs == 8 * plan.best.max_seqs_at_max_len


def test_heads_must_divide_tp() -> None:
    plan = _plan("qwen2.5-7b", 8, 80)  # 28 heads, 4 KV heads
    tp8 = next(p for p in plan.layouts if p.tp == 8)
    assert not tp8.feasible and "28 attention heads do not divide by TP 8" in tp8.problems[0]


def test_kv_heads_replicate_when_tp_exceeds_them() -> None:
    plan = _plan("llama-3-70b", 8, 80)  # 8 KV heads: TP 8 holds one per rank
    tp8 = next(p for p in plan.layouts if (p.tp, p.pp) == (8, 1))
    shape = load_model_shape({**_tiny_dict(), "num_key_value_heads": 2})
    from shardserve.planner.weights import tp_problems
    assert tp8.feasible
    assert tp_problems(shape, 4) == []  # 2 KV heads replicated twice
    shape3 = load_model_shape({**_tiny_dict(), "num_attention_heads": 6, "num_key_value_heads": 2,
                               "hidden_size": 48})
    assert "cannot replicate 2 KV heads" in tp_problems(shape3, 3)[0]


def test_tp_stays_within_a_node_and_pp_goes_across() -> None:
    plan = _plan("llama-3.1-405b", 16, 80, gpus_per_node=8, max_model_len=8192)
    tp16 = next(p for p in plan.layouts if p.tp == 16)
    assert "stays within a node" in tp16.problems[0]
    best = plan.best
    assert (best.tp, best.pp, best.dp, best.nodes_per_group) == (8, 2, 1, 2)
    assert "TP 8 within each node, PP 2 across 2 nodes" in plan.reason


def test_seed_case_two_nodes_of_four_as_tp4_pp2() -> None:
    # 70B in float32 needs more than one node of 4 x 80 GiB: TP 4 in each node, PP 2 across.
    free = _plan("llama-3-70b", 8, 80, gpus_per_node=4, dtype="float32", max_model_len=8192)
    assert (free.best.tp, free.best.pp, free.best.nodes_per_group) == (4, 2, 2)
    # The seed's layout pinned for the bf16 model: about 65 GB of each 80 GB card in use.
    plan = _plan("llama-3-70b", 8, 80 * 10**9 / GiB, gpus_per_node=4, tensor_parallel_size=4,
                 pipeline_parallel_size=2)
    best = plan.best
    assert (best.tp, best.pp, best.dp, best.nodes_per_group) == (4, 2, 1, 2)
    for stage in best.stages:
        assert 60e9 < stage.total_bytes < 75e9
    assert [(s.start_layer, s.end_layer) for s in best.stages] == [(0, 40), (40, 80)]


def test_target_concurrency_moves_the_pick() -> None:
    free = _plan("llama-3.1-8b", 8, 80)
    assert (free.best.tp, free.best.dp) == (1, 8)
    assert free.best.total_seqs < 30
    wanted = _plan("llama-3.1-8b", 8, 80, target_concurrency=30)
    assert wanted.best.total_seqs >= 30 and wanted.best.tp > 1
    unreachable = _plan("llama-3.1-8b", 8, 80, target_concurrency=10_000)
    assert not unreachable.best.meets_target and "no layout reaches" in unreachable.reason


def test_pinned_sizes_are_respected() -> None:
    plan = _plan("llama-3-8b", 8, 80, tensor_parallel_size=2, data_parallel_size=1)
    assert all(p.tp == 2 and p.dp == 1 for p in plan.layouts)


def test_pinned_sizes_that_leave_no_layout_say_why(capsys) -> None:
    """-tp 4 on 2 GPUs, or PP 64: no candidate at all. The plan says why instead of printing an
    empty table, and `auto` raises with the same reason."""
    from shardserve.cli import main

    plan = _plan("llama-3-8b", 2, 80, tensor_parallel_size=4)
    assert plan.layouts == [] and plan.best is None
    assert plan.reason.startswith("No layout of 2 GPUs has TP 4:")
    assert main(["plan", "--model", "llama-3-8b", "--gpus", "2", "--gpu-memory", "80GiB",
                 "-pp", "64", "-dp", "1"]) == 1
    assert "No layout of 2 GPUs has PP 64 x DP 1:" in capsys.readouterr().out


@pytest.mark.parametrize("flags,message", [
    (["--gpu-memory", "80"], "80 bytes is too small to plan for; give a unit"),
    (["--gpu-memory", "80GiB", "--max-model-len", "0"], "--max-model-len must be positive"),
    # The engine's own limits: a plan must not assume settings that `serve` refuses (these
    # printed plans, with 0 or negative sequences, or a ZeroDivisionError traceback).
    (["--gpu-memory", "80GiB", "--gpu-memory-utilization", "1.5"],
     "--gpu-memory-utilization must be in (0, 1], got 1.5"),
    (["--gpu-memory", "80GiB", "--gpu-memory-utilization", "0"],
     "--gpu-memory-utilization must be in (0, 1]"),
    (["--gpu-memory", "80GiB", "--block-size", "0"], "--block-size must be a power of two, got 0"),
    (["--gpu-memory", "80GiB", "--block-size", "3"], "--block-size must be a power of two, got 3"),
    (["--gpu-memory", "80GiB", "--max-num-seqs", "-5"], "--max-num-seqs must be positive"),
    (["--gpu-memory", "80GiB", "--max-num-batched-tokens", "0"],
     "--max-num-batched-tokens must be positive"),
    (["--gpu-memory", "80GiB", "--gpus-per-node", "0"], "--gpus-per-node must be positive"),
    (["--gpu-memory", "80GiB", "--target-concurrency", "-1"],
     "--target-concurrency must be positive"),
    (["--gpu-memory", "80GiB", "-dp", "0"], "--data-parallel-size must be positive, got 0"),
    (["--gpu-memory", "80GiB", "-tp", "-2"], "--tensor-parallel-size must be positive"),
])
def test_plan_refuses_nonsense_flags(flags, message, capsys) -> None:
    from shardserve.cli import main

    assert main(["plan", "--model", "llama-3-8b", "--gpus", "2", *flags]) == 2
    assert message in capsys.readouterr().err


def test_expert_parallel_changes_what_must_divide() -> None:
    """Under EP the TP ranks hold whole experts: neither their width nor their number need
    divide (the first ranks hold one more, as in vLLM), but each rank needs one; the shared
    experts stay TP-sliced."""
    from shardserve.planner.weights import tp_problems

    def shape(experts: int, shared: int):
        return load_model_shape({
            **_tiny_dict(), "architectures": ["DeepseekV2ForCausalLM"],
            "model_type": "deepseek_v2", "n_routed_experts": experts, "n_shared_experts": shared,
            "moe_intermediate_size": 30, "num_experts_per_tok": 2, "kv_lora_rank": 32,
            "q_lora_rank": None, "qk_nope_head_dim": 16, "qk_rope_head_dim": 16, "v_head_dim": 16})

    assert "expert intermediate size 30" in tp_problems(shape(8, 2), 4)[-1]
    assert tp_problems(shape(8, 2), 4, expert_parallel=True) == []
    assert tp_problems(shape(6, 2), 4, expert_parallel=True) == []
    ep4 = tp_problems(shape(3, 1), 4, expert_parallel=True)
    assert "3 experts cannot be spread over 4 expert-parallel ranks" in ep4[0]
    assert "shared experts' intermediate size 30 does not divide by TP 4" in ep4[1]


def test_oom_diagnosis_says_what_is_missing() -> None:
    plan = _plan("llama-3-70b", 1, 80)
    problem = plan.layouts[0].problems[0]
    assert problem.startswith("out of memory: weights 131.")
    assert "GiB missing per GPU" in problem
    assert "Pick     none" in format_plan(plan)


def test_cuda_graphs_outside_the_utilization_share() -> None:
    eager = _plan("llama-3-8b", 1, 80, enforce_eager=True).best.stages[0]
    graphs = _plan("llama-3-8b", 1, 80).best.stages[0]
    assert eager.cuda_graph_bytes == 0 and graphs.cuda_graph_bytes > 0
    assert eager.kv_cache_bytes == graphs.kv_cache_bytes  # graphs come out of the headroom


def test_cuda_graphs_of_steps_with_prompt_tokens_are_counted() -> None:
    """With few sequences the decode graphs are small, but steps with prompt tokens are
    captured up to 512 tokens (executor/graph_sizes.py): the pool is sized by those."""
    few = dict(max_num_seqs=4)
    decode_only = _plan("llama-3-8b", 1, 80, mixed_cuda_graphs=False, **few).best.stages[0]
    mixed = _plan("llama-3-8b", 1, 80, **few).best.stages[0]
    assert mixed.cuda_graph_bytes > 4 * decode_only.cuda_graph_bytes
    # MLA models keep such steps eager: no extra graphs counted.
    mla_off = _plan("deepseek-v2-lite", 1, 80, mixed_cuda_graphs=False, **few).best.stages[0]
    mla_on = _plan("deepseek-v2-lite", 1, 80, **few).best.stages[0]
    assert mla_on.cuda_graph_bytes == mla_off.cuda_graph_bytes


# ---- pipeline stage partition ---------------------------------------------------------------

def test_partition_even_and_with_extras() -> None:
    assert partition_layers([1.0] * 8, 2) == [(0, 4), (4, 8)]
    assert partition_layers([1.0] * 8, 2, last_extra=2.0) == [(0, 5), (5, 8)]
    assert partition_layers([1.0] * 9, 3) == [(0, 3), (3, 6), (6, 9)]
    assert partition_layers([1.0] * 10, 3, first_extra=1.0, last_extra=1.0) == [(0, 3), (3, 7), (7, 10)]
    with pytest.raises(ValueError):
        partition_layers([1.0] * 2, 3)


def test_large_vocabulary_lightens_the_last_stage() -> None:
    # Qwen3-0.6B's shape untied: a 151936 x 1024 LM head weighs about 3.5 layers.
    shape = load_model_shape({**_qwen_small_dict(), "tie_word_embeddings": False})
    bounds = pipeline_stage_layers(shape, 2)
    assert bounds[0][0] == 0 and bounds[-1][1] == shape.num_layers
    first, last = (e - s for s, e in bounds)
    assert last < first  # the head's compute and memory count; layers alone would give 14/14
    four = pipeline_stage_layers(shape, 4)
    assert four[-1][1] - four[-1][0] < four[1][1] - four[1][0]


def test_parse_layer_partition() -> None:
    assert parse_layer_partition("14,10,8", 32, 3) == [(0, 14), (14, 24), (24, 32)]
    for bad in ("14,10", "14,10,9", "32,0,0"):  # named by the flag, with one that fits
        with pytest.raises(ValueError, match=r"^--pp-layer-partition .* e\.g\. '11,11,10'\.$"):
            parse_layer_partition(bad, 32, 3)
    with pytest.raises(ValueError, match="^--pp-layer-partition is comma-separated"):
        parse_layer_partition("a,b,c", 32, 3)


# ---- output ---------------------------------------------------------------------------------

def test_report_and_json(capsys) -> None:
    from shardserve.cli import main

    assert main(["plan", "--model", "llama-3-70b", "--gpus", "8", "--gpu-memory", "80GiB",
                 "--gpus-per-node", "4", "-tp", "4", "-pp", "2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    rec = data["recommended"]
    assert (rec["tensor_parallel_size"], rec["pipeline_parallel_size"]) == (4, 2)
    assert rec["nodes_per_group"] == 2 and len(rec["stages"]) == 2
    assert data["hardware"]["gpus_per_node"] == 4 and data["model"]["num_layers"] == 80
    assert main(["plan", "--model", "llama-3-8b", "--gpus", "8", "--gpu-memory", "80GiB"]) == 0
    text = capsys.readouterr().out
    assert "Pick     TP 1 × PP 1 × DP 8" in text and "KV cache" in text and "Layouts" in text
    assert main(["plan", "--model", "llama-3-70b", "--gpus", "1", "--gpu-memory", "80GiB"]) == 1


def test_plan_dtype_is_one_the_server_takes(capsys) -> None:
    # fp8 is no model dtype for `serve` (only --quantization / --kv-cache-dtype): a plan at
    # --dtype fp8 counted 1-byte activations and deployed a server that refuses to start.
    from shardserve.cli import main
    with pytest.raises(ValueError, match="--quantization fp8 for the weights"):
        _plan("llama-3-8b", 1, 80, dtype="fp8")
    assert main(["plan", "--model", "llama-3-8b", "--gpus", "1", "--gpu-memory", "80GiB",
                 "--dtype", "float8_e4m3fn"]) == 2
    assert "--dtype must be auto, float32, float16 or bfloat16" in capsys.readouterr().err
    assert _plan("llama-3-8b", 1, 80, dtype="bf16").dtype == "bfloat16"


def test_plan_reads_config_json(tmp_path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(_qwen_small_dict()))
    assert load_model_shape(path).qk_norm
    assert load_model_shape(tmp_path).num_layers == 28
    with pytest.raises(Exception, match="known model name"):
        load_model_shape(tmp_path / "missing")


def test_moe_and_mla_are_planned() -> None:
    plan = _plan("deepseek-v2-lite", 1, 80)
    assert plan.shape.served and plan.shape.mla and plan.shape.moe
    assert "does not serve" not in format_plan(plan)
    mixtral = _plan("mixtral-8x7b", 8, 80)  # planned, but the engine has no Mixtral class
    assert not mixtral.shape.served and "does not serve MixtralForCausalLM" in format_plan(mixtral)
    # MLA caches one 576-wide latent per token and layer, whatever the TP size.
    assert plan.to_dict()["model"]["kv_bytes_per_token"] == 27 * 576 * 2


def test_served_architectures_are_the_engines() -> None:
    """The planner's torch-free list says what the engine serves: the registry, exactly."""
    from shardserve.models.registry import SUPPORTED_ARCHITECTURES
    from shardserve.planner.shape import SERVED_ARCHITECTURES
    assert set(SERVED_ARCHITECTURES) == set(SUPPORTED_ARCHITECTURES)


# ---- auto parallel sizes --------------------------------------------------------------------

def test_parse_parallel_size() -> None:
    assert parse_parallel_size("auto") == "auto" and parse_parallel_size("4") == 4
    for bad in ("0", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_parallel_size(bad)


def test_engine_flags_accept_auto(monkeypatch) -> None:
    from shardserve.engine_args import add_engine_args

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    args = parser.parse_args(["-tp", "auto", "-pp", "2", "-dp", "auto"])
    assert (args.tensor_parallel_size, args.pipeline_parallel_size, args.data_parallel_size) == (
        "auto", 2, "auto")
    monkeypatch.setenv("TENSOR_PARALLEL_SIZE", "auto")
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    assert parser.parse_args([]).tensor_parallel_size == "auto"


def test_resolve_auto_parallel_on_gpus_and_cpu() -> None:
    from shardserve.config import EngineConfig

    config = EngineConfig.from_kwargs(model="llama-3-70b", tensor_parallel_size="auto",
                                      max_model_len=8192, dtype="bfloat16")
    resolve_auto_parallel(config, 8, 80 * GiB)
    pc = config.parallel_config
    assert (pc.tensor_parallel_size, pc.pipeline_parallel_size, pc.data_parallel_size) == (4, 1, 1)
    config = EngineConfig.from_kwargs(model="llama-3-8b", tensor_parallel_size="auto",
                                      data_parallel_size="auto", max_model_len=8192)
    resolve_auto_parallel(config, 4, 80 * GiB)
    assert (config.parallel_config.tensor_parallel_size, config.parallel_config.data_parallel_size) == (1, 4)
    config = EngineConfig.from_kwargs(model="llama-3-70b", tensor_parallel_size="auto")
    resolve_auto_parallel(config, 0, 0)
    assert config.parallel_config.tensor_parallel_size == 1
    config = EngineConfig.from_kwargs(model="llama-3-70b", tensor_parallel_size="auto",
                                      max_model_len=8192)
    with pytest.raises(Exception, match="No parallel layout of 1 GPUs fits"):
        resolve_auto_parallel(config, 1, 80 * GiB)
    # -tp auto -pp 4 on 2 GPUs: the pin leaves nothing to pick from, and the error says so.
    config = EngineConfig.from_kwargs(model="llama-3-8b", tensor_parallel_size="auto",
                                      pipeline_parallel_size=4, max_model_len=8192)
    with pytest.raises(Exception, match="No layout of 2 GPUs has PP 4 x DP 1: TP and PP must divide"):
        resolve_auto_parallel(config, 2, 80 * GiB)


def test_engine_resolve_turns_auto_into_ints_on_cpu(tiny_model_dirs) -> None:
    from shardserve.config import EngineConfig

    config = EngineConfig.from_kwargs(model=tiny_model_dirs["llama"], device="cpu",
                                      tensor_parallel_size="auto", pipeline_parallel_size="auto",
                                      data_parallel_size="auto").resolve()
    pc = config.parallel_config
    assert (pc.tensor_parallel_size, pc.pipeline_parallel_size, pc.data_parallel_size) == (1, 1, 1)


# ---- shapes ---------------------------------------------------------------------------------

def _tiny_dict() -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "intermediate_size": 128, "vocab_size": 500, "max_position_embeddings": 128}


def _qwen_small_dict() -> dict:
    from shardserve.planner.known_models import KNOWN_MODELS
    return dict(KNOWN_MODELS["qwen3-0.6b"])


def test_shape_flags_follow_the_engine() -> None:
    qwen2 = shape_from_config({**_tiny_dict(), "architectures": ["Qwen2ForCausalLM"],
                               "model_type": "qwen2"})
    assert qwen2.qkv_bias and not qwen2.o_proj_bias and not qwen2.qk_norm
    llama = shape_from_config({**_tiny_dict(), "attention_bias": True, "mlp_bias": True})
    assert llama.qkv_bias and llama.o_proj_bias and llama.mlp_bias
    yarn = shape_from_config({**_tiny_dict(), "rope_scaling": {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}})
    assert yarn.rope_table_positions(100) == 256


def test_fp8_weights_free_memory_and_reach_the_deployment() -> None:
    """--quantization fp8: Llama-3-8B's 32 layers of projections at one byte (plus a scale per
    row and 128 columns) leave ~6.5 GB more for the KV cache on one GPU; the flag reaches the
    manifests."""
    from shardserve.deploy import spec_from_plan

    bf16 = _plan("llama-3-8b", 1, 141, max_model_len=4096)
    fp8 = _plan("llama-3-8b", 1, 141, max_model_len=4096, quantization="fp8")
    saved = bf16.best.stages[0].weights_bytes - fp8.best.stages[0].weights_bytes
    projections = 32 * (6144 * 4096 + 4096 * 4096 + 28672 * 4096 + 4096 * 14336)
    assert saved == projections - 32 * 4 * (6144 * 32 + 4096 * 32 + 28672 * 32 + 4096 * 112)
    assert fp8.best.num_blocks > bf16.best.num_blocks
    data = fp8.to_dict()
    assert data["serving"]["quantization"] == "fp8"
    assert "--quantization=fp8" in spec_from_plan(data).serve_args
    assert "--quantization" not in " ".join(spec_from_plan(bf16.to_dict()).serve_args)
    with pytest.raises(ValueError, match="quantization must be one of fp8"):
        _plan("llama-3-8b", 1, 141, quantization="awq")


def test_fp8_kv_cache_doubles_the_tokens_and_reaches_the_deployment() -> None:
    from shardserve.deploy import spec_from_plan

    bf16 = _plan("llama-3-8b", 1, 141, max_model_len=4096)
    fp8 = _plan("llama-3-8b", 1, 141, max_model_len=4096, kv_cache_dtype="fp8")
    # Same memory left for the cache, half the bytes a block: twice the blocks (+-1 rounding).
    assert abs(fp8.best.num_blocks - 2 * bf16.best.num_blocks) <= 1
    data = fp8.to_dict()
    assert data["serving"]["kv_cache_dtype"] == "fp8"
    assert data["model"]["kv_bytes_per_token"] == bf16.to_dict()["model"]["kv_bytes_per_token"] // 2
    assert "--kv-cache-dtype=fp8" in spec_from_plan(data).serve_args
    assert "--kv-cache-dtype=fp8" not in " ".join(spec_from_plan(bf16.to_dict()).serve_args)
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        _plan("llama-3-8b", 1, 141, kv_cache_dtype="int4")



# ---- expert parallelism, DeepSeek accounting, warnings --------------------------------------

def _tiny_deepseek_dict(**overrides) -> dict:
    """A DeepSeek-V3 shape whose expert width (30) TP 4 cannot slice but EP 4 places whole."""
    return {**_tiny_dict(), "architectures": ["DeepseekV3ForCausalLM"],
            "model_type": "deepseek_v3", "n_routed_experts": 8, "n_shared_experts": 2,
            "moe_intermediate_size": 30, "num_experts_per_tok": 2, "first_k_dense_replace": 1,
            "kv_lora_rank": 32, "q_lora_rank": 48, "qk_nope_head_dim": 16,
            "qk_rope_head_dim": 16, "v_head_dim": 16, **overrides}


def test_plan_enable_expert_parallel_reaches_memory_and_deployment(tmp_path, capsys) -> None:
    """`plan --enable-expert-parallel`: layouts checked and sized for whole experts per rank
    (E / TP of them), the flag in the JSON and the text, and the deployment's serve command
    carries it."""
    from shardserve.cli import main
    from shardserve.deploy import spec_from_plan

    (tmp_path / "config.json").write_text(json.dumps(_tiny_deepseek_dict()))
    flags = ["plan", "--model", str(tmp_path), "--gpus", "4", "--gpu-memory", "80GiB", "-tp", "4",
             "--dtype", "fp32", "--json"]
    assert main(flags) == 1  # TP slices every expert: 30 does not divide by 4
    tp_only = json.loads(capsys.readouterr().out)
    assert "expert intermediate size 30" in tp_only["layouts"][0]["problems"][0]
    assert tp_only["serving"]["enable_expert_parallel"] is False
    assert "--enable-expert-parallel" not in spec_from_plan(
        _plan("deepseek-v2-lite", 1, 80).to_dict()).serve_args

    assert main(flags + ["--enable-expert-parallel"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["serving"]["enable_expert_parallel"] is True
    assert data["recommended"]["tensor_parallel_size"] == 4
    assert "--enable-expert-parallel" in spec_from_plan(data).serve_args
    # Experts that divide evenly weigh the same per rank either way; each EP rank holds 2 whole
    # experts of the 8, so widening them by 2 adds 2 x 3 x 64 x 2 float32s to it.
    def weights(width: int, ep: bool) -> int:
        shape = load_model_shape(_tiny_deepseek_dict(moe_intermediate_size=width,
                                                     n_shared_experts=0))
        plan = make_plan(shape, PlanRequest(num_gpus=4, gpu_memory_bytes=80 * GiB, dtype="fp32",
                                            tensor_parallel_size=4, enable_expert_parallel=ep))
        return plan.best.stages[0].weights_bytes

    assert weights(32, ep=True) == weights(32, ep=False)
    assert weights(32, ep=True) - weights(30, ep=True) == 2 * 3 * 64 * 2 * 4
    assert main(flags[:-1] + ["--enable-expert-parallel"]) == 0
    assert "block_size 16, expert parallel" in capsys.readouterr().out


def test_plan_with_expert_parallel_warns_where_the_recommended_layout_leaves_the_experts() -> None:
    """A recommended TP 1 x DP N layout under --enable-expert-parallel keeps every expert on
    every GPU (replicas do not share experts, unlike vLLM's TP x DP expert-parallel group): the
    plan says so, as the deployed engine will; a TP 4 layout splitting them says nothing."""
    shape = load_model_shape(_tiny_deepseek_dict())

    def warnings(**kw) -> list[str]:
        return make_plan(shape, PlanRequest(num_gpus=4, gpu_memory_bytes=80 * GiB, dtype="fp32",
                                            enable_expert_parallel=True, **kw)).warnings

    dp4 = warnings()
    assert len(dp4) == 1 and "no effect with tensor_parallel_size=1" in dp4[0]
    assert "the 4 data-parallel replicas do not share experts" in dp4[0]
    assert "2 tensor-parallel ranks (4 per GPU); the 2 data-parallel" in warnings(
        tensor_parallel_size=2)[0]
    assert warnings(tensor_parallel_size=4) == []
    dense = _plan("llama-3-8b", 2, 80, enable_expert_parallel=True).warnings
    assert dense == ["enable_expert_parallel has no effect: LlamaForCausalLM has no experts "
                     "(drop --enable-expert-parallel)."]


def test_auto_parallel_plans_with_the_engines_expert_parallel(monkeypatch) -> None:
    from shardserve.config import EngineConfig
    from shardserve.planner import auto

    requests = []

    def recording_make_plan(shape, request):
        requests.append(request)
        return make_plan(shape, request)

    monkeypatch.setattr(auto, "make_plan", recording_make_plan)
    for ep in (False, True):
        config = EngineConfig.from_kwargs(model="deepseek-v2-lite", tensor_parallel_size="auto",
                                          max_model_len=8192, enable_expert_parallel=ep)
        resolve_auto_parallel(config, 2, 80 * GiB)
    assert [r.enable_expert_parallel for r in requests] == [False, True]


def test_deepseek_weights_count_what_is_not_in_the_model_dtype() -> None:
    """DeepSeek's router stays float32 in a bfloat16 model (V3 adds a float32 bias per expert),
    and every MoE layer holds an int64 expert_map of its experts; the RoPE table is only
    qk_rope_head_dim wide."""
    from shardserve.planner.memory import rope_table_bytes
    from shardserve.planner.weights import stage_params, stage_weight_bytes

    lite = load_model_shape("deepseek-v2-lite")  # 27 layers, 26 of them MoE with 64 experts
    assert rope_table_bytes(lite, 8192) == 163840 * 64 * 4  # YaRN: 4096 x 40 positions
    extra = 26 * (64 * 2048 * 2 + 64 * 8)
    assert stage_weight_bytes(lite, 1, 0, 27, True, True, 2) == stage_params(
        lite, 1, 0, 27, True, True) * 2 + extra
    v3 = load_model_shape(_tiny_deepseek_dict(num_hidden_layers=3))  # layers 1 and 2 MoE
    assert v3.moe.router_float32 and v3.moe.router_bias
    assert stage_weight_bytes(v3, 1, 0, 3, True, True, 2) == stage_params(
        v3, 1, 0, 3, True, True) * 2 + 2 * (8 * (64 + 1) * 2 + 8 * 8)
    # moe_layer_freq counts from layer 0 in DeepSeek (layer % freq == 0 past the dense ones).
    freq2 = load_model_shape(_tiny_deepseek_dict(num_hidden_layers=5, moe_layer_freq=2))
    assert [freq2.moe.is_moe_layer(i) for i in range(5)] == [False, False, True, False, True]


def test_mla_refuses_an_fp8_kv_cache_as_the_engine_does() -> None:
    with pytest.raises(ValueError, match="not supported for multi-head latent attention"):
        _plan("deepseek-v2-lite", 1, 80, kv_cache_dtype="fp8")


def test_max_model_len_beyond_the_trained_positions_warns(capsys) -> None:
    """As EngineConfig.resolve() warns: beyond max_position_embeddings (stretched by RoPE
    scaling, config_defaults.scaled_max_model_len) the positions were never trained. The text and the
    JSON say so."""
    from shardserve.cli import main

    flags = ["plan", "--model", "llama-3-8b", "--gpus", "1", "--gpu-memory", "80GiB"]
    assert main(flags + ["--max-model-len", "16384"]) == 0
    text = capsys.readouterr().out
    assert ("Warning  max_model_len 16384 is beyond the model's max_position_embeddings 8192"
            in text)
    assert main(flags + ["--max-model-len", "16384", "--json"]) == 0
    warnings = json.loads(capsys.readouterr().out)["warnings"]
    assert len(warnings) == 1 and "never trained" in warnings[0]
    assert _plan("llama-3-8b", 1, 80, max_model_len=8192).warnings == []
    assert _plan("llama-3-8b", 1, 80).warnings == []
    # llama3 RoPE: max_position_embeddings already counts the scaling (vLLM's rule too).
    assert _plan("llama-3.1-8b", 1, 141, max_model_len=131072).warnings == []
    assert "131072" in _plan("llama-3.1-8b", 1, 141, max_model_len=200000).warnings[0]
