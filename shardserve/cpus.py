"""The CPU cores this process may use, to share among the processes it starts (TP/PP ranks,
local test ranks) so that their torch thread pools do not oversubscribe the machine.

The count is the process's affinity mask (what `taskset`, a container's cpuset or Kubernetes'
static CPU manager leave it), not os.cpu_count(): in a pod given 8 of a host's 128 cores, two
ranks would otherwise start 64 threads each on 8 cores. Python 3.13's os.process_cpu_count()
counts the same way."""

from __future__ import annotations

import os


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # no affinity masks on this platform (macOS)
        return os.cpu_count() or 1


def threads_per_process(num_processes: int) -> int:
    """torch threads for each of `num_processes` processes sharing this process's cores."""
    return max(1, usable_cpus() // max(1, num_processes))
