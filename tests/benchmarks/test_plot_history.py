"""plot_history's chart: every workload gets a panel, and every target it has is drawn."""

from __future__ import annotations

import math

import pytest

from benchmarks.plot_history import draw, read_series

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def test_a_single_row_or_isolated_target_is_visible(tmp_path):
    csv_path = tmp_path / "history.csv"
    csv_path.write_text("date,commit,gpu,workload,output_tok_s,target\n"
                        "2026-11-28,aaa1111,H200,one row,100.5,220\n"
                        "2026-11-28,aaa1111,H200,no target,50,\n"
                        "2026-11-29,bbb2222,H200,no target,60,\n"
                        "2026-11-28,aaa1111,H200,target once,10,\n"
                        "2026-11-29,bbb2222,H200,target once,20,30\n"
                        "2026-11-30,ccc3333,H200,target once,25,\n")
    fig = draw(read_series(str(csv_path)), plt)
    try:
        axes = {ax.get_title(): ax for ax in fig.axes}
        assert set(axes) == {"one row on H200", "no target on H200", "target once on H200"}
        assert [line.get_label() for line in axes["no target on H200"].lines] == ["shardserve"]
        for title, want in (("one row on H200", [220.0]), ("target once on H200", [30.0])):
            target = next(line for line in axes[title].lines if line.get_label() == "target")
            assert [y for y in target.get_ydata() if not math.isnan(y)] == want
            # A dashed line between fewer than two neighbouring points draws nothing: only a
            # marker shows such a target.
            assert target.get_marker() not in (None, "None", "", " ")
        fig.savefig(tmp_path / "history.png")
    finally:
        plt.close(fig)


def test_a_csv_without_a_target_column(tmp_path):
    csv_path = tmp_path / "history.csv"
    csv_path.write_text("date,commit,gpu,workload,output_tok_s\n"
                        "2026-11-28,aaa1111,H200,w,100\n2026-11-29,bbb2222,H200,w,120\n")
    fig = draw(read_series(str(csv_path)), plt)
    try:
        assert [line.get_label() for line in fig.axes[0].lines] == ["shardserve"]
    finally:
        plt.close(fig)
