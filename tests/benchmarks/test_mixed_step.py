"""mixed_step end to end on a tiny model pinned to the CPU, also on a GPU machine (no CUDA
graphs there: every variant runs eager, so this checks the measurement, the variants'
processes and the table, not the graphs)."""

from __future__ import annotations

import pytest

from benchmarks.mixed_step import main, parse_cases, table


def test_each_variant_times_decode_and_mixed_steps(tiny_model_dirs, capsys):
    main(["--model-dir", tiny_model_dirs["llama"], "--cases", "1x300,4x40",
          "--variants", "eager,split2", "--prompt-len", "9", "--steps", "4",
          "--dtype", "float32", "--engine-args", '{"device": "cpu"}'])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + 2 * 2
    for line in rows[1:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] in ("eager", "split2") and cells[1] in ("1x300", "4x40")
        assert float(cells[2]) > 0 and float(cells[3]) > 0
        assert cells[5] == "0"  # the CPU captures no graphs


def test_cases_and_table():
    assert parse_cases("1x32000, 64x2000") == [(1, 32000), (64, 2000)]
    for bad in ("64", "0x10", "ax2"):
        with pytest.raises(SystemExit, match="ROWSxCONTEXT"):
            parse_cases(bad)
    text = table({"graphs": {"1x8": {"decode_ms": 5.5, "mixed_ms": 10.58, "mixed_replays": 20}}},
                 127)
    assert text.splitlines()[2] == "| graphs | 1x8 | 5.50 | 10.58 | +5.08 | 20 |"


def test_bad_variant_is_named():
    with pytest.raises(SystemExit, match="splitN"):
        main(["--variants", "graphs,splitx", "--model-dir", "/nonexistent"])
    with pytest.raises(SystemExit, match="eager or splitN"):
        main(["--variants", "fast", "--model-dir", "/nonexistent"])
