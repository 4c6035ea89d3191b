"""Online serving under load, one server config after another: start `shardserve serve`, wait
for /health, run `shardserve bench serve` at each request rate, read /metrics, stop the server.

    python benchmarks/serve_layouts.py --model /tmp/llama3-8b \\
        --config "tp1=" --rates 4:120,16,inf --num-prompts 200 --input-len 512 --output-len 128 \\
        --json out/serve_tp1.json --log-dir out/serve_logs
    # DP 2 (two replicas behind the router) against TP 2 on the same workload
    python benchmarks/serve_layouts.py --model /tmp/llama3-8b \\
        --config "dp2=-dp 2" --config "tp2=-tp 2" --rates inf,12:300 --json out/dp_vs_tp.json

--config NAME=FLAGS is repeatable (FLAGS: extra `serve` flags, shell-quoted; empty for the
defaults); --configs "NAME=FLAGS;NAME=FLAGS" gives several at once. --server-flags are added to
every config (e.g. --max-model-len 2048). A rate is requests/s with Poisson arrivals, or inf
(all at once); RATE:N sends N prompts at that rate instead of --num-prompts (so a slow rate
stays short). Before the measured rates a warm-up run (--warmup-prompts, rate inf, not
recorded) compiles the Triton kernels, so their first-use compile does not land in TTFT P99.

Per config and rate: requests/s, output tokens/s, TTFT and TPOT P50/P99 (ms), failures; per
config: start-up seconds and, from each server's /metrics (each replica's under -dp, found
through the router's /backends), GPU memory in use and the TP communication / PP stage busy
gauges; nvidia-smi's memory figure where it exists. Everything is bounded: --start-timeout-s
for /health, --bench-timeout-s per rate, --stop-timeout-s from SIGTERM to SIGKILL of the
server's process group, --budget-s for the whole run (rates that no longer fit are skipped).
A config that fails to start is reported (the tail of its log) and skipped. The JSON (--json)
is rewritten after every rate, so a killed run still leaves what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="model folder (or .gguf) to serve")
    p.add_argument("--config", action="append", default=[], metavar="NAME=FLAGS",
                   help="a server config: its name and extra serve flags (repeatable)")
    p.add_argument("--configs", default=None, metavar="'NAME=FLAGS;...'",
                   help="several configs, ';'-separated")
    p.add_argument("--server-flags", default="", help="serve flags added to every config")
    p.add_argument("--rates", default="inf", help="comma-separated RATE or RATE:NUM_PROMPTS")
    p.add_argument("--num-prompts", type=int, default=200)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--warmup-prompts", type=int, default=16, help="0: no warm-up run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0: a free port per config")
    p.add_argument("--start-timeout-s", type=float, default=300.0)
    p.add_argument("--bench-timeout-s", type=float, default=300.0, help="per rate")
    p.add_argument("--stop-timeout-s", type=float, default=30.0)
    p.add_argument("--budget-s", type=float, default=None,
                   help="the whole run; a rate is skipped when less than its estimate is left")
    p.add_argument("--json", default=None)
    p.add_argument("--log-dir", default=None, help="server and bench logs (default: a temp dir)")
    p.add_argument("--label", default="", help="free text kept in the JSON (e.g. the GPU)")
    args = p.parse_args(argv)
    try:
        args.config_list = parse_configs(args.config, args.configs)
        args.rate_list = parse_rates(args.rates, args.num_prompts)
    except ValueError as err:
        p.error(str(err))
    if not args.config_list:
        p.error("give at least one --config NAME=FLAGS (or --configs)")
    return args


def parse_configs(items: list[str], joined: str | None) -> list[tuple[str, list[str]]]:
    """['tp1=', 'dp2=-dp 2'] and 'a=..;b=..' -> [(name, [flags...]), ...]."""
    raw = list(items) + ([c for c in joined.split(";")] if joined else [])
    out = []
    for item in (c.strip() for c in raw):
        if not item:
            continue
        name, sep, flags = item.partition("=")
        if not sep:  # tolerate NAME:FLAGS too
            name, sep, flags = item.partition(":")
        name = name.strip()
        if not name or not re.fullmatch(r"[\w.+-]+", name):
            raise ValueError(f"bad config {item!r}: use NAME=FLAGS, e.g. 'tp2=-tp 2'")
        out.append((name, shlex.split(flags)))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise ValueError(f"config names repeat: {names}")
    return out


def parse_rates(text: str, num_prompts: int) -> list[tuple[float, int]]:
    out = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        rate, _, num = item.partition(":")
        try:
            r = float(rate)
            n = int(num) if num else num_prompts
        except ValueError:
            raise ValueError(f"bad rate {item!r}: use RATE or RATE:NUM_PROMPTS") from None
        if r <= 0 or n <= 0:
            raise ValueError(f"bad rate {item!r}: both must be positive")
        out.append((r, n))
    if not out:
        raise ValueError("no rates given")
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    """(status, body); status 0 when nothing answered."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace") if err.fp else ""
    except (OSError, ValueError):
        return 0, ""


def tail(path: str, n: int = 25) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


class Server:
    """One `shardserve serve` process group: start, wait until ready, stop."""

    def __init__(self, name: str, argv: list[str], log_path: str, base_url: str) -> None:
        self.name, self.argv, self.log_path, self.base_url = name, argv, log_path, base_url
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self._log = open(self.log_path, "w")
        self._log.write("$ " + shlex.join(self.argv) + "\n")
        self._log.flush()
        self.proc = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True, preexec_fn=_die_with_parent)

    def wait_ready(self, timeout_s: float) -> tuple[bool, str]:
        """Poll /health (and, behind a router, until every replica is healthy)."""
        start = time.monotonic()
        last_print = start
        healthy_since = None
        while True:
            elapsed = time.monotonic() - start
            if _TERMINATED:
                return False, f"stopped by signal {_TERMINATED[0]}"
            if self.proc.poll() is not None:
                return False, f"the server exited with code {self.proc.returncode}"
            if elapsed > timeout_s:
                return False, f"not ready after {timeout_s:.0f} s"
            status, _ = http_get(self.base_url + "/health", timeout=3)
            if status == 200:
                healthy_since = healthy_since or time.monotonic()
                backends = self.backends()
                if backends is None or all(b.get("healthy") for b in backends):
                    return True, "ready"
                for b in backends:  # a replica that died while starting never comes up
                    if not b.get("healthy") and b.get("pid") and not _pid_alive(b["pid"]):
                        return False, (f"replica {b.get('url')} (pid {b['pid']}) exited: "
                                       f"{b.get('status')}")
                # Some replicas up, others still loading: wait for all (bounded).
            if time.monotonic() - last_print >= 15:
                last_print = time.monotonic()
                log(f"{self.name}: waiting for /health ({elapsed:.0f} s, status {status}); "
                    f"log: {_last_line(self.log_path)}")
            time.sleep(1.0)

    def backends(self) -> list[dict] | None:
        """The router's replicas (serve -dp), or None for a plain server."""
        status, body = http_get(self.base_url + "/backends", timeout=3)
        if status != 200:
            return None
        try:
            data = json.loads(body)
        except ValueError:
            return None
        return data if isinstance(data, list) else None

    def stop(self, timeout_s: float) -> str:
        """SIGTERM (the server drains, then exits), SIGKILL the group after timeout_s; wait
        until every process of the group is gone (so the GPUs are free for the next config)."""
        if self.proc is None:
            return "not started"
        how = "exited"
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # the leader drains its replicas/workers
            try:
                self.proc.wait(timeout_s)
                how = f"stopped by SIGTERM (code {self.proc.returncode})"
            except subprocess.TimeoutExpired:
                how = f"SIGKILL after {timeout_s:.0f} s"
        # Whatever is left of the group (replicas, workers): SIGTERM, then SIGKILL.
        for sig, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 20.0)):
            if not _group_alive(self.proc.pid):
                break
            _signal_group(self.proc.pid, sig)
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline and _group_alive(self.proc.pid):
                self.proc.poll()
                time.sleep(0.5)
        if _group_alive(self.proc.pid):
            how += "; some processes of its group are still alive"
        self._log.close()
        return how


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (OSError, ValueError):
        return True
    try:  # a zombie (exited, not yet reaped by the router) is gone too
        with open(f"/proc/{int(pid)}/stat") as fh:
            return fh.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie leader still counts for killpg; look for a live member in /proc instead.
    try:
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
        return False
    except OSError:
        return True


def _die_with_parent() -> None:
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _last_line(path: str) -> str:
    lines = [line for line in tail(path, 5).splitlines() if line.strip()]
    return lines[-1][-160:] if lines else "(empty)"


_METRICS = ("gpu_memory_used_bytes", "gpu_memory_total_bytes", "tp_comm_time_ratio",
            "pp_stage_busy_ratio", "num_preemptions_total", "kv_cache_usage_perc")


def scrape_metrics(base_url: str) -> dict:
    """The gauges we report from one server's /metrics: {name{labels}: value}."""
    status, body = http_get(base_url + "/metrics", timeout=10)
    if status != 200:
        return {"error": f"/metrics answered {status}"}
    out = {}
    for line in body.splitlines():
        if line.startswith("#"):
            continue
        m = re.match(r"shardserve:(\w+)(\{[^}]*\})?\s+(\S+)", line)
        if m and m.group(1) in _METRICS:
            labels = re.sub(r',?model_name="[^"]*"', "", m.group(2) or "").replace("{,", "{")
            key = m.group(1) + ("" if labels in ("", "{}") else labels)
            try:
                out[key] = float(m.group(3))
            except ValueError:
                pass
    return out


def gpu_memory_by_gpu(metrics: dict) -> dict[str, float]:
    """{gpu label: GiB} of shardserve:gpu_memory_used_bytes. Note: with pynvml the engine
    reports every GPU of the host (NVML ignores CUDA_VISIBLE_DEVICES), so under -dp each
    replica shows the other's GPU too; nvidia-smi's figure below is the one to compare."""
    out = {}
    for key, value in metrics.items():
        m = re.match(r'gpu_memory_used_bytes\{gpu="([^"]*)"\}', key)
        if m:
            out[m.group(1)] = value / 2**30
    return out


def visible_gpus() -> set[int] | None:
    text = os.environ.get("CUDA_VISIBLE_DEVICES")
    if not text:
        return None
    try:
        return {int(x) for x in text.split(",") if x.strip()}
    except ValueError:  # UUIDs: keep every GPU
        return None


def nvidia_smi_memory() -> list[dict] | None:
    """Memory used per GPU (those in CUDA_VISIBLE_DEVICES only), or None without nvidia-smi."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index,memory.used,memory.total",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True,
                             timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    rows = []
    for line in out.stdout.strip().splitlines():
        parts = [x.strip() for x in line.split(",")]
        if len(parts) == 3:
            rows.append({"gpu": int(parts[0]), "used_mib": float(parts[1]),
                         "total_mib": float(parts[2])})
    keep = visible_gpus()
    return [r for r in rows if keep is None or r["gpu"] in keep]


def gpu_processes() -> list[dict]:
    """Compute processes on any GPU (pid, MiB, command line), from nvidia-smi."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True,
                             timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return []
    procs = []
    for line in out.stdout.strip().splitlines():
        parts = [x.strip() for x in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit():
            try:
                with open(f"/proc/{parts[0]}/cmdline", "rb") as fh:
                    cmd = fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
            except OSError:
                cmd = "?"
            procs.append({"pid": int(parts[0]), "used_mib": parts[1], "cmd": cmd[:200]})
    return procs


def wait_for_free_gpus(timeout_s: float, busy_mib: float = 2048.0) -> dict:
    """Until every visible GPU uses less than busy_mib (or timeout_s): returns how long it
    took and, if it timed out, the processes that held memory (those of an earlier shardserve
    run are then killed, so one stuck config cannot spoil every later one)."""
    start = time.monotonic()
    while True:
        mem = nvidia_smi_memory()
        if mem is None:
            return {"waited_s": 0.0, "note": "no nvidia-smi"}
        busy = {r["gpu"]: r["used_mib"] for r in mem if r["used_mib"] >= busy_mib}
        waited = time.monotonic() - start
        if not busy:
            if waited > 1:
                log(f"GPUs free after {waited:.0f} s")
            return {"waited_s": round(waited, 1)}
        if waited >= timeout_s:
            procs = gpu_processes()
            log(f"GPUs still in use after {waited:.0f} s: {busy} MiB; processes: {procs}")
            for p in procs:
                if "shardserve" in p["cmd"] or "multiprocessing" in p["cmd"]:
                    try:
                        os.kill(p["pid"], signal.SIGKILL)
                    except OSError:
                        pass
            time.sleep(5)
            return {"waited_s": round(waited, 1), "busy_mib": busy, "holders": procs,
                    "killed": True}
        time.sleep(1.0)


def run_bench(args, base_url: str, rate: float, num: int, out_json: str, log_path: str,
              timeout_s: float, seed: int) -> tuple[dict | None, str]:
    """One `shardserve bench serve` run. Each run gets its own seed, so the prefix cache never
    holds its prompts from an earlier run (warm-up or another rate)."""
    cmd = [sys.executable, "-m", "shardserve.cli", "bench", "serve", "--base-url", base_url,
           "--num-prompts", str(num), "--input-len", str(args.input_len), "--output-len",
           str(args.output_len), "--request-rate", "inf" if rate == float("inf") else f"{rate:g}",
           "--seed", str(seed), "--save-result", out_json,
           "--timeout", str(max(30.0, timeout_s))]
    if args.max_concurrency:
        cmd += ["--max-concurrency", str(args.max_concurrency)]
    with open(log_path, "a") as f:
        f.write("$ " + shlex.join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=_die_with_parent)
        _CHILDREN.append(proc)
        try:
            code = proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait(10)
            return None, f"bench timed out after {timeout_s:.0f} s"
        finally:
            _CHILDREN.remove(proc)
    if code != 0 and not os.path.exists(out_json):
        return None, f"bench exited with code {code}: {_last_line(log_path)}"
    try:
        with open(out_json) as f:
            return json.load(f), "ok" if code == 0 else f"bench exited with code {code}"
    except (OSError, ValueError) as err:
        return None, f"no bench result: {err}"


_CHILDREN: list[subprocess.Popen] = []
_SERVERS: list[Server] = []
_TERMINATED: list[int] = []


def _on_term(signum, frame) -> None:
    """Stopped from outside (an outer `timeout`): take the server and the bench down with us;
    the main loop then writes what it has and exits."""
    _TERMINATED.append(signum)
    for proc in list(_CHILDREN):
        _signal_group(proc.pid, signal.SIGKILL)
    for server in list(_SERVERS):
        if server.proc is not None:
            _signal_group(server.proc.pid, signal.SIGTERM)
            threading.Timer(5.0, _signal_group, (server.proc.pid, signal.SIGKILL)).start()


def estimate_s(rate: float, num: int, args) -> float:
    """A floor on a rate's run time, to skip rates that cannot finish in the budget."""
    arrivals = 0.0 if rate == float("inf") else num / rate
    return arrivals + 10.0


def main() -> int:
    args = parse_args()
    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGINT, _on_term)
    started = time.monotonic()
    log_dir = args.log_dir or os.path.join("/tmp", f"serve_layouts_{os.getpid()}")
    os.makedirs(log_dir, exist_ok=True)
    doc: dict = {"kind": "serve_layouts", "label": args.label, "model": args.model,
                 "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
                 "workload": {"input_len": args.input_len, "output_len": args.output_len,
                              "num_prompts": args.num_prompts,
                              "max_concurrency": args.max_concurrency},
                 "server_flags": args.server_flags, "configs": [], "results": []}

    def save() -> None:
        if args.json:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            tmp = args.json + ".tmp"
            with open(tmp, "w") as f:
                json.dump(doc, f, indent=2)
            os.replace(tmp, args.json)

    def left() -> float:
        return float("inf") if args.budget_s is None else args.budget_s - (time.monotonic() - started)

    for name, flags in args.config_list:
        if _TERMINATED:
            break
        entry: dict = {"config": name, "flags": shlex.join(flags), "status": "pending"}
        doc["configs"].append(entry)
        if left() < 60:
            entry["status"] = "skipped (budget)"
            log(f"{name}: skipped, {left():.0f} s left of --budget-s")
            save()
            continue
        # The last config's ranks run in process groups of their own and free their GPU
        # memory as they exit; a server started before that sizes its KV cache from what is
        # left (0 blocks, seen on 4 x H200). Wait for the GPUs, and say who held them.
        entry["gpu_wait"] = wait_for_free_gpus(min(120.0, max(left() - 60, 5)))
        port = args.port or free_port()
        base_url = f"http://{args.host}:{port}"
        argv = [sys.executable, "-m", "shardserve.cli", "serve", "--model", args.model,
                "--host", args.host, "--port", str(port),
                *shlex.split(args.server_flags), *flags]
        server_log = os.path.join(log_dir, f"server_{name}.log")
        bench_log = os.path.join(log_dir, f"bench_{name}.log")
        server = Server(name, argv, server_log, base_url)
        log(f"{name}: starting: {shlex.join(argv[1:])}")
        t0 = time.monotonic()
        server.start()
        _SERVERS.append(server)
        try:
            ok, why = server.wait_ready(min(args.start_timeout_s, max(left() - 30, 10)))
            entry["startup_s"] = time.monotonic() - t0
            if not ok or _TERMINATED:
                entry["status"] = f"failed to start: {why}"
                entry["log_tail"] = tail(server_log)
                log(f"{name}: {entry['status']}; the log ends:\n{entry['log_tail']}")
                save()
                continue
            log(f"{name}: ready in {entry['startup_s']:.1f} s")
            backends = server.backends()
            entry["replicas"] = [b.get("url") for b in backends] if backends else None
            if args.warmup_prompts:
                wtimeout = min(args.bench_timeout_s, max(left() - 20, 10))
                res, why = run_bench(args, base_url, float("inf"), args.warmup_prompts,
                                     os.path.join(log_dir, f"warmup_{name}.json"), bench_log,
                                     wtimeout, seed=args.seed + 1000)
                log(f"{name}: warm-up {why}" + (f", {res['completed']} done" if res else ""))
            entry["status"] = "ok"
            for k, (rate, num) in enumerate(args.rate_list):
                if _TERMINATED:
                    break
                row = {"config": name, "rate": rate if rate != float("inf") else "inf",
                       "num_prompts": num}
                est = estimate_s(rate, num, args)
                if left() - args.stop_timeout_s < est:
                    row["status"] = f"skipped (budget: {left():.0f} s left, needs >= {est:.0f})"
                    log(f"{name} rate {rate:g}: {row['status']}")
                    doc["results"].append(row)
                    save()
                    continue
                log(f"{name}: rate {rate:g} req/s, {num} x ({args.input_len} in / "
                    f"{args.output_len} out)")
                out_json = os.path.join(log_dir, f"bench_{name}_rate{rate:g}.json")
                timeout_s = min(args.bench_timeout_s, max(left() - args.stop_timeout_s, 10))
                res, why = run_bench(args, base_url, rate, num, out_json, bench_log, timeout_s,
                                     seed=args.seed + k)
                row["status"] = f"killed (signal {_TERMINATED[0]})" if _TERMINATED else why
                if res:
                    row.update({k: res.get(k) for k in (
                        "completed", "failed", "duration", "request_throughput",
                        "output_throughput", "total_token_throughput", "median_ttft_ms",
                        "p99_ttft_ms", "mean_ttft_ms", "median_tpot_ms", "p99_tpot_ms",
                        "mean_tpot_ms", "median_itl_ms", "p99_itl_ms", "median_e2el_ms",
                        "p99_e2el_ms", "first_errors")})
                    log(f"{name} rate {rate:g}: {res['request_throughput']:.2f} req/s, "
                        f"{res['output_throughput']:.0f} out tok/s, TTFT P50/P99 "
                        f"{res['median_ttft_ms']:.0f}/{res['p99_ttft_ms']:.0f} ms, TPOT P50/P99 "
                        f"{res['median_tpot_ms']:.1f}/{res['p99_tpot_ms']:.1f} ms, "
                        f"{res['failed']} failed")
                else:
                    log(f"{name} rate {rate:g}: {why}")
                doc["results"].append(row)
                save()
            # Memory and parallel gauges after the load (each replica's under -dp).
            urls = entry.get("replicas") or [base_url]
            entry["metrics"] = {u: scrape_metrics(u) for u in urls}
            entry["metrics_gpu_memory_gib"] = {u: gpu_memory_by_gpu(m)
                                               for u, m in entry["metrics"].items()}
            entry["nvidia_smi"] = nvidia_smi_memory()
            smi = entry["nvidia_smi"]
            entry["gpu_memory_used_gib"] = (sum(r["used_mib"] for r in smi) / 1024 if smi
                                            else None)
            log(f"{name}: GPU memory in use: nvidia-smi {smi}; server /metrics (GiB by GPU, "
                f"per server): {entry['metrics_gpu_memory_gib']}")
            save()
        finally:
            how = server.stop(args.stop_timeout_s)
            _SERVERS.remove(server)
            entry["stop"] = how
            log(f"{name}: {how}")
            save()
    print_table(doc)
    save()
    if _TERMINATED:
        return 128 + _TERMINATED[0]
    ok = any(r.get("completed") for r in doc["results"])
    return 0 if ok else 1


def print_table(doc: dict) -> None:
    w = doc["workload"]
    print(f"\n{doc['model']}: random prompts of {w['input_len']} tokens, {w['output_len']} "
          f"output tokens (ignore_eos); server flags: {doc['server_flags'] or '-'}")
    print(f"{'config':<10} {'rate':>6} {'reqs':>5} {'req/s':>7} {'out tok/s':>10} "
          f"{'TTFT P50':>9} {'TTFT P99':>9} {'TPOT P50':>9} {'TPOT P99':>9} {'fail':>5}  status")
    for r in doc["results"]:
        def f(key, width, digits):
            v = r.get(key)
            return f"{v:>{width}.{digits}f}" if isinstance(v, (int, float)) else f"{'-':>{width}}"
        rate = r["rate"] if isinstance(r["rate"], str) else f"{r['rate']:g}"
        print(f"{r['config']:<10} {rate:>6} {r['num_prompts']:>5} "
              f"{f('request_throughput', 7, 2)} {f('output_throughput', 10, 0)} "
              f"{f('median_ttft_ms', 9, 0)} {f('p99_ttft_ms', 9, 0)} {f('median_tpot_ms', 9, 1)} "
              f"{f('p99_tpot_ms', 9, 1)} {str(r.get('failed', '-')):>5}  {r.get('status', '')}")
    for c in doc["configs"]:
        mem = c.get("gpu_memory_used_gib")
        by_server = "; ".join(", ".join(f"gpu{g} {v:.1f}" for g, v in sorted(m.items()))
                              for m in (c.get("metrics_gpu_memory_gib") or {}).values() if m)
        print(f"  {c['config']}: {c['status']}; start-up {c.get('startup_s', float('nan')):.0f} s; "
              f"GPU memory in use (nvidia-smi, visible GPUs) "
              f"{f'{mem:.1f} GiB' if mem is not None else 'n/a'}"
              f"{f' (server /metrics GiB: {by_server})' if by_server else ''}; "
              f"flags '{c['flags']}'")
    print("TTFT / TPOT in ms (TPOT excludes the first token).")


if __name__ == "__main__":
    sys.exit(main())
