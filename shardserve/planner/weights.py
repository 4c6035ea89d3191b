"""Parameter counts per tensor-parallel rank, exactly as the engine's layers allocate them.

The rules follow layers/linear.py and layers/embedding.py:

    QKVParallelLinear        q heads / tp, KV heads / tp (one replicated head per rank once
                             tp >= num_kv_heads), bias rows the same when present
    ColumnParallelLinear     out / tp rows (gate_up: 2 * intermediate / tp), sharded bias
    RowParallelLinear        in / tp columns; the bias is whole on every rank
    VocabParallelEmbedding   vocab padded to a multiple of 64 * tp, then / tp rows
    RMSNorm, q/k norms       whole on every rank

    FusedMoE (layers/moe.py) every expert sliced to I / tp, or under expert parallelism E / tp
                             whole experts (rounded up: the first E % tp ranks hold one more,
                             and a plan sizes every GPU for the fullest); shared experts
                             TP-sliced either way; the router replicated (DeepSeek: float32,
                             V3 with a float32 bias per expert; Qwen2-MoE: a [1, hidden]
                             shared-expert gate beside it)

Counts are elements; multiply by the dtype's size, or take `stage_weight_bytes`, which adds
what is not in the model dtype (DeepSeek's float32 router, FusedMoE's int64 expert_map).
`attention_params` and `mlp_params` are the two hooks where an architecture plugs in its own
accounting (MLA follows models/deepseek.py).
"""

from __future__ import annotations

from shardserve.config import FP8_GROUP_SIZE
from shardserve.planner.shape import MLASpec, ModelShape

VOCAB_PADDING = 64  # layers/embedding.py DEFAULT_VOCAB_PADDING_SIZE


def pad_vocab(vocab_size: int, tp: int) -> int:
    multiple = VOCAB_PADDING * tp
    return -(-vocab_size // multiple) * multiple


def vocab_rows_per_rank(shape: ModelShape, tp: int) -> int:
    return pad_vocab(shape.vocab_size, tp) // tp


def kv_heads_per_rank(num_kv_heads: int, tp: int) -> int:
    """QKVParallelLinear: KV heads split while tp <= num_kv_heads, else one replicated head."""
    return 1 if tp >= num_kv_heads else num_kv_heads // tp


def tp_problems(shape: ModelShape, tp: int, expert_parallel: bool = False) -> list[str]:
    """Why the engine's layers refuse this tensor-parallel size (empty: they accept it). Under
    `expert_parallel` the TP ranks hold whole experts (layers/moe.py), so their width need not
    divide by TP, and their number need not either (as in vLLM, some ranks hold one more), but
    every rank needs one."""
    problems = []
    if shape.num_heads % tp:
        problems.append(f"{shape.num_heads} attention heads do not divide by TP {tp}")
    if shape.mla is None:
        kv = shape.num_kv_heads
        if tp >= kv and tp % kv:
            problems.append(f"TP {tp} cannot replicate {kv} KV heads evenly (TP must be a "
                            f"multiple of {kv} once it exceeds the KV heads)")
        elif tp < kv and kv % tp:
            problems.append(f"{kv} KV heads do not divide by TP {tp}")
    moe = shape.moe
    # Only dense layers build an MLP of intermediate_size (Qwen3-MoE may have none).
    has_dense = moe is None or not all(moe.is_moe_layer(i) for i in range(shape.num_layers))
    if has_dense and shape.intermediate_size % tp:
        problems.append(f"intermediate_size {shape.intermediate_size} does not divide by TP {tp}")
    if moe is not None and expert_parallel and moe.num_experts < tp:
        problems.append(f"{moe.num_experts} experts cannot be spread over {tp} "
                        "expert-parallel ranks (or drop --enable-expert-parallel)")
    elif moe is not None and not expert_parallel and moe.expert_intermediate_size % tp:
        problems.append(f"expert intermediate size {moe.expert_intermediate_size} does "
                        f"not divide by TP {tp}")
    if moe is not None and moe.shared_intermediate_size % tp:  # shared experts: TP-sliced
        problems.append(f"shared experts' intermediate size "
                        f"{moe.shared_intermediate_size} does not divide by TP {tp}")
    return problems


def expert_parallel_problem(shape: ModelShape) -> str | None:
    """Why --enable-expert-parallel does nothing for this model (None: it applies)."""
    if shape.moe is None:
        return (f"enable_expert_parallel has no effect: {shape.architecture or 'this model'} "
                "has no experts (drop --enable-expert-parallel).")
    return None


def expert_parallel_layout_note(shape: ModelShape, tp: int, dp: int) -> str | None:
    """Where --enable-expert-parallel leaves the experts when that is not what a vLLM user
    expects (None: it splits them over the TP ranks, nothing to say). vLLM's EP group is
    TP x DP ranks; ours one engine's TP ranks, as data-parallel replicas are separate engines
    (router/data_parallel.py), so TP 1 keeps every expert on every GPU whatever DP is."""
    if shape.moe is None or (tp > 1 and dp == 1):
        return None
    experts = shape.moe.num_experts
    unlike_vllm = (f"; the {dp} data-parallel replicas do not share experts (vLLM's "
                   "expert-parallel group spans TP x DP ranks)" if dp > 1 else "")
    hint = "To spread the experts over N GPUs, use -tp N --enable-expert-parallel."
    if tp == 1:
        return ("enable_expert_parallel has no effect with tensor_parallel_size=1: experts are "
                f"split over one engine's tensor-parallel ranks, so every GPU holds all "
                f"{experts}{unlike_vllm}. {hint}")
    per_gpu = f"{experts // tp}" + ("" if experts % tp == 0 else f" or {experts // tp + 1}")
    return (f"enable_expert_parallel splits the {experts} experts over each replica's {tp} "
            f"tensor-parallel ranks ({per_gpu} per GPU){unlike_vllm}. {hint}")


def embedding_params(shape: ModelShape, tp: int) -> int:
    return vocab_rows_per_rank(shape, tp) * shape.hidden_size


def lm_head_params(shape: ModelShape, tp: int, shares_embedding: bool) -> int:
    """The LM head's own table, 0 when tied to an embedding on the same rank. Tied heads on a
    last pipeline stage without the embedding hold their own copy."""
    return 0 if shares_embedding else embedding_params(shape, tp)


def attention_params(shape: ModelShape, tp: int) -> int:
    if shape.mla is not None:
        return _mla_params(shape, shape.mla, tp)
    h, d = shape.hidden_size, shape.head_dim
    rows = qkv_rows_per_rank(shape, tp)
    qkv = rows * h + (rows if shape.qkv_bias else 0)
    o_proj = h * (shape.num_heads * d // tp) + (h if shape.o_proj_bias else 0)
    qk_norm = 2 * d if shape.qk_norm else 0
    return qkv + o_proj + qk_norm


def qkv_rows_per_rank(shape: ModelShape, tp: int) -> int:
    """QKVParallelLinear's output rows on one rank: its query heads and K and V heads."""
    return (shape.num_heads // tp + 2 * kv_heads_per_rank(shape.num_kv_heads, tp)) * shape.head_dim


def _mla_params(shape: ModelShape, mla: MLASpec, tp: int) -> int:
    """vLLM's DeepSeek-V2 attention: q (or q_a replicated + q_b column), kv_a replicated,
    kv_b column, o row parallel; the latent norms whole."""
    h, heads = shape.hidden_size, shape.num_heads // tp
    qk_head = mla.qk_nope_head_dim + mla.qk_rope_head_dim
    if mla.q_lora_rank is None:
        q = h * heads * qk_head
    else:
        q = h * mla.q_lora_rank + mla.q_lora_rank + mla.q_lora_rank * heads * qk_head
    kv_a = h * (mla.kv_lora_rank + mla.qk_rope_head_dim) + mla.kv_lora_rank
    kv_b = mla.kv_lora_rank * heads * (mla.qk_nope_head_dim + mla.v_head_dim)
    o = heads * mla.v_head_dim * h
    # attention_bias: the replicated q_a and kv_a projections' biases, o_proj's whole on every rank
    bias = ((mla.q_lora_rank or 0) + mla.kv_lora_rank + mla.qk_rope_head_dim + h
            if shape.o_proj_bias else 0)
    return q + kv_a + kv_b + o + bias


def router_params(shape: ModelShape) -> int:
    """One MoE layer's router, replicated on every rank: its weight and V3's correction bias."""
    moe = shape.moe
    assert moe is not None
    return moe.num_experts * (shape.hidden_size + (1 if moe.router_bias else 0))


def mlp_params(shape: ModelShape, layer: int, tp: int, expert_parallel: bool = False) -> int:
    h = shape.hidden_size
    moe = shape.moe
    if moe is not None and moe.is_moe_layer(layer):
        inter = moe.expert_intermediate_size
        if expert_parallel:  # the fullest rank's whole experts (the same bytes when E and
            # I both divide evenly)
            experts = -(-moe.num_experts // tp) * 3 * h * inter
        else:  # every expert, I / tp of its width
            experts = moe.num_experts * 3 * h * (inter // tp)
        shared = 3 * h * moe.shared_intermediate_size // tp  # TP-sliced under EP too
        return experts + shared + router_params(shape) + (h if moe.shared_expert_gate else 0)
    inter = shape.intermediate_size // tp
    bias = (2 * inter + h) if shape.mlp_bias else 0
    return 3 * h * inter + bias


def layer_params(shape: ModelShape, layer: int, tp: int, expert_parallel: bool = False) -> int:
    """One decoder layer on one TP rank: attention, MLP and its two RMSNorms."""
    return (attention_params(shape, tp) + mlp_params(shape, layer, tp, expert_parallel)
            + 2 * shape.hidden_size)


def stage_params(shape: ModelShape, tp: int, start: int, end: int, first: bool,
                 last: bool, expert_parallel: bool = False) -> int:
    """Parameters on one rank of a pipeline stage holding layers [start, end); the first stage
    holds the embedding, the last the final norm and the LM head."""
    total = sum(layer_params(shape, i, tp, expert_parallel) for i in range(start, end))
    if first:
        total += embedding_params(shape, tp)
    if last:
        total += shape.hidden_size + lm_head_params(
            shape, tp, shares_embedding=shape.tie_word_embeddings and first)
    return total


def stage_weight_bytes(shape: ModelShape, tp: int, start: int, end: int, first: bool,
                       last: bool, elem_bytes: int, expert_parallel: bool = False,
                       fp8: bool = False) -> int:
    """Bytes one rank of a pipeline stage allocates for its weights: the parameters in the
    model dtype, except each MoE layer's router in float32 where the model keeps it so, plus
    FusedMoE's int64 expert_map buffer (global expert id -> local index, on every rank).
    fp8 (--quantization fp8): fp8_matrices take one byte an element and a float32 scale per
    row and 128 columns instead."""
    total = stage_params(shape, tp, start, end, first, last, expert_parallel) * elem_bytes
    if fp8:
        for layer in range(start, end):
            for rows, cols in fp8_matrices(shape, layer, tp):
                total -= rows * cols * (elem_bytes - 1) - rows * -(-cols // FP8_GROUP_SIZE) * 4
    moe = shape.moe
    if moe is not None:
        per_layer = 8 * moe.num_experts
        if moe.router_float32:
            per_layer += router_params(shape) * (4 - elem_bytes)
        total += per_layer * sum(1 for i in range(start, end) if moe.is_moe_layer(i))
    return total


def fp8_matrices(shape: ModelShape, layer: int, tp: int) -> list[tuple[int, int]]:
    """(rows, cols) on one TP rank of each weight of `layer` that --quantization fp8 keeps in
    FP8 (layers/quantization.py): the Llama family's q/k/v and o projections (not DeepSeek's
    latent attention) and every dense or shared-expert MLP's gate/up and down; routed experts
    and routers stay in the model dtype."""
    h = shape.hidden_size
    matrices = []
    if shape.mla is None:
        matrices += [(qkv_rows_per_rank(shape, tp), h),
                     (h, shape.num_heads * shape.head_dim // tp)]
    moe = shape.moe
    inter = (moe.shared_intermediate_size if moe is not None and moe.is_moe_layer(layer)
             else shape.intermediate_size) // tp
    if inter:
        matrices += [(2 * inter, h), (h, inter)]
    return matrices


def total_params(shape: ModelShape) -> int:
    """The model's parameter count (TP 1, one stage), vocabulary padding included."""
    return stage_params(shape, 1, 0, shape.num_layers, first=True, last=True)


def active_params_per_token(shape: ModelShape, layer: int) -> int:
    """Matmul parameters one token passes through in `layer` (TP 1): for MoE only the routed
    top-k experts and the shared ones. Twice this is the layer's FLOPs per token."""
    moe = shape.moe
    if moe is None or not moe.is_moe_layer(layer):
        return layer_params(shape, layer, 1)
    h = shape.hidden_size
    experts = moe.num_experts_per_tok * 3 * h * moe.expert_intermediate_size
    return (attention_params(shape, 1) + experts + 3 * h * moe.shared_intermediate_size
            + router_params(shape))


def kv_bytes_per_token_layer(shape: ModelShape, tp: int, elem_bytes: int) -> int:
    """KV-cache bytes one token takes in one layer on one TP rank: K and V of this rank's KV
    heads (executor/model_runner.py kv_bytes_per_block / block_size); for MLA the latent and
    the RoPE key, the same on every rank."""
    if shape.mla is not None:
        return (shape.mla.kv_lora_rank + shape.mla.qk_rope_head_dim) * elem_bytes
    return 2 * kv_heads_per_rank(shape.num_kv_heads, tp) * shape.head_dim * elem_bytes
