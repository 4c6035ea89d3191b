"""Programmatic dependent launch (kernels/pdl.py): when it is on, the GEMV's tiles loaded ahead
of the wait,
and, on a GPU of compute capability 9.0 or later, a decoder layer's chain of kernels replayed
from a CUDA graph with PDL giving the same bits as without it (a kernel that read its input
before the previous one had written it would differ)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from shardserve.kernels import pdl  # noqa: E402
from shardserve.kernels.gemv import PEEL_ENV, peel_tiles  # noqa: E402


def test_pdl_mode_reads_the_switch(monkeypatch):
    for value, mode in [("", "auto"), ("auto", "auto"), ("1", "on"), ("on", "on"),
                        ("0", "off"), ("False", "off")]:
        monkeypatch.setenv(pdl.PDL_ENV, value)
        assert pdl.pdl_mode() == mode
    monkeypatch.setenv(pdl.PDL_ENV, "sometimes")
    with pytest.raises(ValueError, match="SHARDSERVE_PDL='sometimes': use auto, 1 or 0"):
        pdl.pdl_mode()


def test_pdl_is_off_on_cpu_and_when_switched_off(monkeypatch):
    monkeypatch.setenv(pdl.PDL_ENV, "1")
    assert not pdl.use_pdl(torch.device("cpu"))
    assert pdl.launch_options(False) == {}
    assert pdl.launch_options(True) == {"launch_pdl": True}
    if torch.cuda.is_available():
        monkeypatch.setenv(pdl.PDL_ENV, "0")
        assert not pdl.use_pdl(torch.device("cuda", 0))


def test_peel_tiles_whole_tiles_only(monkeypatch):
    monkeypatch.delenv(PEEL_ENV, raising=False)
    assert peel_tiles(4096, 512) == 2
    assert peel_tiles(4100, 512) == 0  # a ragged K keeps the masked loop
    monkeypatch.setenv(PEEL_ENV, "1")
    assert peel_tiles(4096, 512) == 1
    monkeypatch.setenv(PEEL_ENV, "2")
    assert peel_tiles(512, 512) == 1  # no more tiles than K holds
    monkeypatch.setenv(PEEL_ENV, "0")
    assert peel_tiles(4096, 512) == 0
    for bad in ("3", "-1", "one"):
        monkeypatch.setenv(PEEL_ENV, bad)
        with pytest.raises(ValueError, match=PEEL_ENV):
            peel_tiles(4096, 512)


@pytest.mark.parametrize("tiles", ["1", "2"])
@pytest.mark.parametrize("n,k,block_k", [(37, 1024, 256), (9, 512, 512), (16, 768, 256)])
def test_gemv_with_peeled_tiles_matches_reference(monkeypatch, tiles, n, k, block_k):
    """The peeled path (as under PDL) sums the same products as the loop alone."""
    from shardserve.kernels.gemv import GemvConfig, gemv
    from tests.kernels.kernel_cases import DEVICE
    monkeypatch.setenv(PEEL_ENV, tiles)
    gen = torch.Generator().manual_seed(n + k)
    w = torch.randn(n, k, generator=gen).to(DEVICE)
    x = torch.randn(1, k, generator=gen).to(DEVICE)
    config = GemvConfig(8, block_k, 4, 2)
    got = gemv(x, w, None, config, pdl=True) if DEVICE == "cuda" else None
    if got is None:  # the interpreter has no PDL: run the peeled kernel through its flags
        from shardserve.kernels.gemv import _gemv_kernel
        import triton
        got = torch.full((1, n), float("nan"))
        _gemv_kernel[(triton.cdiv(n, 8),)](x, w, w, got, n, k, w.stride(0), HAS_BIAS=False,
                                           BLOCK_N=8, BLOCK_K=block_k, EVEN_K=True,
                                           USE_PDL=False, PEEL=peel_tiles(k, block_k))
    ref = torch.nn.functional.linear(x.double(), w.double())
    assert ((got.double() - ref).norm() / ref.norm()) < 1e-5


def _layer_chain(hidden: int, heads: int, kv_heads: int, head_dim: int, inter: int,
                 layers: int, seq_len: int):
    """A batch-1 decode step's kernels, layer by layer, as the engine runs them: RMSNorm,
    qkv GEMV, RoPE + KV store, decode attention, o_proj GEMV, add + RMSNorm, gate/up GEMV,
    SiLU-and-mul, down GEMV. Returns (run, x_in): run() -> the final hidden state for the
    input held in the static buffer x_in [1, hidden]."""
    from shardserve.kernels.decode_attention import decode_attention
    from shardserve.kernels.gemv import gemv
    from shardserve.kernels.rms_norm import rms_norm
    from shardserve.kernels.rotary_store import rotary_store_kv_
    from shardserve.kernels.silu_and_mul import silu_and_mul

    dev, dt = torch.device("cuda"), torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(0)

    def rand(*shape, scale=0.05):
        return (torch.randn(*shape, generator=gen, device=dev) * scale).to(dt)

    block = 16
    blocks = -(-seq_len // block) + 1
    weights = [dict(norm1=1 + rand(hidden), norm2=1 + rand(hidden),
                    qkv=rand((heads + 2 * kv_heads) * head_dim, hidden),
                    o=rand(hidden, heads * head_dim), gate_up=rand(2 * inter, hidden),
                    down=rand(hidden, inter),
                    k_cache=rand(blocks, block, kv_heads, head_dim, scale=1.0),
                    v_cache=rand(blocks, block, kv_heads, head_dim, scale=1.0))
               for _ in range(layers)]
    pos = torch.full((1,), seq_len - 1, dtype=torch.long, device=dev)
    slot = pos.clone()
    seq_lens = torch.full((1,), seq_len, dtype=torch.int32, device=dev)
    qsl = torch.tensor([0, 1], dtype=torch.int32, device=dev)
    table = torch.arange(blocks, dtype=torch.int32, device=dev)[None]
    inv = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, device=dev).float() / head_dim))
    freqs = torch.arange(seq_len, device=dev).float()[:, None] * inv[None]
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], dim=-1).contiguous()
    x_in = rand(1, hidden, scale=1.0)
    q_size, kv_size = heads * head_dim, kv_heads * head_dim

    def run():
        x, residual = x_in, torch.zeros_like(x_in)
        for w in weights:
            h, residual = rms_norm(x, w["norm1"], 1e-5, residual)
            qkv = gemv(h, w["qkv"])
            q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
            q, k, v = (q.view(1, heads, head_dim), k.view(1, kv_heads, head_dim),
                       v.view(1, kv_heads, head_dim))
            rotary_store_kv_(pos, q, k, v, w["k_cache"], w["v_cache"], slot, cos_sin, head_dim)
            attn = decode_attention(q, w["k_cache"], w["v_cache"], qsl, seq_lens, table,
                                    blocks * block, head_dim ** -0.5)
            o = gemv(attn.view(1, q_size), w["o"])
            h, residual = rms_norm(o, w["norm2"], 1e-5, residual)
            x = gemv(silu_and_mul(gemv(h, w["gate_up"])), w["down"])
        return x + residual

    return run, x_in


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available()
                         and torch.cuda.get_device_capability() >= (9, 0)),
                    reason="PDL needs a GPU of compute capability 9.0 or later")
def test_layer_chain_in_a_cuda_graph_is_bit_identical_with_pdl(monkeypatch):
    """Each replay gets a new input, so a kernel that ran ahead of its predecessor would read
    the previous replay's values (the graph reuses its buffers) and differ from eager runs."""
    gen = torch.Generator(device="cuda").manual_seed(1)
    inputs = [torch.randn(1, 1024, generator=gen, device="cuda").to(torch.bfloat16)
              for _ in range(12)]
    results = {}
    for mode in ("0", "1"):
        monkeypatch.setenv(pdl.PDL_ENV, mode)
        assert pdl.use_pdl(torch.device("cuda")) == (mode == "1")
        run, x_in = _layer_chain(hidden=1024, heads=16, kv_heads=4, head_dim=64, inter=2816,
                                 layers=6, seq_len=200)
        eager = []
        for x in inputs:
            x_in.copy_(x)
            eager.append(run().clone())
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            run()  # compile outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = run()
        replays = []
        for x in inputs:
            x_in.copy_(x)
            graph.replay()
            replays.append(out.clone())
        torch.cuda.synchronize()
        assert len({tuple(e.flatten()[:8].tolist()) for e in eager}) == len(inputs)
        for i, (r, e) in enumerate(zip(replays, eager)):
            torch.testing.assert_close(r, e, rtol=0, atol=0, msg=f"replay {i}")
        results[mode] = eager
    for with_pdl, without in zip(results["1"], results["0"]):
        torch.testing.assert_close(with_pdl, without, rtol=0, atol=0)
