"""The GGUF loader against transformers' own GGUF loading, and each tensor type's round trip."""

from __future__ import annotations

import math
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

from shardserve.errors import ModelLoadError, UnsupportedModelError
from shardserve.loader.gguf import SUPPORTED_TENSOR_TYPES, gguf_config, iter_gguf_weights
from shardserve.loader.gguf_file import GGUFFile

HIDDEN, HEADS, KV_HEADS = 256, 4, 2
HEAD_DIM = HIDDEN // HEADS


def write_gguf(path: Path, tensors: dict[str, tuple[np.ndarray, Q | None]], arch: str = "llama",
               **metadata: object) -> Path:
    """A small GGUF: llama hyperparameters plus the given (array, raw type) tensors."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_context_length(128)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(512)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    for key, value in metadata.items():
        if isinstance(value, str):
            writer.add_string(key.replace("__", "."), value)
        elif isinstance(value, float):
            writer.add_float32(key.replace("__", "."), value)
        else:
            writer.add_uint32(key.replace("__", "."), int(value))
    for name, (array, raw_type) in tensors.items():
        writer.add_tensor(name, array, raw_dtype=raw_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute, which our loader must undo."""
    return (weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def test_header_reader_matches_gguf_reader(smollm2_gguf):
    ours, theirs = GGUFFile(smollm2_gguf), gguf.GGUFReader(smollm2_gguf)
    fields = {k: f for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    assert set(ours.metadata) == set(fields)
    for key, field in fields.items():
        value = ours.metadata[key]
        assert (value.tolist() if isinstance(value, np.ndarray) else value) == field.contents(), key
    assert list(ours.tensors) == [t.name for t in theirs.tensors]
    for tensor in theirs.tensors:
        info = ours.tensors[tensor.name]
        assert info.ggml_type == tensor.tensor_type
        assert info.shape == tuple(int(d) for d in reversed(tensor.shape.tolist()))
        assert ours.raw(info).tobytes() == tensor.data.tobytes(), tensor.name


def test_config_matches_transformers(smollm2_gguf, smollm2_hf_reference):
    ours, theirs = gguf_config(smollm2_gguf), smollm2_hf_reference[0].config
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "head_dim",
                  "max_position_embeddings", "rms_norm_eps", "rope_parameters", "bos_token_id",
                  "eos_token_id", "pad_token_id", "tie_word_embeddings", "attention_bias",
                  "mlp_bias", "hidden_act", "model_type"):
        assert getattr(ours, field) == getattr(theirs, field), field
    assert ours.architectures == ["LlamaForCausalLM"]


def test_weights_match_transformers(smollm2_gguf, smollm2_hf_reference):
    reference = smollm2_hf_reference[0].state_dict()
    ours = dict(iter_gguf_weights(smollm2_gguf))
    # SmolLM2 ties lm_head to the embeddings: the file has no output.weight.
    assert set(reference) - set(ours) == {"lm_head.weight"}
    assert set(ours) <= set(reference)
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32 and tensor.shape == reference[name].shape, name
        # torch.equal first: assert_close on 135M values takes ~20 s on two cores.
        if not torch.equal(tensor, reference[name]):
            torch.testing.assert_close(tensor, reference[name], rtol=0, atol=1e-6, msg=name)


def test_include_skips_tensors(smollm2_gguf):
    names = [name for name, _ in iter_gguf_weights(smollm2_gguf, include=lambda n: ".layers.29." in n)]
    assert len(names) == 9 and all(".layers.29." in n for n in names)


# What quantization may lose, as a share of the largest magnitude (scales are per block, the
# bound uses the global maximum so it is loose but safe).
# MXFP4's largest level is 6 steps of a power-of-two scale that may leave the block's maximum
# just under 8 steps: a quarter of it.
_ROUND_TRIP_LOSS = {Q.F32: 0.0, Q.F16: 1e-3, Q.BF16: 8e-3, Q.Q8_0: 1 / 127, Q.Q4_0: 1 / 8, Q.Q4_1: 1 / 15,
                    Q.Q5_0: 1 / 16, Q.Q5_1: 1 / 31, Q.MXFP4: 1 / 4}


@pytest.mark.parametrize("qtype", list(_ROUND_TRIP_LOSS), ids=lambda q: q.name)
def test_round_trip_through_a_gguf_file(tmp_path, qtype):
    rng = np.random.default_rng(0)
    up = rng.standard_normal((512, HIDDEN), dtype=np.float32)  # HF [out, in]
    stored = up.astype(np.float16) if qtype == Q.F16 else up if qtype == Q.F32 else quantize(up, qtype)
    path = write_gguf(tmp_path / "m.gguf", {"blk.0.ffn_up.weight": (stored, None if qtype in (Q.F32, Q.F16) else qtype)})
    assert GGUFFile(path).tensors["blk.0.ffn_up.weight"].ggml_type == qtype
    [(name, loaded)] = list(iter_gguf_weights(path))
    assert name == "model.layers.0.mlp.up_proj.weight" and loaded.shape == (512, HIDDEN)
    if qtype not in (Q.F32, Q.F16):
        assert np.array_equal(loaded.numpy(), dequantize(stored, qtype))
    assert np.abs(loaded.numpy() - up).max() <= _ROUND_TRIP_LOSS[qtype] * np.abs(up).max() + 1e-7


# Where each block keeps its fp16 super-block scales: d (and dmin), or d alone.
_SCALE_BYTES = {Q.Q2_K: (80, 84), Q.Q3_K: (108, 110), Q.Q4_K: (0, 4), Q.Q5_K: (0, 4), Q.Q6_K: (208, 210)}
_BLOCK_TYPES = [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_NL, Q.IQ4_XS, Q.IQ3_S, Q.IQ3_XXS,
                Q.IQ2_S, Q.IQ2_XS, Q.IQ2_XXS, Q.IQ1_S, Q.IQ1_M]


def _random_blocks(qtype: Q, num_rows: int, row_len: int, rng: np.random.Generator) -> np.ndarray:
    """Random K-quant bytes with sane fp16 super-block scales (random bits could be inf/NaN)."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (num_rows * row_len // block_size, type_size), dtype=np.uint8)
    if qtype == Q.IQ1_M:
        # IQ1_M keeps no d field: d's 16 bits are the top nibbles of the four u16 words of the
        # block scales (its last 8 bytes), lowest nibble first.
        d = rng.uniform(1e-3, 1e-2, blocks.shape[0]).astype(np.float16).view(np.uint16)
        words = blocks[:, -8:].copy().view(np.uint16)
        for i in range(4):
            words[:, i] = (words[:, i] & 0x0FFF) | (((d >> (4 * i)) & 0xF) << 12)
        blocks[:, -8:] = words.view(np.uint8)
        return blocks.reshape(num_rows, -1)
    scale_bytes = _SCALE_BYTES.get(qtype, (0, 2))  # the IQ types start with d
    scales = rng.uniform(1e-3, 1e-2, (blocks.shape[0], (scale_bytes[1] - scale_bytes[0]) // 2))
    blocks[:, scale_bytes[0]:scale_bytes[1]] = scales.astype(np.float16).view(np.uint8)
    return blocks.reshape(num_rows, -1)


@pytest.mark.parametrize("qtype", _BLOCK_TYPES, ids=lambda q: q.name)
def test_block_quants_match_an_independent_dequantizer(tmp_path, qtype):
    # The gguf package cannot quantize K- or IQ-quants and SmolLM2's file has none, so we check the
    # file plumbing on random blocks and the values against transformers' own torch dequantizer.
    reference = pytest.importorskip("transformers.integrations.gguf.dequant",
                                    reason="needs transformers' torch GGUF dequantizer (>= 5.2x)")
    if int(qtype) not in reference.GGML_BLOCK:  # older transformers cover only a few types
        pytest.skip(f"this transformers' GGUF dequantizer has no {qtype.name}")
    rng = np.random.default_rng(1)
    raw = _random_blocks(qtype, 64, HIDDEN, rng)
    path = write_gguf(tmp_path / "k.gguf", {"blk.0.ffn_down.weight": (raw, qtype)})
    [(name, loaded)] = list(iter_gguf_weights(path))
    assert name == "model.layers.0.mlp.down_proj.weight" and loaded.shape == (64, HIDDEN)
    expected = reference.dequantize(torch.from_numpy(raw.reshape(-1)), int(qtype)).reshape(64, HIDDEN)
    torch.testing.assert_close(loaded, expected, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(loaded).all() and loaded.abs().max() > 0


def test_mxfp4_matches_the_ocp_microscaling_format(tmp_path):
    # No independent MXFP4 dequantizer is installed, so decode the OCP MX spec by hand: blocks
    # of 32 FP4 (E2M1) values sharing one E8M0 scale byte 2^(e - 127), the first 16 values in
    # the low nibbles of the 16 data bytes and the last 16 in the high ones.
    rng = np.random.default_rng(6)
    raw = rng.integers(0, 256, (64 * HIDDEN // 32, 17), dtype=np.uint8)
    raw[:, 0] = rng.integers(120, 134, raw.shape[0])  # scales 2^-7 .. 2^6
    path = write_gguf(tmp_path / "mx.gguf", {"blk.0.ffn_down.weight": (raw.reshape(64, -1), Q.MXFP4)})
    [(_, loaded)] = list(iter_gguf_weights(path))
    e2m1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6])
    nibbles = np.concatenate([raw[:, 1:] & 0xF, raw[:, 1:] >> 4], axis=1)
    expected = e2m1[nibbles] * np.exp2(raw[:, :1].astype(np.float64) - 127)
    assert np.array_equal(loaded.numpy(), expected.reshape(64, HIDDEN).astype(np.float32))


def test_q_and_k_rows_are_unpermuted(tmp_path):
    rng = np.random.default_rng(2)
    q = rng.standard_normal((HEADS * HEAD_DIM, HIDDEN), dtype=np.float32)
    k = rng.standard_normal((KV_HEADS * HEAD_DIM, HIDDEN), dtype=np.float32)
    path = write_gguf(tmp_path / "qk.gguf", {
        "blk.0.attn_q.weight": (llama_cpp_permute(q, HEADS), None),
        "blk.0.attn_k.weight": (llama_cpp_permute(k, KV_HEADS), None)})
    loaded = dict(iter_gguf_weights(path))
    assert np.array_equal(loaded["model.layers.0.self_attn.q_proj.weight"].numpy(), q)
    assert np.array_equal(loaded["model.layers.0.self_attn.k_proj.weight"].numpy(), k)


def test_every_supported_type_is_checked_here():
    assert set(SUPPORTED_TENSOR_TYPES) == set(_ROUND_TRIP_LOSS) | set(_BLOCK_TYPES)


def test_unsupported_tensor_type_names_tensor_and_types(tmp_path):
    up = np.random.default_rng(3).standard_normal((512, HIDDEN), dtype=np.float32)
    path = write_gguf(tmp_path / "tq.gguf", {"blk.0.ffn_up.weight": (quantize(up, Q.TQ2_0), Q.TQ2_0),
                                             "blk.0.ffn_down.weight": (quantize(up, Q.TQ2_0), Q.TQ2_0),
                                             "blk.0.ffn_gate.weight": (up, None)},
                      llama__vocab_size=100)
    # gguf_config reads the types off the header, so the server refuses the file before it
    # builds a model or loads a tensor; the loader still checks each tensor it dequantizes.
    for load in (gguf_config, lambda p: list(iter_gguf_weights(p))):
        with pytest.raises(UnsupportedModelError) as err:
            load(path)
        message = str(err.value)
        assert "'blk.0.ffn_up.weight'" in message and "TQ2_0" in message and "F32" in message
        assert all(t.name in message for t in SUPPORTED_TENSOR_TYPES)
        assert "llama-quantize" in message
    assert "TQ2_0 ('blk.0.ffn_up.weight' and 1 more)" in str(
        pytest.raises(UnsupportedModelError, gguf_config, path).value)


@pytest.mark.parametrize("arch", ["phi3", "gemma", "mixtral", "gpt2"])
def test_other_architectures_are_refused(tmp_path, arch):
    path = write_gguf(tmp_path / f"{arch}.gguf", {}, arch=arch)
    for load in (gguf_config, lambda p: list(iter_gguf_weights(p))):
        with pytest.raises(UnsupportedModelError, match=f"architecture '{arch}'.*only serves "
                           "llama, qwen2, qwen3, qwen2moe, qwen3moe, deepseek2 GGUFs"):
            load(path)



def test_mixtral_written_as_llama_is_refused_before_loading(tmp_path):
    # llama.cpp writes Mixtral under the llama architecture; it passed as a dense Llama and
    # failed only on its first expert tensor, pointing at a Hugging Face folder (refused too).
    experts = {"blk.0.ffn_gate_inp.weight": (np.zeros((8, HIDDEN), np.float32), None),
               "blk.0.ffn_gate_exps.weight": (np.zeros((8, 512, HIDDEN), np.float32), None)}
    path = write_gguf(tmp_path / "mixtral.gguf", experts, llama__expert_count=8,
                      llama__expert_used_count=2, llama__vocab_size=100)
    for load in (gguf_config, lambda p: list(iter_gguf_weights(p))):
        with pytest.raises(UnsupportedModelError, match="mixture-of-experts llama GGUF "
                           r"\(llama.expert_count 8: Mixtral.*Qwen2-MoE, Qwen3-MoE"):
            load(path)


def test_metadata_that_does_not_match_a_tensor_blames_the_file(tmp_path):
    # The shape error used to ask whether config.json belonged to the checkpoint: a GGUF has none.
    from tests.models.tiny_checkpoints import load_ours

    up = {"blk.0.ffn_up.weight": (np.zeros((300, HIDDEN), np.float32), None)}
    path = write_gguf(tmp_path / "bad.gguf", up, llama__vocab_size=100)
    with pytest.raises(ModelLoadError, match=r"tensor model\.layers\.0\.mlp\.up_proj\.weight .*"
                       r"Checkpoint shape \(300, 256\).*metadata does not describe") as err:
        load_ours(path)
    assert "config.json" not in str(err.value)

def test_config_from_metadata_variants(tmp_path):
    # No vocab_size key (count the tokens), no output.weight (tied), linear rope scaling keys.
    writer_tokens = ["<unk>", "<s>", "</s>", "a", "b"]
    path = tmp_path / "meta.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_context_length(4096)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(512)
    writer.add_head_count(HEADS)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_rope_freq_base(500000.0)
    writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    writer.add_rope_scaling_factor(2.0)
    writer.add_token_list(writer_tokens)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    config = gguf_config(path)
    assert config.vocab_size == len(writer_tokens) and config.tie_word_embeddings
    assert config.num_key_value_heads == HEADS and config.head_dim == HEAD_DIM
    assert config.rope_parameters == {"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0}
    assert (config.bos_token_id, config.eos_token_id, config.max_position_embeddings) == (1, 2, 4096)


def test_end_of_turn_tokens_end_generation(tmp_path):
    # Llama-3-Instruct GGUFs whose EOS is <|end_of_text|> end each turn with <|eot_id|>
    # (tokenizer.ggml.eot_token_id): llama.cpp stops there, and so must we.
    from shardserve.tokenizer import eos_token_ids

    path = write_gguf(tmp_path / "eot.gguf", {}, llama__vocab_size=100,
                      tokenizer__ggml__eos_token_id=7, tokenizer__ggml__eot_token_id=9,
                      tokenizer__ggml__eom_token_id=8)
    config = gguf_config(path)
    assert config.eos_token_id == [7, 9, 8]

    class Tokenizer:
        eos_token_id = 7
    assert eos_token_ids(Tokenizer(), config, None) == [7, 9, 8]
    path = write_gguf(tmp_path / "eos_only.gguf", {}, llama__vocab_size=100,
                      tokenizer__ggml__eos_token_id=7, tokenizer__ggml__eot_token_id=7)
    assert gguf_config(path).eos_token_id == 7


def test_llama3_rope_scaling_recovered_from_rope_freqs(tmp_path):
    # llama.cpp writes Llama-3.1 rope scaling as a rope_freqs tensor, with no metadata keys.
    head_dim, theta = 128, 500000.0
    factor, low, high, original = 8.0, 1.0, 4.0, 8192
    factors = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < original / high:
            factors.append(1.0)
        elif wavelen > original / low:
            factors.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    path = write_gguf(tmp_path / "l3.gguf", {"rope_freqs.weight": (np.array(factors, np.float32), None)},
                      llama__rope__freq_base=theta, llama__rope__dimension_count=head_dim,
                      llama__vocab_size=32)
    params = gguf_config(path).rope_parameters
    assert params == {"rope_type": "llama3", "rope_theta": theta, "factor": factor,
                      "low_freq_factor": low, "high_freq_factor": high,
                      "original_max_position_embeddings": original}
    assert list(iter_gguf_weights(path)) == []  # folded into the config, not a weight


def test_truncated_file_is_a_clear_error(tmp_path):
    up = np.random.default_rng(4).standard_normal((512, HIDDEN), dtype=np.float32)
    path = write_gguf(tmp_path / "whole.gguf", {"blk.0.ffn_up.weight": (up, None)})
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:-1000])  # the header is whole, the data is not
    for load in (GGUFFile, gguf_config, lambda p: list(iter_gguf_weights(p))):
        with pytest.raises(ModelLoadError, match=r"cut.gguf.*'blk.0.ffn_up.weight'.*truncated"):
            load(cut)


def _write_split_gguf(folder: Path) -> list[Path]:
    """Two parts as llama.cpp's gguf-split writes them (one tensor each), with a tokenizer and a
    chat template in the first part's metadata."""
    writer = gguf.GGUFWriter(str(folder / "m.gguf"), "llama", split_max_tensors=1)
    writer.add_block_count(1)
    writer.add_tokenizer_model("gpt2")
    # Two merges: transformers 5.17 reads a one-element string array as a bare string.
    writer.add_token_list(["a", "b", "ab", "<s>", "ba"])
    writer.add_token_types([1, 1, 1, 3, 1])
    writer.add_token_merges(["a b", "b a"])
    writer.add_bos_token_id(3)
    writer.add_eos_token_id(4)
    writer.add_add_bos_token(True)
    writer.add_chat_template("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    rng = np.random.default_rng(5)
    for name in ("blk.0.ffn_up.weight", "blk.0.ffn_down.weight"):
        writer.add_tensor(name, rng.standard_normal((8, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return [folder / f"m-0000{part}-of-00002.gguf" for part in (1, 2)]


def test_split_gguf_tokenizer_and_template_come_from_the_first_part(tmp_path):
    # Only the first part carries the tokenizer: given the second, it is still found there.
    from shardserve.loader.source import ModelSource
    from shardserve.tokenizer import load_tokenizer, render_chat_template

    first, second = _write_split_gguf(tmp_path)
    assert GGUFFile(second).path == first and set(GGUFFile(second).tensors) == {
        "blk.0.ffn_up.weight", "blk.0.ffn_down.weight"}
    for tokenizer in (load_tokenizer(ModelSource("gguf", second, "m")),
                      load_tokenizer(ModelSource("gguf", first, "m"), tokenizer_path=tmp_path)):
        assert tokenizer.encode("ab") == [3, 2]  # the file's add_bos_token
        assert render_chat_template(tokenizer, [{"role": "user", "content": "ab"}]) == "[ab]"


def test_the_files_bos_and_eos_win_over_a_conversion_that_lost_them(tmp_path):
    # transformers 5.17 converts a Llama-architecture GGUF's tokenizer with the BOS as its EOS
    # and without the BOS its add_bos_token asks for; later versions get both right, so break
    # a loaded tokenizer the same way and check that the file's values come back.
    from tokenizers import processors

    from shardserve.loader.gguf_tokenizer import FileSpecialTokens
    from shardserve.loader.source import ModelSource
    from shardserve.tokenizer import load_tokenizer

    first, _ = _write_split_gguf(tmp_path)
    tokenizer = load_tokenizer(ModelSource("gguf", first, "m"))
    assert tokenizer.encode("ab") == [3, 2] and tokenizer.eos_token_id == 4
    tokenizer.backend_tokenizer.post_processor = processors.Sequence([])
    tokenizer.eos_token = "<s>"
    assert tokenizer.encode("ab") == [2] and tokenizer.eos_token_id == 3
    FileSpecialTokens.of(GGUFFile(first)).apply_to(tokenizer)
    assert tokenizer.encode("ab") == [3, 2] and tokenizer.eos_token_id == 4
    assert tokenizer.encode("ab", "ba") == [3, 2, 3, 4]  # a pair: each part opens with BOS
    assert tokenizer.bos_token_id == 3


def test_split_gguf_with_a_missing_or_renamed_part_is_a_clear_error(tmp_path):
    first, second = _write_split_gguf(tmp_path)
    second.unlink()
    with pytest.raises(ModelLoadError, match=r"part 1 of a GGUF split into 2 files, and 1 of "
                       r"them is missing: .*m-00002-of-00002.gguf. Download every part"):
        gguf_config(first)
    renamed = tmp_path / "model.gguf"
    first.rename(renamed)
    with pytest.raises(ModelLoadError, match="part 1 of a GGUF split into 2 files, but its name "
                       "does not end in -0000K-of-0000N.gguf.*--merge"):
        gguf_config(renamed)
