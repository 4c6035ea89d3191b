"""Kernel tests run compiled on a CUDA GPU and through Triton's interpreter elsewhere.

TRITON_INTERPRET is read when a @triton.jit function is decorated, i.e. when the kernel module is
imported, so it must be set before the first import of any shardserve.kernels.<kernel>. The root
tests/conftest.py sets it (another test directory may import a kernel module first); this one
sets it too, for runs rooted here, and fails loudly if a kernel module was imported before it.
"""

from __future__ import annotations

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # Any kernel module (the *_ref torch references hold no Triton code) imported too early.
    early = [m for m in sys.modules
             if m.startswith("shardserve.kernels.") and not m.endswith("_ref")]
    # Test modules of other directories may import kernels, once tests/conftest.py has set the
    # flag before any of them (it says so); a run rooted here has only this file to rely on.
    if (early and os.environ["TRITON_INTERPRET"] == "1"
            and os.environ.get("SHARDSERVE_TESTS_INTERPRET_FIRST") != "1"):
        raise RuntimeError(f"{early} imported before tests/kernels/conftest.py set "
                           "TRITON_INTERPRET=1; their kernels would not run on the CPU")
