"""executor/liveness.py: stopping ranks is bounded, and a tear-down that hangs still exits."""

from __future__ import annotations

import multiprocessing as mp
import signal
import subprocess
import sys
import time

from shardserve.executor.liveness import stop_processes

_WATCHDOG = """
import time
from shardserve.executor.liveness import arm_exit_watchdog
done = arm_exit_watchdog({timeout}, 3, "test tear-down")
time.sleep({work})  # the tear-down: a hang when work > timeout
done.set()
print("finished")
"""


def _run(timeout: float, work: float) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", _WATCHDOG.format(timeout=timeout, work=work)],
                          capture_output=True, text=True, timeout=60)
    return proc, time.monotonic() - start


def test_watchdog_ends_a_hung_teardown_with_its_code():
    proc, took = _run(timeout=0.5, work=30)
    assert proc.returncode == 3, proc.stderr
    assert took < 10 and "finished" not in proc.stdout


def test_watchdog_stays_quiet_when_the_teardown_finishes():
    proc, _ = _run(timeout=5, work=0.1)
    assert proc.returncode == 0 and "finished" in proc.stdout


def _stubborn() -> None:  # a rank stuck in a collective: deaf to SIGTERM
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(120)


def test_stop_of_many_stuck_ranks_is_bounded():
    ctx = mp.get_context("spawn")
    procs = {rank: ctx.Process(target=_stubborn, daemon=True) for rank in range(4)}
    for proc in procs.values():
        proc.start()
    time.sleep(1.0)  # let them install the handler
    start = time.monotonic()
    stop_processes(procs, grace_s=0.5)
    took = time.monotonic() - start
    assert not any(proc.is_alive() for proc in procs.values())
    # grace + one shared 2 s wait after SIGTERM + the kill: not 3 s per rank
    assert took < 0.5 + 3.0 + 1.5, took
