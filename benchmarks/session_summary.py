"""One compact table per kind of result found under the given folders (default: $OUT):
tp_scaling records (*.jsonl), serve_layouts JSON, planner_vs_measured JSON, deepseek_v2_lite
JSON. Reads what is there, partial or not; never fails on a file it does not understand.

    python benchmarks/session_summary.py [DIR_OR_FILE ...]
"""

from __future__ import annotations

import json
import os
import sys


def load(paths: list[str]) -> dict[str, list]:
    found: dict[str, list] = {"tp_scaling": [], "serve_layouts": [], "planner": [], "deepseek": []}
    files = []
    for path in paths:
        if os.path.isdir(path):
            for root, _, names in os.walk(path):
                files += [os.path.join(root, n) for n in sorted(names)
                          if n.endswith((".json", ".jsonl"))]
        elif os.path.exists(path):
            files.append(path)
    seen_layouts, seen_texts = set(), set()
    for file in files:
        try:
            with open(file) as f:
                text = f.read()
        except OSError:
            continue
        if text in seen_texts:  # the same file kept in two places ($OUT and $SESSION_DIR)
            continue
        seen_texts.add(text)
        if file.endswith(".jsonl"):
            for line in text.splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if isinstance(rec, dict) and rec.get("kind") == "tp_scaling":
                    key = (rec.get("layout"), rec.get("date"), rec.get("status"))
                    if key not in seen_layouts:
                        seen_layouts.add(key)
                        found["tp_scaling"].append((file, rec))
            continue
        try:
            doc = json.loads(text)
        except ValueError:
            continue
        if isinstance(doc, dict) and doc.get("kind") == "serve_layouts":
            found["serve_layouts"].append((file, doc))
        elif isinstance(doc, dict) and doc.get("kind") == "deepseek_v2_lite":
            found["deepseek"].append((file, doc))
        elif isinstance(doc, list) and doc and isinstance(doc[0], dict) and "estimate" in doc[0]:
            found["planner"].append((file, doc))
        elif isinstance(doc, dict) and doc.get("kind") == "tp_scaling_report":
            for rec in doc.get("results", []):  # in case the .jsonl did not come back
                key = (rec.get("layout"), rec.get("date"), rec.get("status"))
                if key not in seen_layouts:
                    seen_layouts.add(key)
                    found["tp_scaling"].append((file, rec))
    return found


def _f(x, width: int, digits: int = 1) -> str:
    return f"{x:>{width}.{digits}f}" if isinstance(x, (int, float)) else f"{'-':>{width}}"


def print_layouts(items: list) -> None:
    print("\n== parallel layouts (tp_scaling)")
    print(f"{'TPxPP':>6} {'status':>8} {'start s':>8} {'b1 tok/s':>9} {'out tok/s':>10} "
          f"{'tput s':>7} {'b1 comm':>8} {'tput comm':>9} {'PP busy':>11} {'match':>9}  workload")
    base = next((r for _, r in items if r.get("greedy_tokens")), None)
    for _, r in items:
        t = r.get("throughput") or {}
        w = r.get("workload") or {}
        pp = (t.get("pp") or {}).get("stage_busy_ratio")
        match = "-"
        if base and r.get("greedy_tokens"):
            same = 0
            for a, b in zip(base["greedy_tokens"], r["greedy_tokens"]):
                for x, y in zip(a, b):
                    if x != y:
                        break
                    same += 1
            match = f"{same}/{sum(len(a) for a in base['greedy_tokens'])}"
        print(f"{r.get('layout', '?'):>6} {r.get('status', '?'):>8} {_f(r.get('startup_s'), 8)} "
              f"{_f(r.get('batch1_decode_tok_s'), 9)} {_f(t.get('output_tok_s'), 10, 0)} "
              f"{_f(t.get('elapsed_s'), 7, 0)} {_share(r.get('batch1_comm')):>8} "
              f"{_share(t.get('comm')):>9} "
              f"{('/'.join(f'{b:.2f}' for b in pp) if pp else 'n/a'):>11} {match:>9}  "
              f"{w.get('num_prompts')}x({w.get('input_len')}/{w.get('output_len')})")


def _share(comm) -> str:
    if not comm or comm.get("comm_share") is None or comm.get("timed_collectives_per_step", 0) < 2:
        return "n/a"
    return f"{100 * comm['comm_share']:.1f}%"


def print_serve(items: list) -> None:
    print("\n== online serving (serve_layouts; ms)")
    print(f"{'config':<8} {'rate':>5} {'reqs':>5} {'req/s':>7} {'out tok/s':>9} {'TTFT50':>7} "
          f"{'TTFT99':>7} {'TPOT50':>7} {'TPOT99':>7} {'fail':>4} {'mem GiB':>8}  workload / status")
    for _, doc in items:
        w = doc.get("workload", {})
        cfg = {c["config"]: c for c in doc.get("configs", [])}
        for r in doc.get("results", []):
            c = cfg.get(r["config"], {})
            rate = r["rate"] if isinstance(r["rate"], str) else f"{r['rate']:g}"
            status = r.get("status", "")
            print(f"{r['config']:<8} {rate:>5} {r.get('num_prompts', '-'):>5} "
                  f"{_f(r.get('request_throughput'), 7, 2)} {_f(r.get('output_throughput'), 9, 0)} "
                  f"{_f(r.get('median_ttft_ms'), 7, 0)} {_f(r.get('p99_ttft_ms'), 7, 0)} "
                  f"{_f(r.get('median_tpot_ms'), 7)} {_f(r.get('p99_tpot_ms'), 7)} "
                  f"{str(r.get('failed', '-')):>4} {_f(c.get('gpu_memory_used_gib'), 8)}  "
                  f"{w.get('input_len')}/{w.get('output_len')}"
                  f"{'' if status == 'ok' else ' ' + status[:60]}")
        for c in doc.get("configs", []):
            if c.get("status") != "ok":
                print(f"{c['config']:<8} {c.get('status', '?')[:100]}")


def print_planner(items: list) -> None:
    print("\n== planner vs measured (GiB; error of the estimate)")
    print(f"{'preset':<14} {'tokens':>6} {'peak est':>9} {'peak got':>9} {'err':>7} "
          f"{'blocks est':>10} {'blocks got':>10} {'err':>7}")
    for _, doc in items:
        for r in doc:
            e, g = r["estimate"], r["measured"]

            def err(k):
                return f"{(e[k] - g[k]) / g[k] * 100:+6.1f}%" if g.get(k) else "     -"
            print(f"{r['preset']:<14} {r['tokens']:>6} {e['profile_peak'] / 2**30:>9.2f} "
                  f"{g['profile_peak'] / 2**30:>9.2f} {err('profile_peak'):>7} "
                  f"{e['num_blocks']:>10} {g['num_blocks']:>10} {err('num_blocks'):>7}")


def print_deepseek(items: list) -> None:
    print("\n== DeepSeek-V2-Lite shape (tok/s)")
    for file, d in items:
        a = d.get("args", {})
        big = f"{a.get('num_prompts')}x({a.get('input_len')}/{a.get('output_len')})"
        if d.get("mode") == "ep-vs-tp":
            print(f"ep-vs-tp: TP2 b1 {_f(d.get('tp2_b1'), 0)} / {big} {_f(d.get('tp2_throughput'), 0, 0)}"
                  f";  EP2 b1 {_f(d.get('ep2_b1'), 0)} / {big} {_f(d.get('ep2_throughput'), 0, 0)}"
                  + "".join(f"; {k}: {d[k][:80]}" for k in ("tp2_error", "ep2_error") if k in d))
        else:
            print(f"single: shardserve b1 {_f(d.get('shardserve_b1'), 0)} (roofline "
                  f"{_f(d.get('roofline_b1'), 0, 0)}), {big} {_f(d.get('shardserve_throughput'), 0, 0)}"
                  f"; transformers b1 {_f(d.get('hf_b1'), 0)}, throughput "
                  f"{_f(d.get('hf_throughput'), 0, 0)} ({a.get('hf_num_prompts')}x"
                  f"({a.get('input_len')}/{a.get('hf_output_len')})); logits rel err "
                  f"{_f(d.get('logits_rel_err_vs_hf'), 0, 3)}"
                  + (f"; hf_error: {d['hf_error'][:80]}" if "hf_error" in d else ""))


def main(argv: list[str]) -> int:
    paths = argv or [os.environ.get("OUT", ".")]
    found = load(paths)
    if found["tp_scaling"]:
        print_layouts(found["tp_scaling"])
    if found["serve_layouts"]:
        print_serve(found["serve_layouts"])
    if found["planner"]:
        print_planner(found["planner"])
    if found["deepseek"]:
        print_deepseek(found["deepseek"])
    if not any(found.values()):
        print(f"no results under {' '.join(paths)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
