"""The tiny DeepSeek-V3 over its paged latent cache with the CUDA MLA backend (store_kv and
mla_decode kernels; Triton's interpreter on CPU) gives transformers' logits, as the torch
backend does: prefill chunks, a mixed step and a decode-only step. On a GPU: compiled, float32
(tf32x3 products), the fused MoE kernel included."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("triton")

from shardserve.layers.mla_attention import TritonMLABackend, select_mla_backend  # noqa: E402
from tests.models.deepseek_checkpoints import (paged_references, paged_steps,  # noqa: E402
                                               save_tiny_deepseek)
from tests.kernels.kernel_cases import DEVICE  # noqa: E402
from tests.models.tiny_checkpoints import assert_close_logits, load_ours  # noqa: E402


class _TritonAttentionBackendName:
    """Stands in for the runner's Triton attention backend: MLA picks its own by the name."""

    name = "triton"


def test_triton_mla_backend_matches_transformers(tmp_path: Path) -> None:
    assert select_mla_backend(_TritonAttentionBackendName) is TritonMLABackend
    hf = save_tiny_deepseek("v3", tmp_path)
    model = load_ours(tmp_path, device=DEVICE)
    steps = paged_steps(model, _TritonAttentionBackendName, DEVICE)
    for got, want in zip(steps, paged_references(hf)):
        assert_close_logits(got, want)
