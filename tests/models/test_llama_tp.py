"""Tensor parallelism: two gloo ranks give the single-process logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tests.models.tiny_checkpoints import VOCAB, assert_close_logits, load_ours, our_logits, save_tiny_checkpoint

from shardserve.distributed import parallel_state as ps
from shardserve.distributed.local_launch import run_local_ranks

# llama_bias: o_proj/down_proj biases after the all-reduce, tied vocab-parallel embedding.
# qwen3_kv1: one KV head replicated on both ranks, q/k norms.
TP_MODELS = ["llama", "llama_bias", "qwen3_kv1"]


def _input_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (23,), generator=torch.Generator().manual_seed(4))


def _tp2_worker(rank: int, root: str, device: str = "cpu") -> None:
    ps.initialize_model_parallel(tensor_parallel_size=2, pipeline_parallel_size=1)
    for name in TP_MODELS:
        model = load_ours(Path(root) / name, device=device if device == "cpu" else f"cuda:{rank}")
        attn = model.model.layers[0].self_attn
        assert attn.num_heads == 2  # 4 query heads split over 2 ranks
        assert model.model.embed_tokens.weight.shape[0] == 256  # half of the 512-row padded vocab
        logits = our_logits(model, _input_ids().to(model.lm_head.weight.device)).cpu()
        torch.save(logits, Path(root) / f"{name}.rank{rank}.pt")
    ps.destroy_model_parallel()


@pytest.mark.multiproc
def test_tp2_matches_tp1(tmp_path: Path) -> None:
    for name in TP_MODELS:
        save_tiny_checkpoint(name, tmp_path / name)
    run_local_ranks(_tp2_worker, 2, args=(str(tmp_path),), timeout_s=120)
    for name in TP_MODELS:
        reference = our_logits(load_ours(tmp_path / name), _input_ids())
        for rank in (0, 1):
            assert_close_logits(torch.load(tmp_path / f"{name}.rank{rank}.pt"), reference)


@pytest.mark.gpu
@pytest.mark.multiproc
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_tp2_nccl_matches_tp1_on_cuda(tmp_path: Path) -> None:
    for name in TP_MODELS:
        save_tiny_checkpoint(name, tmp_path / name)
    run_local_ranks(_tp2_worker, 2, args=(str(tmp_path), "cuda"), timeout_s=300, backend="nccl")
    for name in TP_MODELS:
        model = load_ours(tmp_path / name, device="cuda:0")
        reference = our_logits(model, _input_ids().cuda()).cpu()
        for rank in (0, 1):
            assert_close_logits(torch.load(tmp_path / f"{name}.rank{rank}.pt"), reference)


# ---- the sublayers' partial sums reach the norm after them (models/decoder_layer.py) --------

# (model, norms that take a partial sum per layer): o_proj and the MLP leave their all-reduce to
# the next norm unless biased (a bias is added after the sum); MoE blocks always do. The
# embedding always does (one call more).
FUSED_PER_LAYER = {"llama": 2, "llama_bias": 0, "qwen3_kv1": 2, "qwen2_moe": 2}


def _fused_path_worker(rank: int, root: str) -> None:
    """TP 2 with the fused all-reduce + RMSNorm path forced on (on CPU it runs as all_reduce
    then RMSNorm, counted): the logits must not change and every partial sum must arrive."""
    from shardserve.layers.layernorm import RMSNorm
    ps.initialize_model_parallel(tensor_parallel_size=2, pipeline_parallel_size=1)
    tp = ps.get_tp_group()
    calls: list[tuple[int, ...]] = []

    def fused(x, residual, weight, eps):
        calls.append(tuple(x.shape))
        norm = RMSNorm(x.shape[-1], eps)
        norm.weight.data = weight
        reduced = tp.all_reduce(x.clone())
        if residual is None:  # the embedding, reduced by the first layer's norm
            return norm(reduced), reduced
        return norm(reduced, residual)

    tp.can_fuse_rms_norm = lambda x, residual: True
    tp.all_reduce_rms_norm = fused
    for name in FUSED_PER_LAYER:
        calls.clear()
        model = load_ours(Path(root) / name)
        logits = our_logits(model, _input_ids())
        torch.save((logits, list(calls)), Path(root) / f"{name}.fused.rank{rank}.pt")
    ps.destroy_model_parallel()


@pytest.mark.multiproc
def test_tp2_partial_sums_reduced_by_the_next_norm(tmp_path: Path) -> None:
    from tests.models.tiny_checkpoints import tiny_config
    for name in FUSED_PER_LAYER:
        save_tiny_checkpoint(name, tmp_path / name)
    run_local_ranks(_fused_path_worker, 2, args=(str(tmp_path),), timeout_s=120)
    for name, per_layer in FUSED_PER_LAYER.items():
        reference = our_logits(load_ours(tmp_path / name), _input_ids())
        num_layers = tiny_config(name).num_hidden_layers
        for rank in (0, 1):
            logits, calls = torch.load(tmp_path / f"{name}.fused.rank{rank}.pt")
            assert_close_logits(logits, reference)
            # post-attention norms, the next layers' input norms and the final norm; and the
            # first layer's input norm, which reduces the vocabulary-parallel embedding
            assert len(calls) == per_layer * num_layers + 1, (name, calls)
            assert all(shape == (23, 64) for shape in calls)
