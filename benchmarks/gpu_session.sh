#!/usr/bin/env bash
# One bounded GPU session on 2 x H200, in phases of at most ~9 minutes (a device call is
# killed at 600 s). Run one phase per call, in this order:
#
#   phase      minutes  what
#   single     ~8       GPU0: write the Llama-3-8B-shaped bf16 model to $MODEL8B (~1 min, once),
#                       then tp_scaling 1x1 on 1000 x (1000 in / 1000 out) (~3.5 min), then
#                       serve_layouts tp1 at rates 4, 16, inf, 512 in / 128 out (~2.5 min; issue 4).
#                       GPU1 at the same time: planner_vs_measured for llama-3-8b and qwen3-8b at
#                       2048 / 8192 batched tokens (~2 min), write the DeepSeek-V2-Lite-shaped model
#                       to $DSDIR (~2 min, once), its single-GPU run vs transformers, reduced (~3 min).
#   layouts    ~6.5     tp_scaling 2x1 then 1x2 on the same 1000 x (1000/1000) workload; the 1x1 record
#                       of phase `single` (kept in $SESSION_DIR) is the base of the table (issue 7).
#   dp         ~8.5     serve_layouts DP 2 (-dp 2, two replicas behind the router) vs TP 2 on one
#                       workload, rate inf and one finite rate (~4 min; issue 7); then DeepSeek-V2-Lite
#                       EP 2 vs TP 2, reduced sizes (~4 min; cut by the phase budget if late).
#   x4         ~6       4 x H200 (issue 11's 4-GPU part): the Llama-3-8B shape with random weights
#                       (--load-format dummy, nothing written) served as TP 4, TP 2 x PP 2,
#                       TP 2 x DP 2 and DP 4 at $X4_RATES, then memory per GPU vs the planner.
#   x4-70b     ~7       4 x H200: the Llama-3.1-70B shape (dummy weights) as TP 4 and TP 2 x PP 2.
#   x4-final   ~9       4 x H200, one job per GPU pair at once: GPU 0 the one-GPU 8B comparison
#                       with transformers (issue 3); GPU 1 DeepSeek-V2-Lite 1000 x (1000/1000)
#                       against transformers (issue 9); GPUs 2,3 the custom all-reduce test and
#                       benchmark, TP 2 batch-1 decode with it on and off (issue 5), then the
#                       70B shape as TP 2 under load (issue 11).
#   check      ~6       2 x H200: compiled kernel tests, tests/gpu, batch-1 timelines at TP 1 and
#                       TP 2 (decode_timeline.py): what to run first after kernel changes.
#   extra phases: layouts-1x1 (~4: the 1x1 run alone, if `single` lost it), ep (~5: the DeepSeek
#                 EP-vs-TP part alone, if `dp` ran out of time), summary (tables of $OUT and of
#                 everything kept in $SESSION_DIR).
#
# Every step runs under `timeout`, capped by what is left of the phase budget ($PHASE_BUDGET_S,
# default 530 s), so a hung step is killed and reported, never the whole call. Output: per-step
# logs and JSON under $OUT/<phase>/, a step table ($OUT/<phase>/steps.tsv) and, last, the
# summary tables (benchmarks/session_summary.py). /tmp survives between calls while the machine
# stays warm (the device README: ~30 s after a call, so send the next phase right away): the
# model folders and $SESSION_DIR (layouts.jsonl: the 1x1 base for phase `layouts`; a copy of
# every phase's JSON) are then reused. On a fresh machine every phase writes the 8B folder again
# (~1 min of its budget; `dp` the DeepSeek one too, ~2 min) and PRIOR_LAYOUTS=path/to/an earlier
# single/layouts.jsonl (carried in the working tree) restores the 1x1 base. The summary of
# several fetched $OUT folders: python3 benchmarks/session_summary.py DIR1 DIR2 ...
#
#   OUT=... bash benchmarks/gpu_session.sh single
#   GPU_SESSION_DRY=1 bash benchmarks/gpu_session.sh dp      # print the commands, run nothing
#   GPU_SESSION_CPU=1 bash benchmarks/gpu_session.sh single  # tiny models on the CPU (wiring check;
#                                                            # the CUDA-only DeepSeek/planner steps skip)
# Knobs (env): OUT, SESSION_DIR, MODEL8B, DSDIR, PYTHON, PHASE_BUDGET_S (lower it by the time the
# call spends before this script, e.g. installing wheels), PRIOR_LAYOUTS, TAIL_LINES, and the
# workload sizes below (LAYOUT_*, SERVE_*, DP_*, SERVER_FLAGS, DS_*, PLANNER_*).
set -u
cd "$(dirname "$0")/.."

PHASE=${1:-}
OUT=${OUT:-/tmp/gpu_session_out}
SESSION_DIR=${SESSION_DIR:-/tmp/gpu_session}
MODEL8B=${MODEL8B:-/tmp/llama3-8b}
DSDIR=${DSDIR:-/tmp/dsv2lite}
PY=${PYTHON:-python3}
DRY=${GPU_SESSION_DRY:-0}
CPU=${GPU_SESSION_CPU:-0}
PHASE_BUDGET_S=${PHASE_BUDGET_S:-530}
export PYTHONUNBUFFERED=1
# NVLink multicast stays off on the lent machines (device KINDS.md); set here too, so every
# process started below inherits it whatever the caller's environment.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
# Compiled Triton kernels and the converted tokenizer under /tmp: reused by later calls.
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton_cache}
export SHARDSERVE_CACHE_DIR=${SHARDSERVE_CACHE_DIR:-/tmp/shardserve_cache}

# Workloads (the issues ask for 1000 x (1000 in / 1000 out) for the layouts).
LAYOUT_PROMPTS=${LAYOUT_PROMPTS:-1000}; LAYOUT_IN=${LAYOUT_IN:-1000}; LAYOUT_OUT=${LAYOUT_OUT:-1000}
LAYOUT_DECODE=${LAYOUT_DECODE:-256}
SERVE_RATES=${SERVE_RATES:-4:60,16:100,inf:120}; SERVE_IN=${SERVE_IN:-512}; SERVE_OUT=${SERVE_OUT:-128}
DP_RATES=${DP_RATES:-inf:240,12:160}; DP_IN=${DP_IN:-512}; DP_OUT=${DP_OUT:-256}
SERVER_FLAGS=${SERVER_FLAGS:---max-model-len 2048}
DS_FLAGS=${DS_FLAGS:---b1-output-len 64 --num-prompts 128 --input-len 512 --output-len 128 --max-model-len 1024}
DS_HF_FLAGS=${DS_HF_FLAGS:---hf-num-prompts 32 --hf-batch 32 --hf-output-len 32}
LLAMA8B_FLAGS=${LLAMA8B_FLAGS:---skip-hf-compile}
# Four GPUs (phases x4, x4-70b): config-only folders served with --load-format dummy.
MODEL8B_CFG=${MODEL8B_CFG:-/tmp/llama3-8b-cfg}; MODEL70B_CFG=${MODEL70B_CFG:-/tmp/llama3-70b-cfg}
X4_CONFIGS=${X4_CONFIGS:-tp4=-tp 4;tp2xpp2=-tp 2 -pp 2;tp2xdp2=-tp 2 -dp 2;dp4=-dp 4}
X4_RATES=${X4_RATES:-inf:512,16:240}; X4_IN=${X4_IN:-512}; X4_OUT=${X4_OUT:-256}
X70_CONFIGS=${X70_CONFIGS:-tp4=-tp 4;tp2xpp2=-tp 2 -pp 2}
X70_RATES=${X70_RATES:-inf:256,4:100}
PLANNER_PRESETS=${PLANNER_PRESETS:-llama-3-8b,qwen3-8b}; PLANNER_TOKENS=${PLANNER_TOKENS:-2048,8192}
TPS_DEVICE_FLAGS=""
if [ "$CPU" = 1 ]; then  # tiny everything, so the wiring can be checked without a GPU
    MODEL8B=${CPU_MODEL:-/tmp/gpu_session_cpu/tiny}
    SESSION_DIR=${SESSION_DIR%/}-cpu
    LAYOUT_PROMPTS=8; LAYOUT_IN=32; LAYOUT_OUT=16; LAYOUT_DECODE=16
    SERVE_RATES=4:6,inf:8; SERVE_IN=32; SERVE_OUT=16; DP_RATES=inf:8,4:6; DP_IN=32; DP_OUT=16
    SERVER_FLAGS="--device cpu --dtype float32 --max-model-len 256 --kv-cache-memory 64MiB"
    TPS_DEVICE_FLAGS="--device cpu --dtype float32"
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # torch's threads fight over a busy CPU
fi

T0=$(date +%s)
DIR="$OUT/$PHASE"

ts() { date +%H:%M:%S; }
say() { echo "[$(ts)] $*" | tee -a "$DIR/session.log"; }
left() { echo $(( PHASE_BUDGET_S - ($(date +%s) - T0) )); }
# inner_budget CAP: a step's own --budget-s, 10 s inside the timeout run_step will give it.
inner_budget() { local l=$(( $(left) - 10 )); echo $(( ($1 < l ? $1 : l) - 10 )); }

# run_step NAME GPUS CAP_S CMD...: run CMD with CUDA_VISIBLE_DEVICES=GPUS (all: both) under
# `timeout` (the smaller of CAP_S and what is left of the phase budget), log to $DIR/NAME.log,
# record "name rc seconds" in steps.tsv, print the log's last lines.
run_step() {
    local name=$1 gpus=$2 cap=$3; shift 3
    local budget; budget=$(left)
    local t=$(( cap < budget - 10 ? cap : budget - 10 ))
    local envs=()
    [ "$gpus" != all ] && envs=(CUDA_VISIBLE_DEVICES="$gpus")
    if [ "$DRY" = 1 ]; then
        echo "DRY [$name] (timeout ${cap}s) ${envs[*]:-} $(printf '%q ' "$@")"
        printf '%s\t%s\t%s\n' "$name" dry 0 >> "$DIR/steps.tsv"
        return 0
    fi
    if [ "$t" -lt 30 ]; then
        say "$name: skipped (${budget} s left of the phase budget)"
        printf '%s\t%s\t%s\n' "$name" skipped 0 >> "$DIR/steps.tsv"
        return 124
    fi
    say "$name: start on GPU ${gpus} (timeout ${t} s; log $DIR/$name.log)"
    local start; start=$(date +%s)
    echo "\$ ${envs[*]:-} $*" > "$DIR/$name.log"
    env ${envs[@]+"${envs[@]}"} timeout -k 30 "$t" "$@" >> "$DIR/$name.log" 2>&1
    local rc=$?
    local took=$(( $(date +%s) - start ))
    printf '%s\t%s\t%s\n' "$name" "$rc" "$took" >> "$DIR/steps.tsv"
    say "$name: done, exit code $rc$([ $rc = 124 ] && echo ' (timed out)') in ${took} s; log tail:"
    grep -v -e 'Loading .*tensor/s' -e '^Generating' "$DIR/$name.log" | tail -n "${TAIL_LINES:-12}" | sed "s/^/    [$name] /"
    return $rc
}

# A folder written by shardserve.testing is complete once its tokenizer is there (written last).
model_ready() { [ -f "$1/tokenizer.json" ] && [ -f "$1/config.json" ]; }

write_model() {  # write_model NAME GPUS CAP DIR PRESET
    local name=$1 gpus=$2 cap=$3 dir=$4 preset=$5
    if model_ready "$dir"; then say "$name: $dir is there"; return 0; fi
    [ "$DRY" != 1 ] && [ -f "$dir/config.json" ] && rm -rf "$dir"  # a half-written one of ours
    if [ "$CPU" = 1 ]; then
        run_step "$name" "$gpus" "$cap" "$PY" -m shardserve.testing --preset tiny --out "$dir" \
            --set num_hidden_layers=4
    else
        run_step "$name" "$gpus" "$cap" "$PY" -c "import sys, time; sys.path.insert(0, '.'); \
from benchmarks.common import make_model_dir; t = time.time(); make_model_dir('$dir', '$preset'); \
print(f'written in {time.time() - t:.0f} s')"
    fi
    model_ready "$dir" || [ "$DRY" = 1 ]
}

keep() {  # copy this phase's results to $SESSION_DIR (the next calls' $OUT starts empty)
    [ "$DRY" = 1 ] && return 0
    mkdir -p "$SESSION_DIR/$PHASE"
    cp -f "$DIR"/*.json "$DIR"/*.tsv "$SESSION_DIR/$PHASE/" 2>/dev/null || true
}

env_info() {
    {
        echo "phase $PHASE at $(date -Is); budget ${PHASE_BUDGET_S} s; OUT=$OUT SESSION_DIR=$SESSION_DIR"
        nvidia-smi --query-gpu=index,name,memory.used,memory.total --format=csv,noheader 2>&1 | head -4
        nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader 2>/dev/null | head
        "$PY" -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" 2>&1 | tail -1
        df -h /tmp | tail -1
        ls -d "$MODEL8B" "$DSDIR" 2>/dev/null
    } > "$DIR/env.txt" 2>&1
    sed 's/^/    /' "$DIR/env.txt"
    if [ "$CPU" != 1 ] && [ -n "$(nvidia-smi --query-compute-apps=pid --format=csv,noheader 2>/dev/null)" ]; then
        say "WARNING: GPU processes are already running (above): a killed earlier call may have left them"
    fi
}

finish() {
    keep
    echo
    say "phase $PHASE: steps (name, exit code, seconds):"
    if command -v column >/dev/null; then column -t "$DIR/steps.tsv"; else cat "$DIR/steps.tsv"; fi | sed 's/^/    /'
    "$PY" benchmarks/session_summary.py "$DIR"
    say "phase $PHASE ended after $(( $(date +%s) - T0 )) s"
    # The device tool brings back at most 8 files: one archive of the whole phase (logs of
    # every server and rank included) instead of the loose files.
    if [ "$DRY" != 1 ] && [ -z "${KEEP_LOOSE:-}" ]; then
        tar czf "$OUT/$PHASE.tgz" -C "$OUT" "$PHASE" && rm -rf "${OUT:?}/$PHASE"
    fi
}

# ---- phases ------------------------------------------------------------------------------

# tp_scaling on the 8B model with the layouts workload; records go to this phase's folder and
# to $SESSION_DIR/layouts.jsonl, whose earlier records (1x1 from `single`) join the table.
# PRIOR_LAYOUTS: another records file to include (e.g. single/layouts.jsonl of an earlier call,
# carried in the working tree, if the machine was given back and /tmp is gone).
TPS=("$PY" benchmarks/tp_scaling.py --model-dir "$MODEL8B" $TPS_DEVICE_FLAGS
     --num-prompts "$LAYOUT_PROMPTS" --input-len "$LAYOUT_IN" --output-len "$LAYOUT_OUT"
     --decode-tokens "$LAYOUT_DECODE" --jsonl "$DIR/layouts.jsonl"
     --jsonl "$SESSION_DIR/layouts.jsonl" --prior-jsonl "$SESSION_DIR/layouts.jsonl")
[ -n "${PRIOR_LAYOUTS:-}" ] && TPS+=(--prior-jsonl "$PRIOR_LAYOUTS")

phase_single() {
    gpu0() {
        write_model write-8b 0 240 "$MODEL8B" llama-3-8b || return
        if [ "$CPU" = 1 ]; then
            run_step layout-1x1 0 330 "${TPS[@]}" --layouts 1x1 --timeout-s 320 --json "$DIR/layouts_1x1.json"
        else
            # The one-GPU figures (batch 1, 256 x (512/256), 1000 x (1000/1000)), transformers
            # eager beside them, and async scheduling against lock-step, in one run.
            run_step llama8b-vs-hf 0 400 "$PY" benchmarks/llama8b_vs_hf.py --model-dir "$MODEL8B" \
                $LLAMA8B_FLAGS --json "$DIR/llama8b_vs_hf.json"
        fi
        run_step serve-tp1 0 300 "$PY" benchmarks/serve_layouts.py --model "$MODEL8B" \
            --config "tp1=" --rates "$SERVE_RATES" --input-len "$SERVE_IN" --output-len "$SERVE_OUT" \
            --server-flags="$SERVER_FLAGS" --budget-s "$(inner_budget 300)" \
            --json "$DIR/serve_tp1.json" --log-dir "$DIR/serve_tp1_logs" --label "1 x H200"
    }
    gpu1() {
        if [ "$CPU" = 1 ]; then say "planner / DeepSeek steps need CUDA: skipped on CPU"; return; fi
        run_step planner 1 170 "$PY" benchmarks/planner_vs_measured.py --presets "$PLANNER_PRESETS" \
            --tokens "$PLANNER_TOKENS" --json "$DIR/planner.json"
        # bf16 agreement with transformers on SmolLM2 (same GPU), the issue's 64-prompt check.
        run_step bf16-smollm2 1 150 "$PY" -m pytest -q -s -p no:cacheprovider tests/gpu
        write_model write-dsv2lite 1 260 "$DSDIR" deepseek-v2-lite || return
        run_step ds-single 1 330 "$PY" benchmarks/deepseek_v2_lite.py --model-dir "$DSDIR" \
            $DS_FLAGS $DS_HF_FLAGS --json "$DIR/ds_single.json"
    }
    gpu0 & local p0=$!
    gpu1 & local p1=$!
    wait $p0 $p1
}

phase_layouts() {
    if [ "$DRY" != 1 ] && ! cat "$SESSION_DIR/layouts.jsonl" "${PRIOR_LAYOUTS:-/dev/null}" 2>/dev/null | grep -q '"layout": "1x1".*"status": "ok"'; then
        say "no 1x1 record in $SESSION_DIR/layouts.jsonl: the table's base will be 2x1 (run phase layouts-1x1 for it)"
    fi
    if [ "$CPU" != 1 ] && [ -n "${WITH_PLANNER:-}" ]; then  # GPU1 is free while GPU0 writes
        run_step planner 1 170 "$PY" benchmarks/planner_vs_measured.py --presets "$PLANNER_PRESETS" \
            --tokens "$PLANNER_TOKENS" --json "$DIR/planner.json" &
    fi
    model_ready "$MODEL8B" || [ "$DRY" = 1 ] || write_model write-8b 0 240 "$MODEL8B" llama-3-8b
    wait
    # CUDA graphs under NCCL (TP 2) and per pipeline stage (PP 2) against eager, tiny model.
    [ "$CPU" = 1 ] || run_step graphs-2gpu all 120 "$PY" -m pytest -q -s -p no:cacheprovider \
        tests/gpu/test_multi_gpu_graphs.py
    run_step layouts-2x1-1x2 all 520 "${TPS[@]}" --layouts 2x1,1x2 --timeout-s 330 \
        --budget-s "$(inner_budget 520)" --json "$DIR/layouts.json"
}

phase_layouts_1x1() {
    model_ready "$MODEL8B" || [ "$DRY" = 1 ] || write_model write-8b 0 240 "$MODEL8B" llama-3-8b
    run_step layout-1x1 0 400 "${TPS[@]}" --layouts 1x1 --timeout-s 390 --json "$DIR/layouts_1x1.json"
}

ds_ep_vs_tp() {
    if [ "$CPU" = 1 ]; then say "DeepSeek EP vs TP needs CUDA: skipped on CPU"; return; fi
    if [ "$DRY" != 1 ] && ! model_ready "$DSDIR"; then
        write_model write-dsv2lite 0 260 "$DSDIR" deepseek-v2-lite || return
    fi
    run_step ds-ep-vs-tp all "$1" "$PY" benchmarks/deepseek_v2_lite.py --model-dir "$DSDIR" \
        --mode ep-vs-tp $DS_FLAGS --json "$DIR/ds_ep_vs_tp.json"
}

phase_dp() {
    model_ready "$MODEL8B" || [ "$DRY" = 1 ] || write_model write-8b 0 240 "$MODEL8B" llama-3-8b
    run_step serve-dp2-vs-tp2 all 300 "$PY" benchmarks/serve_layouts.py --model "$MODEL8B" \
        --configs "dp2=-dp 2;tp2=-tp 2" --rates "$DP_RATES" --input-len "$DP_IN" \
        --output-len "$DP_OUT" --server-flags="$SERVER_FLAGS" --budget-s "$(inner_budget 300)" \
        --json "$DIR/serve_dp2_vs_tp2.json" --log-dir "$DIR/serve_dp_logs" --label "2 x H200"
    ds_ep_vs_tp 300
}

phase_ep() { ds_ep_vs_tp 520; }

# One GPU each, at once: the 8B comparison (async vs lock-step; transformers skipped unless
# LLAMA8B_FLAGS says otherwise) and the serving table at several rates.
phase_final() {
    model_ready "$MODEL8B" || [ "$DRY" = 1 ] || write_model write-8b 0 240 "$MODEL8B" llama-3-8b
    run_step llama8b-vs-hf 0 330 "$PY" benchmarks/llama8b_vs_hf.py --model-dir "$MODEL8B" \
        ${FINAL_LLAMA8B_FLAGS:---skip-hf} --json "$DIR/llama8b_vs_hf.json" &
    run_step serve-tp1 1 330 "$PY" benchmarks/serve_layouts.py --model "$MODEL8B" \
        --config "tp1=" --rates "$SERVE_RATES" --input-len "$SERVE_IN" --output-len "$SERVE_OUT" \
        --server-flags="$SERVER_FLAGS" --budget-s "$(inner_budget 330)" \
        --json "$DIR/serve_tp1.json" --log-dir "$DIR/serve_tp1_logs" --label "1 x H200" &
    wait
}

# serve_x4 NAME MODEL_DIR PRESET CONFIGS RATES CAP LABEL: serve_layouts over all visible GPUs
# with dummy weights, then the planner's memory per GPU beside the measured one.
serve_x4() {
    local name=$1 dir=$2 preset=$3 configs=$4 rates=$5 cap=$6 label=$7
    if [ "$CPU" = 1 ]; then dir=$MODEL8B; model_ready "$dir" || write_model write-tiny 0 60 "$dir" tiny
    elif ! model_ready "$dir"; then
        run_step "cfg-$name" all 60 "$PY" -m shardserve.testing --preset "$preset" --no-weights --out "$dir"
    fi
    run_step "$name" all "$cap" "$PY" benchmarks/serve_layouts.py --model "$dir" \
        --configs "$configs" --rates "$rates" --input-len "$X4_IN" --output-len "$X4_OUT" \
        --server-flags="$SERVER_FLAGS --load-format dummy --log-level info" --budget-s "$(inner_budget "$cap")" \
        --json "$DIR/$name.json" --log-dir "$DIR/${name}_logs" --label "$label"
    [ -f "$DIR/$name.json" ] && run_step "$name-memory" all 60 "$PY" benchmarks/layout_memory.py \
        --model "$dir" --serve-json "$DIR/$name.json" --log-dir "$DIR/${name}_logs" \
        --json "$DIR/$name-memory.json"
}

phase_x4() {
    serve_x4 serve-x4-8b "$MODEL8B_CFG" llama-3-8b "$X4_CONFIGS" "$X4_RATES" 520 "4 x H200"
}

phase_x4_70b() {
    serve_x4 serve-x4-70b "$MODEL70B_CFG" llama-3-70b "$X70_CONFIGS" "$X70_RATES" 520 "4 x H200"
}

phase_x4_final() {
    gpu0() {
        write_model write-8b 0 120 "$MODEL8B" llama-3-8b || return
        run_step llama8b-vs-hf 0 460 "$PY" benchmarks/llama8b_vs_hf.py --model-dir "$MODEL8B" \
            $LLAMA8B_FLAGS --json "$DIR/llama8b_vs_hf.json"
    }
    gpu1() {
        write_model write-dsv2lite 1 150 "$DSDIR" deepseek-v2-lite || return
        run_step ds-1000 1 500 "$PY" benchmarks/deepseek_v2_lite.py --model-dir "$DSDIR" \
            ${DS_FINAL_FLAGS:---b1-output-len 128 --hf-num-prompts 32 --hf-batch 32 --hf-output-len 32 --profile-b1} \
            --json "$DIR/ds_single.json"
    }
    gpu23() {
        # The engine's CUDA-only input paths (pinned packing, placeholders) against lock-step.
        SHARDSERVE_TEST_DEVICE=cuda run_step async-gpu-tests 2 150 "$PY" -m pytest -q -x \
            -p no:cacheprovider tests/engine/test_async_scheduling.py tests/e2e/test_sampling_e2e.py
        [ -f tests/gpu/test_custom_all_reduce.py ] && run_step car-test 2,3 120 "$PY" -m pytest \
            -q -s -p no:cacheprovider tests/gpu/test_custom_all_reduce.py
        [ -f benchmarks/all_reduce_bench.py ] && run_step car-bench 2,3 90 "$PY" \
            benchmarks/all_reduce_bench.py ${CAR_BENCH_FLAGS:-}
        # Batch 1 at TP 2; the one-GPU base is llama8b-vs-hf's batch-1 figure on GPU 0.
        local tps=("$PY" benchmarks/tp_scaling.py --model-dir "$MODEL8B_CFG" --layouts 2x1
                   --skip-throughput --decode-tokens 256 --timeout-s 150)
        run_step tp2-b1-custom 2,3 200 "${tps[@]}" --engine-args '{"load_format": "dummy"}' \
            --json "$DIR/tp2_b1_custom.json"
        run_step tp2-b1-nccl 2,3 200 "${tps[@]}" \
            --engine-args '{"load_format": "dummy", "disable_custom_all_reduce": true}' \
            --json "$DIR/tp2_b1_nccl.json"
        export CUDA_VISIBLE_DEVICES=2,3  # this subshell only
        serve_x4 serve-70b-tp2 "$MODEL70B_CFG" llama-3-70b \
            "tp2=-tp 2" "${X70_TP2_RATES:-inf:128,2:40}" 240 "2 x H200 (of 4)"
    }
    gpu0 & local p0=$!
    gpu1 & local p1=$!
    gpu23 & local p2=$!
    wait $p0 $p1 $p2
}

# Two GPUs, ~6 min: every compiled kernel test and the GPU-only tests (bf16 rounding against
# transformers, SmolLM2 bf16 agreement, graphs under TP/PP, the custom all-reduce), then the
# batch-1 timelines at TP 1 and TP 2 (benchmarks/decode_timeline.py, dummy weights).
phase_check() {
    run_step kernel-tests 0 200 "$PY" -m pytest -q -p no:cacheprovider tests/kernels \
        tests/layers/test_linear_op.py
    run_step gpu-tests all 200 "$PY" -m pytest -q -s -p no:cacheprovider tests/gpu
    local tl=("$PY" benchmarks/decode_timeline.py --model-dir "$MODEL8B_CFG" --out "$DIR/timeline")
    run_step timeline-tp1 0 120 "${tl[@]}" --tp 1 --json "$DIR/timeline_tp1.json"
    run_step timeline-tp2 all 120 "${tl[@]}" --tp 2 --json "$DIR/timeline_tp2.json"
}

case "$PHASE" in
    single|layouts|layouts-1x1|dp|ep|final|x4|x4-70b|x4-final|check) ;;
    summary)
        "$PY" benchmarks/session_summary.py "$OUT" "$SESSION_DIR"
        exit 0 ;;
    *)
        sed -n '2,/^set -u/p' "$0" | sed 's/^# \{0,1\}//' | head -n -1
        echo "usage: bash $0 single|layouts|dp|layouts-1x1|ep|final|x4|x4-70b|check|summary"
        exit 2 ;;
esac

mkdir -p "$DIR" "$SESSION_DIR"
: > "$DIR/steps.tsv"
say "phase $PHASE: start (budget ${PHASE_BUDGET_S} s$([ "$DRY" = 1 ] && echo ', DRY run')$([ "$CPU" = 1 ] && echo ', CPU'))"
[ "$DRY" = 1 ] || env_info
"phase_${PHASE//-/_}"
finish
