"""Memory of one GPU of a layout, the way the engine spends it.

    ┌──────────────────────────── GPU memory ─────────────────────────────┐
    │◀──────────── gpu_memory_utilization × total ("usable") ──────────▶│  │
    │ weights │ activations (profile │ framework │      KV cache       │CG│
    │ + RoPE  │ peak above weights)  │ overhead  │ (whole blocks)      │  │
    └─────────────────────────────────────────────────────────────────────┘

executor/model_runner.py `_profile_cuda_blocks` sizes the KV cache as
    usable - torch's peak during a profiling forward (weights + activations)
           - memory outside torch's allocator (CUDA context, NCCL buffers),
so those four fill the usable share exactly. CUDA graphs (CG) are captured after the cache
exists and live in the 1 - utilization headroom; the plan checks they fit there.

The activation model traces the peak of the profiling forward of `num_tokens` tokens
(min(max_num_batched_tokens, max_model_len)) through models/llama.py op by op; see
`_token_transient_bytes`. Constants below that no formula gives (CUDA context, NCCL, per-graph
cost) are calibrated by benchmarks/planner_vs_measured.py on the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

from shardserve.config_defaults import DEFAULT_MAX_CUDA_GRAPH_BATCH_SIZE
from shardserve.executor.graph_sizes import decode_capture_sizes, mixed_capture_sizes, mixed_rows
from shardserve.planner.shape import ModelShape
from shardserve.planner.weights import (kv_bytes_per_token_layer, kv_heads_per_rank,
                                        stage_weight_bytes)

GiB = 1 << 30
MiB = 1 << 20
# Non-torch memory a CUDA process holds: context, kernels' modules, cuBLAS handles.
CUDA_CONTEXT_BYTES = 600 * MiB
# NCCL communicator buffers of a rank in a multi-GPU group (TP and/or PP).
NCCL_BYTES = 256 * MiB
# Each captured graph's private memory beyond the shared pool (vLLM reports ~5 MiB per size).
CUDA_GRAPH_BYTES_PER_GRAPH = 4 * MiB


@dataclass(frozen=True)
class ServingLimits:
    """The serving settings that change memory (CacheConfig / SchedulerConfig / ModelConfig,
    and ParallelConfig's enable_expert_parallel)."""

    max_model_len: int
    dtype_bytes: int = 2
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    enforce_eager: bool = False
    # ModelConfig's: steps of up to it are graphs (decode, and with mixed_cuda_graphs, steps
    # with prompt tokens)
    max_cuda_graph_batch_size: int = DEFAULT_MAX_CUDA_GRAPH_BATCH_SIZE
    mixed_cuda_graphs: bool = True
    kv_dtype_bytes: int | None = None  # --kv-cache-dtype: 1 for fp8; None: dtype_bytes
    expert_parallel: bool = False  # MoE: each TP rank holds E / tp whole experts
    fp8_weights: bool = False  # --quantization fp8 (planner/weights.py fp8_matrices)

    @property
    def kv_elem_bytes(self) -> int:
        return self.kv_dtype_bytes or self.dtype_bytes

    @property
    def profile_tokens(self) -> int:
        return min(self.max_num_batched_tokens, self.max_model_len)

    @property
    def profile_logit_rows(self) -> int:
        return min(self.max_num_seqs, self.profile_tokens)


@dataclass
class StageMemory:
    """One GPU of one pipeline stage (every TP rank of a stage is alike)."""

    stage: int
    start_layer: int
    end_layer: int  # exclusive
    weights_bytes: int  # parameters + the RoPE table
    activation_bytes: int  # the profiling forward's peak above the weights
    overhead_bytes: int  # CUDA context + NCCL: outside torch's allocator
    cuda_graph_bytes: int  # captured after the KV cache, in the headroom
    usable_bytes: int  # gpu_memory_utilization x GPU memory
    gpu_memory_bytes: int
    kv_bytes_per_block: int
    num_blocks: int = 0  # set once every stage is known: the replica's blocks are the minimum

    @property
    def num_layers(self) -> int:
        return self.end_layer - self.start_layer

    @property
    def kv_budget_bytes(self) -> int:
        """What this stage alone could give the KV cache (negative: out of memory)."""
        return self.usable_bytes - self.weights_bytes - self.activation_bytes - self.overhead_bytes

    @property
    def kv_cache_bytes(self) -> int:
        return self.num_blocks * self.kv_bytes_per_block

    @property
    def total_bytes(self) -> int:
        return (self.weights_bytes + self.activation_bytes + self.overhead_bytes
                + self.kv_cache_bytes + self.cuda_graph_bytes)

    @property
    def headroom_bytes(self) -> int:
        """GPU memory left after everything, CUDA graphs included."""
        return self.gpu_memory_bytes - self.total_bytes


def rope_table_bytes(shape: ModelShape, max_model_len: int) -> int:
    """layers/rotary.py builds one float32 [positions, rotary_dim] cos|sin table per model."""
    return shape.rope_table_positions(max_model_len) * shape.rotary_dim * 4


def _token_transient_bytes(shape: ModelShape, tp: int, elem: int,
                           expert_parallel: bool = False) -> int:
    """Peak bytes per token inside one decoder layer, beyond the weights, in the profiling
    forward. Traced through models/llama.py (counts in elements of `elem` bytes, f32 = 4):

        stream     hidden + residual            2h           (alive across every layer)
        RMSNorm    x+res, f32 copy, f32 scaled,  3h*elem + 8h  or  5h*elem + 4h
                   its dtype cast and product
        attention  qkv, rotated q and k, GQA-repeated k and v, the attention output and its
                   reshaped copy                 q+2kv + q+kv + 2q + 2q   (+ f32 q/k norms)
        MLP        gate_up, silu, product        2I/tp + I/tp + I/tp
    """
    h = shape.hidden_size
    stream = 2 * h * elem
    norm = max(3 * h * elem + 8 * h, 5 * h * elem + 4 * h)
    if shape.mla is not None:  # hook: vLLM-style MLA decompresses per-head k/v for prefill
        mla = shape.mla
        heads = shape.num_heads // tp
        q = heads * (mla.qk_nope_head_dim + mla.qk_rope_head_dim)
        kv = heads * (mla.qk_nope_head_dim + mla.qk_rope_head_dim + mla.v_head_dim)
        attn = (3 * q + 2 * kv + mla.kv_lora_rank + heads * mla.v_head_dim * 2) * elem
    else:
        q = shape.num_heads // tp * shape.head_dim
        kv = kv_heads_per_rank(shape.num_kv_heads, tp) * shape.head_dim
        repeated = 2 * q if q // shape.head_dim > kv // shape.head_dim else 0
        attn = (q + 2 * kv + q + kv + repeated + 2 * q) * elem
        if shape.qk_norm:
            attn += (q + kv) * (elem + 8)
    if shape.moe is not None:  # hook: fused-MoE workspace for top-k routed copies of each token
        moe = shape.moe
        # kernels/fused_moe.py keeps a row per (token, top-k) pair, whole experts under EP.
        inter = max(moe.expert_intermediate_size, 1) // (1 if expert_parallel else tp)
        mlp = (moe.num_experts_per_tok * (4 * inter + 2 * h) + moe.num_experts * 2) * elem
        mlp = max(mlp, 4 * (shape.intermediate_size // tp) * elem)
    else:
        mlp = 4 * (shape.intermediate_size // tp) * elem
    return stream + max(norm, attn, mlp)


def activation_bytes(shape: ModelShape, tp: int, limits: ServingLimits, last: bool) -> int:
    """The profiling forward's peak above the weights on one rank: the layers' transient
    memory for profile_tokens tokens, or, on the last stage, the logits of profile_logit_rows
    rows (LM head output, its TP all-gather, and the float32 copy) if that is higher."""
    elem, tokens = limits.dtype_bytes, limits.profile_tokens
    ids_and_positions = 16 * tokens  # int64 each
    layers = tokens * _token_transient_bytes(shape, tp, elem, limits.expert_parallel)
    if not last:
        return ids_and_positions + layers
    rows = limits.profile_logit_rows
    vocab_padded_rank = -(-shape.vocab_size // (64 * tp)) * 64
    logits = rows * vocab_padded_rank * elem + rows * shape.vocab_size * 4
    if tp > 1:
        logits += 2 * rows * vocab_padded_rank * tp * elem  # gathered stack and its concat
    final_hidden = tokens * shape.hidden_size * elem
    return ids_and_positions + max(layers, final_hidden + logits)


def cuda_graph_bytes(shape: ModelShape, tp: int, limits: ServingLimits, last: bool) -> int:
    """Graphs are captured largest first into one shared memory pool, which the largest
    step's activations size (a decode batch, or a step with prompt tokens: executor/
    graph_sizes.py has both ladders); each graph costs a little more of its own; the runner's
    static inputs (ids, positions, slots, lengths, block tables) and output buffer come on
    top."""
    if limits.enforce_eager:
        return 0
    sizes = decode_capture_sizes(min(limits.max_cuda_graph_batch_size, limits.max_num_seqs))
    mixed: list[int] = []
    if limits.mixed_cuda_graphs and shape.mla is None:  # MLA steps with prompts stay eager
        mixed = mixed_capture_sizes(min(limits.max_cuda_graph_batch_size,
                                        limits.max_num_batched_tokens), limits.max_model_len,
                                    limits.max_num_seqs)
    if not sizes and not mixed:
        return 0
    top = max(sizes + mixed)
    rows = max(sizes + [mixed_rows(t, limits.max_num_seqs) for t in mixed])
    step = ServingLimits(max_model_len=top, dtype_bytes=limits.dtype_bytes,
                         max_num_seqs=min(rows, top), max_num_batched_tokens=top,
                         expert_parallel=limits.expert_parallel)
    max_blocks = -(-limits.max_model_len // limits.block_size)
    static = (top * (8 * 3 + shape.hidden_size * limits.dtype_bytes)
              + rows * (4 + 4 + 4 * max_blocks))
    return (activation_bytes(shape, tp, step, last)
            + (len(sizes) + len(mixed)) * CUDA_GRAPH_BYTES_PER_GRAPH + static)


def framework_overhead_bytes(world_size: int, on_gpu: bool = True) -> int:
    if not on_gpu:
        return 0
    return CUDA_CONTEXT_BYTES + (NCCL_BYTES if world_size > 1 else 0)


def stage_memory(shape: ModelShape, tp: int, pp: int, stage: int, start: int, end: int,
                 limits: ServingLimits, gpu_memory_bytes: int) -> StageMemory:
    """One GPU of `stage` (of `pp`) holding layers [start, end) at tensor parallel size tp."""
    first, last = stage == 0, stage == pp - 1
    weights = stage_weight_bytes(shape, tp, start, end, first, last, limits.dtype_bytes,
                                 limits.expert_parallel, limits.fp8_weights)
    per_block = limits.block_size * (end - start) * kv_bytes_per_token_layer(
        shape, tp, limits.kv_elem_bytes)
    return StageMemory(
        stage=stage, start_layer=start, end_layer=end,
        weights_bytes=weights + rope_table_bytes(shape, limits.max_model_len),
        activation_bytes=activation_bytes(shape, tp, limits, last),
        overhead_bytes=framework_overhead_bytes(tp * pp),
        cuda_graph_bytes=cuda_graph_bytes(shape, tp, limits, last),
        usable_bytes=int(gpu_memory_bytes * limits.gpu_memory_utilization),
        gpu_memory_bytes=gpu_memory_bytes,
        kv_bytes_per_block=per_block)


def settle_blocks(stages: list[StageMemory]) -> int:
    """Every stage keeps the same block count (a block holds the same tokens on every
    stage): the smallest any stage can afford. Sets it on each stage and returns it."""
    num_blocks = max(0, min(s.kv_budget_bytes // s.kv_bytes_per_block for s in stages))
    for s in stages:
        s.num_blocks = num_blocks
    return num_blocks
