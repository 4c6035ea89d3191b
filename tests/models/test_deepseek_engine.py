"""DeepSeek-V2/V3 through the whole engine (LLM.generate, float32, CPU): greedy tokens identical
to transformers' own greedy decoding, with prefix caching and chunked prefill, and the logprobs
of the chosen tokens equal to transformers' log-softmax to 1e-4 relative
(tests/models/engine_reference.py).

SHARDSERVE_TEST_DEVICE=cuda runs the engine on the GPU instead (Triton MLA decode and fused MoE,
CUDA graphs for decode), against the same CPU float32 reference."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.models.deepseek_checkpoints import VOCAB, save_tiny_deepseek
from tests.models.engine_reference import assert_engine_matches_transformers


@pytest.mark.parametrize("name", ["v2_lite", "v3"])
def test_engine_greedy_matches_transformers(name: str, tmp_path: Path) -> None:
    hf = save_tiny_deepseek(name, tmp_path, with_tokenizer=True)
    assert_engine_matches_transformers(hf, tmp_path, seed=len(name), vocab=VOCAB)
