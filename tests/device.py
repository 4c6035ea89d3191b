"""Where the engine under test runs: CPU by default; SHARDSERVE_TEST_DEVICE=cuda runs the same
end-to-end tests on a GPU (the transformers reference stays on the CPU in float32)."""

import os

TEST_DEVICE = os.environ.get("SHARDSERVE_TEST_DEVICE", "cpu")
