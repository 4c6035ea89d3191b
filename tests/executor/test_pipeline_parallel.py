"""Pipeline parallelism end to end on CPU (gloo): one worker process per rank, stages passing
hidden states and the residual, up to P micro-batches in flight.

- greedy and seeded outputs at pp 2, pp 3 (uneven stages of a 5-layer model), tp 2 x pp 2, an
  explicit --pp-layer-partition and tied embeddings (the last stage loads the head from the
  embedding's tensor) are token-identical to one process in float32, with prefix caching,
  chunked prefill and forced preemption; each stage's KV cache holds only its own layers;
  DeepSeek-V2 (MLA, MoE) at pp 2 too;
- two "nodes" on loopback, TP within a node and PP across the nodes;
- with an artificial per-stage delay, stage spans of different micro-batches overlap in time;
- a bad partition is refused before any process starts; a killed stage raises EngineDeadError.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from shardserve import LLM, SamplingParams
from shardserve.errors import EngineDeadError, InvalidRequestError, ModelLoadError
from tests.executor.test_multiproc_executor import ENGINE_KWARGS, _alive, _generate, _prompts
from tests.ports import free_port_range

pytestmark = pytest.mark.multiproc

NUM_LAYERS = 5
# Fewer blocks than the TP tests: the one-process reference preempts too.
PP_KWARGS = {**ENGINE_KWARGS, "max_model_len": 80, "num_gpu_blocks_override": 10}


@pytest.fixture(scope="module")
def llama5_dir(tmp_path_factory) -> str:
    from shardserve.testing import write_random_model
    return str(write_random_model(tmp_path_factory.mktemp("llama5"), architecture="llama",
                                  preset="tiny", seed=5, num_hidden_layers=NUM_LAYERS))


@pytest.fixture(scope="module")
def llama5_tied_dir(tmp_path_factory) -> str:
    from shardserve.testing import write_random_model
    return str(write_random_model(tmp_path_factory.mktemp("llama5_tied"), architecture="llama",
                                  preset="tiny", seed=6, num_hidden_layers=NUM_LAYERS,
                                  tie_word_embeddings=True))


def _reference(model_dir: str, prompts: list[list[int]]) -> list[list[int]]:
    llm = LLM(model_dir, **PP_KWARGS)
    outs = _generate(llm, prompts)
    assert llm.engine.core.scheduler.num_preemptions > 0  # the settings do force preemption
    return outs


# TP within PP (TP 2 x PP 2, and the seed's TP 4 x PP 2) runs in test_two_nodes_tp_within_pp_across
# below, over two nodes; one launch adds nothing to it but CI time.
@pytest.mark.parametrize("pp,tp,partition,tied", [
    (2, 1, None, False), (3, 1, None, False), (2, 1, "2,3", False), (2, 1, None, True)])
def test_pp_matches_one_process(llama5_dir, llama5_tied_dir, pp, tp, partition, tied):
    model_dir = llama5_tied_dir if tied else llama5_dir
    prompts = _prompts(10 + pp + tp)
    expected = _reference(model_dir, prompts)

    llm = LLM(model_dir, pipeline_parallel_size=pp, tensor_parallel_size=tp,
              pp_layer_partition=partition, **PP_KWARGS)
    try:
        assert _generate(llm, prompts) == expected
        core = llm.engine.core
        assert core.scheduler.num_preemptions > 0
        assert core.scheduler.kv_cache.num_free_blocks == llm.config.cache_config.num_blocks
        assert not core._batch_queue

        # Each stage's cache holds its own layers only (every TP rank of a stage alike).
        layers = [i["num_layers"] for i in core.executor.collective_rpc("kv_cache_info")][::tp]
        assert sum(layers) == NUM_LAYERS and len(layers) == pp
        if partition:
            assert layers == [int(n) for n in partition.split(",")]

        stats = core.executor.pipeline_stats()
        assert len(stats["pp_stage_busy_ratio"]) == pp
        assert all(0.0 < r <= 1.0 for r in stats["pp_stage_busy_ratio"])
        assert all(n > 0 for n in stats["pp_stage_steps_total"])
        assert stats["pp_micro_batches_in_flight_avg"] > 1.0
        # What /metrics exports (flattened per stage by EngineCore.parallel_stats).
        assert f"pp_stage_busy_ratio_{pp - 1}" in core.parallel_stats()
        print(f"\npp={pp} tp={tp} partition={partition} tied={tied}: layers {layers}, {stats}")
    finally:
        llm.shutdown()


def test_deepseek_pp_matches_one_process(tmp_path):
    """DeepSeek-V2 (MLA cache, MoE layers) splits into stages the same way."""
    from shardserve.testing import write_random_model
    model_dir = str(write_random_model(tmp_path / "ds", preset="tiny-deepseek-v2", seed=2))
    kwargs = {**ENGINE_KWARGS, "num_gpu_blocks_override": 40}
    prompts = _prompts(31)[:4]
    expected = _generate_n(LLM(model_dir, **kwargs), prompts)
    llm = LLM(model_dir, pipeline_parallel_size=2, **kwargs)
    try:
        assert _generate_n(llm, prompts) == expected
    finally:
        llm.shutdown()


def _generate_n(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def test_bad_partition_is_refused_before_start(llama5_dir):
    start = time.monotonic()
    with pytest.raises(InvalidRequestError, match=r"--pp-layer-partition '1,1' .* e\.g\. '3,2'"):
        LLM(llama5_dir, pipeline_parallel_size=2, pp_layer_partition="1,1", **PP_KWARGS)
    assert time.monotonic() - start < 10


def test_one_stages_load_error_is_raised_as_itself(llama5_dir, tmp_path, capfd):
    """Only stage 1's layers miss a weight: its rank reports ModelLoadError and exits, which
    breaks stage 0's first send. The user gets the ModelLoadError, as with one process, not
    an EngineDeadError blaming the rank that exited after reporting it (or its peer)."""
    import shutil

    from safetensors.torch import load_file, save_file
    broken = tmp_path / "broken"
    shutil.copytree(llama5_dir, broken)
    weights = broken / "model.safetensors"
    tensors = load_file(weights)
    del tensors[f"model.layers.{NUM_LAYERS - 1}.mlp.down_proj.weight"]
    save_file(tensors, weights, metadata={"format": "pt"})

    with pytest.raises(ModelLoadError, match=f"model.layers.{NUM_LAYERS - 1}.mlp.down_proj"):
        LLM(str(broken), pipeline_parallel_size=2, **PP_KWARGS)
    # The failing rank logs one line, not its traceback; its peer, whose first send broke,
    # says so in one line too.
    err = capfd.readouterr().err
    assert "in load_model" not in err
    assert "Traceback" not in err


# TP 2 x PP 2 over two nodes is the same code on half the ranks: opt-in, to keep CI short.
@pytest.mark.parametrize("tp", [pytest.param(2, marks=pytest.mark.heavy), 4])
def test_two_nodes_tp_within_pp_across(llama5_dir, tp):
    """The seed's layout (2 nodes x 4 GPUs as TP 4 x PP 2) at tiny size, and at TP 2: node r
    holds stage r as TP tp (ranks tp*r ... tp*r + tp - 1); the driver (last stage) lives on
    node 1 and answers over TCP."""
    prompts = _prompts(21)
    expected = _reference(llama5_dir, prompts)
    port = free_port_range(5)
    node1 = subprocess.Popen(
        [sys.executable, "-m", "shardserve.cli", "worker", "--nnodes", "2", "--node-rank", "1",
         "--master-addr", "127.0.0.1", "--master-port", str(port), "-tp", str(tp), "-pp", "2",
         "--rendezvous-timeout-s", "60"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        llm = LLM(llama5_dir, tensor_parallel_size=tp, pipeline_parallel_size=2, nnodes=2,
                  node_rank=0, master_addr="127.0.0.1", master_port=port,
                  rendezvous_timeout_s=60, **PP_KWARGS)
        try:
            assert llm.engine.core.executor.worker_pids.keys() == set(range(tp))  # stage 0 here
            assert _generate(llm, prompts) == expected
            assert len(llm.engine.core.executor.pipeline_stats()["pp_stage_busy_ratio"]) == 2
            # The last stage's TP ranks sample, each step from their vocabulary shards or
            # gathered (the seeded request), all alike; stage 0 never samples.
            counts = llm.engine.core.executor.collective_rpc("sampling_counts")
            assert all(c == {"gathered": 0, "from_shards": 0} for c in counts[:tp]), counts
            assert all(c == counts[tp] for c in counts[tp:]), counts
            assert counts[tp]["from_shards"] > 0 and counts[tp]["gathered"] > 0, counts
        finally:
            llm.shutdown()
        assert node1.wait(timeout=15) == 0, node1.stdout.read()
    finally:
        if node1.poll() is None:
            node1.kill()
            node1.wait()


def test_micro_batches_overlap(llama5_dir, monkeypatch):
    """Every stage sleeps DELAY in its forward: with two micro-batches in flight, stage 0
    works on one while stage 1 works on the other."""
    delay = 0.1
    monkeypatch.setenv("SHARDSERVE_PP_STAGE_DELAY_S", str(delay))
    llm = LLM(llama5_dir, pipeline_parallel_size=2, **ENGINE_KWARGS)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
        llm.generate([{"prompt_token_ids": [i + 1, i + 2, i + 3]} for i in range(4)], params,
                     use_tqdm=False)
        trace = llm.engine.core.executor.pipeline_trace()
        spans = {stage: [(seq, start, end) for s, seq, start, end in trace if s == stage]
                 for stage in (0, 1)}
        assert all(end - start >= delay for stage in spans.values() for _, start, end in stage)
        overlaps = [(a, b) for a in spans[0] for b in spans[1]
                    if a[0] != b[0] and min(a[2], b[2]) - max(a[1], b[1]) > delay / 2]
        # Steady state: most of stage 1's micro-batches ran beside stage 0's next one.
        assert len(overlaps) >= len(spans[1]) // 2, (spans, overlaps)
        ratios = llm.engine.core.executor.pipeline_stats()["pp_stage_busy_ratio"]
        assert min(ratios) > 0.6, ratios
    finally:
        llm.shutdown()


def test_killed_stage_raises_engine_dead_error_quickly(llama5_dir):
    llm = LLM(llama5_dir, pipeline_parallel_size=2, device="cpu", dtype="float32",
              max_model_len=2048, kv_cache_memory_bytes=8 << 20)
    executor = llm.engine.core.executor
    pids = executor.worker_pids
    killed_at: list[float] = []

    def kill_stage0_mid_generation() -> None:
        while executor.comm_stats()["num_steps"] < 3:
            time.sleep(0.005)
        os.kill(pids[0], signal.SIGKILL)
        killed_at.append(time.monotonic())

    threading.Thread(target=kill_stage0_mid_generation, daemon=True).start()
    params = SamplingParams(temperature=0.0, max_tokens=2000, ignore_eos=True)
    with pytest.raises(EngineDeadError, match="rank 0"):
        llm.generate([{"prompt_token_ids": [1, 2, 3]}] * 2, params, use_tqdm=False)
    assert killed_at and time.monotonic() - killed_at[0] < 10
    assert not _alive(pids[1])
    start = time.monotonic()
    with pytest.raises(EngineDeadError):
        llm.generate({"prompt_token_ids": [4, 5]}, params, use_tqdm=False)
    assert time.monotonic() - start < 1
