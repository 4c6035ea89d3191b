"""Every live request's block table as one row of a persistent host array.

A step's block table used to be rebuilt from each request's Python list of block ids (one
list-to-array conversion per request per step, ~60 ids each at 1k tokens). Here a request gets
a row when it arrives, a new block is written once when the scheduler adds it, and a step's
table is one gather of the scheduled requests' rows:

    table   row 0  [ 7  8  9  0  0 ...]   num_blocks[0] = 3
            row 1  [ 2  0  0  0  0 ...]   num_blocks[1] = 1
            row 2  (free)
    step's table = table[rows of the scheduled requests, :max(num_blocks of those)]

Columns past a row's num_blocks are 0 (the padding the attention kernels expect); both
dimensions grow by doubling when a request or a table needs more.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class BlockTable:
    def __init__(self, num_rows: int = 64, num_cols: int = 64) -> None:
        self.table = np.zeros((num_rows, num_cols), dtype=np.int32)
        self.num_blocks = np.zeros(num_rows, dtype=np.int64)
        self._free_rows = list(range(num_rows - 1, -1, -1))  # pop() takes the lowest

    def add(self, block_ids: Sequence[int]) -> int:
        """A row for a new request, holding block_ids; returns the row."""
        if not self._free_rows:
            self._grow_rows()
        row = self._free_rows.pop()
        self.table[row] = 0
        self.num_blocks[row] = 0
        self.append(row, block_ids)
        return row

    def append(self, row: int, block_ids: Sequence[int]) -> None:
        if not block_ids:
            return
        start = int(self.num_blocks[row])
        end = start + len(block_ids)
        if end > self.table.shape[1]:
            self._grow_cols(end)
        self.table[row, start:end] = block_ids
        self.num_blocks[row] = end

    def free(self, row: int) -> None:
        self._free_rows.append(row)

    def gather(self, rows: np.ndarray) -> np.ndarray:
        """[len(rows), max blocks among them] int32, padded with 0 (at least one column)."""
        width = max(int(self.num_blocks[rows].max()) if len(rows) else 0, 1)
        return self.table[rows, :width]

    def _grow_rows(self) -> None:
        old = self.table.shape[0]
        self.table = np.concatenate([self.table, np.zeros_like(self.table)])
        self.num_blocks = np.concatenate([self.num_blocks, np.zeros_like(self.num_blocks)])
        self._free_rows.extend(range(2 * old - 1, old - 1, -1))  # empty before: none in use

    def _grow_cols(self, needed: int) -> None:
        cols = self.table.shape[1]
        while cols < needed:
            cols *= 2
        grown = np.zeros((self.table.shape[0], cols), dtype=np.int32)
        grown[:, :self.table.shape[1]] = self.table
        self.table = grown
