"""benchmarks/kernels_resources.py: the attention kernels, over a bf16 cache and an fp8 one,
compile for sm_90 on this CPU with the launch's constexprs (the tool went stale once when the
kernels gained FP8_AS_FP16 and SKIP_DECODES; this keeps it honest)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_attention_kernels_compile_for_hopper_over_both_caches():
    from benchmarks.kernels_resources import CUOBJDUMP
    if not os.path.exists(CUOBJDUMP):
        pytest.skip("this triton wheel ships no cuobjdump")
    # The test session interprets kernels (TRITON_INTERPRET=1); the tool needs them compiled.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernels_resources.py"),
                           "--dtypes", "bf16", "--only", "head 128 group 4"],
                          capture_output=True, text=True, env=env, timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if "head 128 group 4" in ln]
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # prefill + decode (split and not), over the bf16 cache and the fp8 one
    assert len(lines) == 6, lines
    for ln in lines:
        regs = int(re.search(r"regs\s+(\d+)", ln).group(1))
        assert 0 < regs <= 255 and re.search(r"local\s+0B", ln), ln  # no spills
    fp8_decode = [ln for ln in lines if "fp8 cache" in ln and ln.startswith("decode")]
    assert len(fp8_decode) == 2 and all("(64/1/1)" in ln for ln in fp8_decode), fp8_decode
