"""The most output tokens/s any engine could reach on an offline workload on this GPU, from the
model's shape and two measured limits: a large bf16 GEMM's FLOP/s and the copy bandwidth.

    python benchmarks/workload_bound.py --preset llama-3-8b --num-prompts 256 \
        --input-len 512 --output-len 256 [--tflops 789 --bandwidth-tbs 4.24]

Without --tflops / --bandwidth-tbs both are measured on the GPU first. The bound is optimistic
on purpose, so a target above it is out of reach for any engine:

    prefill   all prompt tokens in one pass: 2 x (linear params) FLOPs a token plus causal
              attention (QK and PV over half the prompt on average), at the GEMM peak; the
              weights are read once (ignored: far below the compute time)
    decode    one step per output token for all prompts at once: max(FLOPs / peak,
              (weights + every row's K/V so far) bytes / bandwidth), so the GEMMs, the
              attention and the cache reads overlap perfectly and nothing else runs

No kernel launch, sampling, scheduling or host time is counted, and prefill never waits for
memory. `llama8b_vs_hf.py` prints this bound beside its measured ratios.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass(frozen=True)
class Shape:
    """What the bound needs of a decoder-only model."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    weight_bytes_per_param: float = 2.0

    @classmethod
    def from_config(cls, config: dict) -> "Shape":
        heads = int(config["num_attention_heads"])
        head_dim = int(config.get("head_dim") or config["hidden_size"] // heads)
        return cls(int(config["hidden_size"]), int(config["num_hidden_layers"]), heads,
                   int(config.get("num_key_value_heads") or heads), head_dim,
                   int(config["intermediate_size"]), int(config["vocab_size"]))

    @property
    def layer_params(self) -> int:
        """Linear weights of the decoder layers (q, k, v, o, gate, up, down)."""
        q = self.heads * self.head_dim
        kv = self.kv_heads * self.head_dim
        return self.layers * (self.hidden * (q + 2 * kv) + q * self.hidden
                              + 3 * self.hidden * self.intermediate)

    @property
    def lm_head_params(self) -> int:
        return self.vocab * self.hidden

    def attention_flops(self, query_tokens: int, context: float) -> float:
        """QK^T and PV for query_tokens each seeing `context` keys, all layers."""
        return 4.0 * query_tokens * context * self.heads * self.head_dim * self.layers

    def kv_bytes_per_token(self, kv_bytes_per_element: float) -> float:
        return 2 * self.layers * self.kv_heads * self.head_dim * kv_bytes_per_element


@dataclass(frozen=True)
class Bound:
    prefill_s: float
    decode_s: float
    output_tokens: int

    @property
    def seconds(self) -> float:
        return self.prefill_s + self.decode_s

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds


def workload_bound(shape: Shape, num_prompts: int, input_len: int, output_len: int,
                   flops_per_s: float, bytes_per_s: float,
                   kv_bytes_per_element: float = 2.0) -> Bound:
    """The optimistic time of `num_prompts` prompts of input_len tokens, each generating
    output_len tokens (see the module doc)."""
    prompt_tokens = num_prompts * input_len
    prefill_flops = (2.0 * shape.layer_params * prompt_tokens
                     + 2.0 * shape.lm_head_params * num_prompts  # each prompt's first token
                     + shape.attention_flops(prompt_tokens, input_len / 2))
    prefill_s = prefill_flops / flops_per_s
    weight_bytes = (shape.layer_params + shape.lm_head_params) * shape.weight_bytes_per_param
    kv_per_token = shape.kv_bytes_per_token(kv_bytes_per_element)
    decode_s = 0.0
    for step in range(1, output_len):  # the first output token came with the prompt
        context = input_len + step
        flops = (2.0 * (shape.layer_params + shape.lm_head_params) * num_prompts
                 + shape.attention_flops(num_prompts, context))
        bytes_read = weight_bytes + num_prompts * context * kv_per_token
        decode_s += max(flops / flops_per_s, bytes_read / bytes_per_s)
    return Bound(prefill_s, decode_s, num_prompts * output_len)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="llama-3-8b")
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto")
    p.add_argument("--tflops", type=float, default=None, help="bf16 GEMM TFLOP/s (measured if unset)")
    p.add_argument("--bandwidth-tbs", type=float, default=None,
                   help="copy bandwidth in TB/s (measured if unset)")
    p.add_argument("--reference-tps", type=float, default=None,
                   help="a peer's measured output tok/s: print the bound as a multiple of it")
    args = p.parse_args(argv)
    from shardserve.testing import PRESETS
    shape = Shape.from_config(PRESETS[args.preset].config)
    tflops, tbs = args.tflops, args.bandwidth_tbs
    if tflops is None or tbs is None:
        import torch

        from benchmarks.common import copy_bandwidth
        from benchmarks.gemm_bench import peak_tflops
        tflops = tflops or peak_tflops(torch.bfloat16)
        tbs = tbs or copy_bandwidth() / 1e12
    bound = workload_bound(shape, args.num_prompts, args.input_len, args.output_len,
                           tflops * 1e12, tbs * 1e12, 1.0 if args.kv_cache_dtype == "fp8" else 2.0)
    print(f"{args.preset}, {args.num_prompts} x ({args.input_len} in / {args.output_len} out), "
          f"KV cache {args.kv_cache_dtype}, at {tflops:.0f} TFLOP/s and {tbs:.2f} TB/s:")
    print(f"  prefill >= {bound.prefill_s:.2f} s, decode >= {bound.decode_s:.2f} s: at most "
          f"{bound.output_tokens_per_s:,.0f} output tok/s")
    if args.reference_tps:
        print(f"  = {bound.output_tokens_per_s / args.reference_tps:.2f}x the reference's "
              f"{args.reference_tps:,.0f} tok/s")


if __name__ == "__main__":
    main()
