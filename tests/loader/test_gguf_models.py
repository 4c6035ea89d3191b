"""Whole tiny Llama/Qwen2/Qwen3 models and Qwen2-MoE/Qwen3-MoE models written as GGUF files the
way llama.cpp's convert_hf_to_gguf.py writes them, loaded by our engine and checked against
transformers."""

from __future__ import annotations

from pathlib import Path
from collections.abc import Iterator
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize
from tests.models.deepseek_checkpoints import copy_tokenizer
from tests.models.engine_reference import assert_engine_matches_transformers
from tests.models.tiny_checkpoints import (VOCAB, assert_close_logits, hf_logits, load_ours,
                                           our_logits, save_tiny_checkpoint)

from shardserve.loader.gguf import gguf_config, iter_gguf_weights, num_gguf_weights
from shardserve.models.llama import LlamaMLP, head_dim_of
from shardserve.models.qwen_moe import QwenMoeBlock

_TENSOR_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
                 "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
                 "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "ffn_norm",
                 "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
                 "mlp.gate": "ffn_gate_inp", "mlp.shared_expert.gate_proj": "ffn_gate_shexp",
                 "mlp.shared_expert.up_proj": "ffn_up_shexp",
                 "mlp.shared_expert.down_proj": "ffn_down_shexp",
                 "mlp.shared_expert_gate": "ffn_gate_inp_shexp",
                 "self_attn.q_a_proj": "attn_q_a", "self_attn.q_a_layernorm": "attn_q_a_norm",
                 "self_attn.q_b_proj": "attn_q_b", "self_attn.kv_a_proj_with_mqa": "attn_kv_a_mqa",
                 "self_attn.kv_a_layernorm": "attn_kv_a_norm", "self_attn.kv_b_proj": "attn_kv_b",
                 "mlp.shared_experts.gate_proj": "ffn_gate_shexp",
                 "mlp.shared_experts.up_proj": "ffn_up_shexp",
                 "mlp.shared_experts.down_proj": "ffn_down_shexp"}
_GGUF_ARCH = {"qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "deepseek_v2": "deepseek2",
              "deepseek_v3": "deepseek2"}


def _gguf_name(hf_name: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if hf_name in top:
        return top[hf_name]
    _, _, layer, *part, kind = hf_name.split(".")
    if kind in ("gate_exps", "up_exps", "down_exps"):  # from _hf_tensors
        return f"blk.{layer}.ffn_{kind}.weight"
    if kind == "e_score_correction_bias":
        return f"blk.{layer}.exp_probs_b.bias"
    return f"blk.{layer}.{_TENSOR_NAMES['.'.join(part)]}.{kind}"


def _hf_tensors(model: Any) -> Iterator[tuple[str, np.ndarray]]:
    """The model's tensors as the converter sees them: one per expert projection, stacked per
    layer ([E, I, H] gate and up, [E, H, I] down) under transformers' stacked-experts names."""
    for name, tensor in model.state_dict().items():
        array = tensor.float().numpy()
        if name.endswith(".mlp.experts.gate_up_proj"):
            gate, up = np.split(array, 2, axis=1)
            yield name.replace("gate_up_proj", "gate_exps"), gate
            yield name.replace("gate_up_proj", "up_exps"), up
        elif name.endswith(".mlp.experts.down_proj"):
            yield name.replace("down_proj", "down_exps"), array
        else:
            yield name, array


def _stored(gguf_name: str, array: np.ndarray, qtype: Q) -> tuple[np.ndarray, Q | None]:
    """(data, raw type) as the converter stores a tensor: 1-D tensors and the router in F32
    (convert_hf_to_gguf keeps ffn_gate_inp in F32), rows that do not fill whole blocks too."""
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if (qtype == Q.F32 or array.ndim == 1 or ".ffn_gate_inp" in gguf_name
            or array.shape[-1] % block):
        return np.ascontiguousarray(array), None
    return quantize(array, qtype), qtype


def write_gguf_like_llama_cpp(model: Any, path: Path, qtype: Q = Q.F32,
                              split_kv_b: bool = True, split_max_tensors: int = 0) -> Path:
    """What convert_hf_to_gguf.py writes for this transformers model: its hyperparameters and
    rope scaling as metadata, llama's q/k rows permuted, tied embeddings without output.weight,
    experts stacked, DeepSeek's kv_b_proj split into attn_k_b/attn_v_b (split_kv_b, as current
    converters do) or not (older ones), matrices quantized to `qtype` and 1-D tensors in F32;
    with split_max_tensors, in parts NAME-0000K-of-0000N.gguf of that many tensors each
    (--split-max-tensors; the first part is returned).

    Afterwards `model` holds the values the file holds (each quantized weight replaced by its
    dequantized self), so it is the float32 reference for the file. Quantization works row by
    row, so the round trip in Hugging Face's layout equals the file's after un-permuting and
    un-stacking."""
    config = model.config
    arch = _GGUF_ARCH.get(config.model_type, config.model_type)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer = gguf.GGUFWriter(str(path), arch, split_max_tensors=split_max_tensors)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(heads)
    writer.add_head_count_kv(1 if arch == "deepseek2" else kv_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    if arch == "deepseek2":
        _add_deepseek_metadata(writer, config)
    else:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    rope = config.rope_parameters
    if rope["rope_type"] in ("linear", "yarn"):
        writer.add_rope_scaling_type(gguf.RopeScalingType(rope["rope_type"]))
        writer.add_rope_scaling_factor(rope["factor"])
    if rope["rope_type"] == "yarn":
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    if rope["rope_type"] == "llama3":
        writer.add_tensor("rope_freqs.weight", _llama3_rope_freqs(rope, head_dim))
    if arch in ("qwen2moe", "qwen3moe"):
        _add_moe_metadata(writer, config, arch)
    for name, array in _hf_tensors(model):
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            n = heads if ".q_proj." in name else kv_heads
            array = (array.reshape(n, 2, array.shape[0] // n // 2, *array.shape[1:])
                     .swapaxes(1, 2).reshape(array.shape))
        if name.endswith(".shared_expert_gate.weight"):
            array = array[0]  # llama.cpp keeps this [1, H] gate as a vector
        if arch == "deepseek2" and name.endswith(".kv_b_proj.weight") and split_kv_b:
            for part, half in zip(("attn_k_b", "attn_v_b"), _split_kv_b(array, config)):
                gguf_name = _gguf_name(name).replace("attn_kv_b", part)
                data, raw_type = _stored(gguf_name, half, qtype)
                writer.add_tensor(gguf_name, data, raw_dtype=raw_type)
            continue
        data, raw_type = _stored(_gguf_name(name), array, qtype)
        writer.add_tensor(_gguf_name(name), data, raw_dtype=raw_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if qtype != Q.F32:
        _round_trip_in_place(model, qtype, split_kv_b)
    return writer.format_shard_names(path)[0]


def _llama3_rope_freqs(rope: dict[str, Any], head_dim: int) -> np.ndarray:
    """LlamaModel.generate_extra_tensors: Llama-3.1 rope scaling as one factor per frequency."""
    original, factor = rope["original_max_position_embeddings"], rope["factor"]
    low, high = rope["low_freq_factor"], rope["high_freq_factor"]
    wavelen = 2 * np.pi * rope["rope_theta"] ** (np.arange(0, head_dim, 2) / head_dim)
    smooth = (original / wavelen - low) / (high - low)
    between = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < original / high, 1.0,
                    np.where(wavelen > original / low, factor, between)).astype(np.float32)


def _add_deepseek_metadata(writer: gguf.GGUFWriter, config: Any) -> None:
    """DeepseekV2Model.set_gguf_parameters: MLA sizes in the absorbed form (one KV head of
    kv_lora_rank + rope dims) plus the real ones as *_mla, the router, YaRN's mscale."""
    rank, rope_dim = config.kv_lora_rank, config.qk_rope_head_dim
    writer.add_key_length(rank + rope_dim)
    writer.add_value_length(rank)
    writer.add_key_length_mla(config.qk_nope_head_dim + rope_dim)
    writer.add_value_length_mla(config.v_head_dim)
    writer.add_kv_lora_rank(rank)
    if config.q_lora_rank:
        writer.add_q_lora_rank(config.q_lora_rank)
    writer.add_rope_dimension_count(rope_dim)
    writer.add_leading_dense_block_count(config.first_k_dense_replace)
    writer.add_expert_count(config.n_routed_experts)
    writer.add_expert_used_count(config.num_experts_per_tok)
    writer.add_expert_feed_forward_length(config.moe_intermediate_size)
    writer.add_expert_shared_count(config.n_shared_experts)
    writer.add_expert_weights_scale(config.routed_scaling_factor)
    writer.add_expert_weights_norm(config.norm_topk_prob)
    v3 = config.model_type == "deepseek_v3"
    writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if v3
                                  else gguf.ExpertGatingFuncType.SOFTMAX)
    writer.add_expert_group_count(config.n_group)
    writer.add_expert_group_used_count(config.topk_group)
    rope = config.rope_parameters
    if rope["rope_type"] == "yarn":
        writer.add_rope_scaling_yarn_log_mul(0.1 * rope["mscale_all_dim"])


def _split_kv_b(kv_b: np.ndarray, config: Any) -> tuple[np.ndarray, np.ndarray]:
    """kv_b_proj [H*(n+v), r] -> attn_k_b [H, r, n] (transposed), attn_v_b [H, v, r]."""
    heads, nope = config.num_attention_heads, config.qk_nope_head_dim
    per_head = kv_b.reshape(heads, nope + config.v_head_dim, kv_b.shape[-1])
    return (np.ascontiguousarray(per_head[:, :nope].swapaxes(1, 2)),
            np.ascontiguousarray(per_head[:, nope:]))


def _add_moe_metadata(writer: gguf.GGUFWriter, config: Any, arch: str) -> None:
    writer.add_expert_count(config.num_experts)
    writer.add_expert_used_count(config.num_experts_per_tok)
    writer.add_expert_feed_forward_length(config.moe_intermediate_size)
    if arch == "qwen2moe":
        writer.add_expert_shared_feed_forward_length(config.shared_expert_intermediate_size)
    # The converter writes no expert_weights_norm for Qwen (llama.cpp renormalises for qwen3moe
    # only); a model that differs from that says so, as DeepSeek's files do.
    if bool(config.norm_topk_prob) != (arch == "qwen3moe"):
        writer.add_expert_weights_norm(bool(config.norm_topk_prob))


def _round_trip(gguf_name: str, array: np.ndarray, qtype: Q) -> np.ndarray:
    data, raw_type = _stored(gguf_name, array, qtype)
    return array if raw_type is None else dequantize(data, raw_type)


@torch.no_grad()
def _round_trip_in_place(model: Any, qtype: Q, split_kv_b: bool) -> None:
    config = model.config
    for name, param in model.named_parameters():
        router = name.endswith((".mlp.gate.weight", ".shared_expert_gate.weight"))
        gguf_name = "blk.0.ffn_gate_inp.weight" if router else name
        array = param.detach().float().numpy()
        if name.endswith(".kv_b_proj.weight") and split_kv_b:
            # attn_k_b is stored transposed: its blocks run along the nope dim.
            k_b, v_b = (_round_trip(name, half, qtype) for half in _split_kv_b(array, config))
            merged = np.concatenate([k_b.swapaxes(1, 2), v_b], axis=1).reshape(array.shape)
            param.copy_(torch.from_numpy(merged))
            continue
        param.copy_(torch.from_numpy(_round_trip(gguf_name, array, qtype)))


# llama_rope_llama3_wide: a rope_freqs tensor instead of metadata, as for Llama-3.1/3.2.
_NAMES = ["llama", "llama_bias", "llama_rope_linear", "llama_rope_yarn", "llama_rope_llama3_wide",
          "qwen2", "qwen3", "qwen3_kv1"]


@pytest.mark.parametrize("name", _NAMES)
def test_float32_gguf_matches_the_model_it_came_from(name: str, tmp_path: Path) -> None:
    hf = save_tiny_checkpoint(name, tmp_path / "hf")
    path = write_gguf_like_llama_cpp(hf, tmp_path / "m.gguf")
    config = gguf_config(path)
    for field in ("model_type", "architectures", "vocab_size", "hidden_size", "num_attention_heads",
                  "num_key_value_heads", "tie_word_embeddings"):
        assert getattr(config, field) == getattr(hf.config, field), field
    assert head_dim_of(config) == head_dim_of(hf.config)
    rope = hf.config.rope_parameters
    if rope["rope_type"] == "llama3":
        # rope_freqs fixes only the ratios of the context and the two thresholds: the loader
        # states them for Llama 3.1's context of 8192 (the same ramp; the logits check it).
        assert {k: config.rope_parameters[k] for k in ("rope_type", "rope_theta", "factor")} \
            == {k: rope[k] for k in ("rope_type", "rope_theta", "factor")}
    else:
        assert config.rope_parameters == rope
    input_ids = torch.randint(0, VOCAB, (24,), generator=torch.Generator().manual_seed(3))
    assert_close_logits(our_logits(load_ours(path), input_ids), hf_logits(hf, input_ids))


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_quantized_gguf_matches_transformers_loading_it(name: str, tmp_path: Path) -> None:
    # transformers reads Qwen3 GGUFs with its default head_dim of 128, so qwen3 is left out here.
    from transformers import AutoModelForCausalLM

    hf = save_tiny_checkpoint(name, tmp_path / "hf")
    path = write_gguf_like_llama_cpp(hf, tmp_path / "m.gguf", Q.Q5_1)
    reference = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name,
                                                     dtype=torch.float32).eval()
    input_ids = torch.randint(0, VOCAB, (24,), generator=torch.Generator().manual_seed(4))
    assert_close_logits(our_logits(load_ours(path), input_ids), hf_logits(reference, input_ids))


def test_split_gguf_loads_from_any_part(tmp_path: Path) -> None:
    """A model in three parts (gguf-split's NAME-0000K-of-00003.gguf), served from whichever part
    or the folder: every part's tensors, the first part's metadata, transformers' logits."""
    from shardserve.loader.source import resolve_model_source

    hf = save_tiny_checkpoint("llama", tmp_path / "hf")
    (tmp_path / "gguf").mkdir()
    first = write_gguf_like_llama_cpp(hf, tmp_path / "gguf" / "m.gguf", Q.Q8_0, split_max_tensors=12)
    parts = sorted((tmp_path / "gguf").iterdir())
    assert [p.name for p in parts] == [f"m-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    assert first == parts[0]
    expected = len(hf.state_dict())
    for part in parts:
        assert num_gguf_weights(part) == expected
        assert gguf_config(part).num_hidden_layers == hf.config.num_hidden_layers
    source = resolve_model_source(str(tmp_path / "gguf"))
    assert (source.path, source.name) == (parts[0], "m")
    assert resolve_model_source(str(parts[1])).name == "m"
    input_ids = torch.randint(0, VOCAB, (24,), generator=torch.Generator().manual_seed(7))
    assert_close_logits(our_logits(load_ours(parts[2]), input_ids), hf_logits(hf, input_ids))


# qwen2_moe: every layer sparse, shared expert, q/k/v biases; qwen2_moe_step2: dense layers in
# between, no biases, renormalised top-k (expert_weights_norm); qwen3_moe: q/k norms, llama.cpp's
# renormalised top-k; qwen3_moe_dense_layers: mlp_only_layers, tied, no renormalisation.
_MOE_NAMES = ["qwen2_moe", "qwen2_moe_step2", "qwen3_moe", "qwen3_moe_dense_layers"]


@pytest.mark.parametrize("qtype", [Q.F32, Q.Q8_0], ids=lambda q: q.name)
@pytest.mark.parametrize("name", _MOE_NAMES)
def test_moe_gguf_matches_the_model_it_came_from(name: str, qtype: Q, tmp_path: Path) -> None:
    hf = save_tiny_checkpoint(name, tmp_path / "hf")
    path = write_gguf_like_llama_cpp(hf, tmp_path / "m.gguf", qtype)
    config = gguf_config(path)
    for field in ("model_type", "architectures", "num_experts", "num_experts_per_tok",
                  "moe_intermediate_size", "norm_topk_prob", "tie_word_embeddings",
                  "num_hidden_layers", "intermediate_size"):
        assert getattr(config, field) == getattr(hf.config, field), field
    if name.startswith("qwen2"):
        assert config.shared_expert_intermediate_size == hf.config.shared_expert_intermediate_size
        assert config.qkv_bias == hf.config.qkv_bias
    ours = load_ours(path)
    sparse = [type(layer.mlp).__name__.endswith("SparseMoeBlock") for layer in hf.model.layers]
    assert [isinstance(layer.mlp, QwenMoeBlock) for layer in ours.model.layers] == sparse
    assert all(isinstance(layer.mlp, LlamaMLP) for layer, s in zip(ours.model.layers, sparse)
               if not s)
    input_ids = torch.randint(0, VOCAB, (24,), generator=torch.Generator().manual_seed(5))
    assert_close_logits(our_logits(ours, input_ids), hf_logits(hf, input_ids))


def test_moe_gguf_yields_one_tensor_per_expert(tmp_path: Path) -> None:
    hf = save_tiny_checkpoint("qwen2_moe", tmp_path / "hf")
    path = write_gguf_like_llama_cpp(hf, tmp_path / "m.gguf")
    weights = dict(iter_gguf_weights(path))
    assert len(weights) == num_gguf_weights(path)
    stacked = hf.state_dict()
    gate_up = stacked["model.layers.2.mlp.experts.gate_up_proj"]
    assert torch.equal(weights["model.layers.2.mlp.experts.5.gate_proj.weight"], gate_up[5, :32])
    assert torch.equal(weights["model.layers.2.mlp.experts.5.up_proj.weight"], gate_up[5, 32:])
    assert torch.equal(weights["model.layers.2.mlp.experts.7.down_proj.weight"],
                       stacked["model.layers.2.mlp.experts.down_proj"][7])
    assert weights["model.layers.0.mlp.shared_expert_gate.weight"].shape == (1, 64)
    # A pipeline stage's filter sees each expert's name, and skips the stack unread.
    kept = dict(iter_gguf_weights(path, include=lambda n: ".layers.1." in n))
    assert "model.layers.1.mlp.experts.0.down_proj.weight" in kept
    assert not any(".layers.2." in n for n in kept)
    # So does an expert-parallel rank's, expert by expert (it was asked about expert 0 only).
    kept = dict(iter_gguf_weights(path, include=lambda n: ".experts.5." in n
                                  or ".experts." not in n))
    assert {n for n in kept if ".experts." in n} == {
        f"model.layers.{i}.mlp.experts.5.{p}_proj.weight"
        for i in range(3) for p in ("gate", "up", "down")}
    assert torch.equal(kept["model.layers.2.mlp.experts.5.gate_proj.weight"], gate_up[5, :32])


def test_expert_parallel_rank_dequantizes_only_its_experts(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 1 of two expert-parallel ranks holds experts 4..7: it dequantizes those alone
    (each whole), not every layer's whole stack, and gets transformers' weights for them."""
    from shardserve.loader import gguf as gguf_loader
    from tests.test_planner_vs_engine import _stand_in_tp_group

    hf = save_tiny_checkpoint("qwen2_moe", tmp_path / "hf")
    path = write_gguf_like_llama_cpp(hf, tmp_path / "m.gguf", Q.Q8_0)
    dequantized: list[tuple[str, int | None]] = []
    real = gguf_loader._dequantize

    def spy(gguf_file, info, *index):
        dequantized.append((info.name, *(index or (None,))))
        return real(gguf_file, info, *index)

    monkeypatch.setattr(gguf_loader, "_dequantize", spy)
    with _stand_in_tp_group(2, 1, expert_parallel=True):
        ours = load_ours(path)
    experts = {(name, index) for name, index in dequantized if "_exps" in name}
    assert experts == {(f"blk.{i}.ffn_{p}_exps.weight", e) for i in range(3)
                       for p in ("gate", "up", "down") for e in range(4, 8)}
    moe = ours.model.layers[2].mlp.experts
    assert moe.w13_weight.shape[0] == 4
    stacked = hf.state_dict()
    down = stacked["model.layers.2.mlp.experts.down_proj"]
    torch.testing.assert_close(moe.w2_weight[1], down[5], atol=0.01, rtol=0)


def test_moe_gguf_engine_greedy_matches_transformers(tmp_path: Path) -> None:
    """Q8_0 experts through the engine: transformers' greedy tokens on the same (dequantized)
    weights, with prefix caching and chunked prefill."""
    hf = save_tiny_checkpoint("qwen2_moe_step2", tmp_path / "hf")
    path = write_gguf_like_llama_cpp(hf, tmp_path / "m.gguf", Q.Q8_0)
    copy_tokenizer(tmp_path / "hf")
    assert_engine_matches_transformers(hf, path, seed=9, vocab=VOCAB, tokenizer=str(tmp_path / "hf"))


@pytest.mark.multiproc
@pytest.mark.parametrize("expert_parallel", [False, True], ids=["tp2", "ep2"])
def test_moe_gguf_tp2_greedy_matches_transformers(expert_parallel: bool, tmp_path: Path) -> None:
    """Two gloo ranks, each dequantizing every expert and keeping its slice of each (TP), or
    dequantizing only its four whole experts (EP): transformers' greedy tokens."""
    from shardserve import LLM, SamplingParams
    from tests.e2e.hf_reference import hf_greedy

    hf = save_tiny_checkpoint("qwen2_moe", tmp_path / "hf")
    path = write_gguf_like_llama_cpp(hf, tmp_path / "m.gguf", Q.Q8_0)
    copy_tokenizer(tmp_path / "hf")
    prompts = [torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(n)).tolist()
               for n in (5, 21)]
    expected = [hf_greedy(hf, p, 6) for p in prompts]
    llm = LLM(str(path), tokenizer=str(tmp_path / "hf"), tensor_parallel_size=2,
              enable_expert_parallel=expert_parallel, device="cpu", dtype="float32",
              max_model_len=64, block_size=8)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == expected
    finally:
        llm.shutdown()


@pytest.mark.parametrize("qtype,split_kv_b", [(Q.F32, True), (Q.Q8_0, True), (Q.Q8_0, False)],
                         ids=["F32", "Q8_0", "Q8_0-kv_b"])
@pytest.mark.parametrize("name", ["v2_lite", "v3"])
def test_deepseek2_gguf_matches_the_model_it_came_from(name: str, qtype: Q, split_kv_b: bool,
                                                      tmp_path: Path) -> None:
    """V2-Lite (no q LoRA, softmax, greedy, YaRN mscale 0.707) and V3 (q LoRA, sigmoid with
    bias, grouped top-k, renormalised and scaled): kv_b_proj split as current converters write
    it, or whole as older ones did."""
    from tests.models.deepseek_checkpoints import save_tiny_deepseek

    hf = save_tiny_deepseek(name, tmp_path / "hf")
    path = write_gguf_like_llama_cpp(hf, tmp_path / "m.gguf", qtype, split_kv_b=split_kv_b)
    config = gguf_config(path)
    for field in ("model_type", "architectures", "num_key_value_heads", "qk_nope_head_dim",
                  "qk_rope_head_dim", "v_head_dim", "kv_lora_rank", "q_lora_rank",
                  "first_k_dense_replace", "n_routed_experts", "num_experts_per_tok",
                  "moe_intermediate_size", "n_shared_experts", "routed_scaling_factor",
                  "norm_topk_prob", "n_group", "topk_group"):
        assert getattr(config, field) == getattr(hf.config, field), field
    # GGUF keeps YaRN's betas only when they differ from the defaults, and mscale in float32.
    rope = {k: v for k, v in hf.config.rope_parameters.items() if k not in ("beta_fast", "beta_slow")}
    assert config.rope_parameters == pytest.approx(rope)
    input_ids = torch.randint(0, VOCAB, (24,), generator=torch.Generator().manual_seed(6))
    assert_close_logits(our_logits(load_ours(path), input_ids), hf_logits(hf, input_ids))
