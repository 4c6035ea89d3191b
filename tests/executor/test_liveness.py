"""executor/liveness.py: stopping ranks is bounded, and a tear-down that hangs still exits."""

from __future__ import annotations

import multiprocessing as mp
import signal
import subprocess
import sys
import time

import pytest

from shardserve.executor.liveness import stop_processes

_WATCHDOG = """
import time

import pytest
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


def test_monitor_that_cannot_bind_leaves_no_socket_open(tmp_path):
    """A heartbeat port already in use (node 0's master_port + 3 or + 4): the monitor's error
    must leave the context free to terminate. Its sockets stayed open, so the executor's tear-
    down waited in zmq's term() for ever and `serve` hung at "loading the model"."""
    import threading

    import zmq

    from shardserve.executor.liveness import HeartbeatMonitor
    from shardserve.executor.wire import WireCodec

    context = zmq.Context()
    taken = context.socket(zmq.PUB)
    taken.bind("tcp://127.0.0.1:*")  # ipc:// would just take the path over
    taken_addr = taken.getsockopt_string(zmq.LAST_ENDPOINT)
    try:
        # Held, as the executor's tear-down (run while handling the error) holds it: its
        # traceback keeps the half-made monitor, and so any socket it left open, alive.
        with pytest.raises(zmq.ZMQError) as error:
            HeartbeatMonitor(context, [taken_addr], [f"ipc://{tmp_path}/beats_in"], WireCodec(),
                             1.0)
    finally:
        taken.close(linger=0)
    terminated = threading.Thread(target=context.term, daemon=True)
    terminated.start()
    terminated.join(5)
    assert not terminated.is_alive()
    assert "in use" in str(error.value)
