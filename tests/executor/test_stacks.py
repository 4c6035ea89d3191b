"""executor/stacks.py: a rank's stacks on SIGUSR1, read back by the engine, and which ranks
wait in a collective. The whole path (a rank hung in a step, named by the step timeout) is in
tests/executor/test_multiproc_executor.py."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from shardserve.executor.stacks import collect_stacks, diagnose, main_thread_frames

DUMP_WAITING = """\
Thread 0x00007f01 (most recent call first):
  File "/usr/lib/python3.11/threading.py", line 331 in wait
  File "/usr/lib/python3.11/threading.py", line 1002 in _bootstrap

Current thread 0x00007f02 (most recent call first):
  File "/site/torch/distributed/distributed_c10d.py", line 2806 in all_reduce
  File "/src/shardserve/distributed/parallel_state.py", line 300 in all_reduce
  File "/src/shardserve/models/llama.py", line 150 in forward
  File "/src/shardserve/executor/worker_proc.py", line 122 in run_worker
  File "<string>", line 1 in <module>
"""
DUMP_ELSEWHERE = """\
Current thread 0x00007f03 (most recent call first):
  File "/src/shardserve/models/llama.py", line 77 in forward
  File "/src/shardserve/executor/worker_proc.py", line 122 in run_worker
  File "<string>", line 1 in <module>

Thread 0x00007f04 (most recent call first):
  File "/src/shardserve/executor/liveness.py", line 183 in heard
  File "/usr/lib/python3.11/threading.py", line 1002 in _bootstrap
"""


def test_main_thread_is_the_one_threading_did_not_start():
    frames = main_thread_frames(DUMP_ELSEWHERE)
    assert frames[0].endswith("line 77 in forward") and len(frames) == 3
    assert main_thread_frames("") == []


def test_diagnose_names_the_rank_outside_a_collective():
    line = diagnose({0: DUMP_WAITING, 1: DUMP_ELSEWHERE})
    assert "not in a collective (likely the hung one): rank 1 at " \
           "/src/shardserve/models/llama.py:77 in forward" in line
    assert "waiting in a collective: rank(s) [0]" in line
    assert diagnose({}) == "no rank's stack could be read"


def test_a_registered_process_writes_its_stacks_on_request(tmp_path):
    script = textwrap.dedent(f"""
        import sys, time
        from shardserve.executor.stacks import enable_stack_dumps
        enable_stack_dumps({str(tmp_path)!r}, 3)
        print("ready", flush=True)
        def stuck_here():
            time.sleep(60)
        stuck_here()
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        stacks = collect_stacks({3: proc.pid}, str(tmp_path), wait_s=5)
    finally:
        proc.kill()
        proc.wait()
    assert main_thread_frames(stacks[3])[0].endswith("in stuck_here")
    assert "rank 3 at " in diagnose(stacks) and "in stuck_here" in diagnose(stacks)
