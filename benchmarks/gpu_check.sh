#!/usr/bin/env bash
# Correctness on a CUDA GPU in one go: compiled Triton kernels against their references, the
# end-to-end suite with the engine on the GPU (float32, transformers reference on the CPU),
# and bf16 agreement with transformers on SmolLM2. Writes logs to ${OUT:-/tmp}.
set -u
out=${OUT:-/tmp}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
echo "== kernels (compiled)"
timeout 300 python3 -m pytest -q -n 8 tests/kernels/test_store_kv.py tests/kernels/test_paged_attention.py \
    tests/kernels/test_norm_act_rope.py 2>&1 | tee "$out/kernels_tests.log" | tail -6
echo "== engine end to end on cuda (float32) + bf16 SmolLM2"
SHARDSERVE_TEST_DEVICE=cuda timeout 420 python3 -m pytest -q -x tests/e2e tests/gpu -p no:cacheprovider \
    2>&1 | tee "$out/e2e_cuda.log" | tail -8
grep -h "bf16 greedy agreement" "$out/e2e_cuda.log" || true
