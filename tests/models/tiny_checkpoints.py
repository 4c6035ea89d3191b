"""Tiny random Llama/Qwen (dense and MoE) checkpoints written by transformers, and our loaded
counterpart."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

VOCAB = 500
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
               rms_norm_eps=1e-5)

_MOE = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32)

# name -> (config class name, overrides)
TINY_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", {"num_hidden_layers": 3}),
    "llama_bias": ("LlamaConfig", {"attention_bias": True, "mlp_bias": True,
                                   "tie_word_embeddings": True}),
    "llama_rope_llama3": ("LlamaConfig", {"rope_theta": 500000.0, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}}),
    # Heads wide enough that two frequencies fall between the two wavelength thresholds, as in
    # every real Llama-3.1: a GGUF keeps only the per-frequency factors, which then pin them down.
    "llama_rope_llama3_wide": ("LlamaConfig", {"head_dim": 32, "rope_theta": 500000.0, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}}),
    "llama_rope_yarn": ("LlamaConfig", {"rope_scaling": {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}}),
    "llama_rope_linear": ("LlamaConfig", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    "llama_rope_dynamic": ("LlamaConfig", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}),
    # Mistral-7B-v0.1's window, as wide as max_model_len (the default, max_position_embeddings):
    # full attention, served; v0.3's config has no window.
    "mistral_window": ("MistralConfig", {"sliding_window": 128, "head_dim": 32}),
    "qwen2": ("Qwen2Config", {"tie_word_embeddings": True}),
    "qwen3": ("Qwen3Config", {"head_dim": 32}),
    "qwen3_kv1": ("Qwen3Config", {"head_dim": 16, "num_key_value_heads": 1}),
    # MoE: every layer sparse with a shared expert; every other layer (decoder_sparse_step 2)
    # without q/k/v biases; dense layers by mlp_only_layers, tied, and Qwen3's renormalised top-k.
    "qwen2_moe": ("Qwen2MoeConfig", {"num_hidden_layers": 3, "shared_expert_intermediate_size": 48,
                                     **_MOE}),
    "qwen2_moe_step2": ("Qwen2MoeConfig", {
        "num_hidden_layers": 4, "decoder_sparse_step": 2, "qkv_bias": False,
        "norm_topk_prob": True, "shared_expert_intermediate_size": 48, **_MOE}),
    "qwen3_moe": ("Qwen3MoeConfig", {"head_dim": 32, "norm_topk_prob": True, **_MOE}),
    "qwen3_moe_dense_layers": ("Qwen3MoeConfig", {"head_dim": 16, "num_hidden_layers": 3,
                                                  "mlp_only_layers": [0, 2],
                                                  "tie_word_embeddings": True, **_MOE}),
}


def tiny_config(name: str) -> Any:
    import transformers

    cls_name, overrides = TINY_CONFIGS[name]
    return getattr(transformers, cls_name)(**{**_COMMON, **overrides})


def save_tiny_checkpoint(name: str, folder: Path, max_shard_size: str | None = None,
                         seed: int = 0) -> Any:
    """Write a random float32 checkpoint of TINY_CONFIGS[name]; returns the HF model (eval).

    Every parameter is re-drawn, biases and norm weights included (HF initialises those to
    0 and 1, which would hide a bias or norm that is not loaded)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(name), dtype=torch.float32).eval()
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if "norm" in pname:
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.15)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(folder), **kwargs)
    return model


def load_ours(folder: Path, dtype: str = "float32", device: str = "cpu",
              stage: Any = None) -> torch.nn.Module:
    """Our model from the folder, through the engine's own config resolution and loader
    (stage: only that pipeline stage's parts, models/pipeline.py StageLayout)."""
    from shardserve.config import EngineConfig
    from shardserve.loader.model_loader import load_model

    kind = "cpu" if device == "cpu" else "cuda"
    config = EngineConfig.from_kwargs(model=str(folder), dtype=dtype, device=kind).resolve()
    return load_model(config.model_config, torch.device(device), stage)


def our_logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    from shardserve.forward_context import set_forward_context

    with torch.no_grad(), set_forward_context(None):
        hidden = model(input_ids, torch.arange(input_ids.shape[0], device=input_ids.device))
        return model.compute_logits(hidden)


def hf_logits(model: Any, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids[None]).logits[0].float()


def assert_close_logits(ours: torch.Tensor, ref: torch.Tensor, rel: float = 1e-4) -> None:
    assert ours.shape == ref.shape and ours.dtype == torch.float32
    err = ((ours - ref).abs().max() / ref.abs().max()).item()
    assert err <= rel, f"max relative error {err:.2e} > {rel:.0e}"
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def quantize_fp8(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise FP8 (e4m3) quantization as DeepSeek-V3's and Qwen3-FP8's checkpoints store it:
    (weight, weight_scale_inv)."""
    n, k = weight.shape
    bn, bk = block
    rows, cols = -(-n // bn), -(-k // bk)
    padded = torch.zeros(rows * bn, cols * bk)
    padded[:n, :k] = weight
    blocks = padded.view(rows, bn, cols, bk)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0
    q = (blocks / scale[:, None, :, None]).to(torch.float8_e4m3fn)
    return q.view(rows * bn, cols * bk)[:n, :k].contiguous(), scale.float()


def write_fp8_twins(src: Path, fp8_dir: Path, deq_dir: Path, block: tuple[int, int]) -> None:
    """From the float32 checkpoint in `src`: an FP8 block-quantized copy (every 2-D *proj*
    weight quantized, quantization_config set) and its dequantized float32 twin."""
    from safetensors.torch import load_file, save_file

    fp8, deq = {}, {}
    for name, t in load_file(src / "model.safetensors").items():
        if t.dim() == 2 and "proj" in name and "norm" not in name:
            q, scale = quantize_fp8(t, block)
            fp8[name], fp8[name + "_scale_inv"] = q, scale
            deq[name] = (q.float() * scale.repeat_interleave(block[0], 0)
                         .repeat_interleave(block[1], 1)[:t.shape[0], :t.shape[1]])
        else:
            fp8[name] = deq[name] = t
    assert any(t.dtype == torch.float8_e4m3fn for t in fp8.values())
    config = json.loads((src / "config.json").read_text())
    for folder, weights, extra in ((fp8_dir, fp8, {"quantization_config": {
            "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
            "weight_block_size": list(block)}}), (deq_dir, deq, {})):
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({**config, **extra}))
        save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
