"""tp_logits end to end on a tiny CPU model: a TP 2 layout against transformers on the same
weights, each run in its own process."""

from __future__ import annotations

import json

from benchmarks.tp_logits import main


def test_float32_tp2_matches_transformers(tiny_model_dirs, tmp_path, capsys):
    out = tmp_path / "table.json"
    main(["--model-dir", tiny_model_dirs["llama"], "--tp", "2", "--dtype", "float32",
          "--skip-fp32", "--hf", "float32", "--num-prompts", "3", "--prompt-len", "12",
          "--new-tokens", "6", "--json", str(out),
          "--engine-args", '{"device": "cpu"}'])  # TP 2 over gloo, also on a 1-GPU machine
    table = json.loads(out.read_text())
    assert set(table) == {"tp2-float32 vs hf-float32"}  # the float32 run is the base itself
    for row in table.values():
        assert row["rel_err"] < 1e-4
        assert row["argmax_agreement"] == 1.0
        assert row["greedy_identical"] == 3 and row["greedy_mean_prefix"] == 6
    assert "| tp2-float32 | hf-float32 |" in capsys.readouterr().out
