"""Model folders for tests and benchmarks, written without a model hub.

- `write_random_model`: a Hugging Face folder (config.json, *.safetensors, generation_config.json,
  tokenizer) of any shape with random weights — tiny ones for tests, Llama-3-8B or Qwen3-8B
  shapes for GPU benchmarks, where with ignore_eos throughput does not depend on the values.
- `export_gguf_to_hf`: the embedded SmolLM2 GGUF (or any GGUF the loader serves) as a float32
  HF folder, so the safetensors path can be tested against a real model.

Every folder gets SmolLM2's tokenizer (so text prompts and the chat template work) and a vocab at
least as large as it; weights are written one tensor at a time into shards, never the whole model.

    python -m shardserve.testing --arch llama --preset tiny --out /tmp/tiny [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from shardserve.testing_deepseek import (DEEPSEEK_ARCHITECTURES, DEEPSEEK_V2_LITE, TINY_DEEPSEEK_V2,
                                         TINY_DEEPSEEK_V3, deepseek_weight_specs, mlp_specs)

QWEN_MOE_ARCHITECTURES = {"qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                 **QWEN_MOE_ARCHITECTURES, **DEEPSEEK_ARCHITECTURES}
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # Hugging Face's historical default shard size
SMOLLM2_VOCAB_SIZE = 49152  # the tokenizer every folder gets; tiny vocabularies must cover it


@dataclass(frozen=True)
class Preset:
    """A model shape. `architecture` None: any of ARCHITECTURES (the tiny preset)."""

    architecture: str | None
    dtype: str
    config: dict[str, Any] = field(default_factory=dict)


_LLAMA31_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
PRESETS: dict[str, Preset] = {
    "tiny": Preset(None, "float32", dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, max_position_embeddings=2048,
        vocab_size=SMOLLM2_VOCAB_SIZE, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    # Llama-3.1-8B's shape (Llama-3-8B's plus llama3 rope scaling and 128k context).
    "llama-3-8b": Preset("llama", "bfloat16", dict(
        hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        intermediate_size=14336, vocab_size=128256, max_position_embeddings=131072,
        rms_norm_eps=1e-5, tie_word_embeddings=False, rope_parameters=_LLAMA31_ROPE)),
    # Llama-3.1-70B's shape: 141 GB in bf16, so benchmarks use --load-format dummy with a
    # folder written with weights=False (config and tokenizer only).
    "llama-3-70b": Preset("llama", "bfloat16", dict(
        hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
        intermediate_size=28672, vocab_size=128256, max_position_embeddings=131072,
        rms_norm_eps=1e-5, tie_word_embeddings=False, rope_parameters=_LLAMA31_ROPE)),
    "llama-3.2-1b": Preset("llama", "bfloat16", dict(
        hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
        head_dim=64, intermediate_size=8192, vocab_size=128256, max_position_embeddings=131072,
        rms_norm_eps=1e-5, tie_word_embeddings=True, rope_parameters={**_LLAMA31_ROPE, "factor": 32.0})),
    "qwen2.5-7b": Preset("qwen2", "bfloat16", dict(
        hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
        intermediate_size=18944, vocab_size=152064, max_position_embeddings=32768,
        rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    "qwen3-8b": Preset("qwen3", "bfloat16", dict(
        hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
        head_dim=128, intermediate_size=12288, vocab_size=151936, max_position_embeddings=40960,
        rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    "qwen3-0.6b": Preset("qwen3", "bfloat16", dict(
        hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
        head_dim=128, intermediate_size=3072, vocab_size=151936, max_position_embeddings=40960,
        rms_norm_eps=1e-6, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    # DeepSeek-V2-Lite's shape: 15.7B parameters (2.4B active), MLA + 64 routed experts.
    "deepseek-v2-lite": Preset("deepseek_v2", "bfloat16", DEEPSEEK_V2_LITE),
    "tiny-deepseek-v2": Preset("deepseek_v2", "float32",
                               dict(TINY_DEEPSEEK_V2, vocab_size=SMOLLM2_VOCAB_SIZE)),
    "tiny-deepseek-v3": Preset("deepseek_v3", "float32",
                               dict(TINY_DEEPSEEK_V3, vocab_size=SMOLLM2_VOCAB_SIZE)),
}


def write_random_model(out_dir: str | os.PathLike[str], architecture: str | None = None,
                       preset: str = "tiny", dtype: str | None = None, seed: int = 0,
                       max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, device: str = "cpu",
                       weights: bool = True, **config_overrides: Any) -> Path:
    """Write a Hugging Face model folder with random weights and return its path.

    `architecture` defaults to the preset's (llama for "tiny"); `dtype` to the preset's (float32
    for tiny, bfloat16 for the full-size shapes). `config_overrides` replace config fields, e.g.
    num_hidden_layers=2 to get a short model of a big preset's width. The same seed gives the
    same weights on the same device; device="cuda" draws them on the GPU (far faster for 8B).
    weights=False writes no weights at all: a folder for `--load-format dummy`."""
    if preset not in PRESETS:
        raise ValueError(f"Unknown preset {preset!r}; choose one of {', '.join(PRESETS)}.")
    shape = PRESETS[preset]
    architecture = architecture or shape.architecture or "llama"
    if architecture not in ARCHITECTURES:
        raise ValueError(f"Unknown architecture {architecture!r}; choose one of {', '.join(ARCHITECTURES)}.")
    if shape.architecture not in (None, architecture):
        raise ValueError(f"Preset {preset!r} is a {shape.architecture} shape; drop --arch or pass "
                         f"--arch {shape.architecture}.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = cached_gguf_tokenizer_dir(_default_gguf())
    ids = _special_token_ids(tokenizer_dir)
    config = _make_config(architecture, {**shape.config, **ids, **config_overrides},
                          dtype or shape.dtype)
    config.save_pretrained(out)
    torch_dtype = getattr(torch, dtype or shape.dtype)
    if weights:
        _write_shards(out, _random_tensors(config, architecture, torch_dtype, seed, device),
                      max_shard_bytes)
    _write_generation_config(out, config)
    _copy_tokenizer(tokenizer_dir, out)
    return out


def export_gguf_to_hf(gguf_path: str | os.PathLike[str] | None, out_dir: str | os.PathLike[str],
                      max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Write a GGUF the loader serves (None: the embedded SmolLM2) as a float32 Hugging Face
    folder."""
    from shardserve.loader.gguf import gguf_config, iter_gguf_weights

    path = Path(gguf_path) if gguf_path is not None else _default_gguf()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = gguf_config(path)
    config.dtype = "float32"
    config.name_or_path = ""
    config.save_pretrained(out)
    _write_shards(out, iter_gguf_weights(path), max_shard_bytes)
    _write_generation_config(out, config)
    _copy_tokenizer(cached_gguf_tokenizer_dir(path), out)
    return out


def cached_gguf_tokenizer_dir(gguf_path: Path) -> Path:
    """A folder holding the GGUF's tokenizer saved by transformers (tokenizer.json, ...).

    Converting a GGUF vocabulary takes ~5 s, so the result is kept under
    ~/.cache/shardserve/tokenizers (or $SHARDSERVE_CACHE_DIR/tokenizers), keyed by the file's
    name and size, and built once per machine."""
    from transformers import AutoTokenizer

    from shardserve.cache_dir import cache_dir
    cache = cache_dir() / "tokenizers" / f"{gguf_path.stem}-{gguf_path.stat().st_size}"
    if (cache / "tokenizer.json").is_file():
        return cache
    cache.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    # Save beside the cache and rename into place, so a concurrent test process never sees a
    # half-written folder; the loser of a race throws its copy away.
    staging = Path(tempfile.mkdtemp(dir=cache.parent, prefix=cache.name + ".partial-"))
    staging.chmod(0o755)  # mkdtemp makes it private; the cache is shared like ~/.cache
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(cache)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    return cache


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m shardserve.testing",
                                     description="Write a Hugging Face model folder for tests.")
    add_model_writer_args(parser)
    out = write_model_from_args(parser.parse_args(argv), parser)
    print(out)
    return out


def add_model_writer_args(parser: argparse.ArgumentParser) -> None:
    """The flags of `python -m shardserve.testing` and `shardserve random-model`."""
    parser.add_argument("--out", required=True, help="folder to write")
    parser.add_argument("--arch", choices=sorted(ARCHITECTURES), default=None,
                        help="architecture (default: the preset's; llama for tiny)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                        help="weight dtype (default: the preset's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field; VALUE is parsed as JSON if it can be")
    parser.add_argument("--from-gguf", default=None, metavar="PATH",
                        help="export this GGUF ('default': the embedded SmolLM2) instead "
                             "of writing random weights")
    parser.add_argument("--no-weights", action="store_true",
                        help="write config and tokenizer only (serve it with --load-format dummy)")


def write_model_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Path:
    """Write the folder add_model_writer_args' flags describe; returns its path."""
    if args.from_gguf is not None:
        return export_gguf_to_hf(None if args.from_gguf == "default" else args.from_gguf,
                                 args.out)
    overrides = dict(_parse_override(item, parser) for item in args.set)
    return write_random_model(args.out, args.arch, args.preset, args.dtype, args.seed,
                              weights=not args.no_weights, **overrides)


def _parse_override(item: str, parser: argparse.ArgumentParser) -> tuple[str, Any]:
    key, sep, text = item.partition("=")
    if not sep or not key:
        parser.error(f"--set takes KEY=VALUE, got {item!r}")
    try:
        return key, json.loads(text)
    except ValueError:
        return key, text


def _default_gguf() -> Path:
    from shardserve.loader.source import default_model_path
    return default_model_path()


def _special_token_ids(tokenizer_dir: Path) -> dict[str, int | None]:
    """bos/eos/pad ids of the copied tokenizer, so config.json agrees with it."""
    tokenizer_json = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    tokenizer_config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    by_content = {t["content"]: t["id"] for t in tokenizer_json.get("added_tokens", [])}
    vocab = tokenizer_json.get("model", {}).get("vocab", {})

    def token_id(name: str) -> int | None:
        token = tokenizer_config.get(name)
        return by_content.get(token, vocab.get(token)) if isinstance(token, str) else None

    return {"bos_token_id": token_id("bos_token"), "eos_token_id": token_id("eos_token"),
            "pad_token_id": token_id("pad_token")}


def _make_config(architecture: str, fields: dict[str, Any], dtype: str) -> Any:
    from transformers import AutoConfig

    fields = dict(fields)
    if architecture == "qwen3":
        # Qwen3Config defaults head_dim to 128 rather than hidden_size / heads.
        fields.setdefault("head_dim", fields["hidden_size"] // fields["num_attention_heads"])
    if architecture in QWEN_MOE_ARCHITECTURES:
        # The tiny preset has no experts: 8 narrow ones, two per token (a Qwen3-MoE with the
        # renormalised top-k its releases use, a Qwen2-MoE with its shared expert).
        for key, value in dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                               norm_topk_prob=architecture == "qwen3_moe").items():
            fields.setdefault(key, value)
        if architecture == "qwen2_moe":
            fields.setdefault("shared_expert_intermediate_size", 64)
    return AutoConfig.for_model(architecture, architectures=[ARCHITECTURES[architecture]],
                                dtype=dtype, **fields)


def _weight_specs(config: Any, architecture: str) -> Iterator[tuple[str, tuple[int, ...], str]]:
    """(name, shape, init) of every weight the HF model class expects, in its state-dict order.
    init: "normal" (random, std = initializer_range) or "ones" (norm scales)."""
    if architecture in DEEPSEEK_ARCHITECTURES:
        yield from deepseek_weight_specs(config, architecture)
        return
    hidden, vocab = config.hidden_size, config.vocab_size
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    inter = config.intermediate_size
    attention_bias = bool(getattr(config, "attention_bias", False))
    qkv_bias = (architecture == "qwen2" or attention_bias
                or (architecture == "qwen2_moe" and bool(getattr(config, "qkv_bias", True))))
    mlp_bias = bool(getattr(config, "mlp_bias", False))
    yield "model.embed_tokens.weight", (vocab, hidden), "normal"
    for layer in range(config.num_hidden_layers):
        p = f"model.layers.{layer}."
        for proj, rows in (("q_proj", heads * head_dim), ("k_proj", kv_heads * head_dim),
                           ("v_proj", kv_heads * head_dim)):
            yield f"{p}self_attn.{proj}.weight", (rows, hidden), "normal"
            if qkv_bias:
                yield f"{p}self_attn.{proj}.bias", (rows,), "normal"
        yield f"{p}self_attn.o_proj.weight", (hidden, heads * head_dim), "normal"
        if attention_bias:
            yield f"{p}self_attn.o_proj.bias", (hidden,), "normal"
        if architecture in ("qwen3", "qwen3_moe"):
            yield f"{p}self_attn.q_norm.weight", (head_dim,), "ones"
            yield f"{p}self_attn.k_norm.weight", (head_dim,), "ones"
        if architecture in QWEN_MOE_ARCHITECTURES and _is_qwen_moe_layer(config, layer):
            yield from _qwen_moe_specs(config, f"{p}mlp.")
        else:
            yield from mlp_specs(f"{p}mlp.", hidden, inter, mlp_bias)
        yield f"{p}input_layernorm.weight", (hidden,), "ones"
        yield f"{p}post_attention_layernorm.weight", (hidden,), "ones"
    yield "model.norm.weight", (hidden,), "ones"
    if not config.tie_word_embeddings:
        yield "lm_head.weight", (vocab, hidden), "normal"


def _is_qwen_moe_layer(config: Any, layer: int) -> bool:
    from shardserve.models.qwen_moe import is_qwen_moe_layer  # torch layers: imported late
    return is_qwen_moe_layer(config, layer)


def _qwen_moe_specs(config: Any, prefix: str) -> Iterator[tuple[str, tuple[int, ...], str]]:
    """A Qwen2/Qwen3-MoE sparse block as transformers saves it: router, experts one tensor
    each, and Qwen2-MoE's shared expert with its gate."""
    hidden = config.hidden_size
    yield f"{prefix}gate.weight", (config.num_experts, hidden), "normal"
    for e in range(config.num_experts):
        yield from mlp_specs(f"{prefix}experts.{e}.", hidden, config.moe_intermediate_size)
    shared = int(getattr(config, "shared_expert_intermediate_size", 0) or 0)
    if shared:
        yield from mlp_specs(f"{prefix}shared_expert.", hidden, shared)
        yield f"{prefix}shared_expert_gate.weight", (1, hidden), "normal"


def _random_tensors(config: Any, architecture: str, dtype: torch.dtype,
                    seed: int, device: str = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    std = float(getattr(config, "initializer_range", 0.02))
    for index, (name, shape, init) in enumerate(_weight_specs(config, architecture)):
        if init == "ones":
            yield name, torch.ones(shape, dtype=dtype)
            continue
        # One generator per tensor: a tensor's values do not depend on the ones before it.
        generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + index)
        yield name, torch.randn(shape, generator=generator, device=device).mul_(std).to(dtype).cpu()


def _write_shards(out: Path, tensors: Iterable[tuple[str, torch.Tensor]], max_shard_bytes: int) -> None:
    """Write tensors as model.safetensors, or as model-0000i-of-0000n.safetensors plus
    model.safetensors.index.json once they pass max_shard_bytes; holds one shard in memory."""
    from safetensors.torch import save_file

    for stale in [*out.glob("model*.safetensors"), out / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)
    shards: list[tuple[Path, list[str]]] = []
    pending: dict[str, torch.Tensor] = {}
    pending_bytes = total_bytes = 0

    def flush() -> None:
        nonlocal pending, pending_bytes
        path = out / f"model-{len(shards) + 1:05d}.safetensors.partial"
        save_file(pending, str(path), metadata={"format": "pt"})
        shards.append((path, list(pending)))
        pending, pending_bytes = {}, 0

    for name, tensor in tensors:
        num_bytes = tensor.numel() * tensor.element_size()
        if pending and pending_bytes + num_bytes > max_shard_bytes:
            flush()
        pending[name] = tensor.contiguous()
        pending_bytes += num_bytes
        total_bytes += num_bytes
    flush()
    if len(shards) == 1:
        shards[0][0].rename(out / "model.safetensors")
        return
    weight_map = {}
    for i, (path, names) in enumerate(shards, start=1):
        final = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        path.rename(out / final)
        weight_map.update(dict.fromkeys(names, final))
    index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _write_generation_config(out: Path, config: Any) -> None:
    generation = {key: getattr(config, key, None) for key in ("bos_token_id", "eos_token_id", "pad_token_id")}
    generation = {key: value for key, value in generation.items() if value is not None}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def _copy_tokenizer(tokenizer_dir: Path, out: Path) -> None:
    for file in tokenizer_dir.iterdir():
        if file.is_file():
            shutil.copy2(file, out / file.name)


if __name__ == "__main__":
    main()
