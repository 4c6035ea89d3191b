"""Pipeline stages of a model: what each stage builds and loads (in one process), and the
stages of every family at TP 2 x PP 2 giving one process's logits (four gloo ranks)."""

import json
from pathlib import Path

import pytest
import torch

from shardserve.distributed import parallel_state as ps
from shardserve.distributed.local_launch import run_local_ranks
from shardserve.forward_context import set_forward_context
from shardserve.models.llama import LlamaForCausalLM
from shardserve.models.pipeline import IntermediateTensors, StageLayout, tied_head_weight_name
from shardserve.planner.stages import describe_stages, engine_stage_layers
from tests.models.deepseek_checkpoints import save_tiny_deepseek
from tests.models.tiny_checkpoints import (VOCAB, assert_close_logits, load_ours, our_logits,
                                           save_tiny_checkpoint)


def _config(**overrides):
    from transformers import LlamaConfig
    return LlamaConfig(**{**dict(hidden_size=32, num_hidden_layers=5, num_attention_heads=4,
                                 num_key_value_heads=2, intermediate_size=64, vocab_size=300),
                          **overrides})


def test_stage_builds_only_its_parts():
    config = _config()
    first = LlamaForCausalLM(config, torch.float32, stage=StageLayout(0, 2, True, False))
    last = LlamaForCausalLM(config, torch.float32, stage=StageLayout(2, 5, False, True))
    first_names = {n for n, _ in first.named_parameters()}
    last_names = {n for n, _ in last.named_parameters()}
    assert "model.embed_tokens.weight" in first_names and "lm_head.weight" not in first_names
    assert "model.norm.weight" not in first_names
    assert {int(n.split(".")[2]) for n in first_names if n.startswith("model.layers.")} == {0, 1}
    assert "model.embed_tokens.weight" not in last_names and "lm_head.weight" in last_names
    assert {int(n.split(".")[2]) for n in last_names if n.startswith("model.layers.")} == {2, 3, 4}
    whole = {n for n, _ in LlamaForCausalLM(config, torch.float32).named_parameters()}
    assert first_names | last_names == whole and not first_names & last_names


def test_weight_ownership_and_tied_heads():
    middle, last = StageLayout(1, 3, False, False), StageLayout(3, 5, False, True)
    assert middle.owns_weight("model.layers.2.mlp.up_proj.weight")
    assert not middle.owns_weight("model.layers.3.mlp.up_proj.weight")
    assert not middle.owns_weight("model.embed_tokens.weight", tied_embeddings=True)
    assert not last.owns_weight("model.embed_tokens.weight")
    assert last.owns_weight("model.embed_tokens.weight", tied_embeddings=True)
    # The last stage's own head is loaded from the embedding's tensor when they are tied.
    assert tied_head_weight_name("model.embed_tokens.weight", last, True) == "lm_head.weight"
    whole = StageLayout.whole(5)
    assert tied_head_weight_name("lm_head.weight", whole, True) is None
    assert tied_head_weight_name("model.embed_tokens.weight", whole, True) == "model.embed_tokens.weight"


def test_engine_partition_default_explicit_and_logged():
    config = _config(vocab_size=50000)  # a heavy LM head: the last stage gets fewer layers
    bounds = engine_stage_layers(config, 2)
    assert bounds[0][0] == 0 and bounds[-1][1] == 5
    assert bounds[1][1] - bounds[1][0] < bounds[0][1] - bounds[0][0]
    assert engine_stage_layers(config, 3, "1,2,2") == [(0, 1), (1, 3), (3, 5)]
    with pytest.raises(ValueError):
        engine_stage_layers(config, 2, "4,4")
    lines = describe_stages(config, bounds, 1, 4)
    assert lines[0].startswith("stage 0: embedding") and "LM head" in lines[1]
    assert all("est. cost" in line and "MiB" in line for line in lines)


# ---- TP 2 x PP 2: a stage hands on whole hidden states (models/pipeline.py run_stage) -----

# (checkpoint, first layer of stage 1, expert parallel). Under TP the last MLP of stage 0 leaves
# its partial sum to the next norm, which is on stage 1; so stage 0 must all-reduce it first.
# Stage 0 ends after a dense MLP or an MoE block, in every family: Llama with o_proj/MLP biases
# (those reduce themselves), Qwen2 (q/k/v biases), Qwen2-MoE (shared expert, dense layers
# between sparse ones), Qwen3-MoE (q/k norms, mlp_only_layers), DeepSeek-V2-Lite / V3 (MLA,
# first_k_dense_replace, shared experts); experts sliced (TP) or whole per rank (EP); tied
# embeddings (Llama, Qwen2, Qwen3-MoE: stage 1 loads its head from the embedding's tensor).
TP_PP_CASES = [("llama_bias", 1, False), ("qwen2", 1, False), ("qwen2_moe_step2", 1, False),
               ("qwen3_moe_dense_layers", 2, False), ("deepseek_v2_lite", 2, False),
               ("qwen2_moe_step2", 2, True), ("deepseek_v3", 1, True)]


def _save_checkpoint(name: str, folder: Path) -> None:
    if name.startswith("deepseek_"):
        save_tiny_deepseek(name[len("deepseek_"):], folder)
    else:
        save_tiny_checkpoint(name, folder)


def _prompt_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (23,), generator=torch.Generator().manual_seed(4))


def _tp2_pp2_worker(rank: int, root: str) -> None:
    """Ranks 0, 1: stage 0 (TP 2), sending hidden states and residual as the model runner
    does; ranks 2, 3: stage 1, saving their logits."""
    ids = _prompt_ids()
    positions = torch.arange(ids.shape[0])
    expert_parallel = None
    for i, (name, split, ep) in enumerate(TP_PP_CASES):
        if ep != expert_parallel:
            if expert_parallel is not None:
                ps.destroy_model_parallel()
            ps.initialize_model_parallel(2, 2, enable_expert_parallel=ep)
            expert_parallel = ep
        pp = ps.get_pp_group()
        folder = Path(root) / name
        config = json.loads((folder / "config.json").read_text())
        first = pp.rank_in_group == 0
        stage = (StageLayout(0, split, True, False) if first
                 else StageLayout(split, config["num_hidden_layers"], False, True))
        model = load_ours(folder, stage=stage)
        with torch.no_grad(), set_forward_context(None):
            if first:
                out = model(ids, positions)
                pp.send_tensor(torch.stack((out.hidden_states, out.residual))).wait()
            else:
                both = pp.recv_tensor((2, ids.shape[0], config["hidden_size"]), torch.float32,
                                      torch.device("cpu"))
                hidden = model(ids, positions, IntermediateTensors(both[0], both[1]))
                torch.save(model.compute_logits(hidden), Path(root) / f"{i}.rank{rank}.pt")
    ps.destroy_model_parallel()


@pytest.mark.multiproc
def test_tp2_pp2_stages_match_one_process(tmp_path):
    names = dict.fromkeys(name for name, _, _ in TP_PP_CASES)
    for name in names:
        _save_checkpoint(name, tmp_path / name)
    run_local_ranks(_tp2_pp2_worker, 4, args=(str(tmp_path),), timeout_s=240)
    references = {name: our_logits(load_ours(tmp_path / name), _prompt_ids()) for name in names}
    for i, (name, split, ep) in enumerate(TP_PP_CASES):
        for rank in (2, 3):
            try:
                assert_close_logits(torch.load(tmp_path / f"{i}.rank{rank}.pt"), references[name])
            except AssertionError as e:
                raise AssertionError(f"{name} split before layer {split}, ep={ep}: {e}") from e
