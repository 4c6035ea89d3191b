"""benchmarks/layout_memory.py: reading a serve run's layouts and logs, and the planner beside them."""

from __future__ import annotations

import json

from benchmarks.layout_memory import compare, layout_of, measured_kv_blocks
from shardserve.testing import write_random_model


def test_layout_of_reads_serve_flags_later_ones_win():
    lay = layout_of(["--max-model-len", "2048", "-tp", "2", "-pp", "2",
                     "--gpu-memory-utilization=0.8", "-tp", "4"])
    assert (lay["tp"], lay["pp"], lay["dp"], lay["max_model_len"], lay["util"]) == (4, 2, 1, 2048, 0.8)


def test_kv_blocks_from_every_rank_and_the_planner_beside_them(tmp_path):
    model = write_random_model(tmp_path / "m", preset="llama-3-8b", weights=False)
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "server_tp2.log").write_text(
        "INFO (rank 0) KV cache: 4000 blocks of 16 tokens (30.00 GiB); max concurrency\n"
        "INFO (rank 1) KV cache: 3990 blocks of 16 tokens (29.90 GiB); max concurrency\n")
    assert measured_kv_blocks(str(logs / "server_tp2.log")) == [4000, 3990]
    smi = [{"gpu": g, "used_mib": 120_000.0, "total_mib": 143_771.0} for g in (0, 1)]
    doc = {"server_flags": "--max-model-len 2048",
           "configs": [{"config": "tp2", "flags": "-tp 2", "status": "ok", "nvidia_smi": smi},
                       {"config": "tp64", "flags": "-tp 64", "status": "ok", "nvidia_smi": smi}]}
    rows = compare(str(model), json.loads(json.dumps(doc)), str(logs))
    tp2, tp64 = rows
    assert tp2["layout"] == "TP2 x PP1 x DP1"
    assert tp2["measured_kv_blocks"] == 3990  # the smallest rank's count is the engine's
    assert 7.0 < tp2["planner_weights_gib"] < 8.5  # half of 8B's ~15 GiB of bf16 weights
    assert tp2["kv_blocks_err"] == 3990 / tp2["planner_kv_blocks"] - 1
    assert abs(tp2["measured_max_gpu_gib"] - 120_000 / 1024) < 1e-9
    assert "planner_total_gib" not in tp64 and "infeasible" in tp64["planner"]

