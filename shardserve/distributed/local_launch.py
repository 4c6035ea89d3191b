"""Run a function on N local processes that form one torch.distributed world.

For tests and CPU tensor parallelism: each rank joins through a store this process serves on
127.0.0.1 (host_store) and leaves the world when the function returns.
"""

from __future__ import annotations

import datetime
import multiprocessing
import time
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from shardserve.cpus import threads_per_process
from shardserve.distributed.parallel_state import (STORE_SCHEME,
                                                   destroy_distributed_environment,
                                                   init_distributed_environment)


def host_store(timeout_s: float = 600.0) -> tuple[dist.TCPStore, str]:
    """A torch.distributed store served by this process on a port the OS picks, and the
    init_method through which ranks join it as clients (store://127.0.0.1:PORT; see
    parallel_state.init_distributed_environment). Probing a free port and letting rank 0 bind
    it later leaves a window in which another process can take it (EADDRINUSE, seen with tests
    and servers starting side by side); here the port is bound before anyone hears of it. The
    store lives as long as the returned object: keep it until the ranks are gone."""
    store = dist.TCPStore("127.0.0.1", 0, None, True,
                          timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False)
    return store, f"{STORE_SCHEME}127.0.0.1:{store.port}"


def _rank_entry(rank: int, fn: Callable[..., Any], world_size: int, init_method: str,
                args: tuple, timeout_s: float, num_threads: int, backend: str) -> None:
    # N ranks share the machine's cores; one torch pool each would oversubscribe them.
    torch.set_num_threads(num_threads)
    init_distributed_environment(world_size, rank, backend, init_method, local_rank=rank,
                                 timeout_s=timeout_s)
    try:
        fn(rank, *args)
    finally:
        destroy_distributed_environment()


def run_local_ranks(fn: Callable[..., Any], world_size: int, args: tuple = (),
                    timeout_s: float = 60.0, backend: str = "gloo") -> None:
    """Call fn(rank, *args) in `world_size` new processes joined in one world (gloo, or nccl
    with rank r on cuda:r).

    fn must be importable by module name (it is pickled by reference). Raises if any rank
    raises, and terminates all ranks (then raises TimeoutError) after timeout_s.
    """
    store, init_method = host_store(timeout_s)
    num_threads = threads_per_process(world_size)
    # A forkserver that has imported torch once forks every rank: N torch imports cost
    # seconds each, while fork is instant, and forking a fresh single-threaded server is safe.
    multiprocessing.set_forkserver_preload(["torch", "shardserve.distributed.parallel_state"])
    context = mp.start_processes(_rank_entry, nprocs=world_size, join=False,
                                 start_method="forkserver",
                                 args=(fn, world_size, init_method, args, timeout_s, num_threads,
                                       backend))
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=max(0.0, min(1.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{world_size} ranks of {fn.__name__} did not finish "
                                   f"within {timeout_s:.0f} s.")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
                process.join(5)
        del store  # served until every rank is gone
