"""The real demo model: SmolLM2-135M-Instruct from its GGUF (Q4_1/Q8_0, dequantized) and from
the same weights saved as a Hugging Face folder, against transformers' own loading."""

from __future__ import annotations

from tests.device import cli_device_flags, make_llm
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from shardserve import SamplingParams
from shardserve.tokenizer import apply_chat_template
from tests.e2e.hf_reference import hf_greedy

QUESTIONS = ["What is the capital of France?", "Name three colors.",
             "Write a haiku about the sea.", "What is 2 + 2?"]
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def chat_prompts(smollm2_llm):
    tok = smollm2_llm.get_tokenizer()
    return [apply_chat_template(tok, [{"role": "user", "content": q}]) for q in QUESTIONS]


@pytest.fixture(scope="module")
def reference_tokens(smollm2_hf_reference, chat_prompts):
    model, _ = smollm2_hf_reference
    return [hf_greedy(model, p, NEW_TOKENS) for p in chat_prompts]


def test_chat_template_matches_transformers(smollm2_hf_reference, chat_prompts):
    _, tok = smollm2_hf_reference
    ref = tok.apply_chat_template([{"role": "user", "content": QUESTIONS[0]}],
                                  add_generation_prompt=True, tokenize=True)
    ref = ref["input_ids"] if isinstance(ref, dict) or hasattr(ref, "keys") else ref
    assert chat_prompts[0] == list(ref)


def test_gguf_greedy_matches_transformers(smollm2_llm, chat_prompts, reference_tokens):
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outs = smollm2_llm.generate([{"prompt_token_ids": p} for p in chat_prompts], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == reference_tokens


def test_paris(smollm2_llm):
    out = smollm2_llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                           SamplingParams(temperature=0.0, max_tokens=20), use_tqdm=False)[0]
    assert "Paris" in out.outputs[0].text
    assert out.outputs[0].finish_reason == "stop"
    # vLLM's RequestOutput.prompt of a chat: the templated text, which is what was tokenized.
    assert out.prompt == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, "
                          "trained by Hugging Face<|im_end|>\n<|im_start|>user\nWhat is the "
                          "capital of France?<|im_end|>\n<|im_start|>assistant\n")
    tokenizer = smollm2_llm.get_tokenizer()
    assert tokenizer.encode(out.prompt, add_special_tokens=False) == out.prompt_token_ids


def test_hf_folder_of_same_weights(tmp_path_factory, smollm2_gguf, chat_prompts):
    from shardserve.testing import export_gguf_to_hf
    folder = export_gguf_to_hf(smollm2_gguf, tmp_path_factory.mktemp("smollm2_hf"))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    expected = [hf_greedy(model, p, NEW_TOKENS) for p in chat_prompts[:2]]
    llm = make_llm(str(folder), dtype="float32", max_model_len=512,
              kv_cache_memory_bytes=64 << 20)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in chat_prompts[:2]], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected


def test_cli_generate_default_model_answers_paris():
    proc = subprocess.run([sys.executable, "-m", "shardserve.cli", "generate", "--prompt",
                           "What is the capital of France?", "--max-tokens", "20",
                           *cli_device_flags()],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout


def test_cli_bad_input_is_one_line_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "shardserve.cli", "generate", "--prompt", "hi",
                           "--model", str(tmp_path / "missing")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("error:") and "does not exist" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "shardserve.cli", "generate", "--prompt", "hi",
                           "--top-p", "3"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "top_p" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_chat_streams_replies_and_keeps_history():
    proc = subprocess.run([sys.executable, "-m", "shardserve.cli", "chat", "--max-tokens", "20",
                           *cli_device_flags()],
                          input="What is the capital of France?\nAnd of Italy?\n\n",
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout
    assert "Rome" in proc.stdout
