"""Parallel layers in one process: rank-r weight loading under a stand-in TP group, and the
single-rank forward paths."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from shardserve.layers import embedding, linear
from shardserve.layers.activation import SiluAndMul
from shardserve.layers.layernorm import RMSNorm
from shardserve.layers.weight_utils import materialize, narrow_weight


@pytest.fixture
def lazy(tmp_path: Path):
    """Save tensors and reopen them as safetensors lazy slices."""
    handles = []

    def make(**tensors: torch.Tensor):
        path = tmp_path / f"w{len(handles)}.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
        handle = safe_open(str(path), framework="pt")
        handles.append(handle)
        return {k: handle.get_slice(k) for k in tensors}

    return make


def _as_rank(monkeypatch, rank: int, size: int) -> None:
    group = SimpleNamespace(rank_in_group=rank, world_size=size)
    monkeypatch.setattr(linear, "get_tp_group", lambda: group)
    monkeypatch.setattr(embedding, "get_tp_group", lambda: group)


def test_narrow_reads_the_same_from_tensor_and_slice(lazy) -> None:
    w = torch.randn(6, 4)
    s = lazy(w=w)["w"]
    for dim, start, length in ((0, 2, 3), (1, 1, 2), (-1, 0, 4)):
        assert torch.equal(narrow_weight(s, dim, start, length), w.narrow(dim, start, length))
    assert torch.equal(materialize(s), w) and materialize(w) is w


@pytest.mark.parametrize("tp_size", [1, 2, 4])
def test_qkv_shards_heads_and_replicates_kv(monkeypatch, lazy, tp_size: int) -> None:
    hidden, head, heads, kv_heads = 8, 2, 4, 2
    q = torch.randn(heads * head, hidden)
    k, v = torch.randn(kv_heads * head, hidden), torch.randn(kv_heads * head, hidden)
    qb, kb, vb = torch.randn(heads * head), torch.randn(kv_heads * head), torch.randn(kv_heads * head)
    w = lazy(q=q, k=k, v=v, qb=qb, kb=kb, vb=vb)
    for rank in range(tp_size):
        _as_rank(monkeypatch, rank, tp_size)
        layer = linear.QKVParallelLinear(hidden, head, heads, kv_heads, bias=True)
        fused = linear.QKVParallelLinear(hidden, head, heads, kv_heads, bias=True)
        for sid in "qkv":
            layer.weight.weight_loader(layer.weight, w[sid], sid)
            layer.bias.weight_loader(layer.bias, w[sid + "b"], sid)
        fused.weight.weight_loader(fused.weight, torch.cat([q, k, v]))  # a fused checkpoint
        fused.bias.weight_loader(fused.bias, torch.cat([qb, kb, vb]))
        nq = heads // tp_size
        kv_head = rank // (tp_size // kv_heads) if tp_size >= kv_heads else None
        nkv = 1 if kv_head is not None else kv_heads // tp_size
        kv_start = (kv_head if kv_head is not None else rank * nkv) * head
        expected = torch.cat([q[rank * nq * head:(rank + 1) * nq * head],
                              k[kv_start:kv_start + nkv * head], v[kv_start:kv_start + nkv * head]])
        expected_bias = torch.cat([qb[rank * nq * head:(rank + 1) * nq * head],
                                   kb[kv_start:kv_start + nkv * head],
                                   vb[kv_start:kv_start + nkv * head]])
        assert (layer.num_heads, layer.num_kv_heads) == (nq, nkv)
        assert torch.equal(layer.weight, expected) and torch.equal(fused.weight, expected)
        assert torch.equal(layer.bias, expected_bias) and torch.equal(fused.bias, expected_bias)


def test_merged_column_and_row_shards(monkeypatch, lazy) -> None:
    gate, up, down = torch.randn(8, 6), torch.randn(8, 6), torch.randn(6, 8)
    w = lazy(gate=gate, up=up, down=down, down_bias=torch.ones(6))
    for rank in range(2):
        _as_rank(monkeypatch, rank, 2)
        gate_up = linear.MergedColumnParallelLinear(6, [8, 8], bias=False)
        gate_up.weight.weight_loader(gate_up.weight, w["gate"], 0)
        gate_up.weight.weight_loader(gate_up.weight, w["up"], 1)
        rows = slice(rank * 4, rank * 4 + 4)
        assert torch.equal(gate_up.weight, torch.cat([gate[rows], up[rows]]))
        row = linear.RowParallelLinear(8, 6, bias=True)
        row.weight.weight_loader(row.weight, w["down"])
        row.bias.weight_loader(row.bias, w["down_bias"])
        assert torch.equal(row.weight, down[:, rows]) and torch.equal(row.bias, torch.ones(6))
    with pytest.raises(ValueError, match="not divisible"):
        linear.ColumnParallelLinear(4, 7)


def test_single_rank_forward_is_plain_linear() -> None:
    x = torch.randn(5, 6)
    col = linear.ColumnParallelLinear(6, 4, bias=True, gather_output=True)
    row = linear.RowParallelLinear(6, 4, bias=True, input_is_parallel=False)
    rep = linear.ReplicatedLinear(6, 4, bias=False)
    for layer in (col, row, rep):
        for p in layer.parameters():
            p.data.normal_()
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))


def test_vocab_parallel_embedding_pads_and_masks(monkeypatch, lazy) -> None:
    table = torch.randn(100, 8)
    w = lazy(table=table)["table"]
    parts = []
    for rank in range(2):
        _as_rank(monkeypatch, rank, 2)
        emb = embedding.VocabParallelEmbedding(100, 8)
        assert emb.num_embeddings_padded == 128 and emb.num_embeddings_per_partition == 64
        emb.weight.weight_loader(emb.weight, w)
        parts.append(emb.weight.detach().clone())
    assert torch.equal(parts[0], table[:64]) and torch.equal(parts[1][:36], table[64:])
    assert not parts[1][36:].any()  # padding rows are zero
    monkeypatch.undo()
    emb1 = embedding.VocabParallelEmbedding(100, 8)  # a real single rank
    emb1.weight.weight_loader(emb1.weight, table)
    ids = torch.tensor([0, 63, 64, 99])
    assert torch.equal(emb1(ids), table[ids])
    head = embedding.ParallelLMHead(100, 8).tie_weights(emb1)
    hidden = torch.randn(3, 8)
    logits = head.compute_logits(hidden)
    assert logits.shape == (3, 100) and logits.dtype == torch.float32
    torch.testing.assert_close(logits, hidden @ table.T)


def test_rmsnorm_fuses_the_residual_add_like_hf() -> None:
    x, residual = torch.randn(4, 16, dtype=torch.bfloat16), torch.randn(4, 16, dtype=torch.bfloat16)
    ours = RMSNorm(16, eps=1e-5, params_dtype=torch.bfloat16)
    ref = LlamaRMSNorm(16, eps=1e-5).to(torch.bfloat16)
    weight = torch.randn(16).to(torch.bfloat16)
    ours.weight.data.copy_(weight)
    ref.weight.data.copy_(weight)
    assert torch.equal(ours(x), ref(x))
    out, new_residual = ours(x, residual)
    assert torch.equal(new_residual, residual + x)
    assert torch.equal(out, ref(residual + x))


def test_silu_and_mul() -> None:
    x = torch.randn(3, 10)
    assert torch.equal(SiluAndMul()(x), F.silu(x[:, :5]) * x[:, 5:])
