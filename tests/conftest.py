"""Shared fixtures: tiny random models (written once per session) and the embedded SmolLM2."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from tests.device import make_llm

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

if not torch.cuda.is_available():
    # Triton kernels run through Triton's interpreter on CPU-only machines. The flag is read when
    # a kernel module is imported, so set it before any test directory can import one
    # (tests/kernels/conftest.py checks it: a kernel module imported before this line, by a
    # plugin or this file's own imports, would run compiled).
    if not [m for m in sys.modules if m.startswith("shardserve.kernels.") and not m.endswith("_ref")]:
        os.environ.setdefault("SHARDSERVE_TESTS_INTERPRET_FIRST", "1")
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _share_transformers_gguf_parsing() -> None:
    """transformers' GGUF load (the reference for every SmolLM2 check) rebuilds gguf's
    tensor-name table once per tensor and parses the file's metadata twice: about 13 of the
    17 s each load takes on 2 cores. Both are pure functions of their arguments, so the loads
    in one session share them; what transformers loads and computes is unchanged. Readers are
    keyed by the file's size and modification time, so a file rewritten by a test is read
    again."""
    try:
        import gguf
    except ImportError:
        return
    import functools

    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(gguf.get_tensor_name_map)
    reader_class = gguf.GGUFReader
    readers: dict[tuple, object] = {}

    def shared_reader(path, mode="r"):
        if mode != "r":
            return reader_class(path, mode)
        st = os.stat(path)
        key = (os.fspath(path), st.st_size, st.st_mtime_ns)
        if key not in readers:
            readers[key] = reader_class(path, mode)
        return readers[key]

    gguf.GGUFReader = shared_reader


_share_transformers_gguf_parsing()


def _small_kv_caches_on_a_shared_gpu() -> None:
    """Under pytest-xdist several test processes share one GPU. An engine whose test sets no KV
    cache size takes gpu_memory_utilization's 0.9 of the GPU: the first one up holds nearly
    all of it, and the other workers' engines are refused (less than their share is free) or
    run out of memory. Give those engines make_llm's fixed size instead; a test that picks a
    size or a utilization keeps it. A serial run on a GPU (the README's command) profiles as
    users' engines do."""
    if not torch.cuda.is_available() or int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) < 2:
        return
    from shardserve.config import CacheConfig, EngineConfig
    from tests.device import GPU_TEST_KV_CACHE_BYTES

    default_utilization = CacheConfig.__dataclass_fields__["gpu_memory_utilization"].default
    resolve = EngineConfig.resolve

    def resolve_with_a_small_cache(self):
        cc = self.cache_config
        if (self.device_config.device in ("auto", "cuda") and cc.kv_cache_memory_bytes is None
                and cc.num_gpu_blocks_override is None
                and cc.gpu_memory_utilization == default_utilization):
            cc.kv_cache_memory_bytes = GPU_TEST_KV_CACHE_BYTES
        return resolve(self)

    EngineConfig.resolve = resolve_with_a_small_cache


_small_kv_caches_on_a_shared_gpu()


# The heaviest layout demos (8 ranks on 2 cores, about a minute each) run only when asked:
# every part of them (TP across nodes, TP inside DP replicas, 8-rank worlds) has a cheaper
# test in the default run, which keeps CI near its 15 minutes.
HEAVY_ENV = "SHARDSERVE_HEAVY_TESTS"


def pytest_collection_modifyitems(config, items):
    if os.environ.get(HEAVY_ENV) != "1":
        skip_heavy = pytest.mark.skip(reason=f"heavy layout demo: set {HEAVY_ENV}=1 to run it")
        for item in items:
            if "heavy" in item.keywords:
                item.add_marker(skip_heavy)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, str]:
    """Random-weight tiny Llama, Qwen2 and Qwen3 folders with SmolLM2's tokenizer."""
    from shardserve.testing import write_random_model

    root = tmp_path_factory.mktemp("tiny_models")
    return {arch: str(write_random_model(root / arch, architecture=arch, preset="tiny", seed=1))
            for arch in ("llama", "qwen2", "qwen3")}


@pytest.fixture(scope="session")
def smollm2_gguf() -> str:
    from shardserve.loader.source import default_model_path
    return str(default_model_path())


@pytest.fixture(scope="session")
def smollm2_hf_reference(smollm2_gguf):
    """transformers' own GGUF load of SmolLM2 (float32): the reference outputs come from it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.dirname(smollm2_gguf), os.path.basename(smollm2_gguf)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    return model.eval(), tok


@pytest.fixture(scope="session")
def smollm2_llm(smollm2_gguf):
    return make_llm(smollm2_gguf, dtype="float32", max_model_len=1024,
                    kv_cache_memory_bytes=256 << 20)
