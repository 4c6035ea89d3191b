"""Parallel layouts on the GPU: TP x PP (1x1 vs 2x1 vs 1x2, or any list) on the Llama-3-8B
shape in bf16.

    python benchmarks/tp_scaling.py --model-dir /tmp/llama3-8b --layouts 1x1,2x1,1x2
    python benchmarks/tp_scaling.py --model-dir /tmp/llama3-8b --tp 1,2        # = 1x1,2x1
    python benchmarks/tp_scaling.py --model-dir /tmp/llama3-8b --quick         # minutes
    python benchmarks/tp_scaling.py --model-dir /tmp/llama3-8b --enforce-eager # comm share
    # bounded, resumable across calls: one JSON line per layout, earlier lines as the base
    python benchmarks/tp_scaling.py --layouts 2x1,1x2 --timeout-s 300 --budget-s 540 \\
        --jsonl out/layouts.jsonl --prior-jsonl /tmp/gpu_session/layouts.jsonl

A layout is TPxPP (tensor x pipeline parallel sizes; --tp 1,2 is shorthand for 1x1,2x1). For
each layout, in its own process (so one run's GPU memory never stays behind for the next):
  - agreement: greedy tokens of a few prompts, compared with the first layout's (bf16 under a
    different reduction order or batch split: report the matching prefix, not equality);
  - batch-1 decode tokens/s: (N - 1) tokens over the time of an N-token generation minus a
    1-token one, so prefill and start-up drop out;
  - throughput: --num-prompts random prompts of --input-len tokens, --output-len tokens each
    (ignore_eos), all submitted at once; output and total tokens/s;
  - the communication share: time in TP collectives (all-reduces and the logits gather; CUDA
    events on the driver rank) over the step time, for the batch-1 decode and for the
    throughput run. All-reduces inside replayed CUDA graphs cannot be timed, so with graphs on
    (the default) decode steps show few timed collectives; --enforce-eager measures every step
    (slower steps, so a lower bound on the share with graphs, where compute shrinks and
    communication does not);
  - pipeline parallelism: each stage's busy seconds over the run's wall time (the executor's
    PipelineStats) and the average number of micro-batches in flight.

Robustness (for bounded GPU sessions): --timeout-s kills a layout's process group once it runs
that long (--budget-s caps all layouts together); the child rewrites its result file after
every measurement, so a killed or failed layout still reports what it measured. --jsonl
appends one record per layout as soon as it ends (status ok / failed / timeout); --prior-jsonl
adds records of earlier runs (e.g. 1x1 from a previous call) to the table, first as the base.

Writes the model folder first if --model-dir holds none (random weights drawn on the GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", default="/tmp/llama3-8b")
    p.add_argument("--preset", default="llama-3-8b")
    p.add_argument("--num-layers", type=int, default=None, help="shorter model of the same width")
    p.add_argument("--layouts", default=None,
                   help="comma-separated TPxPP layouts, e.g. 1x1,2x1,1x2; the first is the base")
    p.add_argument("--tp", default="1,2", help="shorthand: TP sizes, each with PP 1")
    p.add_argument("--decode-tokens", type=int, default=256, help="batch-1 decode length")
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--input-len", type=int, default=1000)
    p.add_argument("--output-len", type=int, default=1000)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--quick", action="store_true",
                   help="64 decode tokens; 128 x (256 in / 128 out) throughput")
    p.add_argument("--json", default=None, help="save every result here at the end")
    p.add_argument("--jsonl", action="append", default=[],
                   help="append one JSON line per layout as soon as it ends (repeatable: "
                        "e.g. one file in the results folder, one kept across calls)")
    p.add_argument("--prior-jsonl", action="append", default=[],
                   help="records of earlier runs to show (and use as the base); repeatable")
    p.add_argument("--timeout-s", type=float, default=None,
                   help="kill a layout's processes after this many seconds")
    p.add_argument("--budget-s", type=float, default=None,
                   help="all layouts together: later ones get what is left (minus 5 s)")
    p.add_argument("--one-run", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result-file", default=None, help=argparse.SUPPRESS)
    p.add_argument("--device", default="cuda", help="cuda, or cpu to try the script on a tiny model")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--engine-args", default="{}", type=json.loads, metavar="JSON",
                   help='more LLM(...) keyword arguments, e.g. \'{"load_format": "dummy", '
                        '"disable_custom_all_reduce": true}\' (dummy: only config.json is '
                        'written, and the greedy agreement between layouts means nothing)')
    args = p.parse_args(argv)
    if args.quick:  # smaller defaults; sizes given explicitly still win
        quick = {"decode_tokens": 64, "num_prompts": 128, "input_len": 256, "output_len": 128}
        for name, value in quick.items():
            if getattr(args, name) == p.get_default(name):
                setattr(args, name, value)
    try:
        args.layout_list = parse_layouts(args.layouts or ",".join(f"{t}x1" for t in
                                                                    args.tp.split(",")))
    except ValueError as err:
        p.error(str(err))
    return args


def parse_layouts(text: str) -> list[tuple[int, int]]:
    """'1x1,2x1,1x2' -> [(1, 1), (2, 1), (1, 2)]; a bare '2' means 2x1."""
    out = []
    for item in (t.strip().lower() for t in text.split(",")):
        if not item:
            continue
        tp, _, pp = item.partition("x")
        try:
            layout = (int(tp), int(pp or 1))
        except ValueError:
            raise ValueError(f"bad layout {item!r}: use TPxPP, e.g. 2x1") from None
        if min(layout) < 1:
            raise ValueError(f"bad layout {item!r}: sizes start at 1")
        out.append(layout)
    if not out:
        raise ValueError("no layouts given")
    return out


def layout_name(tp: int, pp: int) -> str:
    return f"{tp}x{pp}"


def random_prompts(num: int, length: int, vocab: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt_token_ids": [rng.randrange(1000, vocab) for _ in range(length)]}
            for _ in range(num)]


def comm_delta(before: dict, after: dict) -> dict:
    steps = after.get("num_steps", 0) - before.get("num_steps", 0)
    step_s = after.get("step_seconds_total", 0.0) - before.get("step_seconds_total", 0.0)
    comm_s = after.get("tp_comm_seconds_total", 0.0) - before.get("tp_comm_seconds_total", 0.0)
    reduces = (after.get("tp_collectives_per_step", 0.0) * after.get("num_steps", 0)
               - before.get("tp_collectives_per_step", 0.0) * before.get("num_steps", 0))
    return {"comm_share": comm_s / step_s if step_s > 0 else None,
            "timed_collectives_per_step": reduces / steps if steps else 0.0,
            "step_broadcast_us_avg": after.get("step_broadcast_us_avg"),
            "step_encode_us_avg": after.get("step_encode_us_avg")}


def pp_delta(before: dict, after: dict, wall_s: float) -> dict | None:
    """Per-stage busy seconds over this run's wall time; None without pipeline parallelism."""
    if not after or "pp_stage_busy_seconds_total" not in after:
        return None
    b0 = before.get("pp_stage_busy_seconds_total") or [0.0] * len(after["pp_stage_busy_seconds_total"])
    busy = [a - b for a, b in zip(after["pp_stage_busy_seconds_total"], b0)]
    s0 = before.get("pp_stage_steps_total") or [0.0] * len(after["pp_stage_steps_total"])
    return {"stage_busy_ratio": [x / wall_s if wall_s > 0 else 0.0 for x in busy],
            "stage_steps": [a - b for a, b in zip(after["pp_stage_steps_total"], s0)],
            "recent_busy_ratio": after.get("pp_stage_busy_ratio"),
            "micro_batches_in_flight_avg": after.get("pp_micro_batches_in_flight_avg")}


def one_run(args: argparse.Namespace, tp: int, pp: int, save) -> dict:
    """Everything measured for one layout (runs in a child process); save(result) after each
    measurement, so a run killed later still leaves what it measured."""
    from shardserve import LLM, SamplingParams

    name = layout_name(tp, pp)
    max_len = max(args.input_len + args.output_len, 64 + args.decode_tokens) + 16
    result: dict = {"layout": name, "tp": tp, "pp": pp}
    start = time.perf_counter()
    llm = LLM(args.model_dir, tensor_parallel_size=tp, pipeline_parallel_size=pp,
              dtype=args.dtype, device=args.device,
              max_model_len=max_len, max_num_seqs=args.max_num_seqs,
              gpu_memory_utilization=args.gpu_memory_utilization,
              enforce_eager=args.enforce_eager, **args.engine_args)
    result.update(startup_s=time.perf_counter() - start,
                  num_kv_blocks=llm.config.cache_config.num_blocks,
                  block_size=llm.config.cache_config.block_size)
    log(f"{name}: engine ready in {result['startup_s']:.1f} s, {result['num_kv_blocks']} KV blocks")
    save(result)
    executor = llm.engine.core.executor

    def comm() -> dict:
        return executor.comm_stats()

    def pstats() -> dict:
        getter = getattr(executor, "pipeline_stats", None)
        return getter() if getter else {}

    vocab = int(llm.config.model_config.hf_config.vocab_size)
    greedy = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    llm.generate(random_prompts(2, 16, vocab, 99), greedy, use_tqdm=False)  # warm-up

    outs = llm.generate(random_prompts(8, 64, vocab, 1), greedy, use_tqdm=False)
    result["greedy_tokens"] = [list(o.outputs[0].token_ids) for o in outs]
    save(result)

    prompt = random_prompts(1, 32, vocab, 2)

    def timed(n: int) -> float:
        params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
        t0 = time.perf_counter()
        llm.generate(prompt, params, use_tqdm=False)
        return time.perf_counter() - t0

    timed(args.decode_tokens)  # warm-up at this length
    t1 = min(timed(1) for _ in range(3))
    before, pp_before = comm(), pstats()
    tn = timed(args.decode_tokens)
    result["batch1_decode_tok_s"] = (args.decode_tokens - 1) / (tn - t1)
    result["batch1_comm"] = comm_delta(before, comm())
    result["batch1_pp"] = pp_delta(pp_before, pstats(), tn)
    log(f"{name}: batch-1 decode {result['batch1_decode_tok_s']:.1f} tok/s; "
        f"comm {_share(result['batch1_comm'])}; pp {_busy(result['batch1_pp'])}")
    save(result)

    if not args.skip_throughput:
        prompts = random_prompts(args.num_prompts, args.input_len, vocab, 3)
        params = SamplingParams(temperature=1.0, max_tokens=args.output_len, ignore_eos=True)
        log(f"{name}: throughput run, {args.num_prompts} x ({args.input_len} in / "
            f"{args.output_len} out)")
        before, pp_before = comm(), pstats()
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - t0
        num_out = sum(len(o.outputs[0].token_ids) for o in outs)
        result["throughput"] = {"elapsed_s": elapsed, "output_tok_s": num_out / elapsed,
                                "total_tok_s": (num_out + args.num_prompts * args.input_len)
                                / elapsed,
                                "comm": comm_delta(before, comm()),
                                "pp": pp_delta(pp_before, pstats(), elapsed)}
        t = result["throughput"]
        log(f"{name}: throughput {t['output_tok_s']:.1f} output tok/s in {elapsed:.1f} s; "
            f"comm {_share(t['comm'])}; pp {_busy(t['pp'])}")
        save(result)
    llm.shutdown()
    return result


def _die_with_parent() -> None:
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _kill_group(proc: subprocess.Popen, grace_s: float = 15.0) -> None:
    """SIGTERM the child's process group, SIGKILL it after grace_s; wait until it is gone."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 15.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            proc.poll()
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.5)


_CURRENT: list[subprocess.Popen] = []
_TERMINATED: list[int] = []


def _on_term(signum, frame) -> None:
    """The outer `timeout` (or the lead) stops us: stop the child's whole group, then let the
    main loop record what the layout measured and end."""
    _TERMINATED.append(signum)
    import threading

    for proc in list(_CURRENT):  # no waiting here: the main thread's wait() holds the child
        _signal_group(proc.pid, signal.SIGTERM)
        threading.Timer(5.0, _signal_group, (proc.pid, signal.SIGKILL)).start()


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def run_layout(args: argparse.Namespace, tp: int, pp: int, timeout_s: float | None) -> dict:
    """Run one layout in a child process (own process group); the record, whatever happened."""
    name = layout_name(tp, pp)
    fd, path = tempfile.mkstemp(suffix=".json", prefix=f"tp_scaling_{name}_")
    os.close(fd)
    argv = [a for a in sys.argv[1:]]
    log(f"{name}: starting" + (f" (timeout {timeout_s:.0f} s)" if timeout_s else ""))
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), *argv,
                             "--one-run", name, "--result-file", path],
                            start_new_session=True, preexec_fn=_die_with_parent)
    _CURRENT.append(proc)
    status = "ok"
    try:
        code = proc.wait(timeout=timeout_s)
        if _TERMINATED:
            status = "killed"
            log(f"{name}: stopped by signal {_TERMINATED[0]} (exit code {code})")
        elif code != 0:
            status = "failed"
            log(f"{name}: the run failed with exit code {code}")
    except subprocess.TimeoutExpired:
        status, code = "timeout", None
        log(f"{name}: still running after {timeout_s:.0f} s: killing its processes")
        _kill_group(proc)
    finally:
        _kill_group(proc, grace_s=5.0)  # stragglers (worker processes) of a finished run
        _CURRENT.remove(proc)
    record: dict = {"layout": name, "tp": tp, "pp": pp}
    try:
        with open(path) as f:
            record.update(json.load(f))
    except (OSError, ValueError):
        pass
    os.unlink(path)
    record.update(kind="tp_scaling", status=status, exit_code=code,
                  wall_s=time.monotonic() - start, workload=workload(args),
                  date=time.strftime("%Y-%m-%dT%H:%M:%S"))
    return record


def workload(args: argparse.Namespace) -> dict:
    return {"model_dir": args.model_dir, "dtype": args.dtype, "device": args.device,
            "engine_args": args.engine_args,
            "enforce_eager": args.enforce_eager, "decode_tokens": args.decode_tokens,
            "num_prompts": args.num_prompts, "input_len": args.input_len,
            "output_len": args.output_len, "max_num_seqs": args.max_num_seqs}


def read_jsonl(path: str) -> list[dict]:
    out = []
    try:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        out.append(json.loads(line))
                    except ValueError:
                        pass
    except OSError:
        log(f"no earlier records in {path}")
    return out


def main() -> None:
    args = parse_args()
    if args.one_run is not None:
        tp, pp = parse_layouts(args.one_run)[0]

        def save(result: dict) -> None:
            tmp = args.result_file + ".tmp"
            with open(tmp, "w") as f:
                json.dump(result, f)
            os.replace(tmp, args.result_file)

        save(one_run(args, tp, pp, save))
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)  # don't wait on leftover threads of a finished engine

    signal.signal(signal.SIGTERM, _on_term)
    if not os.path.exists(os.path.join(args.model_dir, "config.json")):
        # In a child process: a CUDA context (and cached blocks) kept here would shrink every
        # layout's KV cache on GPU 0.
        overrides = {"num_hidden_layers": args.num_layers} if args.num_layers else {}
        log(f"writing a random {args.preset} model to {args.model_dir} {overrides}")
        code = ("import sys; from shardserve.testing import write_random_model; "
                f"write_random_model({args.model_dir!r}, preset={args.preset!r}, "
                f"device={'cuda' if args.device == 'cuda' else 'cpu'!r}, "
                f"weights={args.engine_args.get('load_format') != 'dummy'}, **{overrides!r})")
        subprocess.run([sys.executable, "-c", code], check=True)

    prior = [r for path in args.prior_jsonl for r in read_jsonl(path)
             if r.get("kind") == "tp_scaling" and r.get("workload") == workload(args)]
    if prior:
        log(f"earlier records: {', '.join(r['layout'] + ' ' + r['status'] for r in prior)}")
    started = time.monotonic()
    results = []
    for tp, pp in args.layout_list:
        if _TERMINATED:
            break
        timeout_s = args.timeout_s
        if args.budget_s is not None:
            left = args.budget_s - (time.monotonic() - started) - 5.0
            if left < 30:
                log(f"{layout_name(tp, pp)}: skipped, {left:.0f} s left of --budget-s")
                record = {"kind": "tp_scaling", "layout": layout_name(tp, pp), "tp": tp, "pp": pp,
                          "status": "skipped", "workload": workload(args)}
                results.append(record)
                _append(args.jsonl, record)
                continue
            timeout_s = min(timeout_s or left, left)
        record = run_layout(args, tp, pp, timeout_s)
        results.append(record)
        _append(args.jsonl, record)
    shown = prior + results
    if not any("batch1_decode_tok_s" in r or "greedy_tokens" in r for r in shown):
        log("no layout produced a result")
        sys.exit(1)
    report(args, shown)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"kind": "tp_scaling_report", "args": {k: v for k, v in vars(args).items()
                                                             if k != "layout_list"},
                       "results": shown}, f, indent=2)
    if _TERMINATED:
        sys.exit(128 + _TERMINATED[0])
    if any(r["status"] != "ok" for r in results):
        sys.exit(3)


def _append(paths: list[str], record: dict) -> None:
    for path in paths:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


def report(args: argparse.Namespace, results: list[dict]) -> None:
    with_tokens = [r for r in results if r.get("greedy_tokens")]
    base = with_tokens[0] if with_tokens else results[0]
    b1_base = next((r["batch1_decode_tok_s"] for r in results if r.get("batch1_decode_tok_s")), None)
    tput_base = next((r["throughput"]["output_tok_s"] for r in results if r.get("throughput")), None)
    print()
    print(f"{args.model_dir} ({args.dtype}, {args.device})"
          f"{', eager' if args.enforce_eager else ', CUDA graphs'}; batch-1 decode of "
          f"{args.decode_tokens} tokens; throughput {args.num_prompts} x ({args.input_len} in / "
          f"{args.output_len} out)")
    print(f"{'TPxPP':>6} {'status':>8} {'start s':>8} {'KV blocks':>10} {'b1 tok/s':>9} "
          f"{'speed-up':>9} {'b1 comm':>8} {'out tok/s':>10} {'speed-up':>9} {'tput comm':>10} "
          f"{'PP busy':>12} {'greedy match':>13}")
    for r in results:
        tput = r.get("throughput") or {}
        b1 = r.get("batch1_decode_tok_s")
        out = tput.get("output_tok_s")
        match = (_agreement(base["greedy_tokens"], r["greedy_tokens"])
                 if r.get("greedy_tokens") and base.get("greedy_tokens") else "-")
        print(f"{r['layout']:>6} {r.get('status', '?'):>8} {_num(r.get('startup_s'), 8, 1)} "
              f"{r.get('num_kv_blocks', '-'):>10} {_num(b1, 9, 1)} {_ratio(b1, b1_base)} "
              f"{_share(r.get('batch1_comm')):>8} {_num(out, 10, 1)} {_ratio(out, tput_base)} "
              f"{_share(tput.get('comm')):>10} {_busy(tput.get('pp') or r.get('batch1_pp')):>12} "
              f"{match:>13}")
    print(f"comm = time in TP collectives / step time on the driver rank (n/a: TP 1, or the "
          f"steps ran in CUDA graphs; see --enforce-eager). PP busy = each stage's busy time / "
          f"wall time of the throughput run. greedy match = tokens equal to {base['layout']}'s "
          f"before the first difference, summed over 8 prompts x 32.")


def _num(x, width: int, digits: int) -> str:
    return f"{x:>{width}.{digits}f}" if isinstance(x, (int, float)) else f"{'-':>{width}}"


def _ratio(x, base) -> str:
    return f"{x / base:>8.2f}x" if x and base else f"{'-':>9}"


def _busy(pp: dict | None) -> str:
    if not pp or not pp.get("stage_busy_ratio"):
        return "n/a"
    return "/".join(f"{b:.2f}" for b in pp["stage_busy_ratio"])


def _share(comm: dict | None) -> str:
    if not comm or comm.get("comm_share") is None or comm["timed_collectives_per_step"] < 2:
        return "n/a"
    return f"{100 * comm['comm_share']:.1f}%"


def _agreement(base: list[list[int]], other: list[list[int]]) -> str:
    same = 0
    for a, b in zip(base, other):
        for x, y in zip(a, b):
            if x != y:
                break
            same += 1
    return f"{same}/{sum(len(a) for a in base)}"


if __name__ == "__main__":
    main()
