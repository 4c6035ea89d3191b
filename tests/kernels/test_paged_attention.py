"""Triton paged attention (prefill/chunked-prefill kernel, split-K decode kernel and the backend
that dispatches between them) against the torch reference in float64, on fresh random batches
at odd sizes: new prefills, chunked prefills over cached prefixes, decodes and empty requests
mixed in one batch; GQA ratios 1/4/8 (and 3, not a power of two); head sizes 64 and 128 (and 32,
80, 256); block sizes 16 and 32. Outputs start as NaN, the cache holds NaN wherever no request
owns a slot, and table padding points at a NaN block (see kernel_cases.py).

What runs where:
- CPU (no CUDA): Triton's interpreter, float32, tiny batches; tiles are forced small
  (block_m = block_n = 16) in most cases so tiny sequences still cross several tiles, pages and
  decode partitions, and the default tile sizes run once each.
- GPU only (marked gpu): bfloat16 and float16, head size 256 with default tiles, large batches
  (thousands of tokens, contexts up to 8k), float32 with the default tiles (tf32x3 products),
  the no-host-sync check and CUDA-graph replay of the decode path.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from shardserve.kernels.decode_attention import decode_attention  # noqa: E402
from shardserve.kernels.prefill_attention import prefill_attention  # noqa: E402
from shardserve.layers.triton_attention import TritonAttentionBackend  # noqa: E402
from tests.kernels.kernel_cases import (  # noqa: E402
    FP8_DTYPES, FP8_IDS, FP8_STORE_NEEDS_GPU, INTERPRET, assert_close_to_reference, make_batch, poisoned_like,
    reference)

SMALL_TILES = {"block_m": 16, "block_n": 16}
# (cached tokens, new tokens): new prefills, chunked prefills over a cached prefix (ending on
# and off page boundaries), decodes, and a request with no tokens this step.
MIXED = [(0, 13), (37, 9), (20, 1), (5, 0), (0, 1), (31, 18), (64, 1)]
DECODE = [(0, 1), (16, 1), (44, 1), (130, 1), (6, 1), (95, 1)]


def _run_prefill(batch, **tiles):
    md = batch.metadata
    out = poisoned_like(batch.query)
    prefill_attention(batch.query, batch.k_cache, batch.v_cache, md.query_start_loc, md.seq_lens,
                      md.block_tables, batch.scale, out, **tiles)
    return out


def _run_decode(batch, **kw):
    md = batch.metadata
    out = poisoned_like(batch.query)
    decode_attention(batch.query, batch.k_cache, batch.v_cache, md.query_start_loc, md.seq_lens,
                     md.block_tables, md.max_seq_len, batch.scale, out, **kw)
    return out


# ---- CPU (interpreter) and GPU --------------------------------------------------------------

# GQA ratio 1/4/8 x head size 64/128 x block size 16/32, each pair of values at least once
# (the full product is left to the GPU tests: the interpreter costs seconds per case).
CPU_SHAPES = [(2, 2, 64, 16), (2, 2, 128, 32), (8, 2, 64, 32), (8, 2, 128, 16), (8, 1, 64, 16),
              (8, 1, 128, 32)]


@pytest.mark.parametrize("num_heads,num_kv_heads,head_size,block_size", CPU_SHAPES)
def test_prefill_mixed_batch(num_heads, num_kv_heads, head_size, block_size):
    batch = make_batch(MIXED, num_heads, num_kv_heads, head_size, block_size, torch.float32,
                       seed=num_heads * 1000 + head_size + block_size)
    assert_close_to_reference(_run_prefill(batch, **SMALL_TILES), reference(batch),
                              torch.float32)


@pytest.mark.parametrize("num_heads,num_kv_heads,head_size", [(6, 2, 32), (3, 1, 80)])
def test_prefill_odd_group_and_head_size(num_heads, num_kv_heads, head_size):
    """GQA ratio 3 (tile rows not a multiple of the group) and a head size that is not a power
    of two (masked head dimension)."""
    batch = make_batch(MIXED, num_heads, num_kv_heads, head_size, 16, torch.float32,
                       seed=head_size)
    assert_close_to_reference(_run_prefill(batch, **SMALL_TILES), reference(batch),
                              torch.float32)


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (8, 1)])
def test_prefill_default_tiles(num_heads, num_kv_heads):
    batch = make_batch([(0, 70), (45, 31), (9, 1)], num_heads, num_kv_heads, 64, 16,
                       torch.float32, seed=num_heads)
    assert_close_to_reference(_run_prefill(batch), reference(batch), torch.float32)


@pytest.mark.parametrize("num_heads,num_kv_heads,head_size,block_size", CPU_SHAPES)
def test_decode_split_k(num_heads, num_kv_heads, head_size, block_size):
    batch = make_batch(DECODE, num_heads, num_kv_heads, head_size, block_size, torch.float32,
                       seed=num_heads * 7 + head_size + block_size)
    ref = reference(batch)
    # 1: no reduce; 5: each request cuts its keys into 5 partitions of >= 16 keys, so long
    # requests combine 5 partial results and short ones leave partitions empty.
    for num_splits in (1, 5):
        out = _run_decode(batch, num_splits=num_splits, block_n=16, min_partition=16)
        assert_close_to_reference(out, ref, torch.float32)


def test_decode_default_split_heuristic():
    batch = make_batch(DECODE, 8, 2, 64, 16, torch.float32, seed=17)
    assert_close_to_reference(_run_decode(batch), reference(batch), torch.float32)


def test_decode_padding_rows_get_zeros():
    """CUDA-graph padding: a request with seq_len 0 yields zeros (not NaN), others unaffected."""
    batch = make_batch([(40, 1), (0, 1), (12, 1)], 8, 2, 64, 16, torch.float32, seed=5)
    batch.metadata.seq_lens[1] = 0
    ref = reference(make_batch([(40, 1), (0, 1), (12, 1)], 8, 2, 64, 16, torch.float32, seed=5))
    for num_splits in (1, 4):
        out = _run_decode(batch, num_splits=num_splits, block_n=16, min_partition=16)
        assert torch.equal(out[1].cpu(), torch.zeros_like(out[1].cpu()))
        assert_close_to_reference(out, ref, torch.float32, rows=[0, 2])


@pytest.mark.parametrize("specs", [DECODE, MIXED], ids=["decode_step", "mixed_step"])
def test_backend_dispatch_and_store(specs):
    """The backend end to end: store this step's K/V, then attend; decode-only steps take the
    decode kernel, others the prefill kernel."""
    batch = make_batch(specs, 8, 2, 64, 16, torch.float32, seed=len(specs))
    ref = reference(batch)
    md = batch.metadata
    # Overwrite this step's slots with their own values through the backend's store_kv: the
    # result must not change (and store_kv must run on these views).
    slots = md.slot_mapping
    k_new = batch.k_cache.view(-1, *batch.k_cache.shape[2:])[slots].clone()
    v_new = batch.v_cache.view(-1, *batch.v_cache.shape[2:])[slots].clone()
    batch.k_cache.view(-1, *batch.k_cache.shape[2:])[slots] = float("nan")
    batch.v_cache.view(-1, *batch.v_cache.shape[2:])[slots] = float("nan")
    TritonAttentionBackend.store_kv(k_new, v_new, batch.k_cache, batch.v_cache, slots)
    out = TritonAttentionBackend.forward(batch.query, batch.k_cache, batch.v_cache, md,
                                         batch.scale)
    assert_close_to_reference(out, ref, torch.float32)


@pytest.mark.parametrize("kv_dtype", FP8_DTYPES, ids=FP8_IDS)
def test_fp8_cache_prefill_and_decode(kv_dtype):
    """--kv-cache-dtype fp8: both kernels widen the one-byte cache to the query's type, so they
    match the float64 reference over the same stored values as tightly as a float32 cache."""
    batch = make_batch(MIXED, 8, 2, 64, 16, torch.float32, seed=41, kv_dtype=kv_dtype)
    assert batch.k_cache.dtype == kv_dtype
    assert_close_to_reference(_run_prefill(batch, **SMALL_TILES), reference(batch),
                              torch.float32)
    batch = make_batch(DECODE, 8, 2, 64, 16, torch.float32, seed=42, kv_dtype=kv_dtype)
    ref = reference(batch)
    for num_splits in (1, 5):
        out = _run_decode(batch, num_splits=num_splits, block_n=16, min_partition=16)
        assert_close_to_reference(out, ref, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp8_cache_half_precision_queries(dtype):
    """Half-precision queries over an fp8 cache take the float16 path (query_as_fp16): within
    the query dtype's tolerance of the float64 reference, prefill and split decode."""
    batch = make_batch(MIXED, 8, 2, 64, 16, dtype, seed=45, kv_dtype=torch.float8_e4m3fn)
    assert_close_to_reference(_run_prefill(batch, **SMALL_TILES), reference(batch), dtype)
    batch = make_batch(DECODE, 8, 2, 64, 16, dtype, seed=46, kv_dtype=torch.float8_e4m3fn)
    out = _run_decode(batch, num_splits=3, block_n=16, min_partition=16)
    assert_close_to_reference(out, reference(batch), dtype)


@pytest.mark.skipif(INTERPRET, reason=FP8_STORE_NEEDS_GPU)
def test_fp8_cache_backend_store_then_attend():
    """The backend on an fp8 cache: this step's float32 K/V go in through store_kv (rounded as
    store_kv_ref rounds them), then attention reads them back."""
    from shardserve.kernels.paged_attention_ref import store_kv_ref
    batch = make_batch(MIXED, 8, 2, 64, 16, torch.float32, seed=43,
                       kv_dtype=torch.float8_e4m3fn)
    md = batch.metadata
    gen = torch.Generator().manual_seed(44)
    n = md.slot_mapping.shape[0]
    k_new = torch.randn(n, 2, 64, generator=gen).to(batch.query.device)
    v_new = torch.randn(n, 2, 64, generator=gen).to(batch.query.device)
    k_ref, v_ref = batch.k_cache.clone(), batch.v_cache.clone()
    store_kv_ref(k_new, v_new, k_ref, v_ref, md.slot_mapping)
    TritonAttentionBackend.store_kv(k_new, v_new, batch.k_cache, batch.v_cache, md.slot_mapping)
    assert torch.equal(batch.k_cache.view(torch.uint8), k_ref.view(torch.uint8))
    assert torch.equal(batch.v_cache.view(torch.uint8), v_ref.view(torch.uint8))
    out = TritonAttentionBackend.forward(batch.query, batch.k_cache, batch.v_cache, md,
                                         batch.scale)
    assert_close_to_reference(out, reference(batch), torch.float32)


def test_mixed_step_is_split_between_the_kernels():
    """prefill_attention(skip_decodes=True) leaves the one-token requests' rows unwritten and
    decode_attention leaves the prefill chunks' rows alone; together they give the reference
    (what the backend launches for a mixed step)."""
    batch = make_batch(MIXED, 8, 2, 64, 16, torch.float32, seed=47)
    md = batch.metadata
    qsl = md.query_start_loc_cpu
    decode_rows = [a for a, b in zip(qsl, qsl[1:]) if b - a == 1]
    other_rows = [t for t in range(qsl[-1]) if t not in decode_rows]
    assert md.has_decodes and decode_rows and other_rows
    ref = reference(batch)
    out = _run_prefill(batch, skip_decodes=True, **SMALL_TILES)
    assert torch.isnan(out[decode_rows]).all()
    assert_close_to_reference(out, ref, torch.float32, rows=other_rows)
    before = out[other_rows].clone()
    decode_attention(batch.query, batch.k_cache, batch.v_cache, md.query_start_loc, md.seq_lens,
                     md.block_tables, md.max_seq_len, batch.scale, out, num_splits=3,
                     block_n=16, min_partition=16)
    assert torch.equal(out[other_rows], before)
    assert_close_to_reference(out, ref, torch.float32)


def test_select_backend_per_device():
    from shardserve.layers.attention import TorchAttentionBackend, select_attention_backend
    assert select_attention_backend("cpu") is TorchAttentionBackend
    if torch.cuda.is_available():
        assert select_attention_backend("cuda") is TritonAttentionBackend


# ---- GPU only ---------------------------------------------------------------------------------

def _large_mixed(seed: int) -> list[tuple[int, int]]:
    gen = torch.Generator().manual_seed(seed)
    specs = [(0, 517), (1000, 300), (2047, 1), (0, 1), (4093, 129), (15, 2000), (333, 0)]
    specs += [(int(c), 1) for c in torch.randint(0, 3000, (25,), generator=gen)]
    return specs


def _large_decode(seed: int, num_reqs: int = 64) -> list[tuple[int, int]]:
    gen = torch.Generator().manual_seed(seed)
    specs = [(int(c), 1) for c in torch.randint(0, 4500, (num_reqs - 3,), generator=gen)]
    return specs + [(8190, 1), (0, 1), (127, 1)]


# (num_heads, num_kv_heads, head_size): Llama-3-8B (GQA 4), MHA, GQA 8 at head 64, Qwen2-7B's
# GQA 7, a 256 head with MQA, a 32 head.
GPU_SHAPES = [(32, 8, 128), (32, 32, 128), (16, 2, 64), (28, 4, 128), (8, 1, 256), (4, 4, 32)]
# bfloat16 everywhere; float16 and float32 (tf32x3 products) on a subset to bound the run time.
GPU_CASES = ([(torch.bfloat16, *shape, bs) for shape in GPU_SHAPES for bs in (16, 32)]
             + [(torch.float16, *shape, 16) for shape in GPU_SHAPES[:3]]
             + [(torch.float32, *shape, 32) for shape in (GPU_SHAPES[0], GPU_SHAPES[4])])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,num_heads,num_kv_heads,head_size,block_size", GPU_CASES)
def test_gpu_large_prefill(dtype, num_heads, num_kv_heads, head_size, block_size):
    batch = make_batch(_large_mixed(head_size + block_size), num_heads, num_kv_heads,
                       head_size, block_size, dtype, seed=num_heads + block_size)
    assert_close_to_reference(_run_prefill(batch), reference(batch), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,num_heads,num_kv_heads,head_size,block_size", GPU_CASES)
def test_gpu_large_decode(dtype, num_heads, num_kv_heads, head_size, block_size):
    batch = make_batch(_large_decode(head_size), num_heads, num_kv_heads, head_size,
                       block_size, dtype, seed=num_heads * 3 + block_size)
    ref = reference(batch)
    for num_splits in (None, 1, 7, 64):
        assert_close_to_reference(_run_decode(batch, num_splits=num_splits), ref, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("batch_size", [1, 3])
def test_gpu_decode_batch1_long_context_many_splits(batch_size):
    specs = [(16383, 1), (5000, 1), (1, 1)][:batch_size]
    batch = make_batch(specs, 32, 8, 128, 16, torch.bfloat16, seed=batch_size)
    assert_close_to_reference(_run_decode(batch), reference(batch), torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("specs", [_large_decode(1), _large_mixed(2)], ids=["decode", "mixed"])
def test_gpu_backend_does_not_sync(specs):
    batch = make_batch(specs, 32, 8, 128, 16, torch.bfloat16, seed=9)
    md = batch.metadata
    k = torch.randn(md.slot_mapping.shape[0], 8, 128, device="cuda", dtype=torch.bfloat16)
    TritonAttentionBackend.forward(batch.query, batch.k_cache, batch.v_cache, md, batch.scale)
    torch.cuda.synchronize()  # compile outside the check
    torch.cuda.set_sync_debug_mode("error")
    try:
        TritonAttentionBackend.store_kv(k, k, batch.k_cache, batch.v_cache, md.slot_mapping)
        TritonAttentionBackend.forward(batch.query, batch.k_cache, batch.v_cache, md,
                                       batch.scale)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
def test_gpu_decode_cuda_graph_replay():
    """Capture the decode path once with max_seq_len = an upper bound (the split count and
    partition size are then fixed) and replay it on new lengths, tables and queries copied into
    the captured buffers, padding rows included."""
    max_len, num_reqs, block_size = 4096, 8, 16
    specs = [(max_len - 1, 1)] * num_reqs
    batch = make_batch(specs, 32, 8, 128, block_size, torch.bfloat16, seed=1)
    md = batch.metadata
    static_q = batch.query = batch.query.clone()
    md.max_seq_len = max_len
    out = TritonAttentionBackend.forward(static_q, batch.k_cache, batch.v_cache, md, batch.scale)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        TritonAttentionBackend.forward(static_q, batch.k_cache, batch.v_cache, md, batch.scale)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = TritonAttentionBackend.forward(static_q, batch.k_cache, batch.v_cache, md,
                                             batch.scale)
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        lens = torch.randint(1, max_len, (num_reqs,), generator=gen)
        lens[-1] = 0  # a padding row
        md.seq_lens.copy_(lens)
        # Shuffle the real blocks among the requests (the NaN padding columns stay put).
        real = md.block_tables[:, :max_len // block_size]
        perm = torch.randperm(real.numel(), generator=gen).cuda()
        real.copy_(real.flatten()[perm].view_as(real))
        static_q.copy_(torch.randn(static_q.shape, generator=gen).to(static_q))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        md.seq_lens_cpu = lens.tolist()
        ref = reference(batch)
        assert torch.equal(out[-1].cpu(), torch.zeros_like(out[-1].cpu()))
        assert_close_to_reference(out, ref, torch.bfloat16, rows=list(range(num_reqs - 1)))


@pytest.mark.gpu
@pytest.mark.parametrize("kv_dtype", FP8_DTYPES, ids=FP8_IDS)
@pytest.mark.parametrize("num_heads,num_kv_heads,head_size", [(32, 8, 128), (16, 2, 64)])
def test_gpu_fp8_cache_large(kv_dtype, num_heads, num_kv_heads, head_size):
    """bf16 queries over an fp8 cache (--kv-cache-dtype fp8), the engine's configuration."""
    for specs, run in ((_large_mixed(3), _run_prefill), (_large_decode(4), _run_decode)):
        batch = make_batch(specs, num_heads, num_kv_heads, head_size, 16, torch.bfloat16,
                           seed=head_size, kv_dtype=kv_dtype)
        assert_close_to_reference(run(batch), reference(batch), torch.bfloat16)
