"""BlockTable: persistent rows, appended blocks, zero padding, growth in both directions."""

from __future__ import annotations

import numpy as np

from shardserve.executor.block_table import BlockTable


def test_rows_gather_in_the_asked_order_padded_with_zero() -> None:
    table = BlockTable(num_rows=4, num_cols=4)
    a = table.add([7, 8, 9])
    b = table.add([2])
    table.append(b, [3])
    got = table.gather(np.array([b, a]))
    assert got.dtype == np.int32
    assert got.tolist() == [[2, 3, 0], [7, 8, 9]]


def test_freed_row_is_reused_clean() -> None:
    table = BlockTable(num_rows=2, num_cols=4)
    a = table.add([1, 2, 3, 4])
    table.free(a)
    c = table.add([5])
    assert c == a
    assert table.gather(np.array([c])).tolist() == [[5]]
    assert table.table[c].tolist() == [5, 0, 0, 0]  # no stale ids past its blocks


def test_grows_rows_and_columns() -> None:
    table = BlockTable(num_rows=1, num_cols=2)
    rows = [table.add(list(range(i, i + 3))) for i in range(5)]  # 3 columns, 5 rows
    table.append(rows[2], list(range(100, 110)))
    assert len(set(rows)) == 5
    got = table.gather(np.array(rows))
    assert got.shape == (5, 13)
    assert got[2].tolist() == [2, 3, 4] + list(range(100, 110))
    assert got[4].tolist() == [4, 5, 6] + [0] * 10


def test_empty_gather_has_one_column() -> None:
    table = BlockTable()
    assert table.gather(np.array([], dtype=np.int64)).shape == (0, 1)
    row = table.add([])
    assert table.gather(np.array([row])).tolist() == [[0]]
