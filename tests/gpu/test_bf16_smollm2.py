"""On the GPU in bf16: SmolLM2 through shardserve and through transformers (same weights, same
GPU) give the same greedy 32-token continuations for at least 90% of 64 prompts. bf16 rounding
differs between the two implementations, so a few near-tie divergences are expected."""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = pytest.mark.gpu

TOPICS = ["the sea", "mountains", "a cat", "coffee", "the moon", "trains", "music", "rain",
          "a library", "gardens", "winter", "bread"]
TEMPLATES = ["Write one sentence about {}.", "What is interesting about {}?",
             "Give me a short fact about {}.", "Describe {} in simple words.",
             "Why do people like {}?", "Tell a very short story about {}."]


@pytest.fixture(scope="module")
def bf16_llm(smollm2_gguf):
    from shardserve import LLM
    return LLM(smollm2_gguf, device="cuda", dtype="bfloat16", max_model_len=1024,
               gpu_memory_utilization=0.3)


def test_bf16_smoke_sensible_answers(bf16_llm):
    from shardserve import SamplingParams
    outs = bf16_llm.chat([[{"role": "user", "content": "What is the capital of France?"}],
                          [{"role": "user", "content": "Name three colors."}]],
                         SamplingParams(temperature=0.0, max_tokens=24), use_tqdm=False)
    texts = [o.outputs[0].text for o in outs]
    print("bf16 answers:", texts)
    assert "Paris" in texts[0]
    assert sum(c in texts[1].lower() for c in ("red", "blue", "green", "yellow")) >= 2


def test_bf16_greedy_agrees_with_transformers(smollm2_gguf, bf16_llm):
    from transformers import AutoModelForCausalLM

    from shardserve import SamplingParams
    from shardserve.tokenizer import apply_chat_template
    from tests.e2e.hf_reference import hf_greedy

    llm = bf16_llm
    tok = llm.get_tokenizer()
    questions = [t.format(topic) for t in TEMPLATES for topic in TOPICS][:64]
    prompts = [apply_chat_template(tok, [{"role": "user", "content": q}]) for q in questions]
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    ours = [o.outputs[0].token_ids for o in
            llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)]
    folder, name = os.path.dirname(smollm2_gguf), os.path.basename(smollm2_gguf)
    ref_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                     dtype=torch.bfloat16).cuda().eval()
    same = 0
    for p, got in zip(prompts, ours):
        same += got == hf_greedy(ref_model, p, 32)
    print(f"bf16 greedy agreement: {same}/{len(prompts)}")
    assert same >= 0.9 * len(prompts)
