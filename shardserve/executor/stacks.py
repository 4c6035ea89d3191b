"""Where each rank is when a step hangs: every thread's Python stack, on request.

A rank that hangs inside a step (a stuck kernel, a deadlock in user code, a rank that never
reaches the collective its peers wait in) keeps its heartbeat going, so only the step timeout
catches it, and only the driver rank owes the engine an answer: by itself the timeout can name
just the driver. So each rank on this node registers faulthandler for SIGUSR1 (it writes the
stacks from C, also while the main thread is blocked inside a collective), and on a step
timeout the engine asks its ranks for their stacks, logs them, and names the ranks whose main
thread is *not* waiting in torch.distributed: the one the others wait for.

    kill -USR1 <rank pid>     writes that rank's stacks, any time (to its file, or stderr)
"""

from __future__ import annotations

import faulthandler
import os
import re
import signal
import sys
import time
from typing import IO

STACK_SIGNAL = signal.SIGUSR1
# Frames that mean "waiting for the other ranks" (gloo/NCCL calls and our wrappers of them).
COLLECTIVE_MARKERS = ("torch/distributed/", "shardserve/distributed/")

_dump_file: IO[str] | None = None  # kept open: faulthandler writes to its descriptor


def stack_file(directory: str, rank: int) -> str:
    return os.path.join(directory, f"stacks-rank{rank}.txt")


def enable_stack_dumps(directory: str | None, rank: int) -> None:
    """In a rank: SIGUSR1 appends every thread's stack to the rank's file in `directory` (the
    executor's ipc directory on its node), or to stderr without one."""
    global _dump_file
    if directory is not None:
        # Append mode: the engine empties the file before asking, and each dump then starts
        # at its beginning whatever this descriptor wrote before.
        _dump_file = open(stack_file(directory, rank), "a")
    faulthandler.register(STACK_SIGNAL, file=_dump_file or sys.stderr, all_threads=True)


def collect_stacks(pids: dict[int, int], directory: str, wait_s: float = 1.0) -> dict[int, str]:
    """rank -> its threads' stacks as faulthandler writes them, for this node's ranks (pid
    per rank); ranks that wrote nothing within wait_s (gone, or not registered) are left out."""
    asked = {}
    for rank, pid in pids.items():
        path = stack_file(directory, rank)
        try:
            open(path, "w").close()
            os.kill(pid, STACK_SIGNAL)
        except OSError:
            continue
        asked[rank] = path
    stacks: dict[int, str] = {}
    last: dict[int, str] = {}
    deadline = time.monotonic() + wait_s
    while asked and time.monotonic() < deadline:
        time.sleep(0.1)
        for rank, path in list(asked.items()):
            try:
                with open(path) as f:
                    text = f.read()
            except OSError:
                continue
            if text and text == last.get(rank):  # written, and no longer growing
                stacks[rank] = text
                del asked[rank]
            last[rank] = text
    stacks.update({rank: text for rank, text in last.items() if rank in asked and text})
    return stacks


def main_thread_frames(dump: str) -> list[str]:
    """The frames (innermost first) of the main thread in a faulthandler dump: the one thread
    not started by threading (whose outermost frame is threading's _bootstrap)."""
    blocks: list[list[str]] = []
    for line in dump.splitlines():
        if line.startswith(("Thread 0x", "Current thread 0x")):
            blocks.append([])
        elif line.startswith("  File ") and blocks:
            blocks[-1].append(line.strip())
    for frames in blocks:
        if frames and not frames[-1].endswith("in _bootstrap"):
            return frames
    return []


def _short(frame: str) -> str:
    """'File "/x/y.py", line 8 in f' -> '/x/y.py:8 in f'."""
    match = re.fullmatch(r'File "(.*)", line (\d+) in (.*)', frame)
    return f"{match[1]}:{match[2]} in {match[3]}" if match else frame


def diagnose(stacks: dict[int, str]) -> str:
    """One line: which ranks wait in a collective, and where the others are."""
    waiting, elsewhere = [], []
    for rank in sorted(stacks):
        frames = main_thread_frames(stacks[rank])
        if not frames:
            continue
        if any(marker in frame for frame in frames for marker in COLLECTIVE_MARKERS):
            waiting.append(rank)
        else:
            elsewhere.append(f"rank {rank} at {_short(frames[0])}")
    if not waiting and not elsewhere:
        return "no rank's stack could be read"
    parts = []
    if elsewhere:
        parts.append("not in a collective (likely the hung one): " + "; ".join(elsewhere))
    if waiting:
        parts.append(f"waiting in a collective: rank(s) {waiting}")
    return "; ".join(parts) + " (every thread's stack is in the log above)"
