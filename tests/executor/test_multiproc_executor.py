"""Tensor parallelism end to end on CPU (gloo): one worker process per rank behind the engine.

- greedy (and seeded) outputs at tp 2 and 4 are token-identical to one process, with prefix
  caching, chunked prefill and forced preemption, on a Llama and on a Qwen3 with fewer KV
  heads than ranks; each rank's KV cache holds only its own heads; SmolLM2 at tp 3 (slow);
- batches are sampled from the LM head's vocabulary shards or gathered, every rank alike, at
  tp 4 too, with a rank whose shard is all padding and requests of both kinds coming and going
  with two steps in flight;
- two "nodes" on loopback (`shardserve worker` as node 1) give the same outputs, and node 1
  leaves when node 0 stops;
- a rank that never arrives is named by the rendezvous timeout;
- a worker killed (or frozen) mid-generation makes the engine raise EngineDeadError within
  seconds; when node 0 dies, every rank of both nodes exits on its own; a frozen rank on node 1,
  which cannot, is killed by its launcher, which exits non-zero; a killed rank on node 1 is
  named (by its silence), not the peer whose all-reduce it broke; a death (or a SIGTERM) on
  node 1 is reported at once; node 1 exits non-zero when node 0's engine fails;
- a --master-port (or one of the four after it) already in use is named before anything starts;
- a script that never calls LLM.shutdown() exits quietly, leaving no rank behind.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest

from shardserve import LLM, SamplingParams
from shardserve.errors import EngineDeadError, RendezvousTimeoutError
from tests.ports import free_port_range

pytestmark = pytest.mark.multiproc

NEW_TOKENS = 10
# 20 blocks of 8 tokens and a 32-token step budget: prompts are chunked, two of them share a
# 20-token prefix, and the batch cannot fit at once, so requests are preempted and resumed.
ENGINE_KWARGS = dict(device="cpu", dtype="float32", max_model_len=128, block_size=8,
                     num_gpu_blocks_override=20, max_num_batched_tokens=32,
                     enable_prefix_caching=True)


@pytest.fixture(scope="module")
def qwen3_kv1_dir(tmp_path_factory) -> str:
    """Qwen3 (q/k norms) with one KV head: at tp 2 each rank holds a replica of it."""
    from shardserve.testing import write_random_model
    return str(write_random_model(tmp_path_factory.mktemp("qwen3_kv1"), architecture="qwen3",
                                  preset="tiny", seed=3, num_key_value_heads=1, head_dim=16))


def _prompts(seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    shared = [rng.randrange(2000) for _ in range(20)]
    prompts = [[rng.randrange(2000) for _ in range(n)] for n in (3, 17, 40, 9)]
    prompts += [shared + [rng.randrange(2000) for _ in range(5)],
                shared + [rng.randrange(2000) for _ in range(11)]]
    return prompts


def _params() -> list[SamplingParams]:
    greedy = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    seeded = SamplingParams(temperature=0.9, top_p=0.95, seed=1234, max_tokens=NEW_TOKENS,
                            ignore_eos=True)
    return [greedy] * 5 + [seeded]


def _generate(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], _params(), use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def _reference(model_dir: str, prompts: list[list[int]]) -> tuple[list[list[int]], int]:
    llm = LLM(model_dir, **ENGINE_KWARGS)
    outs = _generate(llm, prompts)
    assert llm.engine.core.scheduler.num_preemptions > 0  # the settings do force preemption
    return outs, llm.engine.core.executor.worker.runner.kv_bytes_per_block()


@pytest.mark.parametrize("model,tp", [("llama", 2), ("llama", 4), ("qwen3_kv1", 2)])
def test_tp_greedy_matches_one_process(tiny_model_dirs, qwen3_kv1_dir, model, tp):
    model_dir = qwen3_kv1_dir if model == "qwen3_kv1" else tiny_model_dirs["llama"]
    prompts = _prompts(tp)
    expected, bytes_per_block_tp1 = _reference(model_dir, prompts)

    llm = LLM(model_dir, tensor_parallel_size=tp, **ENGINE_KWARGS)
    try:
        assert _generate(llm, prompts) == expected
        core = llm.engine.core
        assert core.scheduler.num_preemptions > 0
        assert core.scheduler.kv_cache.num_free_blocks == llm.config.cache_config.num_blocks

        # The cache is sharded by KV head: a rank's block holds tp_size times fewer bytes (so
        # the same memory holds tp_size times more blocks), unless the heads are replicated.
        infos = core.executor.collective_rpc("kv_cache_info")
        total_kv_heads = 1 if model == "qwen3_kv1" else 2
        per_rank_heads = max(1, total_kv_heads // tp)
        assert [i["num_kv_heads"] for i in infos] == [per_rank_heads] * tp
        assert infos[0]["bytes_per_block"] * total_kv_heads == bytes_per_block_tp1 * per_rank_heads

        stats = core.executor.comm_stats()
        assert stats["num_steps"] > 0 and stats["tp_collectives_per_step"] > 0
        assert 0.0 < stats["tp_comm_time_ratio"] < 1.0
        assert stats["step_broadcast_us_avg"] > 0
        print(f"\ntp={tp} {model}: {stats}")
    finally:
        llm.shutdown()


def test_tp_async_scheduling_matches_one_process(tiny_model_dirs):
    """Two steps in flight under TP: the driver broadcasts each step's sampled ids so every
    rank fills the next step's placeholders on its device; same tokens as lock-step."""
    prompts = _prompts(7)
    expected, _ = _reference(tiny_model_dirs["llama"], prompts)
    llm = LLM(tiny_model_dirs["llama"], tensor_parallel_size=2, async_scheduling=True,
              **ENGINE_KWARGS)
    try:
        assert _generate(llm, prompts) == expected
        core = llm.engine.core
        assert core.max_in_flight == 2 and core.num_overlapped_steps > 0
        assert core.scheduler.num_preemptions > 0
        assert core.scheduler.kv_cache.num_free_blocks == llm.config.cache_config.num_blocks
    finally:
        llm.shutdown()


def test_tp_greedy_batches_are_sampled_from_vocabulary_shards(tiny_model_dirs):
    """All-greedy batches under TP: every rank keys its own vocabulary shard and one all-reduce
    MAX picks the token (layers/sampler.py), no logits gathered; the tokens are one process's.
    A batch with a logprobs request gathers (the same tokens again), and so does every batch
    with --disable-vocab-parallel-sampling."""
    prompts = _prompts(3)
    greedy = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    with_logprobs = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True,
                                   logprobs=2)

    def run(llm: LLM, params: SamplingParams) -> list[list[int]]:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [o.outputs[0].token_ids for o in outs]

    one = LLM(tiny_model_dirs["llama"], **ENGINE_KWARGS)
    expected = run(one, greedy)
    for disable in (False, True):
        llm = LLM(tiny_model_dirs["llama"], tensor_parallel_size=2,
                  disable_vocab_parallel_sampling=disable, **ENGINE_KWARGS)
        try:
            assert run(llm, greedy) == expected
            counts = llm.engine.core.executor.collective_rpc("sampling_counts")
            assert counts[0] == counts[1]  # every rank took the same path every step
            if disable:
                assert counts[0]["from_shards"] == 0 and counts[0]["gathered"] > 0
            else:
                assert counts[0]["from_shards"] > 0 and counts[0]["gathered"] == 0
                assert run(llm, with_logprobs) == expected
                after = llm.engine.core.executor.collective_rpc("sampling_counts")[0]
                assert after["gathered"] > 0 and after["from_shards"] == counts[0]["from_shards"]
        finally:
            llm.shutdown()


@pytest.fixture(scope="module")
def vocab300_dir(tmp_path_factory) -> str:
    """A Llama with 300 tokens: at tp 4 the vocabulary pads to 512, shards of 128 columns of
    which 128, 128, 44 and 0 are real tokens (the last rank's LM head is all padding)."""
    from shardserve.testing import write_random_model
    return str(write_random_model(tmp_path_factory.mktemp("vocab300"), architecture="llama",
                                  preset="tiny", seed=9, vocab_size=300))


def test_tp4_mixed_batches_over_padded_shards_with_async_scheduling(vocab300_dir):
    """Requests that need the whole row (logprobs, a penalty, min_tokens, a seeded top-p draw)
    beside greedy ones of different lengths, so batches switch between sampling from the
    vocabulary shards and gathering as requests start, finish, are preempted and resume, two
    steps in flight: one process's tokens, and every rank took the same path every step (a
    rank in the gather while another is in the keys' all-reduce would hang). The winners
    cross all shards, the one of padding only included."""
    rng = random.Random(300)
    prompts = [[rng.randrange(300) for _ in range(n)] for n in (3, 17, 40, 9, 25, 6, 30, 12)]
    greedy = dict(temperature=0.0, ignore_eos=True)
    params = [SamplingParams(max_tokens=12, **greedy), SamplingParams(max_tokens=2, **greedy),
              SamplingParams(max_tokens=5, logprobs=1, **greedy),
              SamplingParams(max_tokens=9, **greedy),
              SamplingParams(max_tokens=4, repetition_penalty=1.3, **greedy),
              SamplingParams(max_tokens=7, min_tokens=3, **greedy),
              SamplingParams(temperature=0.9, top_p=0.9, seed=7, max_tokens=6, ignore_eos=True),
              SamplingParams(max_tokens=14, **greedy)]

    def run(llm: LLM) -> list[list[int]]:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [o.outputs[0].token_ids for o in outs]

    expected = run(LLM(vocab300_dir, **ENGINE_KWARGS))
    assert max(t for out in expected for t in out) >= 256  # shard 2 holds some winners
    llm = LLM(vocab300_dir, tensor_parallel_size=4, async_scheduling=True, **ENGINE_KWARGS)
    try:
        assert run(llm) == expected
        core = llm.engine.core
        assert core.num_overlapped_steps > 0 and core.scheduler.num_preemptions > 0
        assert core.scheduler.kv_cache.num_free_blocks == llm.config.cache_config.num_blocks
        counts = core.executor.collective_rpc("sampling_counts")
        assert all(c == counts[0] for c in counts), counts
        assert counts[0]["from_shards"] > 0 and counts[0]["gathered"] > 0, counts
    finally:
        llm.shutdown()


@pytest.mark.slow
def test_smollm2_tp3_matches_one_process(smollm2_llm):
    """The real model: 9 query and 3 KV heads divide by 3 (not by 2 or 4)."""
    conversations = [[{"role": "user", "content": "What is the capital of France?"}],
                     [{"role": "user", "content": "Name three colours."}]]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    expected = [o.outputs[0].token_ids
                for o in smollm2_llm.chat(conversations, params, use_tqdm=False)]
    llm = LLM(None, tensor_parallel_size=3, device="cpu", dtype="float32", max_model_len=256,
              kv_cache_memory_bytes=32 << 20)
    try:
        outs = llm.chat(conversations, params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == expected
        assert outs[0].outputs[0].text.startswith("The capital of France is Paris.")
    finally:
        llm.shutdown()


@pytest.fixture(scope="module")
def llama_h8_dir(tmp_path_factory) -> str:
    """8 query heads over 2 KV heads: TP 8 splits the query heads and replicates each KV head
    on four ranks."""
    from shardserve.testing import write_random_model
    return str(write_random_model(tmp_path_factory.mktemp("llama_h8"), architecture="llama",
                                  preset="tiny", seed=8, num_attention_heads=8,
                                  num_key_value_heads=2))


# tp 2 (one rank a node) is left out for CI time: test_two_nodes_tp_within_pp_across and the
# node-fault tests below run two one-rank nodes already. tp 8 is a heavy demo (8 ranks):
# test_two_nodes_tp_within_pp_across[4] runs an 8-rank world over two nodes by default.
@pytest.mark.heavy
@pytest.mark.parametrize("tp", [8])
def test_two_nodes_on_loopback(tiny_model_dirs, llama_h8_dir, tp):
    """TP across two "nodes" (two launches on loopback), each holding tp / 2 ranks; tp 8 is
    issue 11's TP 8 over 2 x 4 GPUs at tiny size."""
    model_dir = tiny_model_dirs["llama"] if tp == 2 else llama_h8_dir
    prompts = _prompts(7)
    expected, _ = _reference(model_dir, prompts)
    port = free_port_range(5)
    node1 = subprocess.Popen(
        [sys.executable, "-m", "shardserve.cli", "worker", "--nnodes", "2", "--node-rank", "1",
         "--master-addr", "127.0.0.1", "--master-port", str(port), "-tp", str(tp),
         "--rendezvous-timeout-s", "120"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        llm = LLM(model_dir, tensor_parallel_size=tp, nnodes=2, node_rank=0,
                  master_addr="127.0.0.1", master_port=port, rendezvous_timeout_s=120,
                  **ENGINE_KWARGS)
        try:
            # This launch holds the first half of the ranks; the rest are node 1's.
            assert llm.engine.core.executor.worker_pids.keys() == set(range(tp // 2))
            assert _generate(llm, prompts) == expected
        finally:
            llm.shutdown()
        # Node 0 said stop: node 1's ranks leave and its launcher exits cleanly, having said
        # what it was waiting for.
        assert node1.wait(timeout=15) == 0, node1.stdout.read()
        assert f"node 1 of 2, headless: started ranks {list(range(tp // 2, tp))}" in \
            node1.stdout.read()
    finally:
        if node1.poll() is None:
            node1.kill()
            node1.wait()


def test_missing_node_is_named_by_the_rendezvous(tiny_model_dirs):
    start = time.monotonic()
    with pytest.raises(RendezvousTimeoutError, match=r"rank\(s\) \[1\] \(node\(s\) \[1\]\)"):
        LLM(tiny_model_dirs["llama"], tensor_parallel_size=2, nnodes=2, node_rank=0,
            master_port=free_port_range(5), rendezvous_timeout_s=15, **ENGINE_KWARGS)
    # Long enough for this node's own rank to start on a loaded 2-core machine; bounded.
    assert time.monotonic() - start < 60


@pytest.mark.parametrize("offset", [0, 3])
def test_master_port_in_use_is_named_before_anything_starts(tiny_model_dirs, offset):
    """Node 0 listens on --master-port (torch's store) and the four after it. One of them
    taken gave a ZMQ traceback, or torch's EADDRINUSE once the ranks were up; now the flag is
    named at once."""
    import socket

    from shardserve.errors import InvalidRequestError

    port = free_port_range(5)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port + offset))
        taken.listen()
        start = time.monotonic()
        with pytest.raises(InvalidRequestError, match=rf"--master-port {port}: port\(s\) "
                                                      rf"\[{port + offset}\] .* in use") as err:
            LLM(tiny_model_dirs["llama"], tensor_parallel_size=2, nnodes=2, node_rank=0,
                master_port=port, rendezvous_timeout_s=5, **ENGINE_KWARGS)
    assert err.value.param == "master_port"
    assert time.monotonic() - start < 5


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_killed_worker_raises_engine_dead_error_quickly(tiny_model_dirs, async_scheduling):
    """Also with two steps in flight (async scheduling): neither is waited for forever."""
    llm = LLM(tiny_model_dirs["llama"], tensor_parallel_size=2, device="cpu", dtype="float32",
              max_model_len=2048, kv_cache_memory_bytes=8 << 20,
              async_scheduling=async_scheduling)
    executor = llm.engine.core.executor
    pids = executor.worker_pids
    killed_at: list[float] = []

    def kill_rank1_mid_generation() -> None:
        while executor.comm_stats()["num_steps"] < 3:
            time.sleep(0.005)
        os.kill(pids[1], signal.SIGKILL)
        killed_at.append(time.monotonic())

    threading.Thread(target=kill_rank1_mid_generation, daemon=True).start()
    params = SamplingParams(temperature=0.0, max_tokens=2000, ignore_eos=True)
    with pytest.raises(EngineDeadError, match="rank 1"):
        llm.generate([{"prompt_token_ids": [1, 2, 3]}] * 2, params, use_tqdm=False)
    assert killed_at and time.monotonic() - killed_at[0] < 10
    # The other rank was stopped too, and the engine refuses work at once instead of hanging.
    assert not _alive(pids[0])
    start = time.monotonic()
    with pytest.raises(EngineDeadError):
        llm.generate({"prompt_token_ids": [4, 5]}, params, use_tqdm=False)
    assert time.monotonic() - start < 1
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.heavy  # a whole TP 2 script in a subprocess (~12 s); CI runs its parts elsewhere
def test_script_without_shutdown_exits_cleanly(tiny_model_dirs):
    """vLLM scripts rarely call LLM.shutdown(): at exit the ranks go with the interpreter,
    quietly (no resource_tracker warning of "leaked semaphore objects", which tqdm's lock in
    every rank used to leave), and none outlives the script."""
    script = ("import sys\n"
              "from shardserve import LLM, SamplingParams\n"
              f"llm = LLM({tiny_model_dirs['llama']!r}, tensor_parallel_size=2, device='cpu',\n"
              "          max_model_len=128, kv_cache_memory_bytes=8 << 20)\n"
              "llm.generate('Hi', SamplingParams(max_tokens=2), use_tqdm=False)\n"
              "print(*llm.engine.core.executor.worker_pids.values())\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, cwd=os.path.dirname(os.path.dirname(os.path.dirname(
                              os.path.abspath(__file__)))))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "leaked" not in proc.stderr, proc.stderr[-2000:]
    pids = [int(p) for p in proc.stdout.split()]
    assert len(pids) == 2 and not any(_alive(pid) for pid in pids)


def test_rank_stopped_before_checking_in_fails_start_up_quickly(tiny_model_dirs, monkeypatch):
    """A local rank stopped (SIGSTOP) right after it is spawned never checks in; start-up names
    it after the heartbeat timeout instead of waiting out the whole rendezvous timeout."""
    from shardserve.executor import multiproc_executor

    real = multiproc_executor.start_worker_processes
    stopped: list[int] = []

    def start_then_stop_rank1(specs, **kwargs):
        procs = real(specs, **kwargs)
        for spec, proc in zip(specs, procs):
            if spec.rank == 1:
                os.kill(proc.pid, signal.SIGSTOP)
                stopped.append(proc.pid)
        return procs

    monkeypatch.setattr(multiproc_executor, "start_worker_processes", start_then_stop_rank1)
    start = time.monotonic()
    with pytest.raises(EngineDeadError, match=r"rank 1 pid \d+ stopped"):
        LLM(tiny_model_dirs["llama"], tensor_parallel_size=2, device="cpu", dtype="float32",
            max_model_len=256, kv_cache_memory_bytes=8 << 20, heartbeat_timeout_s=1.5,
            rendezvous_timeout_s=120)
    assert time.monotonic() - start < 30
    assert stopped and not _alive(stopped[0])


@pytest.mark.parametrize("exits,blamed", [
    ({1: 1}, r"^Worker rank 1 failed: RuntimeError: boom$"),  # the reporter left after it
    ({0: 1, 1: 1}, r"^Worker rank 1 failed: RuntimeError: boom$"),  # and the peer it broke
    ({0: -signal.SIGKILL, 1: 1}, r"^Worker rank 0 \(pid 100\) died: killed by SIGKILL; "
                                 r"rank 1 then failed"),  # a killed rank is the cause
])
def test_start_up_error_blames_the_rank_that_raised(exits, blamed):
    """A rank whose start-up raises reports the error and exits (code 1); so does a peer whose
    collective that broke. Neither exit is a death to blame: the error is named as the rank's
    own ("rank 1 failed"), not as "rank 1 died: exit code 1; rank 1 then failed", nor pinned on
    the peer. A rank killed meanwhile still is the cause."""
    from types import SimpleNamespace

    from shardserve.executor.multiproc_executor import MultiprocExecutor

    executor = MultiprocExecutor.__new__(MultiprocExecutor)
    executor._procs = {r: SimpleNamespace(pid=100 + r, exitcode=exits.get(r)) for r in (0, 1)}
    executor.world_size = 2
    executor.parallel_config = SimpleNamespace(heartbeat_timeout_s=10.0)
    executor._monitor = None
    executor._closed = True  # nothing to stop
    with pytest.raises(EngineDeadError, match=blamed):
        executor._on_error(["err", 0, 1, "RuntimeError", "boom", ""], starting=True)


def test_process_stopped_reads_the_state():
    from shardserve.executor.liveness import process_stopped

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert not process_stopped(proc.pid)
        os.kill(proc.pid, signal.SIGSTOP)
        deadline = time.monotonic() + 5
        while not process_stopped(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert process_stopped(proc.pid)
    finally:
        proc.kill()
        proc.wait()


def test_frozen_worker_is_found_by_its_silence(tiny_model_dirs):
    """A rank that stops answering (SIGSTOP: no exit, no error, its peer blocked in an
    all-reduce) is named within the heartbeat timeout, not after the step timeout."""
    llm = LLM(tiny_model_dirs["llama"], tensor_parallel_size=2, device="cpu", dtype="float32",
              max_model_len=2048, kv_cache_memory_bytes=8 << 20, heartbeat_timeout_s=1.5)
    executor = llm.engine.core.executor
    pids = executor.worker_pids
    stopped_at: list[float] = []

    def freeze_rank1() -> None:
        while executor.comm_stats()["num_steps"] < 3:
            time.sleep(0.005)
        os.kill(pids[1], signal.SIGSTOP)
        stopped_at.append(time.monotonic())

    threading.Thread(target=freeze_rank1, daemon=True).start()
    params = SamplingParams(temperature=0.0, max_tokens=2000, ignore_eos=True)
    try:
        with pytest.raises(EngineDeadError, match="rank 1 .*silent"):
            llm.generate({"prompt_token_ids": [1, 2, 3]}, params, use_tqdm=False)
        assert stopped_at and time.monotonic() - stopped_at[0] < 10
        assert not _alive(pids[0]) and not _alive(pids[1])
    finally:
        if _alive(pids[1]):
            os.kill(pids[1], signal.SIGKILL)


def test_node1_leaves_when_node0_dies(tiny_model_dirs):
    """Node 0's engine is SIGKILLed: its own ranks see their parent go, node 1's ranks see its
    heartbeats stop; everything exits without being told."""
    port = free_port_range(5)
    flags = ["--nnodes", "2", "--master-addr", "127.0.0.1", "--master-port", str(port),
             "-tp", "2", "--heartbeat-timeout-s", "2"]
    node1 = subprocess.Popen([sys.executable, "-m", "shardserve.cli", "worker", "--node-rank",
                              "1", *flags], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    node0_code = (
        "import sys, time\n"
        "from shardserve import LLM\n"
        f"llm = LLM({tiny_model_dirs['llama']!r}, tensor_parallel_size=2, nnodes=2, "
        f"node_rank=0, master_port={port}, heartbeat_timeout_s=2, device='cpu', "
        "dtype='float32', max_model_len=128, kv_cache_memory_bytes=8 << 20)\n"
        "print('READY', *llm.engine.core.executor.worker_pids.values(), flush=True)\n"
        "time.sleep(120)\n")
    node0 = subprocess.Popen([sys.executable, "-c", node0_code], stdout=subprocess.PIPE,
                             text=True)
    try:
        line = node0.stdout.readline()
        assert line.startswith("READY"), line
        node0_ranks = [int(pid) for pid in line.split()[1:]]
        node0.kill()
        killed_at = time.monotonic()
        assert node1.wait(timeout=20) != 0  # the engine vanished: not a clean stop
        assert time.monotonic() - killed_at < 15
        deadline = time.monotonic() + 5
        while any(_alive(pid) for pid in node0_ranks) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_alive(pid) for pid in node0_ranks)
    finally:
        for proc in (node0, node1):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@contextlib.contextmanager
def _two_nodes_tp2(model_dir: str, heartbeat_timeout_s: float = 1.5):
    """Node 1 as a `shardserve worker` launch holding rank 1, node 0 as this process's offline
    LLM, both with this heartbeat timeout: yields (llm, node 1's launcher, rank 1's pid).
    Node 1 and its rank are killed on the way out if they are still there."""
    port = free_port_range(5)
    node1 = subprocess.Popen([sys.executable, "-m", "shardserve.cli", "worker", "--node-rank",
                              "1", "--nnodes", "2", "--master-addr", "127.0.0.1",
                              "--master-port", str(port), "-tp", "2",
                              "--heartbeat-timeout-s", str(heartbeat_timeout_s)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    rank1 = None
    try:
        llm = LLM(model_dir, tensor_parallel_size=2, nnodes=2, node_rank=0, master_port=port,
                  heartbeat_timeout_s=heartbeat_timeout_s, device="cpu", dtype="float32",
                  max_model_len=2048, kv_cache_memory_bytes=8 << 20)
        forkserver = [pid for pid in _children(node1.pid) if b"forkserver" in _cmdline(pid)]
        (rank1,) = [pid for fs in forkserver for pid in _children(fs)]
        yield llm, node1, rank1
    finally:
        if rank1 is not None and _alive(rank1):
            os.kill(rank1, signal.SIGKILL)
        if node1.poll() is None:
            node1.kill()
            node1.wait()


def _signal_rank1_mid_generation(llm, rank1: int, sig: signal.Signals,
                                 at: list[float]) -> None:
    """From a thread: once the engine has run 3 steps, send sig to rank 1 and note when."""
    executor = llm.engine.core.executor

    def run() -> None:
        while executor.comm_stats()["num_steps"] < 3:
            time.sleep(0.005)
        os.kill(rank1, sig)
        at.append(time.monotonic())

    threading.Thread(target=run, daemon=True).start()


LONG = SamplingParams(temperature=0.0, max_tokens=2000, ignore_eos=True)


def test_frozen_rank_on_node1_is_killed_by_its_launcher(tiny_model_dirs):
    """Node 1's only rank is SIGSTOPped mid-generation: node 0's engine names it within the
    heartbeat timeout and stops; the rank cannot leave by itself, so node 1's launcher kills it
    once node 0 has been silent past the timeout and exits non-zero instead of waiting for
    ever (a supervisor restarts the group)."""
    with _two_nodes_tp2(tiny_model_dirs["llama"]) as (llm, node1, rank1):
        stopped_at: list[float] = []
        _signal_rank1_mid_generation(llm, rank1, signal.SIGSTOP, stopped_at)
        with pytest.raises(EngineDeadError, match="rank 1 on node 1 .*silent"):
            llm.generate({"prompt_token_ids": [1, 2, 3]}, LONG, use_tqdm=False)
        assert stopped_at and time.monotonic() - stopped_at[0] < 10
        # The engine has stopped beating: 1.5 s of silence, the rank's tear-down grace.
        assert node1.wait(timeout=30) != 0, node1.stdout.read()
        assert time.monotonic() - stopped_at[0] < 25
        assert not _alive(rank1)


@pytest.mark.parametrize("when", ["idle", "mid_step"])
def test_rank_killed_on_node1_is_named_not_its_peer(tiny_model_dirs, when):
    """Node 1's rank is SIGKILLed, while the offline engine is idle or mid-generation: its
    peer's all-reduce then fails with gloo's "Connection closed by peer", but the error must
    name the rank that went away (no sentinel on another node: by its silence)."""
    with _two_nodes_tp2(tiny_model_dirs["llama"]) as (llm, _node1, rank1):
        killed_at: list[float] = []
        if when == "idle":
            os.kill(rank1, signal.SIGKILL)
            killed_at.append(time.monotonic())
            time.sleep(3)  # past the heartbeat timeout, with nothing asked of the engine
        else:
            _signal_rank1_mid_generation(llm, rank1, signal.SIGKILL, killed_at)
        # Named by node 1's launcher's report (liveness.report_gone) or, if the timeout is
        # shorter, by its silence.
        with pytest.raises(EngineDeadError, match=r"^Worker rank 1 \(rank 1 on node 1 .*"
                                                  r"(silent|died: killed by SIGKILL)"):
            llm.generate({"prompt_token_ids": [1, 2, 3]}, LONG, use_tqdm=False)
        assert killed_at and time.monotonic() - killed_at[0] < 10


@pytest.mark.parametrize("victim,sig", [("rank", signal.SIGKILL), ("launcher", signal.SIGKILL),
                                        ("launcher", signal.SIGTERM)])
def test_death_on_node1_is_reported_before_the_heartbeat_timeout(tiny_model_dirs, victim, sig):
    """With a heartbeat timeout of 60 s, node 0 still learns of a death on node 1 within
    seconds: a rank SIGKILLed mid-generation is reported by its node's launcher, a rank
    whose launcher was SIGKILLed reports itself as it leaves (liveness.report_gone), and a
    launcher told to stop (SIGTERM: its pod deleted) reports its node gone before stopping
    its ranks (it used to say nothing: a minute of waiting, then "silent")."""
    with _two_nodes_tp2(tiny_model_dirs["llama"], heartbeat_timeout_s=60) as (llm, node1, rank1):
        killed_at: list[float] = []
        _signal_rank1_mid_generation(llm, node1.pid if victim == "launcher" else rank1, sig,
                                     killed_at)
        why = {("rank", signal.SIGKILL):
               r"died: killed by SIGKILL \(reported by node 1's launcher\)",
               ("launcher", signal.SIGKILL): "left: the process that started it is gone",
               ("launcher", signal.SIGTERM): "left: node 1's launcher got SIGTERM"}[victim, sig]
        with pytest.raises(EngineDeadError, match=r"^Worker rank 1 \(rank 1 on node 1 .*" + why):
            llm.generate({"prompt_token_ids": [1, 2, 3]}, LONG, use_tqdm=False)
        assert killed_at and time.monotonic() - killed_at[0] < 8


def test_node1_exits_non_zero_when_node0s_engine_fails(tiny_model_dirs):
    """Node 0's own rank dies: the engine fails and stops every rank, node 1's too. That stop
    is not a clean end: node 1's launcher must exit non-zero (it used to exit 0, which a
    supervisor reads as "done" and does not restart, leaving a restarted node 0 waiting for
    it), without blaming its own rank."""
    with _two_nodes_tp2(tiny_model_dirs["llama"], heartbeat_timeout_s=60) as (llm, node1, _):
        rank0 = llm.engine.core.executor.worker_pids[0]
        os.kill(rank0, signal.SIGKILL)
        with pytest.raises(EngineDeadError, match=r"^Worker rank 0 \(pid \d+\) died"):
            llm.generate({"prompt_token_ids": [1, 2, 3]}, LONG, use_tqdm=False)
        assert node1.wait(timeout=15) == 1  # well before the 60 s heartbeat timeout
        out = node1.stdout.read()
        assert "stopped every rank after a failure: Worker rank 0" in out, out
        assert "stopping this node's other ranks" not in out, out


def test_node1_started_with_other_sizes_is_named_at_once(tiny_model_dirs):
    """Node 1 believes in -tp 3 over 3 nodes (so its one rank is rank 1, a valid rank of node
    0's world of 2): its rank's own start-up error is reported as itself, not after a
    heartbeat timeout as a silent peer."""
    port = free_port_range(5)
    node1 = subprocess.Popen([sys.executable, "-m", "shardserve.cli", "worker", "--node-rank",
                              "1", "--nnodes", "3", "--master-addr", "127.0.0.1",
                              "--master-port", str(port), "-tp", "3"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with pytest.raises(EngineDeadError, match=r"^Worker rank 1 failed: ValueError: This node "
                                                  r"was started with world size 3 \(tp 3"):
            LLM(tiny_model_dirs["llama"], tensor_parallel_size=2, nnodes=2, node_rank=0,
                master_port=port, rendezvous_timeout_s=60, **ENGINE_KWARGS)
        assert node1.wait(timeout=30) != 0
    finally:
        if node1.poll() is None:
            node1.kill()
            node1.wait()


def _children(pid: int) -> list[int]:
    return [int(child) for task in os.listdir(f"/proc/{pid}/task")
            for child in open(f"/proc/{pid}/task/{task}/children").read().split()]


def _cmdline(pid: int) -> bytes:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped) counts as gone.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


_HANG_RANK_SITECUSTOMIZE = '''
import os
if os.environ.get("SHARDSERVE_TEST_HANG_RANK"):
    from shardserve.executor import worker_proc as _wp
    _step = _wp.WorkerProc._step
    def _hang_in_step(self, *args, **kwargs):
        if self.rank == int(os.environ["SHARDSERVE_TEST_HANG_RANK"]):
            import time
            time.sleep(600)
        return _step(self, *args, **kwargs)
    _wp.WorkerProc._step = _hang_in_step
'''


def test_step_timeout_names_the_hung_rank_not_the_waiting_driver(tiny_model_dirs, tmp_path):
    """Rank 1 hangs inside a step with its heartbeat alive, so only the step timeout can end
    it, and only the driver (rank 0, waiting for rank 1 in the all-reduce) owes an answer: the
    error names rank 1 from the ranks' stacks. A fresh interpreter, whose fork server picks
    up the hang (sitecustomize) for its ranks."""
    (tmp_path / "sitecustomize.py").write_text(_HANG_RANK_SITECUSTOMIZE)
    script = (
        "import sys\n"
        "from shardserve import LLM, SamplingParams\n"
        "from shardserve.errors import EngineDeadError\n"
        f"llm = LLM({tiny_model_dirs['llama']!r}, tensor_parallel_size=2, device='cpu',\n"
        "          dtype='float32', max_model_len=256, kv_cache_memory_bytes=8 << 20,\n"
        "          step_timeout_s=3)\n"
        "try:\n"
        "    llm.generate({'prompt_token_ids': [1, 2, 3]}, SamplingParams(max_tokens=4),\n"
        "                 use_tqdm=False)\n"
        "except EngineDeadError as e:\n"
        "    print('ENGINE DEAD:', e)\n")
    env = {**os.environ, "SHARDSERVE_TEST_HANG_RANK": "1",
           "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, timeout=120)
    dead = [line for line in out.stdout.splitlines() if line.startswith("ENGINE DEAD:")]
    assert dead, out.stdout + out.stderr[-3000:]
    assert "not in a collective (likely the hung one): rank 1 at " in dead[0], dead[0]
    assert "sitecustomize.py" in dead[0] and "in _hang_in_step" in dead[0]
    assert "waiting in a collective: rank(s) [0]" in dead[0]
    assert "Rank 1's threads at the step timeout" in out.stderr
