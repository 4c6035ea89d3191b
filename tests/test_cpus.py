"""Ranks share the cores this process may run on (its affinity mask), not the machine's."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from shardserve.cpus import threads_per_process, usable_cpus


def test_threads_split_the_usable_cores_and_never_reach_zero():
    cores = usable_cpus()
    assert 1 <= cores <= (os.cpu_count() or 1)
    assert threads_per_process(1) == cores
    assert threads_per_process(2) == max(1, cores // 2)
    assert threads_per_process(cores * 4) == 1
    assert threads_per_process(0) == cores  # no processes: treated as one


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no affinity masks here")
def test_a_narrowed_affinity_mask_is_what_counts():
    """As in a container given one core of the host: os.cpu_count() still names them all."""
    one = min(os.sched_getaffinity(0))
    code = ("import os; from shardserve.cpus import usable_cpus, threads_per_process; "
            f"os.sched_setaffinity(0, {{{one}}}); "
            "print(usable_cpus(), threads_per_process(2), os.cpu_count())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out[:2] == ["1", "1"] and int(out[2]) >= 1
